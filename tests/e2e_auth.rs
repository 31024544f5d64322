//! End-to-end tests of consumers, credentials and the `key-auth`, `basic-auth` and
//! `acl` policies: the real `portico` binary, a real upstream that echoes what it
//! received, the admin API over HTTP and the SQLite store on disk.
//!
//! Covers: declared consumers (file), the admin API's lifecycle (create, key shown
//! once, live without reload, revoke, expiry, 409 `declared_in_file`, every refusal
//! with its code), the store surviving a restart and being shared by two processes,
//! `X-Consumer-*` headers (set by the gateway, never forged by clients), credentials
//! stripped before the upstream and kept out of the access log, "any of" several
//! authentication policies with every challenge, the anonymous consumer, `acl`
//! allow/deny, and `portico validate` on bad consumer declarations.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use portico_test_support::{http_client, wait_until, LocalGateway, Upstream};
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

const ALICE_KEY: &str = "alice-key-0123456789";
const OLD_KEY: &str = "expired-key-0123456789";

fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
upstreams:
  up:
    targets: [{{url: "{upstream}"}}]
consumers:
  - name: alice
    groups: [gold, beta]
    metadata: {{tier: 1}}
    credentials:
      - {{type: key-auth, key: "{ALICE_KEY}"}}
      - {{type: key-auth, key: "{OLD_KEY}", expires_at: "2020-01-01T00:00:00Z"}}
      - {{type: basic-auth, username: alice, password: "wonderland-1"}}
  - name: carol
    groups: [silver]
    credentials:
      - {{type: key-auth, key: "carol-key-0123456789"}}
routes:
  - name: open
    paths: ["/open"]
    upstream: up
  - name: signed-query
    paths: ["/sq"]
    upstream: up
    plugins:
      key-auth: {{locations: ["query:sig"]}}
  - name: keyed
    paths: ["/keyed"]
    upstream: up
    plugins:
      key-auth: {{}}
  - name: forwarded
    paths: ["/forwarded"]
    upstream: up
    plugins:
      key-auth: {{forward_credentials: true}}
  - name: basic
    paths: ["/basic"]
    upstream: up
    plugins:
      basic-auth: {{}}
  - name: either
    paths: ["/either"]
    upstream: up
    plugins:
      key-auth: {{}}
      basic-auth: {{}}
  - name: guest
    paths: ["/guest"]
    upstream: up
    plugins:
      key-auth: {{anonymous: guest}}
  - name: gold-only
    paths: ["/gold"]
    upstream: up
    plugins:
      key-auth: {{}}
      acl: {{allow: [gold]}}
  - name: no-silver
    paths: ["/no-silver"]
    upstream: up
    plugins:
      key-auth: {{locations: ["bearer"]}}
      acl: {{deny: [silver]}}
{extra}"#
    )
}

struct Setup {
    gw: LocalGateway,
    _up: Upstream,
    client: reqwest::Client,
}

async fn setup() -> Setup {
    let up = Upstream::start("up").await;
    let gw = LocalGateway::start(bin(), &config(&up.url(), "")).await;
    Setup {
        gw,
        _up: up,
        client: http_client(),
    }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.addr)
    }
    fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.admin)
    }
    async fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        get(&self.client, &self.url(path), headers).await
    }
    async fn admin_call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        admin_call(&self.client, self.gw.admin, method, path, body).await
    }
}

