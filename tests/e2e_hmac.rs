//! End-to-end tests of the `hmac-auth` policy (HTTP Message Signatures, RFC 9421,
//! `hmac-sha256`): the real `portico` binary, a real upstream that echoes what it
//! received, the admin API over HTTP, and a client in this file that signs real
//! requests with its own small signer (aws-lc-rs HMAC-SHA256, SHA-256 content digest).
//!
//! Covers: a declared consumer and one created through the admin API (secret shown
//! once); signed GET and POST (with `Content-Digest`) reaching the upstream with
//! `X-Consumer-Name` and the identical body, over HTTP/1.1 and h2c; the signature
//! headers removed before the upstream (kept with `forward_credentials`); and the
//! refusals, each 401 with `WWW-Authenticate` and never reaching the upstream: tampered
//! body (digest mismatch), wrong secret, replayed nonce, skewed `created`, missing
//! `@authority`, unknown key id, no signature at all.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::{digest, hmac};
use base64::Engine as _;
use portico_test_support::{h2c_client, http_client, LocalGateway, Upstream};
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

const ALICE_KEY_ID: &str = "alice-hmac-1";
const ALICE_SECRET: &str = "alice-shared-secret-0123456789abcdef";

fn config(upstream: &str) -> String {
    format!(
        r#"
upstreams:
  up:
    targets: [{{url: "{upstream}"}}]
consumers:
  - name: alice
    groups: [gold]
    credentials:
      - {{type: hmac-auth, key_id: "{ALICE_KEY_ID}", secret: "{ALICE_SECRET}"}}
routes:
  - name: signed
    paths: ["/signed", "/signed/*"]
    upstream: up
    plugins:
      hmac-auth: {{}}
  - name: forwarded
    paths: ["/forwarded"]
    upstream: up
    plugins:
      hmac-auth: {{forward_credentials: true}}
"#
    )
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A fresh nonce per signed request.
fn nonce() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("n-{}-{}", now(), N.fetch_add(1, Ordering::Relaxed))
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `Content-Digest: sha-256=:...:` (RFC 9530) of a body.
fn content_digest(body: &[u8]) -> String {
    format!(
        "sha-256=:{}:",
        b64(digest::digest(&digest::SHA256, body).as_ref())
    )
}

/// A client's view of one request to sign.
struct ToSign<'a> {
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    /// Header fields the signature may cover, lower-case names.
    headers: Vec<(&'a str, String)>,
}

/// What the signer puts in the signature parameters.
struct Params<'a> {
    key_id: &'a str,
    created: i64,
    nonce: String,
}

/// The client's own RFC 9421 signer: the signature base (§2.5) of the covered
/// components, HMAC-SHA256 with the shared secret; returns `Signature-Input` and
/// `Signature`.
fn sign(r: &ToSign<'_>, components: &[&str], p: &Params<'_>, secret: &[u8]) -> (String, String) {
    let mut base = String::new();
    for c in components {
        let value = match *c {
            "@method" => r.method.to_string(),
            "@authority" => r.authority.to_string(),
            "@path" => r.path.to_string(),
            name => r
                .headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
                .unwrap(),
        };
        base.push_str(&format!("\"{c}\": {value}\n"));
    }
    let list: Vec<String> = components.iter().map(|c| format!("\"{c}\"")).collect();
    let params = format!(
        "({});created={};nonce=\"{}\";keyid=\"{}\";alg=\"hmac-sha256\"",
        list.join(" "),
        p.created,
        p.nonce,
        p.key_id
    );
    base.push_str(&format!("\"@signature-params\": {params}"));
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), base.as_bytes());
    (
        format!("sig1={params}"),
        format!("sig1=:{}:", b64(tag.as_ref())),
    )
}

const GET: &[&str] = &["@method", "@path", "@authority"];
const POST: &[&str] = &["@method", "@path", "@authority", "content-digest"];

struct Setup {
    gw: LocalGateway,
    up: Upstream,
    client: reqwest::Client,
}

async fn setup() -> Setup {
    let up = Upstream::start("up").await;
    let gw = LocalGateway::start(bin(), &config(&up.url())).await;
    Setup {
        gw,
        up,
        client: http_client(),
    }
}

/// An answer: status, headers, JSON body.
type Answer = (u16, reqwest::header::HeaderMap, Value);

impl Setup {
    fn authority(&self) -> String {
        self.gw.addr.to_string()
    }

