//! End-to-end tests of the `request-validation` policy: the real `portico` binary
//! between HTTP clients (raw HTTP/1.1, reqwest with streamed bodies, h2c) and a real
//! echo upstream.
//!
//! Covers: a valid body reaches the upstream byte for byte (with `Content-Length`, also
//! when the client streamed it chunked); violations answered 400 `validation_failed`
//! with every JSON pointer; malformed JSON (400 with line and column); bodies over
//! `max_body` announced by `Content-Length` or discovered while streaming (413); query
//! and header schemas (with the query's integer conversion); other media types (415);
//! a missing body; an invalid schema refused by `portico validate` with its key path;
//! the chain position. Refused requests never reach the upstream.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use portico_test_support::{
    h2c_client, http_client, raw_http, LocalGateway, RawResponse, Upstream,
};
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

/// The routes of most tests, for an upstream at `url`.
fn config(url: &str) -> String {
    format!(
        r#"upstreams:
  up:
    targets: [{{url: "{url}"}}]
routes:
  - name: orders
    paths: ["/orders"]
    methods: [POST]
    upstream: up
    plugins:
      request-validation:
        max_body: 2KiB
        body:
          type: object
          required: [customer, items]
          additionalProperties: false
          properties:
            customer: {{type: string, minLength: 1}}
            note: {{type: string}}
            items:
              type: array
              minItems: 1
              items:
                type: object
                required: [sku, price]
                properties:
                  sku: {{type: string, pattern: "^[A-Z]{{3}}-[0-9]+$"}}
                  price: {{type: number, minimum: 0}}
  - name: search
    paths: ["/search"]
    upstream: up
    plugins:
      request-validation:
        query:
          type: object
          required: [q]
          properties:
            q: {{type: string, minLength: 1}}
            page: {{type: integer, minimum: 1}}
            sort: {{enum: [asc, desc]}}
        headers:
          type: object
          required: [x-api-version]
          properties:
            x-api-version: {{enum: ["1", "2"]}}
  - name: patch
    paths: ["/patch"]
    upstream: up
    plugins:
      request-validation:
        body_required: false
        content_types: [application/merge-patch+json]
        body: {{type: object, maxProperties: 2}}
"#
    )
}

async fn start() -> (Upstream, LocalGateway) {
    let up = Upstream::start("up").await;
    let gw = LocalGateway::start(bin(), &config(&up.url())).await;
    (up, gw)
}

/// Sends one request on a new connection (`Connection: close`) with a
/// `Content-Length` body, and parses the answer.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> RawResponse {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    RawResponse::parse(&raw_http(addr, req.as_bytes()).await)
}

async fn post_json(addr: SocketAddr, path: &str, body: &str) -> RawResponse {
    send(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        Some(body),
    )
    .await
}

/// Asserts the standard JSON error with `status` and `code`; returns the `error` object.
fn assert_error(r: &RawResponse, status: u16, code: &str) -> Value {
    assert_eq!(r.status, status, "status of {r:?}");
    let body = r.json();
    let e = &body["error"];
    assert_eq!(e["status"], status, "error.status in {r:?}");
    assert_eq!(e["code"], code, "error.code in {r:?}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message in {r:?}"
    );
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let rid = e["request_id"].as_str().unwrap_or("");
    assert!(!rid.is_empty(), "error.request_id in {r:?}");
    assert_eq!(r.header("x-request-id"), Some(rid), "X-Request-Id of {r:?}");
    e.clone()
}

