#![allow(clippy::unwrap_used)]

use super::period::ManualWallClock;
use super::*;

/// 2026-03-05T12:00:00Z.
const NOON: i64 = 1_772_712_000;

fn build(json: serde_json::Value, env: &BuildEnv, clock: &Arc<ManualWallClock>) -> Quota {
    Quota::with_clock(crate::registry::parse(&json).unwrap(), env, clock.clone()).unwrap()
}

fn errors(json: serde_json::Value) -> Vec<String> {
    let s: Settings = match crate::registry::parse(&json) {
        Ok(s) => s,
        Err(e) => return e.iter().map(|(p, m)| format!("{p}: {m}")).collect(),
    };
    match Quota::new(s, &BuildEnv::default()) {
        Ok(_) => Vec::new(),
        Err(e) => e.iter().map(|(p, m)| format!("{p}: {m}")).collect(),
    }
}

/// The request phase, then the response phase, then the log phase with `bytes`.
fn send(p: &Quota, user: &str, bytes: u64) -> (u16, http::HeaderMap, String) {
    let mut c = Ctx::new(
        "rid".into(),
        "192.0.2.1".parse().unwrap(),
        "r".into(),
        "/".into(),
        Default::default(),
    );
    let mut req = Request::builder()
        .header("x-user", user)
        .body(Body::default())
        .unwrap();
    let flow = match p.on_request(&mut c, &mut req) {
        Step::Ready(Some(f)) => f,
        _ => panic!("local mode answers at once"),
    };
    let (resp, code) = match flow {
        Flow::Continue => (http::Response::new(Body::default()), String::new()),
        Flow::Error(e) => (e.to_response("rid"), e.kind.code().to_string()),
        Flow::Respond(r) => (*r, String::new()),
    };
    let (mut parts, _) = resp.into_parts();
    p.upstream_response(&mut c, &mut parts);
    p.log(
        &c,
        &Outcome {
            status: parts.status.as_u16(),
            bytes_in: 0,
            bytes_out: bytes,
            error_code: None,
        },
    );
    (parts.status.as_u16(), parts.headers, code)
}

fn h<'a>(m: &'a http::HeaderMap, n: &str) -> &'a str {
    m.get(n).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[test]
fn daily_requests_then_429_until_midnight() {
    let clock = Arc::new(ManualWallClock::at(NOON));
    let env = BuildEnv::default();
    let p = build(
        serde_json::json!({"key": "header:x-user", "limits": [{"requests": 3, "per": "day"}]}),
        &env,
        &clock,
    );
    for i in 0..3u64 {
        let (status, hs, _) = send(&p, "alice", 0);
        assert_eq!(status, 200);
        assert_eq!(h(&hs, "x-quota-name"), "requests-per-day");
        assert_eq!(h(&hs, "x-quota-limit"), "3");
        assert_eq!(h(&hs, "x-quota-remaining"), (2 - i).to_string());
        assert_eq!(h(&hs, "x-quota-reset"), "43200");
    }
    let (status, hs, code) = send(&p, "alice", 0);
    assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
    assert_eq!(h(&hs, "retry-after"), "43200");
    assert_eq!(h(&hs, "x-quota-remaining"), "0");
    // Another key is not affected.
    assert_eq!(send(&p, "bob", 0).0, 200);
    // One second before midnight: still refused, for one second.
    clock.set(NOON + 43199);
    let (status, hs, _) = send(&p, "alice", 0);
    assert_eq!((status, h(&hs, "retry-after")), (429, "1"));
    // A new day.
    clock.advance(1);
    let (status, hs, _) = send(&p, "alice", 0);
    assert_eq!((status, h(&hs, "x-quota-remaining")), (200, "2"));
    assert_eq!(h(&hs, "x-quota-reset"), "86400");
}

#[test]
fn bytes_are_added_at_the_end_and_refuse_once_used_up() {
    let clock = Arc::new(ManualWallClock::at(NOON));
    let env = BuildEnv::default();
    let p = build(
        serde_json::json!({"key": "header:x-user", "time_zone": "Europe/Paris", "limits": [
            {"requests": 100, "per": "day"},
            {"bytes": "1KiB", "per": "month", "name": "monthly-bytes"}
        ]}),
        &env,
        &clock,
    );
    let (status, hs, _) = send(&p, "alice", 600);
    assert_eq!(status, 200);
    // Before the exchange: 1024 bytes left of 1024 (more than 99 of 100 requests).
    assert_eq!(h(&hs, "x-quota-name"), "requests-per-day");
    let (status, hs, _) = send(&p, "alice", 600);
    assert_eq!(status, 200);
    assert_eq!(h(&hs, "x-quota-name"), "monthly-bytes");
    assert_eq!(h(&hs, "x-quota-remaining"), "424");
    // 1200 of 1024 used: refused until the month ends in Paris (2026-04-01T00:00+02:00).
    let (status, hs, code) = send(&p, "alice", 600);
    assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
    let end = "2026-03-31T22:00:00Z"
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_second();
    assert_eq!(h(&hs, "retry-after"), (end - NOON).to_string());
    // The refused request's bytes were not counted, nor the request.
    let reg = registry(&env.state).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(reg.usage(None, Some("alice"))).unwrap();
    let used: Vec<(&str, u64, u64)> = rows
        .iter()
        .map(|u| (u.limit.as_str(), u.used, u.remaining))
        .collect();
    assert_eq!(
        used,
        vec![("monthly-bytes", 1200, 0), ("requests-per-day", 2, 98)]
    );
    assert_eq!(rows[0].period_start, "2026-02-28T23:00:00Z");
    assert_eq!(rows[0].scope, "global");
}

