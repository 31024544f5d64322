//! End-to-end tests of `oauth2-introspection` (RFC 7662): the real `portico` binary,
//! a test authorization server that implements the introspection endpoint (form
//! POST, HTTP Basic client authentication, the RFC's JSON answer), and an echo
//! upstream.
//!
//! Covers: an active token reaches the upstream with its consumer and claim headers,
//! without the token; answers are cached (the endpoint is called once per token);
//! inactive, expired, wrong-issuer and wrong-audience tokens are 401 with an
//! `invalid_token` challenge; `claims` scopes on top (403 `insufficient_scope`); the
//! endpoint down or refusing the gateway's credentials is 503 `auth_unavailable`;
//! `client_secret_post`; bad settings fail `portico validate`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use http::StatusCode;
use http_body_util::BodyExt;
use portico_test_support::upstream::{handler, json_response};
use portico_test_support::{http_client, LocalGateway, Upstream};
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The test authorization server: tokens it knows, and a call counter per token.
async fn authorization_server(calls: Arc<HashMap<&'static str, AtomicUsize>>) -> Upstream {
    Upstream::start_with(
        "as",
        handler(move |req| {
            let calls = calls.clone();
            async move {
                let basic = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let ctype = req
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let form: HashMap<String, String> = url_decode(&String::from_utf8_lossy(&body));
                let expected = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode("gateway:s3cret%2Fpass")
                );
                let by_basic = basic.as_deref() == Some(expected.as_str());
                let by_post = form.get("client_id").map(String::as_str) == Some("gateway")
                    && form.get("client_secret").map(String::as_str) == Some("s3cret/pass");
                if !ctype.starts_with("application/x-www-form-urlencoded") || !(by_basic || by_post) {
                    return json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_client"}));
                }
                assert_eq!(form.get("token_type_hint").map(String::as_str), Some("access_token"));
                let token = form.get("token").cloned().unwrap_or_default();
                if let Some(c) = calls.get(token.as_str()) {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                let t = now();
                let answer = match token.as_str() {
                    "tok-alice" => json!({"active": true, "sub": "alice@example.com", "scope": "orders:read profile",
                        "client_id": "app", "iss": "https://as.test", "aud": ["orders"], "exp": t + 600, "email": "alice@example.com"}),
                    "tok-noscope" => json!({"active": true, "sub": "alice@example.com", "scope": "profile",
                        "iss": "https://as.test", "aud": "orders", "exp": t + 600}),
                    "tok-expired" => json!({"active": true, "sub": "x", "iss": "https://as.test", "aud": "orders", "exp": t - 5}),
                    "tok-evil-iss" => json!({"active": true, "sub": "x", "iss": "https://evil.test", "aud": "orders", "exp": t + 600}),
                    "tok-other-aud" => json!({"active": true, "sub": "x", "iss": "https://as.test", "aud": "billing", "exp": t + 600}),
                    _ => json!({"active": false}),
                };
                json_response(StatusCode::OK, &answer)
            }
        }),
    )
    .await
}

