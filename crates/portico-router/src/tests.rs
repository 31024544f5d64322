#![allow(clippy::unwrap_used)]
use super::*;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

fn spec(hosts: &[&str], paths: &[&str], methods: &[&str], priority: i32) -> RouteSpec {
    RouteSpec {
        hosts: hosts.iter().map(|s| s.to_string()).collect(),
        paths: paths
            .iter()
            .map(|p| PathPattern::parse(p).unwrap())
            .collect(),
        methods: methods
            .iter()
            .map(|m| Method::from_bytes(m.as_bytes()).unwrap())
            .collect(),
        headers: Vec::new(),
        priority,
    }
}

fn find(r: &Router, host: Option<&str>, path: &str, method: &str) -> String {
    let mut params = Params::default();
    match r.route(
        host,
        path,
        &Method::from_bytes(method.as_bytes()).unwrap(),
        &HeaderMap::new(),
        &mut params,
    ) {
        Match::Found { route, prefix_len } => {
            let mut s = format!("{route}");
            for (n, v) in params.iter(path) {
                s.push_str(&format!(" {n}={v}"));
            }
            if let Some(p) = prefix_len {
                s.push_str(&format!(" prefix={p}"));
            }
            s
        }
        Match::MethodNotAllowed { allow: m, .. } => format!(
            "405 {}",
            m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(",")
        ),
        Match::NotFound => "404".into(),
    }
}

#[test]
fn precedence_table() {
    let r = Router::new(vec![
        /*0*/ spec(&[], &["/*"], &[], 0),
        /*1*/ spec(&[], &["/users/{id}"], &[], 0),
        /*2*/ spec(&[], &["/users/me"], &[], 0),
        /*3*/ spec(&[], &["/users/*"], &[], 0),
        /*4*/ spec(&[], &["/users/{id}/posts/{post}"], &[], 0),
        /*5*/ spec(&[], &["/users/{id}/posts/latest"], &[], 0),
        /*6*/ spec(&[], &["~^/v[0-9]+/(?P<rest>.*)$"], &[], 0),
        /*7*/ spec(&["api.example.com"], &["/*"], &[], 0),
        /*8*/ spec(&["*.example.org"], &["/users/{id}"], &[], 0),
        /*9*/ spec(&[], &["/static/*"], &[], 0),
        /*10*/ spec(&[], &["/static/img/*"], &[], 0),
        /*11*/ spec(&[], &["/prio/*"], &[], 1),
        /*12*/ spec(&[], &["/prio/*"], &[], 5),
        /*13*/ spec(&[], &["/order"], &[], 0),
        /*14*/ spec(&[], &["/order"], &[], 0),
        /*15*/ spec(&[], &["/m"], &["GET"], 0),
        /*16*/ spec(&[], &["/m"], &["POST", "PUT"], 0),
    ])
    .unwrap();
    let cases = [
        (None, "/users/me", "GET", "2"),
        (None, "/users/42", "GET", "1 id=42"),
        (None, "/users/42/posts/latest", "GET", "5 id=42"),
        (None, "/users/42/posts/7", "GET", "4 id=42 post=7"),
        (None, "/users/42/x", "GET", "3 prefix=6"),
        (None, "/users", "GET", "3 prefix=6"),
        (None, "/users/", "GET", "3 prefix=6"),
        (None, "/v2/things", "GET", "0 prefix=0"),
        (None, "/static", "GET", "9 prefix=7"),
        (None, "/static/", "GET", "9 prefix=7"),
        (None, "/static/a.css", "GET", "9 prefix=7"),
        (None, "/staticfoo", "GET", "0 prefix=0"),
        (None, "/static/img/a.png", "GET", "10 prefix=11"),
        (Some("api.example.com"), "/users/me", "GET", "7 prefix=0"),
        (Some("a.example.org"), "/users/9", "GET", "8 id=9"),
        (Some("a.b.example.org"), "/users/9", "GET", "8 id=9"),
        (Some("example.org"), "/users/9", "GET", "1 id=9"),
        (Some("a.example.org"), "/users/me", "GET", "8 id=me"),
        (None, "/prio/x", "GET", "12 prefix=5"),
        (None, "/order", "GET", "13"),
        (None, "/m", "GET", "15"),
        (None, "/m", "PUT", "16"),
        (None, "/m", "DELETE", "0 prefix=0"),
    ];
    for (host, path, method, want) in cases {
        assert_eq!(
            find(&r, host, path, method),
            want,
            "{host:?} {method} {path}"
        );
    }
}

#[test]
fn regex_before_nothing_but_after_prefix() {
    let r = Router::new(vec![
        spec(&[], &["~^/v[0-9]+/(?P<rest>.*)$"], &[], 0),
        spec(&[], &["/v1/*"], &[], 0),
    ])
    .unwrap();
    assert_eq!(find(&r, None, "/v1/a", "GET"), "1 prefix=3");
    assert_eq!(find(&r, None, "/v2/a/b", "GET"), "0 rest=a/b");
    assert_eq!(find(&r, None, "/x", "GET"), "404");
}

#[test]
fn method_not_allowed_lists_methods() {
    let r = Router::new(vec![
        spec(&[], &["/m"], &["GET"], 0),
        spec(&[], &["/m"], &["POST", "GET"], 0),
    ])
    .unwrap();
    assert_eq!(find(&r, None, "/m", "DELETE"), "405 GET,POST");
    assert_eq!(find(&r, None, "/n", "DELETE"), "404");
}

#[test]
fn headers_must_match() {
    let mut a = spec(&[], &["/h"], &[], 0);
    a.headers.push((
        HeaderName::from_static("x-api-version"),
        HeaderValue::from_static("2"),
    ));
    let b = spec(&[], &["/h"], &[], 0);
    let r = Router::new(vec![a, b]).unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-api-version", HeaderValue::from_static("2"));
    assert!(matches!(
        r.route(None, "/h", &Method::GET, &h, &mut Params::default()),
        Match::Found { route: 0, .. }
    ));
    h.insert("x-api-version", HeaderValue::from_static("1"));
    assert!(matches!(
        r.route(None, "/h", &Method::GET, &h, &mut Params::default()),
        Match::Found { route: 1, .. }
    ));
}

#[test]
fn hosts_normalize() {
    assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
    assert_eq!(normalize_host("example.com."), "example.com");
    assert_eq!(normalize_host("[::1]:80"), "[::1]");
}
