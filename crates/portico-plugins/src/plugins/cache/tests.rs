#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;

use super::control::{self, CacheControl, Defaults};
use super::key;
use super::store::{Entry, MemoryStore, Slot};
use super::*;
use crate::state::ManualClock;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

const D: Defaults = Defaults {
    ttl_ms: 60_000,
    swr_ms: 5_000,
    sie_ms: 7_000,
};

#[test]
fn cache_control_directives() {
    let cc = CacheControl::parse(&headers(&[
        ("cache-control", "Public, MAX-AGE=30, s-maxage=\"90\""),
        (
            "cache-control",
            "stale-while-revalidate=10,stale-if-error=20, private=\"x\"",
        ),
    ]));
    assert_eq!(cc.max_age, Some(30));
    assert_eq!(cc.s_maxage, Some(90));
    assert_eq!(cc.stale_while_revalidate, Some(10));
    assert_eq!(cc.stale_if_error, Some(20));
    assert!(cc.private && !cc.no_store && !cc.no_cache);
    let cc = CacheControl::parse(&headers(&[(
        "cache-control",
        "no-store, no-cache, max-age=abc",
    )]));
    assert!(cc.no_store && cc.no_cache);
    // An invalid max-age is "stale", not "absent".
    assert_eq!(cc.max_age, Some(0));
    let cc = CacheControl::parse(&headers(&[(
        "cache-control",
        "max-age=99999999999999999999",
    )]));
    assert_eq!(cc.max_age, Some(u64::from(u32::MAX)));
    assert_eq!(
        CacheControl::parse(&HeaderMap::new()),
        CacheControl::default()
    );
    // Requests.
    let h = headers(&[("pragma", "no-cache")]);
    assert!(CacheControl::parse(&h).request_wants_fresh(&h));
    let h = headers(&[("cache-control", "max-age=0")]);
    assert!(CacheControl::parse(&h).request_wants_fresh(&h));
    let h = headers(&[("cache-control", "max-age=5")]);
    assert!(!CacheControl::parse(&h).request_wants_fresh(&h));
}

#[test]
fn lifetime_math() {
    let now = 1_700_000_000_000;
    let life = |pairs: &[(&str, &str)]| {
        let h = headers(pairs);
        control::lifetime(&CacheControl::parse(&h), &h, now, D)
    };
    // s-maxage wins over max-age, which wins over Expires.
    let l = life(&[
        ("cache-control", "max-age=10, s-maxage=20"),
        ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
    ]);
    assert_eq!(l.ttl_ms, 20_000);
    assert_eq!(life(&[("cache-control", "max-age=10")]).ttl_ms, 10_000);
    // Expires counts from Date.
    let l = life(&[
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("expires", "Sun, 06 Nov 1994 08:50:07 GMT"),
    ]);
    assert_eq!(l.ttl_ms, 30_000);
    // An invalid or past Expires means expired.
    assert_eq!(life(&[("expires", "0")]).ttl_ms, 0);
    assert_eq!(
        life(&[("expires", "Sun, 06 Nov 1994 08:49:37 GMT")]).ttl_ms,
        0
    );
    // Nothing said: default_ttl; no-cache: 0.
    assert_eq!(life(&[]).ttl_ms, 60_000);
    assert_eq!(
        life(&[("cache-control", "no-cache, max-age=100")]).ttl_ms,
        0
    );
    // Stale windows: the response's, else the defaults; must-revalidate drops the defaults.
    let l = life(&[("cache-control", "max-age=1, stale-while-revalidate=3")]);
    assert_eq!((l.swr_ms, l.sie_ms), (3_000, 7_000));
    let l = life(&[(
        "cache-control",
        "max-age=1, must-revalidate, stale-if-error=9",
    )]);
    assert_eq!((l.swr_ms, l.sie_ms), (0, 9_000));
}

fn entry(ttl: u64, swr: u64, sie: u64, keep: u64) -> Entry {
    Entry {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        body: bytes::Bytes::from_static(b"x"),
        stored_ms: 1_000,
        initial_age_ms: 2_000,
        ttl_ms: ttl,
        swr_ms: swr,
        sie_ms: sie,
        keep_ms: keep,
    }
}

