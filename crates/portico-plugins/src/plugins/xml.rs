//! `json-xml`: convert bodies between JSON and XML for legacy upstreams
//! (docs/transform.md#json-xml), parsed with `quick-xml`.
//!
//! The mapping (both ways):
//! - an element is a member named by its tag, the document `{"root-tag": ...}`;
//! - attributes are members `@name` (values are strings);
//! - text is the element's value when it has neither attributes nor children, else the
//!   member `#text` (text that is only whitespace is dropped; CDATA is text);
//! - an element repeated under one parent is an array (in document order);
//! - an element with nothing in it is `null`;
//! - namespaces stay as prefixes (`soap:Envelope`) with their `@xmlns:soap` attributes;
//! - comments, processing instructions and the declaration are dropped.
//!
//! From JSON: numbers and booleans become text; `null` an empty element; an array
//! repeated elements; a document that is not an object with one member is put under
//! `root` (an array's items as `<item>`).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{header, HeaderValue, Request};
use portico_config::units::ByteSize;
use portico_config::KeyPath;
use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::Event;
use quick_xml::Reader;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::body::{self, Body, Buffered};
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::plugins::jsonops::DEFAULT_MAX_BODY;
use crate::plugins::transform::{ask_identity, readable, upstream_body_error};
use crate::policy::{BodyStep, Flow, Policy, Step};
use crate::registry::SettingsErrors;

/// Deepest nesting converted (deeper documents are refused).
const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Conversion {
    JsonToXml,
    XmlToJson,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Conversion of the request body sent upstream: `json_to_xml` or `xml_to_json`.
    #[serde(default)]
    pub request: Option<Conversion>,
    /// Conversion of the response body sent to the client.
    #[serde(default)]
    pub response: Option<Conversion>,
    /// The root element for JSON that is not an object with one member. Default `root`.
    #[serde(default)]
    pub root: Option<String>,
    /// Larger bodies stream through unconverted. Default `1MiB`.
    #[serde(default)]
    pub max_body: Option<ByteSize>,
}

pub struct JsonXml {
    request: Option<Conversion>,
    response: Option<Conversion>,
    root: String,
    max_body: u64,
}

fn is_xml(h: &http::HeaderMap) -> bool {
    body::essence(h).is_some_and(|e| {
        e == "application/xml" || e == "text/xml" || (e.contains('/') && e.ends_with("+xml"))
    })
}

/// An XML name (ASCII rules, plus any non-ASCII letter; `:` for prefixes).
fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    (first.is_alphabetic() || first == '_' || first == ':')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
}

/// An element being read.
struct Frame {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<(String, Value)>,
    text: String,
}

impl Frame {
    fn into_value(self) -> Value {
        let text = if self.text.trim().is_empty() {
            None
        } else {
            Some(self.text)
        };
        if self.attrs.is_empty() && self.children.is_empty() {
            return text.map_or(Value::Null, Value::String);
        }
        let mut m = Map::new();
        for (k, v) in self.attrs {
            m.insert(format!("@{k}"), Value::String(v));
        }
        let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut order = Vec::new();
        for (k, v) in self.children {
            let g = groups.entry(k.clone()).or_default();
            if g.is_empty() {
                order.push(k);
            }
            g.push(v);
        }
        for k in order {
            if let Some(mut vs) = groups.remove(&k) {
                let v = if vs.len() == 1 {
                    vs.pop().unwrap_or(Value::Null)
                } else {
                    Value::Array(vs)
                };
                m.insert(k, v);
            }
        }
        if let Some(t) = text {
            m.insert("#text".into(), Value::String(t));
        }
        Value::Object(m)
    }
}

