#![allow(clippy::unwrap_used)]

use super::*;
use crate::state::ManualClock;

fn build(json: serde_json::Value, env: &BuildEnv, clock: &Arc<ManualClock>) -> RateLimit {
    RateLimit::with_clock(crate::registry::parse(&json).unwrap(), env, clock.clone()).unwrap()
}

fn errors(json: serde_json::Value) -> Vec<String> {
    let s: Settings = match crate::registry::parse(&json) {
        Ok(s) => s,
        Err(e) => return e.iter().map(|(p, m)| format!("{p}: {m}")).collect(),
    };
    match RateLimit::new(s, &BuildEnv::default()) {
        Ok(_) => Vec::new(),
        Err(e) => e.iter().map(|(p, m)| format!("{p}: {m}")).collect(),
    }
}

fn ctx(ip: &str) -> Ctx {
    Ctx::new(
        "rid".into(),
        ip.parse().unwrap(),
        "r".into(),
        "/".into(),
        Default::default(),
    )
}

/// Run the request phase and the response phase; the answer's status and headers.
fn send(p: &RateLimit, ip: &str, user: Option<&str>) -> (u16, http::HeaderMap) {
    let mut c = ctx(ip);
    let mut b = Request::builder();
    if let Some(u) = user {
        b = b.header("x-user", u);
    }
    let mut req = b.body(Body::default()).unwrap();
    let flow = match p.on_request(&mut c, &mut req) {
        Step::Ready(Some(f)) => f,
        _ => panic!("local mode answers at once"),
    };
    let resp = match flow {
        Flow::Continue => http::Response::new(Body::default()),
        Flow::Error(e) => e.to_response("rid"),
        Flow::Respond(r) => *r,
    };
    let (mut parts, _) = resp.into_parts();
    p.upstream_response(&mut c, &mut parts);
    (parts.status.as_u16(), parts.headers)
}

fn h<'a>(m: &'a http::HeaderMap, n: &str) -> &'a str {
    m.get(n).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[test]
fn burst_then_429_with_retry_after_and_headers() {
    let clock = Arc::new(ManualClock::default());
    let env = BuildEnv::default();
    let p = build(
        serde_json::json!({"limits": [{"requests": 5, "per": "1m"}], "legacy_headers": true}),
        &env,
        &clock,
    );
    for i in 0..5u64 {
        let (status, hs) = send(&p, "192.0.2.1", None);
        assert_eq!(status, 200);
        assert_eq!(h(&hs, "ratelimit-policy"), "\"5-per-1m\";q=5;w=60");
        assert_eq!(
            h(&hs, "ratelimit"),
            format!("\"5-per-1m\";r={};t={}", 4 - i, 12 * (i + 1))
        );
        assert_eq!(h(&hs, "x-ratelimit-remaining"), (4 - i).to_string());
    }
    let (status, hs) = send(&p, "192.0.2.1", None);
    assert_eq!(status, 429);
    assert_eq!(h(&hs, "retry-after"), "12");
    assert_eq!(h(&hs, "ratelimit"), "\"5-per-1m\";r=0;t=60");
    assert_eq!(h(&hs, "x-ratelimit-limit"), "5");
    // Another client has its own count.
    assert_eq!(send(&p, "192.0.2.2", None).0, 200);
    // 12 s later: exactly one more.
    clock.advance(Duration::from_secs(12));
    assert_eq!(send(&p, "192.0.2.1", None).0, 200);
    assert_eq!(send(&p, "192.0.2.1", None).0, 429);
}

#[test]
fn several_limits_and_a_refusal_counts_against_none() {
    let clock = Arc::new(ManualClock::default());
    let env = BuildEnv::default();
    let p = build(
        serde_json::json!({"limits": [
            {"requests": 2, "per": "1s", "key": "header:x-user"},
            {"requests": 3, "per": "1h", "key": "route", "name": "hourly"}
        ]}),
        &env,
        &clock,
    );
    assert_eq!(send(&p, "192.0.2.1", Some("a")).0, 200);
    let (_, hs) = send(&p, "192.0.2.1", Some("a"));
    // The per-second limit is the most restrictive now (0 left).
    assert_eq!(h(&hs, "ratelimit"), "\"2-per-1s\";r=0;t=1");
    assert_eq!(
        h(&hs, "ratelimit-policy"),
        "\"2-per-1s\";q=2;w=1, \"hourly\";q=3;w=3600"
    );
    // Refused by the per-second limit: the hourly one is not charged.
    assert_eq!(send(&p, "192.0.2.1", Some("a")).0, 429);
    let (status, hs) = send(&p, "192.0.2.1", Some("b"));
    assert_eq!(status, 200);
    assert_eq!(h(&hs, "ratelimit"), "\"hourly\";r=0;t=3600");
    // The route's hourly quota is spent for everybody.
    let (status, hs) = send(&p, "192.0.2.1", Some("c"));
    assert_eq!(status, 429);
    assert_eq!(h(&hs, "retry-after"), "1200");
}

