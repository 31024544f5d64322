//! End-to-end tests of the `openapi` policy: the real `portico` binary, started with a
//! configuration file whose OpenAPI documents (3.0 and 3.1, YAML) sit next to it and
//! are referenced by relative paths, between raw HTTP/1.1 clients and real upstreams
//! (an echo upstream, and one that answers with bodies that break the contract).
//!
//! Covers: a valid request reaches the upstream unchanged; path, query, header and body
//! violations answered `400 validation_failed` listing each one (with 3.0's `nullable`
//! and boolean `exclusiveMinimum`, and 3.1's equivalents); 415 and 413; undeclared
//! operations (404 `no_operation` / passed through) and methods (405 with `Allow`);
//! `response_validation: reject` (502 `response_contract_violation`) and `log` (the
//! response passes, a warning is logged); bodies over `max_body` stream through
//! unchecked; the counters on the admin `/metrics`; `portico validate` errors for a
//! missing document and a remote `$ref`, and the relative path resolved against the
//! configuration's directory (not the working directory).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use http::{Response, StatusCode};
use portico_test_support::upstream::{full, handler, json_response};
use portico_test_support::{free_port, raw_http, Gateway, RawResponse, Upstream};
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

/// An OpenAPI document for the orders API, in the dialect of `version` (3.0 writes
/// `nullable` and a boolean `exclusiveMinimum`; 3.1 plain JSON Schema 2020-12).
fn spec(version: &str) -> String {
    let (total, note) = if version.starts_with("3.0") {
        (
            "{type: number, minimum: 0, exclusiveMinimum: true}",
            "{type: string, nullable: true}",
        )
    } else {
        (
            "{type: number, exclusiveMinimum: 0}",
            "{type: [string, \"null\"]}",
        )
    };
    format!(
        r#"openapi: {version}
info: {{title: orders, version: "1"}}
servers:
  - url: https://api.example.com/api
paths:
  /orders:
    post:
      operationId: createOrder
      parameters:
        - $ref: '#/components/parameters/ApiVersion'
      requestBody:
        required: true
        content:
          application/json:
            schema: {{$ref: '#/components/schemas/Order'}}
      responses:
        '201':
          description: created
          headers:
            Location: {{required: true, schema: {{type: string}}}}
          content:
            application/json:
              schema: {{$ref: '#/components/schemas/Order'}}
    get:
      operationId: listOrders
      parameters:
        - {{name: limit, in: query, required: true, schema: {{type: integer, minimum: 1, maximum: 100}}}}
        - {{name: status, in: query, schema: {{type: string, enum: [open, closed]}}}}
      responses:
        '200':
          description: the orders
          content:
            application/json:
              schema: {{type: array, items: {{$ref: '#/components/schemas/Order'}}}}
  /orders/{{id}}:
    parameters:
      - {{name: id, in: path, required: true, schema: {{type: integer, minimum: 1}}}}
    get:
      operationId: getOrder
      responses:
        '200':
          description: the order
          content:
            application/json:
              schema: {{$ref: '#/components/schemas/Order'}}
        '404': {{description: no such order}}
components:
  parameters:
    ApiVersion:
      name: X-Api-Version
      in: header
      required: true
      schema: {{type: integer, enum: [1, 2]}}
  schemas:
    Order:
      type: object
      required: [id, customer, total]
      additionalProperties: false
      properties:
        id: {{type: integer, readOnly: true}}
        customer: {{type: string, minLength: 1}}
        total: {total}
        note: {note}
"#
    )
}

/// The contract upstream: `GET …/orders/{id}` answers by id — 1 a valid order, 2 an
/// invalid one, 3 an undeclared status, 4 an undeclared media type, 5 an invalid order
/// larger than `max_body`; `POST …/orders` answers 201 with the order (and
/// without `Location` when the query has `no-location`).
async fn contract_upstream() -> Upstream {
    Upstream::start_with(
        "contract",
        handler(|req| async move {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            let id = path.rsplit('/').next().unwrap_or("").to_string();
            if req.method() == http::Method::POST {
                let mut r = json_response(
                    StatusCode::CREATED,
                    &json!({"id": 7, "customer": "zoë", "total": 12.5}),
                );
                if !query.contains("no-location") {
                    r.headers_mut()
                        .insert("location", "/orders/7".parse().unwrap());
                }
                return r;
            }
            match id.as_str() {
                "1" => json_response(
                    StatusCode::OK,
                    &json!({"id": 1, "customer": "zoë", "total": 3, "note": null}),
                ),
                "2" => json_response(
                    StatusCode::OK,
                    &json!({"id": 2, "total": "free", "secret": "s3cr3t"}),
                ),
                "3" => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"oops": 1})),
                "4" => Response::builder()
                    .status(200)
                    .header("content-type", "text/html")
                    .body(full("<p>order</p>"))
                    .unwrap(),
                "5" => Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(full(json!({"id": 5, "note": "x".repeat(4000)}).to_string()))
                    .unwrap(),
                _ => json_response(StatusCode::NOT_FOUND, &json!({})),
            }
        }),
    )
    .await
}

