//! `claims`: authorization by the claims of the caller's token — a verified JWT or an
//! OAuth 2 introspection result (both land in `Ctx::jwt_claims`). Every rule that
//! applies to the request's method must hold; a failed rule is `403 forbidden`
//! (with RFC 6750's `insufficient_scope` challenge for scope rules). A request with
//! no claims is 401 when unauthenticated, 403 when a credential without claims
//! (an API key, a password) authenticated it.

use http::header::WWW_AUTHENTICATE;
use http::{HeaderValue, Method, Request};
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{Policy, Step};
use crate::registry::SettingsErrors;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Rules; all that apply to the request's method must hold.
    pub rules: Vec<RuleSettings>,
}

/// One rule: a claim (dotted path for nested objects, e.g. `realm_access.roles`) and
/// one test. Strings are split on spaces for `contains*` (OAuth `scope` is a
/// space-separated string); arrays are searched; other values compared as text.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    /// The claim; with `scopes`, default `scope` (then `scp`).
    #[serde(default)]
    pub claim: Option<String>,
    /// The claim equals this value.
    #[serde(default)]
    pub equals: Option<Value>,
    /// The claim contains this value.
    #[serde(default)]
    pub contains: Option<String>,
    /// The claim contains at least one of these.
    #[serde(default)]
    pub contains_any: Vec<String>,
    /// The claim contains all of these.
    #[serde(default)]
    pub contains_all: Vec<String>,
    /// Shorthand for the OAuth scopes that must all be granted (`scope`/`scp`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The claim exists (any value).
    #[serde(default)]
    pub present: bool,
    /// Methods the rule applies to; empty: every method.
    #[serde(default)]
    pub methods: Vec<String>,
}

#[derive(Debug)]
enum Test {
    Equals(Value),
    ContainsAny(Vec<String>),
    ContainsAll(Vec<String>),
    Present,
}

#[derive(Debug)]
struct Rule {
    /// The claim as written (a name may itself contain dots, e.g. a namespaced
    /// `https://example.com/roles`), and its path segments; `scope` rules also look at
    /// `scp`.
    name: String,
    claim: Vec<String>,
    scope: bool,
    test: Test,
    methods: Vec<Method>,
    /// What the 403 says.
    describe: String,
}

pub struct Claims {
    rules: Vec<Rule>,
}

impl Claims {
    pub fn new(s: Settings) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        if s.rules.is_empty() {
            errs.push((
                KeyPath::root().key("rules"),
                "give at least one rule".into(),
            ));
        }
        let mut rules = Vec::new();
        for (i, r) in s.rules.into_iter().enumerate() {
            let p = KeyPath::root().key("rules").index(i);
            let mut tests = Vec::new();
            if let Some(v) = r.equals {
                tests.push(Test::Equals(v));
            }
            if let Some(c) = r.contains {
                tests.push(Test::ContainsAll(vec![c]));
            }
            if !r.contains_any.is_empty() {
                tests.push(Test::ContainsAny(r.contains_any));
            }
            if !r.contains_all.is_empty() {
                tests.push(Test::ContainsAll(r.contains_all));
            }
            let scope = !r.scopes.is_empty();
            if scope {
                tests.push(Test::ContainsAll(r.scopes));
            }
            if r.present {
                tests.push(Test::Present);
            }
            let test = match (tests.len(), tests.pop()) {
                (1, Some(t)) => t,
                _ => {
                    errs.push((
                        p,
                        "give exactly one of equals, contains, contains_any, contains_all, scopes, present"
                            .into(),
                    ));
                    continue;
                }
            };
            let claim = match (r.claim, scope) {
                (Some(c), _) if !c.is_empty() => c,
                (None, true) => "scope".to_string(),
                _ => {
                    errs.push((p.key("claim"), "the claim is required".into()));
                    continue;
                }
            };
            let mut methods = Vec::new();
            for (j, m) in r.methods.iter().enumerate() {
                match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(m) => methods.push(m),
                    Err(_) => {
                        errs.push((p.key("methods").index(j), format!("`{m}` is not a method")))
                    }
                }
            }
            let describe = match &test {
                Test::Equals(v) => format!("claim `{claim}` must equal {v}"),
                Test::ContainsAny(v) => {
                    format!("claim `{claim}` must contain one of {}", v.join(", "))
                }
                Test::ContainsAll(v) if scope => {
                    format!("the token lacks the scope {}", v.join(" "))
                }
                Test::ContainsAll(v) => format!("claim `{claim}` must contain {}", v.join(", ")),
                Test::Present => format!("claim `{claim}` is required"),
            };
            rules.push(Rule {
                claim: claim.split('.').map(str::to_string).collect(),
                name: claim.clone(),
                scope: scope && claim == "scope",
                test,
                methods,
                describe,
            });
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Claims { rules })
    }
}

