//! The file form of an aggregating route (`aggregate:`): calls to named upstreams,
//! made in parallel unless one uses another's result, whose answers are combined into
//! one JSON response. Paths are templates over the request (never a free URL).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::diag::{Diagnostic, KeyPath};
use crate::grammar::Var;
use crate::units::{ByteSize, Dur};

/// `aggregate:` on a route.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Aggregate {
    /// The calls, in order; a call may use the result of one listed before it.
    pub calls: Vec<AggregateCall>,
    /// `keys` (default): each result under its call's name; `deep`: JSON objects
    /// deep-merged in call order.
    #[serde(default)]
    pub merge: Merge,
    /// What a failed call does (calls may override): `include` (default) an error
    /// object in its place, `omit` it, or `fail` the whole request.
    #[serde(default)]
    pub on_error: OnError,
    /// The most of each call's answer read (default 1MiB); a larger one fails the call.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Every call together must end within this (default 30s).
    #[serde(default = "default_total")]
    pub timeout: Dur,
}

fn default_max_body() -> ByteSize {
    ByteSize(1024 * 1024)
}
fn default_total() -> Dur {
    Dur::secs(30)
}

/// One call of an aggregate.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateCall {
    /// The key of its result, and how later calls refer to it (`${steps.NAME...}`).
    pub name: String,
    /// An upstream defined in `upstreams`.
    pub upstream: String,
    /// The method (default GET).
    #[serde(default = "default_method")]
    pub method: String,
    /// Path and query sent, a template: `{id}` or `${param.id}`, `${query.NAME}`,
    /// `${header.NAME}`, `${consumer.name}`, ... and `${steps.CALL.body.FIELD}` (a
    /// field of an earlier call's JSON answer, dots between levels). Substituted
    /// values are percent-encoded.
    pub path: String,
    /// Headers sent (templates, like `path`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// This call's time limit (default: the upstream's `request` timeout).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Overrides the aggregate's `on_error` for this call.
    #[serde(default)]
    pub on_error: Option<OnError>,
}

fn default_method() -> String {
    "GET".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Merge {
    #[default]
    Keys,
    Deep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Include,
    Omit,
    Fail,
}

/// A piece of an aggregate call template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallPart {
    Lit(String),
    /// A request value.
    Var(Var),
    /// `${steps.CALL.body.A.B}`: the call, and the JSON pointer (`/A/B`).
    Step(String, String),
}

