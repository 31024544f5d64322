//! End-to-end tests of `quota`: the real `portico` binary, real upstreams, consumers
//! authenticated by `key-auth`, and for cluster mode a real `redis-server` (started by
//! the test on a free port; its absence fails the test).
//!
//! Covers: a consumer using up a daily request quota (`429 quota_exceeded`,
//! `Retry-After`, the `X-Quota-*` headers) while another is unaffected; a bytes
//! quota; the admin API listing usage (with filters) and resetting a key (with its
//! 400/404 answers); a restarted gateway on the same store file keeping the counts;
//! two gateways sharing a quota through Redis.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use portico_test_support::redis::Redis;
use portico_test_support::{free_port, http_client, LocalGateway, Upstream};
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789ab";

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
    fn n(&self, name: &str) -> i64 {
        self.h(name)
            .parse()
            .unwrap_or_else(|_| panic!("{name}: `{}`", self.h(name)))
    }
    fn code(&self) -> String {
        let v: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        v["error"]["code"].as_str().unwrap_or("").to_string()
    }
}

async fn get(addr: SocketAddr, path: &str, key: &str) -> Answer {
    let resp = http_client()
        .get(format!("http://{addr}{path}"))
        .header("apikey", key)
        .send()
        .await
        .unwrap();
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap(),
    }
}

