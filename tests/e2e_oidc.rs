//! End-to-end tests of the `oidc` policy (an OpenID Connect relying party for browser
//! apps): the real `portico` binary, an echo upstream, and a test OpenID provider
//! served here that implements discovery, `/authorize` (checks the client, the
//! redirect URI and the PKCE parameters, then approves at once by redirecting back
//! with a code), `/token` (client_secret_basic; the code, redirect URI and PKCE
//! verifier checked against the authorization request; ID tokens signed RS256 with a
//! key made here; the refresh grant with rotating refresh tokens), `/jwks` and
//! `/logout`.
//!
//! The browser is played by hand: redirects are not followed by the client, each
//! `Location` is followed here and cookies are carried from `Set-Cookie` answers.
//!
//! Covers: the whole login (302 to the provider → back to the callback → 302 to the
//! original URL with the session cookie, its attributes), the upstream seeing the user
//! (claim headers, consumer, no session cookie, other cookies kept), a tampered cookie
//! (back to the login), a wrong state, the provider's `error=`, a replayed callback,
//! the refresh of an expired access token (single-flight, refreshed claims) and a
//! failed refresh ending the session, logout through the provider's
//! `end_session_endpoint`, API and XHR clients (401, not 302), a bearer token handled
//! by `jwt` on the same route, open-redirect attempts, `Secure` left off only with
//! `allow_http` on plain http, and `portico validate` on bad settings.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http::StatusCode;
use http_body_util::BodyExt;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use portico_test_support::upstream::{full, handler, json_response, BoxBody};
use portico_test_support::{http_client, LocalGateway, Upstream};
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

const CLIENT_ID: &str = "portal";
const CLIENT_SECRET: &str = "portal-secret";
const SESSION_SECRET: &str = "a-session-secret-of-at-least-32-bytes-long";
const HTML: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sha256_b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        s.as_bytes(),
    ))
}

