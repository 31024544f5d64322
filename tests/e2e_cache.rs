//! End-to-end tests of the `cache` policy: the real `portico` binary in front of real
//! upstreams that count what reaches them, and for the shared mode a real
//! `redis-server` (started by the test on a free port; its absence fails the test).
//!
//! Covers: MISS then HIT with `Age`; expiry after `max-age`; `no-store`, `private` and
//! `Set-Cookie` not stored; one entry per `Vary` variant; revalidation with the
//! stored `ETag` (the upstream answers 304); a client's conditional request answered
//! 304 from the cache; stale-if-error on a 5xx and with the upstream down;
//! stale-while-revalidate; 50 concurrent misses making one upstream request;
//! authenticated requests bypassing the cache; purge by URL, prefix and route through
//! the admin API (and its 400s); two gateways sharing entries through Redis.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Response;
use portico_test_support::redis::Redis;
use portico_test_support::upstream::{full, handler, BoxBody};
use portico_test_support::{free_port, http_client, wait_until, LocalGateway, Upstream};
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

/// Requests that reached the upstream, by path; and how many it answered 304.
#[derive(Default)]
struct Counts {
    by_path: Mutex<HashMap<String, usize>>,
    not_modified: std::sync::atomic::AtomicUsize,
    fail: AtomicBool,
}

