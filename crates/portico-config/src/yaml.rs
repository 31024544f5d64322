//! YAML (and JSON, a subset of it) to `serde_json::Value`, remembering where every
//! key and value sits in the source so that each later error can point at it.
//!
//! Scalars follow the YAML 1.2 core schema: plain `true`/`false`, `null`/`~`/empty,
//! integers and floats are typed; quoted scalars are always strings. Anchors,
//! aliases and `<<` merge keys are supported.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde_json::{Map, Number, Value};

use crate::diag::{Diagnostic, KeyPath, Pos};

/// Where each node of a parsed document is, by key path (`routes[2].upstream`).
#[derive(Debug, Default, Clone)]
pub struct Positions {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
}

impl Positions {
    /// Position of the value at `path`, or of its closest located ancestor.
    pub fn value(&self, path: &KeyPath) -> Option<Pos> {
        let mut p = path.clone();
        loop {
            if let Some(pos) = self.values.get(&p.to_string()) {
                return Some(*pos);
            }
            if !p.pop() {
                return None;
            }
        }
    }

    /// Position of the key that introduces `path` (falls back to the value).
    pub fn key(&self, path: &KeyPath) -> Option<Pos> {
        self.keys
            .get(&path.to_string())
            .copied()
            .or_else(|| self.value(path))
    }
}

enum Frame {
    Seq(Vec<Value>),
    Map(
        Map<String, Value>,
        Option<String>,
        std::collections::HashSet<String>,
    ),
}

/// Parse a YAML document. Returns the value and the positions of its nodes.
pub fn parse(text: &str) -> Result<(Value, Positions), Diagnostic> {
    let mut positions = Positions::default();
    // Anchored values with their size in nodes, so that alias expansion can be bounded.
    let mut anchors: HashMap<usize, (Value, usize)> = HashMap::new();
    let mut nodes: usize = 0;
    let mut stack: Vec<(Frame, usize, KeyPath)> = Vec::new();
    let mut root: Option<Value> = None;
    let mut path = KeyPath::root();
    let mut docs = 0;

    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| {
            let m = e.marker();
            Diagnostic::new(KeyPath::root(), format!("invalid YAML: {}", e.info())).at(Pos {
                line: m.line(),
                col: m.col() + 1,
            })
        })?;
        let pos = start(&span);
        match event {
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(Diagnostic::new(
                        KeyPath::root(),
                        "the file holds more than one YAML document; put the whole configuration in one",
                    )
                    .at(pos));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                // A scalar in key position of a mapping is a key.
                if let Some((Frame::Map(_, pending @ None, explicit), _, _)) = stack.last_mut() {
                    let key = text.into_owned();
                    let mut child = path.clone();
                    child.push_key(&key);
                    if explicit.contains(&key) {
                        let mut d =
                            Diagnostic::new(child.clone(), format!("duplicate key `{key}`"))
                                .at(pos);
                        if let Some(first) = positions.keys.get(&child.to_string()) {
                            d = d.hint(format!("first written at line {}", first.line));
                        }
                        return Err(d);
                    }
                    positions.keys.insert(child.to_string(), pos);
                    *pending = Some(key);
                    continue;
                }
                let is_str_tag = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let value = if style == ScalarStyle::Plain && !is_str_tag {
                    resolve_plain(&text)
                } else {
                    Value::String(text.into_owned())
                };
                nodes += 1;
                if anchor > 0 {
                    anchors.insert(anchor, (value.clone(), 1));
                }
                place(&mut stack, &mut root, &mut path, &mut positions, value, pos)?;
            }
            Event::Alias(id) => {
                if let Some((Frame::Map(_, pending @ None, _), _, _)) = stack.last_mut() {
                    let key = match anchors.get(&id) {
                        Some((Value::String(s), _)) => s.clone(),
                        Some((other, _)) => other.to_string(),
                        None => String::new(),
                    };
                    *pending = Some(key);
                    continue;
                }
                let (value, size) = anchors.get(&id).ok_or_else(|| {
                    Diagnostic::new(path.clone(), "alias refers to an unknown anchor").at(pos)
                })?;
                nodes += size;
                if nodes > MAX_NODES {
                    return Err(Diagnostic::new(
                        path.clone(),
                        format!("aliases expand the document past {MAX_NODES} values"),
                    )
                    .at(pos));
                }
                let value = value.clone();
                place(&mut stack, &mut root, &mut path, &mut positions, value, pos)?;
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let is_seq = matches!(event, Event::SequenceStart(..));
                if let Some((Frame::Map(_, None, _), _, _)) = stack.last_mut() {
                    return Err(Diagnostic::new(
                        path.clone(),
                        "a mapping key must be a plain value, not a list or a mapping",
                    )
                    .at(pos));
                }
                nodes += 1;
                let child = child_path(&stack, &path);
                positions.values.insert(child.to_string(), pos);
                let frame = if is_seq {
                    Frame::Seq(Vec::new())
                } else {
                    Frame::Map(Map::new(), None, Default::default())
                };
                stack.push((frame, anchor, path.clone()));
                path = child;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some((frame, anchor, parent_path)) = stack.pop() else {
                    continue;
                };
                let value = match frame {
                    Frame::Seq(v) => Value::Array(v),
                    Frame::Map(m, _, _) => Value::Object(m),
                };
                if anchor > 0 {
                    anchors.insert(anchor, (value.clone(), count_nodes(&value)));
                }
                path = parent_path;
                place_built(&mut stack, &mut root, &path, value, pos)?;
            }
            _ => {}
        }
    }
    Ok((root.unwrap_or(Value::Null), positions))
}

