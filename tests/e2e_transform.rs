//! End-to-end tests of the transformation policies (docs/transform.md): the real
//! `portico` binary between raw HTTP/1.1 clients and real upstreams (the echo upstream
//! of the test support, which describes what reached it, and a data upstream with
//! fixed answers).
//!
//! Covers: `request-transformer` query, method and path-regex changes and JSON body
//! edits reaching the upstream; a body over `max_body` (announced or streamed) passing
//! untouched; `response-transformer` allow-list, add and wrap on a JSON answer, a large
//! answer passing untouched, `status_map`; `data-masking` of a card, an IBAN and an
//! e-mail in JSON and in text; `json-xml` (an XML upstream answered as JSON, a JSON
//! client body sent as XML); `mock` answering without an upstream.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

use http::{Response, StatusCode};
use portico_test_support::upstream::{full, handler, BoxBody};
use portico_test_support::{http_client, raw_http, LocalGateway, RawResponse, Upstream};
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

const BIG_PAD: usize = 4000;

fn answer(ct: &str, body: String) -> Response<BoxBody> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", ct)
        .body(full(body))
        .unwrap()
}

/// The data upstream: fixed answers by path.
async fn data_upstream() -> Upstream {
    Upstream::start_with(
        "data",
        handler(|req| async move {
            let accept = req
                .headers()
                .get("accept")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let encoding = req
                .headers()
                .get("accept-encoding")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            match req.uri().path() {
                "/users/7" => answer(
                    "application/json",
                    json!({"id": 7, "name": "Ann", "email": "ann@example.com",
                           "items": [{"id": 1, "price": 3}, {"id": 2, "price": 4}]})
                    .to_string(),
                ),
                "/big" => answer(
                    "application/json",
                    json!({"password": "secret", "pad": "x".repeat(BIG_PAD)}).to_string(),
                ),
                "/account" => answer(
                    "application/json; charset=utf-8",
                    json!({"card": "4111111111111111", "iban": "DE89 3704 0044 0532 0130 00",
                           "email": "john.doe@example.com", "order": "4111111111111112",
                           "accept_encoding": encoding})
                    .to_string(),
                ),
                "/statement" => answer(
                    "text/plain",
                    "Card 4111 1111 1111 1111 paid by jane@example.org".into(),
                ),
                "/legacy/order" => answer(
                    "application/xml",
                    format!(
                        r#"<?xml version="1.0"?><order id="7" accept="{accept}"><item>pen</item><item>ink</item><note/></order>"#
                    ),
                ),
                "/legacy/broken" => answer("text/xml", "<order><item></order>".into()),
                _ => answer("text/plain", "unknown".into()),
            }
        }),
    )
    .await
}

fn config(echo: &str, data: &str) -> String {
    format!(
        r#"upstreams:
  echo:
    targets: [{{url: "{echo}"}}]
  data:
    targets: [{{url: "{data}"}}]
routes:
  - name: reqt
    paths: ["/old/{{id}}"]
    methods: [GET]
    upstream: echo
    plugins:
      request-transformer:
        method: POST
        path: {{regex: "^/old/(?P<id>[0-9]+)$", replace: "/new/${{id}}"}}
        query:
          add: {{src: portico}}
          set: {{who: "${{param.id}}"}}
          remove: [debug]
          rename: {{q: search}}
        headers:
          set: {{x-gw: "yes"}}
  - name: body
    paths: ["/body"]
    upstream: echo
    plugins:
      request-transformer:
        body:
          remove: ["/password"]
          rename: {{"/userName": "/user_name"}}
          add: {{"/meta/source": portico, "/meta/route": "${{route.name}}"}}
          max_body: 1KiB
  - name: users
    paths: ["/users/{{id}}"]
    upstream: data
    plugins:
      response-transformer:
        body:
          allow: ["/id", "/name", "/items/*/id"]
          add: {{"/served_by": "${{route.name}}"}}
          wrap: data
  - name: big
    paths: ["/big"]
    upstream: data
    plugins:
      response-transformer:
        body: {{remove: ["/password"], max_body: 1KiB}}
  - name: masked
    paths: ["/account", "/statement"]
    upstream: data
    plugins:
      data-masking:
        detect: [card, iban, email]
  - name: legacy
    paths: ["/legacy/{{doc}}"]
    upstream: data
    plugins:
      json-xml: {{request: json_to_xml, response: xml_to_json}}
  - name: soap
    paths: ["/soap"]
    upstream: echo
    plugins:
      json-xml: {{request: json_to_xml}}
  - name: maintenance
    paths: ["/maintenance"]
    plugins:
      mock:
        status: 503
        headers: {{retry-after: "120", x-request: "${{request_id}}"}}
        body: {{message: "back soon"}}
  - name: status
    paths: ["/status/{{code}}"]
    upstream: echo
    plugins:
      response-transformer:
        status_map: {{"500": 503, "404": 200}}
"#
    )
}

struct Env {
    echo: Upstream,
    data: Upstream,
    gw: LocalGateway,
}

async fn start() -> Env {
    let echo = Upstream::start("echo").await;
    let data = data_upstream().await;
    let gw = LocalGateway::start(bin(), &config(&echo.url(), &data.url())).await;
    Env { echo, data, gw }
}

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

async fn get(addr: SocketAddr, path: &str) -> RawResponse {
    send(addr, "GET", path, &[], None).await
}

