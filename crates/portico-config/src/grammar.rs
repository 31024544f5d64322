//! The shared grammar every policy uses: `${...}` templates and request keys.
//! Parsed once when a snapshot is compiled; evaluated per request by the proxy.

use std::borrow::Cow;
use std::fmt;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A value a template or key can refer to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Var {
    /// `param.NAME`: a path capture.
    Param(String),
    /// `header.NAME` (name lower-cased).
    Header(String),
    /// `query.NAME`.
    Query(String),
    /// `cookie.NAME`.
    Cookie(String),
    /// `consumer.name`.
    ConsumerName,
    /// `jwt.CLAIM`.
    JwtClaim(String),
    /// `request_id`.
    RequestId,
    /// `client_ip`.
    ClientIp,
    /// `route.name`.
    RouteName,
}

impl Var {
    /// Parse the inside of `${...}`.
    pub fn parse(s: &str) -> Result<Var, String> {
        let named = |prefix: &str| -> Option<Result<String, String>> {
            s.strip_prefix(prefix).map(|n| {
                if n.is_empty() {
                    Err(format!("`${{{s}}}` needs a name after `{prefix}`"))
                } else {
                    Ok(n.to_string())
                }
            })
        };
        if let Some(n) = named("param.") {
            return n.map(Var::Param);
        }
        if let Some(n) = named("header.") {
            return n.map(|n| Var::Header(n.to_ascii_lowercase()));
        }
        if let Some(n) = named("query.") {
            return n.map(Var::Query);
        }
        if let Some(n) = named("cookie.") {
            return n.map(Var::Cookie);
        }
        if let Some(n) = named("jwt.") {
            return n.map(Var::JwtClaim);
        }
        match s {
            "consumer.name" => Ok(Var::ConsumerName),
            "request_id" => Ok(Var::RequestId),
            "client_ip" => Ok(Var::ClientIp),
            "route.name" => Ok(Var::RouteName),
            _ => Err(format!(
                "unknown template variable `${{{s}}}`; use param.NAME, header.NAME, query.NAME, cookie.NAME, consumer.name, jwt.CLAIM, request_id, client_ip or route.name"
            )),
        }
    }
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Var::Param(n) => write!(f, "param.{n}"),
            Var::Header(n) => write!(f, "header.{n}"),
            Var::Query(n) => write!(f, "query.{n}"),
            Var::Cookie(n) => write!(f, "cookie.{n}"),
            Var::JwtClaim(n) => write!(f, "jwt.{n}"),
            Var::ConsumerName => f.write_str("consumer.name"),
            Var::RequestId => f.write_str("request_id"),
            Var::ClientIp => f.write_str("client_ip"),
            Var::RouteName => f.write_str("route.name"),
        }
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    Var(Var),
}

/// A string with `${...}` substitutions (and, where allowed, `{NAME}` path captures).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template {
    pub parts: Vec<Part>,
    source: String,
}

impl Template {
    /// Parse `${ns.name}` substitutions; `$$` is a literal `$`.
    pub fn parse(s: &str) -> Result<Template, String> {
        Self::parse_with(s, false)
    }

    /// As [`Template::parse`], also reading `{NAME}` as `${param.NAME}` (for `rewrite:`).
    pub fn parse_path(s: &str) -> Result<Template, String> {
        Self::parse_with(s, true)
    }

    fn parse_with(s: &str, short_params: bool) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            if rest.starts_with("$$") {
                lit.push('$');
                rest = &rest[2..];
            } else if let Some(after) = rest.strip_prefix("${") {
                let end = after
                    .find('}')
                    .ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Var(Var::parse(after[..end].trim())?));
                rest = &after[end + 1..];
            } else if short_params && c == '{' {
                let after = &rest[1..];
                let end = after
                    .find('}')
                    .ok_or_else(|| format!("unclosed `{{` in `{s}`"))?;
                let name = &after[..end];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("`{{{name}}}` is not a valid capture name in `{s}`"));
                }
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Var(Var::Param(name.to_string())));
                rest = &after[end + 1..];
            } else {
                lit.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template {
            parts,
            source: s.to_string(),
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the template has no substitutions.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// Every variable the template uses.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            Part::Lit(_) => None,
        })
    }

    /// Render: `write` appends the value of each variable to the output (nothing for
    /// a missing value), so values are never copied into strings of their own.
    pub fn render(&self, mut write: impl FnMut(&Var, &mut String)) -> String {
        let mut out = String::with_capacity(self.source.len() + 16);
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Var(v) => write(v, &mut out),
            }
        }
        out
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for Template {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl JsonSchema for Template {
    fn schema_name() -> Cow<'static, str> {
        "Template".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "Text with `${...}` substitutions: param.NAME, header.NAME, query.NAME, cookie.NAME, consumer.name, jwt.CLAIM, request_id, client_ip, route.name."
        })
    }
}

