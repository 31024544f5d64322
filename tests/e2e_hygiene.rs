//! End-to-end tests of the request-hygiene policies `ip-restriction` and `cors`: the
//! real `portico` binary between raw HTTP/1.1 clients and a real upstream.
//!
//! Covers: allow and deny lists (IPv4, IPv6 on a `[::1]` listener), deny over allow,
//! hygiene before the 405 and before the size limit; spoofed `X-Forwarded-For` and
//! `Forwarded` from an untrusted peer, honoured from a trusted one (right-most
//! untrusted address); CORS preflights answered by the gateway on a GET-only route
//! (never reaching the upstream), origins not allowed, wildcard patterns, credentials,
//! actual requests with `Vary: Origin`, `preflight_continue`; the chain order.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv6Addr, SocketAddr};
use std::path::Path;

use portico_test_support::{free_port, raw_http, Gateway, LocalGateway, RawResponse, Upstream};
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

/// Starts a gateway on `127.0.0.1` with `body` appended after the `listen`/`admin` keys.
async fn start(body: &str) -> LocalGateway {
    LocalGateway::start(bin(), body).await
}

/// `upstreams:` with one upstream `up` at `url`.
fn upstreams(url: &str) -> String {
    format!("upstreams:\n  up:\n    targets: [{{url: \"{url}\"}}]\n")
}

/// Sends one request on a new connection (`Connection: close`) and parses the answer.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> RawResponse {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    RawResponse::parse(&raw_http(addr, req.as_bytes()).await)
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    send(addr, "GET", path, headers, "").await
}

/// Asserts the standard JSON error with `status` and `code`; returns its message.
fn assert_error(r: &RawResponse, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "status of {r:?}");
    let body = r.json();
    let e = &body["error"];
    assert_eq!(e["status"], status, "error.status in {r:?}");
    assert_eq!(e["code"], code, "error.code in {r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "content type of {r:?}"
    );
    let rid = e["request_id"].as_str().unwrap_or("");
    assert!(!rid.is_empty(), "error.request_id in {r:?}");
    assert_eq!(r.header("x-request-id"), Some(rid), "X-Request-Id of {r:?}");
    e["message"].as_str().unwrap_or("").to_owned()
}

/// Asserts a 200 from the default upstream (its echo body names the path it got).
fn assert_proxied(r: &RawResponse, path: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-upstream"), Some("up"), "{r:?}");
    assert_eq!(r.json()["path"], path, "{r:?}");
}

/// Every `Access-Control-Allow-*` header of a response.
fn allow_headers(r: &RawResponse) -> Vec<&(String, String)> {
    r.headers
        .iter()
        .filter(|(k, _)| k.starts_with("access-control-allow-"))
        .collect()
}

/// Every `Vary` token of a response, lower-case.
fn vary(r: &RawResponse) -> Vec<String> {
    r.header_all("vary")
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect()
}