#[test]
fn freshness_windows_count_the_initial_age() {
    let e = entry(10_000, 5_000, 20_000, 40_000);
    // Stored at 1 s with Age 2 s: fresh until 9 s of the clock.
    assert_eq!(e.age_ms(1_000), 2_000);
    assert!(e.fresh(8_999));
    assert!(!e.fresh(9_000));
    assert!(e.usable_while_revalidating(13_999));
    assert!(!e.usable_while_revalidating(14_000));
    assert!(e.usable_on_error(28_999));
    assert!(!e.usable_on_error(29_000));
    assert!(!e.expired(40_999));
    assert!(e.expired(41_000));
}

#[test]
fn keys_normalize_query_and_host() {
    let a = key::url("API.Example.com:8080", "/users", Some("b=2&a=1&&c"));
    assert_eq!(a, "api.example.com:8080/users?a=1&b=2&c");
    assert_eq!(
        a,
        key::url("api.example.com:8080", "/users", Some("c&a=1&b=2"))
    );
    assert_eq!(key::url("h", "/p", Some("")), "h/p");
    assert_ne!(
        key::url("h", "/p", Some("a=1&a=2")),
        key::url("h", "/p", Some("a=1"))
    );
    let h = headers(&[("accept-language", " fr "), ("x-other", "1")]);
    let names = [HeaderName::from_static("accept-language")];
    let k = key::primary("users", &a, "GET", &names, &h, Some("alice"));
    let fr = key::primary("users", &a, "GET", &names, &h, None);
    let en = key::primary(
        "users",
        &a,
        "GET",
        &names,
        &headers(&[("accept-language", "en")]),
        None,
    );
    assert_ne!(fr, en);
    assert_ne!(k, fr);
    assert!(k.ends_with("accept-language=fr;@alice"));
    let p = key::parse(&k).unwrap();
    assert_eq!(p.route, "users");
    assert_eq!(p.url, "api.example.com:8080/users?a=1&b=2&c");
    assert_eq!(p.path, "/users");
    // Variants hang off the primary key and differ by the Vary headers' values.
    let vary = [HeaderName::from_static("accept-encoding")];
    let v1 = key::variant(&fr, &vary, &headers(&[("accept-encoding", "gzip")]));
    let v2 = key::variant(&fr, &vary, &headers(&[]));
    assert!(v1.starts_with(&fr) && v1 != v2);
    assert_eq!(key::parse(&v1).unwrap().url, p.url);
}

#[test]
fn vary_names() {
    let v = key::vary_names(&headers(&[
        ("vary", "Accept-Encoding, accept-language"),
        ("vary", "Accept-Encoding"),
    ]));
    assert_eq!(
        v.unwrap(),
        vec![
            HeaderName::from_static("accept-encoding"),
            HeaderName::from_static("accept-language")
        ]
    );
    assert!(key::vary_names(&headers(&[("vary", "Accept, *")])).is_none());
    assert!(key::vary_names(&HeaderMap::new()).unwrap().is_empty());
}

#[test]
fn conditional_requests() {
    let stored = headers(&[
        ("etag", "W/\"v1\""),
        ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ]);
    let nm = |pairs: &[(&str, &str)]| control::not_modified(&headers(pairs), &stored);
    assert!(nm(&[("if-none-match", "\"v0\", \"v1\"")]));
    assert!(nm(&[("if-none-match", "*")]));
    assert!(!nm(&[("if-none-match", "\"v2\"")]));
    // If-None-Match decides alone when present.
    assert!(!nm(&[
        ("if-none-match", "\"v2\""),
        ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
    ]));
    assert!(nm(&[(
        "if-modified-since",
        "Sun, 06 Nov 1994 08:49:37 GMT"
    )]));
    assert!(!nm(&[(
        "if-modified-since",
        "Sun, 06 Nov 1994 08:49:36 GMT"
    )]));
    assert!(!nm(&[]));
}

fn slot(body_len: usize) -> Slot {
    let mut e = entry(1, 0, 0, u64::MAX);
    e.body = bytes::Bytes::from(vec![b'x'; body_len]);
    Slot::Response(Arc::new(e))
}

