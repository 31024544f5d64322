//! End-to-end target health: the real `portico` binary in front of real upstream
//! servers whose health endpoint fails and recovers, that stop listening and come back,
//! and that answer 5xx (docs/upstreams.md, "Health").
//!
//! Timing: probe intervals are 200 ms; every wait polls the admin API with a deadline
//! many times longer than the expected delay, and distributions are counted.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use portico_test_support::upstream::{handler, json_response};
use portico_test_support::{free_port, http_client, LocalGateway, Upstream};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_portico");

async fn start(body: &str) -> LocalGateway {
    LocalGateway::start(Path::new(BIN), body).await
}

/// An upstream whose `/health` answers `health` (with body `ok` or `degraded` for
/// 200/other... see `body`), and every other path `status` with a JSON body naming it.
async fn upstream_on(
    name: &str,
    addr: Option<SocketAddr>,
    health: Arc<AtomicU16>,
    status: Arc<AtomicU16>,
) -> Upstream {
    let n = name.to_string();
    let h = handler(move |req| {
        let n = n.clone();
        let (health, status) = (health.clone(), status.clone());
        async move {
            if req.uri().path() == "/health" {
                let code = health.load(Ordering::SeqCst);
                // 299 stands for "200 with a body that says degraded".
                let (code, body) = if code == 299 {
                    (200, "degraded")
                } else {
                    (code, "ok")
                };
                return json_response(
                    StatusCode::from_u16(code).unwrap(),
                    &json!({"status": body}),
                );
            }
            let code = status.load(Ordering::SeqCst);
            json_response(StatusCode::from_u16(code).unwrap(), &json!({"upstream": n}))
        }
    });
    match addr {
        Some(a) => Upstream::spawn(name, a, None, Some(h)).await,
        None => Upstream::start_with(name, h).await,
    }
}

fn cell(v: u16) -> Arc<AtomicU16> {
    Arc::new(AtomicU16::new(v))
}

async fn admin_json(env: &LocalGateway, path: &str) -> Value {
    let text = http_client()
        .get(format!("http://{}{path}", env.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The admin view of target `url` of the first upstream.
async fn target(env: &LocalGateway, url: &str) -> Value {
    let v = admin_json(env, "/admin/upstreams").await;
    v["upstreams"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["url"] == url)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Poll until target `url` has `healthy == want` (10 s at most).
async fn wait_healthy(env: &LocalGateway, url: &str, want: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = target(env, url).await;
        if t["healthy"] == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "target {url} never became healthy={want}: {t}\n{}",
            env.gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Send `n` requests; count answers by the upstream named in the body (or by status
/// for answers without one).
async fn spread(env: &LocalGateway, n: usize) -> std::collections::BTreeMap<String, usize> {
    let client = http_client();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let r = client
            .get(format!("http://{}/x", env.addr))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
        let key = match v["upstream"].as_str() {
            Some(u) => format!("{u}:{code}"),
            None => format!("{}:{code}", v["error"]["code"].as_str().unwrap_or("?")),
        };
        *seen.entry(key).or_default() += 1;
    }
    seen
}

const CHECK: &str = "      active: {path: /health, interval: 200ms, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2}\n";

#[tokio::test(flavor = "multi_thread")]
async fn active_http_check_takes_a_failing_target_out_and_brings_it_back() {
    let (ha, hb) = (cell(200), cell(200));
    let a = upstream_on("a", None, ha.clone(), cell(200)).await;
    let b = upstream_on("b", None, hb.clone(), cell(200)).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    health:\n{CHECK}routes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        a.url(),
        b.url()
    ))
    .await;
    let both = spread(&env, 20).await;
    assert_eq!(both.get("a:200"), Some(&10), "{both:?}");
    assert_eq!(both.get("b:200"), Some(&10), "{both:?}");
    assert_eq!(target(&env, &a.url()).await["active_check"], "up");

    // a's health endpoint fails: two failed probes take it out.
    ha.store(503, Ordering::SeqCst);
    wait_healthy(&env, &a.url(), false).await;
    assert_eq!(target(&env, &a.url()).await["active_check"], "down");
    let only_b = spread(&env, 20).await;
    assert_eq!(only_b.get("b:200"), Some(&20), "{only_b:?}");
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
            "portico_upstream_target_healthy{{upstream=\"u\",target=\"{}\"}} 0",
            a.url()
        )),
        "{metrics}"
    );
    assert!(env.gw.logs().contains("target unhealthy (active checks)"));

    // It recovers: two good probes bring it back.
    ha.store(200, Ordering::SeqCst);
    wait_healthy(&env, &a.url(), true).await;
    let again = spread(&env, 20).await;
    assert_eq!(again.get("a:200"), Some(&10), "{again:?}");
    assert!(env
        .gw
        .logs()
        .contains("target healthy again (active checks)"));
}

