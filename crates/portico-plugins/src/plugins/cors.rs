//! `cors`: Cross-Origin Resource Sharing as the Fetch standard defines it.
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
//!   answered here with `204` (unless `preflight_continue`), also on routes whose
//!   `methods` do not include `OPTIONS`: this is a request-hygiene policy, which the
//!   pipeline runs before answering 405. An origin that is not allowed gets the 204
//!   without any `Access-Control-Allow-*` header (the browser then blocks the request);
//!   the allowed list is never revealed.
//! - Other requests with an allowed `Origin` get `Access-Control-Allow-Origin` (and
//!   `-Credentials`, `-Expose-Headers`) on the response, in the `upstream_response`
//!   phase. With credentials the origin is echoed, never `*`.
//! - Responses whose CORS headers depend on the `Origin` say `Vary: Origin`, so that
//!   caches keep one answer per origin.
//!
//! Per request, only a request with an `Origin` header whose answer depends on it
//! stores anything (its verdict, in `Ctx::extensions`).

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use portico_config::units::Dur;
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::body::Body;
use crate::ctx::Ctx;
use crate::policy::{Policy, Step};
use crate::registry::SettingsErrors;

const DEFAULT_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Origins allowed to read the responses: exact origins (`https://app.example.com`:
    /// scheme, host, and a port when it is not the scheme's default; no path), patterns
    /// with a leading wildcard label (`https://*.example.com`: any subdomain, one or
    /// more labels deep, not `example.com` itself), or `*` (any origin).
    pub origins: Vec<String>,
    /// Methods allowed in preflights (`Access-Control-Allow-Methods`). Default: GET,
    /// HEAD, POST, PUT, PATCH, DELETE, OPTIONS. `*`: any (with `credentials`, the
    /// requested method is echoed instead).
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Request headers allowed in preflights (`Access-Control-Allow-Headers`).
    /// Default: the ones the preflight asks for (`Access-Control-Request-Headers` is
    /// reflected). `*`: any (with `credentials`, reflected instead).
    #[serde(default)]
    pub headers: Option<Vec<String>>,
    /// Response headers that scripts may read beyond the CORS-safelisted ones
    /// (`Access-Control-Expose-Headers`). `*`: all (not allowed with `credentials`).
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Let browsers send credentials (cookies, HTTP authentication, client
    /// certificates) and read the answers (`Access-Control-Allow-Credentials: true`).
    /// The allowed origin is then echoed, never `*`.
    #[serde(default)]
    pub credentials: bool,
    /// How long browsers may cache a preflight's answer (`Access-Control-Max-Age`),
    /// e.g. `10m`. Default: not sent (browsers then cache it for 5 seconds).
    #[serde(default)]
    pub max_age: Option<Dur>,
    /// Pass preflights on (to the upstream) instead of answering them. Default
    /// `false`: the gateway answers them itself with 204.
    #[serde(default)]
    pub preflight_continue: bool,
}

/// One allowed origin, lower-case.
#[derive(Debug, PartialEq, Eq)]
enum Rule {
    /// `https://app.example.com` (a default port removed).
    Exact(String),
    /// `https://*.example.com`: `scheme` is `https://`, `suffix` is `.example.com`
    /// (with `:PORT` when the pattern has one).
    Subdomains { scheme: String, suffix: String },
}

impl Rule {
    fn matches(&self, origin: &[u8]) -> bool {
        match self {
            Rule::Exact(o) => origin.eq_ignore_ascii_case(o.as_bytes()),
            Rule::Subdomains { scheme, suffix } => {
                let (s, x) = (scheme.as_bytes(), suffix.as_bytes());
                if origin.len() <= s.len() + x.len() {
                    return false;
                }
                let (head, rest) = origin.split_at(s.len());
                let (labels, tail) = rest.split_at(rest.len() - x.len());
                head.eq_ignore_ascii_case(s) && tail.eq_ignore_ascii_case(x) && host_labels(labels)
            }
        }
    }
}

/// One or more non-empty DNS labels (letters, digits, `-`) joined by dots.
fn host_labels(b: &[u8]) -> bool {
    !b.is_empty()
        && b.split(|&c| c == b'.')
            .all(|l| !l.is_empty() && l.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-'))
}

/// Parse a configured origin: `*`, `scheme://host[:port]` or `scheme://*.host[:port]`.
/// `Ok(None)` is `*`.
fn parse_origin(raw: &str) -> Result<Option<Rule>, String> {
    if raw == "*" {
        return Ok(None);
    }
    let example =
        "write scheme://host[:port], e.g. `https://app.example.com` or `https://*.example.com`";
    let lower = raw.to_ascii_lowercase();
    let Some((scheme, authority)) = lower.split_once("://") else {
        return Err(format!("`{raw}` is not an origin; {example}"));
    };
    if scheme.is_empty()
        || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return Err(format!(
            "`{raw}`: `{scheme}` is not a URL scheme; {example}"
        ));
    }
    if authority.contains(['/', '?', '#']) {
        return Err(format!(
            "`{raw}`: an origin has no path (not even a trailing `/`); {example}"
        ));
    }
    if authority.contains('@') {
        return Err(format!("`{raw}`: an origin has no user name; {example}"));
    }
    let (host, port) = if authority.starts_with('[') {
        let bad = || format!("`{raw}`: not a valid host; {example}");
        let (h, rest) = authority.split_once(']').ok_or_else(bad)?;
        match rest {
            "" => (format!("{h}]"), None),
            _ => (
                format!("{h}]"),
                Some(rest.strip_prefix(':').ok_or_else(bad)?),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) => {
                let default = matches!((scheme, n), ("http", 80) | ("https", 443));
                (!default).then_some(n)
            }
            _ => return Err(format!("`{raw}`: `{p}` is not a port; {example}")),
        },
    };
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    if let Some(base) = host.strip_prefix("*.") {
        if !host_labels(base.as_bytes()) {
            return Err(format!(
                "`{raw}`: a wildcard is only allowed as a leading `*.` label of a host name, e.g. `https://*.example.com`"
            ));
        }
        return Ok(Some(Rule::Subdomains {
            scheme: format!("{scheme}://"),
            suffix: format!(".{base}{port}"),
        }));
    }
    let valid = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host_labels(host.as_bytes())
    };
    if !valid {
        let why = if host.contains('*') {
            "a wildcard is only allowed as a leading `*.` label of a host name, e.g. `https://*.example.com`"
        } else {
            "not a valid host"
        };
        return Err(format!("`{raw}`: {why}"));
    }
    Ok(Some(Rule::Exact(format!("{scheme}://{host}{port}"))))
}