#[test]
fn memory_store_is_bounded_by_bytes_and_evicts_least_recently_used() {
    // 10 KiB with 2 KiB objects: one shard (it must hold 4 objects of max size).
    let m = MemoryStore::new(10 * 1024, 2 * 1024);
    assert_eq!(m.capacity(), 10 * 1024);
    let w = slot(1000).weight("k00");
    let fit = (10 * 1024) / w;
    for i in 0..12 {
        assert!(m.put(&format!("k{i:02}"), slot(1000)));
    }
    // Within the byte budget; the oldest went first.
    let (bytes, entries) = m.usage();
    assert!(bytes <= 10 * 1024, "{bytes}");
    assert_eq!(entries as usize, fit);
    assert_eq!(m.evictions.load(Ordering::Relaxed) as usize, 12 - fit);
    let first = 12 - fit;
    assert!(m.get(&format!("k{:02}", first - 1), 0).is_none());
    // A read makes the oldest entry the most recent: the next insert evicts the one after it.
    assert!(m.get(&format!("k{first:02}"), 0).is_some());
    assert!(m.put("k99", slot(1000)));
    assert!(m.get(&format!("k{first:02}"), 0).is_some());
    assert!(m.get(&format!("k{:02}", first + 1), 0).is_none());
    assert!(m.get("k11", 0).is_some());
    // Larger than a shard: refused, nothing evicted.
    assert!(!m.put("huge", slot(20 * 1024)));
    // Expired entries are not returned (and are removed).
    let mut e = entry(1, 0, 0, 10);
    e.stored_ms = 0;
    assert!(m.put("short", Slot::Response(Arc::new(e))));
    assert!(m.get("short", 9).is_some());
    assert!(m.get("short", 10).is_none());
    // Purge by predicate.
    assert_eq!(m.purge(&|k| k == "k99"), 1);
    assert!(m.get("k99", 0).is_none());
}

#[test]
fn redis_encoding_round_trips() {
    let mut e = entry(1, 2, 3, 4);
    e.headers = headers(&[
        ("etag", "\"a\""),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
    ]);
    e.body = bytes::Bytes::from_static(b"\x00\x01body");
    let back = redis::decode(redis::encode(&Slot::Response(Arc::new(e.clone())))).unwrap();
    let Slot::Response(b) = back else { panic!() };
    assert_eq!(b.body, e.body);
    assert_eq!(b.headers, e.headers);
    assert_eq!(
        (
            b.stored_ms,
            b.initial_age_ms,
            b.ttl_ms,
            b.swr_ms,
            b.sie_ms,
            b.keep_ms
        ),
        (1_000, 2_000, 1, 2, 3, 4)
    );
    let names: Arc<[HeaderName]> = Arc::from(vec![HeaderName::from_static("accept")]);
    let Slot::Vary { names: n, until_ms } =
        redis::decode(redis::encode(&Slot::Vary { names, until_ms: 9 })).unwrap()
    else {
        panic!()
    };
    assert_eq!((n[0].as_str(), until_ms), ("accept", 9));
    // Truncated or foreign data is no entry.
    let enc = redis::encode(&slot(10));
    assert!(redis::decode(enc.slice(..20)).is_none());
    assert!(redis::decode(bytes::Bytes::from_static(b"junk")).is_none());
}

// The policy on a controllable clock.

struct Harness {
    cache: Cache,
    clock: Arc<ManualClock>,
}

fn harness(settings: serde_json::Value) -> Harness {
    let clock = Arc::new(ManualClock::default());
    clock.set_ns(1_700_000_000_000_000_000);
    let env = BuildEnv::default().for_route("r");
    let cache = Cache::with_clock(
        crate::registry::parse(&settings).unwrap(),
        &env,
        clock.clone(),
    )
    .unwrap();
    Harness { cache, clock }
}

fn ctx() -> Ctx {
    Ctx::new(
        "id".into(),
        "127.0.0.1".parse().unwrap(),
        Arc::from("r"),
        "/p".into(),
        portico_router::Params::default(),
    )
}

fn request(pairs: &[(&str, &str)]) -> Request<Body> {
    let mut r = Request::builder().uri("/p?b=1&a=2").header("host", "h");
    for (n, v) in pairs {
        r = r.header(*n, *v);
    }
    r.body(Body::Empty).unwrap()
}

/// What a client sees for one request, with `upstream` answering when the cache
/// lets the request through (`None` if it did not).
async fn exchange(
    h: &Harness,
    req_headers: &[(&str, &str)],
    upstream: impl FnOnce(&HeaderMap) -> Response<Body>,
) -> (Response<bytes::Bytes>, bool) {
    let mut c = ctx();
    let mut req = request(req_headers);
    let flow = h.cache.on_request(&mut c, &mut req).await;
    let (resp, went) = match flow {
        Flow::Respond(r) => (*r, false),
        Flow::Continue => {
            let (mut parts, body) = upstream(req.headers()).into_parts();
            let body = h
                .cache
                .response_body(&mut c, &mut parts, body)
                .await
                .unwrap();
            (Response::from_parts(parts, body), true)
        }
        Flow::Error(e) => panic!("{e:?}"),
    };
    let (mut parts, body) = resp.into_parts();
    h.cache.upstream_response(&mut c, &mut parts);
    let bytes = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, bytes), went)
}

