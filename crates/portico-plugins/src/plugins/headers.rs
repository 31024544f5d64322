//! The headers part of `request-transformer` and `response-transformer` (see
//! `transform`): add, set, append, remove and rename headers, with `${...}` templates
//! in values.
//!
//! Order of operations: remove, rename, set, add (only when absent), append.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use portico_config::grammar::{Template, Var};
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::ctx::Ctx;
use crate::registry::SettingsErrors;

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Added only when the header is absent.
    #[serde(default)]
    pub add: BTreeMap<String, Template>,
    /// Replaces any existing values.
    #[serde(default)]
    pub set: BTreeMap<String, Template>,
    /// Adds one more value.
    #[serde(default)]
    pub append: BTreeMap<String, Template>,
    /// Removed.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Renamed: old name → new name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

enum Value {
    Static(HeaderValue),
    Dynamic(Template),
}

pub struct Compiled {
    add: Vec<(HeaderName, Value)>,
    set: Vec<(HeaderName, Value)>,
    append: Vec<(HeaderName, Value)>,
    remove: Vec<HeaderName>,
    rename: Vec<(HeaderName, HeaderName)>,
}

fn name(n: &str, path: KeyPath, errs: &mut SettingsErrors) -> Option<HeaderName> {
    match HeaderName::from_bytes(n.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            errs.push((path, format!("`{n}` is not a valid header name")));
            None
        }
    }
}

fn values(
    map: BTreeMap<String, Template>,
    op: &str,
    errs: &mut SettingsErrors,
    response: bool,
) -> Vec<(HeaderName, Value)> {
    let base = KeyPath::root().key("headers").key(op);
    let mut out = Vec::new();
    for (n, t) in map {
        let Some(h) = name(&n, base.key(&n), errs) else {
            continue;
        };
        let v = if t.is_literal() {
            match HeaderValue::from_str(t.source()) {
                Ok(v) => Value::Static(v),
                Err(_) => {
                    errs.push((base.key(&n), "not a valid header value".into()));
                    continue;
                }
            }
        } else {
            if response
                && t.vars()
                    .any(|v| matches!(v, Var::Header(_) | Var::Query(_) | Var::Cookie(_)))
            {
                errs.push((
                    base.key(&n),
                    "response templates cannot use `header.`, `query.` or `cookie.`: the request is gone by the response phase".into(),
                ));
                continue;
            }
            Value::Dynamic(t)
        };
        out.push((h, v));
    }
    out
}

impl Compiled {
    /// Compile the settings; `response` rejects templates that need the request.
    pub fn new(ops: HeaderOps, response: bool) -> Result<Self, SettingsErrors> {
        let mut errs = Vec::new();
        let base = KeyPath::root().key("headers");
        let c = Compiled {
            add: values(ops.add, "add", &mut errs, response),
            set: values(ops.set, "set", &mut errs, response),
            append: values(ops.append, "append", &mut errs, response),
            remove: ops
                .remove
                .iter()
                .enumerate()
                .filter_map(|(i, n)| name(n, base.key("remove").index(i), &mut errs))
                .collect(),
            rename: ops
                .rename
                .iter()
                .filter_map(|(a, b)| {
                    let p = base.key("rename").key(a);
                    Some((name(a, p.clone(), &mut errs)?, name(b, p, &mut errs)?))
                })
                .collect(),
        };
        if errs.is_empty() {
            Ok(c)
        } else {
            Err(errs)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.set.is_empty()
            && self.append.is_empty()
            && self.remove.is_empty()
            && self.rename.is_empty()
    }

    pub fn apply(&self, ctx: &Ctx, req: Option<&http::request::Parts>, h: &mut HeaderMap) {
        let render = |v: &Value| -> Option<HeaderValue> {
            match v {
                Value::Static(v) => Some(v.clone()),
                Value::Dynamic(t) => HeaderValue::from_str(&ctx.render(req, t)).ok(),
            }
        };
        for n in &self.remove {
            h.remove(n);
        }
        for (from, to) in &self.rename {
            let vals: Vec<HeaderValue> = h.get_all(from).iter().cloned().collect();
            if !vals.is_empty() {
                h.remove(from);
                for v in vals {
                    h.append(to.clone(), v);
                }
            }
        }
        for (n, v) in &self.set {
            if let Some(v) = render(v) {
                h.insert(n.clone(), v);
            }
        }
        for (n, v) in &self.add {
            if !h.contains_key(n) {
                if let Some(v) = render(v) {
                    h.insert(n.clone(), v);
                }
            }
        }
        for (n, v) in &self.append {
            if let Some(v) = render(v) {
                h.append(n.clone(), v);
            }
        }
    }
}