/// Most values a document may expand to through aliases (a bound against
/// "billion laughs" files, far above any real configuration).
const MAX_NODES: usize = 1_000_000;

fn count_nodes(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(count_nodes).sum::<usize>(),
        Value::Object(m) => 1 + m.values().map(count_nodes).sum::<usize>(),
        _ => 1,
    }
}

fn start(span: &Span) -> Pos {
    Pos {
        line: span.start.line(),
        col: span.start.col() + 1,
    }
}

fn child_path(stack: &[(Frame, usize, KeyPath)], path: &KeyPath) -> KeyPath {
    let mut child = path.clone();
    match stack.last() {
        Some((Frame::Seq(v), _, _)) => child.push_index(v.len()),
        Some((Frame::Map(_, Some(k), _), _, _)) => child.push_key(k),
        _ => {}
    }
    child
}

fn place(
    stack: &mut [(Frame, usize, KeyPath)],
    root: &mut Option<Value>,
    path: &mut KeyPath,
    positions: &mut Positions,
    value: Value,
    pos: Pos,
) -> Result<(), Diagnostic> {
    let child = child_path(stack, path);
    positions.values.insert(child.to_string(), pos);
    place_built(stack, root, path, value, pos)
}

fn place_built(
    stack: &mut [(Frame, usize, KeyPath)],
    root: &mut Option<Value>,
    path: &KeyPath,
    value: Value,
    pos: Pos,
) -> Result<(), Diagnostic> {
    match stack.last_mut() {
        None => *root = Some(value),
        Some((Frame::Seq(v), _, _)) => v.push(value),
        Some((Frame::Map(m, pending, explicit), _, _)) => {
            let key = pending.take().unwrap_or_default();
            if key == "<<" {
                merge(m, value);
                return Ok(());
            }
            if !explicit.insert(key.clone()) {
                let mut p = path.clone();
                p.push_key(&key);
                return Err(Diagnostic::new(p, format!("duplicate key `{key}`")).at(pos));
            }
            m.insert(key, value);
        }
    }
    Ok(())
}

fn merge(target: &mut Map<String, Value>, source: Value) {
    match source {
        Value::Object(src) => {
            for (k, v) in src {
                target.entry(k).or_insert(v);
            }
        }
        Value::Array(items) => {
            for item in items {
                merge(target, item);
            }
        }
        _ => {}
    }
}

/// YAML 1.2 core-schema resolution of a plain scalar.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "-.inf" | ".nan" | ".NaN" | ".NAN" => {
            return Value::String(s.to_string())
        }
        _ => {}
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = s.parse::<u64>() {
            return Value::Number(u.into());
        }
    }
    if let Some(hex) = s.strip_prefix("0x") {
        if let Ok(u) = u64::from_str_radix(hex, 16) {
            return Value::Number(u.into());
        }
    }
    if let Some(oct) = s.strip_prefix("0o") {
        if let Ok(u) = u64::from_str_radix(oct, 8) {
            return Value::Number(u.into());
        }
    }
    let looks_float = digits
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && digits.bytes().any(|b| b.is_ascii_digit());
    if looks_float {
        if let Some(n) = s.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(s.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn scalars_and_positions() {
        let text = "a: 1\nb:\n  - x\n  - \"2\"\n  - {c: true, d: ~}\ne: 1.5\nf: 10MiB\n";
        let (v, pos) = parse(text).unwrap();
        assert_eq!(v["a"], 1);
        assert_eq!(v["b"][1], "2");
        assert_eq!(v["b"][2]["c"], true);
        assert!(v["b"][2]["d"].is_null());
        assert_eq!(v["e"], 1.5);
        assert_eq!(v["f"], "10MiB");
        let p: KeyPath = KeyPath::parse("b[2].c");
        assert_eq!(pos.key(&p), Some(Pos { line: 5, col: 6 }));
        assert_eq!(
            pos.value(&KeyPath::parse("b[1]")),
            Some(Pos { line: 4, col: 5 })
        );
    }

    #[test]
    fn duplicate_key_is_an_error() {
        let err = parse("a: 1\na: 2\n").unwrap_err();
        assert!(err.message.contains("duplicate key `a`"), "{err}");
        assert_eq!(err.pos.map(|p| p.line), Some(2));
    }

    #[test]
    fn anchors_and_merge() {
        let (v, _) = parse("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n").unwrap();
        assert_eq!(v["other"]["x"], 1);
        assert_eq!(v["other"]["y"], 3);
    }

    #[test]
    fn alias_expansion_is_bounded() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("aliases expand"), "{err}");
        // Ordinary reuse is fine.
        assert!(parse("a: &a {x: 1}\nb: *a\nc: *a\n").is_ok());
    }

    #[test]
    fn json_is_accepted() {
        let (v, _) = parse(r#"{"routes": [{"name": "a", "paths": ["/"]}]}"#).unwrap();
        assert_eq!(v["routes"][0]["name"], "a");
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.is_some());
        assert!(err.message.starts_with("invalid YAML"));
    }
}