fn up(status: u16, pairs: &[(&str, &str)], body: &'static str) -> Response<Body> {
    let mut r = Response::builder().status(status);
    for (n, v) in pairs {
        r = r.header(*n, *v);
    }
    r.body(Body::full(body)).unwrap()
}

fn h<'a>(r: &'a Response<bytes::Bytes>, n: &str) -> &'a str {
    r.headers()
        .get(n)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn miss_hit_age_expiry_and_revalidation_on_a_driven_clock() {
    let hs = harness(serde_json::json!({}));
    let (r, went) = exchange(&hs, &[], |_| {
        up(
            200,
            &[("cache-control", "max-age=10"), ("etag", "\"v1\"")],
            "one",
        )
    })
    .await;
    assert!(went);
    assert_eq!(h(&r, "x-cache"), "MISS");
    assert_eq!(r.body(), "one");
    hs.clock.advance(Duration::from_secs(4));
    let (r, went) = exchange(&hs, &[], |_| unreachable!()).await;
    assert!(!went);
    assert_eq!((h(&r, "x-cache"), h(&r, "age")), ("HIT", "4"));
    assert_eq!(r.body(), "one");
    // The client's own conditional request is answered 304 from the cache.
    let (r, _) = exchange(&hs, &[("if-none-match", "\"v1\"")], |_| unreachable!()).await;
    assert_eq!(r.status(), 304);
    assert_eq!(h(&r, "etag"), "\"v1\"");
    assert!(r.body().is_empty());
    // Past max-age: revalidated with the stored ETag; a 304 refreshes the entry.
    hs.clock.advance(Duration::from_secs(6));
    let (r, went) = exchange(&hs, &[], |req| {
        assert_eq!(req.get("if-none-match").unwrap(), "\"v1\"");
        up(304, &[("cache-control", "max-age=20")], "")
    })
    .await;
    assert!(went);
    assert_eq!(r.status(), 200);
    assert_eq!((h(&r, "x-cache"), h(&r, "age")), ("REVALIDATED", "0"));
    assert_eq!(h(&r, "cache-control"), "max-age=20");
    assert_eq!(r.body(), "one");
    hs.clock.advance(Duration::from_secs(19));
    let (r, _) = exchange(&hs, &[], |_| unreachable!()).await;
    assert_eq!((h(&r, "x-cache"), h(&r, "age")), ("HIT", "19"));
}

#[tokio::test]
async fn what_is_not_stored() {
    let hs = harness(serde_json::json!({"max_object_size": 4}));
    for (status, pairs, body) in [
        (200, &[("cache-control", "no-store")][..], "a"),
        (200, &[("cache-control", "private, max-age=60")][..], "a"),
        (200, &[("set-cookie", "s=1")][..], "a"),
        (200, &[("vary", "*")][..], "a"),
        (500, &[][..], "a"),
        (200, &[][..], "too large"),
    ] {
        let (r, _) = exchange(&hs, &[], |_| up(status, pairs, body)).await;
        assert_eq!(r.body(), body);
        let (r, went) =
            exchange(&hs, &[], |_| up(200, &[("cache-control", "no-store")], "b")).await;
        assert!(went, "{status} {pairs:?} {body} was stored");
        assert_eq!(h(&r, "x-cache"), "MISS");
    }
    // Range requests and authenticated requests bypass the cache.
    let (r, went) = exchange(&hs, &[("range", "bytes=0-1")], |_| up(206, &[], "a")).await;
    assert!(went);
    assert_eq!(h(&r, "x-cache"), "BYPASS");
    let (r, went) = exchange(&hs, &[("authorization", "Bearer x")], |_| up(200, &[], "a")).await;
    assert!(went);
    assert_eq!(h(&r, "x-cache"), "BYPASS");
}