    /// A signed GET of `path` (the secret, key id, `created` and components given).
    async fn signed_get(
        &self,
        path: &str,
        components: &[&str],
        key_id: &str,
        secret: &str,
        created: i64,
        nonce: &str,
    ) -> Answer {
        let authority = self.authority();
        let r = ToSign {
            method: "GET",
            authority: &authority,
            path,
            headers: vec![],
        };
        let p = Params {
            key_id,
            created,
            nonce: nonce.to_string(),
        };
        let (input, sig) = sign(&r, components, &p, secret.as_bytes());
        self.send(
            self.client
                .get(format!("http://{authority}{path}"))
                .header("signature-input", input)
                .header("signature", sig),
        )
        .await
    }

    /// A POST of `sent` signed (with its `Content-Digest`) as if its body were `signed`.
    async fn signed_post(&self, path: &str, signed: &str, sent: &str, nonce: &str) -> Answer {
        let authority = self.authority();
        let digest = content_digest(signed.as_bytes());
        let r = ToSign {
            method: "POST",
            authority: &authority,
            path,
            headers: vec![("content-digest", digest.clone())],
        };
        let p = Params {
            key_id: ALICE_KEY_ID,
            created: now(),
            nonce: nonce.to_string(),
        };
        let (input, sig) = sign(&r, POST, &p, ALICE_SECRET.as_bytes());
        self.send(
            self.client
                .post(format!("http://{authority}{path}"))
                .header("content-type", "application/json")
                .header("content-digest", digest)
                .header("signature-input", input)
                .header("signature", sig)
                .body(sent.to_string()),
        )
        .await
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Answer {
        answer(rb.send().await.unwrap()).await
    }
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let text = r.text().await.unwrap();
    (
        status,
        h,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Assert a 401 from `hmac-auth` whose message contains `needle`.
fn assert_refused(a: &Answer, needle: &str) {
    let (st, h, body) = a;
    assert_eq!(*st, 401, "{body}");
    assert_eq!(h["www-authenticate"], "Signature realm=\"portico\"");
    assert_eq!(body["error"]["code"], "unauthorized");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(needle), "`{msg}` does not contain `{needle}`");
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_requests_pass_and_reach_the_upstream() {
    let s = setup().await;

    // GET, declared consumer: the upstream learns who, and sees no signature headers.
    let (st, _, echo) = s
        .signed_get(
            "/signed/things",
            GET,
            ALICE_KEY_ID,
            ALICE_SECRET,
            now(),
            &nonce(),
        )
        .await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "alice");
    assert_eq!(echo["headers"]["x-consumer-groups"], "gold");
    assert!(echo["headers"].get("signature").is_none(), "{echo}");
    assert!(echo["headers"].get("signature-input").is_none(), "{echo}");

    // POST with a body and its Content-Digest: the identical bytes go upstream.
    let body = "{\"amount\": 10.50, \"note\": \"caf\\u00e9\"}\n";
    let (st, _, echo) = s.signed_post("/signed/pay", body, body, &nonce()).await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "alice");
    assert_eq!(echo["body"], body);
    assert_eq!(echo["body_len"], body.len());
    assert_eq!(
        echo["headers"]["content-digest"],
        content_digest(body.as_bytes())
    );
    assert!(echo["headers"].get("signature").is_none());

    // HTTP/2 (h2c): the authority comes from `:authority`.
    let authority = s.authority();
    let r = ToSign {
        method: "GET",
        authority: &authority,
        path: "/signed/h2",
        headers: vec![],
    };
    let p = Params {
        key_id: ALICE_KEY_ID,
        created: now(),
        nonce: nonce(),
    };
    let (input, sig) = sign(&r, GET, &p, ALICE_SECRET.as_bytes());
    let resp = h2c_client()
        .get(format!("http://{authority}/signed/h2"))
        .header("signature-input", input)
        .header("signature", sig)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let (st, _, echo) = answer(resp).await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "alice");