/// A configured list of header names (or `*`), joined for a header value.
enum List {
    /// `*` without credentials.
    Star,
    /// `*` with credentials (where `*` would be read literally), or not configured:
    /// echo what the preflight asks for.
    Reflect,
    /// The names or methods, joined with `, ` (`None` for an empty list).
    Fixed(Option<HeaderValue>),
}

fn header_list(names: &[String], key: &str, credentials: bool, errs: &mut SettingsErrors) -> List {
    if names.iter().any(|n| n == "*") {
        return if credentials {
            List::Reflect
        } else {
            List::Star
        };
    }
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        match HeaderName::from_bytes(n.as_bytes()) {
            Ok(h) => out.push(h.as_str().to_string()),
            Err(_) => errs.push((
                KeyPath::root().key(key).index(i),
                format!("`{n}` is not a valid header name"),
            )),
        }
    }
    List::Fixed(joined(&out))
}

fn joined(items: &[String]) -> Option<HeaderValue> {
    if items.is_empty() {
        return None;
    }
    HeaderValue::from_str(&items.join(", ")).ok()
}

/// The policy's verdict on a request, kept for its response.
#[derive(Debug, Clone)]
enum Verdict {
    /// A preflight this policy answered: its headers are already set.
    Preflight,
    /// The value of `Access-Control-Allow-Origin`.
    Allowed(HeaderValue),
    /// An `Origin` that is not allowed.
    Denied,
}

pub struct Cors {
    /// `*` without credentials: every response says `Access-Control-Allow-Origin: *`.
    any_fixed: bool,
    /// `*` with credentials: every origin is echoed.
    any_echo: bool,
    rules: Vec<Rule>,
    methods: List,
    headers: List,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
    preflight_continue: bool,
}

static STAR: HeaderValue = HeaderValue::from_static("*");
static TRUE: HeaderValue = HeaderValue::from_static("true");
static VARY_ORIGIN: HeaderValue = HeaderValue::from_static("Origin");
static VARY_PREFLIGHT: HeaderValue =
    HeaderValue::from_static("Access-Control-Request-Method, Access-Control-Request-Headers");