struct Env {
    echo: Upstream,
    contract: Upstream,
    gw: Gateway,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Writes `portico.yaml` and the documents into a directory of their own and starts the
/// gateway there by path (its working directory is another one).
async fn start() -> Env {
    let echo = Upstream::start("echo").await;
    let contract = contract_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("specs")).unwrap();
    std::fs::write(dir.path().join("specs/orders30.yaml"), spec("3.0.3")).unwrap();
    std::fs::write(dir.path().join("specs/orders31.yaml"), spec("3.1.0")).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = format!(
        r#"listen: ["{addr}"]
admin:
  listen: "{admin}"
upstreams:
  echo:
    targets: [{{url: "{echo}"}}]
  contract:
    targets: [{{url: "{contract}"}}]
routes:
  - name: orders
    paths: ["/api/*"]
    upstream: echo
    plugins:
      openapi:
        spec: specs/orders30.yaml
        max_body: 1KiB
  - name: orders31
    paths: ["/v31/*"]
    upstream: echo
    plugins:
      openapi:
        spec: specs/orders31.yaml
        base_path: /v31
        unknown_operation: pass
  - name: strict
    paths: ["/strict/*"]
    upstream: contract
    plugins:
      openapi:
        spec: specs/orders31.yaml
        base_path: /strict
        response_validation: reject
        max_body: 1KiB
  - name: lenient
    paths: ["/lenient/*"]
    upstream: contract
    plugins:
      openapi:
        spec: specs/orders30.yaml
        base_path: /lenient
        response_validation: log
        log_sample_per_second: 100
"#,
        echo = echo.url(),
        contract = contract.url(),
    );
    let config = dir.path().join("portico.yaml");
    std::fs::write(&config, yaml).unwrap();
    let config_arg = config.display().to_string();
    let gw = tokio::task::spawn_blocking(move || {
        Gateway::start_with_args(bin(), &["run", "--config", &config_arg], None, admin)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    Env {
        echo,
        contract,
        gw,
        addr,
        admin,
        _dir: dir,
    }
}

/// One request on a new connection, with a `Content-Length` body.
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

async fn post_order(addr: SocketAddr, path: &str, version: &str, body: &str) -> RawResponse {
    send(
        addr,
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("X-Api-Version", version),
        ],
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
    assert!(
        e["request_id"].as_str().is_some_and(|m| !m.is_empty()),
        "{r:?}"
    );
    e.clone()
}

type Violation = (String, String, String, String);

/// The text without terminal colour codes (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `(in, name, pointer, keyword)` of every violation of a `validation_failed` answer.
fn violations(r: &RawResponse) -> BTreeSet<Violation> {
    let e = assert_error(r, 400, "validation_failed");
    e["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("no violations in {r:?}"))
        .iter()
        .map(|v| {
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
            (s("in"), s("name"), s("pointer"), s("keyword"))
        })
        .collect()
}

fn set(v: &[(&str, &str, &str, &str)]) -> BTreeSet<Violation> {
    v.iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
        .collect()
}

const VALID: &str = "{ \"customer\": \"Zoë\",\n  \"total\": 9.50, \"note\": null }\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_request_reaches_the_upstream_unchanged() {
    let env = start().await;
    for prefix in ["/api", "/v31"] {
        // The document's `servers` path (`/api`) or `base_path` is the prefix.
        let r = post_order(env.addr, &format!("{prefix}/orders"), "2", VALID).await;
        assert_eq!(r.status, 200, "{prefix}: {r:?}");
        let echo = r.json();
        assert_eq!(echo["body"], VALID, "{echo}");
        assert_eq!(echo["path"], format!("{prefix}/orders"), "{echo}");
        assert_eq!(echo["headers"]["x-api-version"], "2", "{echo}");

        let r = send(
            env.addr,
            "GET",
            &format!("{prefix}/orders?limit=10&status=open&extra=1"),
            &[],
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{prefix}: {r:?}");
        assert_eq!(r.json()["query"], "limit=10&status=open&extra=1", "{r:?}");
        let r = send(env.addr, "GET", &format!("{prefix}/orders/42"), &[], None).await;
        assert_eq!(r.status, 200, "{prefix}: {r:?}");
        // HEAD is the GET operation.
        let r = send(env.addr, "HEAD", &format!("{prefix}/orders/42"), &[], None).await;
        assert_eq!(r.status, 200, "{prefix}: {r:?}");
    }
    assert_eq!(env.echo.hits(), 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn violations_are_listed_each_with_its_place() {
    let env = start().await;
    for prefix in ["/api", "/v31"] {
        // Path parameter: minimum, and not an integer.
        let r = send(env.addr, "GET", &format!("{prefix}/orders/0"), &[], None).await;
        assert_eq!(
            violations(&r),
            set(&[("path", "id", "", "minimum")]),
            "{prefix}"
        );
        let r = send(env.addr, "GET", &format!("{prefix}/orders/abc"), &[], None).await;
        assert_eq!(
            violations(&r),
            set(&[("path", "id", "", "type")]),
            "{prefix}"
        );
        // Query: the required one missing, another outside its enum.
        let r = send(
            env.addr,
            "GET",
            &format!("{prefix}/orders?status=lost"),
            &[],
            None,
        )
        .await;
        assert_eq!(
            violations(&r),
            set(&[
                ("query", "limit", "", "required"),
                ("query", "status", "", "enum")
            ]),
            "{prefix}"
        );
        let r = send(
            env.addr,
            "GET",
            &format!("{prefix}/orders?limit=1000"),
            &[],
            None,
        )
        .await;
        assert_eq!(
            violations(&r),
            set(&[("query", "limit", "", "maximum")]),
            "{prefix}"
        );
        // Header and body together: every violation in one answer. `total: 0` fails
        // the exclusive minimum (3.0: `exclusiveMinimum: true`), `note: 5` the
        // nullable string; `id` is read-only, so not required in a request.
        let bad = json!({"total": 0, "note": 5, "coupon": "SECRET-42"}).to_string();
        let r = post_order(env.addr, &format!("{prefix}/orders"), "9", &bad).await;
        assert_eq!(
            violations(&r),
            set(&[
                ("header", "X-Api-Version", "", "enum"),
                ("body", "", "", "required"),
                ("body", "", "", "additionalProperties"),
                ("body", "", "/total", "exclusiveMinimum"),
                ("body", "", "/note", "type"),
            ]),
            "{prefix}: {r:?}"
        );
        assert!(
            !r.body.contains("SECRET-42"),
            "values are not repeated: {r:?}"
        );
        // No header, no body.
        let r = send(env.addr, "POST", &format!("{prefix}/orders"), &[], None).await;
        assert_eq!(
            violations(&r),
            set(&[
                ("header", "X-Api-Version", "", "required"),
                ("body", "", "", "required")
            ]),
            "{prefix}"
        );
        // Another media type: 415.
        let r = send(
            env.addr,
            "POST",
            &format!("{prefix}/orders"),
            &[("Content-Type", "text/plain"), ("X-Api-Version", "1")],
            Some("hello"),
        )
        .await;
        let e = assert_error(&r, 415, "unsupported_media_type");
        assert!(
            e["message"].as_str().unwrap().contains("application/json"),
            "{e}"
        );
    }
    // Over `max_body` (1KiB on /api): 413.
    let big = json!({"customer": "x".repeat(2000), "total": 1}).to_string();
    let r = post_order(env.addr, "/api/orders", "1", &big).await;
    assert_error(&r, 413, "payload_too_large");
    assert_eq!(
        env.echo.hits(),
        0,
        "no refused request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn undeclared_operations() {
    let env = start().await;
    // reject (default): 404 no_operation, also outside the base path.
    let r = send(env.addr, "GET", "/api/customers", &[], None).await;
    assert_error(&r, 404, "no_operation");
    let r = send(env.addr, "GET", "/api/orders/1/items", &[], None).await;
    assert_error(&r, 404, "no_operation");
    // A path of the document without the method: 405 with Allow.
    let r = send(env.addr, "DELETE", "/api/orders", &[], None).await;
    assert_error(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, POST, HEAD"), "{r:?}");
    let r = send(env.addr, "PUT", "/api/orders/3", &[], Some("{}")).await;
    assert_error(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD"), "{r:?}");
    assert_eq!(env.echo.hits(), 0);
    // pass: sent upstream unchecked.
    let r = send(env.addr, "GET", "/v31/customers", &[], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(env.addr, "DELETE", "/v31/orders", &[], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(env.echo.hits(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn response_validation_reject() {
    let env = start().await;
    let r = send(env.addr, "GET", "/strict/orders/1", &[], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["customer"], "zoë", "{r:?}");
    for id in ["2", "3", "4"] {
        let r = send(env.addr, "GET", &format!("/strict/orders/{id}"), &[], None).await;
        let e = assert_error(&r, 502, "response_contract_violation");
        assert!(!r.body.contains("s3cr3t"), "{r:?}");
        assert!(e.get("violations").is_none(), "kept for the log: {e}");
    }
    // A required response header missing.
    let r = post_order(env.addr, "/strict/orders?no-location", "1", VALID).await;
    assert_error(&r, 502, "response_contract_violation");
    let r = post_order(env.addr, "/strict/orders", "1", VALID).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("location"), Some("/orders/7"), "{r:?}");
    // Larger than max_body: streamed through unchecked (and counted as skipped).
    let r = send(env.addr, "GET", "/strict/orders/5", &[], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["note"].as_str().map(str::len), Some(4000), "{r:?}");
    assert_eq!(env.contract.hits(), 7);
    assert!(
        env.gw
            .wait_for_log("code=response_contract_violation", Duration::from_secs(5))
            || env
                .gw
                .wait_for_log("response_contract_violation", Duration::from_secs(1)),
        "{}",
        env.gw.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn response_validation_log() {
    let env = start().await;
    let r = send(env.addr, "GET", "/lenient/orders/2", &[], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["total"], "free", "passed through: {r:?}");
    assert!(
        env.gw.wait_for_log(
            "openapi: the response does not match the API description",
            Duration::from_secs(5)
        ),
        "{}",
        env.gw.logs()
    );
    let logs = strip_ansi(&env.gw.logs());
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("openapi: the response does not match"))
        .collect();
    // One line per violation: the missing `customer`, `total`'s type, `secret`.
    assert_eq!(lines.len(), 3, "{logs}");
    for l in &lines {
        assert!(l.contains("WARN"), "{l}");
        assert!(l.contains("route=lenient"), "{l}");
        assert!(l.contains("operation=getOrder"), "{l}");
        assert!(l.contains("status=200"), "{l}");
        assert!(!l.contains("s3cr3t"), "{l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("pointer=/total") && l.contains("rule=type")),
        "{logs}"
    );
    assert!(lines.iter().any(|l| l.contains("rule=required")), "{logs}");
    // Undeclared status and media type pass too.
    let r = send(env.addr, "GET", "/lenient/orders/3", &[], None).await;
    assert_eq!(r.status, 500, "{r:?}");
    let r = send(env.addr, "GET", "/lenient/orders/4", &[], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "<p>order</p>");
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_on_the_admin_metrics() {
    let env = start().await;
    post_order(env.addr, "/api/orders", "1", VALID).await;
    post_order(env.addr, "/api/orders", "7", VALID).await;
    send(env.addr, "GET", "/api/nope", &[], None).await;
    send(env.addr, "GET", "/strict/orders/1", &[], None).await;
    send(env.addr, "GET", "/strict/orders/2", &[], None).await;
    send(env.addr, "GET", "/strict/orders/5", &[], None).await;
    let m = send(env.admin, "GET", "/metrics", &[], None).await;
    assert_eq!(m.status, 200, "{m:?}");
    let text = &m.body;
    for line in [
        r#"portico_openapi_validated_total{route="orders",operation="createOrder",direction="request"} 2"#,
        r#"portico_openapi_violations_total{route="orders",operation="createOrder",direction="request"} 1"#,
        r#"portico_openapi_violations_total{route="orders",operation="",direction="request"} 1"#,
        r#"portico_openapi_validated_total{route="strict",operation="getOrder",direction="request"} 3"#,
        r#"portico_openapi_violations_total{route="strict",operation="getOrder",direction="request"} 0"#,
        r#"portico_openapi_validated_total{route="strict",operation="getOrder",direction="response"} 3"#,
        r#"portico_openapi_violations_total{route="strict",operation="getOrder",direction="response"} 1"#,
        r#"portico_openapi_response_skipped_total{route="strict",operation="getOrder"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "`{line}` missing:\n{text}");
    }
    // Four instances, each family once, its samples together.
    for family in [
        "portico_openapi_validated_total",
        "portico_openapi_violations_total",
        "portico_openapi_response_skipped_total",
    ] {
        let help = format!("# HELP {family} ");
        let ty = format!("# TYPE {family} counter");
        assert_eq!(text.matches(&help).count(), 1, "{text}");
        assert_eq!(text.lines().filter(|l| *l == ty).count(), 1, "{text}");
        let at: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.starts_with(&format!("{family}{{")))
            .map(|(i, _)| i)
            .collect();
        assert!(
            at.windows(2).all(|w| w[1] == w[0] + 1),
            "{family} not together:\n{text}"
        );
    }
    // The chain position.
    let a = send(env.admin, "GET", "/admin/routes/orders", &[], None).await;
    let chain = a.json()["plugins"].clone();
    assert_eq!(chain[0]["name"], "openapi", "{chain}");
    assert_eq!(chain[0]["priority"], 1010, "{chain}");
    assert_eq!(chain[0]["stage"], "request validation", "{chain}");
}

/// Runs `portico validate portico.yaml` from another working directory on `yaml`,
/// with `files` written next to it; returns the exit code, stderr and the path.
fn validate(yaml: &str, files: &[(&str, &str)]) -> (Option<i32>, String, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let file = dir.path().join("portico.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut child = Command::new(bin())
        .arg("validate")
        .arg(&file)
        .current_dir(std::env::temp_dir())
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
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        file,
    )
}

const ROUTE: &str = r#"upstreams:
  up:
    targets: [{url: "http://127.0.0.1:9"}]
routes:
  - name: orders
    paths: ["/api/*"]
    upstream: up
    plugins:
      openapi:
        spec: specs/orders.yaml
"#;

#[test]
fn validate_reports_document_problems() {
    // The relative path is the configuration's directory's, not the working one's.
    let (code, stderr, _) = validate(ROUTE, &[("specs/orders.yaml", &spec("3.0.3"))]);
    assert_eq!(code, Some(0), "{stderr}");

    // A missing document.
    let (code, stderr, file) = validate(ROUTE, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    let want = format!(
        "{}:10:15: routes[0].plugins.openapi.spec: cannot read the OpenAPI document",
        file.display()
    );
    assert!(stderr.contains(&want), "`{want}` missing:\n{stderr}");

    // A remote reference: located in the document.
    let remote = spec("3.1.0").replace(
        "schema: {$ref: '#/components/schemas/Order'}\n      responses:",
        "schema: {$ref: 'https://schemas.example.com/order.json'}\n      responses:",
    );
    assert_ne!(remote, spec("3.1.0"));
    let (code, stderr, _) = validate(ROUTE, &[("specs/orders.yaml", &remote)]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("routes[0].plugins.openapi.spec: specs/orders.yaml:15:28: paths[\"/orders\"].post.requestBody.content[\"application/json\"].schema[\"$ref\"]: "),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "`https://schemas.example.com/order.json` is not a reference inside the document"
        ),
        "{stderr}"
    );

    // An invalid schema in an inline document: located in the configuration.
    let inline = r#"routes:
  - name: a
    paths: ["/*"]
    plugins:
      echo: {}
      openapi:
        spec_inline:
          openapi: 3.1.0
          paths:
            /a:
              get:
                parameters:
                  - {name: n, in: query, schema: {type: nmber}}
                responses: {}
"#;
    let (code, stderr, file) = validate(inline, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    let want = format!(
        "{}:13:57: routes[0].plugins.openapi.spec_inline.paths[\"/a\"].get.parameters[0].schema.type: invalid JSON Schema",
        file.display()
    );
    assert!(stderr.contains(&want), "`{want}` missing:\n{stderr}");
}
