//! End-to-end tests of `rate-limit` and `concurrency-limit`: the real `portico`
//! binary, real upstreams and, for cluster mode, a real `redis-server` (started by the
//! test on a free port; CI installs it, and its absence fails the test).
//!
//! Covers: a local burst then `429` with `Retry-After`, the `RateLimit-Policy` /
//! `RateLimit` fields and the legacy `X-RateLimit-*`; keys by header and several
//! limits on one route; counters kept across a reload; in-flight limits with a queue
//! and `503`; two gateways sharing one limit through Redis (exact for GCRA); Redis
//! going away (`on_store_error`, the metric) and coming back on the same port.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use portico_test_support::redis::Redis;
use portico_test_support::{free_port, http_client, wait_until, LocalGateway, Upstream};
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn h(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn code(&self) -> String {
        let v: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        v["error"]["code"].as_str().unwrap_or("").to_string()
    }
}

async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str, user: Option<&str>) -> Answer {
    let mut r = client.get(format!("http://{addr}{path}"));
    if let Some(u) = user {
        r = r.header("x-user", u);
    }
    let resp = r.send().await.unwrap();
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap(),
    }
}

async fn metrics(admin: SocketAddr) -> String {
    http_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn upstreams(up: &Upstream) -> String {
    format!(
        "upstreams:\n  up:\n    targets: [{{url: \"{}\"}}]\n",
        up.url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn local_burst_then_429_with_retry_after_and_headers() {
    let up = Upstream::start("up").await;
    let gw = LocalGateway::start(
        bin(),
        &format!(
            "{}routes:
  - name: limited
    paths: [\"/a\"]
    upstream: up
    plugins:
      rate-limit: {{limits: [{{requests: 3, per: 1m}}], legacy_headers: true}}
",
            upstreams(&up)
        ),
    )
    .await;
    let c = http_client();
    for i in 0..3 {
        let a = get(&c, gw.addr, "/a", None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.h("ratelimit-policy"), "\"3-per-1m\";q=3;w=60");
        // GCRA: 3 at once, then one every 20 s; `t` is when the quota is full again.
        assert_eq!(
            a.h("ratelimit"),
            format!("\"3-per-1m\";r={};t={}", 2 - i, 20 * (i + 1))
        );
        assert_eq!(a.h("x-ratelimit-limit"), "3");
        assert_eq!(a.h("x-ratelimit-remaining"), (2 - i).to_string());
    }
    let a = get(&c, gw.addr, "/a", None).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.code(), "too_many_requests");
    assert_eq!(a.h("content-type"), "application/json");
    let retry: u64 = a.h("retry-after").parse().unwrap();
    assert!((19..=20).contains(&retry), "Retry-After {retry}");
    assert!(
        a.h("ratelimit").starts_with("\"3-per-1m\";r=0;t="),
        "{}",
        a.h("ratelimit")
    );
    assert_eq!(a.h("ratelimit-policy"), "\"3-per-1m\";q=3;w=60");
    assert_eq!(a.h("x-ratelimit-remaining"), "0");
    assert_eq!(up.hits(), 3, "refused requests never reach the upstream");
    let m = metrics(gw.admin).await;
    assert_eq!(
        sample(
            &m,
            "portico_rate_limit_requests_total{scope=\"route:limited\",result=\"rejected\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_by_header_and_several_limits() {
    let up = Upstream::start("up").await;
    let gw = LocalGateway::start(
        bin(),
        &format!(
            "{}routes:
  - name: keyed
    paths: [\"/k\"]
    upstream: up
    plugins:
      rate-limit:
        limits:
          - {{requests: 2, per: 1m, key: \"header:x-user\"}}
          - {{requests: 3, per: 1h, key: route, name: route-hourly}}
",
            upstreams(&up)
        ),
    )
    .await;
    let c = http_client();
    assert_eq!(get(&c, gw.addr, "/k", Some("alice")).await.status, 200);
    assert_eq!(get(&c, gw.addr, "/k", Some("alice")).await.status, 200);
    let a = get(&c, gw.addr, "/k", Some("alice")).await;
    assert_eq!(a.status, 429, "alice's own limit");
    assert!(
        a.h("ratelimit").starts_with("\"2-per-1m\";r=0"),
        "{}",
        a.h("ratelimit")
    );
    // Bob has his own count; the route's hourly limit (3) was charged twice so far
    // (the refusal counted against neither limit).
    let a = get(&c, gw.addr, "/k", Some("bob")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.h("ratelimit"), "\"route-hourly\";r=0;t=3600");
    assert_eq!(
        a.h("ratelimit-policy"),
        "\"2-per-1m\";q=2;w=60, \"route-hourly\";q=3;w=3600"
    );
    let a = get(&c, gw.addr, "/k", Some("carol")).await;
    assert_eq!(a.status, 429, "the route's hourly limit is spent");
    assert_eq!(a.h("retry-after"), "1200");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_the_counters_of_unchanged_limits() {
    let up = Upstream::start("up").await;
    let routes = |limit: u32, extra: &str| {
        format!(
            "{}routes:
  - name: r
    paths: [\"/r\"]
    upstream: up
    plugins:
      rate-limit: {{limits: [{{requests: {limit}, per: 1h}}]}}
{extra}",
            upstreams(&up)
        )
    };
    let gw = LocalGateway::start(bin(), &routes(2, "")).await;
    let c = http_client();
    assert_eq!(get(&c, gw.addr, "/r", None).await.status, 200);
    assert_eq!(get(&c, gw.addr, "/r", None).await.status, 200);
    assert_eq!(get(&c, gw.addr, "/r", None).await.status, 429);

    let reload = |yaml: String| {
        let gw = &gw;
        async move {
            gw.gw.write_config(&format!(
                "listen: [\"{}\"]\nadmin:\n  listen: \"{}\"\n{yaml}",
                gw.addr, gw.admin
            ));
            let v: Value = http_client()
                .post(format!("http://{}/admin/reload", gw.admin))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(v["status"], "reloaded", "{v}");
        }
    };
    // Another route added; this limit unchanged: still spent.
    reload(routes(
        2,
        "  - name: other\n    paths: [\"/other\"]\n    upstream: up\n",
    ))
    .await;
    assert_eq!(get(&c, gw.addr, "/other", None).await.status, 200);
    assert_eq!(get(&c, gw.addr, "/r", None).await.status, 429);
    // A changed limit starts counting anew.
    reload(routes(5, "")).await;
    assert_eq!(get(&c, gw.addr, "/r", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_limit_queues_then_refuses_with_503() {
    let up = Upstream::start("up").await;
    let gw = LocalGateway::start(
        bin(),
        &format!(
            "{}routes:
  - name: slow
    paths: [\"/sleep/*\"]
    upstream: up
    plugins:
      concurrency-limit: {{max: 1, queue: {{size: 1, timeout: 5s}}}}
  - name: impatient
    paths: [\"/impatient/*\"]
    upstream: up
    rewrite: \"/sleep/800\"
    plugins:
      concurrency-limit: {{max: 1, queue: {{size: 1, timeout: 200ms}}}}
",
            upstreams(&up)
        ),
    )
    .await;
    let addr = gw.addr;
    let spawn = |path: &'static str| {
        tokio::spawn(async move {
            let t = Instant::now();
            let a = get(&http_client(), addr, path, None).await;
            (a, t.elapsed())
        })
    };
    // One in flight (600 ms), one waiting for it, the third refused at once.
    let first = spawn("/sleep/600");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = spawn("/sleep/100");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (third, took) = spawn("/sleep/100").await.unwrap();
    assert_eq!(third.status, 503, "{}", third.body);
    assert_eq!(third.code(), "concurrency_limited");
    assert!(
        took < Duration::from_millis(400),
        "refused without waiting: {took:?}"
    );
    let (a, _) = first.await.unwrap();
    assert_eq!(a.status, 200);
    let (b, took) = second.await.unwrap();
    assert_eq!(b.status, 200, "{}", b.body);
    assert!(
        took >= Duration::from_millis(350),
        "it waited for the first: {took:?}"
    );
    // Slots are free again once responses ended.
    assert_eq!(
        get(&http_client(), addr, "/sleep/1", None).await.status,
        200
    );

    // A waiter whose time runs out is refused.
    let first = spawn("/impatient/x");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (b, took) = spawn("/impatient/y").await.unwrap();
    assert_eq!(b.status, 503);
    assert!(took >= Duration::from_millis(190), "{took:?}");
    assert!(took < Duration::from_millis(650), "{took:?}");
    assert_eq!(first.await.unwrap().0.status, 200);
    let m = metrics(gw.admin).await;
    assert_eq!(
        sample(
            &m,
            "portico_concurrency_limit_rejected_total{scope=\"route:impatient\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_mode_two_gateways_share_one_limit_and_survive_redis_restarts() {
    let mut redis = Redis::start(free_port());
    let up = Upstream::start("up").await;
    let rest = format!(
        "{}routes:
  - name: shared
    paths: [\"/shared\"]
    upstream: up
    plugins:
      rate-limit:
        mode: cluster
        redis: {{url: \"redis://127.0.0.1:{port}\", timeout: 200ms}}
        limits: [{{requests: 100, per: 1h, key: route}}]
  - name: open-on-error
    paths: [\"/allow\"]
    upstream: up
    plugins:
      rate-limit:
        mode: cluster
        redis: {{url: \"redis://127.0.0.1:{port}\", timeout: 200ms}}
        limits: [{{requests: 2, per: 1h}}]
  - name: closed-on-error
    paths: [\"/deny\"]
    upstream: up
    plugins:
      rate-limit:
        mode: cluster
        on_store_error: deny
        redis: {{url: \"redis://127.0.0.1:{port}\", timeout: 200ms}}
        limits: [{{requests: 2, per: 1h, algorithm: sliding_window}}]
",
        upstreams(&up),
        port = redis.port
    );
    let a = LocalGateway::start(bin(), &rest).await;
    let b = LocalGateway::start(bin(), &rest).await;

    // 300 requests, alternating between the gateways, 10 at a time: exactly the
    // limit (100, refilled by one every 36 s) is admitted.
    let mut admitted = 0;
    let mut refused = 0;
    for round in 0..30 {
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let addr = if (round * 10 + i) % 2 == 0 {
                    a.addr
                } else {
                    b.addr
                };
                tokio::spawn(async move { get(&http_client(), addr, "/shared", None).await })
            })
            .collect();
        for t in tasks {
            let r = t.await.unwrap();
            match r.status {
                200 => admitted += 1,
                429 => {
                    assert_eq!(r.code(), "too_many_requests");
                    assert!(r.h("retry-after").parse::<u64>().unwrap() >= 1);
                    refused += 1;
                }
                s => panic!("unexpected {s}: {}", r.body),
            }
        }
    }
    assert!(
        (98..=102).contains(&admitted),
        "admitted {admitted} of 300 (limit 100)"
    );
    assert_eq!(admitted + refused, 300);
    // The accuracy figure the issue asks for, in the test's output.
    eprintln!("cluster accuracy: admitted {admitted} of 300 against a limit of 100");

    // Both gateways answer from one count (the sliding window too).
    let c = http_client();
    assert_eq!(get(&c, a.addr, "/deny", None).await.status, 200);
    assert_eq!(get(&c, b.addr, "/deny", None).await.status, 200);
    let r = get(&c, a.addr, "/deny", None).await;
    assert_eq!(r.status, 429);
    assert!(
        r.h("ratelimit").starts_with("\"2-per-1h\";r=0;t="),
        "{}",
        r.h("ratelimit")
    );

    // Redis goes away: `allow` lets requests through (without the fields), `deny`
    // refuses with 503; both count the failures.
    redis.stop();
    for _ in 0..3 {
        let r = get(&c, a.addr, "/allow", None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.h("ratelimit"), "");
    }
    let r = get(&c, b.addr, "/deny", None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.code(), "rate_limit_unavailable");
    let m = metrics(a.admin).await;
    let errors = sample(
        &m,
        "portico_rate_limit_store_errors_total{scope=\"route:open-on-error\"}",
    );
    assert_eq!(errors, Some(3.0), "{m}");
    let m = metrics(b.admin).await;
    let errors = sample(
        &m,
        "portico_rate_limit_store_errors_total{scope=\"route:closed-on-error\"}",
    );
    assert!(errors.unwrap_or(0.0) >= 1.0, "{m}");

    // Redis comes back (empty) on the same port: limits work again, no restart.
    let _redis = Redis::start(redis.port);
    let back = wait_until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async { get(&http_client(), b.addr, "/deny", None).await.status == 200 },
    )
    .await;
    assert!(back, "the gateway did not reconnect to Redis");
    // Each gateway reconnects on its own: `a` may still be refusing (503, not
    // counted) for a moment after `b` is back.
    let back = wait_until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async { get(&http_client(), a.addr, "/deny", None).await.status == 200 },
    )
    .await;
    assert!(back, "the second gateway did not reconnect to Redis");
    let r = get(&c, b.addr, "/deny", None).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(get(&c, a.addr, "/allow", None).await.status, 200);
    assert_eq!(get(&c, b.addr, "/allow", None).await.status, 200);
    let r = get(&c, a.addr, "/allow", None).await;
    assert_eq!(r.status, 429, "counted in Redis again");
}