impl Cors {
    pub fn new(s: Settings) -> Result<Self, SettingsErrors> {
        let mut errs = Vec::new();
        let mut any = false;
        let mut rules = Vec::new();
        if s.origins.is_empty() {
            errs.push((
                KeyPath::root().key("origins"),
                "list at least one origin (or `*`)".into(),
            ));
        }
        for (i, o) in s.origins.iter().enumerate() {
            match parse_origin(o.trim()) {
                Ok(None) => any = true,
                Ok(Some(r)) => rules.push(r),
                Err(e) => errs.push((KeyPath::root().key("origins").index(i), e)),
            }
        }
        let methods = match &s.methods {
            None => List::Fixed(Some(HeaderValue::from_static(DEFAULT_METHODS))),
            Some(ms) if ms.iter().any(|m| m == "*") => {
                if s.credentials {
                    List::Reflect
                } else {
                    List::Star
                }
            }
            Some(ms) => {
                let mut out = Vec::with_capacity(ms.len());
                for (i, m) in ms.iter().enumerate() {
                    let p = KeyPath::root().key("methods").index(i);
                    let up = m.to_ascii_uppercase();
                    if *m != up && KNOWN_METHODS.contains(&up.as_str()) {
                        errs.push((p, format!("methods are upper-case: write `{up}`")));
                    } else if Method::from_bytes(m.as_bytes()).is_err() {
                        errs.push((p, format!("`{m}` is not an HTTP method")));
                    } else {
                        out.push(m.clone());
                    }
                }
                List::Fixed(joined(&out))
            }
        };
        let headers = match &s.headers {
            None => List::Reflect,
            Some(hs) => header_list(hs, "headers", s.credentials, &mut errs),
        };
        let expose = if s.credentials && s.expose_headers.iter().any(|h| h == "*") {
            errs.push((
                KeyPath::root().key("expose_headers"),
                "`*` is not a wildcard when `credentials` is true (browsers read it as a header named `*`); list the headers".into(),
            ));
            None
        } else {
            match header_list(&s.expose_headers, "expose_headers", false, &mut errs) {
                List::Star => Some(STAR.clone()),
                List::Fixed(v) => v,
                List::Reflect => None,
            }
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Cors {
            any_fixed: any && !s.credentials,
            any_echo: any && s.credentials,
            rules,
            methods,
            headers,
            expose,
            credentials: s.credentials,
            max_age: s.max_age.map(|d| HeaderValue::from(d.0.as_secs())),
            preflight_continue: s.preflight_continue,
        })
    }

    /// The `Access-Control-Allow-Origin` for a request's `Origin`, if it is allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any_fixed {
            return Some(STAR.clone());
        }
        let b = origin.as_bytes();
        // `null` (sandboxed documents, `file:` pages) is never an allowed origin.
        if b.is_empty() || b == b"null" || !b.iter().all(|c| c.is_ascii_graphic()) {
            return None;
        }
        (self.any_echo || self.rules.iter().any(|r| r.matches(b))).then(|| origin.clone())
    }

    /// The policy's own answer to a preflight.
    fn preflight(&self, origin: &HeaderValue, req: &HeaderMap) -> Response<Body> {
        let mut resp = Response::new(Body::default());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.append(VARY, VARY_ORIGIN.clone());
        h.append(VARY, VARY_PREFLIGHT.clone());
        let Some(allow) = self.allow_origin(origin) else {
            return resp;
        };
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        if self.credentials {
            h.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE.clone());
        }
        for (list, name, asked) in [
            (
                &self.methods,
                ACCESS_CONTROL_ALLOW_METHODS,
                ACCESS_CONTROL_REQUEST_METHOD,
            ),
            (
                &self.headers,
                ACCESS_CONTROL_ALLOW_HEADERS,
                ACCESS_CONTROL_REQUEST_HEADERS,
            ),
        ] {
            let v = match list {
                List::Star => Some(STAR.clone()),
                List::Reflect => req.get(asked).filter(|v| !v.is_empty()).cloned(),
                List::Fixed(v) => v.clone(),
            };
            if let Some(v) = v {
                h.insert(name, v);
            }
        }
        if let Some(v) = &self.max_age {
            h.insert(ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        resp
    }
}