#[test]
fn a_rebuilt_policy_keeps_its_counters() {
    let clock = Arc::new(ManualClock::default());
    let env = BuildEnv::default().for_route("r");
    let settings = serde_json::json!({"limits": [{"requests": 2, "per": "1m"}]});
    let p = build(settings.clone(), &env, &clock);
    assert_eq!(send(&p, "192.0.2.1", None).0, 200);
    assert_eq!(send(&p, "192.0.2.1", None).0, 200);
    // A reload builds a new instance while the old one still serves.
    let q = build(settings, &env, &clock);
    drop(p);
    assert_eq!(send(&q, "192.0.2.1", None).0, 429);
    // Other settings, or another route: counted anew.
    let other = build(
        serde_json::json!({"limits": [{"requests": 3, "per": "1m"}]}),
        &env,
        &clock,
    );
    assert_eq!(send(&other, "192.0.2.1", None).0, 200);
    let elsewhere = build(
        serde_json::json!({"limits": [{"requests": 2, "per": "1m"}]}),
        &env.for_route("s"),
        &clock,
    );
    assert_eq!(send(&elsewhere, "192.0.2.1", None).0, 200);
}

#[test]
fn sliding_window_through_the_policy() {
    let clock = Arc::new(ManualClock::default());
    clock.set_ns(100_000_000_000);
    let p = build(
        serde_json::json!({"algorithm": "sliding_window", "limits": [{"requests": 3, "per": "10s"}]}),
        &BuildEnv::default(),
        &clock,
    );
    for _ in 0..3 {
        assert_eq!(send(&p, "192.0.2.1", None).0, 200);
    }
    let (status, hs) = send(&p, "192.0.2.1", None);
    assert_eq!(status, 429);
    assert_eq!(h(&hs, "ratelimit"), "\"3-per-10s\";r=0;t=10");
    // 3 * left/10 + 1 <= 3 in the next window needs left <= 6.67 s: 13.33 s from now.
    assert_eq!(h(&hs, "retry-after"), "14");
}

#[test]
fn every_bad_setting_is_named() {
    assert_eq!(
        errors(serde_json::json!({"limits": []})),
        ["limits: give at least one limit"]
    );
    assert_eq!(
        errors(serde_json::json!({"limits": [{"requests": 0, "per": "0s", "burst": 0}]})),
        [
            "limits[0].requests: must be at least 1",
            "limits[0].per: must be at least 1ms",
            "limits[0].burst: must be at least 1"
        ]
    );
    assert_eq!(
        errors(serde_json::json!({"algorithm": "sliding_window", "limits": [{"requests": 1, "per": "1s", "burst": 3}]})),
        ["limits[0].burst: only `algorithm: gcra` has a burst; a sliding window admits `requests` per window"]
    );
    assert_eq!(
        errors(
            serde_json::json!({"limits": [{"requests": 1, "per": "1s"}, {"requests": 1, "per": "1s"}]})
        ),
        ["limits[1].name: another limit is named `1-per-1s`; give each limit its own `name`"]
    );
    assert_eq!(
        errors(serde_json::json!({"limits": [{"requests": 1, "per": "1s", "name": "a\"b"}]})),
        ["limits[0].name: use printable ASCII without `\"` or `\\` (it is sent in a header)"]
    );
    assert_eq!(
        errors(serde_json::json!({"mode": "cluster", "limits": [{"requests": 1, "per": "1s"}]})),
        ["redis: `mode: cluster` needs `redis: {url: ...}`"]
    );
    assert_eq!(
        errors(
            serde_json::json!({"limits": [{"requests": 1, "per": "1s"}], "redis": {"url": "redis://127.0.0.1"}})
        ),
        ["redis: only used with `mode: cluster`; set it or remove `redis`"]
    );
    let e = errors(
        serde_json::json!({"mode": "cluster", "limits": [{"requests": 1, "per": "1s"}], "redis": {"url": "http://x"}}),
    );
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("redis.url: not a Redis URL"), "{e:?}");
    let e = errors(serde_json::json!({"limits": [{"requests": 1, "per": "1s", "key": "headr:x"}]}));
    assert!(e[0].starts_with("limits[0].key"), "{e:?}");
    let e = errors(serde_json::json!({"limits": [{"requests": 1, "per": "1s", "extra": 1}]}));
    assert!(e[0].contains("unknown field `extra`"), "{e:?}");
    // A cluster limit is only parsed when built: no connection is made.
    assert!(errors(serde_json::json!({"mode": "cluster", "limits": [{"requests": 1, "per": "1s"}], "redis": {"url": "redis://127.0.0.1:1"}})).is_empty());
}