fn url_decode(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            let d = |x: &str| {
                percent_encoding::percent_decode_str(&x.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

fn config(up: &str, endpoint: &str) -> String {
    format!(
        r#"
upstreams:
  up: {{targets: [{{url: "{up}"}}]}}
consumers:
  - name: alice
    groups: [gold]
    credentials: [{{type: jwt, subject: "alice@example.com"}}]
routes:
  - name: orders
    paths: ["/orders"]
    upstream: up
    plugins:
      oauth2-introspection:
        endpoint: "{endpoint}"
        client_id: gateway
        client_secret: "s3cret/pass"
        issuer: "https://as.test"
        audiences: [orders]
        claims_to_headers: {{email: X-User-Email, client_id: X-Client-Id}}
  - name: scoped
    paths: ["/scoped"]
    upstream: up
    plugins:
      oauth2-introspection:
        endpoint: "{endpoint}"
        client_id: gateway
        client_secret: "s3cret/pass"
        client_auth: client_secret_post
      claims: {{rules: [{{scopes: ["orders:read"]}}]}}
  - name: broken
    paths: ["/broken"]
    upstream: up
    plugins:
      oauth2-introspection:
        endpoint: "{endpoint}"
        client_id: gateway
        client_secret: "wrong-secret"
  - name: down
    paths: ["/down"]
    upstream: up
    plugins:
      oauth2-introspection:
        endpoint: "http://127.0.0.1:1/introspect"
        client_id: gateway
        client_secret: "s3cret/pass"
        timeout: 2s
"#
    )
}

async fn get(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, Option<String>, Value) {
    let mut rb = client.get(url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    for (n, v) in extra {
        rb = rb.header(*n, *v);
    }
    let r = rb.send().await.unwrap();
    let st = r.status().as_u16();
    let ch = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (st, ch, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn introspected_tokens_authenticate_and_are_cached() {
    let calls: Arc<HashMap<&'static str, AtomicUsize>> = Arc::new(
        ["tok-alice", "tok-unknown"]
            .into_iter()
            .map(|t| (t, AtomicUsize::new(0)))
            .collect(),
    );
    let as_ = authorization_server(calls.clone()).await;
    let up = Upstream::start("up").await;
    let gw = LocalGateway::start(
        bin(),
        &config(&up.url(), &format!("{}/introspect", as_.url())),
    )
    .await;
    let c = http_client();
    let url = |p: &str| format!("http://{}{p}", gw.addr);

    // Active: the consumer, claim headers (never the client's), no token upstream.
    for _ in 0..3 {
        let (st, _, echo) = get(
            &c,
            &url("/orders"),
            Some("tok-alice"),
            &[("x-user-email", "forged@evil.test")],
        )
        .await;
        assert_eq!(st, 200, "{echo}");
        assert_eq!(echo["headers"]["x-consumer-name"], "alice");
        assert_eq!(echo["headers"]["x-user-email"], "alice@example.com");
        assert_eq!(echo["headers"]["x-client-id"], "app");
        assert!(echo["headers"].get("authorization").is_none());
    }
    assert_eq!(
        calls["tok-alice"].load(Ordering::SeqCst),
        1,
        "the answer is cached"
    );

    // No token: 401 with the plain challenge.
    let (st, ch, body) = get(&c, &url("/orders"), None, &[]).await;
    assert_eq!((st, ch.as_deref()), (401, Some("Bearer realm=\"portico\"")));
    assert_eq!(body["error"]["code"], "unauthorized");

    // Refused tokens: 401 invalid_token, each saying why.
    for (tok, why) in [
        ("tok-unknown", "not active"),
        ("tok-expired", "expired"),
        ("tok-evil-iss", "another issuer"),
        ("tok-other-aud", "audience"),
    ] {
        let (st, ch, body) = get(&c, &url("/orders"), Some(tok), &[]).await;
        assert_eq!(st, 401, "{tok}");
        assert!(ch.unwrap().contains("error=\"invalid_token\""));
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{tok}: {body}"
        );
    }
    // An inactive answer is cached briefly too.
    let (st, _, _) = get(&c, &url("/orders"), Some("tok-unknown"), &[]).await;
    assert_eq!(st, 401);
    assert_eq!(calls["tok-unknown"].load(Ordering::SeqCst), 1);

    // client_secret_post, and claims on top of introspection.
    let (st, _, _) = get(&c, &url("/scoped"), Some("tok-alice"), &[]).await;
    assert_eq!(st, 200);
    let (st, ch, body) = get(&c, &url("/scoped"), Some("tok-noscope"), &[]).await;
    assert_eq!(st, 403, "{body}");
    assert!(ch.unwrap().contains("insufficient_scope"));

    // The endpoint refusing the gateway, or down: 503 auth_unavailable.
    for p in ["/broken", "/down"] {
        let (st, _, body) = get(&c, &url(p), Some("tok-alice"), &[]).await;
        assert_eq!(
            (st, body["error"]["code"].as_str()),
            (503, Some("auth_unavailable")),
            "{p}"
        );
    }
    assert!(
        !gw.gw.logs().contains("tok-alice"),
        "a token reached the log"
    );
}

#[test]
fn validate_reports_bad_introspection_settings() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    std::fs::write(
        &f,
        "routes:\n  - name: r\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      oauth2-introspection: {endpoint: \"http://as.example.com/i\", client_id: gw, client_secret: \"\"}\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["validate", f.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("routes[0].plugins.oauth2-introspection.endpoint"),
        "{err}"
    );
    assert!(
        err.contains("routes[0].plugins.oauth2-introspection.client_secret"),
        "{err}"
    );
}