async fn get(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rb = client.get(url);
    for (n, v) in headers {
        rb = rb.header(*n, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let text = r.text().await.unwrap();
    (
        status,
        h,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn admin_call(
    client: &reqwest::Client,
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://{admin}{path}");
    let mut rb = client.request(method.parse().unwrap(), url);
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn key_auth_with_declared_consumers() {
    let s = setup().await;

    // No key: 401, the challenge, the standard error.
    let (st, h, body) = s.get("/keyed", &[]).await;
    assert_eq!(st, 401);
    assert_eq!(h["www-authenticate"], "ApiKey realm=\"portico\"");
    assert_eq!(code(&body), "unauthorized");
    assert!(body["error"]["request_id"].is_string());

    // A wrong key, and an expired one.
    let (st, _, body) = s.get("/keyed", &[("apikey", "not-a-key-0123456789")]).await;
    assert_eq!((st, code(&body)), (401, "unauthorized"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid"));
    let (st, _, body) = s.get("/keyed", &[("apikey", OLD_KEY)]).await;
    assert_eq!(st, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));

    // The right key in the header: the upstream learns who, and never sees the key.
    let (st, _, echo) = s
        .get(
            "/keyed",
            &[("apikey", ALICE_KEY), ("x-consumer-name", "mallory")],
        )
        .await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "alice");
    assert_eq!(echo["headers"]["x-consumer-groups"], "gold, beta");
    assert!(echo["headers"].get("apikey").is_none());

    // In the query: removed from what the upstream gets, other parameters kept.
    let (st, _, echo) = s
        .get(&format!("/keyed?a=1&apikey={ALICE_KEY}&b=2"), &[])
        .await;
    assert_eq!(st, 200);
    assert_eq!(echo["query"], "a=1&b=2");
    assert_eq!(echo["headers"]["x-consumer-name"], "alice");

    // forward_credentials: the key goes on.
    let (st, _, echo) = s.get("/forwarded", &[("apikey", ALICE_KEY)]).await;
    assert_eq!(st, 200);
    assert_eq!(echo["headers"]["apikey"], ALICE_KEY);

    // A client cannot forge the identity headers on any route, not even spelt with
    // underscores (which CGI-style servers read as the same variable).
    let (st, _, echo) = s
        .get(
            "/open",
            &[
                ("X-Consumer-Name", "alice"),
                ("x-consumer-groups", "admin"),
                ("x_consumer_name", "alice"),
                ("X-Consumer_Groups", "admin"),
                ("x_other_header", "kept"),
            ],
        )
        .await;
    assert_eq!(st, 200);
    assert!(echo["headers"].get("x-consumer-name").is_none(), "{echo}");
    assert!(echo["headers"].get("x-consumer-groups").is_none());
    assert!(echo["headers"].get("x_consumer_name").is_none(), "{echo}");
    assert!(echo["headers"].get("x-consumer_groups").is_none(), "{echo}");
    assert_eq!(echo["headers"]["x_other_header"], "kept");
    let (st, _, echo) = s
        .get(
            "/keyed",
            &[("apikey", ALICE_KEY), ("x_consumer_name", "mallory")],
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(echo["headers"]["x-consumer-name"], "alice");
    assert!(echo["headers"].get("x_consumer_name").is_none(), "{echo}");

    // Two keys, or two Authorization headers: the gateway and the upstream could each
    // read a different one.
    let (st, _, body) = s
        .get(
            "/keyed",
            &[("apikey", ALICE_KEY), ("apikey", "carol-key-0123456789")],
        )
        .await;
    assert_eq!(st, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("more than one"));
    let (st, _, body) = s
        .get(
            "/basic",
            &[
                ("authorization", &basic("alice", "wonderland-1")),
                ("authorization", "Basic Ym9iOmJ1aWxkZXI="),
            ],
        )
        .await;
    assert_eq!((st, code(&body)), (400, "bad_request"));

    // A key header that is not text is a wrong key, not a missing one.
    let r = s
        .client
        .get(s.url("/guest"))
        .header(
            "apikey",
            reqwest::header::HeaderValue::from_bytes(b"\xff\xfe-not-text-0123456789").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Credentials never reach the log, not even a refused one, nor one sent to a
    // path no policy read it on (`sig` is a key location of another route).
    let (st, _, _) = s.get("/keyed?apikey=wrong-key-in-the-query-42", &[]).await;
    assert_eq!(st, 401);
    let (st, _, _) = s.get("/nowhere?sig=signature-on-a-404-4242", &[]).await;
    assert_eq!(st, 404);
    let (st, _, _) = s.get(&format!("/sq?sig={ALICE_KEY}"), &[]).await;
    assert_eq!(st, 200);
    assert!(
        s.gw.gw
            .wait_for_log("\"consumer\":\"alice\"", Duration::from_secs(5)),
        "the access log names the consumer"
    );
    let logs = s.gw.gw.logs();
    assert!(!logs.contains(ALICE_KEY), "a key reached the log");
    assert!(!logs.contains("wrong-key-in-the-query-42"));
    assert!(!logs.contains("signature-on-a-404-4242"), "{logs}");
    assert!(logs.contains("sig=REDACTED"));
    assert!(logs.contains("apikey=REDACTED"));
}

#[tokio::test]
async fn basic_auth_any_of_anonymous_and_acl() {
    let s = setup().await;

    let (st, h, _) = s.get("/basic", &[]).await;
    assert_eq!(st, 401);
    assert_eq!(
        h["www-authenticate"],
        "Basic realm=\"portico\", charset=\"UTF-8\""
    );
    let (st, _, _) = s
        .get("/basic", &[("authorization", &basic("alice", "wrong"))])
        .await;
    assert_eq!(st, 401);
    let (st, _, _) = s
        .get("/basic", &[("authorization", "Basic !!!not-base64")])
        .await;
    assert_eq!(st, 401);
    for _ in 0..2 {
        // the second time from the verification cache
        let (st, _, echo) = s
            .get(
                "/basic",
                &[("authorization", &basic("alice", "wonderland-1"))],
            )
            .await;
        assert_eq!(st, 200);
        assert_eq!(echo["headers"]["x-consumer-name"], "alice");
        assert!(echo["headers"].get("authorization").is_none());
    }

    // Any of: no credential → 401 with both challenges; either credential works.
    let (st, h, _) = s.get("/either", &[]).await;
    assert_eq!(st, 401);
    let challenges: Vec<&str> = h
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(challenges.len(), 2, "{challenges:?}");
    assert!(challenges.iter().any(|c| c.starts_with("ApiKey")));
    assert!(challenges.iter().any(|c| c.starts_with("Basic")));
    let (st, _, _) = s.get("/either", &[("apikey", ALICE_KEY)]).await;
    assert_eq!(st, 200);
    let (st, _, _) = s
        .get(
            "/either",
            &[("authorization", &basic("alice", "wonderland-1"))],
        )
        .await;
    assert_eq!(st, 200);

    // Anonymous: no key → the guest consumer; a wrong key is still refused.
    let (st, _, echo) = s.get("/guest", &[]).await;
    assert_eq!(st, 200);
    assert_eq!(echo["headers"]["x-consumer-name"], "guest");
    let (st, _, _) = s.get("/guest", &[("apikey", "wrong-key-0123456789")]).await;
    assert_eq!(st, 401);
    let (st, _, echo) = s.get("/guest", &[("apikey", ALICE_KEY)]).await;
    assert_eq!(
        (st, &echo["headers"]["x-consumer-name"]),
        (200, &json!("alice"))
    );

    // acl allow: gold in, silver out (403); deny: silver out, gold in; none: 401.
    let (st, _, _) = s.get("/gold", &[("apikey", ALICE_KEY)]).await;
    assert_eq!(st, 200);
    let (st, _, body) = s.get("/gold", &[("apikey", "carol-key-0123456789")]).await;
    assert_eq!((st, code(&body)), (403, "forbidden"));
    let (st, _, _) = s.get("/gold", &[]).await;
    assert_eq!(st, 401);
    let (st, _, _) = s
        .get(
            "/no-silver",
            &[("authorization", "Bearer carol-key-0123456789")],
        )
        .await;
    assert_eq!(st, 403);
    let (st, _, echo) = s
        .get(
            "/no-silver",
            &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        )
        .await;
    assert_eq!(st, 200);
    assert!(echo["headers"].get("authorization").is_none());
    let (_, h, _) = s.get("/no-silver", &[]).await;
    assert_eq!(h["www-authenticate"], "Bearer realm=\"portico\"");
}

#[tokio::test]
async fn admin_consumer_lifecycle_is_live() {
    let s = setup().await;

    // Declared consumers are listed and read-only.
    let (st, list) = s.admin_call("GET", "/admin/consumers", None).await;
    assert_eq!(st, 200);
    let alice = list["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "alice")
        .unwrap();
    assert_eq!(alice["source"], "file");
    assert_eq!(alice["groups"], json!(["gold", "beta"]));
    let shown = alice.to_string();
    assert!(
        !shown.contains(ALICE_KEY) && !shown.contains("wonderland-1"),
        "{shown}"
    );
    assert!(shown.contains("ali…"), "{shown}");
    for (m, p, b) in [
        (
            "PATCH",
            "/admin/consumers/alice",
            Some(json!({"groups": []})),
        ),
        ("DELETE", "/admin/consumers/alice", None),
        (
            "POST",
            "/admin/consumers/alice/credentials",
            Some(json!({"type": "key-auth"})),
        ),
        ("POST", "/admin/consumers", Some(json!({"name": "alice"}))),
    ] {
        let (st, body) = s.admin_call(m, p, b).await;
        assert_eq!((st, code(&body)), (409, "declared_in_file"), "{m} {p}");
    }

    // Create a consumer and a generated key: live at once, without a reload.
    let (st, bob) = s
        .admin_call(
            "POST",
            "/admin/consumers",
            Some(json!({"name": "bob", "groups": ["gold"], "metadata": {"team": "x"}})),
        )
        .await;
    assert_eq!(st, 201, "{bob}");
    assert_eq!(bob["source"], "store");
    let (st, cred) = s
        .admin_call(
            "POST",
            "/admin/consumers/bob/credentials",
            Some(json!({"type": "key-auth"})),
        )
        .await;
    assert_eq!(st, 201, "{cred}");
    let key = cred["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("pk_") && key.len() >= 3 + 32, "{key}");
    let id = cred["id"].as_str().unwrap().to_string();
    let (st, _, echo) = s.get("/gold", &[("apikey", &key)]).await;
    assert_eq!(st, 200);
    assert_eq!(echo["headers"]["x-consumer-name"], "bob");

    // The key is never shown again.
    let (st, creds) = s
        .admin_call("GET", "/admin/consumers/bob/credentials", None)
        .await;
    assert_eq!(st, 200);
    assert!(!creds.to_string().contains(&key));
    assert_eq!(
        creds["credentials"][0]["key_hint"],
        format!("{}…", &key[..7])
    );

    // Groups change live: bob leaves gold, acl now refuses him.
    let (st, _) = s
        .admin_call(
            "PATCH",
            "/admin/consumers/bob",
            Some(json!({"groups": ["silver"]})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _, _) = s.get("/gold", &[("apikey", &key)]).await;
    assert_eq!(st, 403);

    // Revoke: the key stops working at once.
    let (st, _) = s
        .admin_call(
            "DELETE",
            &format!("/admin/consumers/bob/credentials/{id}"),
            None,
        )
        .await;
    assert_eq!(st, 204);
    let (st, _, _) = s.get("/keyed", &[("apikey", &key)]).await;
    assert_eq!(st, 401);

    // A key of one's own, a basic-auth password, an expiring key.
    let (st, _) = s
        .admin_call(
            "POST",
            "/admin/consumers/bob/credentials",
            Some(json!({"type": "key-auth", "key": "bob-own-key-0123456789"})),
        )
        .await;
    assert_eq!(st, 201);
    let (st, _, _) = s
        .get("/keyed", &[("apikey", "bob-own-key-0123456789")])
        .await;
    assert_eq!(st, 200);
    let (st, _) = s
        .admin_call(
            "POST",
            "/admin/consumers/bob/credentials",
            Some(json!({"type": "basic-auth", "username": "bob", "password": "builder-123"})),
        )
        .await;
    assert_eq!(st, 201);
    let (st, _, echo) = s
        .get("/basic", &[("authorization", &basic("bob", "builder-123"))])
        .await;
    assert_eq!(
        (st, &echo["headers"]["x-consumer-name"]),
        (200, &json!("bob"))
    );
    let (st, short) = s
        .admin_call(
            "POST",
            "/admin/consumers/bob/credentials",
            Some(json!({"type": "key-auth", "expires_in": "2s"})),
        )
        .await;
    assert_eq!(st, 201);
    assert!(short["expires_at"].is_string());
    let short_key = short["key"].as_str().unwrap().to_string();
    let (st, _, _) = s.get("/keyed", &[("apikey", &short_key)]).await;
    assert_eq!(st, 200);
    let expired = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(250),
        || async { s.get("/keyed", &[("apikey", &short_key)]).await.0 == 401 },
    )
    .await;
    assert!(expired, "the key did not expire");

    // Refusals, each with its code and a message naming the problem.
    let cases = [
        (
            "POST",
            "/admin/consumers",
            Some(json!({"name": "bob"})),
            409,
            "conflict",
            "already exists",
        ),
        (
            "POST",
            "/admin/consumers",
            Some(json!({"name": "b o b"})),
            400,
            "invalid_request",
            "not allowed in a consumer name",
        ),
        (
            "POST",
            "/admin/consumers",
            Some(json!({"name": "x", "group": []})),
            400,
            "invalid_request",
            "unknown field `group`",
        ),
        (
            "POST",
            "/admin/consumers",
            Some(json!({"name": "x", "groups": ["a,b"]})),
            400,
            "invalid_request",
            "not a valid group",
        ),
        (
            "POST",
            "/admin/consumers/bob/credentials",
            Some(json!({"type": "password"})),
            400,
            "invalid_request",
            "unknown credential type",
        ),
        (
            "POST",
            "/admin/consumers/bob/credentials",
            Some(json!({"type": "key-auth", "key": "short"})),
            400,
            "invalid_request",
            "at least 16",
        ),
        (
            "POST",
            "/admin/consumers/bob/credentials",
            Some(json!({"type": "key-auth", "key": ALICE_KEY})),
            409,
            "conflict",
            "already belongs",
        ),
        (
            "POST",
            "/admin/consumers/bob/credentials",
            Some(json!({"type": "basic-auth", "username": "alice", "password": "12345678"})),
            409,
            "conflict",
            "already belongs",
        ),
        (
            "POST",
            "/admin/consumers/bob/credentials",
            Some(json!({"type": "key-auth", "expires_at": "tomorrow"})),
            400,
            "invalid_request",
            "RFC 3339",
        ),
        (
            "POST",
            "/admin/consumers/nobody/credentials",
            Some(json!({"type": "key-auth"})),
            404,
            "not_found",
            "nobody",
        ),
        (
            "GET",
            "/admin/consumers/nobody",
            None,
            404,
            "not_found",
            "nobody",
        ),
        (
            "DELETE",
            "/admin/consumers/bob/credentials/nope",
            None,
            404,
            "not_found",
            "nope",
        ),
    ];
    for (m, p, b, status, c, msg) in cases {
        let (st, body) = s.admin_call(m, p, b.clone()).await;
        assert_eq!((st, code(&body)), (status, c), "{m} {p} {b:?}: {body}");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(text.contains(msg), "{m} {p}: {text}");
    }
    let r = s
        .client
        .post(s.admin("/admin/consumers"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Delete the consumer: its credentials go with it.
    let (st, _) = s.admin_call("DELETE", "/admin/consumers/bob", None).await;
    assert_eq!(st, 204);
    let (st, _, _) = s
        .get("/keyed", &[("apikey", "bob-own-key-0123456789")])
        .await;
    assert_eq!(st, 401);
}

#[tokio::test]
async fn the_store_survives_restarts_and_is_shared() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let extra = format!("store:\n  path: \"{}\"\n", db.display());
    let a = LocalGateway::start(bin(), &config(&up.url(), &extra)).await;
    let b = LocalGateway::start(bin(), &config(&up.url(), &extra)).await;
    let client = http_client();
    let (st, _) = admin_call(
        &client,
        a.admin,
        "POST",
        "/admin/consumers",
        Some(json!({"name": "dave"})),
    )
    .await;
    assert_eq!(st, 201);
    let (st, cred) = admin_call(
        &client,
        a.admin,
        "POST",
        "/admin/consumers/dave/credentials",
        Some(json!({"type": "key-auth"})),
    )
    .await;
    assert_eq!(st, 201);
    let key = cred["key"].as_str().unwrap().to_string();

    // The other process sees it within a second or so (generous margin here).
    let url_b = format!("http://{}/keyed", b.addr);
    let seen = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { get(&client, &url_b, &[("apikey", &key)]).await.0 == 200 },
    )
    .await;
    assert!(seen, "the second gateway never accepted the key");

    // A restart keeps it.
    drop(a);
    drop(b);
    let c = LocalGateway::start(bin(), &config(&up.url(), &extra)).await;
    let (st, _, echo) = get(
        &client,
        &format!("http://{}/keyed", c.addr),
        &[("apikey", &key)],
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(echo["headers"]["x-consumer-name"], "dave");
}

#[test]
fn validate_reports_bad_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        r#"
consumers:
  - name: alice
    credentials:
      - {type: key-auth, key: "short"}
      - {type: basic-auth, username: "a:b", password: "x"}
  - name: alice
    groups: ["a,b"]
  - name: eve
    credentials:
      - {type: key-auth, key: "a-long-enough-key-1", expires_at: "soon"}
      - {type: jwt, subject: ""}
      - {type: magic, key: "x"}
consumer_headers:
  name: "bad header"
routes:
  - name: r
    paths: ["/r"]
    plugins:
      key-auth: {locations: ["cookie:x"]}
      acl: {}
      echo: {}
"#,
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["validate", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "consumers[0].credentials[0].key",
        "at least 16 characters",
        "consumers[0].credentials[1].username",
        "consumers[1].name",
        "already declared",
        "consumers[1].groups[0]",
        "consumers[2].credentials[0].expires_at",
        "consumers[2].credentials[1].subject",
        "consumers[2].credentials[2]",
        "consumer_headers.name",
        "routes[0].plugins.key-auth.locations[0]",
        "routes[0].plugins.acl",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
    assert!(
        !err.contains("a-long-enough-key-1"),
        "a secret was echoed:\n{err}"
    );
}