/// One part of a request key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyPart {
    Ip,
    Consumer,
    Route,
    Path,
    Header(String),
    Query(String),
    Cookie(String),
    JwtClaim(String),
}

impl KeyPart {
    pub fn parse(s: &str) -> Result<KeyPart, String> {
        let named = |p: &str| {
            s.strip_prefix(p)
                .filter(|n| !n.is_empty())
                .map(str::to_string)
        };
        Ok(match s {
            "ip" => KeyPart::Ip,
            "consumer" => KeyPart::Consumer,
            "route" => KeyPart::Route,
            "path" => KeyPart::Path,
            _ => {
                if let Some(n) = named("header:") {
                    KeyPart::Header(n.to_ascii_lowercase())
                } else if let Some(n) = named("query:") {
                    KeyPart::Query(n)
                } else if let Some(n) = named("cookie:") {
                    KeyPart::Cookie(n)
                } else if let Some(n) = named("jwt_claim:") {
                    KeyPart::JwtClaim(n)
                } else {
                    return Err(format!(
                        "`{s}` is not a key; use ip, consumer, route, path, header:NAME, query:NAME, cookie:NAME or jwt_claim:NAME"
                    ));
                }
            }
        })
    }
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPart::Ip => f.write_str("ip"),
            KeyPart::Consumer => f.write_str("consumer"),
            KeyPart::Route => f.write_str("route"),
            KeyPart::Path => f.write_str("path"),
            KeyPart::Header(n) => write!(f, "header:{n}"),
            KeyPart::Query(n) => write!(f, "query:{n}"),
            KeyPart::Cookie(n) => write!(f, "cookie:{n}"),
            KeyPart::JwtClaim(n) => write!(f, "jwt_claim:{n}"),
        }
    }
}

/// A request key: one part or a list of parts combined.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeySpec(pub Vec<KeyPart>);

impl<'de> Deserialize<'de> for KeySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let list = match Raw::deserialize(d)? {
            Raw::One(s) => vec![s],
            Raw::Many(v) => v,
        };
        if list.is_empty() {
            return Err(de::Error::custom("a key needs at least one part"));
        }
        list.iter()
            .map(|s| KeyPart::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map(KeySpec)
            .map_err(de::Error::custom)
    }
}

impl Serialize for KeySpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        v.serialize(s)
    }
}

const KEY_PATTERN: &str = "^(ip|consumer|route|path|(header|query|cookie|jwt_claim):.+)$";

impl JsonSchema for KeySpec {
    fn schema_name() -> Cow<'static, str> {
        "Key".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A request key: ip, consumer, route, path, header:NAME, query:NAME, cookie:NAME, jwt_claim:NAME, or a list of them.",
            "anyOf": [
                {"type": "string", "pattern": KEY_PATTERN},
                {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": KEY_PATTERN}}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn templates() {
        let t = Template::parse("id=${param.id} ip=${client_ip} $$5").unwrap();
        let out = t.render(|v, out| match v {
            Var::Param(n) if n == "id" => out.push_str("42"),
            Var::ClientIp => out.push_str("1.2.3.4"),
            _ => {}
        });
        assert_eq!(out, "id=42 ip=1.2.3.4 $5");
        assert!(Template::parse("${nope}")
            .unwrap_err()
            .contains("unknown template variable"));
        assert!(Template::parse("${param.}").is_err());
        assert!(Template::parse("${param.id").is_err());
        let p = Template::parse_path("/v2/users/{id}").unwrap();
        assert_eq!(p.vars().collect::<Vec<_>>(), vec![&Var::Param("id".into())]);
    }

    #[test]
    fn keys() {
        let k: KeySpec = serde_json::from_str(r#"["ip", "header:X-Api-Key"]"#).unwrap();
        assert_eq!(k.0, vec![KeyPart::Ip, KeyPart::Header("x-api-key".into())]);
        let one: KeySpec = serde_json::from_str(r#""consumer""#).unwrap();
        assert_eq!(one.0, vec![KeyPart::Consumer]);
        assert!(serde_json::from_str::<KeySpec>(r#""ipp""#).is_err());
        assert!(serde_json::from_str::<KeySpec>("[]").is_err());
    }
}
