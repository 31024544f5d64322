//! End-to-end routing tests: the real `portico` binary in front of several named echo
//! upstreams, so the upstream that answers tells which route took the request.
//!
//! Covers: route precedence (host class, path class, priority, file order), `/*`
//! prefixes, `{param}` captures with `rewrite`, `strip_prefix`, header predicates,
//! methods (405 + `Allow`), the 404 `no_route` shape, path normalization against
//! bypass attempts (and what the upstream sees), bad escapes (400), and host matching
//! with ports and mixed case.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

use portico_test_support::{http_client, raw_http, Gateway, LocalGateway, RawResponse, Upstream};
use serde_json::Value;

/// A gateway plus the named upstreams it proxies to (one upstream per name; the
/// upstream name doubles as the `upstreams:` key in the config).
struct Env {
    gw: Gateway,
    addr: SocketAddr,
    _ups: Vec<Upstream>,
}

/// Starts one echo upstream per name and a gateway with `routes_yaml` (the text of the
/// `routes:` list, indented by two spaces) and an `upstreams:` section naming each one.
async fn start(names: &[&str], routes_yaml: &str) -> Env {
    let mut ups = Vec::new();
    for n in names {
        ups.push(Upstream::start(n).await);
    }
    let mut yaml = String::from("upstreams:\n");
    for u in &ups {
        yaml.push_str(&format!(
            "  {}:\n    targets: [{{url: \"{}\"}}]\n",
            u.name(),
            u.url()
        ));
    }
    yaml.push_str("routes:\n");
    yaml.push_str(routes_yaml);
    let LocalGateway { gw, addr, .. } =
        LocalGateway::start(Path::new(env!("CARGO_BIN_EXE_portico")), &yaml).await;
    Env {
        gw,
        addr,
        _ups: ups,
    }
}

/// What the client saw.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl From<RawResponse> for Answer {
    fn from(r: RawResponse) -> Answer {
        let body = r.json();
        Answer {
            status: r.status,
            headers: r.headers,
            body,
        }
    }
}

impl Answer {
    /// The first value of header `name` (lower-case).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The `x-upstream` header: which upstream answered.
    fn upstream(&self) -> &str {
        self.header("x-upstream").unwrap_or("<none>")
    }
    /// The path the upstream received.
    fn upstream_path(&self) -> &str {
        self.body["path"].as_str().unwrap_or("<none>")
    }
}

