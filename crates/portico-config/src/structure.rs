//! The structural check: the document against the JSON Schema generated from the
//! config types, every problem at once, with clear messages and "did you mean" hints;
//! and a best-effort typed model of the valid parts, so semantic checks still run.

use jsonschema::error::ValidationErrorKind;
use serde_json::{json, Value};

use crate::diag::{Diagnostic, KeyPath};
use crate::load::PluginCatalog;
use crate::model::Config;
use crate::yaml::Positions;

use crate::load::schema;

pub(crate) fn schema_check(
    value: &Value,
    positions: &Positions,
    catalog: &dyn PluginCatalog,
) -> (Vec<Diagnostic>, Vec<String>) {
    let schema = schema(catalog);
    let validator = match jsonschema::validator_for(&schema) {
        Ok(v) => v,
        Err(e) => {
            return (
                vec![Diagnostic::new(
                    KeyPath::root(),
                    format!("internal schema error: {e}"),
                )],
                Vec::new(),
            )
        }
    };
    let mut out = Vec::new();
    let mut prune = Vec::new();
    for err in validator.iter_errors(value) {
        report(&err, &schema, positions, &mut out, &mut prune);
    }
    (out, prune)
}

/// Turn one schema error into diagnostics (and values to prune).
pub(crate) fn report(
    err: &jsonschema::ValidationError<'_>,
    schema: &Value,
    positions: &Positions,
    out: &mut Vec<Diagnostic>,
    prune: &mut Vec<String>,
) {
    let pointer = err.instance_path().as_str();
    let path = KeyPath::from_pointer(pointer);
    match err.kind() {
        // An optional value (`anyOf: [X, null]`) that is not null: report why it is not
        // an X, with the precise location, instead of "not valid under any of the schemas".
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context }
            if optional_branch(context).is_some() =>
        {
            for e in optional_branch(context).unwrap_or_default() {
                report(e, schema, positions, out, prune);
            }
        }
        // A tagged union (`type: key-auth | basic-auth | ...`): name the unknown tag,
        // or report the problems of the one branch the tag picked.
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context }
            if tagged_union(pointer, context).is_some() =>
        {
            match tagged_union(pointer, context) {
                Some(Ok(branch)) => {
                    for e in branch {
                        report(e, schema, positions, out, prune);
                    }
                }
                Some(Err(tags)) => {
                    prune.push(pointer.to_string());
                    let got = err.instance().get("type").map_or_else(String::new, show);
                    out.push(Diagnostic::new(
                        path.key("type"),
                        format!("unknown type {got}; expected one of: {}", tags.join(", ")),
                    ));
                }
                None => {}
            }
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let allowed = allowed_keys(schema, err.schema_path().as_str());
            for key in unexpected {
                prune.push(format!(
                    "{pointer}/{}",
                    key.replace('~', "~0").replace('/', "~1")
                ));
                let kp = path.key(key);
                let what = if path.to_string().ends_with("plugins") {
                    "unknown policy"
                } else {
                    "unknown key"
                };
                let mut d = Diagnostic::new(kp.clone(), format!("{what} `{key}`"));
                if let Some(pos) = positions.key(&kp) {
                    d = d.at(pos);
                }
                d = d.suggest(key, allowed.iter().map(String::as_str));
                out.push(d);
            }
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            out.push(Diagnostic::new(
                path,
                format!("missing required key `{name}`"),
            ));
        }
        _ => {
            // One message per value (a value can fail `type` and `enum` at once).
            if !prune.iter().any(|p| p == pointer) {
                prune.push(pointer.to_string());
                out.push(value_problem(err, schema, path));
            }
        }
    }
}