/// `a=1&b=x%20y` → a map (the first value of each name), `+` as space.
fn form(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let d = |x: &str| {
            percent_encoding::percent_decode_str(&x.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        out.entry(d(k)).or_insert_with(|| d(v));
    }
    out
}

/// One character of a cookie value changed.
fn tamper(v: &str) -> String {
    let mut bytes = v.as_bytes().to_vec();
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

/// An authorization request the provider approved.
struct Grant {
    challenge: String,
    nonce: String,
    redirect_uri: String,
}

/// The test OpenID provider's state.
struct OpState {
    url: String,
    enc: EncodingKey,
    jwk: Value,
    /// The redirect URIs registered for the client.
    redirect_uris: Vec<String>,
    codes: HashMap<String, Grant>,
    refresh_tokens: HashMap<String, usize>,
    expires_in: i64,
    refuse_refresh: bool,
    next: usize,
    token_calls: usize,
    refreshes: usize,
    /// Why the provider refused a request (a test that expects none checks it is empty).
    refused: Vec<String>,
}

type Op = Arc<Mutex<OpState>>;

impl OpState {
    fn id_token(&self, nonce: Option<&str>, email: &str) -> String {
        let mut claims = json!({"iss": self.url, "sub": "user-1", "aud": CLIENT_ID,
            "iat": now(), "exp": now() + 300, "email": email, "name": "User One"});
        if let Some(n) = nonce {
            claims["nonce"] = json!(n);
        }
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("k1".into());
        encode(&h, &claims, &self.enc).unwrap()
    }

    /// A bearer token for an API (audience `api`), signed by the provider.
    fn api_token(&self) -> String {
        let claims = json!({"iss": self.url, "sub": "user-1", "aud": "api",
            "iat": now(), "exp": now() + 300});
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("k1".into());
        encode(&h, &claims, &self.enc).unwrap()
    }

    fn refuse(&mut self, why: String) -> (StatusCode, Value) {
        self.refused.push(why.clone());
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": why}),
        )
    }

    fn authorize(&mut self, q: &HashMap<String, String>) -> Result<String, (StatusCode, Value)> {
        let get = |k: &str| q.get(k).cloned().unwrap_or_default();
        if get("response_type") != "code" {
            return Err(self.refuse(format!("response_type {:?}", get("response_type"))));
        }
        if get("client_id") != CLIENT_ID {
            return Err(self.refuse(format!("client_id {:?}", get("client_id"))));
        }
        let redirect_uri = get("redirect_uri");
        if !self.redirect_uris.contains(&redirect_uri) {
            return Err(self.refuse(format!("redirect_uri {redirect_uri:?}")));
        }
        if !get("scope").split(' ').any(|s| s == "openid") {
            return Err(self.refuse(format!("scope {:?}", get("scope"))));
        }
        if get("code_challenge_method") != "S256" || get("code_challenge").len() != 43 {
            return Err(self.refuse("PKCE parameters".into()));
        }
        let (state, nonce) = (get("state"), get("nonce"));
        if state.len() < 22 || nonce.len() < 22 {
            return Err(self.refuse("state or nonce too short".into()));
        }
        self.next += 1;
        let code = format!("code-{}", self.next);
        self.codes.insert(
            code.clone(),
            Grant {
                challenge: get("code_challenge"),
                nonce,
                redirect_uri: redirect_uri.clone(),
            },
        );
        let iss: String =
            percent_encoding::utf8_percent_encode(&self.url, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        Ok(format!(
            "{redirect_uri}?code={code}&state={state}&iss={iss}"
        ))
    }

    fn token(&mut self, basic: Option<&str>, f: &HashMap<String, String>) -> (StatusCode, Value) {
        self.token_calls += 1;
        let expected = format!(
            "Basic {}",
            STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
        );
        if basic != Some(expected.as_str()) {
            self.refused
                .push(format!("client authentication {basic:?}"));
            return (StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
        }
        let get = |k: &str| f.get(k).cloned().unwrap_or_default();
        match get("grant_type").as_str() {
            "authorization_code" => {
                let Some(g) = self.codes.remove(&get("code")) else {
                    return self.invalid_grant(format!("unknown code {:?}", get("code")));
                };
                if g.redirect_uri != get("redirect_uri") {
                    return self.invalid_grant("redirect_uri differs".into());
                }
                if sha256_b64(&get("code_verifier")) != g.challenge {
                    return self.invalid_grant("the code_verifier does not match".into());
                }
                let id = self.id_token(Some(&g.nonce), "u1@example.test");
                (StatusCode::OK, self.tokens(id))
            }
            "refresh_token" => {
                if self.refuse_refresh {
                    return (StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"}));
                }
                let Some(n) = self.refresh_tokens.remove(&get("refresh_token")) else {
                    return self.invalid_grant("unknown refresh token".into());
                };
                self.refreshes += 1;
                let id = self.id_token(None, &format!("u1+{n}@example.test"));
                (StatusCode::OK, self.tokens(id))
            }
            other => self.invalid_grant(format!("grant_type {other:?}")),
        }
    }

    fn invalid_grant(&mut self, why: String) -> (StatusCode, Value) {
        self.refused.push(why);
        (StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"}))
    }

    fn tokens(&mut self, id_token: String) -> Value {
        self.next += 1;
        let rt = format!("refresh-{}", self.next);
        self.refresh_tokens.insert(rt.clone(), self.refreshes + 1);
        json!({"access_token": format!("access-{}", self.next), "token_type": "Bearer",
            "expires_in": self.expires_in, "refresh_token": rt, "id_token": id_token})
    }
}

fn redirect_to(location: &str) -> http::Response<BoxBody> {
    let mut r = http::Response::new(full(""));
    *r.status_mut() = StatusCode::FOUND;
    r.headers_mut()
        .insert("location", http::HeaderValue::from_str(location).unwrap());
    r
}

async fn start_op(op: Op) -> Upstream {
    let st = op.clone();
    let up = Upstream::start_with(
        "op",
        handler(move |req| {
            let st = st.clone();
            async move {
                let path = req.uri().path().to_string();
                let query = form(req.uri().query().unwrap_or(""));
                let basic = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let mut s = st.lock().unwrap();
                match path.as_str() {
                    "/.well-known/openid-configuration" => json_response(
                        StatusCode::OK,
                        &json!({"issuer": s.url,
                            "authorization_endpoint": format!("{}/authorize", s.url),
                            "token_endpoint": format!("{}/token", s.url),
                            "jwks_uri": format!("{}/jwks", s.url),
                            "end_session_endpoint": format!("{}/logout", s.url),
                            "response_types_supported": ["code"],
                            "code_challenge_methods_supported": ["S256"]}),
                    ),
                    "/jwks" => json_response(StatusCode::OK, &json!({"keys": [s.jwk.clone()]})),
                    "/authorize" => match s.authorize(&query) {
                        Ok(back) => redirect_to(&back),
                        Err((st, v)) => json_response(st, &v),
                    },
                    "/token" => {
                        let f = form(std::str::from_utf8(&body).unwrap());
                        let (st, v) = s.token(basic.as_deref(), &f);
                        json_response(st, &v)
                    }
                    "/logout" => json_response(StatusCode::OK, &json!({"logged_out": true})),
                    _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
                }
            }
        }),
    )
    .await;
    op.lock().unwrap().url = up.url();
    up
}

struct Setup {
    gw: LocalGateway,
    op: Op,
    _op_server: Upstream,
    _up: Upstream,
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.addr)
    }
    fn op_url(&self) -> String {
        self.op.lock().unwrap().url.clone()
    }
    fn refused(&self) -> Vec<String> {
        self.op.lock().unwrap().refused.clone()
    }
}

async fn setup(expires_in: i64) -> Setup {
    let kp = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    let enc = EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes()).unwrap();
    let mut jwk =
        serde_json::to_value(Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap()).unwrap();
    jwk["kid"] = json!("k1");
    let op: Op = Arc::new(Mutex::new(OpState {
        url: String::new(),
        enc,
        jwk,
        redirect_uris: Vec::new(),
        codes: HashMap::new(),
        refresh_tokens: HashMap::new(),
        expires_in,
        refuse_refresh: false,
        next: 0,
        token_calls: 0,
        refreshes: 0,
        refused: Vec::new(),
    }));
    let op_server = start_op(op.clone()).await;
    let up = Upstream::start("app").await;
    let issuer = op_server.url();
    let config = format!(
        r#"
upstreams:
  up:
    targets: [{{url: "{up}"}}]
consumers:
  - name: alice
    credentials:
      - {{type: jwt, subject: "user-1"}}
routes:
  - name: app
    paths: ["/*"]
    upstream: up
    plugins:
      oidc:
        issuer: "{issuer}"
        client_id: {CLIENT_ID}
        client_secret: "{CLIENT_SECRET}"
        session_secret: "{SESSION_SECRET}"
        claims_to_headers: {{sub: X-User-Id, email: X-User-Email}}
        keep_claims: [name]
      jwt:
        issuer: "{issuer}"
        audiences: [api]
      request-transformer:
        headers:
          set: {{X-User-Name: "${{jwt.name}}"}}
  - name: plain
    paths: ["/plain/*"]
    upstream: up
    plugins:
      oidc:
        issuer: "{issuer}"
        client_id: {CLIENT_ID}
        client_secret: "{CLIENT_SECRET}"
        session_secret: "{SESSION_SECRET}"
        cookie_name: plain_session
        redirect_path: /plain/callback
        logout_path: /plain/logout
        allow_http: true
"#,
        up = up.url(),
    );
    let gw = LocalGateway::start(bin(), &config).await;
    {
        let mut s = op.lock().unwrap();
        s.redirect_uris = vec![
            format!("http://{}/oauth2/callback", gw.addr),
            format!("http://{}/plain/callback", gw.addr),
        ];
    }
    Setup {
        gw,
        op,
        _op_server: op_server,
        _up: up,
    }
}

/// A browser: cookies of the gateway's host, kept by hand.
struct Browser {
    client: reqwest::Client,
    jar: BTreeMap<String, String>,
}

/// An answer as data.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn location(&self) -> String {
        self.headers
            .get("location")
            .unwrap_or_else(|| panic!("no Location: {} {}", self.status, self.body))
            .to_str()
            .unwrap()
            .to_string()
    }
    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }
    fn set_cookie(&self, name: &str) -> Option<String> {
        self.set_cookies()
            .into_iter()
            .find(|c| c.starts_with(&format!("{name}=")))
    }
}