fn lookup<'v>(claims: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(claims, |v, k| v.get(k))
}

/// A non-string JSON value as text (`3`, `true`), for comparing with configured text.
fn text(v: &Value) -> String {
    v.to_string()
}

fn contains(v: &Value, want: &str) -> bool {
    match v {
        Value::String(s) => s.split(' ').any(|x| x == want),
        Value::Array(a) => a.iter().any(|x| match x {
            Value::String(s) => s == want,
            other => text(other) == want,
        }),
        other => text(other) == want,
    }
}

impl Rule {
    fn holds(&self, claims: &Value) -> bool {
        let mut v = claims
            .get(&self.name)
            .or_else(|| lookup(claims, &self.claim));
        if v.is_none() && self.scope {
            v = claims.get("scp");
        }
        let Some(v) = v else {
            return false;
        };
        match &self.test {
            Test::Present => true,
            Test::Equals(want) => {
                v == want || matches!((v, want), (Value::String(a), b) if *a == text(b))
            }
            Test::ContainsAny(w) => w.iter().any(|x| contains(v, x)),
            Test::ContainsAll(w) => w.iter().all(|x| contains(v, x)),
        }
    }
}

impl Policy for Claims {
    fn name(&self) -> &'static str {
        "claims"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let method = req.method();
        let mut applicable = self
            .rules
            .iter()
            // Methods are case-sensitive tokens, but an upstream may fold them: a rule
            // for POST also holds `post` to account.
            .filter(|r| {
                r.methods.is_empty()
                    || r.methods
                        .iter()
                        .any(|m| m.as_str().eq_ignore_ascii_case(method.as_str()))
            })
            .peekable();
        if applicable.peek().is_none() {
            return Step::cont();
        }
        let Some(claims) = &ctx.jwt_claims else {
            return Step::error(if ctx.auth.is_some() {
                GatewayError::new(
                    ErrorKind::Forbidden,
                    "this route checks token claims; the credential used has none",
                )
            } else {
                GatewayError::new(
                    ErrorKind::Unauthorized,
                    "this route needs an authenticated caller",
                )
            });
        };
        for r in applicable {
            if !r.holds(claims) {
                let mut e = GatewayError::new(ErrorKind::Forbidden, r.describe.clone());
                if let (true, Test::ContainsAll(scopes)) = (r.scope, &r.test) {
                    let v = format!(
                        "Bearer realm=\"portico\", error=\"insufficient_scope\", scope=\"{}\"",
                        scopes.join(" ")
                    );
                    if let Ok(v) = HeaderValue::from_str(&v) {
                        e = e.with_header(WWW_AUTHENTICATE, v);
                    }
                }
                return Step::error(e);
            }
        }
        Step::cont()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::policy::Flow;
    use serde_json::json;

    fn policy(rules: Value) -> Claims {
        Claims::new(serde_json::from_value(json!({ "rules": rules })).unwrap()).unwrap()
    }

