//! JSON body edits by JSON pointer (RFC 6901), shared by `request-transformer` and
//! `response-transformer`: `unwrap`, `allow`, `remove`, `rename`, `set`, `add`, `wrap`,
//! applied in that order. Pointers are parsed once; `*` as a segment stands for every
//! member of an object or every item of an array (in `allow` and `remove`, and in
//! `data-masking`'s `pointers`).

use std::collections::BTreeMap;

use portico_config::grammar::{Template, Var};
use portico_config::units::ByteSize;
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::registry::SettingsErrors;

/// Bodies larger than this are not transformed (they stream through).
pub const DEFAULT_MAX_BODY: u64 = 1 << 20;

/// The `body:` settings of the transformers.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BodySettings {
    /// Pointer → value, set only when the pointer has no value yet (parents are
    /// created as objects). A string value is a template.
    #[serde(default)]
    pub add: BTreeMap<String, Value>,
    /// Pointer → value, replacing any value (parents are created as objects).
    #[serde(default)]
    pub set: BTreeMap<String, Value>,
    /// Pointers removed (`*` matches every member or item).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Pointer → pointer: the value moves (when present).
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// `response-transformer` only: keep only the values at these pointers (with their
    /// parents); `*` matches every member or item.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Put the body under this member: `data` turns `B` into `{"data": B}`.
    #[serde(default)]
    pub wrap: Option<String>,
    /// Replace the body by the value at this member or pointer (`data` or `/data`),
    /// when it has one.
    #[serde(default)]
    pub unwrap: Option<String>,
    /// Larger bodies stream through untouched. Default `1MiB`.
    #[serde(default)]
    pub max_body: Option<ByteSize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Any,
}

/// A parsed JSON pointer, possibly with `*` segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    pub segs: Vec<Seg>,
    source: String,
}

impl Pointer {
    /// Parse `/a/b~1c/*`. `wildcards`: whether `*` means "every" (else it is a key).
    pub fn parse(s: &str, wildcards: bool) -> Result<Pointer, String> {
        if s.is_empty() {
            return Err("the empty pointer means the whole body; name a member (`/name`)".into());
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(format!("`{s}` is not a JSON pointer: it starts with `/`"));
        };
        let mut segs = Vec::new();
        for raw in rest.split('/') {
            if wildcards && raw == "*" {
                segs.push(Seg::Any);
                continue;
            }
            if raw.contains('~') {
                let bad = raw
                    .split('~')
                    .skip(1)
                    .any(|t| !(t.starts_with('0') || t.starts_with('1')));
                if bad {
                    return Err(format!("`{s}`: `~` must be followed by 0 or 1"));
                }
            }
            segs.push(Seg::Key(raw.replace("~1", "/").replace("~0", "~")));
        }
        Ok(Pointer {
            segs,
            source: s.to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether a segment is `*`.
    pub fn has_any(&self) -> bool {
        self.segs.contains(&Seg::Any)
    }
}

fn index(key: &str, len: usize) -> Option<usize> {
    if key.len() > 1 && key.starts_with('0') {
        return None;
    }
    key.parse::<usize>().ok().filter(|i| *i < len)
}

fn child_mut<'v>(v: &'v mut Value, key: &str) -> Option<&'v mut Value> {
    match v {
        Value::Object(m) => m.get_mut(key),
        Value::Array(a) => {
            let i = index(key, a.len())?;
            a.get_mut(i)
        }
        _ => None,
    }
}

/// The value at a pointer without wildcards.
pub fn get_mut<'v>(v: &'v mut Value, segs: &[Seg]) -> Option<&'v mut Value> {
    let mut cur = v;
    for s in segs {
        let Seg::Key(k) = s else { return None };
        cur = child_mut(cur, k)?;
    }
    Some(cur)
}

/// Remove the values at a pointer (with wildcards); returns how many were removed.
pub fn remove(v: &mut Value, segs: &[Seg]) -> usize {
    match segs {
        [] => 0,
        [last] => match (v, last) {
            (Value::Object(m), Seg::Key(k)) => usize::from(m.remove(k).is_some()),
            (Value::Object(m), Seg::Any) => {
                let n = m.len();
                m.clear();
                n
            }
            (Value::Array(a), Seg::Key(k)) => match index(k, a.len()) {
                Some(i) => {
                    a.remove(i);
                    1
                }
                None => 0,
            },
            (Value::Array(a), Seg::Any) => {
                let n = a.len();
                a.clear();
                n
            }
            _ => 0,
        },
        [first, rest @ ..] => match first {
            Seg::Key(k) => child_mut(v, k).map_or(0, |c| remove(c, rest)),
            Seg::Any => match v {
                Value::Object(m) => m.values_mut().map(|c| remove(c, rest)).sum(),
                Value::Array(a) => a.iter_mut().map(|c| remove(c, rest)).sum(),
                _ => 0,
            },
        },
    }
}

