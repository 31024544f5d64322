//! End-to-end adaptive protection: hedging (a second try when the first is slow) and
//! the adaptive concurrency limit, with real upstream servers that are slow, or that
//! slow down as load grows (docs/upstreams.md, "Adaptive protection").
//!
//! Timing: effects are asserted by who answered and by counts, with wide margins; no
//! assertion on elapsed time.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use portico_test_support::upstream::{handler, json_response};
use portico_test_support::{http_client, wait_until, LocalGateway, Upstream};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_portico");

async fn start(body: &str) -> LocalGateway {
    LocalGateway::start(Path::new(BIN), body).await
}

/// An upstream that answers after `delay`, naming itself.
async fn delayed(name: &str, delay: Duration) -> Upstream {
    let n = name.to_string();
    Upstream::start_with(
        name,
        handler(move |_req| {
            let n = n.clone();
            async move {
                tokio::time::sleep(delay).await;
                json_response(StatusCode::OK, &json!({"upstream": n}))
            }
        }),
    )
    .await
}

async fn admin_json(env: &LocalGateway, path: &str) -> Value {
    let t = http_client()
        .get(format!("http://{}{path}", env.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&t).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_first_try_is_hedged_to_another_target() {
    let slow = delayed("slow", Duration::from_secs(3)).await;
    let fast = delayed("fast", Duration::ZERO).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    balance: round_robin\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    hedging: {{delay: 50ms}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        slow.url(),
        fast.url()
    ))
    .await;
    let client = http_client();
    for _ in 0..6 {
        let r = client
            .get(format!("http://{}/x", env.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["upstream"], "fast", "the hedge's answer is used");
    }
    // Every request that went to the slow target first was hedged, and the hedge won.
    // (The hedge's pick moves the round-robin cursor too, so how many went to the
    // slow one first is not simply half.)
    let slow_first = slow.hits() as u64;
    assert!(slow_first >= 3, "{slow_first}");
    let u = admin_json(&env, "/admin/upstreams").await;
    assert_eq!(u["upstreams"][0]["hedges"]["sent"], slow_first, "{u}");
    assert_eq!(u["upstreams"][0]["hedges"]["won"], slow_first, "{u}");

    // A POST is not idempotent: never hedged, it waits for the slow target.
    let slow_post = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\", weight: 0}}]\n    hedging: {{delay: 50ms}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        slow.url(),
        fast.url()
    ))
    .await;
    let r = client
        .post(format!("http://{}/x", slow_post.addr))
        .body("{}")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["upstream"], "slow");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_concurrency_limit_falls_as_the_upstream_slows_under_load() {
    // Each request takes 4 ms per request in flight: latency grows with load.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (f, p) = (in_flight.clone(), peak.clone());
    let up = Upstream::start_with(
        "queue",
        handler(move |_req| {
            let (f, p) = (f.clone(), p.clone());
            async move {
                let n = f.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(4 * n as u64)).await;
                f.fetch_sub(1, Ordering::SeqCst);
                json_response(StatusCode::OK, &json!({"ok": true}))
            }
        }),
    )
    .await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    adaptive_concurrency: {{initial_limit: 60, min_limit: 2, window: 100ms, min_samples: 5, smoothing: 0.5}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.url()
    ))
    .await;
    let url = format!("http://{}/x", env.addr);
    let ok = Arc::new(AtomicUsize::new(0));
    let shed = Arc::new(AtomicUsize::new(0));
    let stop = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let (url, ok, shed) = (url.clone(), ok.clone(), shed.clone());
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            while tokio::time::Instant::now() < stop {
                let r = client.get(&url).send().await.unwrap();
                match r.status().as_u16() {
                    200 => ok.fetch_add(1, Ordering::SeqCst),
                    503 => {
                        let v: Value = r.json().await.unwrap();
                        assert_eq!(v["error"]["code"], "upstream_overloaded");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        shed.fetch_add(1, Ordering::SeqCst)
                    }
                    s => panic!("unexpected status {s}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let u = admin_json(&env, "/admin/upstreams").await;
    let limit = u["upstreams"][0]["adaptive_concurrency"]["limit"]
        .as_u64()
        .unwrap();
    assert!(limit < 40, "the limit fell well below the 60 clients: {u}");
    assert!(shed.load(Ordering::SeqCst) > 0, "excess load was shed");
    assert!(ok.load(Ordering::SeqCst) > 100, "and the rest served");
    let metrics = http_client()
        .get(format!("http://{}/metrics", env.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "portico_upstream_concurrency_limit{{upstream=\"u\"}} {limit}"
        )),
        "{metrics}"
    );
}

/// An upstream limited to one request in flight (the limit never moves: it starts
/// measuring at `min_limit` 1, and `max_limit` is 1 too), with `retries` as given.
fn one_slot(url: &str, retries: &str) -> String {
    format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{url}\"}}]\n    adaptive_concurrency: {{initial_limit: 1, min_limit: 1, max_limit: 1, min_samples: 1000}}\n    retries: {retries}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n"
    )
}

/// `adaptive_concurrency` of upstream `u` in the admin API.
async fn adaptive_state(env: &LocalGateway) -> Value {
    let v = admin_json(env, "/admin/upstreams").await;
    let u = v["upstreams"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == "u"));
    u.unwrap()["adaptive_concurrency"].clone()
}

