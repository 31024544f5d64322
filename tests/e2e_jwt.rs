//! End-to-end tests of the `jwt` policy: the real `portico` binary, a real upstream that
//! echoes what it received, and a test identity provider (an HTTP server serving a
//! JWKS document and an OpenID Connect discovery document that the tests change).
//!
//! Keys are generated at test time (RSA 2048, P-256, Ed25519) and tokens minted here.
//! Covers: static keys (inline PEM, PEM file, HMAC secret), every claim check and
//! refusal with its RFC 6750 challenge, `alg: none`, HS/RS algorithm confusion, token
//! locations, consumer mapping, `claims_to_headers` (client-sent copies replaced), the
//! token removed before the upstream and kept out of the logs, the anonymous consumer;
//! JWKS fetched at the first request, key rotation without a reload, the refresh rate
//! limit, an identity provider outage (cached keys kept; no keys: 401), OIDC
//! discovery; and `portico validate` on bad settings.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use portico_test_support::upstream::{handler, json_response};
use portico_test_support::{http_client, LocalGateway, Upstream};
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

const ISS: &str = "https://issuer.test";
const HS_SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A signing key, its public half as PEM and as a JWK.
struct Signer {
    enc: EncodingKey,
    alg: Algorithm,
    public_pem: String,
    jwk: Value,
}

impl Signer {
    fn rsa() -> Signer {
        let kp =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .unwrap();
        let enc = EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes()).unwrap();
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap()).unwrap();
        // No `alg`: the key serves every RSA algorithm (RS*, PS*).
        jwk.as_object_mut().unwrap().remove("alg");
        Signer {
            enc,
            alg: Algorithm::RS256,
            public_pem: kp.public_key_pem(),
            jwk,
        }
    }

    fn ec() -> Signer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let jwk =
            serde_json::to_value(Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap()).unwrap();
        Signer {
            enc,
            alg: Algorithm::ES256,
            public_pem: kp.public_key_pem(),
            jwk,
        }
    }

    fn ed() -> Signer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let enc = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
        let jwk = json!({"kty": "OKP", "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(kp.public_key_raw())});
        Signer {
            enc,
            alg: Algorithm::EdDSA,
            public_pem: kp.public_key_pem(),
            jwk,
        }
    }

    fn jwk(&self, kid: &str) -> Value {
        let mut j = self.jwk.clone();
        j["kid"] = json!(kid);
        j
    }

    fn token(&self, kid: Option<&str>, claims: Value) -> String {
        self.token_with(self.alg, kid, claims)
    }

    fn token_with(&self, alg: Algorithm, kid: Option<&str>, claims: Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, &claims, &self.enc).unwrap()
    }
}