impl Browser {
    fn new() -> Browser {
        Browser {
            client: http_client(),
            jar: BTreeMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Keep what `Set-Cookie` says (a `Max-Age=0` removes).
    fn store(&mut self, a: &Answer) {
        for c in a.set_cookies() {
            let (nv, attrs) = c.split_once(';').unwrap_or((&c, ""));
            let (name, value) = nv.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") || value.is_empty() {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_string(), value.to_string());
            }
        }
    }

    /// GET with the browser's headers; cookies only to the gateway (`with_cookies`).
    async fn get(&mut self, url: &str, with_cookies: bool, headers: &[(&str, &str)]) -> Answer {
        let mut rb = self.client.get(url);
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("accept"))
        {
            rb = rb.header("accept", HTML);
        }
        if with_cookies && !self.jar.is_empty() {
            rb = rb.header("cookie", self.cookie_header());
        }
        for (n, v) in headers {
            rb = rb.header(*n, *v);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let a = Answer {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        };
        if with_cookies {
            self.store(&a);
        }
        a
    }

    /// Ask for `path`; expect the redirect to the provider (its URL).
    async fn start_login(&mut self, s: &Setup, path: &str) -> String {
        let a = self.get(&s.url(path), true, &[]).await;
        assert_eq!(a.status, 302, "{}", a.body);
        let loc = a.location();
        assert!(
            loc.starts_with(&format!("{}/authorize?", s.op_url())),
            "{loc}"
        );
        loc
    }

    /// The provider approves: the callback URL it sends the browser to.
    async fn approve(&mut self, authorize: &str) -> String {
        let a = self.get(authorize, false, &[]).await;
        assert_eq!(a.status, 302, "the provider refused: {}", a.body);
        a.location()
    }

    /// The whole login from `path`: the URL the gateway finally sends the browser to.
    async fn login(&mut self, s: &Setup, path: &str) -> String {
        let authorize = self.start_login(s, path).await;
        let callback = self.approve(&authorize).await;
        let a = self.get(&callback, true, &[]).await;
        assert_eq!(a.status, 302, "{}", a.body);
        assert!(
            a.set_cookie("portico_session").is_some() || a.set_cookie("plain_session").is_some()
        );
        a.location()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_login_session_and_upstream() {
    let s = setup(300).await;
    let mut b = Browser::new();

    // 1. No session: 302 to the provider with every parameter of the code flow.
    let authorize = b.start_login(&s, "/app/page?x=1&y=two").await;
    let uri: http::Uri = authorize.parse().unwrap();
    let q = form(uri.query().unwrap());
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(
        q["redirect_uri"],
        format!("http://{}/oauth2/callback", s.gw.addr)
    );
    assert_eq!(q["scope"], "openid profile email");
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(q["state"].len() >= 22 && q["nonce"].len() >= 22);
    // The login cookie: encrypted (nothing of the login readable), short-lived.
    let login_cookie = b.jar["portico_session_auth"].clone();
    assert!(!login_cookie.contains(&q["state"]));
    // A second login attempt gets another state and nonce.
    let mut b2 = Browser::new();
    let other = b2.start_login(&s, "/app/page").await;
    let q2 = form(other.parse::<http::Uri>().unwrap().query().unwrap());
    assert_ne!(q["state"], q2["state"]);
    assert_ne!(q["nonce"], q2["nonce"]);
    assert_ne!(q["code_challenge"], q2["code_challenge"]);

    // 2. The provider sends the browser back with a code.
    let callback = b.approve(&authorize).await;
    assert!(
        callback.starts_with(&s.url("/oauth2/callback?code=")),
        "{callback}"
    );

    // 3. The gateway exchanges it and sends the browser back where it was.
    let a = b.get(&callback, true, &[]).await;
    assert_eq!(a.status, 302, "{}", a.body);
    assert_eq!(a.location(), "/app/page?x=1&y=two");
    assert_eq!(a.headers["cache-control"], "no-store");
    let sc = a.set_cookie("portico_session").unwrap();
    for attr in ["; HttpOnly", "; Secure", "; SameSite=Lax", "; Path=/"] {
        assert!(sc.contains(attr), "{attr} missing: {sc}");
    }
    assert!(sc.len() < 3900, "{}", sc.len());
    // The login cookie is cleared.
    let cleared = a.set_cookie("portico_session_auth").unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert!(!b.jar.contains_key("portico_session_auth"));
    assert!(s.refused().is_empty(), "{:?}", s.refused());

    // 4. With the session: the upstream sees the user, not the session cookie.
    b.jar.insert("theme".into(), "dark".into());
    let a = b
        .get(
            &s.url("/app/page?x=1"),
            true,
            &[("x-user-id", "mallory"), ("x-consumer-name", "mallory")],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let h = &a.body["headers"];
    assert_eq!(h["x-user-id"], "user-1");
    assert_eq!(h["x-user-email"], "u1@example.test");
    assert_eq!(h["x-consumer-name"], "alice");
    // The kept claims serve `${jwt.*}` templates.
    assert_eq!(h["x-user-name"], "User One");
    assert_eq!(h["cookie"], "theme=dark");
    assert!(a.set_cookies().is_empty(), "{:?}", a.set_cookies());
    // An API call of the same browser (fetch with JSON) works with the session too.
    let a = b
        .get(&s.url("/api/me"), true, &[("accept", "application/json")])
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["headers"]["x-user-id"], "user-1");

    // 5. The callback cannot be replayed (the login cookie is gone, the code used).
    let a = b.get(&callback, true, &[]).await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no login is in progress"),
        "{}",
        a.body
    );

    // 6. A tampered session cookie: back to the login, the cookie cleared.
    let good = b.jar["portico_session"].clone();
    b.jar.insert("portico_session".into(), tamper(&good));
    let a = b.get(&s.url("/app/page"), true, &[]).await;
    assert_eq!(a.status, 302, "{}", a.body);
    assert!(a
        .location()
        .starts_with(&format!("{}/authorize?", s.op_url())));
    assert!(a
        .set_cookie("portico_session")
        .unwrap()
        .contains("Max-Age=0"));
    assert!(!b.jar.contains_key("portico_session"));
    // The same tampered cookie from an API client: 401, not a redirect.
    let mut api = Browser::new();
    api.jar.insert("portico_session".into(), tamper(&good));
    let a = api
        .get(&s.url("/api/me"), true, &[("accept", "application/json")])
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    // The untouched cookie still works (no server-side state was lost).
    b.jar.insert("portico_session".into(), good);
    let a = b.get(&s.url("/app/page"), true, &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_state_provider_error_and_missing_login() {
    let s = setup(300).await;

    // A callback whose state is not the login's: 401, the login cookie cleared, and
    // the code is never exchanged.
    let mut b = Browser::new();
    let authorize = b.start_login(&s, "/app").await;
    let callback = b.approve(&authorize).await;
    let state = form(callback.parse::<http::Uri>().unwrap().query().unwrap())["state"].clone();
    let forged = callback.replace(&format!("state={state}"), "state=forged-state-value");
    assert_ne!(forged, callback);
    let calls = s.op.lock().unwrap().token_calls;
    let a = b.get(&forged, true, &[]).await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "unauthorized");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("state"),
        "{}",
        a.body
    );
    assert!(a
        .set_cookie("portico_session_auth")
        .unwrap()
        .contains("Max-Age=0"));
    assert!(a.set_cookie("portico_session").is_none());
    assert_eq!(s.op.lock().unwrap().token_calls, calls);
    // The genuine callback now fails too: the login cookie is gone.
    let a = b.get(&callback, true, &[]).await;
    assert_eq!(a.status, 401, "{}", a.body);

    // The provider's error on the callback: 401 with that error.
    let mut b = Browser::new();
    let authorize = b.start_login(&s, "/app").await;
    let state = form(authorize.parse::<http::Uri>().unwrap().query().unwrap())["state"].clone();
    let a = b
        .get(
            &s.url(&format!(
                "/oauth2/callback?error=access_denied&error_description=The+user+said+no&state={state}"
            )),
            true,
            &[],
        )
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    let msg = a.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("access_denied") && msg.contains("The user said no"),
        "{msg}"
    );
    assert!(a
        .set_cookie("portico_session_auth")
        .unwrap()
        .contains("Max-Age=0"));

    // A callback without any login in progress (e.g. a link sent to a victim).
    let a = Browser::new()
        .get(&s.url("/oauth2/callback?code=code-1&state=x"), true, &[])
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no login is in progress"));

    // A login cookie of another browser does not fit this browser's callback state.
    let mut alice = Browser::new();
    let mut mallory = Browser::new();
    let _ = alice.start_login(&s, "/app").await;
    let m_auth = mallory.start_login(&s, "/app").await;
    let m_callback = mallory.approve(&m_auth).await;
    let a = alice.get(&m_callback, true, &[]).await;
    assert_eq!(a.status, 401, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_refresh() {
    // The access token lives 62s; with the 60s refresh margin it is due after 2s.
    let s = setup(62).await;
    let mut b = Browser::new();
    b.login(&s, "/app").await;
    let a = b.get(&s.url("/app"), true, &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.set_cookies().is_empty());
    assert_eq!(s.op.lock().unwrap().refreshes, 0);

    // Due: refreshed before the request goes on; the new cookie comes with the answer,
    // and the claims of the new ID token are used.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let before = b.jar["portico_session"].clone();
    let a = b.get(&s.url("/app"), true, &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(s.op.lock().unwrap().refreshes, 1);
    let sc = a.set_cookie("portico_session").unwrap();
    assert!(sc.contains("; HttpOnly") && sc.contains("; Secure"), "{sc}");
    assert_ne!(b.jar["portico_session"], before);
    assert_eq!(a.body["headers"]["x-user-email"], "u1+1@example.test");
    assert_eq!(a.body["headers"]["x-user-id"], "user-1");
    assert!(a.body["headers"].get("cookie").is_none(), "{}", a.body);
    // The new session is fresh: no refresh now.
    let a = b.get(&s.url("/app"), true, &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.set_cookies().is_empty());
    assert_eq!(s.op.lock().unwrap().refreshes, 1);

    // Parallel requests with the same due session refresh once (the provider rotates
    // refresh tokens: a second use of the old one would fail and end the session).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let cookie = b.cookie_header();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let c = b.client.clone();
        let (url, cookie) = (s.url("/app"), cookie.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .get(url)
                .header("accept", HTML)
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            let sc = r.headers().get("set-cookie").is_some();
            (r.status().as_u16(), sc)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, true));
    }
    assert_eq!(s.op.lock().unwrap().refreshes, 2);
    assert!(s.refused().is_empty(), "{:?}", s.refused());

    // A refresh the provider refuses ends the session: a browser is sent to log in
    // again (the session cookie cleared), an API client gets 401.
    let a = b.get(&s.url("/app"), true, &[]).await;
    b.store(&a);
    s.op.lock().unwrap().refuse_refresh = true;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let stale = b.jar["portico_session"].clone();
    let a = b
        .get(&s.url("/api/x"), true, &[("accept", "application/json")])
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a
        .set_cookie("portico_session")
        .unwrap()
        .contains("Max-Age=0"));
    b.jar.insert("portico_session".into(), stale);
    let a = b.get(&s.url("/app"), true, &[]).await;
    assert_eq!(a.status, 302, "{}", a.body);
    assert!(a
        .location()
        .starts_with(&format!("{}/authorize?", s.op_url())));
    assert!(!b.jar.contains_key("portico_session"));
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_through_the_provider() {
    let s = setup(300).await;
    let mut b = Browser::new();
    b.login(&s, "/app").await;
    assert!(b.jar.contains_key("portico_session"));
    let a = b.get(&s.url("/oauth2/logout"), true, &[]).await;
    assert_eq!(a.status, 302, "{}", a.body);
    let loc = a.location();
    assert!(loc.starts_with(&format!("{}/logout?", s.op_url())), "{loc}");
    let q = form(loc.parse::<http::Uri>().unwrap().query().unwrap());
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(
        q["post_logout_redirect_uri"],
        format!("http://{}/", s.gw.addr)
    );
    assert_eq!(q.len(), 2, "{q:?}");
    let cleared = a.set_cookie("portico_session").unwrap();
    assert!(
        cleared.contains("Max-Age=0") && cleared.contains("; Secure"),
        "{cleared}"
    );
    assert!(!b.jar.contains_key("portico_session"));
    // Logged out: the next page asks to log in again.
    b.start_login(&s, "/app").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn api_clients_and_bearer_tokens() {
    let s = setup(300).await;
    let c = http_client();

    // A JSON client without a session: 401 with the standard error and challenge.
    for headers in [
        vec![("accept", "application/json")],
        vec![],
        vec![("accept", "*/*")],
        vec![("accept", HTML), ("x-requested-with", "XMLHttpRequest")],
        vec![("accept", HTML), ("sec-fetch-mode", "cors")],
    ] {
        let mut rb = c.get(s.url("/api/me"));
        for (n, v) in &headers {
            rb = rb.header(*n, *v);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 401, "{headers:?}");
        let ch: Vec<_> = r
            .headers()
            .get_all("www-authenticate")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert!(ch.iter().any(|c| c == "Bearer realm=\"portico\""), "{ch:?}");
        assert!(r.headers().get("location").is_none());
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    // A POST from a browser is not redirected either (its body would be lost).
    let r = c
        .post(s.url("/app/form"))
        .header("accept", HTML)
        .body("a=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A bearer token and no session: `jwt` on the same route handles it.
    let token = s.op.lock().unwrap().api_token();
    let r = c
        .get(s.url("/api/me"))
        .header("accept", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-consumer-name"], "alice");
    assert!(echo["headers"].get("x-user-id").is_none(), "{echo}");
    // Even from a browser: a request with credentials is not redirected to log in.
    let r = c
        .get(s.url("/app"))
        .header("accept", HTML)
        .header("authorization", "Bearer not-a-valid-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // An ID token (audience `portal`) is not an API token.
    let id = s.op.lock().unwrap().id_token(None, "x@example.test");
    let r = c
        .get(s.url("/api/me"))
        .header("authorization", format!("Bearer {id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn open_redirects_are_not_followed() {
    let s = setup(300).await;

    // A path that a browser would read as another host (`//evil.example/...`): the
    // gateway comes back to a path of its own.
    let mut b = Browser::new();
    let back = b.login(&s, "//evil.example/steal?x=1").await;
    assert!(back.starts_with('/') && !back.starts_with("//"), "{back}");
    assert_eq!(back, "/evil.example/steal?x=1");

    // The provider cannot be made to send the browser elsewhere either: the return
    // URL lives in the encrypted login cookie, not in the callback.
    let mut b = Browser::new();
    let authorize = b.start_login(&s, "/app/home").await;
    let callback = b.approve(&authorize).await;
    let a = b
        .get(
            &format!("{callback}&return_to=https%3A%2F%2Fevil.example%2F&rd=//evil.example"),
            true,
            &[],
        )
        .await;
    assert_eq!(a.status, 302, "{}", a.body);
    assert_eq!(a.location(), "/app/home");
}

#[tokio::test(flavor = "multi_thread")]
async fn secure_is_left_off_only_with_allow_http_on_plain_http() {
    let s = setup(300).await;
    let mut b = Browser::new();
    let a = b.get(&s.url("/plain/page"), true, &[]).await;
    assert_eq!(a.status, 302, "{}", a.body);
    let login = a.set_cookie("plain_session_auth").unwrap();
    assert!(!login.contains("Secure"), "{login}");
    assert!(
        login.contains("HttpOnly") && login.contains("SameSite=Lax"),
        "{login}"
    );
    assert!(login.contains("Max-Age=600"), "{login}");
    let uri: http::Uri = a.location().parse().unwrap();
    assert_eq!(
        form(uri.query().unwrap())["redirect_uri"],
        format!("http://{}/plain/callback", s.gw.addr)
    );
    let callback = b.approve(&a.location()).await;
    let a = b.get(&callback, true, &[]).await;
    assert_eq!(a.status, 302, "{}", a.body);
    assert_eq!(a.location(), "/plain/page");
    let sc = a.set_cookie("plain_session").unwrap();
    assert!(!sc.contains("Secure") && sc.contains("HttpOnly"), "{sc}");
    let a = b.get(&s.url("/plain/page"), true, &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Each route's policy keeps its own session: the plain one is not the app's.
    let a = b.get(&s.url("/app"), true, &[]).await;
    assert_eq!(a.status, 302, "{}", a.body);
    // And on the main route, without allow_http, even plain http gets `Secure`.
    let login = a.set_cookie("portico_session_auth").unwrap();
    assert!(login.contains("; Secure"), "{login}");
}

#[test]
fn validate_reports_bad_oidc_settings() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("portico.yaml");
    std::fs::write(
        &f,
        r#"
upstreams:
  up:
    targets: [{url: "http://127.0.0.1:9"}]
routes:
  - name: app
    paths: ["/*"]
    upstream: up
    plugins:
      oidc:
        issuer: "http://idp.example.com"
        client_id: portal
        session_secret: "too-short"
        scopes: [profile]
        redirect_path: "oauth2/callback"
        cookie_name: "bad;name"
        claims_to_headers: {sub: Host}
"#,
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["validate", f.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    for needle in [
        "issuer",
        "session_secret",
        "scopes",
        "redirect_path",
        "cookie_name",
        "claims_to_headers",
    ] {
        assert!(text.contains(needle), "{needle} not reported:\n{text}");
    }
    assert!(
        !text.contains("too-short"),
        "the secret was echoed:\n{text}"
    );
}