/// XML text to JSON (`{"root-tag": ...}`).
pub fn xml_to_json(xml: &str) -> Result<Value, String> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    let err = |e: &dyn std::fmt::Display, pos: u64| format!("{e} (at byte {pos})");
    loop {
        let pos = reader.buffer_position();
        let ev = reader.read_event().map_err(|e| err(&e, pos))?;
        let start = |e: &quick_xml::events::BytesStart<'_>| -> Result<Frame, String> {
            let mut attrs = Vec::new();
            for a in e.attributes() {
                let a = a.map_err(|e| err(&e, pos))?;
                let v = a
                    .normalized_value(quick_xml::XmlVersion::default())
                    .map_err(|e| err(&e, pos))?;
                attrs.push((a.key.as_ref().to_string(), v.into_owned()));
            }
            Ok(Frame {
                name: e.name().as_ref().to_string(),
                attrs,
                children: Vec::new(),
                text: String::new(),
            })
        };
        let finished = match ev {
            Event::Start(e) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(format!(
                        "the document is nested deeper than {MAX_DEPTH} elements"
                    ));
                }
                if root.is_some() {
                    return Err(err(&"a second root element", pos));
                }
                stack.push(start(&e)?);
                None
            }
            Event::Empty(e) => Some(start(&e)?),
            Event::End(_) => stack.pop(),
            Event::Text(t) => {
                let s = t.xml10_content();
                match stack.last_mut() {
                    Some(f) => f.text.push_str(&s),
                    None if s.trim().is_empty() => {}
                    None => return Err(err(&"text outside the root element", pos)),
                }
                None
            }
            Event::CData(t) => {
                if let Some(f) = stack.last_mut() {
                    f.text.push_str(&t);
                }
                None
            }
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref().map_err(|e| err(&e, pos))? {
                    Some(c) => c.to_string(),
                    None => resolve_predefined_entity(&r)
                        .ok_or_else(|| err(&format!("unknown entity `&{};`", &*r), pos))?
                        .to_string(),
                };
                if let Some(f) = stack.last_mut() {
                    f.text.push_str(&c);
                }
                None
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => None,
        };
        if let Some(f) = finished {
            let name = f.name.clone();
            let v = f.into_value();
            match stack.last_mut() {
                Some(parent) => parent.children.push((name, v)),
                None if root.is_none() => root = Some((name, v)),
                None => return Err(err(&"a second root element", pos)),
            }
        }
    }
    if !stack.is_empty() {
        return Err("the document ends inside an element".into());
    }
    let (name, v) = root.ok_or("the document has no element")?;
    let mut m = Map::new();
    m.insert(name, v);
    Ok(Value::Object(m))
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

fn write_element(out: &mut String, name: &str, v: &Value, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "the document is nested deeper than {MAX_DEPTH} levels"
        ));
    }
    if !valid_name(name) {
        return Err(format!("`{name}` is not a valid XML element name"));
    }
    match v {
        Value::Array(items) => {
            for i in items {
                write_element(out, name, i, depth + 1)?;
            }
        }
        Value::Null => {
            out.push('<');
            out.push_str(name);
            out.push_str("/>");
        }
        Value::Object(m) => {
            out.push('<');
            out.push_str(name);
            for (k, a) in m {
                if let Some(an) = k.strip_prefix('@') {
                    if !valid_name(an) {
                        return Err(format!("`{an}` is not a valid XML attribute name"));
                    }
                    let Some(t) = scalar_text(a) else {
                        return Err(format!(
                            "the attribute `{k}` is not a string, number or boolean"
                        ));
                    };
                    out.push(' ');
                    out.push_str(an);
                    out.push_str("=\"");
                    out.push_str(&escape(t.as_str()));
                    out.push('"');
                }
            }
            let mut body = String::new();
            for (k, c) in m {
                if k == "#text" {
                    let Some(t) = scalar_text(c) else {
                        return Err("`#text` is not a string, number or boolean".into());
                    };
                    body.push_str(&escape(t.as_str()));
                } else if !k.starts_with('@') {
                    write_element(&mut body, k, c, depth + 1)?;
                }
            }
            if body.is_empty() {
                out.push_str("/>");
            } else {
                out.push('>');
                out.push_str(&body);
                out.push_str("</");
                out.push_str(name);
                out.push('>');
            }
        }
        scalar => {
            let t = scalar_text(scalar).unwrap_or_default();
            out.push('<');
            out.push_str(name);
            out.push('>');
            out.push_str(&escape(t.as_str()));
            out.push_str("</");
            out.push_str(name);
            out.push('>');
        }
    }
    Ok(())
}