/// `(in, pointer, keyword)` of every violation of a `validation_failed` answer.
fn violations(r: &RawResponse) -> BTreeSet<(String, String, String)> {
    let e = assert_error(r, 400, "validation_failed");
    e["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("no violations in {r:?}"))
        .iter()
        .map(|v| {
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            (
                v["in"].as_str().unwrap().to_owned(),
                v["pointer"].as_str().unwrap().to_owned(),
                v["keyword"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn set(v: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    v.iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

/// A body in pieces, sent chunked by reqwest (no `Content-Length`).
fn chunked(pieces: Vec<String>) -> reqwest::Body {
    reqwest::Body::wrap_stream(futures_util::stream::iter(
        pieces
            .into_iter()
            .map(|p| Ok::<_, std::io::Error>(p.into_bytes())),
    ))
}

const VALID: &str = "{ \"customer\" : \"Zoë\",\n  \"items\": [ {\"sku\": \"ABC-1\", \"price\": 9.50}, {\"price\": 0, \"sku\": \"XYZ-22\"} ],\n  \"note\": \"\\u00e9t\\u00e9\" }\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_body_reaches_the_upstream_unchanged() {
    let (up, env) = start().await;

    // With Content-Length: the upstream gets the very same bytes and length.
    let r = post_json(env.addr, "/orders", VALID).await;
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json();
    assert_eq!(echo["body"], VALID, "{echo}");
    assert_eq!(echo["body_len"], VALID.len(), "{echo}");
    assert_eq!(
        echo["headers"]["content-length"],
        VALID.len().to_string(),
        "{echo}"
    );

    // Streamed in small chunks: validated whole, then sent with a Content-Length.
    let pieces: Vec<String> = VALID
        .as_bytes()
        .chunks(7)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    assert_eq!(pieces.concat(), VALID, "split on character boundaries");
    let resp = http_client()
        .post(format!("http://{}/orders", env.addr))
        .header("content-type", "application/json; charset=utf-8")
        .body(chunked(pieces))
        .send()
        .await
        .unwrap();
    let r = RawResponse::from_reqwest(resp).await;
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json();
    assert_eq!(echo["body"], VALID, "{echo}");
    assert_eq!(
        echo["headers"]["content-length"],
        VALID.len().to_string(),
        "{echo}"
    );
    assert!(echo["headers"].get("transfer-encoding").is_none(), "{echo}");

    // HTTP/2 (h2c) bodies too; a `+json` media type is JSON.
    let resp = h2c_client()
        .post(format!("http://{}/orders", env.addr))
        .header("content-type", "application/vnd.orders+json")
        .body(VALID)
        .send()
        .await
        .unwrap();
    let r = RawResponse::from_reqwest(resp).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body"], VALID, "{r:?}");
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn violations_list_every_json_pointer() {
    let (up, env) = start().await;
    let bad = json!({
        "items": [
            {"sku": "abc-1", "price": -1},
            {"sku": "ABC-2"},
            {"sku": "ABC-3", "price": "free"},
        ],
        "coupon": "SECRET-COUPON-42",
    })
    .to_string();
    let r = post_json(env.addr, "/orders", &bad).await;
    assert_eq!(
        violations(&r),
        set(&[
            ("body", "", "required"),
            ("body", "", "additionalProperties"),
            ("body", "/items/0/sku", "pattern"),
            ("body", "/items/0/price", "minimum"),
            ("body", "/items/1", "required"),
            ("body", "/items/2/price", "type"),
        ]),
        "{r:?}"
    );
    let e = r.json();
    assert_eq!(
        e["error"]["message"], "the request does not match its schema: 6 violations",
        "{e}"
    );
    // Which properties are missing or unexpected is said; the request's values are not.
    let text = e.to_string();
    assert!(text.contains("customer"), "{text}");
    assert!(text.contains("coupon"), "{text}");
    assert!(!text.contains("SECRET-COUPON-42"), "{text}");
    assert!(!text.contains("free"), "{text}");

    // The wrong top-level type is one violation.
    let r = post_json(env.addr, "/orders", "[1, 2]").await;
    assert_eq!(violations(&r), set(&[("body", "", "type")]), "{r:?}");
    assert_eq!(up.hits(), 0, "refused requests never reach the upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_a_bad_request_with_its_position() {
    let (up, env) = start().await;
    let r = post_json(
        env.addr,
        "/orders",
        "{\"customer\": \"a\",\n \"items\": [1,]}",
    )
    .await;
    let e = assert_error(&r, 400, "bad_request");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.starts_with("the request body is not valid JSON: "),
        "{msg}"
    );
    assert!(msg.contains("line 2 column 14"), "{msg}");
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(2), Some(14)),
        "{e}"
    );

    // The same key twice is refused: parsers disagree on which one counts.
    let r = post_json(
        env.addr,
        "/orders",
        r#"{"customer": "a", "items": [{"sku": "ABC-1", "price": 1}], "customer": ""}"#,
    )
    .await;
    let e = assert_error(&r, 400, "bad_request");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("duplicate key `customer`"),
        "{e}"
    );

    // Cut short, and not JSON at all.
    let r = post_json(env.addr, "/orders", "{\"customer\": ").await;
    assert!(assert_error(&r, 400, "bad_request")["message"]
        .as_str()
        .unwrap()
        .contains("EOF"));
    let r = post_json(env.addr, "/orders", "customer=a").await;
    assert_error(&r, 400, "bad_request");

    // No body at all: required by default.
    let r = send(
        env.addr,
        "POST",
        "/orders",
        &[("Content-Type", "application/json")],
        None,
    )
    .await;
    let e = assert_error(&r, 400, "bad_request");
    assert_eq!(e["message"], "a JSON body is required");
    let r = post_json(env.addr, "/orders", "").await;
    assert_error(&r, 400, "bad_request");
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_max_body_are_413() {
    let (up, env) = start().await;
    // Valid JSON, but 4 KiB > 2 KiB: refused up front on its Content-Length.
    let big =
        json!({"customer": "x".repeat(4096), "items": [{"sku": "ABC-1", "price": 1}]}).to_string();
    let r = post_json(env.addr, "/orders", &big).await;
    let e = assert_error(&r, 413, "payload_too_large");
    assert!(e["message"].as_str().unwrap().contains("2048 bytes"), "{e}");

    // Streamed (chunked): refused once the body turns out larger, never passed on.
    let mut pieces = vec![r#"{"customer": ""#.to_string()];
    pieces.extend((0..16).map(|_| "y".repeat(512)));
    pieces.push(r#"", "items": [{"sku": "ABC-1", "price": 1}]}"#.to_string());
    let r = http_client()
        .post(format!("http://{}/orders", env.addr))
        .header("content-type", "application/json")
        .body(chunked(pieces.clone()))
        .send()
        .await;
    match r {
        Ok(r) => {
            let e = assert_error(
                &RawResponse::from_reqwest(r).await,
                413,
                "payload_too_large",
            );
            assert_eq!(
                e["message"],
                "the request body is larger than the 2048 bytes that are validated"
            );
        }
        Err(e) => panic!("the client saw no 413 but an error: {e:?}"),
    }
    // A large streamed body: the client still receives the 413 (the rest of its body
    // is read and discarded), not a connection reset.
    let r = http_client()
        .post(format!("http://{}/orders", env.addr))
        .header("content-type", "application/json")
        .body(chunked((0..64).map(|_| "z".repeat(64 * 1024)).collect()))
        .send()
        .await;
    match r {
        Ok(r) => {
            assert_error(
                &RawResponse::from_reqwest(r).await,
                413,
                "payload_too_large",
            );
        }
        Err(e) => panic!("the client saw no 413 but an error: {e:?}"),
    }
    // The same over HTTP/2.
    let r = h2c_client()
        .post(format!("http://{}/orders", env.addr))
        .header("content-type", "application/json")
        .body(chunked(pieces))
        .send()
        .await
        .unwrap();
    assert_error(
        &RawResponse::from_reqwest(r).await,
        413,
        "payload_too_large",
    );

    // Just under the limit passes.
    let fits =
        json!({"customer": "x".repeat(1900), "items": [{"sku": "ABC-1", "price": 1}]}).to_string();
    assert!(fits.len() < 2048);
    let r = post_json(env.addr, "/orders", &fits).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body_len"], fits.len());
    assert_eq!(up.hits(), 1, "only the body that fits reached the upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn query_and_header_schemas() {
    let (up, env) = start().await;
    let v2 = [("X-Api-Version", "2")];

    // Valid: `page` is converted to an integer for `type: integer`.
    let r = send(
        env.addr,
        "GET",
        "/search?q=shoes&page=3&sort=asc",
        &v2,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["query"],
        "q=shoes&page=3&sort=asc",
        "the query goes on unchanged"
    );
    // Percent-encoded values are decoded before validation.
    let r = send(
        env.addr,
        "GET",
        "/search?q=red%20shoes&sort=%64esc",
        &v2,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    // Query violations.
    let r = send(env.addr, "GET", "/search?q=&page=0&sort=up", &v2, None).await;
    assert_eq!(
        violations(&r),
        set(&[
            ("query", "/q", "minLength"),
            ("query", "/page", "minimum"),
            ("query", "/sort", "enum"),
        ]),
        "{r:?}"
    );
    let r = send(env.addr, "GET", "/search?page=two", &v2, None).await;
    assert_eq!(
        violations(&r),
        set(&[("query", "", "required"), ("query", "/page", "type")]),
        "{r:?}"
    );
    // A repeated parameter is an array, not an integer.
    let r = send(env.addr, "GET", "/search?q=a&page=1&page=2", &v2, None).await;
    assert_eq!(violations(&r), set(&[("query", "/page", "type")]), "{r:?}");

    // Header violations (names are matched in lower case), reported with the query's.
    let r = send(env.addr, "GET", "/search?q=a", &[], None).await;
    assert_eq!(violations(&r), set(&[("headers", "", "required")]), "{r:?}");
    let r = send(
        env.addr,
        "GET",
        "/search?page=0",
        &[("x-API-version", "3")],
        None,
    )
    .await;
    assert_eq!(
        violations(&r),
        set(&[
            ("headers", "/x-api-version", "enum"),
            ("query", "", "required"),
            ("query", "/page", "minimum"),
        ]),
        "{r:?}"
    );
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn other_media_types_are_415() {
    let (up, env) = start().await;
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonp"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = ct.map(|c| ("Content-Type", c)).into_iter().collect();
        let r = send(env.addr, "POST", "/orders", &headers, Some(VALID)).await;
        let e = assert_error(&r, 415, "unsupported_media_type");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("application/json"), "{msg}");
        if let Some(ct) = ct {
            assert!(msg.contains(ct), "{msg}");
        }
    }

    // `content_types` replaces the default list; `body_required: false` lets requests
    // without a body through.
    let mp = [("Content-Type", "application/merge-patch+json")];
    let r = send(env.addr, "PATCH", "/patch", &mp, Some(r#"{"a": null}"#)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body"], r#"{"a": null}"#);
    let r = send(
        env.addr,
        "PATCH",
        "/patch",
        &mp,
        Some(r#"{"a": 1, "b": 2, "c": 3}"#),
    )
    .await;
    assert_eq!(
        violations(&r),
        set(&[("body", "", "maxProperties")]),
        "{r:?}"
    );
    let r = post_json(env.addr, "/patch", "{}").await;
    assert_error(&r, 415, "unsupported_media_type");
    let r = send(env.addr, "GET", "/patch", &[], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_position() {
    let (_up, env) = start().await;
    let a = send(env.admin, "GET", "/admin/routes/orders", &[], None).await;
    assert_eq!(a.status, 200, "{a:?}");
    let chain = a.json()["plugins"].clone();
    assert_eq!(chain[0]["name"], "request-validation", "{chain}");
    assert_eq!(chain[0]["priority"], 1000, "{chain}");
    assert_eq!(chain[0]["stage"], "request validation", "{chain}");
}

/// Runs `portico validate FILE` on `yaml`; returns the exit code and stderr.
fn validate(name: &str, yaml: &str) -> (Option<i32>, String, String) {
    let dir = std::env::temp_dir().join(format!("portico-validation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    let mut child = Command::new(bin())
        .arg("validate")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "validate hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&file);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        file.display().to_string(),
    )
}

#[test]
fn invalid_schemas_are_configuration_errors_with_their_path() {
    let yaml = r#"upstreams:
  up:
    targets: [{url: "http://127.0.0.1:9"}]
routes:
  - name: orders
    paths: ["/orders"]
    upstream: up
    plugins:
      request-validation:
        body:
          type: object
          properties:
            price: {type: nmber}
        query:
          properties:
            q: {type: string, pattern: "(?<!x)y"}
        content_types: [json]
"#;
    let (code, stderr, file) = validate("bad.yaml", yaml);
    assert_eq!(code, Some(1), "{stderr}");
    for (line, col, path, msg) in [
        (
            13,
            27,
            "routes[0].plugins.request-validation.body.properties.price.type",
            "invalid JSON Schema: \"nmber\" is not valid",
        ),
        (
            16,
            40,
            "routes[0].plugins.request-validation.query.properties.q.pattern",
            "no look-around",
        ),
        (
            17,
            25,
            "routes[0].plugins.request-validation.content_types[0]",
            "`json` is not a media type",
        ),
    ] {
        let want = format!("{file}:{line}:{col}: {path}: ");
        assert!(
            stderr.lines().any(|l| l.contains(&want) && l.contains(msg)),
            "`{want}…{msg}` missing:\n{stderr}"
        );
    }

    // The same through the configuration API.
    let diags = portico_config::load::load_str(yaml, None, ".".into(), &portico_plugins::Catalog)
        .unwrap_err();
    let paths: Vec<String> = diags.0.iter().map(|d| d.path.to_string()).collect();
    assert!(
        paths.contains(&"routes[0].plugins.request-validation.body.properties.price.type".into()),
        "{paths:?}"
    );

    // Unknown settings and a policy without any schema are refused too.
    let yaml = "routes:\n  - name: a\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      request-validation: {max_body: 1KiB}\n";
    let (code, stderr, _) = validate("empty.yaml", yaml);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("routes[0].plugins.request-validation: set at least one schema"),
        "{stderr}"
    );
    let yaml = "routes:\n  - name: a\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      request-validation: {body: {}, schema: {}}\n";
    let (code, stderr, _) = validate("unknown.yaml", yaml);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("request-validation.schema"), "{stderr}");

    // A valid one passes.
    let yaml = "routes:\n  - name: a\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      request-validation:\n        body: {$schema: \"http://json-schema.org/draft-07/schema#\", type: object}\n";
    let (code, stderr, _) = validate("good.yaml", yaml);
    assert_eq!(code, Some(0), "{stderr}");
}