// ---------------------------------------------------------------------------------
// ip-restriction
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn ip_allow_and_deny_lists() {
    let up = Upstream::start("up").await;
    let env = start(&format!(
        "{}routes:
  - name: allowed
    paths: [\"/allowed\"]
    upstream: up
    plugins:
      ip-restriction: {{allow: [\"127.0.0.0/8\", \"::1\"]}}
  - name: not-in-allow
    paths: [\"/not-in-allow\"]
    upstream: up
    plugins:
      ip-restriction: {{allow: [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]}}
  - name: denied
    paths: [\"/denied\"]
    upstream: up
    plugins:
      ip-restriction: {{deny: [\"127.0.0.1\"]}}
  - name: deny-other
    paths: [\"/deny-other\"]
    upstream: up
    plugins:
      ip-restriction: {{deny: [\"192.0.2.0/24\", \"::1\"]}}
  - name: deny-wins
    paths: [\"/deny-wins\"]
    methods: [GET]
    upstream: up
    plugins:
      ip-restriction:
        allow: [\"127.0.0.0/8\"]
        deny: [\"127.0.0.1/32\"]
        message: \"not from here\"
      request-size-limit: {{max_body: 4}}
",
        upstreams(&up.url())
    ))
    .await;

    assert_proxied(&get(env.addr, "/allowed", &[]).await, "/allowed");
    assert_proxied(&get(env.addr, "/deny-other", &[]).await, "/deny-other");
    assert_eq!(up.hits(), 2);

    let msg = assert_error(&get(env.addr, "/not-in-allow", &[]).await, 403, "forbidden");
    assert_eq!(msg, "your IP address is not allowed here");
    assert_error(&get(env.addr, "/denied", &[]).await, 403, "forbidden");
    let msg = assert_error(&get(env.addr, "/deny-wins", &[]).await, 403, "forbidden");
    assert_eq!(msg, "not from here");
    // Request hygiene runs first: the refusal comes before the 405 of a method the
    // route does not take, and before the size limit (3950 > 3900).
    let r = send(env.addr, "POST", "/deny-wins", &[], "hello").await;
    assert_error(&r, 403, "forbidden");
    assert_eq!(r.header("allow"), None, "{r:?}");
    let r = send(env.addr, "GET", "/deny-wins", &[], "hello").await;
    assert_error(&r, 403, "forbidden");
    assert_eq!(up.hits(), 2, "refused requests never reach the upstream");

    // The chain shows both hygiene policies by priority.
    let a = get(env.admin, "/admin/routes/deny-wins", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let chain: Vec<(String, i64, String)> = a.json()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["priority"].as_i64().unwrap(),
                p["stage"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        chain,
        [
            ("ip-restriction".into(), 3950, "request hygiene".into()),
            ("request-size-limit".into(), 3900, "request hygiene".into()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ip_restriction_over_ipv6() {
    let up = Upstream::start("up").await;
    let v4 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = format!(
        "listen: [\"{v4}\", \"{v6}\"]\nadmin:\n  listen: \"{admin}\"\n{}routes:
  - name: v6-only
    paths: [\"/v6-only\"]
    upstream: up
    plugins:
      ip-restriction: {{allow: [\"::1/128\"]}}
  - name: no-v6
    paths: [\"/no-v6\"]
    upstream: up
    plugins:
      ip-restriction: {{deny: [\"::/0\"]}}
  - name: v6-ranges
    paths: [\"/v6-ranges\"]
    upstream: up
    plugins:
      ip-restriction: {{allow: [\"2001:db8::/32\", \"::/127\"], deny: [\"::/128\"]}}
",
        upstreams(&up.url())
    );
    let _gw = Gateway::start_async(bin(), &yaml, admin).await;

    assert_proxied(&get(v6, "/v6-only", &[]).await, "/v6-only");
    assert_error(&get(v4, "/v6-only", &[]).await, 403, "forbidden");
    assert_proxied(&get(v4, "/no-v6", &[]).await, "/no-v6");
    assert_error(&get(v6, "/no-v6", &[]).await, 403, "forbidden");
    // ::1 is in ::/127 and not in the denied ::/128.
    assert_proxied(&get(v6, "/v6-ranges", &[]).await, "/v6-ranges");
    assert_error(&get(v4, "/v6-ranges", &[]).await, 403, "forbidden");
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let up = Upstream::start("up").await;
    // No trusted proxies: 127.0.0.1 is an ordinary client.
    let env = start(&format!(
        "{}routes:
  - name: internal
    paths: [\"/internal\"]
    upstream: up
    plugins:
      ip-restriction: {{allow: [\"10.0.0.0/8\"]}}
  - name: blocklist
    paths: [\"/blocklist\"]
    upstream: up
    plugins:
      ip-restriction: {{deny: [\"127.0.0.1\"]}}
",
        upstreams(&up.url())
    ))
    .await;
    for spoof in [
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-for", "10.0.0.1, 10.0.0.2"),
        ("forwarded", "for=10.0.0.1"),
        ("x-real-ip", "10.0.0.1"),
    ] {
        let r = get(env.addr, "/internal", &[spoof]).await;
        assert_error(&r, 403, "forbidden");
        let r = get(env.addr, "/blocklist", &[spoof]).await;
        assert_error(&r, 403, "forbidden");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_from_a_trusted_proxy_is_honoured() {
    let up = Upstream::start("up").await;
    let env = start(&format!(
        "trusted_proxies: [\"127.0.0.1/32\"]\n{}routes:
  - name: internal
    paths: [\"/internal\"]
    upstream: up
    plugins:
      ip-restriction: {{allow: [\"10.0.0.0/8\"]}}
  - name: blocklist
    paths: [\"/blocklist\"]
    upstream: up
    plugins:
      ip-restriction: {{deny: [\"192.0.2.7\"]}}
",
        upstreams(&up.url())
    ))
    .await;
    // The proxy (127.0.0.1) says the client is 10.0.0.1.
    let r = get(env.addr, "/internal", &[("x-forwarded-for", "10.0.0.1")]).await;
    assert_proxied(&r, "/internal");
    let r = get(env.addr, "/internal", &[("forwarded", "for=10.0.0.1")]).await;
    assert_proxied(&r, "/internal");
    // A client at 192.0.2.7 that sent `X-Forwarded-For: 10.0.0.1` itself, through the
    // proxy (which appended the address it saw): the right-most untrusted address is
    // the real one.
    let r = get(
        env.addr,
        "/internal",
        &[("x-forwarded-for", "10.0.0.1, 192.0.2.7")],
    )
    .await;
    assert_error(&r, 403, "forbidden");
    let r = get(
        env.addr,
        "/blocklist",
        &[("x-forwarded-for", "10.0.0.1, 192.0.2.7")],
    )
    .await;
    assert_error(&r, 403, "forbidden");
    let r = get(
        env.addr,
        "/blocklist",
        &[("x-forwarded-for", "192.0.2.7, 10.0.0.1")],
    )
    .await;
    assert_proxied(&r, "/blocklist");
    // Without a header, the client is the proxy itself.
    assert_error(&get(env.addr, "/internal", &[]).await, 403, "forbidden");
    assert_eq!(up.hits(), 3);
}

// ---------------------------------------------------------------------------------
// cors
// ---------------------------------------------------------------------------------

const APP: &str = "https://app.example.com";

fn preflight_headers<'a>(origin: &'a str, method: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("origin", origin),
        ("access-control-request-method", method),
        ("access-control-request-headers", "content-type,x-token"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflights_are_answered_by_the_gateway() {
    let up = Upstream::start("up").await;
    let env = start(&format!(
        "{}routes:
  - name: api
    paths: [\"/api/*\"]
    methods: [GET]
    upstream: up
    plugins:
      cors:
        origins: [\"{APP}\", \"https://*.example.org\"]
        max_age: 10m
  - name: fixed
    paths: [\"/fixed\"]
    methods: [GET, POST]
    upstream: up
    plugins:
      cors:
        origins: [\"{APP}\"]
        methods: [GET, POST]
        headers: [Content-Type, X-Token]
  - name: plain
    paths: [\"/plain\"]
    methods: [GET]
    upstream: up
",
        upstreams(&up.url())
    ))
    .await;

    // A preflight on a GET-only route: 204 from the gateway, not 405.
    let r = send(
        env.addr,
        "OPTIONS",
        "/api/items",
        &preflight_headers(APP, "PUT"),
        "",
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type,x-token"),
        "reflected"
    );
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
    assert_eq!(
        vary(&r),
        [
            "origin",
            "access-control-request-method",
            "access-control-request-headers"
        ]
    );
    assert_eq!(r.header("allow"), None);
    assert!(r.body.is_empty(), "{r:?}");
    assert!(r.header("x-request-id").is_some(), "{r:?}");

    // A subdomain of the pattern.
    let origin = "https://shop.eu.example.org";
    let r = send(
        env.addr,
        "OPTIONS",
        "/api/x",
        &preflight_headers(origin, "DELETE"),
        "",
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some(origin));

    // Origins not allowed: a 204 without any Access-Control-Allow-* header.
    for origin in [
        "https://evil.example",
        "https://example.org",
        "https://example.org.evil.com",
        "https://evilexample.org",
        "http://app.example.com",
        "null",
    ] {
        let r = send(
            env.addr,
            "OPTIONS",
            "/api/items",
            &preflight_headers(origin, "PUT"),
            "",
        )
        .await;
        assert_eq!(r.status, 204, "{origin}: {r:?}");
        assert!(allow_headers(&r).is_empty(), "{origin}: {r:?}");
        assert_eq!(r.header("access-control-max-age"), None, "{origin}: {r:?}");
        assert!(vary(&r).contains(&"origin".to_string()), "{origin}: {r:?}");
    }

    // Configured methods and headers are listed, whatever was asked.
    let r = send(
        env.addr,
        "OPTIONS",
        "/fixed",
        &[
            ("origin", APP),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "x-other"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, POST"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type, x-token")
    );
    assert_eq!(r.header("access-control-max-age"), None);

    // None of these reached the upstream.
    assert_eq!(up.hits(), 0);

    // Not preflights: an OPTIONS without Access-Control-Request-Method, or without
    // Origin, is an ordinary request (405 here); so is a preflight on a route without
    // the policy.
    let r = send(env.addr, "OPTIONS", "/api/items", &[("origin", APP)], "").await;
    assert_error(&r, 405, "method_not_allowed");
    let r = send(
        env.addr,
        "OPTIONS",
        "/api/items",
        &[("access-control-request-method", "PUT")],
        "",
    )
    .await;
    assert_error(&r, 405, "method_not_allowed");
    let r = send(
        env.addr,
        "OPTIONS",
        "/plain",
        &preflight_headers(APP, "GET"),
        "",
    )
    .await;
    assert_error(&r, 405, "method_not_allowed");
    assert!(allow_headers(&r).is_empty(), "{r:?}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_actual_requests() {
    let up = Upstream::start("up").await;
    let dead_and_up = format!(
        "{}  dead:\n    targets: [{{url: \"http://127.0.0.1:{}\"}}]\n",
        upstreams(&up.url()),
        portico_test_support::free_port()
    );
    let env = start(&format!(
        "{}routes:
  - name: api
    paths: [\"/api/*\"]
    upstream: up
    plugins:
      cors:
        origins: [\"{APP}\", \"https://*.example.org\"]
        expose_headers: [X-Upstream, X-Request-Id]
  - name: public
    paths: [\"/public\"]
    upstream: up
    plugins:
      cors: {{origins: [\"*\"]}}
  - name: down
    paths: [\"/down\"]
    methods: [GET]
    upstream: dead
    plugins:
      cors:
        origins: [\"{APP}\"]
",
        dead_and_up
    ))
    .await;

    // The gateway's own error answers after routing carry the CORS headers too, so a
    // page of another origin can read them: a 502 (nothing listens) and a 405.
    let r = get(env.addr, "/down", &[("origin", APP)]).await;
    assert_error(&r, 502, "upstream_unavailable");
    assert_eq!(r.header("access-control-allow-origin"), Some(APP), "{r:?}");
    assert!(vary(&r).contains(&"origin".to_string()), "{r:?}");
    let r = send(env.addr, "DELETE", "/down", &[("origin", APP)], "").await;
    assert_error(&r, 405, "method_not_allowed");
    assert_eq!(r.header("access-control-allow-origin"), Some(APP), "{r:?}");

    let r = get(env.addr, "/api/a", &[("origin", APP)]).await;
    assert_proxied(&r, "/api/a");
    assert_eq!(r.header_all("access-control-allow-origin"), [APP]);
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("x-upstream, x-request-id")
    );
    assert_eq!(r.header("access-control-allow-credentials"), None);
    assert!(vary(&r).contains(&"origin".to_string()), "{r:?}");
    // The upstream saw the request with its Origin.
    assert_eq!(r.json()["headers"]["origin"], APP);

    let origin = "https://a.b.example.org";
    let r = get(env.addr, "/api/b", &[("origin", origin)]).await;
    assert_proxied(&r, "/api/b");
    assert_eq!(r.header("access-control-allow-origin"), Some(origin));

    // Not allowed: answered (the browser enforces), but without CORS headers.
    for origin in ["https://evil.example", "https://example.org.evil.com"] {
        let r = get(env.addr, "/api/c", &[("origin", origin)]).await;
        assert_proxied(&r, "/api/c");
        assert!(allow_headers(&r).is_empty(), "{origin}: {r:?}");
        assert_eq!(r.header("access-control-expose-headers"), None);
        assert!(vary(&r).contains(&"origin".to_string()), "{r:?}");
    }
    // No Origin: no CORS headers, but Vary: Origin for caches.
    let r = get(env.addr, "/api/d", &[]).await;
    assert_proxied(&r, "/api/d");
    assert!(allow_headers(&r).is_empty(), "{r:?}");
    assert_eq!(vary(&r), ["origin"]);

    // `*` without credentials: `*` for everyone, nothing varies.
    for h in [&[("origin", "https://x.example")][..], &[]] {
        let r = get(env.addr, "/public", h).await;
        assert_proxied(&r, "/public");
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
        assert!(vary(&r).is_empty(), "{r:?}");
    }
    assert_eq!(up.hits(), 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_credentials_echo_the_origin_never_star() {
    let up = Upstream::start("up").await;
    let env = start(&format!(
        "{}routes:
  - name: any
    paths: [\"/any\"]
    methods: [GET]
    upstream: up
    plugins:
      cors: {{origins: [\"*\"], credentials: true, methods: [\"*\"], headers: [\"*\"]}}
  - name: listed
    paths: [\"/listed\"]
    upstream: up
    plugins:
      cors: {{origins: [\"{APP}\"], credentials: true}}
",
        upstreams(&up.url())
    ))
    .await;
    let origin = "https://somewhere.example";
    let r = send(
        env.addr,
        "OPTIONS",
        "/any",
        &preflight_headers(origin, "PATCH"),
        "",
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    // `*` would be read literally with credentials: the request is echoed.
    assert_eq!(r.header("access-control-allow-methods"), Some("PATCH"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type,x-token")
    );
    for path in ["/any", "/listed"] {
        let o = if path == "/any" { origin } else { APP };
        let r = get(env.addr, path, &[("origin", o)]).await;
        assert_proxied(&r, path);
        assert_eq!(r.header_all("access-control-allow-origin"), [o], "{r:?}");
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        assert!(vary(&r).contains(&"origin".to_string()), "{r:?}");
        assert!(
            r.headers.iter().all(|(_, v)| v != "*"),
            "never `*` with credentials: {r:?}"
        );
    }
    // The listed policy does not echo others.
    let r = get(env.addr, "/listed", &[("origin", origin)]).await;
    assert!(allow_headers(&r).is_empty(), "{r:?}");
    // `null` (sandboxed pages) is never echoed, even for `*`.
    let r = get(env.addr, "/any", &[("origin", "null")]).await;
    assert!(allow_headers(&r).is_empty(), "{r:?}");
    assert_eq!(up.hits(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflight_continue_and_policy_order() {
    let up = Upstream::start("up").await;
    let env = start(&format!(
        "{}plugins:
  cors: {{origins: [\"{APP}\"], preflight_continue: true}}
routes:
  - name: passes-on
    paths: [\"/passes-on\"]
    methods: [GET, OPTIONS]
    upstream: up
  - name: guarded
    paths: [\"/guarded\"]
    methods: [GET]
    upstream: up
    plugins:
      cors: {{origins: [\"{APP}\"]}}
      ip-restriction: {{deny: [\"127.0.0.1\"]}}
",
        upstreams(&up.url())
    ))
    .await;
    // The upstream answers the preflight; the policy adds the origin.
    let r = send(
        env.addr,
        "OPTIONS",
        "/passes-on",
        &preflight_headers(APP, "PUT"),
        "",
    )
    .await;
    assert_proxied(&r, "/passes-on");
    assert_eq!(r.json()["method"], "OPTIONS");
    assert_eq!(r.header("access-control-allow-origin"), Some(APP));
    assert_eq!(r.header("access-control-allow-methods"), None);
    assert_eq!(up.hits(), 1);

    // ip-restriction (3950) runs before cors (3800): a refused client's preflight is
    // refused, not answered.
    let r = send(
        env.addr,
        "OPTIONS",
        "/guarded",
        &preflight_headers(APP, "GET"),
        "",
    )
    .await;
    assert_error(&r, 403, "forbidden");
    assert!(allow_headers(&r).is_empty(), "{r:?}");
    assert_eq!(up.hits(), 1);
    let body: Value = r.json();
    assert_eq!(body["error"]["code"], "forbidden");
}