/// JSON to an XML document (with its declaration).
pub fn json_to_xml(v: &Value, root: &str) -> Result<String, String> {
    let mut out = String::from(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    match v {
        Value::Object(m) if m.len() == 1 => {
            let (k, c) = m.iter().next().ok_or("empty object")?;
            if k.starts_with('@') || k == "#text" || c.is_array() {
                write_element(&mut out, root, v, 0)?;
            } else {
                write_element(&mut out, k, c, 0)?;
            }
        }
        Value::Object(_) => write_element(&mut out, root, v, 0)?,
        Value::Array(_) => {
            let mut m = Map::new();
            m.insert("item".into(), v.clone());
            write_element(&mut out, root, &Value::Object(m), 0)?;
        }
        scalar => write_element(&mut out, root, scalar, 0)?,
    }
    Ok(out)
}

impl JsonXml {
    pub fn new(s: Settings) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        if s.request.is_none() && s.response.is_none() {
            errs.push((
                KeyPath::root(),
                "set `request`, `response` or both (`json_to_xml`, `xml_to_json`)".into(),
            ));
        }
        let root = s.root.unwrap_or_else(|| "root".into());
        if !valid_name(&root) {
            errs.push((
                KeyPath::root().key("root"),
                format!("`{root}` is not an XML element name"),
            ));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(JsonXml {
            request: s.request,
            response: s.response,
            root,
            max_body: s.max_body.map_or(DEFAULT_MAX_BODY, |b| b.0),
        })
    }

    /// Convert `bytes`; the new body and its content type.
    fn convert(&self, c: Conversion, bytes: &[u8]) -> Result<(Bytes, &'static str), String> {
        match c {
            Conversion::JsonToXml => {
                let v: Value =
                    serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
                Ok((Bytes::from(json_to_xml(&v, &self.root)?), "application/xml"))
            }
            Conversion::XmlToJson => {
                let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 XML".to_string())?;
                let v = xml_to_json(text).map_err(|e| format!("not XML: {e}"))?;
                Ok((Bytes::from(v.to_string()), "application/json"))
            }
        }
    }

    fn source_type(c: Conversion) -> fn(&http::HeaderMap) -> bool {
        match c {
            Conversion::JsonToXml => body::is_json,
            Conversion::XmlToJson => is_xml,
        }
    }

    async fn convert_request(&self, c: Conversion, ctx: &Ctx, req: &mut Request<Body>) -> Flow {
        let declared = body::declared_length(req.headers());
        let b = std::mem::take(req.body_mut());
        match body::buffer_upto(b, declared, self.max_body).await {
            Ok(Buffered::TooLarge(b)) => {
                tracing::debug!(route = %ctx.route_name, max_body = self.max_body,
                    "json-xml: the request body is larger than max_body; sent unconverted");
                *req.body_mut() = b;
                Flow::Continue
            }
            Ok(Buffered::Whole(bytes)) if bytes.is_empty() => {
                body::set_length(req.headers_mut(), 0);
                Flow::Continue
            }
            Ok(Buffered::Whole(bytes)) => match self.convert(c, &bytes) {
                Ok((out, ct)) => {
                    body::set_length(req.headers_mut(), out.len());
                    req.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                    *req.body_mut() = Body::full(out);
                    Flow::Continue
                }
                Err(m) => Flow::Error(GatewayError::new(
                    ErrorKind::BadRequest,
                    format!("the request body could not be converted: {m}"),
                )),
            },
            Err(e) => Flow::Error(body::read_error(&e)),
        }
    }
}

impl Policy for JsonXml {
    fn name(&self) -> &'static str {
        "json-xml"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let Some(c) = self.request else {
            return Step::cont();
        };
        if http_body::Body::is_end_stream(req.body())
            || !Self::source_type(c)(req.headers())
            || body::is_encoded(req.headers())
        {
            return Step::cont();
        }
        Step::Pending(Box::pin(self.convert_request(c, ctx, req)))
    }

    fn edits_upstream_request(&self) -> bool {
        self.response.is_some()
    }

    /// The upstream is asked for what the conversion reads, uncompressed.
    fn upstream_request(&self, _ctx: &mut Ctx, req: &mut http::request::Parts) {
        ask_identity(req);
        let accept = match self.response {
            Some(Conversion::XmlToJson) => "application/xml, text/xml;q=0.9",
            Some(Conversion::JsonToXml) => "application/json",
            None => return,
        };
        req.headers
            .insert(header::ACCEPT, HeaderValue::from_static(accept));
    }

    fn wants_response_body(&self) -> bool {
        self.response.is_some()
    }

    fn response_body<'a>(
        &'a self,
        ctx: &'a mut Ctx,
        parts: &'a mut http::response::Parts,
        b: Body,
    ) -> BodyStep<'a> {
        let Some(c) = self.response else {
            return BodyStep::pass(b);
        };
        if !readable(parts, &b, Self::source_type(c)) {
            return BodyStep::pass(b);
        }
        BodyStep::Pending(Box::pin(async move {
            let declared = body::declared_length(&parts.headers);
            match body::buffer_upto(b, declared, self.max_body).await {
                Ok(Buffered::TooLarge(b)) => {
                    tracing::debug!(route = %ctx.route_name, max_body = self.max_body,
                        "json-xml: the response body is larger than max_body; sent unconverted");
                    Ok(b)
                }
                // A body that turned out empty (e.g. the answer to a HEAD): as it is.
                Ok(Buffered::Whole(bytes)) if bytes.is_empty() => Ok(Body::Empty),
                Ok(Buffered::Whole(bytes)) => match self.convert(c, &bytes) {
                    Ok((out, ct)) => {
                        body::set_length(&mut parts.headers, out.len());
                        parts
                            .headers
                            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                        Ok(Body::full(out))
                    }
                    Err(m) => Err(GatewayError::new(
                        ErrorKind::ResponseNotTransformable,
                        format!("the upstream response could not be converted: {m}"),
                    )),
                },
                Err(e) => Err(upstream_body_error(&e)),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const ORDER: &str = r#"<?xml version="1.0"?>
<!-- a comment -->
<order id="7" xmlns:x="urn:x">
  <customer>Zoë &amp; Co</customer>
  <item sku="A">pen</item>
  <item sku="B"/>
  <x:note><![CDATA[<b>fragile</b>]]></x:note>
  <empty/>
  <price currency="EUR">9.50</price>
</order>"#;

    #[test]
    fn xml_maps_to_json_as_documented() {
        let v = xml_to_json(ORDER).unwrap();
        assert_eq!(
            v,
            json!({"order": {
                "@id": "7", "@xmlns:x": "urn:x",
                "customer": "Zoë & Co",
                "item": [{"@sku": "A", "#text": "pen"}, {"@sku": "B"}],
                "x:note": "<b>fragile</b>",
                "empty": null,
                "price": {"@currency": "EUR", "#text": "9.50"}
            }})
        );
    }

    #[test]
    fn round_trips() {
        // XML → JSON → XML → JSON is stable.
        let v = xml_to_json(ORDER).unwrap();
        let xml = json_to_xml(&v, "root").unwrap();
        assert_eq!(xml_to_json(&xml).unwrap(), v);
        // JSON (strings, nulls, objects, arrays of two or more) → XML → JSON is the same.
        let j = json!({"req": {"@v": "2", "name": "a<b", "tags": ["x", "y"], "none": null,
                                "deep": {"k": {"#text": "t", "@a": "1"}}}});
        let xml = json_to_xml(&j, "root").unwrap();
        assert!(xml.contains("<name>a&lt;b</name>"), "{xml}");
        assert!(
            xml.starts_with(r#"<?xml version="1.0" encoding="UTF-8"?><req v="2">"#),
            "{xml}"
        );
        assert_eq!(xml_to_json(&xml).unwrap(), j);
    }

    #[test]
    fn json_that_is_not_one_member_gets_a_root() {
        assert_eq!(
            json_to_xml(&json!({"a": 1, "b": true}), "root").unwrap(),
            r#"<?xml version="1.0" encoding="UTF-8"?><root><a>1</a><b>true</b></root>"#
        );
        assert_eq!(
            json_to_xml(&json!([1, 2]), "list").unwrap(),
            r#"<?xml version="1.0" encoding="UTF-8"?><list><item>1</item><item>2</item></list>"#
        );
        assert!(json_to_xml(&json!({"a b": 1}), "root").is_err());
        assert!(json_to_xml(&json!({"a": {"@x": [1]}}), "root").is_err());
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(xml_to_json("<a><b></a>").is_err());
        assert!(xml_to_json("<a>").is_err());
        assert!(xml_to_json("<a/><b/>").is_err());
        assert!(xml_to_json("text").is_err());
        assert!(xml_to_json("<a>&unknown;</a>").is_err());
        assert_eq!(xml_to_json("<a>&#65;&lt;</a>").unwrap(), json!({"a": "A<"}));
    }
}