/// A request through reqwest with optional `Host` and extra headers.
async fn send(
    env: &Env,
    method: &str,
    path: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    let client = http_client();
    let url = format!("http://{}{path}", env.addr);
    let mut req = client.request(method.parse().unwrap(), &url);
    if let Some(h) = host {
        req = req.header("host", h);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    RawResponse::from_reqwest(req.send().await.unwrap())
        .await
        .into()
}

async fn get(env: &Env, path: &str) -> Answer {
    send(env, "GET", path, None, &[]).await
}

async fn get_host(env: &Env, host: &str, path: &str) -> Answer {
    send(env, "GET", path, Some(host), &[]).await
}

/// Sends `GET <target>` verbatim over a fresh connection (no client-side path
/// normalization) and parses the answer.
async fn raw_get(env: &Env, target: &str) -> Answer {
    let req = format!("GET {target} HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n");
    parse_response(&raw_http(env.addr, req.as_bytes()).await)
}

/// Parses one HTTP/1.1 response (Content-Length, chunked or until close).
fn parse_response(raw: &str) -> Answer {
    RawResponse::parse(raw).into()
}

/// Asserts the standard error shape and that `request_id` equals `X-Request-Id`.
fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "status of {a:?}");
    let e = &a.body["error"];
    assert_eq!(e["status"], status, "error.status in {a:?}");
    assert_eq!(e["code"], code, "error.code in {a:?}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message in {a:?}"
    );
    let rid = e["request_id"].as_str().unwrap_or("");
    assert!(!rid.is_empty(), "error.request_id in {a:?}");
    assert_eq!(
        a.header("x-request-id"),
        Some(rid),
        "X-Request-Id header matches error.request_id in {a:?}"
    );
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "JSON content type in {a:?}"
    );
    let keys: Vec<&String> = a.body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["error"], "only `error` at the top level of {a:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_precedence_exact_then_wildcard_then_none() {
    let env = start(
        &["exact_host", "wild_host", "deep_wild", "any_host", "only_p"],
        r#"  - name: any_host
    paths: ["/*", "/hostcheck"]
    upstream: any_host
  - name: wild_host
    hosts: ["*.example.com"]
    paths: ["/*"]
    upstream: wild_host
  - name: deep_wild
    hosts: ["*.deep.example.com"]
    paths: ["/*"]
    upstream: deep_wild
  - name: exact_host
    hosts: ["api.example.com"]
    paths: ["/*"]
    upstream: exact_host
  - name: only_p
    hosts: ["partial.example.com"]
    paths: ["/p"]
    upstream: only_p
"#,
    )
    .await;

    // Exact host beats wildcard and host-less routes, even when the host-less route
    // has a more specific (exact) path.
    assert_eq!(
        get_host(&env, "api.example.com", "/hostcheck")
            .await
            .upstream(),
        "exact_host"
    );
    assert_eq!(
        get_host(&env, "api.example.com", "/x/y").await.upstream(),
        "exact_host"
    );
    // Port and case do not matter for host matching.
    assert_eq!(
        get_host(&env, "API.Example.com:8080", "/x")
            .await
            .upstream(),
        "exact_host"
    );
    // A trailing dot (fully qualified name) is the same host.
    assert_eq!(
        get_host(&env, "api.example.com.", "/x").await.upstream(),
        "exact_host"
    );
    // Wildcards: one or more labels; the longer suffix wins.
    assert_eq!(
        get_host(&env, "www.example.com", "/hostcheck")
            .await
            .upstream(),
        "wild_host"
    );
    assert_eq!(
        get_host(&env, "a.b.example.com", "/x").await.upstream(),
        "wild_host"
    );
    assert_eq!(
        get_host(&env, "x.deep.example.com", "/x").await.upstream(),
        "deep_wild"
    );
    assert_eq!(
        get_host(&env, "WWW.EXAMPLE.COM:1", "/x").await.upstream(),
        "wild_host"
    );
    // The bare domain is not matched by `*.example.com`.
    assert_eq!(
        get_host(&env, "example.com", "/x").await.upstream(),
        "any_host"
    );
    assert_eq!(
        get_host(&env, "other.org", "/hostcheck").await.upstream(),
        "any_host"
    );
    assert_eq!(
        get_host(&env, "notexample.com", "/x").await.upstream(),
        "any_host"
    );
    // An exact-host route whose path does not match falls through to the wildcard.
    assert_eq!(
        get_host(&env, "partial.example.com", "/p").await.upstream(),
        "only_p"
    );
    assert_eq!(
        get_host(&env, "partial.example.com", "/q").await.upstream(),
        "wild_host"
    );

    // Absolute-form request target: the host comes from the target.
    let raw = raw_http(
        env.addr,
        b"GET http://api.example.com/abs HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    let a = parse_response(&raw);
    assert_eq!(a.upstream(), "exact_host", "{a:?}");
    assert_eq!(a.upstream_path(), "/abs");
    drop(env.gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn path_precedence_priority_and_file_order() {
    let env = start(
        &[
            "exact",
            "param",
            "param_lit",
            "param_gen",
            "prefix_short",
            "prefix_long",
            "regex",
            "regex_users",
            "prio_low",
            "prio_high",
            "first",
            "second",
            "static",
        ],
        r#"  - name: regex_users
    paths: ["~^/users/"]
    upstream: regex_users
  - name: prefix_short
    paths: ["/users/*"]
    priority: 100
    upstream: prefix_short
  - name: param_gen
    paths: ["/{kind}/{id}/profile"]
    priority: 50
    upstream: param_gen
  - name: param
    paths: ["/users/{id}"]
    upstream: param
  - name: param_lit
    paths: ["/users/{id}/profile"]
    upstream: param_lit
  - name: prefix_long
    paths: ["/users/admin/*"]
    upstream: prefix_long
  - name: exact
    paths: ["/users/me"]
    upstream: exact
  - name: regex
    paths: ["~^/v(?P<ver>[0-9]+)/"]
    rewrite: "/version/{ver}"
    upstream: regex
  - name: prio_low
    paths: ["/prio"]
    upstream: prio_low
  - name: prio_high
    paths: ["/prio"]
    priority: 5
    upstream: prio_high
  - name: first
    paths: ["/order"]
    upstream: first
  - name: second
    paths: ["/order"]
    upstream: second
  - name: static
    paths: ["/static/*"]
    upstream: static
"#,
    )
    .await;

    let cases = [
        // exact > {param} > prefix > regex, whatever the file order and priority
        ("/users/me", "exact"),
        ("/users/42", "param"),
        // more literal segments first (despite the other's priority and file order)
        ("/users/42/profile", "param_lit"),
        ("/groups/42/profile", "param_gen"),
        // longer prefix first; prefix beats regex
        ("/users/admin/x", "prefix_long"),
        // `/users/{id}` (a {param} route) beats the `/users/admin/*` prefix
        ("/users/admin", "param"),
        ("/users/42/a/b", "prefix_short"),
        ("/users/", "prefix_short"),
        ("/users", "prefix_short"),
        // regex only when nothing else matches
        ("/v2/anything", "regex"),
        // priority, then file order
        ("/prio", "prio_high"),
        ("/order", "first"),
        // `/static/*` matches itself, with a trailing slash and below
        ("/static", "static"),
        ("/static/", "static"),
        ("/static/css/site.css", "static"),
    ];
    for (path, want) in cases {
        let a = get(&env, path).await;
        assert_eq!(a.status, 200, "{path}: {a:?}");
        assert_eq!(a.upstream(), want, "{path} routed to {}", a.upstream());
        if want != "regex" {
            assert_eq!(
                a.upstream_path(),
                path,
                "path forwarded unchanged for {path}"
            );
        }
    }
    // Regex named groups are params usable in `rewrite`; the query is kept.
    let a = get(&env, "/v7/x?q=1").await;
    assert_eq!(a.upstream(), "regex");
    assert_eq!(a.upstream_path(), "/version/7");
    assert_eq!(a.body["query"], "q=1");

    // `/staticfoo` is not under `/static/*`: nothing matches → 404 no_route.
    for path in ["/staticfoo", "/static.css", "/nothing/here", "/"] {
        let a = get(&env, path).await;
        assert_error(&a, 404, "no_route");
    }
    drop(env.gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn params_rewrite_and_strip_prefix() {
    let env = start(
        &["users", "strip", "keep", "multi"],
        r#"  - name: users
    paths: ["/users/{id}"]
    rewrite: "/v2/users/{id}"
    upstream: users
  - name: multi
    paths: ["/orgs/{org}/repos/{repo}"]
    rewrite: "/r/{repo}/o/{org}"
    upstream: multi
  - name: strip
    paths: ["/api/*"]
    strip_prefix: true
    upstream: strip
  - name: keep
    paths: ["/keep/*"]
    upstream: keep
"#,
    )
    .await;

    let a = get(&env, "/users/42?a=1&b=x%20y").await;
    assert_eq!(a.upstream(), "users");
    assert_eq!(a.upstream_path(), "/v2/users/42");
    assert_eq!(a.body["query"], "a=1&b=x%20y");

    let a = get(&env, "/orgs/acme/repos/portico").await;
    assert_eq!(a.upstream(), "multi");
    assert_eq!(a.upstream_path(), "/r/portico/o/acme");

    // `{id}` matches one non-empty segment only.
    assert_error(&get(&env, "/users/").await, 404, "no_route");
    assert_error(&get(&env, "/users/1/2").await, 404, "no_route");

    for (path, want, query) in [
        ("/api/foo/bar?q=1", "/foo/bar", Some("q=1")),
        ("/api/foo", "/foo", None),
        ("/api/", "/", None),
        ("/api", "/", None),
    ] {
        let a = get(&env, path).await;
        assert_eq!(a.upstream(), "strip", "{path}");
        assert_eq!(a.upstream_path(), want, "{path}");
        assert_eq!(a.body["query"].as_str(), query, "{path}");
    }
    // `/apifoo` is not under `/api/*`.
    assert_error(&get(&env, "/apifoo").await, 404, "no_route");

    let a = get(&env, "/keep/x/y").await;
    assert_eq!(a.upstream(), "keep");
    assert_eq!(a.upstream_path(), "/keep/x/y");
    drop(env.gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn header_predicates_methods_and_error_shapes() {
    let env = start(
        &["v2", "v1", "m_read", "m_put", "honly"],
        r#"  - name: v2
    paths: ["/hdr"]
    headers: {x-api-version: "2"}
    upstream: v2
  - name: v1
    paths: ["/hdr"]
    upstream: v1
  - name: m_read
    paths: ["/m"]
    methods: [GET, POST]
    upstream: m_read
  - name: m_put
    paths: ["/m"]
    methods: [PUT]
    upstream: m_put
  - name: honly
    paths: ["/honly"]
    headers: {x-key: "yes", x-num: 7}
    upstream: honly
"#,
    )
    .await;

    // Header predicates: exact value match; a mismatch skips the route.
    let a = send(&env, "GET", "/hdr", None, &[("x-api-version", "2")]).await;
    assert_eq!(a.upstream(), "v2");
    let a = send(&env, "GET", "/hdr", None, &[("x-api-version", "3")]).await;
    assert_eq!(a.upstream(), "v1");
    let a = send(&env, "GET", "/hdr", None, &[("X-API-Version", "2")]).await;
    assert_eq!(a.upstream(), "v2", "header names are case-insensitive");
    assert_eq!(get(&env, "/hdr").await.upstream(), "v1");

    let a = send(
        &env,
        "GET",
        "/honly",
        None,
        &[("x-key", "yes"), ("x-num", "7")],
    )
    .await;
    assert_eq!(a.upstream(), "honly");
    let a = send(&env, "GET", "/honly", None, &[("x-key", "yes")]).await;
    assert_error(&a, 404, "no_route");
    let a = send(
        &env,
        "GET",
        "/honly",
        None,
        &[("x-key", "YES"), ("x-num", "7")],
    )
    .await;
    assert_error(&a, 404, "no_route");

    // Methods.
    assert_eq!(
        send(&env, "GET", "/m", None, &[]).await.upstream(),
        "m_read"
    );
    assert_eq!(
        send(&env, "POST", "/m", None, &[]).await.upstream(),
        "m_read"
    );
    let a = send(&env, "PUT", "/m", None, &[]).await;
    assert_eq!(a.upstream(), "m_put");
    assert_eq!(a.body["method"], "PUT");
    for method in ["DELETE", "PATCH"] {
        let a = send(&env, method, "/m", None, &[]).await;
        assert_error(&a, 405, "method_not_allowed");
        let mut allow: Vec<String> = a
            .header("allow")
            .unwrap_or_else(|| panic!("Allow header in {a:?}"))
            .split(',')
            .map(|m| m.trim().to_owned())
            .collect();
        allow.sort();
        assert_eq!(allow, ["GET", "POST", "PUT"], "{a:?}");
    }

    // 404 shape; the request id is generated when absent and echoed when given.
    let a = get(&env, "/nope").await;
    assert_error(&a, 404, "no_route");
    let a = send(
        &env,
        "GET",
        "/nope",
        None,
        &[("x-request-id", "my-req-123")],
    )
    .await;
    assert_error(&a, 404, "no_route");
    assert_eq!(a.body["error"]["request_id"], "my-req-123");
    let a = send(&env, "DELETE", "/m", None, &[("x-request-id", "req-405")]).await;
    assert_eq!(a.body["error"]["request_id"], "req-405");
    drop(env.gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn normalization_cannot_bypass_prefix_rules() {
    let env = start(
        &["admin", "catchall"],
        r#"  - name: admin
    paths: ["/admin/*"]
    upstream: admin
  - name: catchall
    paths: ["/*"]
    upstream: catchall
"#,
    )
    .await;

    // (request target, route that must answer, path the upstream must see, query)
    let cases = [
        ("/admin/x", "admin", "/admin/x"),
        ("/admin", "admin", "/admin"),
        ("/%61dmin/x", "admin", "/admin/x"),
        ("/%61%64%6D%69%6E/x", "admin", "/admin/x"),
        ("/x/../admin/x", "admin", "/admin/x"),
        ("/x/%2e%2e/admin/x", "admin", "/admin/x"),
        ("/x/%2E%2E/admin/x", "admin", "/admin/x"),
        ("//admin/x", "admin", "/admin/x"),
        ("///admin//x", "admin", "/admin/x"),
        ("/./admin/./x", "admin", "/admin/x"),
        ("/admin/x/..", "admin", "/admin/"),
        ("/admin/%7euser", "admin", "/admin/~user"),
        // leaving /admin with dot segments lands outside it, and that is what is forwarded
        ("/admin/%2e%2e/x", "catchall", "/x"),
        ("/admin/../x", "catchall", "/x"),
        ("/../../admin/x", "admin", "/admin/x"),
        // an encoded slash stays encoded (hex upper-cased): not a path separator
        ("/admin%2Fx", "catchall", "/admin%2Fx"),
        ("/admin%2fx", "catchall", "/admin%2Fx"),
        // no double decoding
        ("/%2561dmin/x", "catchall", "/%2561dmin/x"),
        // paths are case-sensitive
        ("/ADMIN/x", "catchall", "/ADMIN/x"),
        ("/%41dmin/x", "catchall", "/Admin/x"),
        ("/adminx", "catchall", "/adminx"),
    ];
    for (target, route, path) in cases {
        let a = raw_get(&env, target).await;
        assert_eq!(a.status, 200, "{target}: {a:?}");
        assert_eq!(a.upstream(), route, "{target} routed to {}", a.upstream());
        assert_eq!(a.upstream_path(), path, "{target}: path seen upstream");
    }
    // The query is forwarded raw (not normalized).
    let a = raw_get(&env, "/%61dmin/x?a=%2e%2e/b&c=%41").await;
    assert_eq!(a.upstream(), "admin");
    assert_eq!(a.upstream_path(), "/admin/x");
    assert_eq!(a.body["query"], "a=%2e%2e/b&c=%41");

    // Bad escapes are rejected before routing.
    for target in ["/a%zz", "/admin/%", "/admin/%2", "/%g1dmin/x"] {
        let a = raw_get(&env, target).await;
        assert_error(&a, 400, "bad_request");
    }
    drop(env.gw);
}

/// Request hygiene runs before the method check: a route that only allows GET still
/// applies its size limit to a POST (413), and only then answers 405.
#[tokio::test(flavor = "multi_thread")]
async fn request_hygiene_runs_before_the_method_check() {
    let env = start(
        &["a"],
        "  - name: r\n    paths: [\"/only-get\"]\n    methods: [GET]\n    upstream: a\n    plugins:\n      request-size-limit: {max_body: 10}\n",
    )
    .await;
    let client = http_client();
    let url = format!("http://{}/only-get", env.addr);
    let big = client
        .post(&url)
        .body("x".repeat(100))
        .send()
        .await
        .unwrap();
    let status = big.status().as_u16();
    let body: Value = big.json().await.unwrap();
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    let small = send(&env, "POST", "/only-get", None, &[]).await;
    assert_error(&small, 405, "method_not_allowed");
    assert_eq!(small.header("allow"), Some("GET"));
    assert_eq!(get(&env, "/only-get").await.status, 200);
}