/// Parse a call template: `${...}` (request variables or `steps.`), `{NAME}` for
/// `${param.NAME}`, `$$` for `$`.
pub fn parse_call_template(s: &str) -> Result<Vec<CallPart>, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("$$") {
            lit.push('$');
            rest = &rest[2..];
            continue;
        }
        let (inner, after, short) = if let Some(a) = rest.strip_prefix("${") {
            let end = a
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
            (&a[..end], &a[end + 1..], false)
        } else if let Some(a) = rest.strip_prefix('{') {
            let end = a
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{s}`"))?;
            (&a[..end], &a[end + 1..], true)
        } else {
            lit.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        };
        if !lit.is_empty() {
            parts.push(CallPart::Lit(std::mem::take(&mut lit)));
        }
        let inner = inner.trim();
        if short {
            if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`{{{inner}}}` is not a valid capture name in `{s}`"
                ));
            }
            parts.push(CallPart::Var(Var::Param(inner.to_string())));
        } else if let Some(step) = inner.strip_prefix("steps.") {
            let (call, field) = step.split_once(".body").ok_or_else(|| {
                format!("`${{{inner}}}` must be `steps.CALL.body` or `steps.CALL.body.FIELD`")
            })?;
            if call.is_empty() {
                return Err(format!("`${{{inner}}}` names no call"));
            }
            let field = match field {
                "" => String::new(),
                f if f.starts_with('.') && f.len() > 1 => f[1..]
                    .split('.')
                    .map(|seg| format!("/{}", seg.replace('~', "~0").replace('/', "~1")))
                    .collect(),
                _ => {
                    return Err(format!(
                        "`${{{inner}}}` must be `steps.CALL.body` or `steps.CALL.body.FIELD`"
                    ))
                }
            };
            parts.push(CallPart::Step(call.to_string(), field));
        } else {
            parts.push(CallPart::Var(Var::parse(inner)?));
        }
        rest = after;
    }
    if !lit.is_empty() {
        parts.push(CallPart::Lit(lit));
    }
    Ok(parts)
}

/// The calls a template uses results of.
pub fn step_refs(parts: &[CallPart]) -> impl Iterator<Item = &str> {
    parts.iter().filter_map(|p| match p {
        CallPart::Step(c, _) => Some(c.as_str()),
        _ => None,
    })
}

impl Aggregate {
    /// Checks that need only the aggregate (upstream names are checked by the caller).
    pub fn validate(&self, p: &KeyPath) -> Vec<Diagnostic> {
        let mut d = Vec::new();
        if self.calls.is_empty() {
            d.push(Diagnostic::new(
                p.key("calls"),
                "an aggregate needs at least one call",
            ));
        }
        if self.timeout.0.is_zero() {
            d.push(Diagnostic::new(
                p.key("timeout"),
                "`timeout` must be above 0",
            ));
        }
        let mut seen: Vec<&str> = Vec::new();
        for (i, c) in self.calls.iter().enumerate() {
            let q = p.key("calls").index(i);
            let ok_name = !c.name.is_empty()
                && c.name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
            if !ok_name {
                d.push(Diagnostic::new(
                    q.key("name"),
                    format!(
                        "`{}` is not a call name (letters, digits, `_`, `-`)",
                        c.name
                    ),
                ));
            } else if seen.contains(&c.name.as_str()) {
                d.push(Diagnostic::new(
                    q.key("name"),
                    format!("call `{}` is listed twice", c.name),
                ));
            }
            if http::Method::from_bytes(c.method.as_bytes()).is_err() {
                d.push(Diagnostic::new(
                    q.key("method"),
                    format!("`{}` is not an HTTP method", c.method),
                ));
            }
            if !c.path.starts_with('/') {
                d.push(Diagnostic::new(
                    q.key("path"),
                    "a call's path starts with `/` (calls go to a named upstream, never to a URL)",
                ));
            }
            let mut templates = vec![(q.key("path"), &c.path)];
            for (h, v) in &c.headers {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    d.push(Diagnostic::new(
                        q.key("headers").key(h),
                        format!("`{h}` is not a valid header name"),
                    ));
                }
                templates.push((q.key("headers").key(h), v));
            }
            for (at, t) in templates {
                match parse_call_template(t) {
                    Err(e) => d.push(Diagnostic::new(at, e)),
                    Ok(parts) => {
                        for r in step_refs(&parts) {
                            if !seen.contains(&r) {
                                d.push(Diagnostic::new(
                                    at.clone(),
                                    format!(
                                        "`steps.{r}` is not a call listed before `{}`; a call can use only earlier calls' results",
                                        c.name
                                    ),
                                ));
                            }
                        }
                    }
                }
            }
            if c.timeout.is_some_and(|t| t.0.is_zero()) {
                d.push(Diagnostic::new(
                    q.key("timeout"),
                    "`timeout` must be above 0",
                ));
            }
            seen.push(&c.name);
        }
        d
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn call_templates_parse_steps_params_and_vars() {
        let p = parse_call_template(
            "/users/{id}/orders?since=${query.since}&owner=${steps.user.body.owner.id}",
        )
        .unwrap();
        assert_eq!(
            p,
            vec![
                CallPart::Lit("/users/".into()),
                CallPart::Var(Var::Param("id".into())),
                CallPart::Lit("/orders?since=".into()),
                CallPart::Var(Var::Query("since".into())),
                CallPart::Lit("&owner=".into()),
                CallPart::Step("user".into(), "/owner/id".into()),
            ]
        );
        assert_eq!(
            parse_call_template("${steps.a.body}").unwrap(),
            vec![CallPart::Step("a".into(), String::new())]
        );
        assert!(parse_call_template("${steps.a}").is_err());
        assert!(parse_call_template("${steps.a.bodyx}").is_err());
        assert!(parse_call_template("${nope}").is_err());
        assert!(parse_call_template("/x/{bad name}").is_err());
    }
}