#[tokio::test(flavor = "multi_thread")]
async fn body_and_status_expectations_decide_health() {
    let ha = cell(200);
    let a = upstream_on("a", None, ha.clone(), cell(200)).await;
    let b = upstream_on("b", None, cell(200), cell(200)).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    health:\n      active: {{path: /health, interval: 200ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 1, expected_statuses: [200], body_contains: '\"ok\"'}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        a.url(),
        b.url()
    ))
    .await;
    // 200 but the body says "degraded": unhealthy.
    ha.store(299, Ordering::SeqCst);
    wait_healthy(&env, &a.url(), false).await;
    ha.store(200, Ordering::SeqCst);
    wait_healthy(&env, &a.url(), true).await;
    // 204 is a success status, but not the expected one.
    ha.store(204, Ordering::SeqCst);
    wait_healthy(&env, &a.url(), false).await;
    assert_eq!(spread(&env, 10).await.get("b:200"), Some(&10));
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_check_follows_a_target_that_dies_and_comes_back() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let a = upstream_on("a", Some(addr), cell(200), cell(200)).await;
    let b = upstream_on("b", None, cell(200), cell(200)).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    health:\n      passive: {{enabled: false}}\n      active: {{type: tcp, interval: 200ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 2}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        a.url(),
        b.url()
    ))
    .await;
    let url_a = a.url();
    a.stop().await;
    drop(a);
    wait_healthy(&env, &url_a, false).await;
    // Passive health is off: only the checker keeps requests away from the dead target.
    let only_b = spread(&env, 20).await;
    assert_eq!(only_b.get("b:200"), Some(&20), "{only_b:?}");
    // The same address serves again.
    let _a2 = upstream_on("a2", Some(addr), cell(200), cell(200)).await;
    wait_healthy(&env, &url_a, true).await;
    let again = spread(&env, 20).await;
    assert_eq!(again.get("a2:200"), Some(&10), "{again:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn consecutive_5xx_eject_a_target_for_a_growing_time() {
    let sa = cell(500);
    let a = upstream_on("a", None, cell(200), sa.clone()).await;
    let b = upstream_on("b", None, cell(200), cell(200)).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    health:\n      passive: {{consecutive_5xx: 3, ejection_time: 1s, max_ejection_time: 10s}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        a.url(),
        b.url()
    ))
    .await;
    // Turns alternate: a answers 500 three times within the first six requests.
    let first = spread(&env, 6).await;
    assert_eq!(first.get("a:500"), Some(&3), "{first:?}");
    let t = target(&env, &a.url()).await;
    assert_eq!(t["healthy"], false, "{t}");
    assert_eq!(t["ejections"], 1, "{t}");
    let first_ejection = t["ejected_for_ms"].as_u64().unwrap();
    assert!(first_ejection <= 1000, "{t}");
    let ejected = spread(&env, 20).await;
    assert_eq!(ejected.get("b:200"), Some(&20), "{ejected:?}");
    assert!(env.gw.logs().contains("consecutive 5xx answers"));

    // Back after the ejection, still failing: ejected again, for longer.
    wait_healthy(&env, &a.url(), true).await;
    let mut seen_500 = 0;
    while seen_500 < 3 {
        let s = spread(&env, 1).await;
        seen_500 += s.get("a:500").copied().unwrap_or(0);
    }
    let t = target(&env, &a.url()).await;
    assert_eq!(t["ejections"], 2, "{t}");
    assert!(
        t["ejected_for_ms"].as_u64().unwrap() > 1000,
        "the second ejection is longer than the first: {t}"
    );
    // Recovered: after the ejection, a 2xx ends the streak and a takes turns again.
    sa.store(200, Ordering::SeqCst);
    wait_healthy(&env, &a.url(), true).await;
    let back = spread(&env, 20).await;
    assert_eq!(back.get("a:200"), Some(&10), "{back:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn at_most_the_configured_share_of_targets_is_ejected() {
    let a = upstream_on("a", None, cell(200), cell(500)).await;
    let b = upstream_on("b", None, cell(200), cell(500)).await;
    let env = start(&format!(
        "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    health:\n      passive: {{consecutive_5xx: 2, ejection_time: 30s, max_ejected_percent: 50}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        a.url(),
        b.url()
    ))
    .await;
    let seen = spread(&env, 30).await;
    let v = admin_json(&env, "/admin/upstreams").await;
    let healthy: Vec<bool> = v["upstreams"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["healthy"].as_bool().unwrap())
        .collect();
    assert_eq!(
        healthy.iter().filter(|h| !**h).count(),
        1,
        "one of two targets (50%) may be ejected: {v}"
    );
    // Every request was answered by an upstream (its 500), none by the gateway.
    assert_eq!(seen.values().sum::<usize>(), 30);
    assert!(
        seen.keys()
            .all(|k| k.ends_with(":500") && !k.starts_with('?')),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_target_is_unhealthy_fail_or_panic_as_configured() {
    for (policy, want) in [("fail", "no_healthy_upstream:503"), ("panic", "a:200")] {
        let a = upstream_on("a", None, cell(503), cell(200)).await;
        let env = start(&format!(
            "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\n    health:\n      when_all_unhealthy: {policy}\n{CHECK}routes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
            a.url()
        ))
        .await;
        wait_healthy(&env, &a.url(), false).await;
        let seen = spread(&env, 5).await;
        assert_eq!(seen.get(want), Some(&5), "{policy}: {seen:?}");
        let v = admin_json(&env, "/admin/upstreams").await;
        assert_eq!(v["upstreams"][0]["when_all_unhealthy"], policy);
    }
}

#[test]
fn bad_health_settings_are_reported_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  u:\n    targets: [{url: \"http://127.0.0.1:1\"}]\n    health:\n      active: {path: health, interval: 10ms, healthy_threshold: 0, expected_statuses: [700]}\n      passive: {max_ejected_percent: 150, ejection_time: 10m, max_ejection_time: 1m}\nroutes:\n  - {name: r, paths: [\"/\"], upstream: u}\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    for needle in [
        "upstreams.u.health.active.path: `health` is not a path starting with `/`",
        "upstreams.u.health.active.interval: `interval` must be at least 100ms",
        "upstreams.u.health.active.healthy_threshold: `healthy_threshold` must be at least 1",
        "upstreams.u.health.active.expected_statuses[0]: 700 is not an HTTP status",
        "upstreams.u.health.passive.max_ejected_percent: a percentage is at most 100",
        "upstreams.u.health.passive.ejection_time: `ejection_time` is above `max_ejection_time`",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
}

/// `POST /admin/reload` after writing `rest` (below the listen and admin keys) to the
/// gateway's file: the status and the answer.
async fn reload_with(env: &LocalGateway, rest: &str) -> (u16, Value) {
    env.gw.write_config(&format!(
        "listen: [\"{}\"]\nadmin:\n  listen: \"{}\"\n{rest}",
        env.addr, env.admin
    ));
    let r = http_client()
        .post(format!("http://{}/admin/reload", env.admin))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_reload_that_would_turn_active_checks_off_keeps_a_failed_target_out() {
    let ha = cell(200);
    let a = upstream_on("a", None, ha.clone(), cell(200)).await;
    let b = upstream_on("b", None, cell(200), cell(200)).await;
    // Slow checks: once `a` is down, putting it down again would take two more failed
    // probes (2s at least), so a verdict cleared by mistake shows at once.
    let upstream = |health: &str| {
        format!(
            "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}, {{url: \"{}\"}}]\n    health:\n      passive: {{enabled: false}}\n{health}",
            a.url(),
            b.url()
        )
    };
    let checks = "      active: {path: /health, interval: 1s, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 2}\n";
    let routes = "routes:\n  - {name: r, paths: [\"/*\"], upstream: u}\n";
    let env = start(&format!("{}{routes}", upstream(checks))).await;
    ha.store(503, Ordering::SeqCst);
    wait_healthy(&env, &a.url(), false).await;

    // A reload without active checks, rejected because of another upstream (its CA
    // bundle is missing, which only compiling finds).
    let broken =
        "  broken:\n    targets: [{url: \"https://127.0.0.1:9\"}]\n    tls: {ca: missing-ca.pem}\n";
    let (code, v) = reload_with(&env, &format!("{}{broken}{routes}", upstream(""))).await;
    assert_eq!(code, 422, "{v}");
    assert!(v.to_string().contains("upstreams.broken.tls.ca"), "{v}");

    // The checks still run and still say `a` is down: it stays out of rotation.
    let t = target(&env, &a.url()).await;
    assert_eq!(t["healthy"], false, "a rejected reload put `a` back: {t}");
    assert_eq!(t["active_check"], "down", "{t}");
    let only_b = spread(&env, 20).await;
    assert_eq!(only_b.get("b:200"), Some(&20), "{only_b:?}");

    // Turning the checks off for real forgets their verdict.
    let (code, v) = reload_with(&env, &format!("{}{routes}", upstream(""))).await;
    assert_eq!(code, 200, "{v}");
    wait_healthy(&env, &a.url(), true).await;
    let both = spread(&env, 20).await;
    assert_eq!(both.get("a:200"), Some(&10), "{both:?}");
    assert_eq!(both.get("b:200"), Some(&10), "{both:?}");
}