    fn run(
        p: &Claims,
        method: &str,
        claims: Option<Value>,
        authed: bool,
    ) -> Result<(), GatewayError> {
        let mut ctx = Ctx::new(
            "id".into(),
            "127.0.0.1".parse().unwrap(),
            "r".into(),
            "/".into(),
            Default::default(),
        );
        ctx.jwt_claims = claims;
        if authed {
            ctx.auth = Some("jwt");
        }
        let mut req = Request::builder().method(method).body(Body::Empty).unwrap();
        let r = match p.on_request(&mut ctx, &mut req) {
            Step::Ready(Some(Flow::Continue)) => Ok(()),
            Step::Ready(Some(Flow::Error(e))) => Err(e),
            _ => panic!("unexpected step"),
        };
        r
    }

    #[test]
    fn rules_by_method_and_kind() {
        let p = policy(json!([
            {"scopes": ["orders:read"]},
            {"claim": "roles", "contains": "admin", "methods": ["POST", "delete"]},
            {"claim": "realm.tenant", "equals": "acme"},
            {"claim": "level", "equals": 3},
            {"claim": "groups", "contains_any": ["a", "b"], "methods": ["PUT"]},
        ]));
        let reader = json!({"scope": "profile orders:read", "roles": ["user"], "realm": {"tenant": "acme"}, "level": 3});
        assert!(run(&p, "GET", Some(reader.clone()), true).is_ok());
        let e = run(&p, "POST", Some(reader.clone()), true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Forbidden);
        assert!(
            e.message.contains("`roles` must contain admin"),
            "{}",
            e.message
        );
        let mut admin = reader.clone();
        admin["roles"] = json!(["user", "admin"]);
        assert!(run(&p, "DELETE", Some(admin.clone()), true).is_ok());
        // scp as an array, and the insufficient_scope challenge
        let no_scope = json!({"scp": ["profile"], "realm": {"tenant": "acme"}, "level": 3});
        let e = run(&p, "GET", Some(no_scope), true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Forbidden);
        assert!(e.headers.iter().any(|(n, v)| n == WWW_AUTHENTICATE
            && v.to_str().unwrap().contains("insufficient_scope")
            && v.to_str().unwrap().contains("orders:read")));
        // nested and typed equality
        let mut other = reader.clone();
        other["realm"]["tenant"] = json!("evil");
        assert!(run(&p, "GET", Some(other), true).is_err());
        let mut lvl = reader.clone();
        lvl["level"] = json!("3");
        assert!(run(&p, "GET", Some(lvl), true).is_ok());
        let mut put = reader.clone();
        put["groups"] = json!(["c"]);
        assert!(run(&p, "PUT", Some(put.clone()), true).is_err());
        put["groups"] = json!(["c", "b"]);
        assert!(run(&p, "PUT", Some(put), true).is_ok());
        // without claims: 401 unauthenticated, 403 authenticated without claims
        assert_eq!(
            run(&p, "GET", None, false).unwrap_err().kind,
            ErrorKind::Unauthorized
        );
        assert_eq!(
            run(&p, "GET", None, true).unwrap_err().kind,
            ErrorKind::Forbidden
        );
    }

    #[test]
    fn settings_errors() {
        for (rules, want) in [
            (json!([]), "rules"),
            (json!([{"claim": "a"}]), "rules[0]"),
            (
                json!([{"claim": "a", "equals": 1, "present": true}]),
                "rules[0]",
            ),
            (json!([{"contains": "x"}]), "rules[0].claim"),
            (
                json!([{"claim": "a", "present": true, "methods": ["GE T"]}]),
                "rules[0].methods[0]",
            ),
        ] {
            let s: Settings = serde_json::from_value(json!({ "rules": rules })).unwrap();
            let errs = Claims::new(s).err().unwrap();
            assert_eq!(errs[0].0.to_string(), want, "{errs:?}");
        }
    }
}
