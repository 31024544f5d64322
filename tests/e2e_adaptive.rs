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
use portico_test_support::{http_client, LocalGateway, Upstream};
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
