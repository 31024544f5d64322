//! End-to-end resilience: the real `portico` binary in front of real upstream servers,
//! for the circuit breaker (`circuit_breaker:`) and retries with the retry budget
//! (`retries:`), plus `portico validate` on bad settings (docs/upstreams.md).
//!
//! Timing: the only waits are for a breaker's `open_for` (1s), with generous margins;
//! everything else is counted (upstream hits, statuses).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use portico_test_support::upstream::{default_handler, handler, json_response};
use portico_test_support::{free_port, http_client, LocalGateway, Upstream};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_portico");

async fn start(body: &str) -> LocalGateway {
    LocalGateway::start(Path::new(BIN), body).await
}

/// An upstream server answering every request with the status in `status` (JSON body
/// naming the server).
async fn status_upstream(name: &str, status: Arc<AtomicU16>) -> Upstream {
    let n = name.to_string();
    Upstream::start_with(
        name,
        handler(move |_req| {
            let code = status.load(Ordering::SeqCst);
            let n = n.clone();
            async move {
                json_response(
                    StatusCode::from_u16(code).unwrap(),
                    &json!({"upstream": n, "status": code}),
                )
            }
        }),
    )
    .await
}

/// (status, headers, body) of one request.
async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

async fn get(client: &reqwest::Client, url: String) -> (u16, reqwest::header::HeaderMap, String) {
    send(client, reqwest::Method::GET, url, None).await
}

