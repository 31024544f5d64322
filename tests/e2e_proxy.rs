//! End-to-end proxying tests: the real `portico` binary between real clients and real
//! upstream servers.
//!
//! Covers: hop-by-hop headers (both directions), `X-Forwarded-*` with and without
//! trusted proxies, `X-Request-Id`, `Host` vs `preserve_host`; upstream errors (502,
//! 503, 504) and timeouts; weighted balancing; passive health with retries; h2c
//! clients (reqwest and curl) and h2c upstreams; 1 GiB streaming in both directions
//! with bounded gateway memory; request-size limits; URI and header limits; header
//! transform policies and the chain shown by the admin API.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use portico_test_support::upstream::{default_handler, full, handler};
use portico_test_support::{
    free_port, h2c_client, http_client, raw_http, Gateway, LocalGateway, RawResponse, Upstream,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GIB: u64 = 1 << 30;
const MIB: usize = 1 << 20;

/// A running gateway and its addresses.
type Env = LocalGateway;

/// Starts a gateway with `body` appended after the `listen`/`admin` keys.
async fn start(body: &str) -> Env {
    LocalGateway::start(Path::new(env!("CARGO_BIN_EXE_portico")), body).await
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
    fn upstream(&self) -> &str {
        self.header("x-upstream").unwrap_or("<none>")
    }
    /// A header as the upstream received it (from the echo body); arrays are joined.
    fn seen(&self, name: &str) -> Option<String> {
        match &self.body["headers"][name] {
            Value::String(s) => Some(s.clone()),
            Value::Array(a) => Some(
                a.iter()
                    .map(|v| v.as_str().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            _ => None,
        }
    }
}

async fn answer(resp: reqwest::Response) -> Answer {
    RawResponse::from_reqwest(resp).await.into()
}

async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str) -> Answer {
    answer(
        client
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Parses one HTTP/1.1 response read off a raw socket.
fn parse_response(raw: &str) -> Answer {
    RawResponse::parse(raw).into()
}

async fn raw(addr: SocketAddr, request: &str) -> Answer {
    parse_response(&raw_http(addr, request.as_bytes()).await)
}

/// Whether `raw` holds a complete response head and its Content-Length body.
fn complete_response(raw: &[u8]) -> bool {
    let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..i]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    raw.len() >= i + 4 + len
}

/// Asserts the standard error shape, with `request_id` equal to `X-Request-Id`.
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
    assert_eq!(a.header("x-request-id"), Some(rid), "X-Request-Id of {a:?}");
}

async fn admin_json(env: &Env, path: &str) -> Value {
    let a = get(&http_client(), env.admin, path).await;
    assert_eq!(a.status, 200, "admin {path}: {a:?}");
    a.body
}

/// `upstreams:` entry with one target.
fn one_target(name: &str, url: &str, extra: &str) -> String {
    format!("  {name}:\n    targets: [{{url: \"{url}\"}}]\n{extra}")
}

// ---------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_forwarded_request_id_and_host() {
    let default = default_handler("hop");
    let up = Upstream::start_with(
        "hop",
        handler(move |req| {
            let default = default.clone();
            async move {
                if req.uri().path() == "/resp-hop" {
                    http::Response::builder()
                        .header("connection", "x-bar")
                        .header("x-bar", "1")
                        .header("keep-alive", "timeout=5")
                        .header("x-stay", "1")
                        .body(full("ok"))
                        .unwrap()
                } else {
                    default(req).await
                }
            }
        }),
    )
    .await;
    let env = start(&format!(
        "upstreams:\n{}routes:
  - name: keep
    paths: [\"/keep/*\"]
    preserve_host: true
    upstream: hop
  - name: ip
    paths: [\"/ip\"]
    upstream: hop
    plugins:
      request-transformer: {{headers: {{set: {{x-client: \"${{client_ip}}\"}}}}}}
  - name: all
    paths: [\"/*\"]
    upstream: hop
",
        one_target("hop", &up.url(), "")
    ))
    .await;
    let target_authority = up.addr().to_string();

    // Request hop-by-hop headers (raw, so the client adds nothing of its own).
    let a = raw(
        env.addr,
        "GET /hop HTTP/1.1\r\nHost: front.example:81\r\nConnection: close, x-foo, X-Other\r\n\
         X-Foo: secret\r\nX-Other: also\r\nKeep-Alive: timeout=5\r\nTE: trailers, gzip\r\n\
         Upgrade: websocket\r\nProxy-Connection: keep-alive\r\nTrailer: x-t\r\nX-Keep: 1\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    for h in [
        "x-foo",
        "x-other",
        "keep-alive",
        "upgrade",
        "proxy-connection",
        "trailer",
        "transfer-encoding",
    ] {
        assert_eq!(
            a.seen(h),
            None,
            "{h} must not reach the upstream: {:?}",
            a.body
        );
    }
    let conn = a.seen("connection").unwrap_or_default();
    assert!(
        !conn.contains("x-foo") && !conn.contains("close"),
        "client's Connection not forwarded: {conn:?}"
    );
    assert_eq!(
        a.seen("te").as_deref(),
        Some("trailers"),
        "TE keeps only trailers"
    );
    assert_eq!(a.seen("x-keep").as_deref(), Some("1"));

    // Response hop-by-hop headers are not passed to the client either.
    let client = http_client();
    let a = get(&client, env.addr, "/resp-hop").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-bar"), None, "{a:?}");
    assert_eq!(a.header("keep-alive"), None, "{a:?}");
    assert_eq!(a.header("x-stay"), Some("1"));

    // X-Forwarded-*: from an untrusted peer, spoofed values are replaced.
    let a = answer(
        client
            .get(format!("http://{}/fwd", env.addr))
            .header("host", "front.example:81")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.seen("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(a.seen("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        a.seen("x-forwarded-host").as_deref(),
        Some("front.example:81")
    );
    // Host is the target's authority by default...
    assert_eq!(a.seen("host"), Some(target_authority.clone()));
    // ...and the client's with preserve_host.
    let a = answer(
        client
            .get(format!("http://{}/keep/x", env.addr))
            .header("host", "front.example:81")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.upstream(), "hop");
    assert_eq!(a.seen("host").as_deref(), Some("front.example:81"));

    // The client IP used by policies ignores the spoofed X-Forwarded-For.
    let a = answer(
        client
            .get(format!("http://{}/ip", env.addr))
            .header("x-forwarded-for", "1.2.3.4")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.seen("x-client").as_deref(), Some("127.0.0.1"));

    // X-Request-Id: propagated when sane, returned to the client.
    let a = answer(
        client
            .get(format!("http://{}/rid", env.addr))
            .header("x-request-id", "client-id-42")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.seen("x-request-id").as_deref(), Some("client-id-42"));
    assert_eq!(a.header("x-request-id"), Some("client-id-42"));
    // Generated when absent or not sane; the same id upstream and in the response.
    let mut ids = Vec::new();
    for given in [None, Some("has space"), Some(&*"x".repeat(201))] {
        let mut req = client.get(format!("http://{}/rid", env.addr));
        if let Some(g) = given {
            req = req.header("x-request-id", g);
        }
        let a = answer(req.send().await.unwrap()).await;
        let sent = a.seen("x-request-id").unwrap();
        assert!(!sent.is_empty() && Some(sent.as_str()) != given, "{a:?}");
        assert_eq!(a.header("x-request-id"), Some(sent.as_str()));
        ids.push(sent);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "generated ids are unique: {ids:?}");
    // The id is in the access log line too.
    let id = &ids[0];
    assert!(
        env.gw.wait_for_log(id, Duration::from_secs(5)),
        "request id {id} in the access log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_proxy_appends_forwarded_headers() {
    let up = Upstream::start("t").await;
    let env = start(&format!(
        "trusted_proxies: [\"127.0.0.1/32\"]\nupstreams:\n{}routes:
  - name: all
    paths: [\"/*\"]
    upstream: t
    plugins:
      request-transformer: {{headers: {{set: {{x-client: \"${{client_ip}}\"}}}}}}
",
        one_target("t", &up.url(), "")
    ))
    .await;
    let client = http_client();
    let a = answer(
        client
            .get(format!("http://{}/x", env.addr))
            .header("host", "front.example")
            .header("x-forwarded-for", "198.51.100.1, 203.0.113.7")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "public.example")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        a.seen("x-forwarded-for").as_deref(),
        Some("198.51.100.1, 203.0.113.7, 127.0.0.1")
    );
    assert_eq!(a.seen("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        a.seen("x-forwarded-host").as_deref(),
        Some("public.example")
    );
    // The client IP is the right-most untrusted address.
    assert_eq!(a.seen("x-client").as_deref(), Some("203.0.113.7"));

    // Without prior headers, the trusted peer's own values are set.
    let a = answer(
        client
            .get(format!("http://{}/x", env.addr))
            .header("host", "front.example")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.seen("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(a.seen("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(a.seen("x-forwarded-host").as_deref(), Some("front.example"));
    assert_eq!(a.seen("x-client").as_deref(), Some("127.0.0.1"));
    drop(env.gw);
}

// ---------------------------------------------------------------------------------
// Upstream errors, timeouts, balancing, health
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn upstream_errors_and_timeouts() {
    let up = Upstream::start("slow").await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let env = start(&format!(
        "upstreams:\n{}{}{}routes:
  - name: dead
    paths: [\"/dead/*\"]
    upstream: dead
  - name: fast_route
    paths: [\"/fast/*\"]
    strip_prefix: true
    timeouts: {{request: 200ms}}
    upstream: roomy
  - name: patient_route
    paths: [\"/patient/*\"]
    strip_prefix: true
    timeouts: {{request: 5s}}
    upstream: slow
  - name: slow
    paths: [\"/*\"]
    upstream: slow
",
        one_target("dead", &dead, ""),
        one_target("slow", &up.url(), "    timeouts: {request: 300ms}\n"),
        one_target("roomy", &up.url(), ""),
    ))
    .await;
    let client = http_client();

    // Nothing listening: 502 upstream_unavailable, for each of the 3 connect failures
    // that eject the (only) target; then nothing can be tried: 503 no_healthy_upstream.
    for _ in 0..3 {
        let a = get(&client, env.addr, "/dead/x").await;
        assert_error(&a, 502, "upstream_unavailable");
    }
    let a = get(&client, env.addr, "/dead/x").await;
    assert_error(&a, 503, "no_healthy_upstream");

    // The request timeout (until response headers) gives 504 upstream_timeout.
    let a = get(&client, env.addr, "/sleep/2000").await;
    assert_error(&a, 504, "upstream_timeout");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("300ms"),
        "{a:?}"
    );
    // Faster than the timeout: fine.
    let a = get(&client, env.addr, "/sleep/10").await;
    assert_eq!(a.status, 200, "{a:?}");
    // Per-route overrides, in both directions.
    let a = get(&client, env.addr, "/fast/sleep/1500").await;
    assert_error(&a, 504, "upstream_timeout");
    let a = get(&client, env.addr, "/patient/sleep/800").await;
    assert_eq!(a.status, 200, "{a:?}");

    // The access log records the error codes.
    assert!(env
        .gw
        .wait_for_log("\"upstream_timeout\"", Duration::from_secs(5)));
    assert!(env
        .gw
        .wait_for_log("\"upstream_unavailable\"", Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_timeout_does_not_cut_a_slow_upload() {
    // `request` runs until the response headers; a request body that keeps flowing
    // (here for ~3 s, with `request: 1s`) must not be cut by it.
    let up = Upstream::start("up").await;
    let env = start(&format!(
        "upstreams:\n{}routes:\n  - name: all\n    paths: [\"/*\"]\n    upstream: up\n",
        one_target("up", &up.url(), "    timeouts: {request: 1s, idle: 2s}\n")
    ))
    .await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    let chunks = 30usize;
    s.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            chunks * 1024
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for _ in 0..chunks {
        s.write_all(&[b'u'; 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let a = parse_response(&String::from_utf8_lossy(&out));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["received"], chunks * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_that_stops_reading_the_body_times_out() {
    // The upstream never reads the request body: once the buffers are full the body
    // makes no progress, and after `idle` the client gets 504.
    let up = Upstream::start_with(
        "deaf",
        handler(|_req| async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            http::Response::new(full("late"))
        }),
    )
    .await;
    let env = start(&format!(
        "upstreams:\n{}routes:\n  - name: all\n    paths: [\"/*\"]\n    upstream: deaf\n",
        one_target(
            "deaf",
            &up.url(),
            "    timeouts: {request: 30s, idle: 1s}\n"
        )
    ))
    .await;
    let total = 256 * MIB;
    let s = TcpStream::connect(env.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n"
        );
        wr.write_all(head.as_bytes()).await?;
        let buf = vec![b'd'; MIB];
        for _ in 0..256 {
            wr.write_all(&buf).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    // Read until one complete response (the connection may stay open).
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !complete_response(&out) {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    writer.abort();
    let a = parse_response(&String::from_utf8_lossy(&out));
    assert_error(&a, 504, "upstream_timeout");
    let msg = a.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("stopped reading"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_round_robin_is_exact() {
    let a = Upstream::start("wa").await;
    let b = Upstream::start("wb").await;
    let env = start(&format!(
        "upstreams:
  w:
    targets: [{{url: \"{a}\", weight: 3}}, {{url: \"{b}\", weight: 1}}]
  rr:
    balance: round_robin
    targets: [{{url: \"{a}\", weight: 3}}, {{url: \"{b}\", weight: 1}}]
routes:
  - name: w
    paths: [\"/w\"]
    upstream: w
  - name: rr
    paths: [\"/rr\"]
    upstream: rr
",
        a = a.url(),
        b = b.url()
    ))
    .await;
    let client = http_client();
    let mut seq = Vec::new();
    for _ in 0..400 {
        let r = client
            .get(format!("http://{}/w", env.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        seq.push(r.headers()["x-upstream"].to_str().unwrap().to_owned());
    }
    let wa = seq.iter().filter(|s| *s == "wa").count();
    let wb = seq.iter().filter(|s| *s == "wb").count();
    assert_eq!((wa, wb), (300, 100));
    let share = wa as f64 / 400.0;
    assert!((share - 0.75).abs() <= 0.03, "{share}");
    // Smooth: every aligned window of 4 has exactly one `wb`, never a burst.
    for (i, w) in seq.chunks(4).enumerate() {
        assert_eq!(
            w.iter().filter(|s| *s == "wb").count(),
            1,
            "window {i}: {w:?}"
        );
    }
    // round_robin ignores weights.
    let mut rr = (0, 0);
    for _ in 0..100 {
        let r = get(&client, env.addr, "/rr").await;
        match r.upstream() {
            "wa" => rr.0 += 1,
            "wb" => rr.1 += 1,
            other => panic!("unexpected upstream {other}"),
        }
    }
    assert_eq!(rr, (50, 50));
    drop(env.gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn passive_health_ejects_a_dead_target() {
    let live = Upstream::start("live").await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let env = start(&format!(
        "upstreams:
  pool:
    targets: [{{url: \"{dead}\"}}, {{url: \"{live}\"}}]
routes:
  - name: all
    paths: [\"/*\"]
    upstream: pool
",
        live = live.url()
    ))
    .await;
    let client = http_client();
    // Bodyless requests whose connect fails are retried on the other target: the
    // client never sees the dead one.
    for i in 0..12 {
        let a = get(&client, env.addr, &format!("/get/{i}")).await;
        assert_eq!(a.status, 200, "request {i}: {a:?}");
        assert_eq!(a.upstream(), "live");
    }
    // After 3 connect failures the dead target is out of rotation.
    let ups = admin_json(&env, "/admin/upstreams").await;
    let pool = ups["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "pool")
        .unwrap()
        .clone();
    let target = |url: &str| {
        pool["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["url"] == url)
            .unwrap_or_else(|| panic!("{url} in {pool}"))
            .clone()
    };
    assert_eq!(target(&dead)["healthy"], false, "{pool}");
    assert!(target(&dead)["ejections"].as_u64().unwrap() >= 1, "{pool}");
    assert_eq!(target(&live.url())["healthy"], true, "{pool}");
    // So requests with a body (not retried) now all reach the live target.
    for i in 0..6 {
        let a = answer(
            client
                .post(format!("http://{}/post/{i}", env.addr))
                .body("payload")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(a.status, 200, "POST {i}: {a:?}");
        assert_eq!(a.body["body"], "payload");
    }
    let metrics = get(&client, env.admin, "/metrics").await;
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains(&format!(
            "portico_upstream_target_healthy{{upstream=\"pool\",target=\"{dead}\"}} 0"
        )),
        "{text}"
    );
    assert_eq!(live.hits(), 18);
}

// ---------------------------------------------------------------------------------
// Protocols
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn h2c_clients_and_upstream_protocols() {
    let up = Upstream::start("proto").await;
    let env = start(&format!(
        "upstreams:\n{}{}{}{}routes:
  - name: h2c
    paths: [\"/h2c/*\"]
    upstream: via_h2c
  - name: h2
    paths: [\"/h2/*\"]
    upstream: via_h2
  - name: h1
    paths: [\"/h1/*\"]
    upstream: via_h1
  - name: auto
    paths: [\"/*\"]
    upstream: via_auto
",
        one_target("via_h2c", &up.url(), "    protocol: h2c\n"),
        one_target("via_h2", &up.url(), "    protocol: h2\n"),
        one_target("via_h1", &up.url(), "    protocol: http1\n"),
        one_target("via_auto", &up.url(), ""),
    ))
    .await;

    // h2c prior-knowledge client; `auto` speaks HTTP/1.1 to an http:// upstream.
    let h2 = h2c_client();
    let r = h2
        .get(format!("http://{}/hello?x=1", env.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    let a = answer(r).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["version"], "HTTP/1.1");
    assert_eq!(a.body["path"], "/hello");
    assert_eq!(a.body["query"], "x=1");
    assert!(a.header("x-request-id").is_some());

    // Many concurrent streams on the one h2c connection.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let h2 = h2.clone();
        let addr = env.addr;
        tasks.push(tokio::spawn(async move {
            let r = h2
                .post(format!("http://{addr}/h2c/post/{i}"))
                .body(format!("body {i}"))
                .send()
                .await
                .unwrap();
            let a = answer(r).await;
            (i, a)
        }));
    }
    for t in tasks {
        let (i, a) = t.await.unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.body["version"], "HTTP/2.0", "h2c upstream");
        assert_eq!(a.body["body"], format!("body {i}"));
    }

    let client = http_client();
    for (path, version) in [
        ("/h2c/x", "HTTP/2.0"),
        ("/h2/x", "HTTP/2.0"),
        ("/h1/x", "HTTP/1.1"),
        ("/x", "HTTP/1.1"),
    ] {
        let a = get(&client, env.addr, path).await;
        assert_eq!(a.status, 200, "{path}: {a:?}");
        assert_eq!(a.body["version"], version, "{path}");
    }

    // curl --http2-prior-knowledge, when curl is installed.
    let curl_ok = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !curl_ok {
        eprintln!("curl not found: skipping the curl --http2-prior-knowledge check");
        return;
    }
    for (path, version) in [("/curl", "HTTP/1.1"), ("/h2c/curl", "HTTP/2.0")] {
        let url = format!("http://{}{path}", env.addr);
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "--http2-prior-knowledge", "--max-time", "10", "-i"])
                .arg(&url)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(out.status.success(), "curl: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/2 200"), "{head}");
        assert!(head.contains("x-upstream: proto"), "{head}");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["version"], version, "{path}: {v}");
    }
}

// ---------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------

/// Uploads `total` bytes (Content-Length) in 1 MiB writes over a raw socket and
/// returns the response.
async fn stream_upload(addr: SocketAddr, total: u64) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let buf = vec![b'u'; MIB];
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(MIB as u64) as usize;
        s.write_all(&buf[..n]).await.unwrap();
        sent += n as u64;
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    parse_response(&String::from_utf8_lossy(&out))
}

/// Downloads `path` over a raw socket; returns (status, Content-Length, body bytes).
async fn stream_download(addr: SocketAddr, path: &str) -> (u16, Option<u64>, u64) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let mut body = 0u64;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        if body == 0 && !head.ends_with(b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                body = (head.len() - i - 4) as u64;
                head.truncate(i + 4);
            }
        } else {
            body += n as u64;
        }
    }
    let a = parse_response(&String::from_utf8_lossy(&head));
    assert!(
        a.header("transfer-encoding").is_none(),
        "expected a Content-Length download: {a:?}"
    );
    let len = a.header("content-length").and_then(|v| v.parse().ok());
    (a.status, len, body)
}

/// Runs `fut` on its own task while sampling the gateway's RSS every 50 ms; returns
/// the result and the peak RSS in KiB.
async fn with_peak_rss<T: Send + 'static>(
    gw: &Gateway,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> (T, u64) {
    let task = tokio::spawn(fut);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut peak = gw.rss_kib();
    while !task.is_finished() {
        assert!(Instant::now() < deadline, "transfer took over 10 minutes");
        peak = peak.max(gw.rss_kib());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (task.await.unwrap(), peak.max(gw.rss_kib()))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_gib_upload_and_download_stream_with_bounded_memory() {
    let up = Upstream::start("bulk").await;
    let env = start(&format!(
        "upstreams:\n{}routes:\n  - name: all\n    paths: [\"/*\"]\n    upstream: bulk\n",
        one_target("bulk", &up.url(), "")
    ))
    .await;
    let bound_kib = 100 * 1024;
    let idle_rss = env.gw.rss_kib();

    let t = Instant::now();
    let (a, peak_up) = with_peak_rss(&env.gw, stream_upload(env.addr, GIB)).await;
    let upload_time = t.elapsed();
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["received"], GIB, "the upstream received every byte");

    let t = Instant::now();
    let addr = env.addr;
    let ((status, len, got), peak_down) = with_peak_rss(&env.gw, async move {
        stream_download(addr, &format!("/bytes/{GIB}")).await
    })
    .await;
    let download_time = t.elapsed();
    assert_eq!(status, 200);
    assert_eq!(len, Some(GIB));
    assert_eq!(got, GIB, "the client received every byte");

    eprintln!(
        "1 GiB upload: {upload_time:?}, download: {download_time:?}; gateway RSS idle {idle_rss} KiB, \
         peak {peak_up} KiB (upload) / {peak_down} KiB (download)"
    );
    assert!(peak_up < bound_kib, "RSS {peak_up} KiB during the upload");
    assert!(
        peak_down < bound_kib,
        "RSS {peak_down} KiB during the download"
    );
}

// ---------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn request_size_limit_rejects_large_bodies() {
    let up = Upstream::start("sz").await;
    let env = start(&format!(
        "upstreams:\n{}routes:
  - name: limited
    paths: [\"/*\"]
    upstream: sz
    plugins:
      request-size-limit: {{max_body: 1KiB}}
",
        one_target("sz", &up.url(), "")
    ))
    .await;

    // Announced (Content-Length) and over the limit: 413 before anything is proxied.
    let body = "b".repeat(2000);
    let a = raw(
        env.addr,
        &format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n{body}"
        ),
    )
    .await;
    assert_error(&a, 413, "payload_too_large");
    assert_eq!(up.hits(), 0, "nothing reached the upstream");

    // At the limit: fine.
    let body = "b".repeat(1024);
    let a = raw(
        env.addr,
        &format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\nConnection: close\r\n\r\n{body}"
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["received"], 1024);

    // Chunked, under the limit: fine.
    let chunk = format!("200\r\n{}\r\n", "c".repeat(512));
    let a = raw(
        env.addr,
        &format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunk}0\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["received"], 512);

    // Chunked and over the limit (4 KiB): 413.
    let a = raw(
        env.addr,
        &format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{}0\r\n\r\n",
            chunk.repeat(8)
        ),
    )
    .await;
    assert_error(&a, 413, "payload_too_large");

    // A real client streaming a large chunked body (8 MiB) sees the 413 as well.
    let stream = futures_util::stream::iter(
        (0..128).map(|_| Ok::<_, std::io::Error>(vec![b'z'; 64 * 1024])),
    );
    let r = http_client()
        .post(format!("http://{}/upload", env.addr))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    match r {
        Ok(r) => assert_error(&answer(r).await, 413, "payload_too_large"),
        Err(e) => panic!("the client saw no 413 but an error: {e:?}"),
    }
    // The same with Content-Length: rejected up front.
    let r = http_client()
        .post(format!("http://{}/upload", env.addr))
        .body(vec![b'z'; 8 * MIB])
        .send()
        .await;
    match r {
        Ok(r) => assert_error(&answer(r).await, 413, "payload_too_large"),
        Err(e) => panic!("the client saw no 413 but an error: {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn uri_and_header_limits() {
    let up = Upstream::start("lim").await;
    let env = start(&format!(
        "limits: {{max_uri_length: 100, max_header_count: 10, max_header_bytes: 2KiB}}\nupstreams:\n{}routes:
  - name: all
    paths: [\"/*\"]
    upstream: lim
",
        one_target("lim", &up.url(), "")
    ))
    .await;
    let client = http_client();

    // 100 characters of request target: fine; 101 and more: 414.
    let ok = format!("/{}", "a".repeat(99));
    assert_eq!(get(&client, env.addr, &ok).await.status, 200);
    let long = format!("/{}", "a".repeat(100));
    assert_error(&get(&client, env.addr, &long).await, 414, "uri_too_long");
    // The query counts too.
    let long_q = format!("/a?{}", "q".repeat(200));
    assert_error(&get(&client, env.addr, &long_q).await, 414, "uri_too_long");

    // Header count: Host + Connection + 8 = 10 is fine, 11 is too many.
    let headers = |n: usize| -> String { (0..n).map(|i| format!("X-H-{i}: v\r\n")).collect() };
    let a = raw(
        env.addr,
        &format!(
            "GET /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{}\r\n",
            headers(8)
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = raw(
        env.addr,
        &format!(
            "GET /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{}\r\n",
            headers(9)
        ),
    )
    .await;
    assert_error(&a, 431, "headers_too_large");
    // Far more than allowed: still the JSON answer.
    let a = raw(
        env.addr,
        &format!(
            "GET /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{}\r\n",
            headers(60)
        ),
    )
    .await;
    assert_error(&a, 431, "headers_too_large");
    // Header bytes.
    let a = raw(
        env.addr,
        &format!(
            "GET /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "v".repeat(3000)
        ),
    )
    .await;
    assert_error(&a, 431, "headers_too_large");
    assert_eq!(
        up.hits(),
        2,
        "only the two accepted requests reached the upstream"
    );
}

// ---------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn header_transform_policies_and_chain_order() {
    let up = Upstream::start("pol").await;
    let env = start(&format!(
        "upstreams:\n{}plugins:
  response-transformer:
    headers: {{add: {{x-gw: portico}}}}
  request-transformer:
    headers:
      add: {{x-rid: \"${{request_id}}\", x-route: \"${{route.name}}\"}}
routes:
  - name: plain
    paths: [\"/plain/*\"]
    upstream: pol
  - name: override
    paths: [\"/override/{{id}}\"]
    upstream: pol
    plugins:
      response-transformer:
        headers: {{set: {{x-gw: \"route-${{param.id}}\"}}, rename: {{x-upstream: x-origin}}}}
      request-size-limit: {{max_body: 1MiB}}
      request-transformer:
        headers:
          set: {{x-custom: \"c-${{route.name}}-${{query.q}}-${{param.id}}\"}}
          remove: [x-drop]
  - name: disabled
    paths: [\"/disabled/*\"]
    upstream: pol
    plugins:
      request-transformer: {{enabled: false}}
",
        one_target("pol", &up.url(), "")
    ))
    .await;
    let client = http_client();

    // Global request transform with templates; global response transform.
    let a = get(&client, env.addr, "/plain/x").await;
    assert_eq!(a.status, 200);
    let rid = a.header("x-request-id").unwrap().to_owned();
    assert_eq!(a.seen("x-rid"), Some(rid));
    assert_eq!(a.seen("x-route").as_deref(), Some("plain"));
    assert_eq!(a.header("x-gw"), Some("portico"));
    assert_eq!(a.upstream(), "pol");

    // A route's entry replaces the global one of the same name.
    let a = answer(
        client
            .get(format!("http://{}/override/42?q=7", env.addr))
            .header("x-drop", "1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.seen("x-custom").as_deref(), Some("c-override-7-42"));
    assert_eq!(a.seen("x-rid"), None, "the global transform is replaced");
    assert_eq!(a.seen("x-route"), None);
    assert_eq!(a.seen("x-drop"), None);
    assert_eq!(a.header("x-gw"), Some("route-42"));
    assert_eq!(a.header("x-upstream"), None);
    assert_eq!(a.header("x-origin"), Some("pol"));

    // `enabled: false` removes the global policy on that route only.
    let a = get(&client, env.addr, "/disabled/x").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.seen("x-rid"), None);
    assert_eq!(a.seen("x-route"), None);
    assert_eq!(
        a.header("x-gw"),
        Some("portico"),
        "response transform still global"
    );

    // The chain, by priority (not by key order), with its source.
    let chain = |v: &Value| -> Vec<(String, i64, String)> {
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                assert!(p["stage"].as_str().is_some_and(|s| !s.is_empty()), "{p}");
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["priority"].as_i64().unwrap(),
                    p["source"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let names = |c: &[(String, i64, String)]| -> Vec<(String, String)> {
        c.iter().map(|(n, _, s)| (n.clone(), s.clone())).collect()
    };
    let pair = |n: &str, s: &str| (n.to_owned(), s.to_owned());

    let plain = chain(&admin_json(&env, "/admin/routes/plain").await);
    assert_eq!(
        names(&plain),
        [
            pair("request-transformer", "global"),
            pair("response-transformer", "global")
        ]
    );
    let over = chain(&admin_json(&env, "/admin/routes/override").await);
    assert_eq!(
        names(&over),
        [
            pair("request-size-limit", "route"),
            pair("request-transformer", "route"),
            pair("response-transformer", "route"),
        ]
    );
    assert!(
        over.windows(2).all(|w| w[0].1 > w[1].1),
        "descending priority: {over:?}"
    );
    let disabled = chain(&admin_json(&env, "/admin/routes/disabled").await);
    assert_eq!(names(&disabled), [pair("response-transformer", "global")]);

    let missing = get(&client, env.admin, "/admin/routes/nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["status"], 404);
}

/// An upstream whose keep-alive timeout races with the gateway: a request that arrives
/// on a connection idle for more than 300 ms is read and then the connection is closed
/// without an answer, as a server closing at its idle timeout would. Returns its address
/// and how many requests it dropped that way.
async fn racing_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = dropped.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut served = 0usize;
                let mut last = Instant::now();
                let mut buf = vec![0u8; 8192];
                loop {
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => got.extend_from_slice(&buf[..k]),
                        }
                    }
                    if served > 0 && last.elapsed() > Duration::from_millis(300) {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        return; // closes without answering
                    }
                    served += 1;
                    let body = format!("answer {served}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    last = Instant::now();
                }
            });
        }
    });
    (addr, dropped)
}

/// A pooled connection that the upstream closes just as a request is sent on it (the
/// keep-alive race) costs the client nothing for idempotent requests: the gateway sends
/// the request again on a fresh connection.
#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_race_is_retried_for_idempotent_requests() {
    let (up, dropped) = racing_upstream().await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"http://{up}\"}}]\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n"
    ))
    .await;
    let client = http_client();
    for i in 0..8 {
        // Two quick requests share a connection; then the connection idles past the
        // upstream's timeout before the next one.
        for j in 0..2 {
            let resp = client
                .get(format!("http://{}/x", env.addr))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200, "round {i}, request {j}");
            assert!(resp.text().await.unwrap().starts_with("answer "));
        }
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the race happened at least once"
    );
    // A POST is not repeated: it either succeeds or gets 502, never runs twice.
    let resp = client
        .post(format!("http://{}/x", env.addr))
        .send()
        .await
        .unwrap();
    assert!([200, 502].contains(&resp.status().as_u16()));
    drop(env);
}

/// HTTP/1.1 pipelining: two requests written at once on one connection are answered
/// in order, each proxied.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start("p").await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.url()
    ))
    .await;
    let raw = raw_http(
        env.addr,
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let first = raw.find("\"path\":\"/first\"").expect("first answered");
    let second = raw.find("\"path\":\"/second\"").expect("second answered");
    assert!(first < second, "answers in request order: {raw}");
    assert_eq!(raw.matches("HTTP/1.1 200 OK").count(), 2, "{raw}");
    assert_eq!(up.hits(), 2);
}