/// For `oneOf` failures over objects told apart by a `type` tag: `Ok` with the errors
/// of the branch whose tag matched, or `Err` with every tag when none did.
#[allow(clippy::type_complexity)]
pub(crate) fn tagged_union<'a, 'e>(
    pointer: &str,
    context: &'a [Vec<jsonschema::ValidationError<'e>>],
) -> Option<Result<&'a [jsonschema::ValidationError<'e>], Vec<String>>> {
    let tag_ptr = format!("{pointer}/type");
    let tag_of = |errs: &Vec<jsonschema::ValidationError<'_>>| {
        errs.iter().find_map(|e| match e.kind() {
            ValidationErrorKind::Constant { expected_value }
                if e.instance_path().as_str() == tag_ptr =>
            {
                expected_value.as_str().map(str::to_string)
            }
            _ => None,
        })
    };
    let tags: Vec<Option<String>> = context.iter().map(tag_of).collect();
    if context.len() < 2 {
        return None;
    }
    let matched: Vec<usize> = (0..tags.len()).filter(|&i| tags[i].is_none()).collect();
    match matched.as_slice() {
        [] => Some(Err(tags
            .into_iter()
            .flatten()
            .map(|t| format!("`{t}`"))
            .collect())),
        [one] if tags.iter().flatten().count() == tags.len() - 1 => {
            Some(Ok(context[*one].as_slice()))
        }
        _ => None,
    }
}

/// For `anyOf`/`oneOf` failures where every branch but one only says "expected null"
/// (an `Option`), the errors of that one branch.
pub(crate) fn optional_branch<'a, 'e>(
    context: &'a [Vec<jsonschema::ValidationError<'e>>],
) -> Option<&'a [jsonschema::ValidationError<'e>]> {
    let expects_null = |errs: &Vec<jsonschema::ValidationError<'_>>| {
        matches!(errs.as_slice(), [e] if matches!(
            e.kind(),
            ValidationErrorKind::Type { kind: jsonschema::error::TypeKind::Single(t) }
                if t.as_str() == "null"
        ))
    };
    let rest: Vec<&Vec<jsonschema::ValidationError<'e>>> =
        context.iter().filter(|e| !expects_null(e)).collect();
    match rest.as_slice() {
        [one] if rest.len() < context.len() && !one.is_empty() => Some(one.as_slice()),
        _ => None,
    }
}