/// The body length says what the body is (Content-Length fixed up).
fn assert_length(r: &RawResponse) {
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str()),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn query_method_and_path_changes_reach_the_upstream() {
    let env = start().await;
    let r = get(env.gw.addr, "/old/42?q=shoes&debug=1&page=2").await;
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json();
    assert_eq!(echo["method"], "POST", "{echo}");
    assert_eq!(echo["path"], "/new/42", "{echo}");
    assert_eq!(
        echo["query"], "search=shoes&page=2&who=42&src=portico",
        "{echo}"
    );
    assert_eq!(echo["headers"]["x-gw"], "yes", "{echo}");
    // A path the expression does not match goes as it is (the route matches /old/{id}).
    let r = get(env.gw.addr, "/old/abc").await;
    assert_eq!(r.json()["path"], "/old/abc", "{r:?}");
    drop(env.data);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_request_bodies_are_edited_and_large_ones_pass_untouched() {
    let env = start().await;
    let body = r#"{"userName":"ann","password":"hunter2","meta":{"v":1}}"#;
    let r = send(
        env.gw.addr,
        "POST",
        "/body",
        &[("Content-Type", "application/json")],
        Some(body),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json();
    let sent: Value = serde_json::from_str(echo["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        sent,
        json!({"user_name": "ann", "meta": {"v": 1, "source": "portico", "route": "body"}})
    );
    assert_eq!(
        echo["headers"]["content-length"],
        echo["body_len"].to_string(),
        "{echo}"
    );

    // Not JSON: untouched.
    let r = send(
        env.gw.addr,
        "POST",
        "/body",
        &[("Content-Type", "text/plain")],
        Some(body),
    )
    .await;
    assert_eq!(r.json()["body"], body, "{r:?}");

    // Over max_body (1KiB), announced by Content-Length: byte for byte.
    let large = format!(r#"{{"password":"p","pad":"{}"}}"#, "y".repeat(2000));
    let r = send(
        env.gw.addr,
        "POST",
        "/body",
        &[("Content-Type", "application/json")],
        Some(&large),
    )
    .await;
    assert_eq!(r.json()["body"], large.as_str(), "{r:?}");

    // Over max_body, streamed without a Content-Length: the same.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = large
        .as_bytes()
        .chunks(300)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let resp = http_client()
        .post(format!("http://{}/body", env.gw.addr))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["body"], large.as_str());
    assert_eq!(env.echo.hits(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_responses_get_an_allow_listed_subset() {
    let env = start().await;
    let r = get(env.gw.addr, "/users/7").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"data": {"id": 7, "name": "Ann", "items": [{"id": 1}, {"id": 2}], "served_by": "users"}})
    );
    assert_length(&r);

    // Larger than max_body: as the upstream sent it.
    let r = get(env.gw.addr, "/big").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["password"], "secret");
    assert_eq!(v["pad"].as_str().unwrap().len(), BIG_PAD);
    drop(env.echo);
}

#[tokio::test(flavor = "multi_thread")]
async fn sensitive_values_are_masked() {
    let env = start().await;
    let r = get(env.gw.addr, "/account").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["card"], "************1111", "{v}");
    assert_eq!(v["iban"], "DE** **** **** **** **30 00", "{v}");
    assert_eq!(v["email"], "j***@example.com", "{v}");
    // Fails the Luhn check: not a card.
    assert_eq!(v["order"], "4111111111111112", "{v}");
    // The upstream was asked for an uncompressed body.
    assert_eq!(v["accept_encoding"], "identity", "{v}");
    assert_length(&r);
    assert!(!r.body.contains("4111111111111111"), "{r:?}");

    let r = get(env.gw.addr, "/statement").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "Card **** **** **** 1111 paid by j***@example.org");
    assert_length(&r);
    drop(env.echo);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_xml_upstream_answers_json_and_json_bodies_go_as_xml() {
    let env = start().await;
    let r = get(env.gw.addr, "/legacy/order").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(
        r.json(),
        json!({"order": {"@id": "7", "@accept": "application/xml, text/xml;q=0.9",
                          "item": ["pen", "ink"], "note": null}})
    );
    assert_length(&r);

    // XML that does not parse: 502.
    let r = get(env.gw.addr, "/legacy/broken").await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(
        r.json()["error"]["code"],
        "response_not_transformable",
        "{r:?}"
    );

    // A JSON client body reaches the upstream as XML.
    let r = send(
        env.gw.addr,
        "POST",
        "/soap",
        &[("Content-Type", "application/json")],
        Some(r#"{"order": {"@id": "8", "item": ["pen", "a&b"], "qty": 2}}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json();
    assert_eq!(echo["headers"]["content-type"], "application/xml", "{echo}");
    assert_eq!(
        echo["body"],
        r#"<?xml version="1.0" encoding="UTF-8"?><order id="8"><item>pen</item><item>a&amp;b</item><qty>2</qty></order>"#,
        "{echo}"
    );
    // Malformed JSON from the client: 400.
    let r = send(
        env.gw.addr,
        "POST",
        "/soap",
        &[("Content-Type", "application/json")],
        Some("{nope"),
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mock_answers_and_statuses_are_mapped() {
    let env = start().await;
    let r = get(env.gw.addr, "/maintenance").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("120"), "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(r.json(), json!({"message": "back soon"}));
    assert_eq!(r.header("x-request"), r.header("x-request-id"), "{r:?}");

    let r = get(env.gw.addr, "/status/500").await;
    assert_eq!(r.status, 503, "{r:?}");
    let r = get(env.gw.addr, "/status/404").await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = get(env.gw.addr, "/status/201").await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(env.echo.hits(), 3);
    assert_eq!(env.data.hits(), 0);
}