#[test]
fn reset_through_the_registry_restores_access() {
    let clock = Arc::new(ManualWallClock::at(NOON));
    let env = BuildEnv::default();
    let p = build(
        serde_json::json!({"key": "header:x-user", "limits": [{"requests": 1, "per": "month"}], "billing_anchor_day": 15}),
        &env,
        &clock,
    );
    assert_eq!(send(&p, "alice", 0).0, 200);
    assert_eq!(send(&p, "alice", 0).0, 429);
    assert_eq!(send(&p, "bob", 0).0, 200);
    let reg = registry(&env.state).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(reg.usage(Some("global"), None)).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].period_start, "2026-02-15T00:00:00Z");
    assert_eq!(rows[0].period_end, "2026-03-15T00:00:00Z");
    assert!(rt
        .block_on(reg.usage(Some("route:x"), None))
        .unwrap()
        .is_empty());
    assert!(rt.block_on(reg.clone().reset("global", "alice")).unwrap());
    // Nothing left to reset; unknown scopes match nothing.
    assert!(!rt.block_on(reg.clone().reset("global", "alice")).unwrap());
    assert!(!rt.block_on(reg.clone().reset("route:x", "bob")).unwrap());
    assert_eq!(send(&p, "alice", 0).0, 200);
    assert_eq!(send(&p, "alice", 0).0, 429);
}

#[test]
fn counts_outlive_a_rebuild_in_the_same_scope() {
    let clock = Arc::new(ManualWallClock::at(NOON));
    let env = BuildEnv::default().for_route("api");
    let settings = |n: u64| serde_json::json!({"key": "header:x-user", "limits": [{"requests": n, "per": "day"}]});
    let p = build(settings(2), &env, &clock);
    assert_eq!(send(&p, "alice", 0).0, 200);
    // A reload that raises the limit keeps what was used.
    let q = build(settings(3), &env, &clock);
    drop(p);
    let (status, hs, _) = send(&q, "alice", 0);
    assert_eq!((status, h(&hs, "x-quota-remaining")), (200, "1"));
}

#[test]
fn settings_are_checked_with_key_paths() {
    assert_eq!(
        errors(serde_json::json!({"limits": []})),
        vec!["limits: give at least one limit"]
    );
    let e = errors(
        serde_json::json!({"limits": [{"requests": 1, "per": "month"}], "billing_anchor_day": 31}),
    );
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("billing_anchor_day: must be from 1 to 28"),
        "{e:?}"
    );
    let e = errors(
        serde_json::json!({"limits": [{"requests": 1, "per": "day"}], "time_zone": "Europe/Atlantis"}),
    );
    assert!(
        e[0].starts_with("time_zone: `Europe/Atlantis` is not a known IANA time zone"),
        "{e:?}"
    );
    assert_eq!(
        errors(serde_json::json!({"limits": [{"requests": 1, "bytes": 5, "per": "day"}]})),
        vec!["limits[0]: give `requests` or `bytes`, not both (make two limits)"]
    );
    assert_eq!(
        errors(serde_json::json!({"limits": [{"per": "day"}]})),
        vec!["limits[0]: give `requests` or `bytes`"]
    );
    assert_eq!(
        errors(serde_json::json!({"limits": [{"requests": 0, "per": "day"}]})),
        vec!["limits[0].requests: must be at least 1"]
    );
    assert_eq!(
        errors(serde_json::json!({"limits": [{"requests": 1, "per": "day"}, {"requests": 2, "per": "day"}]})),
        vec!["limits[1].name: another limit is named `requests-per-day`; give each limit its own `name`"]
    );
    assert_eq!(
        errors(serde_json::json!({"limits": [{"requests": 1, "per": "day", "name": "a b"}]})),
        vec!["limits[0].name: use 1 to 64 letters, digits, `-`, `_` or `.`"]
    );
    assert_eq!(
        errors(
            serde_json::json!({"limits": [{"requests": 1, "per": "day"}], "billing_anchor_day": 15})
        ),
        vec!["billing_anchor_day: only monthly limits (`per: month`) use it; remove it or add one"]
    );
    assert_eq!(
        errors(serde_json::json!({"limits": [{"requests": 1, "per": "day"}], "mode": "cluster"})),
        vec!["redis: `mode: cluster` needs `redis: {url: ...}`"]
    );
    assert_eq!(
        errors(
            serde_json::json!({"limits": [{"requests": 1, "per": "day"}], "on_store_error": "deny"})
        ),
        vec!["on_store_error: only used with `mode: cluster` (local counts are in memory)"]
    );
    let e = errors(serde_json::json!({"limits": [{"requests": 1, "per": "week"}]}));
    assert!(
        e[0].starts_with("limits[0].per: unknown variant `week`"),
        "{e:?}"
    );
    let e = errors(serde_json::json!({"limits": [{"requests": 1, "per": "day"}], "tz": "UTC"}));
    assert!(e[0].contains("unknown field `tz`"), "{e:?}");
    assert!(errors(serde_json::json!({"limits": [{"requests": 1, "per": "day"}], "mode": "cluster", "redis": {"url": "redis://127.0.0.1:1"}})).is_empty());
}