/// A readable message (and hint) for a value the schema rejected.
pub(crate) fn value_problem(
    err: &jsonschema::ValidationError<'_>,
    schema: &Value,
    path: KeyPath,
) -> Diagnostic {
    let sp = err.schema_path().as_str();
    let inst: &Value = err.instance();
    if sp.starts_with("/$defs/Duration/") {
        let msg = match inst.as_str() {
            Some(s) => crate::units::parse_duration(s)
                .err()
                .unwrap_or_else(|| format!("`{s}` is not a valid duration")),
            None => format!(
                "expected a duration such as `2s` or `1m30s`, found {}",
                show(inst)
            ),
        };
        return Diagnostic::new(path, msg);
    }
    if sp.starts_with("/$defs/ByteSize/") {
        let msg = match inst.as_str() {
            Some(s) => crate::units::parse_size(s)
                .err()
                .unwrap_or_else(|| format!("`{s}` is not a valid size")),
            None => format!(
                "expected a size such as `10MiB` or a number of bytes, found {}",
                show(inst)
            ),
        };
        return Diagnostic::new(path, msg);
    }
    // The request-key grammar (`ip`, `header:NAME`, ...): say what a key may be rather
    // than print its pattern.
    if let ValidationErrorKind::Pattern { pattern } = err.kind() {
        if pattern.starts_with("^(ip|consumer|") {
            if let Some(Err(msg)) = inst.as_str().map(crate::grammar::KeyPart::parse) {
                return Diagnostic::new(path, msg);
            }
        }
    }
    if sp.starts_with("/$defs/ScalarSchema/") {
        return Diagnostic::new(
            path,
            format!("expected a string, number or boolean, found {}", show(inst)),
        );
    }
    let one_of = |options: Vec<String>| {
        let list = options
            .iter()
            .map(|o| format!("`{o}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let d = Diagnostic::new(path.clone(), format!("{} is not one of {list}", show(inst)));
        match inst {
            Value::String(s) => d.suggest(s, options.iter().map(String::as_str)),
            Value::Number(n) if options.contains(&n.to_string()) => {
                d.hint(format!("quote it: `\"{n}\"`"))
            }
            _ => d,
        }
    };
    match err.kind() {
        ValidationErrorKind::Enum { options } => {
            let opts: Vec<String> = options
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            one_of(opts)
        }
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context } => {
            let consts: Option<Vec<String>> = context
                .iter()
                .map(|errs| match errs.as_slice() {
                    [e] => match e.kind() {
                        ValidationErrorKind::Constant { expected_value } => {
                            expected_value.as_str().map(str::to_string)
                        }
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            match consts {
                Some(c) if !c.is_empty() => one_of(c),
                _ => Diagnostic::new(path, shorten(&err.to_string())),
            }
        }
        // e.g. `min_version: 1.3` where the enum holds the string "1.3".
        ValidationErrorKind::Type { .. }
            if !inst.is_string() && !enum_of(schema, sp).is_empty() =>
        {
            let opts = enum_of(schema, sp);
            if opts.contains(&inst.to_string()) {
                one_of(opts)
            } else {
                Diagnostic::new(
                    path,
                    format!(
                        "{} is not one of {}",
                        show(inst),
                        opts.iter()
                            .map(|o| format!("`{o}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }
        }
        ValidationErrorKind::Type { kind } => {
            let types: Vec<jsonschema::types::JsonType> = match kind {
                jsonschema::error::TypeKind::Single(t) => vec![*t],
                jsonschema::error::TypeKind::Multiple(set) => set.iter().collect(),
            };
            let wanted: Vec<&str> = types
                .iter()
                .filter_map(|t| match t.as_str() {
                    "array" => Some("a list"),
                    "object" => Some("a mapping"),
                    "string" => Some("a string"),
                    "integer" => Some("an integer"),
                    "number" => Some("a number"),
                    "boolean" => Some("`true` or `false`"),
                    _ => None,
                })
                .collect();
            Diagnostic::new(
                path,
                format!("expected {}, found {}", wanted.join(" or "), show(inst)),
            )
        }
        ValidationErrorKind::Minimum { limit } => Diagnostic::new(
            path,
            format!("{} is too small: the minimum is {limit}", show(inst)),
        ),
        ValidationErrorKind::Maximum { limit } => Diagnostic::new(
            path,
            format!("{} is too large: the maximum is {limit}", show(inst)),
        ),
        _ => Diagnostic::new(path, shorten(&err.to_string())),
    }
}

/// The string options of the `enum` next to a failed `type` keyword at `schema_path`.
pub(crate) fn enum_of(schema: &Value, schema_path: &str) -> Vec<String> {
    schema_path
        .strip_suffix("/type")
        .and_then(|parent| schema.pointer(parent))
        .and_then(|n| n.get("enum"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A value as quoted in messages.
pub(crate) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        Value::Null => "nothing (null)".to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
        other => format!("`{other}`"),
    }
}

/// Whether `path` is one of `bad` or below one of them.
pub(crate) fn under_any(path: &KeyPath, bad: &[String]) -> bool {
    let p = path.to_string();
    bad.iter().any(|b| {
        p == *b
            || p.strip_prefix(b.as_str())
                .is_some_and(|rest| rest.starts_with(['.', '[']))
    })
}

/// A best-effort model of a configuration the schema rejected, so that the semantic
/// checks can still look at the rest: rejected values are dropped (their defaults
/// apply), a policy with a rejected setting is treated as disabled, and a route or
/// upstream that still does not parse becomes an inert placeholder (keeping indexes
/// and names, so no problem is reported at the wrong place or invented).
pub(crate) fn partial_config(value: &Value, prune: &[String]) -> Option<Config> {
    let mut v = value.clone();
    for ptr in prune {
        let segs: Vec<&str> = ptr.split('/').collect();
        let policy = match segs.as_slice() {
            ["", "plugins", name, ..] => Some(format!("/plugins/{name}")),
            ["", "routes", i, "plugins", name, ..] => Some(format!("/routes/{i}/plugins/{name}")),
            _ => None,
        };
        if let Some(p) = policy {
            if let Some(slot) = v.pointer_mut(&p) {
                *slot = json!({"enabled": false});
            }
            continue;
        }
        if let Some((parent, key)) = ptr.rsplit_once('/') {
            if let Some(Value::Object(m)) = v.pointer_mut(parent) {
                m.remove(&key.replace("~1", "/").replace("~0", "~"));
            }
        }
    }
    let Value::Object(mut top) = v else {
        return None;
    };
    let routes = top.remove("routes");
    let consumers = top.remove("consumers");
    let upstreams = top.remove("upstreams");
    top.retain(|k, val| {
        let mut one = serde_json::Map::new();
        one.insert(k.clone(), val.clone());
        serde_json::from_value::<Config>(Value::Object(one)).is_ok()
    });
    let mut cfg: Config = serde_json::from_value(Value::Object(top)).ok()?;
    if let Some(Value::Object(us)) = upstreams {
        for (name, u) in us {
            let up = serde_json::from_value(u).or_else(|_| {
                serde_json::from_value(json!({"targets": [{"url": "http://placeholder.invalid"}]}))
            });
            if let Ok(up) = up {
                cfg.upstreams.insert(name, up);
            }
        }
    }
    if let Some(Value::Array(cs)) = consumers {
        // Keep indexes: a consumer or credential that does not parse becomes a
        // placeholder (named with a NUL, which the checks skip).
        for (i, c) in cs.into_iter().enumerate() {
            let parsed = serde_json::from_value(c.clone()).or_else(|_| {
                let mut c = c;
                if let Some(Value::Array(creds)) = c.get_mut("credentials") {
                    for cr in creds.iter_mut() {
                        if serde_json::from_value::<crate::model::CredentialDecl>(cr.clone())
                            .is_err()
                        {
                            *cr = json!({"type": "jwt", "subject": "\u{0}"});
                        }
                    }
                }
                serde_json::from_value(c).or_else(|_| {
                    serde_json::from_value(json!({"name": format!("\u{0}consumer-{i}")}))
                })
            });
            if let Ok(c) = parsed {
                cfg.consumers.push(c);
            }
        }
    }
    if let Some(Value::Array(rs)) = routes {
        let parsed: Option<Vec<crate::model::Route>> = rs
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let name = r
                    .get("name")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty())
                    .map_or_else(|| format!("\u{0}route-{i}"), str::to_string);
                serde_json::from_value(r)
                    .or_else(|_| {
                        serde_json::from_value(
                            json!({"name": name, "paths": ["/"], "plugins": {"echo": {}}}),
                        )
                    })
                    .ok()
            })
            .collect();
        cfg.routes = parsed.unwrap_or_default();
    }
    Some(cfg)
}

pub(crate) fn shorten(msg: &str) -> String {
    // jsonschema messages quote the whole instance; keep them readable.
    if msg.len() > 300 {
        format!("{}…", &msg[..msg.floor_char_boundary(300)])
    } else {
        msg.to_string()
    }
}

/// The property names of the schema object that produced an `additionalProperties` error.
pub(crate) fn allowed_keys(schema: &Value, schema_path: &str) -> Vec<String> {
    let obj_path = schema_path.trim_end_matches("/additionalProperties");
    let mut node = schema.pointer(obj_path);
    if let Some(r) = node.and_then(|n| n.get("$ref")).and_then(Value::as_str) {
        node = schema.pointer(r.trim_start_matches('#'));
    }
    node.and_then(|n| n.get("properties"))
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}