fn hs_token(secret: &[u8], claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// The test identity provider's state.
struct IdpState {
    jwks: Value,
    jwks_status: u16,
    /// Its own URL (the issuer of discovery).
    url: String,
    hits: HashMap<String, usize>,
}

type Idp = Arc<Mutex<IdpState>>;

/// The identity provider over plain HTTP, or over HTTPS with `tls`.
async fn start_idp(state: Idp, tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
    let st = state.clone();
    let plain = tls.is_none();
    let up = Upstream::spawn(
        "idp",
        "127.0.0.1:0".parse().unwrap(),
        tls,
        Some(handler(move |req| {
            let st = st.clone();
            async move {
                let path = req.uri().path().to_string();
                let (status, body, cache) = {
                    let mut s = st.lock().unwrap();
                    *s.hits.entry(path.clone()).or_default() += 1;
                    match path.as_str() {
                        "/jwks" => (s.jwks_status, s.jwks.clone(), Some("public, max-age=300")),
                        "/jwks-b" | "/jwks-oidc" | "/jwks-tls" => (200, s.jwks.clone(), None),
                        "/.well-known/openid-configuration" => (
                            200,
                            json!({"issuer": s.url, "jwks_uri": format!("{}/jwks-oidc", s.url)}),
                            None,
                        ),
                        "/other/.well-known/openid-configuration" => (
                            200,
                            json!({"issuer": "https://someone-else.test",
                            "jwks_uri": format!("{}/jwks-oidc", s.url)}),
                            None,
                        ),
                        "/dead" => (500, json!({"error": "down"}), None),
                        _ => (404, json!({"error": "not found"}), None),
                    }
                };
                // A slow key set: requests arriving meanwhile wait for this fetch.
                if path == "/jwks-b" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let mut resp = json_response(http::StatusCode::from_u16(status).unwrap(), &body);
                if let Some(c) = cache {
                    resp.headers_mut()
                        .insert("cache-control", http::HeaderValue::from_static(c));
                }
                resp
            }
        })),
    )
    .await;
    if plain {
        state.lock().unwrap().url = up.url();
    }
    up
}

fn hits(idp: &Idp, path: &str) -> usize {
    idp.lock().unwrap().hits.get(path).copied().unwrap_or(0)
}

struct Setup {
    gw: LocalGateway,
    idp: Idp,
    _idp_server: Upstream,
    _idp_tls: Upstream,
    _up: Upstream,
    _dir: tempfile::TempDir,
    client: reqwest::Client,
    rsa: Signer,
    ec: Signer,
    ed: Signer,
}

async fn setup() -> Setup {
    let (rsa, ec, ed) = (Signer::rsa(), Signer::ec(), Signer::ed());
    let idp: Idp = Arc::new(Mutex::new(IdpState {
        jwks: json!({"keys": [rsa.jwk("k1"), ec.jwk("k2")]}),
        jwks_status: 200,
        url: String::new(),
        hits: HashMap::new(),
    }));
    let idp_server = start_idp(idp.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    // The same provider over HTTPS, with a certificate of a test CA.
    let ca = portico_test_support::Ca::new();
    let cert = ca.issue(&["127.0.0.1"]);
    let ca_path = ca.write_cert(dir.path(), "idp-ca");
    let idp_tls = start_idp(
        idp.clone(),
        Some(Arc::new(portico_test_support::certs::server_config(
            &cert.cert_pem,
            &cert.key_pem,
        ))),
    )
    .await;
    let up = Upstream::start("up").await;
    let ed_path = dir.path().join("ed25519.pem");
    std::fs::write(&ed_path, &ed.public_pem).unwrap();
    let idp_url = idp_server.url();
    let rsa_pem = serde_json::to_string(&rsa.public_pem).unwrap();
    let config = format!(
        r#"
upstreams:
  up:
    targets: [{{url: "{up}"}}]
consumers:
  - name: alice
    groups: [gold]
    credentials:
      - {{type: jwt, subject: "user-alice"}}
routes:
  - name: static
    paths: ["/static"]
    upstream: up
    plugins:
      jwt:
        public_key: {rsa_pem}
        issuer: "{ISS}"
        audiences: [api, admin]
        claims_to_headers: {{sub: X-User-Id, email: X-User-Email, roles: X-Roles}}
  - name: ed-file
    paths: ["/ed"]
    upstream: up
    plugins:
      jwt: {{public_key: "{ed_path}", require_consumer: true}}
  - name: hs
    paths: ["/hs"]
    upstream: up
    plugins:
      jwt:
        secret: "{HS_SECRET}"
        locations: ["header:x-token", "query:token", "cookie:session"]
  - name: forward
    paths: ["/forward"]
    upstream: up
    plugins:
      jwt: {{secret: "{HS_SECRET}", forward_credentials: true}}
  - name: guest
    paths: ["/guest"]
    upstream: up
    plugins:
      jwt: {{secret: "{HS_SECRET}", anonymous: guest}}
  - name: jwks
    paths: ["/jwks"]
    upstream: up
    plugins:
      jwt: {{jwks_uri: "{idp_url}/jwks", jwks_min_refresh: 1s, issuer: "{ISS}"}}
  - name: jwks-default
    paths: ["/jwks-default"]
    upstream: up
    plugins:
      jwt: {{jwks_uri: "{idp_url}/jwks-b"}}
  - name: dead
    paths: ["/dead"]
    upstream: up
    plugins:
      jwt: {{jwks_uri: "{idp_url}/dead"}}
  - name: jwks-tls
    paths: ["/jwks-tls"]
    upstream: up
    plugins:
      jwt: {{jwks_uri: "{idp_tls}/jwks-tls", ca: "{ca_path}"}}
  - name: jwks-tls-untrusted
    paths: ["/jwks-tls-untrusted"]
    upstream: up
    plugins:
      jwt: {{jwks_uri: "{idp_tls}/jwks-tls"}}
  - name: oidc
    paths: ["/oidc"]
    upstream: up
    plugins:
      jwt: {{issuer: "{idp_url}"}}
  - name: oidc-wrong
    paths: ["/oidc-wrong"]
    upstream: up
    plugins:
      jwt: {{issuer: "{idp_url}/other"}}
"#,
        up = up.url(),
        ed_path = ed_path.display(),
        idp_tls = idp_tls.url(),
        ca_path = ca_path.display(),
    );
    let gw = LocalGateway::start(bin(), &config).await;
    Setup {
        gw,
        idp,
        _idp_server: idp_server,
        _idp_tls: idp_tls,
        _up: up,
        _dir: dir,
        client: http_client(),
        rsa,
        ec,
        ed,
    }
}

type Answer = (u16, reqwest::header::HeaderMap, Value);

impl Setup {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut rb = self.client.get(format!("http://{}{path}", self.gw.addr));
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

    async fn bearer(&self, path: &str, token: &str) -> Answer {
        self.get(path, &[("authorization", &format!("Bearer {token}"))])
            .await
    }
}

/// A 401 saying `what`, with the RFC 6750 challenge naming the same failure.
#[track_caller]
fn refused(a: &Answer, what: &str) {
    let (st, h, body) = a;
    assert_eq!(*st, 401, "expected a 401 for `{what}`: {body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(what), "`{msg}` does not say `{what}`");
    let ch = h["www-authenticate"].to_str().unwrap();
    assert!(
        ch.starts_with("Bearer realm=\"portico\", error=\"invalid_token\", error_description=\""),
        "{ch}"
    );
    assert!(ch.contains(msg), "{ch}");
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "user-alice", "iss": ISS, "aud": "api",
        "iat": now(), "exp": now() + 300});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn static_keys_claims_and_refusals() {
    let s = setup().await;
    let mut tokens = Vec::new();

    // No token: 401 with the plain challenge.
    let (st, h, body) = s.get("/static", &[]).await;
    assert_eq!(st, 401, "{body}");
    assert_eq!(h["www-authenticate"], "Bearer realm=\"portico\"");

    // A valid RS256 token: the consumer, the claim headers (forged copies replaced),
    // the token removed.
    let t = s.rsa.token(
        None,
        claims(json!({"email": "alice@example.test", "roles": ["admin", "dev"]})),
    );
    tokens.push(t.clone());
    let (st, _, echo) = s
        .get(
            "/static",
            &[
                ("authorization", &format!("Bearer {t}")),
                ("x-user-id", "mallory"),
                ("X-User-Email", "mallory@example.test"),
                ("x-consumer-name", "mallory"),
            ],
        )
        .await;
    assert_eq!(st, 200, "{echo}");
    let hd = &echo["headers"];
    assert_eq!(hd["x-consumer-name"], "alice");
    assert_eq!(hd["x-consumer-groups"], "gold");
    assert_eq!(hd["x-user-id"], "user-alice");
    assert_eq!(hd["x-user-email"], "alice@example.test");
    assert_eq!(hd["x-roles"], r#"["admin","dev"]"#);
    assert!(hd.get("authorization").is_none(), "{echo}");
    // PS256 with the same RSA key; `aud` as a list.
    let t = s.rsa.token_with(
        Algorithm::PS256,
        None,
        claims(json!({"aud": ["other", "admin"]})),
    );
    let (st, _, echo) = s.bearer("/static", &t).await;
    assert_eq!(st, 200, "{echo}");

    // A claim the token lacks: a client-sent header of that name is still removed.
    let t = s.rsa.token(None, claims(json!({})));
    let (st, _, echo) = s
        .get(
            "/static",
            &[
                ("authorization", &format!("Bearer {t}")),
                ("x-user-email", "forged@example.test"),
            ],
        )
        .await;
    assert_eq!(st, 200);
    assert!(echo["headers"].get("x-user-email").is_none(), "{echo}");
    // An unknown subject: authenticated, without a consumer.
    let t = s.rsa.token(None, claims(json!({"sub": "user-bob"})));
    let (st, _, echo) = s.bearer("/static", &t).await;
    assert_eq!(st, 200);
    assert!(echo["headers"].get("x-consumer-name").is_none(), "{echo}");
    assert_eq!(echo["headers"]["x-user-id"], "user-bob");

    // Every refusal says what failed.
    let n = now();
    let cases: Vec<(String, &str)> = vec![
        (
            s.rsa.token(None, claims(json!({"exp": n - 3600}))),
            "has expired",
        ),
        (
            s.rsa.token(None, claims(json!({"nbf": n + 3600}))),
            "not yet valid",
        ),
        (
            s.rsa.token(None, claims(json!({"iat": n + 3600}))),
            "issued in the future",
        ),
        (s.rsa.token(None, claims(json!({"exp": null}))), "no expiry"),
        (
            s.rsa
                .token(None, claims(json!({"iss": "https://evil.test"}))),
            "issuer",
        ),
        (s.rsa.token(None, claims(json!({"iss": null}))), "issuer"),
        (
            s.rsa.token(None, claims(json!({"aud": "someone-else"}))),
            "audience",
        ),
        (s.rsa.token(None, claims(json!({"aud": null}))), "audience"),
        // Signed by another RSA key.
        (Signer::rsa().token(None, claims(json!({}))), "signature"),
        // HS256 with the RSA public key's PEM as the HMAC secret (algorithm confusion).
        (
            hs_token(s.rsa.public_pem.as_bytes(), claims(json!({}))),
            "algorithm is not allowed",
        ),
        // A P-256 token on a route with an RSA key.
        (
            s.ec.token(None, claims(json!({}))),
            "algorithm is not allowed",
        ),
    ];
    for (t, what) in &cases {
        tokens.push(t.clone());
        refused(&s.bearer("/static", t).await, what);
    }
    // A valid token with its claims changed.
    let good = s.rsa.token(None, claims(json!({})));
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(&claims(json!({"sub": "root"}))),
        parts[2]
    );
    refused(&s.bearer("/static", &forged).await, "signature");
    // Unsigned tokens (alg none), however spelled.
    for alg in ["none", "None"] {
        let t = format!(
            "{}.{}.",
            b64(&json!({"alg": alg, "typ": "JWT"})),
            b64(&claims(json!({})))
        );
        refused(&s.bearer("/static", &t).await, "alg none");
    }
    // Garbage that looks like a JWT.
    refused(
        &s.bearer("/static", "abc.def.ghi").await,
        "not a well-formed JWT",
    );

    // Ed25519 from a PEM file, with require_consumer.
    let t = s.ed.token(None, claims(json!({})));
    let (st, _, echo) = s.bearer("/ed", &t).await;
    assert_eq!(
        (st, &echo["headers"]["x-consumer-name"]),
        (200, &json!("alice"))
    );
    let t = s.ed.token(None, claims(json!({"sub": "user-bob"})));
    refused(&s.bearer("/ed", &t).await, "no known consumer");

    // HS256 from a custom header, the query, a cookie; each removed before the upstream.
    let t = hs_token(HS_SECRET.as_bytes(), claims(json!({})));
    tokens.push(t.clone());
    let (st, _, echo) = s.get("/hs", &[("x-token", &t)]).await;
    assert_eq!(st, 200, "{echo}");
    assert!(echo["headers"].get("x-token").is_none());
    assert_eq!(echo["headers"]["x-consumer-name"], "alice");
    let (st, _, echo) = s.get(&format!("/hs?a=1&token={t}&b=2"), &[]).await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["query"], "a=1&b=2");
    let (st, _, echo) = s
        .get(
            "/hs",
            &[("cookie", &format!("theme=dark; session={t}; lang=en"))],
        )
        .await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["headers"]["cookie"], "theme=dark; lang=en");
    // The default location (bearer) is not one of this route's.
    let (st, _, _) = s.bearer("/hs", &t).await;
    assert_eq!(st, 401);
    // A wrong secret in the query is refused.
    let bad = hs_token(b"not-the-secret-not-the-secret-0123456", claims(json!({})));
    tokens.push(bad.clone());
    refused(&s.get(&format!("/hs?token={bad}"), &[]).await, "signature");

    // forward_credentials: the token goes on.
    let (st, _, echo) = s.bearer("/forward", &t).await;
    assert_eq!(st, 200);
    assert_eq!(echo["headers"]["authorization"], format!("Bearer {t}"));
    // anonymous: no token → the guest consumer; a bad token is still refused.
    let (st, _, echo) = s.get("/guest", &[]).await;
    assert_eq!(
        (st, &echo["headers"]["x-consumer-name"]),
        (200, &json!("guest"))
    );
    refused(&s.bearer("/guest", &bad).await, "signature");
    // A bearer credential that is not a JWT is not this policy's: the route's 401.
    let (st, h, _) = s.bearer("/static", "opaque-api-key").await;
    assert_eq!(
        (st, h["www-authenticate"].to_str().unwrap()),
        (401, "Bearer realm=\"portico\"")
    );

    // Tokens never reach the logs.
    assert!(
        s.gw.gw
            .wait_for_log("\"consumer\":\"alice\"", Duration::from_secs(5)),
        "the access log names the consumer"
    );
    std::thread::sleep(Duration::from_millis(300));
    let logs = s.gw.gw.logs();
    for t in &tokens {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!logs.contains(sig), "a token reached the logs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_rotation_discovery_and_rate_limit() {
    let s = setup().await;
    // Building the policies fetched nothing: keys come at the first request.
    assert_eq!(hits(&s.idp, "/jwks"), 0);
    let c = || claims(json!({}));

    let (st, _, echo) = s.bearer("/jwks", &s.rsa.token(Some("k1"), c())).await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "alice");
    assert_eq!(hits(&s.idp, "/jwks"), 1);
    let (st, _, _) = s.bearer("/jwks", &s.ec.token(Some("k2"), c())).await;
    assert_eq!(st, 200);
    let (st, _, _) = s
        .bearer(
            "/jwks",
            &s.rsa.token_with(Algorithm::PS512, Some("k1"), c()),
        )
        .await;
    assert_eq!(st, 200);
    // No kid: the keys of the token's type are tried.
    let (st, _, _) = s.bearer("/jwks", &s.ec.token(None, c())).await;
    assert_eq!(st, 200);
    assert_eq!(hits(&s.idp, "/jwks"), 1, "cached keys are used");
    // A kid naming a key of another type; HMAC never.
    refused(
        &s.bearer("/jwks", &s.ec.token(Some("k1"), c())).await,
        "not allowed for its key",
    );
    refused(
        &s.bearer("/jwks", &hs_token(HS_SECRET.as_bytes(), c()))
            .await,
        "algorithm is not allowed",
    );

    // Rotation: k3 (Ed25519) in, k1 out. A token of the new key is accepted without a
    // reload (its unknown kid makes the gateway fetch again).
    s.idp.lock().unwrap().jwks = json!({"keys": [s.ed.jwk("k3"), s.ec.jwk("k2")]});
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (st, _, echo) = s.bearer("/jwks", &s.ed.token(Some("k3"), c())).await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(hits(&s.idp, "/jwks"), 2);
    // The removed key is refused, and within jwks_min_refresh (1s) nothing is fetched.
    refused(
        &s.bearer("/jwks", &s.rsa.token(Some("k1"), c())).await,
        "key id (kid) is unknown",
    );
    assert_eq!(hits(&s.idp, "/jwks"), 2);

    // Made-up kids cannot make the gateway hammer the identity provider: at most one
    // fetch per jwks_min_refresh (default 10s here).
    // Concurrent first requests: one fetch, which they all wait for.
    let t = s.ec.token(Some("k2"), c());
    let answers = futures_util::future::join_all((0..8).map(|i| {
        let (t, s) = (&t, &s);
        async move {
            tokio::time::sleep(Duration::from_millis(20 * i)).await;
            s.bearer("/jwks-default", t).await.0
        }
    }))
    .await;
    assert_eq!(answers, [200; 8]);
    assert_eq!(hits(&s.idp, "/jwks-b"), 1);
    for i in 0..25 {
        let t = s.ec.token(Some(&format!("garbage-{i}")), c());
        refused(&s.bearer("/jwks-default", &t).await, "key id");
    }
    assert_eq!(hits(&s.idp, "/jwks-b"), 1, "garbage kids caused fetches");
    let before = hits(&s.idp, "/jwks");
    for i in 0..10 {
        let t = s.ec.token(Some(&format!("garbage-{i}")), c());
        refused(&s.bearer("/jwks", &t).await, "key id");
    }
    assert!(hits(&s.idp, "/jwks") <= before + 1);

    // Outage: the fetch fails, the cached keys keep working.
    s.idp.lock().unwrap().jwks_status = 503;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = hits(&s.idp, "/jwks");
    refused(
        &s.bearer("/jwks", &s.rsa.token(Some("k9"), c())).await,
        "key id",
    );
    assert_eq!(hits(&s.idp, "/jwks"), before + 1);
    let (st, _, _) = s.bearer("/jwks", &s.ed.token(Some("k3"), c())).await;
    assert_eq!(st, 200, "cached keys were dropped on a failed fetch");
    assert!(s.gw.gw.wait_for_log(
        "fetching the JWT signing keys failed",
        Duration::from_secs(5)
    ));

    // No keys at all: 401 saying so.
    let (st, h, body) = s.bearer("/dead", &s.rsa.token(Some("k1"), c())).await;
    assert_eq!(st, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("keys to verify the token are unavailable"),
        "{body}"
    );
    assert_eq!(h["www-authenticate"], "Bearer realm=\"portico\"");
    assert!(s.gw.gw.logs().contains("/dead: status 500"));

    // Over HTTPS: a key set from a server of a test CA given as `ca`; without it (the
    // system's roots), the server is not trusted and there are no keys.
    assert!(s.idp.lock().unwrap().url.starts_with("http://"));
    let (st, _, body) = s.bearer("/jwks-tls", &s.ec.token(Some("k2"), c())).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(hits(&s.idp, "/jwks-tls"), 1);
    let (st, _, body) = s
        .bearer("/jwks-tls-untrusted", &s.ec.token(Some("k2"), c()))
        .await;
    assert_eq!(st, 401, "{body}");
    assert_eq!(hits(&s.idp, "/jwks-tls"), 1);

    // OpenID Connect discovery: the issuer's document names the key set.
    let idp_url = s.idp.lock().unwrap().url.clone();
    let oc = |extra: Value| {
        let mut c = claims(extra);
        c["iss"] = json!(idp_url);
        c
    };
    let (st, _, echo) = s
        .bearer("/oidc", &s.ec.token(Some("k2"), oc(json!({}))))
        .await;
    assert_eq!(st, 200, "{echo}");
    assert_eq!(hits(&s.idp, "/.well-known/openid-configuration"), 1);
    assert_eq!(hits(&s.idp, "/jwks-oidc"), 1);
    let (st, _, _) = s
        .bearer("/oidc", &s.ed.token(Some("k3"), oc(json!({}))))
        .await;
    assert_eq!(st, 200);
    // The discovered issuer is also the required `iss`.
    refused(
        &s.bearer("/oidc", &s.ec.token(Some("k2"), claims(json!({}))))
            .await,
        "issuer",
    );
    // A discovery document naming another issuer is not used.
    let (st, _, body) = s
        .bearer("/oidc-wrong", &s.ec.token(Some("k2"), oc(json!({}))))
        .await;
    assert_eq!(st, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unavailable"));
    assert!(s
        .gw
        .gw
        .wait_for_log("someone-else.test", Duration::from_secs(5)));
}

#[test]
fn validate_reports_bad_jwt_settings() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        r#"
routes:
  - name: r0
    paths: ["/r0"]
    plugins:
      jwt: {}
      echo: {}
  - name: r1
    paths: ["/r1"]
    plugins:
      jwt:
        secret: "too-short-secret"
        algorithms: [none, RS256, HS257]
        locations: ["form:token"]
        claims_to_headers: {sub: "bad header"}
        leeway: soon
      echo: {}
  - name: r2
    paths: ["/r2"]
    plugins:
      jwt:
        jwks_uri: "http://idp.example.com/jwks"
        public_key: "keys/public.pem"
        jwks_cache_min: 2h
        jwks_cache_max: 1h
      echo: {}
  - name: r3
    paths: ["/r3"]
    plugins:
      jwt: {issuer: "https://idp.example.com", audiences: [api], requires_exp: true}
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
        "routes[0].plugins.jwt",
        "no keys to verify tokens",
        "routes[1].plugins.jwt.leeway",
        "routes[2].plugins.jwt.jwks_uri",
        "https",
        "routes[2].plugins.jwt.public_key",
        "absolute path",
        "routes[3].plugins.jwt.requires_exp",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
    assert!(
        !err.contains("too-short-secret"),
        "a secret was echoed:\n{err}"
    );

    // The same settings without the structural error report the rest.
    std::fs::write(
        &f,
        r#"
routes:
  - name: r1
    paths: ["/r1"]
    plugins:
      jwt:
        secret: "too-short-secret"
        algorithms: [none, RS256, HS257]
        locations: ["form:token"]
        claims_to_headers: {sub: "bad header"}
      echo: {}
  - name: r2
    paths: ["/r2"]
    plugins:
      jwt:
        jwks_uri: "https://idp.example.com/jwks"
        jwks_cache_min: 2h
        jwks_cache_max: 1h
        ca: "/nonexistent/ca.pem"
      echo: {}
  - name: ok
    paths: ["/ok"]
    plugins:
      jwt: {issuer: "https://idp.example.com", audiences: [api]}
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
        "routes[0].plugins.jwt.secret",
        "at least 32 bytes",
        "routes[0].plugins.jwt.algorithms[0]",
        "never accepted",
        "routes[0].plugins.jwt.algorithms[1]",
        "no configured key can verify RS256",
        "routes[0].plugins.jwt.algorithms[2]",
        "routes[0].plugins.jwt.locations[0]",
        "routes[0].plugins.jwt.claims_to_headers.sub",
        "routes[1].plugins.jwt.jwks_cache_min",
        "routes[1].plugins.jwt.ca",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
    assert!(
        !err.contains("routes[2]"),
        "a valid route was reported:\n{err}"
    );
    assert!(
        !err.contains("too-short-secret"),
        "a secret was echoed:\n{err}"
    );
}
