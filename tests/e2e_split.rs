//! End-to-end traffic splits and mirroring: the real `portico` binary in front of
//! real upstream servers (docs/upstreams.md, "Canary, A/B and mirroring").

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use portico_test_support::{http_client, LocalGateway, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_portico");

async fn start(body: &str) -> LocalGateway {
    LocalGateway::start(Path::new(BIN), body).await
}

/// Which upstream answered (the default handler names itself in `x-upstream`).
async fn who(env: &LocalGateway, headers: &[(&str, &str)]) -> String {
    let mut req = http_client().get(format!("http://{}/x", env.addr));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-upstream"].to_str().unwrap().to_string()
}

async fn two(env_body: impl Fn(&str, &str) -> String) -> (Upstream, Upstream, LocalGateway) {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let env = start(&env_body(&v1.url(), &v2.url())).await;
    (v1, v2, env)
}

fn upstreams(a: &str, b: &str) -> String {
    format!(
        "upstreams:\n  v1:\n    targets: [{{url: \"{a}\"}}]\n  v2:\n    targets: [{{url: \"{b}\"}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_split_requests_exactly() {
    let (_v1, _v2, env) = two(|a, b| {
        format!(
            "{}routes:\n  - name: users\n    paths: [\"/*\"]\n    upstreams:\n      - {{name: v1, weight: 95}}\n      - {{name: v2, weight: 5}}\n",
            upstreams(a, b)
        )
    })
    .await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        *seen.entry(who(&env, &[]).await).or_default() += 1;
    }
    // Smooth weighted order: exactly 95:5 over every 100 requests.
    assert_eq!(seen.get("v1"), Some(&190), "{seen:?}");
    assert_eq!(seen.get("v2"), Some(&10), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sticky_key_keeps_each_user_on_one_upstream() {
    let (_v1, _v2, env) = two(|a, b| {
        format!(
            "{}routes:\n  - name: users\n    paths: [\"/*\"]\n    upstreams:\n      - {{name: v1, weight: 1}}\n      - {{name: v2, weight: 1}}\n    split: {{sticky: \"header:x-user\"}}\n",
            upstreams(a, b)
        )
    })
    .await;
    let mut per_upstream: BTreeMap<String, usize> = BTreeMap::new();
    for user in 0..100 {
        let id = format!("user-{user}");
        let first = who(&env, &[("x-user", &id)]).await;
        for _ in 0..3 {
            assert_eq!(who(&env, &[("x-user", &id)]).await, first, "{id} moved");
        }
        *per_upstream.entry(first).or_default() += 1;
    }
    // 100 users hashed 50:50: far from all on one side (binomial, p < 1e-9 outside).
    for u in ["v1", "v2"] {
        let n = per_upstream.get(u).copied().unwrap_or(0);
        assert!((20..=80).contains(&n), "{per_upstream:?}");
    }
    // Without the key: the weighted order.
    let a = who(&env, &[]).await;
    let b = who(&env, &[]).await;
    assert_ne!(a, b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_or_cookie_overrides_the_split() {
    let (_v1, _v2, env) = two(|a, b| {
        format!(
            "{}routes:\n  - name: users\n    paths: [\"/*\"]\n    upstreams:\n      - {{name: v1, weight: 100}}\n      - {{name: v2, weight: 0}}\n    split: {{override_header: x-canary, override_cookie: canary}}\n",
            upstreams(a, b)
        )
    })
    .await;
    for _ in 0..5 {
        assert_eq!(who(&env, &[]).await, "v1");
        assert_eq!(who(&env, &[("x-canary", "always")]).await, "v2");
        assert_eq!(who(&env, &[("x-canary", "never")]).await, "v1");
        assert_eq!(who(&env, &[("x-canary", "v2")]).await, "v2");
        assert_eq!(who(&env, &[("cookie", "a=b; canary=always")]).await, "v2");
        // An unknown value is ignored.
        assert_eq!(who(&env, &[("x-canary", "v9")]).await, "v1");
    }
}

#[test]
fn bad_splits_are_reported_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  v1:\n    targets: [{url: \"http://127.0.0.1:1\"}]\n  v2:\n    targets: [{url: \"http://127.0.0.1:2\"}]\nroutes:\n  - name: a\n    paths: [\"/a\"]\n    upstream: v1\n    upstreams: [{name: v2, weight: 1}]\n  - name: b\n    paths: [\"/b\"]\n    upstreams: [{name: v3, weight: 1}, {name: v1, weight: 0}]\n  - name: c\n    paths: [\"/c\"]\n    upstream: v1\n    split: {override_header: \"bad header\"}\n    mirror: {upstream: shadow, percent: 150}\n",
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
        "routes[0].upstreams: a route has either `upstream` or `upstreams`",
        "routes[1].upstreams[0].name: upstream `v3` is not defined in `upstreams` (did you mean `v1`?)",
        "routes[2].split: `split` applies to `upstreams`",
        "routes[2].split.override_header: `bad header` is not a valid header name",
        "routes[2].mirror.upstream: upstream `shadow` is not defined",
        "routes[2].mirror.percent: 150 is not a percentage (0-100)",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
}

/// A shadow upstream that records (method, path, body) of what it gets and answers
/// like the default echo handler would (as `name`), once `gate` lets it.
struct Shadow {
    up: Upstream,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
}

async fn shadow(name: &str, open: bool) -> Shadow {
    use http_body_util::BodyExt;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(if open {
        tokio::sync::Semaphore::MAX_PERMITS
    } else {
        0
    }));
    let (s, g) = (seen.clone(), gate.clone());
    let n = name.to_string();
    let h = portico_test_support::upstream::handler(move |req: http::Request<_>| {
        let (s, g, n) = (s.clone(), g.clone(), n.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            s.lock().unwrap().push((
                parts.method.to_string(),
                parts.uri.path().to_string(),
                String::from_utf8_lossy(&body).into_owned(),
            ));
            let _permit = g.acquire().await.unwrap();
            // The shadow "version" differs on two paths: /broken fails, /changed
            // answers another total.
            let is_shadow = n == "shadow";
            let status = if is_shadow && parts.uri.path() == "/broken" {
                500
            } else {
                200
            };
            let total = if is_shadow && parts.uri.path() == "/changed" {
                11
            } else {
                10
            };
            portico_test_support::upstream::json_response(
                http::StatusCode::from_u16(status).unwrap(),
                &serde_json::json!({"upstream": n, "path": parts.uri.path(), "method": parts.method.as_str(), "order": {"total": total}}),
            )
        }
    });
    Shadow {
        up: Upstream::start_with(name, h).await,
        seen,
        gate,
    }
}

/// Poll until `f` holds (10 s at most).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn metrics(env: &LocalGateway) -> String {
    http_client()
        .get(format!("http://{}/metrics", env.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn wait_metric(env: &LocalGateway, line: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let m = metrics(env).await;
        if m.contains(line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing `{line}` in:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn mirror_config(primary: &str, shadow: &str, mirror: &str) -> String {
    format!(
        "upstreams:\n  v1:\n    targets: [{{url: \"{primary}\"}}]\n  shadow:\n    targets: [{{url: \"{shadow}\"}}]\nroutes:\n  - name: users\n    paths: [\"/*\"]\n    upstream: v1\n    mirror: {mirror}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn mirrored_copies_never_hold_the_client_back() {
    let v1 = Upstream::start("v1").await;
    // The shadow holds every answer until released.
    let sh = shadow("shadow", false).await;
    let env = start(&mirror_config(
        &v1.url(),
        &sh.up.url(),
        "{upstream: shadow}",
    ))
    .await;
    let client = http_client();
    for i in 0..10 {
        let r = client
            .post(format!("http://{}/orders/{i}", env.addr))
            .body(format!("order {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-upstream"], "v1");
    }
    // Every client request was answered while the shadow answered none of its copies.
    assert_eq!(v1.hits(), 10);
    eventually("the shadow got 10 copies", || {
        sh.seen.lock().unwrap().len() == 10
    })
    .await;
    let mut seen = sh.seen.lock().unwrap().clone();
    seen.sort();
    assert!(
        seen.contains(&("POST".into(), "/orders/3".into(), "order 3".into())),
        "{seen:?}"
    );
    sh.gate.add_permits(1000);
    wait_metric(
        &env,
        "portico_mirror_requests_total{route=\"users\",result=\"sent\"} 10",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_mirror_is_counted_and_ignored() {
    let v1 = Upstream::start("v1").await;
    let dead = Upstream::start("dead").await;
    let dead_url = dead.url();
    dead.stop().await;
    drop(dead);
    let env = start(&mirror_config(&v1.url(), &dead_url, "{upstream: shadow}")).await;
    for _ in 0..5 {
        assert_eq!(who(&env, &[]).await, "v1");
    }
    wait_metric(
        &env,
        "portico_mirror_requests_total{route=\"users\",result=\"failed\"} 5",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn percent_samples_and_large_bodies_are_skipped() {
    let v1 = Upstream::start("v1").await;
    let sh = shadow("shadow", true).await;
    let env = start(&mirror_config(
        &v1.url(),
        &sh.up.url(),
        "{upstream: shadow, percent: 20, max_body: 1KiB}",
    ))
    .await;
    for _ in 0..500 {
        assert_eq!(who(&env, &[]).await, "v1");
    }
    // 20% of 500: 100 expected, binomial sd ~9; 50..150 cannot flake.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let n = sh.seen.lock().unwrap().len();
    assert!((50..=150).contains(&n), "{n} copies of 500 at 20%");
    // Bodies above max_body are never copied (the client still gets its answer).
    let before = sh.seen.lock().unwrap().len();
    let client = http_client();
    for _ in 0..30 {
        let r = client
            .post(format!("http://{}/big", env.addr))
            .body(vec![b'x'; 4096])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let m = metrics(&env).await;
    assert!(
        !m.contains("portico_mirror_requests_total{route=\"users\",result=\"skipped_body\"} 0"),
        "{m}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let big: usize = sh.seen.lock().unwrap()[before..]
        .iter()
        .filter(|(_, p, _)| p == "/big")
        .count();
    assert_eq!(big, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn compare_reports_matches_and_mismatches() {
    // The primary answers like the shadow: same JSON except `upstream` (ignored).
    let v1 = shadow("v1", true).await;
    let sh = shadow("shadow", true).await;
    let env = start(&mirror_config(
        &v1.up.url(),
        &sh.up.url(),
        "{upstream: shadow, compare: {headers: [content-type], ignore: [/upstream]}}",
    ))
    .await;
    for _ in 0..4 {
        assert_eq!(
            http_client()
                .get(format!("http://{}/same", env.addr))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    wait_metric(
        &env,
        "portico_mirror_comparisons_total{route=\"users\",result=\"match\"} 4",
    )
    .await;
    let get = |path: &'static str| {
        let url = format!("http://{}{path}", env.addr);
        async move { http_client().get(url).send().await.unwrap().status() }
    };
    // The shadow fails where the primary does not: the client gets the primary's 200.
    assert_eq!(get("/broken").await, 200);
    assert_eq!(get("/changed").await, 200);
    wait_metric(
        &env,
        "portico_mirror_comparisons_total{route=\"users\",result=\"mismatch\"} 2",
    )
    .await;
    let m = metrics(&env).await;
    assert!(
        m.contains("portico_mirror_mismatches_total{route=\"users\",part=\"status\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("portico_mirror_mismatches_total{route=\"users\",part=\"body\"} 1"),
        "{m}"
    );
    assert!(
        env.gw
            .wait_for_log("body at /order/total", std::time::Duration::from_secs(5)),
        "{}",
        env.gw.logs()
    );
    assert!(
        env.gw.logs().contains("status 200 vs 500"),
        "{}",
        env.gw.logs()
    );
    drop(v1);
}