impl Counts {
    fn of(&self, path: &str) -> usize {
        self.by_path.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// The upstream of these tests. Bodies say which request of their path they answer
/// (`PATH #N`), so a client sees whether an answer came from the cache.
///
/// | path | answer |
/// |---|---|
/// | `/max/{s}/...` | `Cache-Control: max-age={s}`, `ETag: "m"` |
/// | `/nostore`, `/private`, `/cookie` | `no-store`; `private, max-age=60`; `Set-Cookie` |
/// | `/vary` | `Vary: Accept-Language`, the language in the body |
/// | `/etag` | `max-age=1`, `ETag: "v1"`; `If-None-Match: "v1"` gets `304` |
/// | `/swr` | `max-age=1, stale-while-revalidate=60` |
/// | `/sie` | `max-age=1, stale-if-error=60`; `500` while `fail` is set |
/// | `/slow` | `max-age=60` after 400 ms |
/// | anything else | `max-age=60` |
async fn upstream(counts: Arc<Counts>) -> Upstream {
    Upstream::start_with(
        "cached",
        handler(move |req| {
            let counts = counts.clone();
            async move {
                let path = req.uri().path().to_string();
                let n = {
                    let mut m = counts.by_path.lock().unwrap();
                    let n = m.entry(path.clone()).or_default();
                    *n += 1;
                    *n
                };
                let body = format!("{path} #{n}");
                let mut cc = "max-age=60".to_string();
                let mut r = Response::builder();
                if let Some(rest) = path.strip_prefix("/max/") {
                    let s = rest.split('/').next().unwrap_or("0");
                    cc = format!("max-age={s}");
                    r = r.header("etag", "\"m\"");
                }
                match path.as_str() {
                    "/nostore" => cc = "no-store".into(),
                    "/private" => cc = "private, max-age=60".into(),
                    "/cookie" => r = r.header("set-cookie", "session=1"),
                    "/vary" => {
                        let lang = req
                            .headers()
                            .get("accept-language")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        r = r.header("vary", "Accept-Language");
                        return r
                            .header("cache-control", cc)
                            .body(full(format!("{lang} {body}")))
                            .unwrap();
                    }
                    "/etag" => {
                        cc = "max-age=1".into();
                        r = r.header("etag", "\"v1\"");
                        if req
                            .headers()
                            .get("if-none-match")
                            .is_some_and(|v| v == "\"v1\"")
                        {
                            counts.not_modified.fetch_add(1, Ordering::SeqCst);
                            return r
                                .status(304)
                                .header("cache-control", cc)
                                .body(full(""))
                                .unwrap();
                        }
                    }
                    "/swr" => cc = "max-age=1, stale-while-revalidate=60".into(),
                    "/sie" => {
                        cc = "max-age=1, stale-if-error=60".into();
                        if counts.fail.load(Ordering::SeqCst) {
                            return r.status(500).body(full("broken")).unwrap();
                        }
                    }
                    "/slow" => tokio::time::sleep(Duration::from_millis(400)).await,
                    _ => {}
                }
                let resp: Response<BoxBody> =
                    r.header("cache-control", cc).body(full(body)).unwrap();
                resp
            }
        }),
    )
    .await
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
    fn x_cache(&self) -> &str {
        self.h("x-cache")
    }
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut r = http_client().get(format!("http://{addr}{path}"));
    for (n, v) in headers {
        r = r.header(*n, *v);
    }
    let resp = r.send().await.unwrap();
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap(),
    }
}

/// Ask until `want` holds (at most `secs`), returning the answer that satisfied it.
async fn get_until(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    secs: u64,
    want: impl Fn(&Answer) -> bool,
) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let a = get(addr, path, headers).await;
        if want(&a) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: still {} {} `{}` after {secs} s",
            a.status,
            a.x_cache(),
            a.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn config(up: &Upstream, cache: &str) -> String {
    format!(
        "upstreams:
  up:
    targets: [{{url: \"{}\"}}]
routes:
  - name: cached
    paths: [\"/*\"]
    upstream: up
    plugins:
      cache: {cache}
",
        up.url()
    )
}

async fn start(cache: &str) -> (LocalGateway, Upstream, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let up = upstream(counts.clone()).await;
    let gw = LocalGateway::start(bin(), &config(&up, cache)).await;
    (gw, up, counts)
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

#[tokio::test(flavor = "multi_thread")]
async fn miss_then_hit_with_age_then_expiry() {
    let (gw, _up, counts) = start("{}").await;
    let a = get(gw.addr, "/max/3/a?b=2&a=1", &[]).await;
    assert_eq!((a.status, a.x_cache()), (200, "MISS"));
    assert_eq!(a.body, "/max/3/a #1");
    assert_eq!(a.h("age"), "", "a response from the upstream has no Age");
    // The same resource with its query parameters in another order: a hit.
    let b = get(gw.addr, "/max/3/a?a=1&b=2", &[]).await;
    assert_eq!(
        (b.status, b.x_cache(), b.body.as_str()),
        (200, "HIT", "/max/3/a #1")
    );
    let age: u64 = b.h("age").parse().unwrap();
    assert!(age <= 3, "Age {age}");
    assert_eq!(counts.of("/max/3/a"), 1);
    // Age grows, then the entry expires and the upstream is asked again.
    let c = get_until(gw.addr, "/max/3/a?a=1&b=2", &[], 10, |a| {
        a.x_cache() == "MISS" || a.h("age").parse::<u64>().unwrap_or(0) >= 1
    })
    .await;
    if c.x_cache() == "HIT" {
        assert_eq!(c.body, "/max/3/a #1");
    }
    let d = get_until(gw.addr, "/max/3/a?a=1&b=2", &[], 15, |a| {
        a.x_cache() == "MISS"
    })
    .await;
    assert_eq!(d.body, "/max/3/a #2");
    assert_eq!(counts.of("/max/3/a"), 2);
    let m = metrics(gw.admin).await;
    assert!(
        sample(
            &m,
            "portico_cache_requests_total{scope=\"route:cached\",result=\"hit\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert!(sample(&m, "portico_cache_stored_bytes{scope=\"route:cached\"}").unwrap() > 0.0);
    assert!(sample(&m, "portico_cache_evictions_total{scope=\"route:cached\"}").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_store_private_set_cookie_and_authenticated_requests_are_not_cached() {
    let (gw, _up, counts) = start("{}").await;
    for path in ["/nostore", "/private", "/cookie"] {
        for i in 1..=2 {
            let a = get(gw.addr, path, &[]).await;
            assert_eq!((a.status, a.x_cache()), (200, "MISS"), "{path}");
            assert_eq!(a.body, format!("{path} #{i}"));
        }
        assert_eq!(counts.of(path), 2, "{path}");
    }
    // The cookie reaches the client.
    assert_eq!(
        get(gw.addr, "/cookie", &[]).await.h("set-cookie"),
        "session=1"
    );
    // A stored response is not served to (nor stored for) an authenticated request.
    assert_eq!(get(gw.addr, "/shared", &[]).await.x_cache(), "MISS");
    assert_eq!(get(gw.addr, "/shared", &[]).await.x_cache(), "HIT");
    for _ in 0..2 {
        let a = get(gw.addr, "/shared", &[("authorization", "Bearer secret")]).await;
        assert_eq!(a.x_cache(), "BYPASS");
    }
    assert_eq!(counts.of("/shared"), 3);
    // Methods other than GET and HEAD bypass it too.
    let a = http_client()
        .post(format!("http://{}/shared", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(a.headers()["x-cache"], "BYPASS");
    assert_eq!(counts.of("/shared"), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_entry_per_vary_variant() {
    let (gw, _up, counts) = start("{}").await;
    let fr = get(gw.addr, "/vary", &[("accept-language", "fr")]).await;
    assert_eq!((fr.x_cache(), fr.body.as_str()), ("MISS", "fr /vary #1"));
    let en = get(gw.addr, "/vary", &[("accept-language", "en")]).await;
    assert_eq!((en.x_cache(), en.body.as_str()), ("MISS", "en /vary #2"));
    let fr = get(gw.addr, "/vary", &[("accept-language", "fr")]).await;
    assert_eq!((fr.x_cache(), fr.body.as_str()), ("HIT", "fr /vary #1"));
    let en = get(gw.addr, "/vary", &[("accept-language", "en")]).await;
    assert_eq!((en.x_cache(), en.body.as_str()), ("HIT", "en /vary #2"));
    assert_eq!(counts.of("/vary"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn etag_revalidation_and_client_conditional_requests() {
    let (gw, _up, counts) = start("{}").await;
    let a = get(gw.addr, "/etag", &[]).await;
    assert_eq!((a.x_cache(), a.body.as_str()), ("MISS", "/etag #1"));
    // Once stale, the entry is revalidated with its ETag; the upstream's 304 refreshes it.
    let b = get_until(gw.addr, "/etag", &[], 10, |a| a.x_cache() != "HIT").await;
    assert_eq!((b.status, b.x_cache()), (200, "REVALIDATED"));
    assert_eq!(b.body, "/etag #1");
    assert_eq!(b.h("etag"), "\"v1\"");
    assert_eq!(counts.not_modified.load(Ordering::SeqCst), 1);
    // A client's conditional request that matches is answered 304 by the cache.
    let (gw2_path, etag) = ("/max/60/c", "\"m\"");
    assert_eq!(get(gw.addr, gw2_path, &[]).await.x_cache(), "MISS");
    let c = get(gw.addr, gw2_path, &[("if-none-match", etag)]).await;
    assert_eq!((c.status, c.x_cache(), c.body.as_str()), (304, "HIT", ""));
    assert_eq!(c.h("etag"), etag);
    let d = get(gw.addr, gw2_path, &[("if-none-match", "\"other\"")]).await;
    assert_eq!((d.status, d.body.as_str()), (200, "/max/60/c #1"));
    assert_eq!(counts.of(gw2_path), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_if_error_on_5xx_and_with_the_upstream_down() {
    let (gw, up, counts) = start("{}").await;
    let a = get(gw.addr, "/sie", &[]).await;
    assert_eq!((a.x_cache(), a.body.as_str()), ("MISS", "/sie #1"));
    counts.fail.store(true, Ordering::SeqCst);
    let b = get_until(gw.addr, "/sie", &[], 10, |a| a.x_cache() != "HIT").await;
    assert_eq!(
        (b.status, b.x_cache(), b.body.as_str()),
        (200, "STALE", "/sie #1")
    );
    assert!(counts.of("/sie") >= 2, "the upstream was asked");
    // With the upstream gone altogether, the stale entry still answers.
    up.stop().await;
    let c = get(gw.addr, "/sie", &[]).await;
    assert_eq!(
        (c.status, c.x_cache(), c.body.as_str()),
        (200, "STALE", "/sie #1")
    );
    // What was never cached gets the error.
    let d = get(gw.addr, "/never", &[]).await;
    assert_eq!(d.status, 502, "{}", d.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_while_revalidate_serves_stale_and_refreshes_in_the_background() {
    let (gw, _up, counts) = start("{}").await;
    assert_eq!(get(gw.addr, "/swr", &[]).await.body, "/swr #1");
    let a = get_until(gw.addr, "/swr", &[], 10, |a| a.x_cache() != "HIT").await;
    assert_eq!(
        (a.status, a.x_cache(), a.body.as_str()),
        (200, "STALE", "/swr #1")
    );
    // The background request refreshed the entry.
    assert!(
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { counts.of("/swr") >= 2 }
        )
        .await
    );
    let b = get_until(gw.addr, "/swr", &[], 10, |a| a.body != "/swr #1").await;
    assert_eq!(b.body, "/swr #2");
    assert!(matches!(b.x_cache(), "HIT" | "STALE"), "{}", b.x_cache());
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_misses_make_one_upstream_request() {
    let (gw, _up, counts) = start("{}").await;
    let client = http_client();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (c, addr) = (client.clone(), gw.addr);
        set.spawn(async move {
            let r = c.get(format!("http://{addr}/slow")).send().await.unwrap();
            let x = r.headers()["x-cache"].to_str().unwrap().to_string();
            (r.status().as_u16(), x, r.text().await.unwrap())
        });
    }
    let mut misses = 0;
    while let Some(r) = set.join_next().await {
        let (status, x, body) = r.unwrap();
        assert_eq!((status, body.as_str()), (200, "/slow #1"));
        misses += usize::from(x == "MISS");
    }
    assert_eq!(counts.of("/slow"), 1);
    assert_eq!(misses, 1);
}

async fn purge(admin: SocketAddr, params: &[(&str, &str)]) -> (u16, Value) {
    let r = http_client()
        .delete(format!("http://{admin}/admin/cache"))
        .query(params)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_by_url_prefix_and_route() {
    let counts = Arc::new(Counts::default());
    let up = upstream(counts.clone()).await;
    let gw = LocalGateway::start(
        bin(),
        &format!(
            "upstreams:
  up:
    targets: [{{url: \"{}\"}}]
routes:
  - name: users
    paths: [\"/users/*\"]
    upstream: up
    plugins:
      cache: {{}}
  - name: other
    paths: [\"/other/*\"]
    upstream: up
    plugins:
      cache: {{}}
",
            up.url()
        ),
    )
    .await;
    let addr = gw.addr;
    for p in ["/users/1", "/users/2?b=2&a=1", "/other/x"] {
        assert_eq!(get(addr, p, &[]).await.x_cache(), "MISS");
        assert_eq!(get(addr, p, &[]).await.x_cache(), "HIT");
    }
    // By URL (query in any order; any method and variant).
    let (s, v) = purge(
        gw.admin,
        &[("url", &format!("http://{addr}/users/2?a=1&b=2"))],
    )
    .await;
    assert_eq!((s, v["purged"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(get(addr, "/users/2?b=2&a=1", &[]).await.x_cache(), "MISS");
    assert_eq!(get(addr, "/users/1", &[]).await.x_cache(), "HIT");
    // By path prefix.
    let (s, v) = purge(gw.admin, &[("prefix", "/users/")]).await;
    assert_eq!((s, v["purged"].as_u64()), (200, Some(2)), "{v}");
    assert_eq!(get(addr, "/users/1", &[]).await.x_cache(), "MISS");
    assert_eq!(get(addr, "/other/x", &[]).await.x_cache(), "HIT");
    // By route.
    let (s, v) = purge(gw.admin, &[("route", "other")]).await;
    assert_eq!((s, v["purged"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(get(addr, "/other/x", &[]).await.x_cache(), "MISS");
    assert_eq!(get(addr, "/users/1", &[]).await.x_cache(), "HIT");
    // Bad input names the parameter.
    for (params, param) in [
        (&[("prefix", "users")][..], "prefix"),
        (&[("url", "not a url")][..], "url"),
        (&[("url", "/relative")][..], "url"),
        (&[("color", "red")][..], "color"),
        (&[("route", "users"), ("prefix", "/a")][..], "prefix"),
        (&[][..], "route"),
    ] {
        let (s, v) = purge(gw.admin, params).await;
        assert_eq!(s, 400, "{params:?}: {v}");
        assert_eq!(v["error"]["parameter"], param, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(param),
            "{v}"
        );
    }
    let (s, v) = purge(gw.admin, &[("route", "nope")]).await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_share_entries_through_redis() {
    let redis = Redis::start(free_port());
    let counts = Arc::new(Counts::default());
    let up = upstream(counts.clone()).await;
    let cache = format!(
        "{{redis: {{url: \"redis://127.0.0.1:{}\", timeout: 2s}}}}",
        redis.port
    );
    let a = LocalGateway::start(bin(), &config(&up, &cache)).await;
    let b = LocalGateway::start(bin(), &config(&up, &cache)).await;
    // Clients reach both gateways under one name (through a load balancer, say).
    const HOST: (&str, &str) = ("host", "api.example.com");
    const H: &[(&str, &str)] = &[HOST];
    let first = get(a.addr, "/shared?x=1", H).await;
    assert_eq!(
        (first.x_cache(), first.body.as_str()),
        ("MISS", "/shared #1")
    );
    // The entry is written to Redis in the background: once gateway `a` (which keeps
    // nothing itself) finds it there, gateway `b` finds it too.
    get_until(a.addr, "/shared?x=1", H, 10, |a| a.x_cache() == "HIT").await;
    let hit = get(b.addr, "/shared?x=1", H).await;
    assert_eq!((hit.x_cache(), hit.body.as_str()), ("HIT", "/shared #1"));
    assert!(hit.h("age").parse::<u64>().is_ok());
    assert_eq!(counts.of("/shared"), 1);
    // Variants are shared too.
    assert_eq!(
        get(a.addr, "/vary", &[("accept-language", "de"), HOST])
            .await
            .x_cache(),
        "MISS"
    );
    get_until(
        a.addr,
        "/vary",
        &[("accept-language", "de"), HOST],
        10,
        |a| a.x_cache() == "HIT",
    )
    .await;
    let v = get(b.addr, "/vary", &[("accept-language", "de"), HOST]).await;
    assert_eq!((v.x_cache(), v.body.as_str()), ("HIT", "de /vary #1"));
    // A purge through one gateway's admin API empties the shared store.
    let (s, v) = purge(a.admin, &[("route", "cached")]).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["purged"].as_u64().unwrap() >= 3, "{v}");
    let again = get(b.addr, "/shared?x=1", H).await;
    assert_eq!(
        (again.x_cache(), again.body.as_str()),
        ("MISS", "/shared #2")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn head_requests_and_large_bodies() {
    let (gw, _up, counts) = start("{max_object_size: 8}").await;
    // Larger than max_object_size: streamed whole, never stored.
    for i in 1..=2 {
        let a = get(gw.addr, "/large-enough", &[]).await;
        assert_eq!(
            (a.x_cache(), a.body.clone()),
            ("MISS", format!("/large-enough #{i}"))
        );
    }
    assert_eq!(counts.of("/large-enough"), 2);
    // HEAD is cached on its own, with the upstream's Content-Length.
    let head = |path: &'static str| {
        let addr = gw.addr;
        async move {
            let r = http_client()
                .head(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            (
                r.headers()["x-cache"].to_str().unwrap().to_string(),
                r.headers()["content-length"].to_str().unwrap().to_string(),
            )
        }
    };
    assert_eq!(head("/h").await, ("MISS".to_string(), "5".to_string()));
    assert_eq!(head("/h").await, ("HIT".to_string(), "5".to_string()));
    assert_eq!(counts.of("/h"), 1);
}

/// A cached answer goes through the response transforms and masking that come after
/// the cache, exactly as the upstream's answer does: a hit never reveals what the
/// policies hide.
#[tokio::test(flavor = "multi_thread")]
async fn hits_get_the_same_masking_and_transforms_as_misses() {
    let up = Upstream::start_with(
        "cards",
        handler(|_req| async move {
            Response::builder()
                .header("content-type", "application/json")
                .header("cache-control", "max-age=60")
                .body(full(
                    r#"{"card": "4111 1111 1111 1111", "owner": "ann", "internal": "x"}"#,
                ))
                .unwrap()
        }),
    )
    .await;
    let gw = LocalGateway::start(
        bin(),
        &format!(
            "upstreams:\n  up:\n    targets: [{{url: \"{}\"}}]\nroutes:\n  - name: cards\n    paths: [\"/*\"]\n    upstream: up\n    plugins:\n      cache: {{}}\n      data-masking: {{detect: [card]}}\n      response-transformer: {{body: {{remove: [/internal]}}}}\n",
            up.url()
        ),
    )
    .await;
    for want in ["MISS", "HIT", "HIT"] {
        let a = get(gw.addr, "/card", &[]).await;
        assert_eq!(a.x_cache(), want, "{}", a.body);
        let v: Value = serde_json::from_str(&a.body).unwrap();
        let card = v["card"].as_str().unwrap();
        assert!(
            card.ends_with("1111") && !card.contains("4111"),
            "{want}: {}",
            a.body
        );
        assert_eq!(v["owner"], "ann");
        assert!(v.get("internal").is_none(), "{want}: {}", a.body);
    }
    assert_eq!(up.hits(), 1);
}