/// Wait until upstream `u` has no try in flight (the first try's answer reached the
/// gateway).
async fn until_idle(env: &LocalGateway) {
    let idle = wait_until(Duration::from_secs(2), Duration::from_millis(2), || async {
        adaptive_state(env).await["in_flight"] == 0
    })
    .await;
    assert!(idle, "still in flight: {}", adaptive_state(env).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upload_kept_for_retries_holds_no_concurrency_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A body kept for retries is read before the first try: while the client is
    // still sending it, nothing is in flight to the upstream, so the upstream's one
    // slot stays free for other requests.
    let up = Upstream::start("up").await;
    let env = start(&one_slot(
        &up.url(),
        "{attempts: 2, budget: {min_per_second: 1000}}",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    s.write_all(&[b'u'; 1024]).await.unwrap();
    // Give the gateway time to route the request and start reading its body.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(adaptive_state(&env).await["in_flight"], 0);
    let r = http_client()
        .get(format!("http://{}/x", env.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    // The upload completes and goes upstream whole.
    s.write_all(&[b'u'; 1024]).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"received\":2048"), "{out}");
    let a = adaptive_state(&env).await;
    assert_eq!(a["shed"], 0, "{a}");
    assert_eq!(a["in_flight"], 0, "{a}");
}

/// An upstream whose `/flaky` answers 503 (counting its calls in `flaky`) and
/// every other path 200 after `delay`.
async fn flaky(flaky: Arc<AtomicUsize>, delay: Duration) -> Upstream {
    Upstream::start_with(
        "flaky",
        handler(move |req| {
            let flaky = flaky.clone();
            async move {
                if req.uri().path() == "/flaky" {
                    flaky.fetch_add(1, Ordering::SeqCst);
                    return json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"upstream": "flaky"}),
                    );
                }
                tokio::time::sleep(delay).await;
                json_response(StatusCode::OK, &json!({"upstream": "ok"}))
            }
        }),
    )
    .await
}

/// Wait until `n` reaches `want`.
async fn until_count(n: &AtomicUsize, want: usize) {
    let reached = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(2),
        || async { n.load(Ordering::SeqCst) >= want },
    )
    .await;
    assert!(reached, "never reached {want}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pause_between_retries_holds_no_concurrency_slot() {
    // The first try is answered 503 and retried after a pause (up to 10 s, jittered);
    // during the pause nothing is in flight, so another request gets the one slot.
    // (Only a pause of a few ms, 1 in ~2000, would let the retry go first.)
    let hits = Arc::new(AtomicUsize::new(0));
    let up = flaky(hits.clone(), Duration::ZERO).await;
    let env = start(&one_slot(
        &up.url(),
        "{attempts: 2, backoff: {base: 10s, max: 10s}, budget: {min_per_second: 1000}}",
    ))
    .await;
    let url = format!("http://{}", env.addr);
    let retried = tokio::spawn({
        let url = url.clone();
        async move { http_client().get(format!("{url}/flaky")).send().await }
    });
    until_count(&hits, 1).await;
    // Its answer is in: the retry waits, and nothing is in flight meanwhile.
    until_idle(&env).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the retry has not gone yet");
    let r = http_client()
        .get(format!("{url}/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let a = adaptive_state(&env).await;
    assert_eq!(a["shed"], 0, "{a}");
    assert_eq!(a["in_flight"], 0, "{a}");
    retried.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_refused_by_the_limit_gives_the_last_answer() {
    // While the first try's retry waits, a slow request takes the one slot: the retry
    // is refused, and the client gets the upstream's answer to its first try (as when
    // the retry budget or the breaker refuses a retry), not `upstream_overloaded`.
    let hits = Arc::new(AtomicUsize::new(0));
    let up = flaky(hits.clone(), Duration::from_secs(3)).await;
    let env = start(&one_slot(
        &up.url(),
        "{attempts: 2, backoff: {base: 2s, max: 2s}, budget: {min_per_second: 1000}}",
    ))
    .await;
    let url = format!("http://{}", env.addr);
    let retried = tokio::spawn({
        let url = url.clone();
        async move {
            http_client()
                .get(format!("{url}/flaky"))
                .send()
                .await
                .unwrap()
        }
    });
    until_count(&hits, 1).await;
    until_idle(&env).await;
    let slow = tokio::spawn({
        let url = url.clone();
        async move {
            http_client()
                .get(format!("{url}/slow"))
                .send()
                .await
                .unwrap()
        }
    });
    let r = retried.await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["upstream"], "flaky", "the upstream's answer: {v}");
    if hits.load(Ordering::SeqCst) == 1 {
        // The retry was refused (the usual case; a pause of almost nothing, by the
        // jitter, can let it go before the slow request).
        assert_eq!(adaptive_state(&env).await["shed"], 1);
        assert_eq!(slow.await.unwrap().status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_refused_by_the_limit_is_not_mirrored() {
    let hits = Arc::new(AtomicUsize::new(0));
    let up = flaky(hits, Duration::from_secs(2)).await;
    let mirror = Upstream::start("mirror").await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    adaptive_concurrency: {{initial_limit: 1, min_limit: 1, max_limit: 1, min_samples: 1000}}\n  m:\n    targets: [{{url: \"{}\"}}]\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u, mirror: {{upstream: m}}}}\n",
        up.url(),
        mirror.url()
    ))
    .await;
    let url = format!("http://{}", env.addr);
    let slow = tokio::spawn({
        let url = url.clone();
        async move {
            http_client()
                .get(format!("{url}/slow"))
                .send()
                .await
                .unwrap()
        }
    });
    let reached = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(2),
        || async { up.hits() >= 1 },
    )
    .await;
    assert!(reached, "the upstream never got the slow request");
    let r = http_client().get(format!("{url}/b")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_overloaded", "{v}");
    assert_eq!(slow.await.unwrap().status(), 200);
    // The first request's copy arrives; the refused one's never does.
    let copied = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(5),
        || async { mirror.hits() >= 1 },
    )
    .await;
    assert!(copied, "the first request's copy never reached the mirror");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mirror.hits(), 1);
    assert_eq!(adaptive_state(&env).await["shed"], 1);
}