async fn admin_text(env: &LocalGateway, path: &str) -> String {
    http_client()
        .get(format!("http://{}{path}", env.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn breaker_opens_on_500s_then_half_opens_and_closes_when_upstream_recovers() {
    let status = Arc::new(AtomicU16::new(500));
    let up = status_upstream("flaky", status.clone()).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    circuit_breaker:\n      window: 10\n      min_requests: 5\n      consecutive_failures: 3\n      open_for: 1s\n      half_open_requests: 2\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.url()
    ))
    .await;
    let client = http_client();
    let url = format!("http://{}/x", env.addr);
    // Three failures in a row reach the upstream (no retries configured).
    for _ in 0..3 {
        assert_eq!(get(&client, url.clone()).await.0, 500);
    }
    assert_eq!(up.hits(), 3);
    // Open: answered at once, without contacting the upstream.
    for _ in 0..5 {
        let (code, headers, body) = get(&client, url.clone()).await;
        assert_eq!(code, 503, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "circuit_open", "{body}");
        assert_eq!(headers["retry-after"], "1", "{headers:?}");
    }
    assert_eq!(
        up.hits(),
        3,
        "the open breaker must not contact the upstream"
    );
    let metrics = admin_text(&env, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "portico_upstream_circuit_state{{upstream=\"u\",target=\"{}\"}} 1",
            up.url()
        )),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("portico_upstream_circuit_transitions_total{upstream=\"u\",to=\"open\"} 1"),
        "{metrics}"
    );
    let ups = admin_text(&env, "/admin/upstreams").await;
    let v: serde_json::Value = serde_json::from_str(&ups).unwrap();
    assert_eq!(
        v["upstreams"][0]["circuit_breaker"]["state"], "open",
        "{ups}"
    );
    assert_eq!(v["upstreams"][0]["targets"][0]["circuit"], "open", "{ups}");
    assert!(
        env.gw
            .wait_for_log("circuit breaker closed → open", Duration::from_secs(5)),
        "{}",
        env.gw.logs()
    );

    // The upstream recovers; after open_for, the trials go through and close the breaker.
    status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for _ in 0..2 {
        assert_eq!(get(&client, url.clone()).await.0, 200);
    }
    for _ in 0..5 {
        assert_eq!(get(&client, url.clone()).await.0, 200);
    }
    assert_eq!(up.hits(), 10);
    let metrics = admin_text(&env, "/metrics").await;
    for (to, n) in [("open", 1), ("half_open", 1), ("closed", 1)] {
        assert!(
            metrics.contains(&format!(
                "portico_upstream_circuit_transitions_total{{upstream=\"u\",to=\"{to}\"}} {n}"
            )),
            "{to}: {metrics}"
        );
    }
    assert!(
        metrics.contains(&format!(
            "portico_upstream_circuit_state{{upstream=\"u\",target=\"{}\"}} 0",
            up.url()
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn breaker_half_open_trial_failure_reopens() {
    let status = Arc::new(AtomicU16::new(502));
    let up = status_upstream("down", status.clone()).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    circuit_breaker: {{consecutive_failures: 2, open_for: 1s, half_open_requests: 1}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.url()
    ))
    .await;
    let client = http_client();
    let url = format!("http://{}/", env.addr);
    for _ in 0..2 {
        assert_eq!(get(&client, url.clone()).await.0, 502);
    }
    assert_eq!(get(&client, url.clone()).await.0, 503);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // The trial fails: open again at once.
    assert_eq!(get(&client, url.clone()).await.0, 502);
    let (code, _, body) = get(&client, url.clone()).await;
    assert_eq!(code, 503);
    assert!(body.contains("circuit_open"), "{body}");
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn breaker_fallback_served_when_open() {
    let up = status_upstream("broken", Arc::new(AtomicU16::new(503))).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    circuit_breaker:\n      consecutive_failures: 2\n      open_for: 1m\n      fallback:\n        status: 200\n        headers: {{content-type: application/json, x-fallback: \"yes\"}}\n        body: '{{\"items\": []}}'\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.url()
    ))
    .await;
    let client = http_client();
    let url = format!("http://{}/items", env.addr);
    for _ in 0..2 {
        assert_eq!(get(&client, url.clone()).await.0, 503);
    }
    for _ in 0..3 {
        let (code, headers, body) = get(&client, url.clone()).await;
        assert_eq!(code, 200);
        assert_eq!(headers["x-fallback"], "yes");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(body, "{\"items\": []}");
    }
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_get_on_the_other_target_but_not_post_by_default() {
    let bad = status_upstream("bad", Arc::new(AtomicU16::new(503))).await;
    let good = Upstream::start_with("good", default_handler("good")).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    balance: round_robin\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    retries:\n      attempts: 2\n      backoff: {{base: 1ms, max: 5ms}}\n      budget: {{min_per_second: 1000}}\nroutes:\n  - {{name: post, paths: [\"/post/*\"], upstream: u, retries: {{methods: [POST], attempts: 2, backoff: {{base: 1ms, max: 5ms}}}}}}\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        bad.url(),
        good.url()
    ))
    .await;
    let client = http_client();
    // GET: every request ends on the good target.
    for _ in 0..20 {
        let (code, _, body) = get(&client, format!("http://{}/g", env.addr)).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"upstream\":\"good\""), "{body}");
    }
    assert_eq!(good.hits(), 20);
    assert!(bad.hits() >= 5, "round robin sends some tries to bad");
    // POST: not in the default methods, so a 503 goes to the client.
    let (bad0, good0) = (bad.hits(), good.hits());
    let mut failed = 0;
    for _ in 0..10 {
        let (code, _, _) = send(
            &client,
            reqwest::Method::POST,
            format!("http://{}/p", env.addr),
            Some("payload"),
        )
        .await;
        match code {
            503 => failed += 1,
            200 => {}
            c => panic!("unexpected {c}"),
        }
    }
    assert!(failed >= 3, "round robin sends some POSTs to bad: {failed}");
    assert_eq!(
        bad.hits() + good.hits() - bad0 - good0,
        10,
        "no POST retried"
    );
    assert_eq!(bad.hits() - bad0, failed);
    // A route's `retries` replace the upstream's: POST retried, its body sent again.
    for i in 0..10 {
        let payload = format!("payload-{i}");
        let (code, _, body) = send(
            &client,
            reqwest::Method::POST,
            format!("http://{}/post/x", env.addr),
            Some(&payload),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["upstream"], "good");
        assert_eq!(v["body"], payload.as_str(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_are_bounded_by_attempts_and_connect_errors_retry_any_method() {
    let a = status_upstream("a", Arc::new(AtomicU16::new(503))).await;
    let b = status_upstream("b", Arc::new(AtomicU16::new(504))).await;
    let good = Upstream::start_with("good", default_handler("good")).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let env = start(&format!(
        "upstreams:\n  failing:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    retries: {{attempts: 3, backoff: {{base: 1ms, max: 2ms}}, budget: {{min_per_second: 1000}}}}\n  half_dead:\n    balance: round_robin\n    targets: [{{url: \"{dead}\"}}, {{url: \"{}\"}}]\n    health: {{passive: {{enabled: false}}}}\n    retries: {{attempts: 2, backoff: {{base: 1ms, max: 2ms}}}}\nroutes:\n  - {{name: f, paths: [\"/f\"], upstream: failing}}\n  - {{name: d, paths: [\"/d\"], upstream: half_dead}}\n",
        a.url(),
        b.url(),
        good.url()
    ))
    .await;
    let client = http_client();
    for _ in 0..10 {
        let code = get(&client, format!("http://{}/f", env.addr)).await.0;
        assert!(code == 503 || code == 504, "{code}");
    }
    // Three tries each: both targets, then one of them again.
    assert_eq!(a.hits() + b.hits(), 30);
    assert!(
        a.hits() >= 10 && b.hits() >= 10,
        "{} {}",
        a.hits(),
        b.hits()
    );
    // Nothing was sent to the dead target: a POST goes to the other one.
    for _ in 0..6 {
        let (code, _, body) = send(
            &client,
            reqwest::Method::POST,
            format!("http://{}/d", env.addr),
            Some("x"),
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(good.hits(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_budget_caps_retries_when_every_target_fails() {
    let up = status_upstream("down", Arc::new(AtomicU16::new(503))).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    retries:\n      attempts: 3\n      backoff: {{base: 1ms, max: 1ms}}\n      budget: {{ratio: 0.2, min_per_second: 0, window: 60s}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.url()
    ))
    .await;
    let client = http_client();
    for _ in 0..100 {
        let (code, _, body) = get(&client, format!("http://{}/", env.addr)).await;
        // The last try's answer: the upstream's own 503.
        assert_eq!(code, 503);
        assert!(body.contains("\"upstream\":\"down\""), "{body}");
    }
    // Without the budget: 300 tries. With it: 100 requests earn 0.2 × 100 = 20 retries.
    let hits = up.hits();
    assert!((110..=122).contains(&hits), "{hits} tries for 100 requests");
}

/// `portico validate` on a file: (exit code, stderr).
fn validate(yaml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("portico.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(BIN)
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_reports_bad_resilience_settings() {
    let (code, err) = validate(
        "upstreams:\n  api:\n    targets: [{url: \"http://127.0.0.1:9001\"}]\n    circuit_breaker:\n      failure_rate: 50\n      window: 5\n      min_requests: 6\n      fallback: {status: 99}\n    retries:\n      attempts: 0\n      on: [200]\n      budget: {window: 1500ms}\nroutes:\n  - {name: r, paths: [\"/\"], upstream: api, retries: {methods: [get]}}\n",
    );
    assert_eq!(code, Some(1), "{err}");
    for needle in [
        "upstreams.api.circuit_breaker.failure_rate: failure_rate must be between 0 and 1 (got 50)",
        "upstreams.api.circuit_breaker.min_requests: min_requests (6) must not exceed window (5)",
        "upstreams.api.circuit_breaker.fallback.status: status must be a final status between 200 and 599 (got 99)",
        "upstreams.api.retries.attempts: attempts must be between 1 and 10 (got 0)",
        "upstreams.api.retries.on[0]: 200 is not an error status (400-599)",
        "upstreams.api.retries.budget.window: budget.window must be whole seconds between 1s and 60s (got 1500ms)",
        "routes[0].retries.methods[0]: methods are upper-case: write `GET`",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in\n{err}");
    }
    let (code, err) = validate(
        "upstreams:\n  api:\n    targets: [{url: \"http://127.0.0.1:9001\"}]\n    circuit_breaker: {windw: 3}\nroutes:\n  - {name: r, paths: [\"/\"], upstream: api}\n",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("windw"), "{err}");
    let (code, err) = validate(
        "upstreams:\n  api:\n    targets: [{url: \"http://127.0.0.1:9001\"}]\n    circuit_breaker: {failure_rate: 25%, open_for: 10s, max_open_for: 1m}\n    retries: {attempts: 2, on: [connect_error, 503]}\nroutes:\n  - {name: r, paths: [\"/\"], upstream: api}\n",
    );
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn total_timeout_bounds_every_try_together() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    timeouts: {{request: 400ms, total: 1s}}\n    retries: {{attempts: 5, on: [timeout], backoff: {{base: 10ms, max: 10ms}}}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        a.url(),
        b.url()
    ))
    .await;
    let client = http_client();
    // Every try takes 5 s: tries of 400 ms each fit in 1 s at most three times.
    let (code, _, body) = get(&client, format!("http://{}/sleep/5000", env.addr)).await;
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("total timeout (1s"), "{body}");
    let tries = a.hits() + b.hits();
    assert!((2..=3).contains(&tries), "{tries} tries within a 1s total");
    // A route may override it.
    let env2 = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    timeouts: {{request: 10s, total: 10s}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u, timeouts: {{total: 300ms}}}}\n",
        a.url()
    ))
    .await;
    let (code, _, body) = get(&client, format!("http://{}/sleep/5000", env2.addr)).await;
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("total timeout (300ms"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn total_timeout_bounds_a_request_body_that_keeps_streaming() {
    // The upload never stalls long enough for `idle`, and `request` only starts once
    // the body ends: `total` alone ends the exchange while the body still streams.
    let a = Upstream::start("a").await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    timeouts: {{request: 10s, idle: 5s, total: 800ms}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        a.url()
    ))
    .await;
    // 15 pieces, one every 200 ms: 3 s of upload.
    let chunks = futures_util::stream::unfold(0u32, |i| async move {
        if i == 15 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((Ok::<_, std::io::Error>(vec![b'u'; 1024]), i + 1))
    });
    let r = http_client()
        .post(format!("http://{}/upload", env.addr))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("the gateway answers while the body is still being sent");
    let code = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("upstream_timeout"), "{body}");
    assert!(body.contains("total timeout (800ms"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keepalive_closes_unused_pooled_connections() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let env = start(&format!(
        "upstreams:\n  short:\n    targets: [{{url: \"{}\"}}]\n    timeouts: {{keepalive: 100ms}}\n  long:\n    targets: [{{url: \"{}\"}}]\nroutes:\n  - {{name: s, paths: [\"/s\"], upstream: short}}\n  - {{name: l, paths: [\"/l\"], upstream: long}}\n",
        a.url(),
        b.url()
    ))
    .await;
    let client = http_client();
    for path in ["/s", "/l"] {
        assert_eq!(
            get(&client, format!("http://{}{path}", env.addr)).await.0,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in ["/s", "/l"] {
        assert_eq!(
            get(&client, format!("http://{}{path}", env.addr)).await.0,
            200
        );
    }
    assert_eq!(
        a.connections(),
        2,
        "past its keepalive, the pooled connection is not reused"
    );
    assert_eq!(b.connections(), 1, "within the default 90s it is");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_breaker_per_target_takes_only_the_failing_target_out() {
    let bad = status_upstream("bad", Arc::new(AtomicU16::new(500))).await;
    let good = status_upstream("good", Arc::new(AtomicU16::new(200))).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    health: {{passive: {{enabled: false}}}}\n    circuit_breaker: {{per_target: true, consecutive_failures: 3, open_for: 30s}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        bad.url(),
        good.url()
    ))
    .await;
    let client = http_client();
    // Turns alternate: the bad target fails three times within six requests.
    for _ in 0..6 {
        get(&client, format!("http://{}/x", env.addr)).await;
    }
    assert_eq!(bad.hits(), 3);
    for _ in 0..10 {
        let (code, _, body) = get(&client, format!("http://{}/x", env.addr)).await;
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(bad.hits(), 3, "its open breaker keeps the bad target out");
    let v: serde_json::Value =
        serde_json::from_str(&admin_text(&env, "/admin/upstreams").await).unwrap();
    let circuits: Vec<(String, String)> = v["upstreams"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["url"].as_str().unwrap().to_string(),
                t["circuit"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(circuits.contains(&(bad.url(), "open".into())), "{v}");
    assert!(circuits.contains(&(good.url(), "closed".into())), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_breaker_stays_open_across_a_reload() {
    let up = status_upstream("flaky", Arc::new(AtomicU16::new(500))).await;
    let upstreams = format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    circuit_breaker: {{consecutive_failures: 2, open_for: 30s}}\n",
        up.url()
    );
    let env = start(&format!(
        "{upstreams}routes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n"
    ))
    .await;
    let client = http_client();
    for _ in 0..2 {
        assert_eq!(get(&client, format!("http://{}/x", env.addr)).await.0, 500);
    }
    assert_eq!(get(&client, format!("http://{}/x", env.addr)).await.0, 503);
    // A reload that changes something else (a new route) keeps the breaker's state.
    env.gw.write_config(&format!(
        "listen: [\"{}\"]\nadmin:\n  listen: \"{}\"\n{upstreams}routes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n  - {{name: other, paths: [\"/other\"], upstream: u}}\n",
        env.addr, env.admin
    ));
    let r = client
        .post(format!("http://{}/admin/reload", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (code, _, body) = get(&client, format!("http://{}/x", env.addr)).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("circuit_open"), "{body}");
    assert_eq!(up.hits(), 2);
}

/// A server that accepts connections, reads the request, and closes without answering.
async fn resetting_server() -> (std::net::SocketAddr, Arc<AtomicU16>) {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicU16::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            s.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf).await;
            drop(c);
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_is_retried_only_when_configured() {
    let (reset_addr, resets) = resetting_server().await;
    let good = Upstream::start("good").await;
    let config = |on: &str| {
        format!(
            "upstreams:\n  u:\n    balance: round_robin\n    targets: [{{url: \"http://{reset_addr}\"}}, {{url: \"{}\"}}]\n    health: {{passive: {{enabled: false}}}}\n    retries: {{attempts: 2, on: [{on}], backoff: {{base: 1ms, max: 1ms}}}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
            good.url()
        )
    };
    let env = start(&config("reset")).await;
    let client = http_client();
    for _ in 0..4 {
        let (code, headers, body) = get(&client, format!("http://{}/x", env.addr)).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(headers["x-upstream"], "good");
    }
    assert!(resets.load(Ordering::SeqCst) >= 2);
    let m = admin_text(&env, "/metrics").await;
    assert!(
        !m.contains("portico_upstream_retries_total{upstream=\"u\",result=\"granted\"} 0"),
        "{m}"
    );
    // Without `reset` in `on`, the reset is answered 502.
    let env2 = start(&config("503")).await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(get(&client, format!("http://{}/x", env2.addr)).await.0);
    }
    assert!(codes.contains(&502), "{codes:?}");
}