#[tokio::test]
async fn stale_if_error_and_vary() {
    let hs = harness(serde_json::json!({"stale_if_error": "30s"}));
    let (r, _) = exchange(&hs, &[("accept-language", "fr")], |_| {
        up(
            200,
            &[("cache-control", "max-age=1"), ("vary", "Accept-Language")],
            "bonjour",
        )
    })
    .await;
    assert_eq!(r.body(), "bonjour");
    let (r, went) = exchange(&hs, &[("accept-language", "en")], |_| {
        up(
            200,
            &[("cache-control", "max-age=1"), ("vary", "Accept-Language")],
            "hello",
        )
    })
    .await;
    assert!(went);
    assert_eq!(r.body(), "hello");
    let (r, _) = exchange(&hs, &[("accept-language", "fr")], |_| unreachable!()).await;
    assert_eq!(r.body(), "bonjour");
    hs.clock.advance(Duration::from_secs(5));
    let (r, went) = exchange(&hs, &[("accept-language", "en")], |_| up(503, &[], "down")).await;
    assert!(went);
    assert_eq!((r.status().as_u16(), h(&r, "x-cache")), (200, "STALE"));
    assert_eq!(r.body(), "hello");
    // Past the window, the error goes through.
    hs.clock.advance(Duration::from_secs(30));
    let (r, _) = exchange(&hs, &[("accept-language", "en")], |_| up(503, &[], "down")).await;
    assert_eq!(r.status(), 503);
}

#[test]
fn purge_urls_are_normalized_like_keys() {
    let Purge::Url(u) = Purge::url("http://API.example.com:8080/a/../b?y=2&x=1").unwrap() else {
        panic!()
    };
    assert_eq!(u, "api.example.com:8080/b?x=1&y=2");
    for bad in ["/relative", "ftp://h/x", "not a url", "http://user@h/x"] {
        assert!(Purge::url(bad).is_err(), "{bad}");
    }
    let k = key::primary("users", &u, "GET", &[], &HeaderMap::new(), None);
    assert!(Purge::url("https://api.example.com:8080/b?y=2&x=1")
        .unwrap()
        .matches(&k));
    assert!(Purge::Prefix("/b".into()).matches(&k));
    assert!(!Purge::Prefix("/a".into()).matches(&k));
    assert!(Purge::Route("users".into()).matches(&k));
    assert!(!Purge::Route("user".into()).matches(&k));
}

#[tokio::test]
async fn one_leader_per_key_and_waiters_wake_when_it_is_done() {
    let f = Arc::new(store::Flights::default());
    let store::Join::Lead(leader) = f.join("k") else {
        panic!("the first request leads")
    };
    let store::Join::Wait(rx) = f.join("k") else {
        panic!("the second waits")
    };
    assert!(f.try_lead("k").is_none());
    assert!(f.try_lead("other").is_some());
    let probe = rx.clone();
    assert!(probe.has_changed().is_ok(), "the leader is still at work");
    let waiter = tokio::spawn(store::wait(rx, Duration::from_secs(60)));
    drop(leader);
    // The leader's channel is closed: waiters return.
    assert!(probe.has_changed().is_err());
    waiter.await.unwrap();
    // The key is free again.
    assert!(f.try_lead("k").is_some());
}

#[tokio::test]
async fn client_cache_control_only_when_respected() {
    let ignore = harness(serde_json::json!({}));
    let respect = harness(serde_json::json!({"respect_client_no_cache": true}));
    for hs in [&ignore, &respect] {
        let (r, _) = exchange(hs, &[], |_| up(200, &[], "one")).await;
        assert_eq!(h(&r, "x-cache"), "MISS");
    }
    // Ignored: the client's no-cache and no-store get the stored answer.
    for cc in ["no-cache", "no-store"] {
        let (r, went) = exchange(&ignore, &[("cache-control", cc)], |_| unreachable!()).await;
        assert!(!went);
        assert_eq!((h(&r, "x-cache"), r.body().as_ref()), ("HIT", &b"one"[..]));
    }
    // Respected: no-store bypasses; no-cache fetches and stores the fresh answer.
    let (r, went) = exchange(&respect, &[("cache-control", "no-store")], |_| {
        up(200, &[], "two")
    })
    .await;
    assert!(went);
    assert_eq!(
        (h(&r, "x-cache"), r.body().as_ref()),
        ("BYPASS", &b"two"[..])
    );
    let (r, _) = exchange(&respect, &[], |_| unreachable!()).await;
    assert_eq!(r.body(), "one");
    let (r, went) = exchange(&respect, &[("pragma", "no-cache")], |_| {
        up(200, &[], "three")
    })
    .await;
    assert!(went);
    assert_eq!(
        (h(&r, "x-cache"), r.body().as_ref()),
        ("MISS", &b"three"[..])
    );
    let (r, _) = exchange(&respect, &[], |_| unreachable!()).await;
    assert_eq!(
        (h(&r, "x-cache"), r.body().as_ref()),
        ("HIT", &b"three"[..])
    );
}