async fn admin(admin: SocketAddr, method: &str, path_and_query: &str) -> (u16, Value) {
    let r = http_client()
        .request(
            method.parse().unwrap(),
            format!("http://{admin}{path_and_query}"),
        )
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `(scope, key, limit, used, remaining)` of each row of `GET /admin/quotas?...`.
async fn usage(addr: SocketAddr, query: &str) -> Vec<(String, String, String, u64, u64)> {
    let (st, v) = admin(addr, "GET", &format!("/admin/quotas{query}")).await;
    assert_eq!(st, 200, "{v}");
    v["quotas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["scope"].as_str().unwrap().to_string(),
                r["key"].as_str().unwrap().to_string(),
                r["limit"].as_str().unwrap().to_string(),
                r["used"].as_u64().unwrap(),
                r["remaining"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn row(
    scope: &str,
    key: &str,
    limit: &str,
    used: u64,
    remaining: u64,
) -> (String, String, String, u64, u64) {
    (scope.into(), key.into(), limit.into(), used, remaining)
}

/// Upstreams, the consumers alice and bob (key-auth), and `routes`.
fn config(up: &Upstream, extra: &str, routes: &str) -> String {
    format!(
        "upstreams:
  up:
    targets: [{{url: \"{}\"}}]
consumers:
  - name: alice
    credentials: [{{type: key-auth, key: \"{ALICE}\"}}]
  - name: bob
    credentials: [{{type: key-auth, key: \"{BOB}\"}}]
{extra}routes:
{routes}",
        up.url()
    )
}

const DAILY: &str = "  - name: daily
    paths: [\"/d\"]
    upstream: up
    plugins:
      key-auth: {}
      quota: {limits: [{requests: 3, per: day}], time_zone: Europe/Paris}
";

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_uses_up_a_daily_quota_and_an_admin_resets_it() {
    let up = Upstream::start("up").await;
    let gw = LocalGateway::start(bin(), &config(&up, "", DAILY)).await;
    for i in 0..3 {
        let a = get(gw.addr, "/d", ALICE).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.h("x-quota-name"), "requests-per-day");
        assert_eq!(a.h("x-quota-limit"), "3");
        assert_eq!(a.n("x-quota-remaining"), 2 - i);
        // Seconds until the next midnight in Paris: at most 25 hours (a DST day).
        assert!(
            (1..=25 * 3600).contains(&a.n("x-quota-reset")),
            "{}",
            a.h("x-quota-reset")
        );
    }
    let a = get(gw.addr, "/d", ALICE).await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.code(), "quota_exceeded");
    assert_eq!(a.h("content-type"), "application/json");
    assert_eq!(a.h("x-quota-remaining"), "0");
    let retry = a.n("retry-after");
    assert!((1..=25 * 3600).contains(&retry), "Retry-After {retry}");
    assert!((retry - a.n("x-quota-reset")).abs() <= 1);
    assert_eq!(up.hits(), 3, "a refused request never reaches the upstream");
    // Bob has his own quota.
    let b = get(gw.addr, "/d", BOB).await;
    assert_eq!((b.status, b.n("x-quota-remaining")), (200, 2));

    // The admin API shows both, filtered by key and scope.
    assert_eq!(
        usage(gw.admin, "").await,
        vec![
            row("route:daily", "alice", "requests-per-day", 3, 0),
            row("route:daily", "bob", "requests-per-day", 1, 2),
        ]
    );
    assert_eq!(
        usage(gw.admin, "?key=alice&scope=route:daily").await,
        vec![row("route:daily", "alice", "requests-per-day", 3, 0)]
    );
    assert!(usage(gw.admin, "?scope=global").await.is_empty());
    let (_, v) = admin(gw.admin, "GET", "/admin/quotas?key=bob").await;
    let r = &v["quotas"][0];
    assert_eq!(
        (r["unit"].as_str(), r["per"].as_str(), r["quota"].as_u64()),
        (Some("requests"), Some("day"), Some(3))
    );
    // Local midnight in Paris is 22:00 or 23:00 UTC.
    let start = r["period_start"].as_str().unwrap();
    assert!(
        start.ends_with("T22:00:00Z") || start.ends_with("T23:00:00Z"),
        "{start}"
    );

    // Resetting needs both parameters, a real scope, and something to reset.
    let (st, v) = admin(gw.admin, "DELETE", "/admin/quotas?scope=route:daily").await;
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`key` is required"),
        "{v}"
    );
    let (st, v) = admin(gw.admin, "DELETE", "/admin/quotas?key=alice").await;
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`scope` is required"),
        "{v}"
    );
    let (st, v) = admin(gw.admin, "DELETE", "/admin/quotas?scope=daily&key=alice").await;
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("`scope`"),
        "{v}"
    );
    let (st, v) = admin(gw.admin, "GET", "/admin/quotas?consumer=alice").await;
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`consumer`"),
        "{v}"
    );
    let (st, v) = admin(
        gw.admin,
        "DELETE",
        "/admin/quotas?scope=route:daily&key=carol",
    )
    .await;
    assert_eq!((st, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (st, v) = admin(
        gw.admin,
        "DELETE",
        "/admin/quotas?scope=route:daily&key=alice",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let a = get(gw.addr, "/d", ALICE).await;
    assert_eq!((a.status, a.n("x-quota-remaining")), (200, 2));
    assert_eq!(
        usage(gw.admin, "?key=alice").await,
        vec![row("route:daily", "alice", "requests-per-day", 1, 2)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bytes_quota_refuses_once_the_bytes_are_used() {
    let up = Upstream::start("up").await;
    let routes = "  - name: bytes
    paths: [\"/b\"]
    upstream: up
    plugins:
      key-auth: {}
      quota: {limits: [{bytes: 2KB, per: month, name: monthly-bytes}], billing_anchor_day: 15}
";
    let gw = LocalGateway::start(bin(), &config(&up, "", routes)).await;
    let first = get(gw.addr, "/b", ALICE).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.h("x-quota-name"), "monthly-bytes");
    assert_eq!(first.h("x-quota-remaining"), "2000");
    let per_request = first.body.len() as u64;
    assert!(per_request > 0);
    // Bytes are added when each exchange ends: go on until refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut admitted = 1u64;
    let refused = loop {
        assert!(
            Instant::now() < deadline,
            "never refused after {admitted} requests"
        );
        let a = get(gw.addr, "/b", ALICE).await;
        if a.status != 200 {
            break a;
        }
        admitted += 1;
    };
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.code(), "quota_exceeded");
    assert!(refused.n("retry-after") <= 31 * 86400);
    assert!(
        admitted * per_request >= 2000,
        "{admitted} × {per_request} bytes"
    );
    let rows = usage(gw.admin, "?key=alice").await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].3 >= 2000 && rows[0].4 == 0, "{rows:?}");
    // Bob is not affected.
    assert_eq!(get(gw.addr, "/b", BOB).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_gateway_keeps_the_counts_from_the_store() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("shared.db");
    let cfg = config(
        &up,
        &format!("store: {{path: \"{}\"}}\n", store.display()),
        DAILY,
    );
    let mut first = LocalGateway::start(bin(), &cfg).await;
    assert_eq!(get(first.addr, "/d", ALICE).await.status, 200);
    assert_eq!(get(first.addr, "/d", ALICE).await.status, 200);
    // A graceful stop saves the last counts.
    assert!(first.gw.signal("TERM"));
    let exit = tokio::task::spawn_blocking(move || {
        let st = first.gw.wait_exit(Duration::from_secs(20));
        (st, first)
    })
    .await
    .unwrap();
    assert!(
        exit.0.is_some_and(|s| s.success()),
        "{:?}\n{}",
        exit.0,
        exit.1.gw.logs()
    );
    let second = LocalGateway::start(bin(), &cfg).await;
    let a = get(second.addr, "/d", ALICE).await;
    assert_eq!((a.status, a.n("x-quota-remaining")), (200, 0), "{}", a.body);
    assert_eq!(get(second.addr, "/d", ALICE).await.status, 429);
    // Counts saved in the background (no graceful stop): within a few seconds.
    assert_eq!(get(second.addr, "/d", BOB).await.status, 200);
    let db = store.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let saved = tokio::task::spawn_blocking({
            let db = db.clone();
            move || {
                let c = rusqlite::Connection::open(db).unwrap();
                c.query_row(
                    "SELECT used FROM quota_usage WHERE scope = 'route:daily' AND key = 'bob'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
            }
        })
        .await
        .unwrap();
        if saved == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob's count was not saved: {saved:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_share_a_quota_through_redis() {
    let redis = Redis::start(free_port());
    let up = Upstream::start("up").await;
    let routes = format!(
        "  - name: shared
    paths: [\"/s\"]
    upstream: up
    plugins:
      key-auth: {{}}
      quota:
        limits: [{{requests: 3, per: day}}, {{bytes: 1GiB, per: month}}]
        mode: cluster
        redis: {{url: \"redis://127.0.0.1:{}\", timeout: 500ms, prefix: \"test:{}\"}}
        on_store_error: deny
",
        redis.port,
        std::process::id()
    );
    let cfg = config(&up, "", &routes);
    let a = LocalGateway::start(bin(), &cfg).await;
    let b = LocalGateway::start(bin(), &cfg).await;
    assert_eq!(get(a.addr, "/s", ALICE).await.n("x-quota-remaining"), 2);
    assert_eq!(get(b.addr, "/s", ALICE).await.n("x-quota-remaining"), 1);
    assert_eq!(get(a.addr, "/s", ALICE).await.n("x-quota-remaining"), 0);
    let r = get(b.addr, "/s", ALICE).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (429, "quota_exceeded"),
        "{}",
        r.body
    );
    assert!(r.n("retry-after") >= 1);
    assert_eq!(get(b.addr, "/s", BOB).await.status, 200);
    // Either gateway's admin API reads the shared counts; bytes arrive at the end of
    // each exchange.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = usage(b.admin, "?key=alice").await;
        if rows.len() == 2 && rows[0].3 > 0 {
            assert_eq!(rows[0].2, "bytes-per-month");
            assert_eq!(
                rows[1],
                row("route:shared", "alice", "requests-per-day", 3, 0)
            );
            break;
        }
        assert!(Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        usage(a.admin, "").await.len(),
        4,
        "alice and bob, two limits each"
    );
    // A reset through one gateway frees the key on the other.
    let (st, v) = admin(
        a.admin,
        "DELETE",
        "/admin/quotas?scope=route:shared&key=alice",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let r = get(b.addr, "/s", ALICE).await;
    assert_eq!((r.status, r.n("x-quota-remaining")), (200, 2));
    let (st, _) = admin(
        a.admin,
        "DELETE",
        "/admin/quotas?scope=route:shared&key=carol",
    )
    .await;
    assert_eq!(st, 404);
    // Redis gone, `on_store_error: deny`: 503 quota_unavailable.
    drop(redis);
    let r = get(a.addr, "/s", ALICE).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (503, "quota_unavailable"),
        "{}",
        r.body
    );
}