    // forward_credentials: the signature headers go on.
    let (st, _, echo) = s
        .signed_get(
            "/forwarded",
            GET,
            ALICE_KEY_ID,
            ALICE_SECRET,
            now(),
            &nonce(),
        )
        .await;
    assert_eq!(st, 200, "{echo}");
    assert!(echo["headers"]["signature"]
        .as_str()
        .unwrap()
        .starts_with("sig1=:"));
    assert!(echo["headers"]["signature-input"]
        .as_str()
        .unwrap()
        .starts_with("sig1=(\"@method\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_signatures_are_refused_before_the_upstream() {
    let s = setup().await;
    s.up.reset_hits();

    // No signature at all: the route's 401 with the challenge.
    let (st, h, _) = s
        .send(s.client.get(format!("http://{}/signed", s.authority())))
        .await;
    assert_eq!(st, 401);
    assert_eq!(h["www-authenticate"], "Signature realm=\"portico\"");

    // Tampered body: signed (and digested) one body, sent another.
    let a = s
        .signed_post(
            "/signed/pay",
            "{\"amount\": 1}",
            "{\"amount\": 9}",
            &nonce(),
        )
        .await;
    assert_refused(&a, "digest mismatch");

    // Wrong secret.
    let a = s
        .signed_get(
            "/signed",
            GET,
            ALICE_KEY_ID,
            "not-alice-secret-0123456789abcdef",
            now(),
            &nonce(),
        )
        .await;
    assert_refused(&a, "bad signature");

    // Skewed `created`: ten minutes old, and ten minutes ahead (default skew 300s).
    let a = s
        .signed_get(
            "/signed",
            GET,
            ALICE_KEY_ID,
            ALICE_SECRET,
            now() - 600,
            &nonce(),
        )
        .await;
    assert_refused(&a, "too old");
    let a = s
        .signed_get(
            "/signed",
            GET,
            ALICE_KEY_ID,
            ALICE_SECRET,
            now() + 600,
            &nonce(),
        )
        .await;
    assert_refused(&a, "in the future");

    // `@authority` not covered: refused, and told what to sign.
    let a = s
        .signed_get(
            "/signed",
            &["@method", "@path"],
            ALICE_KEY_ID,
            ALICE_SECRET,
            now(),
            &nonce(),
        )
        .await;
    assert_refused(&a, "`@authority`");
    assert_eq!(
        a.1["accept-signature"],
        "sig1=(\"@method\" \"@path\" \"@authority\");alg=\"hmac-sha256\";created"
    );

    // Unknown key id.
    let a = s
        .signed_get("/signed", GET, "mallory-1", ALICE_SECRET, now(), &nonce())
        .await;
    assert_refused(&a, "key id is unknown");

    // Nothing refused reached the upstream.
    assert_eq!(s.up.hits(), 0);

    // Replayed nonce: the same signed request twice.
    let n = nonce();
    let created = now();
    let (st, _, _) = s
        .signed_get("/signed", GET, ALICE_KEY_ID, ALICE_SECRET, created, &n)
        .await;
    assert_eq!(st, 200);
    let a = s
        .signed_get("/signed", GET, ALICE_KEY_ID, ALICE_SECRET, created, &n)
        .await;
    assert_refused(&a, "replayed");
    assert_eq!(s.up.hits(), 1);

    // Neither secrets nor signatures reach the log.
    let logs = s.gw.gw.logs();
    assert!(!logs.contains(ALICE_SECRET));
    assert!(!logs.contains("sig1=:"));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_created_hmac_credentials_work_at_once() {
    let s = setup().await;
    let admin = |p: &str| format!("http://{}{p}", s.gw.admin);
    let r = s
        .client
        .post(admin("/admin/consumers"))
        .json(&json!({"name": "dave", "groups": ["partners"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = s
        .client
        .post(admin("/admin/consumers/dave/credentials"))
        .json(&json!({"type": "hmac-auth"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let cred: Value = r.json().await.unwrap();
    let key_id = cred["key_id"].as_str().unwrap().to_string();
    let secret = cred["secret"].as_str().unwrap().to_string();
    assert!(secret.len() >= 32, "{cred}");

    // Live without a reload.
    let (st, _, echo) = s
        .signed_get("/signed", GET, &key_id, &secret, now(), &nonce())
        .await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "dave");
    assert_eq!(echo["headers"]["x-consumer-groups"], "partners");

    // The secret is shown only once.
    let listed: Value = s
        .client
        .get(admin("/admin/consumers/dave/credentials"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!listed.to_string().contains(&secret), "{listed}");

    // Another consumer's secret does not sign for this key id.
    let a = s
        .signed_get("/signed", GET, &key_id, ALICE_SECRET, now(), &nonce())
        .await;
    assert_refused(&a, "bad signature");
}