/// Take the value at a pointer without wildcards out of the document.
pub fn take(v: &mut Value, segs: &[Seg]) -> Option<Value> {
    let (last, parents) = segs.split_last()?;
    let parent = get_mut(v, parents)?;
    let Seg::Key(k) = last else { return None };
    match parent {
        Value::Object(m) => m.remove(k),
        Value::Array(a) => index(k, a.len()).map(|i| a.remove(i)),
        _ => None,
    }
}

/// Put `value` at a pointer without wildcards, creating missing parents as objects.
/// `only_if_absent`: leave an existing value. `-` as the last segment appends to an
/// array. Returns false when a parent is a scalar (nothing is changed).
pub fn put(v: &mut Value, segs: &[Seg], value: Value, only_if_absent: bool) -> bool {
    let Some((last, parents)) = segs.split_last() else {
        return false;
    };
    let mut cur = v;
    for s in parents {
        let Seg::Key(k) = s else { return false };
        if let Value::Object(m) = cur {
            cur = m
                .entry(k.clone())
                .or_insert_with(|| Value::Object(Map::new()));
        } else {
            match child_mut(cur, k) {
                Some(c) => cur = c,
                None => return false,
            }
        }
    }
    let Seg::Key(k) = last else { return false };
    match cur {
        Value::Object(m) => {
            if !(only_if_absent && m.contains_key(k)) {
                m.insert(k.clone(), value);
            }
            true
        }
        Value::Array(a) => {
            if k == "-" {
                a.push(value);
                return true;
            }
            match index(k, a.len()) {
                Some(i) => {
                    if !only_if_absent {
                        a[i] = value;
                    }
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}

/// Keep only the values at the given pointers (and their parents). Array items that
/// keep nothing are dropped; a container that keeps nothing is left out.
pub fn allow(v: &Value, pointers: &[Pointer]) -> Option<Value> {
    let pats: Vec<&[Seg]> = pointers.iter().map(|p| p.segs.as_slice()).collect();
    keep(v, &pats)
}

fn keep(v: &Value, pats: &[&[Seg]]) -> Option<Value> {
    if pats.iter().any(|p| p.is_empty()) {
        return Some(v.clone());
    }
    let sub = |key: &str| -> Vec<&[Seg]> {
        pats.iter()
            .filter_map(|p| match p.split_first() {
                Some((Seg::Any, rest)) => Some(rest),
                Some((Seg::Key(k), rest)) if k == key => Some(rest),
                _ => None,
            })
            .collect()
    };
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, c) in m {
                let s = sub(k);
                if s.is_empty() {
                    continue;
                }
                if let Some(kept) = keep(c, &s) {
                    out.insert(k.clone(), kept);
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        Value::Array(a) => {
            let mut out = Vec::new();
            for (i, c) in a.iter().enumerate() {
                let s = sub(&i.to_string());
                if s.is_empty() {
                    continue;
                }
                if let Some(kept) = keep(c, &s) {
                    out.push(kept);
                }
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
        _ => None,
    }
}

/// A value to put in a body: fixed, or a template rendered per request.
pub enum JValue {
    Static(Value),
    Template(Template),
}

impl JValue {
    fn compile(v: Value, response: bool) -> Result<JValue, String> {
        let Value::String(s) = v else {
            return Ok(JValue::Static(v));
        };
        let t = Template::parse(&s)?;
        if t.is_literal() {
            return Ok(JValue::Static(Value::String(s)));
        }
        if response
            && t.vars()
                .any(|v| matches!(v, Var::Header(_) | Var::Query(_) | Var::Cookie(_)))
        {
            return Err("response templates cannot use `header.`, `query.` or `cookie.`: the request is gone by the response phase".into());
        }
        Ok(JValue::Template(t))
    }

    pub fn value(&self, render: &dyn Fn(&Template) -> String) -> Value {
        match self {
            JValue::Static(v) => v.clone(),
            JValue::Template(t) => Value::String(render(t)),
        }
    }
}

/// The compiled `body:` settings.
pub struct BodyOps {
    unwrap: Option<Pointer>,
    allow: Vec<Pointer>,
    remove: Vec<Pointer>,
    rename: Vec<(Pointer, Pointer)>,
    set: Vec<(Pointer, JValue)>,
    add: Vec<(Pointer, JValue)>,
    wrap: Option<String>,
    pub max_body: u64,
}

impl BodyOps {
    /// Compile; errors are located under `body.`. `response`: `allow` is accepted and
    /// templates cannot use the request.
    pub fn new(s: BodySettings, response: bool) -> Result<BodyOps, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        let base = KeyPath::root().key("body");
        let ptr = |s: &str, at: KeyPath, wild: bool, errs: &mut SettingsErrors| {
            Pointer::parse(s, wild).map_err(|m| errs.push((at, m))).ok()
        };
        let values = |map: BTreeMap<String, Value>, op: &str, errs: &mut SettingsErrors| {
            let mut out = Vec::new();
            for (k, v) in map {
                let at = base.key(op).key(&k);
                let p = ptr(&k, at.clone(), false, errs);
                match JValue::compile(v, response) {
                    Ok(v) => out.extend(p.map(|p| (p, v))),
                    Err(m) => errs.push((at, m)),
                }
            }
            out
        };
        let set = values(s.set, "set", &mut errs);
        let add = values(s.add, "add", &mut errs);
        let remove = s
            .remove
            .iter()
            .enumerate()
            .filter_map(|(i, p)| ptr(p, base.key("remove").index(i), true, &mut errs))
            .collect();
        let allow: Vec<Pointer> = s
            .allow
            .iter()
            .enumerate()
            .filter_map(|(i, p)| ptr(p, base.key("allow").index(i), true, &mut errs))
            .collect();
        if !response && !s.allow.is_empty() {
            errs.push((
                base.key("allow"),
                "`allow` is for responses (`response-transformer`); use `remove` on requests"
                    .into(),
            ));
        }
        let mut rename = Vec::new();
        for (a, b) in &s.rename {
            let at = base.key("rename").key(a);
            if let (Some(x), Some(y)) = (
                ptr(a, at.clone(), false, &mut errs),
                ptr(b, at, false, &mut errs),
            ) {
                rename.push((x, y));
            }
        }
        let unwrap = s.unwrap.as_deref().and_then(|u| {
            let p = if u.starts_with('/') {
                u.to_string()
            } else {
                format!("/{}", u.replace('~', "~0").replace('/', "~1"))
            };
            ptr(&p, base.key("unwrap"), false, &mut errs)
        });
        if s.wrap.as_deref() == Some("") {
            errs.push((
                base.key("wrap"),
                "name the member to wrap the body in".into(),
            ));
        }
        let max_body = s.max_body.map_or(DEFAULT_MAX_BODY, |b| b.0);
        if max_body == 0 {
            errs.push((base.key("max_body"), "must be at least 1 byte".into()));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(BodyOps {
            unwrap,
            allow,
            remove,
            rename,
            set,
            add,
            wrap: s.wrap,
            max_body,
        })
    }

    /// Whether any edit is configured.
    pub fn is_empty(&self) -> bool {
        self.unwrap.is_none()
            && self.allow.is_empty()
            && self.remove.is_empty()
            && self.rename.is_empty()
            && self.set.is_empty()
            && self.add.is_empty()
            && self.wrap.is_none()
    }

    /// Edit a document in place.
    pub fn apply(&self, v: &mut Value, render: &dyn Fn(&Template) -> String) {
        if let Some(p) = &self.unwrap {
            if let Some(inner) = take(v, &p.segs) {
                *v = inner;
            }
        }
        if !self.allow.is_empty() {
            let kept = allow(v, &self.allow);
            *v = match (kept, &*v) {
                (Some(k), _) => k,
                (None, Value::Array(_)) => Value::Array(Vec::new()),
                (None, Value::Object(_)) => Value::Object(Map::new()),
                (None, other) => other.clone(),
            };
        }
        for p in &self.remove {
            remove(v, &p.segs);
        }
        for (from, to) in &self.rename {
            if let Some(x) = take(v, &from.segs) {
                put(v, &to.segs, x, false);
            }
        }
        for (p, val) in &self.set {
            put(v, &p.segs, val.value(render), false);
        }
        for (p, val) in &self.add {
            put(v, &p.segs, val.value(render), true);
        }
        if let Some(w) = &self.wrap {
            let mut m = Map::new();
            m.insert(w.clone(), v.take());
            *v = Value::Object(m);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn ops(v: Value, response: bool) -> BodyOps {
        BodyOps::new(serde_json::from_value(v).unwrap(), response).unwrap()
    }

    fn run(o: &BodyOps, mut doc: Value) -> Value {
        o.apply(&mut doc, &|t: &Template| format!("<{}>", t.source()));
        doc
    }

    #[test]
    fn pointers_parse_with_escapes_and_wildcards() {
        let p = Pointer::parse("/a~1b/~0c/*/0", true).unwrap();
        assert_eq!(
            p.segs,
            vec![
                Seg::Key("a/b".into()),
                Seg::Key("~c".into()),
                Seg::Any,
                Seg::Key("0".into())
            ]
        );
        assert_eq!(
            Pointer::parse("/*", false).unwrap().segs,
            vec![Seg::Key("*".into())]
        );
        assert!(Pointer::parse("a", true).is_err());
        assert!(Pointer::parse("", true).is_err());
        assert!(Pointer::parse("/a~2", true).is_err());
    }

    #[test]
    fn add_set_remove_rename() {
        let o = ops(
            json!({
                "add": {"/meta/source": "portico", "/name": "never", "/tags/-": "new"},
                "set": {"/version": 2, "/who": "${request_id}"},
                "remove": ["/password", "/items/*/secret"],
                "rename": {"/userName": "/user_name"}
            }),
            false,
        );
        let out = run(
            &o,
            json!({"name": "a", "userName": "u", "password": "p", "tags": ["x"],
                   "items": [{"id": 1, "secret": "s"}, {"id": 2}], "version": 1}),
        );
        assert_eq!(
            out,
            json!({"name": "a", "user_name": "u", "tags": ["x", "new"],
                   "items": [{"id": 1}, {"id": 2}], "version": 2,
                   "meta": {"source": "portico"}, "who": "<${request_id}>"})
        );
    }

    #[test]
    fn wildcard_allow_list() {
        let o = ops(
            json!({"allow": ["/id", "/name", "/items/*/id", "/missing/x"]}),
            true,
        );
        let out = run(
            &o,
            json!({"id": 7, "name": "n", "email": "e", "items": [{"id": 1, "p": 2}, {"p": 3}, {"id": 3}],
                   "missing": {"y": 1}}),
        );
        assert_eq!(
            out,
            json!({"id": 7, "name": "n", "items": [{"id": 1}, {"id": 3}]})
        );
        // Nothing allowed is present: an empty object.
        assert_eq!(run(&o, json!({"other": 1})), json!({}));
        // A top-level array with `/*/id`.
        let o = ops(json!({"allow": ["/*/id"]}), true);
        assert_eq!(run(&o, json!([{"id": 1, "x": 2}])), json!([{"id": 1}]));
    }

    #[test]
    fn wrap_and_unwrap() {
        let o = ops(json!({"unwrap": "data"}), true);
        assert_eq!(run(&o, json!({"data": [1, 2], "meta": {}})), json!([1, 2]));
        assert_eq!(run(&o, json!({"other": 1})), json!({"other": 1}));
        let o = ops(json!({"wrap": "data", "unwrap": "/result/items"}), true);
        assert_eq!(
            run(&o, json!({"result": {"items": [1]}})),
            json!({"data": [1]})
        );
    }

    #[test]
    fn settings_errors_are_located() {
        let e = BodyOps::new(
            serde_json::from_value(
                json!({"remove": ["x"], "allow": ["/a"], "add": {"/a": "${query.q}"}}),
            )
            .unwrap(),
            false,
        )
        .err()
        .unwrap();
        let paths: Vec<String> = e.iter().map(|(p, _)| p.to_string()).collect();
        assert!(paths.iter().any(|p| p.contains("remove")), "{paths:?}");
        assert!(paths.iter().any(|p| p.contains("allow")), "{paths:?}");
        // `query.` is fine on requests, refused on responses.
        let e = BodyOps::new(
            serde_json::from_value(json!({"add": {"/a": "${query.q}"}})).unwrap(),
            true,
        );
        assert!(e.is_err());
    }

    #[test]
    fn put_into_a_scalar_parent_changes_nothing() {
        let mut v = json!({"a": 1});
        assert!(!put(
            &mut v,
            &Pointer::parse("/a/b", false).unwrap().segs,
            json!(2),
            false
        ));
        assert_eq!(v, json!({"a": 1}));
    }
}