/// Add `Vary: Origin` unless the response already varies on it (or on everything).
fn vary_origin(h: &mut HeaderMap) {
    let present = h.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                let t = t.trim();
                t == "*" || t.eq_ignore_ascii_case("origin")
            })
        })
    });
    if !present {
        h.append(VARY, VARY_ORIGIN.clone());
    }
}

impl Policy for Cors {
    fn name(&self) -> &'static str {
        "cors"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let Some(origin) = req.headers().get(ORIGIN) else {
            return Step::cont();
        };
        if req.method() == Method::OPTIONS
            && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD)
            && !self.preflight_continue
        {
            let resp = self.preflight(origin, req.headers());
            ctx.extensions.insert(Verdict::Preflight);
            return Step::respond(resp);
        }
        if !self.any_fixed {
            let v = match self.allow_origin(origin) {
                Some(v) => Verdict::Allowed(v),
                None => Verdict::Denied,
            };
            ctx.extensions.insert(v);
        }
        Step::cont()
    }

    fn upstream_response(&self, ctx: &mut Ctx, resp: &mut http::response::Parts) {
        let verdict = ctx.extensions.remove::<Verdict>();
        let h = &mut resp.headers;
        match verdict {
            Some(Verdict::Preflight) => {}
            _ if self.any_fixed => {
                h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, STAR.clone());
                if let Some(v) = &self.expose {
                    h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
                }
            }
            Some(Verdict::Allowed(v)) => {
                h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, v);
                if self.credentials {
                    h.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE.clone());
                }
                if let Some(v) = &self.expose {
                    h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
                }
                vary_origin(h);
            }
            Some(Verdict::Denied) => {
                // The policy decides: an upstream's own CORS answer does not widen it.
                h.remove(ACCESS_CONTROL_ALLOW_ORIGIN);
                h.remove(ACCESS_CONTROL_ALLOW_CREDENTIALS);
                h.remove(ACCESS_CONTROL_EXPOSE_HEADERS);
                vary_origin(h);
            }
            // No `Origin`: nothing to allow, but a cache must not serve this answer to
            // a request that has one.
            None => vary_origin(h),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::policy::Flow;

    fn settings(origins: &[&str]) -> Settings {
        Settings {
            origins: origins.iter().map(|s| s.to_string()).collect(),
            methods: None,
            headers: None,
            expose_headers: Vec::new(),
            credentials: false,
            max_age: None,
            preflight_continue: false,
        }
    }

    fn cors(s: Settings) -> Cors {
        Cors::new(s).unwrap()
    }

    fn ctx() -> Ctx {
        Ctx::new(
            "rid".into(),
            "127.0.0.1".parse().unwrap(),
            "r".into(),
            "/".into(),
            Default::default(),
        )
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut b = Request::builder().method(method).uri("/x");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(Body::default()).unwrap()
    }

    /// Runs the request phase; `Some(response)` when the policy answered.
    fn run(p: &Cors, ctx: &mut Ctx, req: &mut Request<Body>) -> Option<Response<Body>> {
        match p.on_request(ctx, req) {
            Step::Ready(Some(Flow::Continue)) => None,
            Step::Ready(Some(Flow::Respond(r))) => Some(*r),
            _ => panic!("unexpected step"),
        }
    }

    /// The response head after the response phase, for a request.
    fn actual(p: &Cors, req_headers: &[(&str, &str)], upstream: &[(&str, &str)]) -> HeaderMap {
        let mut c = ctx();
        let mut req = request("GET", req_headers);
        assert!(run(p, &mut c, &mut req).is_none());
        let mut b = Response::builder();
        for (n, v) in upstream {
            b = b.header(*n, *v);
        }
        let (mut parts, _) = b.body(()).unwrap().into_parts();
        p.upstream_response(&mut c, &mut parts);
        parts.headers
    }

    fn get<'a>(h: &'a HeaderMap, n: &str) -> Option<&'a str> {
        h.get(n).map(|v| v.to_str().unwrap())
    }

    fn all(h: &HeaderMap, n: &str) -> Vec<String> {
        h.get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    fn matches(pattern: &str, origin: &str) -> bool {
        parse_origin(pattern)
            .unwrap()
            .unwrap()
            .matches(origin.as_bytes())
    }

    #[test]
    fn exact_origins() {
        assert!(matches(
            "https://app.example.com",
            "https://app.example.com"
        ));
        assert!(matches(
            "https://App.Example.com",
            "https://app.example.COM"
        ));
        assert!(!matches(
            "https://app.example.com",
            "http://app.example.com"
        ));
        assert!(!matches(
            "https://app.example.com",
            "https://app.example.com:8443"
        ));
        assert!(!matches(
            "https://app.example.com",
            "https://app.example.co"
        ));
        assert!(!matches(
            "https://app.example.com",
            "https://xapp.example.com"
        ));
        assert!(matches("http://localhost:3000", "http://localhost:3000"));
        assert!(!matches("http://localhost:3000", "http://localhost:3001"));
        // A default port is what browsers leave out.
        assert!(matches(
            "https://app.example.com:443",
            "https://app.example.com"
        ));
        assert!(matches("http://[::1]:8080", "http://[::1]:8080"));
    }

    #[test]
    fn wildcard_origins() {
        let p = "https://*.example.com";
        assert!(matches(p, "https://app.example.com"));
        assert!(matches(p, "https://a.b.example.com"));
        assert!(matches(p, "https://APP.EXAMPLE.COM"));
        assert!(!matches(p, "https://example.com"), "not the domain itself");
        assert!(!matches(p, "https://.example.com"));
        assert!(!matches(p, "https://a..example.com"));
        assert!(!matches(p, "https://example.com.evil.org"));
        assert!(!matches(p, "https://app.example.com.evil.org"));
        assert!(!matches(p, "https://evilexample.com"));
        assert!(!matches(p, "https://evil.com/.example.com"));
        assert!(!matches(p, "https://evil.com?.example.com"));
        assert!(!matches(p, "https://evil@x.example.com"));
        assert!(!matches(p, "http://app.example.com"), "other scheme");
        assert!(!matches(p, "https://app.example.com:8443"), "other port");
        assert!(!matches(p, "https://a:1.example.com"));
        let p = "https://*.example.com:8443";
        assert!(matches(p, "https://app.example.com:8443"));
        assert!(!matches(p, "https://app.example.com"));
        assert!(!matches(p, "https://app.example.com:84431"));
    }

    #[test]
    fn bad_origins_are_located_errors() {
        let errs = Cors::new(settings(&[
            "https://ok.example.com",
            "https://app.example.com/",
            "app.example.com",
            "https://api.*.example.com",
            "https://*.",
            "https://x.example.com:99999",
            "null",
        ]))
        .err()
        .unwrap();
        let got: Vec<String> = errs.iter().map(|(p, m)| format!("{p}: {m}")).collect();
        assert_eq!(got.len(), 6, "{got:#?}");
        assert!(got[0].starts_with("origins[1]: ") && got[0].contains("no path"));
        assert!(got[1].starts_with("origins[2]: ") && got[1].contains("is not an origin"));
        assert!(got[2].starts_with("origins[3]: ") && got[2].contains("leading `*.` label"));
        assert!(got[3].starts_with("origins[4]: ") && got[3].contains("leading `*.` label"));
        assert!(got[4].starts_with("origins[5]: ") && got[4].contains("is not a port"));
        assert!(got[5].starts_with("origins[6]: ") && got[5].contains("is not an origin"));

        let errs = Cors::new(settings(&[])).err().unwrap();
        assert_eq!(errs[0].0.to_string(), "origins");

        let mut s = settings(&["*"]);
        s.methods = Some(vec!["GET".into(), "get".into(), "G ET".into()]);
        s.headers = Some(vec!["x-ok".into(), "bad header".into()]);
        s.expose_headers = vec!["*".into()];
        s.credentials = true;
        let got: Vec<String> = Cors::new(s)
            .err()
            .unwrap()
            .iter()
            .map(|(p, m)| format!("{p}: {m}"))
            .collect();
        assert_eq!(
            got,
            [
                "methods[1]: methods are upper-case: write `GET`",
                "methods[2]: `G ET` is not an HTTP method",
                "headers[1]: `bad header` is not a valid header name",
                "expose_headers: `*` is not a wildcard when `credentials` is true (browsers read it as a header named `*`); list the headers",
            ]
        );
    }

    #[test]
    fn preflight_from_an_allowed_origin() {
        let mut s = settings(&["https://app.example.com"]);
        s.max_age = Some(Dur(std::time::Duration::from_secs(600)));
        let p = cors(s);
        let mut c = ctx();
        let mut req = request(
            "OPTIONS",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "content-type,x-token"),
            ],
        );
        let resp = run(&p, &mut c, &mut req).expect("the policy answers");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let h = resp.headers();
        assert_eq!(
            get(h, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(
            get(h, "access-control-allow-methods"),
            Some(DEFAULT_METHODS)
        );
        // Not configured: the asked-for headers are reflected.
        assert_eq!(
            get(h, "access-control-allow-headers"),
            Some("content-type,x-token")
        );
        assert_eq!(get(h, "access-control-max-age"), Some("600"));
        assert_eq!(get(h, "access-control-allow-credentials"), None);
        assert_eq!(
            all(h, "vary"),
            [
                "Origin",
                "Access-Control-Request-Method, Access-Control-Request-Headers"
            ]
        );
        // The response phase adds nothing more to the policy's own answer.
        let (mut parts, _) = resp.into_parts();
        let before = parts.headers.clone();
        p.upstream_response(&mut c, &mut parts);
        assert_eq!(parts.headers, before);
    }

    #[test]
    fn preflight_without_request_headers_and_with_configured_ones() {
        let p = cors(settings(&["https://app.example.com"]));
        let mut req = request(
            "OPTIONS",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "GET"),
            ],
        );
        let resp = run(&p, &mut ctx(), &mut req).unwrap();
        assert_eq!(get(resp.headers(), "access-control-allow-headers"), None);

        let mut s = settings(&["https://app.example.com"]);
        s.headers = Some(vec!["Content-Type".into(), "X-Token".into()]);
        s.methods = Some(vec!["GET".into(), "POST".into()]);
        let p = cors(s);
        let mut req = request(
            "OPTIONS",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "x-other"),
            ],
        );
        let resp = run(&p, &mut ctx(), &mut req).unwrap();
        let h = resp.headers();
        assert_eq!(
            get(h, "access-control-allow-headers"),
            Some("content-type, x-token")
        );
        assert_eq!(get(h, "access-control-allow-methods"), Some("GET, POST"));
    }

    #[test]
    fn preflight_from_an_origin_not_allowed_reveals_nothing() {
        let mut s = settings(&["https://app.example.com", "https://*.example.org"]);
        s.credentials = true;
        s.max_age = Some(Dur(std::time::Duration::from_secs(60)));
        let p = cors(s);
        for origin in ["https://evil.example", "null", "https://example.org"] {
            let mut req = request(
                "OPTIONS",
                &[
                    ("origin", origin),
                    ("access-control-request-method", "DELETE"),
                    ("access-control-request-headers", "x-token"),
                ],
            );
            let resp = run(&p, &mut ctx(), &mut req).unwrap();
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
            let names: Vec<&str> = resp.headers().keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["vary"], "{origin}: {:?}", resp.headers());
        }
    }

    #[test]
    fn credentials_echo_the_origin_never_star() {
        let mut s = settings(&["*"]);
        s.credentials = true;
        s.methods = Some(vec!["*".into()]);
        s.headers = Some(vec!["*".into()]);
        let p = cors(s);
        let mut req = request(
            "OPTIONS",
            &[
                ("origin", "https://anywhere.example"),
                ("access-control-request-method", "PATCH"),
                ("access-control-request-headers", "x-a, x-b"),
            ],
        );
        let resp = run(&p, &mut ctx(), &mut req).unwrap();
        let h = resp.headers();
        assert_eq!(
            get(h, "access-control-allow-origin"),
            Some("https://anywhere.example")
        );
        assert_eq!(get(h, "access-control-allow-credentials"), Some("true"));
        // `*` would be literal with credentials: the asked-for values are echoed.
        assert_eq!(get(h, "access-control-allow-methods"), Some("PATCH"));
        assert_eq!(get(h, "access-control-allow-headers"), Some("x-a, x-b"));

        let h = actual(&p, &[("origin", "https://anywhere.example")], &[]);
        assert_eq!(
            get(&h, "access-control-allow-origin"),
            Some("https://anywhere.example")
        );
        assert_eq!(get(&h, "access-control-allow-credentials"), Some("true"));
        assert_eq!(all(&h, "vary"), ["Origin"]);
        // Never `null`, even with `*`.
        let h = actual(&p, &[("origin", "null")], &[]);
        assert_eq!(get(&h, "access-control-allow-origin"), None);
    }

    #[test]
    fn star_without_credentials() {
        let mut s = settings(&["*"]);
        s.methods = Some(vec!["*".into()]);
        s.headers = Some(vec!["*".into()]);
        s.expose_headers = vec!["*".into()];
        let p = cors(s);
        let mut req = request(
            "OPTIONS",
            &[
                ("origin", "https://a.example"),
                ("access-control-request-method", "PATCH"),
            ],
        );
        let resp = run(&p, &mut ctx(), &mut req).unwrap();
        let h = resp.headers();
        assert_eq!(get(h, "access-control-allow-origin"), Some("*"));
        assert_eq!(get(h, "access-control-allow-methods"), Some("*"));
        assert_eq!(get(h, "access-control-allow-headers"), Some("*"));
        // Actual responses: `*`, with or without an Origin, and no Vary needed.
        for req in [&[("origin", "https://b.example")][..], &[]] {
            let h = actual(&p, req, &[]);
            assert_eq!(get(&h, "access-control-allow-origin"), Some("*"));
            assert_eq!(get(&h, "access-control-expose-headers"), Some("*"));
            assert!(all(&h, "vary").is_empty());
        }
    }

    #[test]
    fn actual_requests() {
        let mut s = settings(&["https://app.example.com", "https://*.example.org"]);
        s.expose_headers = vec!["X-Total-Count".into(), "ETag".into()];
        s.credentials = true;
        let p = cors(s);
        // Allowed: the origin is echoed, the upstream's own value replaced.
        let h = actual(
            &p,
            &[("origin", "https://shop.example.org")],
            &[
                ("access-control-allow-origin", "*"),
                ("vary", "Accept-Encoding"),
            ],
        );
        assert_eq!(
            all(&h, "access-control-allow-origin"),
            ["https://shop.example.org"]
        );
        assert_eq!(get(&h, "access-control-allow-credentials"), Some("true"));
        assert_eq!(
            get(&h, "access-control-expose-headers"),
            Some("x-total-count, etag")
        );
        assert_eq!(all(&h, "vary"), ["Accept-Encoding", "Origin"]);
        // Vary already names Origin: not repeated.
        let h = actual(
            &p,
            &[("origin", "https://app.example.com")],
            &[("vary", "accept-encoding, origin")],
        );
        assert_eq!(all(&h, "vary"), ["accept-encoding, origin"]);
        // Not allowed: no CORS headers, and the upstream's are removed.
        let h = actual(
            &p,
            &[("origin", "https://evil.example")],
            &[
                ("access-control-allow-origin", "https://evil.example"),
                ("access-control-allow-credentials", "true"),
            ],
        );
        assert_eq!(get(&h, "access-control-allow-origin"), None);
        assert_eq!(get(&h, "access-control-allow-credentials"), None);
        assert_eq!(all(&h, "vary"), ["Origin"]);
        // No Origin: nothing allowed, but Vary: Origin for caches.
        let h = actual(&p, &[], &[]);
        assert_eq!(get(&h, "access-control-allow-origin"), None);
        assert_eq!(all(&h, "vary"), ["Origin"]);
    }

    #[test]
    fn no_origin_stores_nothing() {
        let p = cors(settings(&["https://app.example.com"]));
        let mut c = ctx();
        let mut req = request("GET", &[]);
        assert!(run(&p, &mut c, &mut req).is_none());
        assert!(c.extensions.is_empty());
        // An OPTIONS without Origin is not a preflight: it goes on.
        let mut req = request("OPTIONS", &[("access-control-request-method", "GET")]);
        assert!(run(&p, &mut c, &mut req).is_none());
        assert!(c.extensions.is_empty());
    }

    #[test]
    fn preflight_continue_passes_preflights_on() {
        let mut s = settings(&["https://app.example.com"]);
        s.preflight_continue = true;
        let p = cors(s);
        let mut c = ctx();
        let mut req = request(
            "OPTIONS",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "PUT"),
            ],
        );
        assert!(run(&p, &mut c, &mut req).is_none());
        let (mut parts, _) = Response::new(()).into_parts();
        p.upstream_response(&mut c, &mut parts);
        assert_eq!(
            get(&parts.headers, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
    }
}
