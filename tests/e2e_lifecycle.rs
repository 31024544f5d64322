//! End-to-end lifecycle tests: reload (file watch, SIGHUP, admin API), rejected
//! configs, reloads under load, state kept across reloads, listener changes, SIGTERM
//! draining, access log, metrics, health/admin endpoints and `portico run` defaults.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_test_support::{
    free_port, h2c_client, http_client, raw_http, wait_until, Gateway, Upstream,
};
use serde_json::Value;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portico"))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Ports {
    http: u16,
    admin: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            http: free_port(),
            admin: free_port(),
        }
    }
    fn admin(&self) -> SocketAddr {
        local(self.admin)
    }
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }
    fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }
}

/// A config with one upstream `main` (the given targets) and the given `routes:` body.
fn config(p: &Ports, targets: &[String], routes: &str) -> String {
    let targets: Vec<String> = targets
        .iter()
        .map(|t| format!("{{url: \"{t}\"}}"))
        .collect();
    format!(
        r#"listen: ["127.0.0.1:{http}"]
admin: {{listen: "127.0.0.1:{admin}"}}
upstreams:
  main:
    targets: [{targets}]
routes:
{routes}"#,
        http = p.http,
        admin = p.admin,
        targets = targets.join(", "),
    )
}

async fn start(yaml: &str, p: &Ports) -> Gateway {
    Gateway::start_async(&bin(), yaml, p.admin()).await
}

async fn get_status(client: &reqwest::Client, url: &str) -> Option<u16> {
    let resp = client.get(url).send().await.ok()?;
    let status = resp.status().as_u16();
    // Read the body so the connection can be reused.
    let _ = resp.bytes().await;
    Some(status)
}

async fn get_json(url: &str) -> (u16, Value) {
    let resp = http_client().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"));
    (status, v)
}

async fn generation(p: &Ports) -> u64 {
    let (status, v) = get_json(&p.admin_url("/ready")).await;
    assert_eq!(status, 200, "{v}");
    v["generation"].as_u64().unwrap()
}

async fn wait_generation(p: &Ports, at_least: u64) -> bool {
    wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async { generation(p).await >= at_least },
    )
    .await
}

async fn metrics(p: &Ports) -> String {
    let resp = http_client()
        .get(p.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// The value of the sample whose name-and-labels part is exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Replaces the config file so that the file watcher cannot see it (same length, same
/// modification time): only an explicit reload (SIGHUP, admin API) picks it up.
fn write_unwatched(gw: &Gateway, yaml: &str) {
    let path = gw.config_path();
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(
        meta.len(),
        yaml.len() as u64,
        "write_unwatched needs a config of the same length"
    );
    let tmp = gw.dir().join(".unwatched.tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(yaml.as_bytes()).unwrap();
    f.set_modified(meta.modified().unwrap()).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(&tmp, path).unwrap();
    let after = std::fs::metadata(path).unwrap();
    assert_eq!(after.modified().unwrap(), meta.modified().unwrap());
}

async fn connect_refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::net::TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn route(name: &str, path: &str) -> String {
    format!("  - {{name: {name}, paths: [\"{path}\"], upstream: main}}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn editing_the_file_serves_the_new_route_within_a_second() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let gw = start(&config(&p, &[up.url()], &route("one", "/one")), &p).await;
    let client = http_client();
    assert_eq!(get_status(&client, &p.url("/one")).await, Some(200));
    assert_eq!(get_status(&client, &p.url("/two")).await, Some(404));

    let routes = format!("{}{}", route("one", "/one"), route("two", "/two"));
    let written = Instant::now();
    gw.write_config(&config(&p, &[up.url()], &routes));
    let mut seen = None;
    while written.elapsed() < Duration::from_secs(5) {
        if get_status(&client, &p.url("/two")).await == Some(200) {
            seen = Some(written.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = seen.unwrap_or_else(|| panic!("new route not served within 5 s\n{}", gw.logs()));
    eprintln!("new route served {took:?} after the config file was written");
    assert!(
        took < Duration::from_millis(1500),
        "the issue asks for a reload within one second of the write; took {took:?}"
    );
    assert_eq!(get_status(&client, &p.url("/one")).await, Some(200));
    assert_eq!(generation(&p).await, 2);
    let m = metrics(&p).await;
    assert_eq!(sample(&m, "portico_config_reloads_total"), Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_file() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let gw = start(&config(&p, &[up.url()], &route("r", "/aaa")), &p).await;
    let client = http_client();
    assert_eq!(get_status(&client, &p.url("/aaa")).await, Some(200));

    write_unwatched(&gw, &config(&p, &[up.url()], &route("r", "/bbb")));
    // The watcher (250 ms polling) must not have noticed: only SIGHUP reloads this one.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(generation(&p).await, 1, "the file watcher saw the change");
    assert_eq!(get_status(&client, &p.url("/bbb")).await, Some(404));

    assert!(gw.signal("HUP"));
    assert!(
        wait_generation(&p, 2).await,
        "SIGHUP did not reload\n{}",
        gw.logs()
    );
    assert_eq!(get_status(&client, &p.url("/bbb")).await, Some(200));
    assert_eq!(get_status(&client, &p.url("/aaa")).await, Some(404));
    assert!(gw.stderr().contains("SIGHUP"), "{}", gw.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_reload_answers_with_the_generation() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let gw = start(&config(&p, &[up.url()], &route("r", "/aaa")), &p).await;
    let client = http_client();
    assert_eq!(generation(&p).await, 1);

    write_unwatched(&gw, &config(&p, &[up.url()], &route("r", "/bbb")));
    let resp = client
        .post(p.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "reloaded", "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    // The swap is done when the answer arrives.
    assert_eq!(get_status(&client, &p.url("/bbb")).await, Some(200));
    assert_eq!(get_status(&client, &p.url("/aaa")).await, Some(404));

    let v: Value = client
        .post(p.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["generation"], 3, "{v}");
    assert_eq!(generation(&p).await, 3);
    let (_, routes) = get_json(&p.admin_url("/admin/routes")).await;
    assert_eq!(routes["generation"], 3, "{routes}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_file_is_rejected_and_the_old_routes_keep_serving() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let good = config(&p, &[up.url()], &route("one", "/one"));
    let gw = start(&good, &p).await;
    let client = http_client();

    // routes[1] has a misspelt key; its line is the 3rd of that route.
    let bad = config(
        &p,
        &[up.url()],
        &format!(
            "{}  - name: two\n    paths: [\"/two\"]\n    mehtods: [GET]\n    upstream: main\n",
            route("one", "/one")
        ),
    );
    let bad_line = bad.lines().position(|l| l.contains("mehtods")).unwrap() + 1;
    gw.write_config(&bad);
    // The watcher rejects it and logs why.
    let logged = tokio::task::block_in_place(|| {
        gw.wait_for_log("routes[1].mehtods", Duration::from_secs(5))
    });
    assert!(logged, "the rejection reason was not logged\n{}", gw.logs());
    assert!(gw.stderr().contains("rejected"), "{}", gw.stderr());

    let resp = client
        .post(p.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["status"], 422, "{v}");
    let problems = v["error"]["problems"].as_array().unwrap();
    let pb = problems
        .iter()
        .find(|x| x["path"] == "routes[1].mehtods")
        .unwrap_or_else(|| panic!("no problem for routes[1].mehtods: {v}"));
    assert_eq!(pb["line"], bad_line, "{pb}");
    assert_eq!(pb["column"], 5, "{pb}");
    assert!(
        pb["hint"].as_str().unwrap_or("").contains("methods")
            || pb["message"].as_str().unwrap().contains("methods"),
        "{pb}"
    );
    assert!(
        pb["file"].as_str().unwrap().ends_with("portico.yaml"),
        "{pb}"
    );

    // A semantic error (unknown upstream) is rejected the same way.
    let bad2 = config(
        &p,
        &[up.url()],
        "  - {name: one, paths: [\"/one\"], upstream: nope}\n",
    );
    gw.write_config(&bad2);
    let resp = client
        .post(p.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["path"] == "routes[0].upstream" && x["line"].is_u64()),
        "{v}"
    );

    // The old snapshot keeps serving; the generation did not move.
    assert_eq!(get_status(&client, &p.url("/one")).await, Some(200));
    assert_eq!(get_status(&client, &p.url("/two")).await, Some(404));
    assert_eq!(generation(&p).await, 1);
    let m = metrics(&p).await;
    assert!(
        sample(&m, "portico_config_reload_failures_total").unwrap_or(0.0) >= 2.0,
        "{m}"
    );

    // Fixing the file recovers.
    gw.write_config(&config(
        &p,
        &[up.url()],
        &format!("{}{}", route("one", "/one"), route("two", "/two")),
    ));
    assert!(wait_generation(&p, 2).await, "{}", gw.logs());
    assert_eq!(get_status(&client, &p.url("/two")).await, Some(200));
}

fn versioned(p: &Ports, up: &str, version: &str) -> String {
    config(
        p,
        &[up.to_string()],
        &format!(
            "  - name: main\n    paths: [\"/*\"]\n    upstream: main\n    plugins:\n      response-transformer: {{headers: {{set: {{x-config: \"{version}\"}}}}}}\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_reloads_under_continuous_traffic_lose_no_request() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let gw = start(&versioned(&p, &up.url(), "v1"), &p).await;

    let stop = Arc::new(AtomicBool::new(false));
    let v1 = Arc::new(AtomicUsize::new(0));
    let v2 = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (stop, v1, v2) = (stop.clone(), v1.clone(), v2.clone());
        let base = p.url("");
        tasks.push(tokio::spawn(async move {
            // One keep-alive client per task; one task speaks h2c.
            let client = if t == 3 { h2c_client() } else { http_client() };
            let mut done = 0usize;
            let mut failures: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) && done < 5000 {
                let path = if done.is_multiple_of(5) {
                    "/sleep/20".to_string()
                } else {
                    format!("/load/{t}/{done}")
                };
                done += 1;
                match client.get(format!("{base}{path}")).send().await {
                    Ok(r) => {
                        let status = r.status();
                        let version = r
                            .headers()
                            .get("x-config")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        match (status.as_u16(), r.bytes().await) {
                            (200, Ok(_)) => match version.as_deref() {
                                Some("v1") => {
                                    v1.fetch_add(1, Ordering::Relaxed);
                                }
                                Some("v2") => {
                                    v2.fetch_add(1, Ordering::Relaxed);
                                }
                                other => failures.push(format!("{path}: x-config {other:?}")),
                            },
                            (s, body) => failures.push(format!("{path}: {s} {body:?}")),
                        }
                    }
                    Err(e) => failures.push(format!("{path}: {e:?}")),
                }
            }
            (done, failures)
        }));
    }

    for i in 0..20u64 {
        let version = if i.is_multiple_of(2) { "v2" } else { "v1" };
        gw.write_config(&versioned(&p, &up.url(), version));
        assert!(
            wait_generation(&p, i + 2).await,
            "reload {} did not happen\n{}",
            i + 1,
            gw.logs()
        );
        // Let some traffic run on this generation.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut failures = Vec::new();
    for t in tasks {
        let (done, f) = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap();
        total += done;
        failures.extend(f);
    }
    eprintln!(
        "{total} requests during 20 reloads: {} saw v1, {} saw v2, {} failed",
        v1.load(Ordering::Relaxed),
        v2.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(v1.load(Ordering::Relaxed) > 0 && v2.load(Ordering::Relaxed) > 0);
    assert!(total >= 40, "too little traffic: {total}");
    assert_eq!(generation(&p).await, 21);
    let m = metrics(&p).await;
    assert_eq!(
        sample(&m, "portico_config_reloads_total"),
        Some(20.0),
        "{m}"
    );
    // The last config written (v1) is what is served now.
    let resp = http_client().get(p.url("/final")).send().await.unwrap();
    assert_eq!(resp.headers()["x-config"], "v1");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unrelated_reload_keeps_health_state_metrics_and_pools() {
    let live = Upstream::start("live").await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let p = Ports::new();
    let cfg = |other_path: &str| {
        format!(
            r#"listen: ["127.0.0.1:{http}"]
admin: {{listen: "127.0.0.1:{admin}"}}
upstreams:
  pool:
    targets: [{{url: "{live}"}}, {{url: "{dead}"}}]
    health: {{passive: {{ejection_time: 5m}}}}
routes:
  - {{name: main, paths: ["/main/*"], upstream: pool}}
  - {{name: other, paths: ["{other_path}"], plugins: {{echo: {{}}}}}}
"#,
            http = p.http,
            admin = p.admin,
            live = live.url(),
        )
    };
    let gw = start(&cfg("/other"), &p).await;
    let client = http_client();
    for i in 0..8 {
        let resp = client
            .get(p.url(&format!("/main/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.headers()["x-upstream"], "live");
        resp.bytes().await.unwrap();
    }
    let dead_target = |v: &Value| -> Value {
        v["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == "pool")
            .unwrap()["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["url"] == dead.as_str())
            .unwrap()
            .clone()
    };
    let (_, before) = get_json(&p.admin_url("/admin/upstreams")).await;
    let t = dead_target(&before);
    assert_eq!(t["healthy"], false, "dead target not ejected: {before}");
    assert_eq!(t["ejections"], 1, "{before}");
    let series =
        r#"portico_requests_total{route="main",method="GET",status="2xx",upstream="pool"}"#;
    assert_eq!(sample(&metrics(&p).await, series), Some(8.0));
    let conns = live.connections();

    // Reload with a change to an unrelated route.
    gw.write_config(&cfg("/other-renamed"));
    assert!(wait_generation(&p, 2).await, "{}", gw.logs());
    assert_eq!(
        get_status(&client, &p.url("/other-renamed")).await,
        Some(200)
    );

    let (_, after) = get_json(&p.admin_url("/admin/upstreams")).await;
    let t = dead_target(&after);
    assert_eq!(t["healthy"], false, "ejection lost on reload: {after}");
    assert_eq!(t["ejections"], 1, "{after}");
    assert_eq!(
        sample(&metrics(&p).await, series),
        Some(8.0),
        "counter reset by reload"
    );
    // The pooled upstream connection is reused across the reload (checked on the first
    // request after it: back-to-back requests may legitimately open another one).
    let resp = client.get(p.url("/main/after/0")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    assert_eq!(
        live.connections(),
        conns,
        "upstream pool not kept across the reload"
    );
    for i in 1..4 {
        let resp = client
            .get(p.url(&format!("/main/after/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(sample(&metrics(&p).await, series), Some(12.0));
    let (_, later) = get_json(&p.admin_url("/admin/upstreams")).await;
    let t = dead_target(&later);
    assert_eq!(t["ejections"], 1, "{later}");
    assert_eq!(t["healthy"], false, "{later}");
}

/// `POST /admin/reload`: the status and the answer.
async fn admin_reload(p: &Ports) -> (u16, Value) {
    let r = http_client()
        .post(p.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The admin view of upstream `name`'s circuit breaker.
async fn breaker_of(p: &Ports, name: &str) -> Value {
    let (_, v) = get_json(&p.admin_url("/admin/upstreams")).await;
    v["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("no upstream {name}: {v}"))["circuit_breaker"]
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_reload_leaves_breakers_and_pools_to_the_next_one() {
    let live = Upstream::start("live").await;
    let flaky = Upstream::start("flaky").await;
    let p = Ports::new();
    // `main` and `flaky` as first configured, or with other connection and breaker
    // settings; `extra` adds upstreams, `other` renames an unrelated route.
    let cfg = |changed: bool, extra: &str, other: &str| {
        format!(
            r#"listen: ["127.0.0.1:{http}"]
admin: {{listen: "127.0.0.1:{admin}"}}
upstreams:
  main:
    targets: [{{url: "{live}"}}]
    max_idle_connections: {idle}
  flaky:
    targets: [{{url: "{flaky}"}}]
    circuit_breaker: {{consecutive_failures: {failures}, open_for: 5m}}
{extra}routes:
  - {{name: main, paths: ["/main/*"], upstream: main}}
  - {{name: flaky, paths: ["/flaky/*"], upstream: flaky, strip_prefix: true}}
  - {{name: other, paths: ["{other}"], plugins: {{echo: {{}}}}}}
"#,
            http = p.http,
            admin = p.admin,
            live = live.url(),
            flaky = flaky.url(),
            idle = if changed { 3 } else { 16 },
            failures = if changed { 3 } else { 2 },
        )
    };
    let gw = start(&cfg(false, "", "/other"), &p).await;
    let client = http_client();

    // Two 502s open `flaky`'s breaker; `main` has a pooled connection.
    for _ in 0..2 {
        assert_eq!(
            get_status(&client, &p.url("/flaky/status/502")).await,
            Some(502)
        );
    }
    assert_eq!(
        get_status(&client, &p.url("/flaky/status/502")).await,
        Some(503)
    );
    assert_eq!(breaker_of(&p, "flaky").await["state"], "open");
    assert_eq!(get_status(&client, &p.url("/main/a")).await, Some(200));
    let conns = live.connections();

    // A reload that changes both upstreams' settings, rejected because of a third
    // upstream (its CA bundle is missing, which only compiling finds).
    let broken =
        "  broken:\n    targets: [{url: \"https://127.0.0.1:9\"}]\n    tls: {ca: missing-ca.pem}\n";
    gw.write_config(&cfg(true, broken, "/other"));
    let (code, v) = admin_reload(&p).await;
    assert_eq!(code, 422, "{v}");
    assert!(v.to_string().contains("upstreams.broken.tls.ca"), "{v}");
    assert_eq!(breaker_of(&p, "flaky").await["state"], "open");

    // The next reload, which changes neither upstream, keeps the open breaker and the
    // pooled connection.
    gw.write_config(&cfg(false, "", "/other-renamed"));
    let (code, v) = admin_reload(&p).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        get_status(&client, &p.url("/other-renamed")).await,
        Some(200)
    );
    let breaker = breaker_of(&p, "flaky").await;
    assert_eq!(
        breaker["state"], "open",
        "breaker closed by the reload: {breaker}"
    );
    assert_eq!(breaker["transitions"]["open"], 1, "{breaker}");
    let hits = flaky.hits();
    assert_eq!(
        get_status(&client, &p.url("/flaky/status/502")).await,
        Some(503)
    );
    assert_eq!(flaky.hits(), hits, "an open breaker let a request through");
    assert_eq!(get_status(&client, &p.url("/main/b")).await, Some(200));
    assert_eq!(
        live.connections(),
        conns,
        "upstream pool not kept across the reload"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_listen_opens_the_new_port_and_drains_the_old_one() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let gw = start(&config(&p, &[up.url()], &route("all", "/*")), &p).await;
    let old = local(p.http);

    // A slow request in flight on the old listener.
    let slow_url = p.url("/sleep/1500");
    let slow = tokio::spawn(async move {
        let resp = http_client().get(slow_url).send().await?;
        let status = resp.status().as_u16();
        let body = resp.text().await?;
        Ok::<_, reqwest::Error>((status, body))
    });
    assert!(
        wait_until(
            Duration::from_secs(3),
            Duration::from_millis(10),
            || async { up.hits() >= 1 }
        )
        .await
    );

    let p2 = Ports {
        http: free_port(),
        admin: p.admin,
    };
    gw.write_config(&config(&p2, &[up.url()], &route("all", "/*")));
    let client = http_client();
    assert!(
        wait_until(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || async { get_status(&http_client(), &p2.url("/new")).await == Some(200) }
        )
        .await,
        "new listener not serving\n{}",
        gw.logs()
    );
    assert!(
        wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
            connect_refused(old)
        })
        .await,
        "the removed listener still accepts connections"
    );
    assert!(
        !slow.is_finished(),
        "the slow request should still be in flight"
    );
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("/sleep/1500"), "{body}");
    assert_eq!(get_status(&client, &p2.url("/again")).await, Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let mut gw = start(
        &format!(
            "{}shutdown: {{grace: 10s}}\n",
            config(&p, &[up.url()], &route("all", "/*"))
        ),
        &p,
    )
    .await;
    let slow_url = p.url("/sleep/1500");
    let slow = tokio::spawn(async move {
        let resp = http_client().get(slow_url).send().await?;
        let status = resp.status().as_u16();
        let body = resp.text().await?;
        Ok::<_, reqwest::Error>((status, body))
    });
    assert!(
        wait_until(
            Duration::from_secs(3),
            Duration::from_millis(10),
            || async { up.hits() >= 1 }
        )
        .await
    );
    assert!(gw.signal("TERM"));
    let addr = local(p.http);
    assert!(
        wait_until(Duration::from_secs(3), Duration::from_millis(10), || {
            connect_refused(addr)
        })
        .await,
        "new connections still accepted after SIGTERM"
    );
    assert!(
        gw.try_exit_status().is_none(),
        "the process exited before its in-flight request finished"
    );
    assert!(
        !slow.is_finished(),
        "the slow request should still be in flight"
    );
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let exit = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)))
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", gw.logs()));
    assert_eq!(exit.code(), Some(0), "{}", gw.logs());
    // The drained request was logged.
    assert!(gw.stdout().contains("/sleep/1500"), "{}", gw.stdout());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_when_idle_exits_0_promptly() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let mut gw = start(&config(&p, &[up.url()], &route("all", "/*")), &p).await;
    // An idle keep-alive connection must not hold the shutdown back.
    let client = http_client();
    assert_eq!(get_status(&client, &p.url("/x")).await, Some(200));
    let sent = Instant::now();
    assert!(gw.signal("TERM"));
    let exit = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)))
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", gw.logs()));
    let took = sent.elapsed();
    eprintln!("idle gateway exited {took:?} after SIGTERM");
    assert_eq!(exit.code(), Some(0), "{}", gw.logs());
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_has_one_json_line_per_request_with_the_documented_fields() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let gw = start(&config(&p, &[up.url()], &route("api", "/api/*")), &p).await;
    let client = http_client();

    let resp = client
        .post(p.url("/api/items?x=1"))
        .header("x-request-id", "test-req-1")
        .body("hello world")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "test-req-1");
    let body1 = resp.bytes().await.unwrap();

    let resp = client.get(p.url("/api/thing")).send().await.unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!generated.is_empty());
    let body2 = resp.bytes().await.unwrap();

    let resp = client.get(p.url("/nowhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let id3 = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body3 = resp.bytes().await.unwrap();

    // A chunked upload (no Content-Length) counts the bytes actually received.
    let raw = raw_http(
        local(p.http),
        b"POST /api/chunked HTTP/1.1\r\nHost: chunky\r\nX-Request-Id: chunked-1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");

    let lines = || -> Vec<String> {
        gw.stdout()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            let n = lines().len();
            async move { n >= 4 }
        })
        .await,
        "access log lines missing\n{}",
        gw.logs()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let recs: Vec<Value> = lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(recs.len(), 4, "one line per request: {recs:#?}");
    let find = |id: &str| -> &Value {
        recs.iter()
            .find(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}: {recs:#?}"))
    };

    let r = find("test-req-1");
    for key in [
        "time",
        "request_id",
        "client_ip",
        "method",
        "host",
        "path",
        "protocol",
        "route",
        "upstream",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "upstream_ms",
    ] {
        assert!(r.get(key).is_some(), "missing {key}: {r}");
    }
    assert!(r["time"].as_str().unwrap().ends_with('Z'), "{r}");
    assert_eq!(r["client_ip"], "127.0.0.1", "{r}");
    assert_eq!(r["method"], "POST", "{r}");
    assert_eq!(r["host"], format!("127.0.0.1:{}", p.http), "{r}");
    assert_eq!(r["path"], "/api/items", "{r}");
    assert_eq!(r["query"], "x=1", "{r}");
    assert_eq!(r["protocol"], "HTTP/1.1", "{r}");
    assert_eq!(r["route"], "api", "{r}");
    assert_eq!(r["upstream"], up.url(), "{r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["bytes_in"], 11, "{r}");
    assert_eq!(r["bytes_out"], body1.len(), "{r}");
    assert!(r["duration_ms"].as_f64().unwrap() >= 0.0, "{r}");
    let upstream_ms = r["upstream_ms"].as_f64().unwrap();
    assert!(
        upstream_ms >= 0.0 && upstream_ms <= r["duration_ms"].as_f64().unwrap(),
        "{r}"
    );

    let r = find(&generated);
    assert_eq!(r["method"], "GET", "{r}");
    assert_eq!(r["path"], "/api/thing", "{r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["bytes_in"], 0, "{r}");
    assert_eq!(r["bytes_out"], body2.len(), "{r}");

    let r = find(&id3);
    assert_eq!(r["status"], 404, "{r}");
    assert_eq!(r["route"], Value::Null, "{r}");
    assert_eq!(r["upstream"], Value::Null, "{r}");
    assert_eq!(r["error"], "no_route", "{r}");
    assert_eq!(r["bytes_out"], body3.len(), "{r}");

    let r = find("chunked-1");
    assert_eq!(r["host"], "chunky", "{r}");
    assert_eq!(r["bytes_in"], 11, "chunked request body: {r}");

    // Logs go to stderr, not into the access log.
    assert!(!gw.stderr().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_by_route_method_status_and_upstream() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let routes = "  - {name: api, paths: [\"/api/*\"], strip_prefix: true, upstream: main}\n";
    let _gw = start(&config(&p, &[up.url()], routes), &p).await;
    let client = http_client();
    for _ in 0..3 {
        assert_eq!(get_status(&client, &p.url("/api/x")).await, Some(200));
    }
    let resp = client.post(p.url("/api/y")).body("z").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    assert_eq!(
        get_status(&client, &p.url("/api/status/503")).await,
        Some(503)
    );

    let resp = http_client()
        .get(p.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let m = resp.text().await.unwrap();
    let labels = |method: &str, status: &str| {
        format!(
            r#"portico_requests_total{{route="api",method="{method}",status="{status}",upstream="main"}}"#
        )
    };
    assert_eq!(sample(&m, &labels("GET", "2xx")), Some(3.0), "{m}");
    assert_eq!(sample(&m, &labels("POST", "2xx")), Some(1.0), "{m}");
    assert_eq!(sample(&m, &labels("GET", "5xx")), Some(1.0), "{m}");
    assert!(m.contains("# TYPE portico_requests_total counter"), "{m}");
    assert!(
        m.contains("# TYPE portico_request_duration_seconds histogram"),
        "{m}"
    );
    let h = r#"route="api",method="GET",upstream="main""#;
    assert_eq!(
        sample(
            &m,
            &format!("portico_request_duration_seconds_bucket{{{h},le=\"+Inf\"}}")
        ),
        Some(4.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!("portico_request_duration_seconds_count{{{h}}}")
        ),
        Some(4.0),
        "{m}"
    );
    assert!(
        sample(&m, &format!("portico_request_duration_seconds_sum{{{h}}}")).unwrap() > 0.0,
        "{m}"
    );
    // Buckets are cumulative.
    let buckets: Vec<f64> = m
        .lines()
        .filter(|l| l.starts_with(&format!("portico_request_duration_seconds_bucket{{{h},")))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() > 3, "{m}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert!(sample(&m, "portico_open_connections").is_some(), "{m}");
    assert!(
        m.contains("portico_upstream_target_healthy{upstream=\"main\""),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_ready_and_admin_api_shapes() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let yaml = format!(
        "{}plugins:\n  request-size-limit: {{max_body: 1MiB}}\n",
        config(
            &p,
            &[up.url()],
            "  - name: api\n    paths: [\"/api/*\", \"/v1/{id}\"]\n    methods: [GET, POST]\n    upstream: main\n    plugins:\n      response-transformer: {headers: {set: {x-a: b}}}\n",
        )
    );
    let _gw = start(&yaml, &p).await;

    let (s, v) = get_json(&p.admin_url("/health")).await;
    assert_eq!(s, 200);
    assert_eq!(v["status"], "ok", "{v}");
    let (s, v) = get_json(&p.admin_url("/ready")).await;
    assert_eq!(s, 200);
    assert_eq!(v["status"], "ready", "{v}");
    assert_eq!(v["generation"], 1, "{v}");

    let (s, v) = get_json(&p.admin_url("/admin/routes")).await;
    assert_eq!(s, 200);
    assert_eq!(v["generation"], 1, "{v}");
    let routes = v["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1, "{v}");
    let r = &routes[0];
    assert_eq!(r["name"], "api", "{r}");
    assert_eq!(r["paths"], serde_json::json!(["/api/*", "/v1/{id}"]), "{r}");
    assert_eq!(r["methods"], serde_json::json!(["GET", "POST"]), "{r}");
    assert_eq!(r["upstream"], "main", "{r}");
    let plugins = r["plugins"].as_array().unwrap();
    let names: Vec<&str> = plugins
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"request-size-limit") && names.contains(&"response-transformer"),
        "{r}"
    );
    for pl in plugins {
        assert!(
            pl["priority"].is_number() && pl["stage"].is_string(),
            "{pl}"
        );
    }
    let source = |n: &str| plugins.iter().find(|x| x["name"] == n).unwrap()["source"].clone();
    assert_eq!(source("request-size-limit"), "global", "{r}");
    assert_eq!(source("response-transformer"), "route", "{r}");

    let (s, one) = get_json(&p.admin_url("/admin/routes/api")).await;
    assert_eq!(s, 200);
    assert_eq!(&one, r);
    let (s, err) = get_json(&p.admin_url("/admin/routes/nope")).await;
    assert_eq!(s, 404);
    assert!(err["error"]["code"].is_string(), "{err}");

    let (s, v) = get_json(&p.admin_url("/admin/upstreams")).await;
    assert_eq!(s, 200);
    let ups = v["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 1, "{v}");
    assert_eq!(ups[0]["name"], "main", "{v}");
    let targets = ups[0]["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1, "{v}");
    assert_eq!(targets[0]["url"], up.url(), "{v}");
    assert_eq!(targets[0]["weight"], 1, "{v}");
    assert_eq!(targets[0]["healthy"], true, "{v}");

    let (s, err) = get_json(&p.admin_url("/admin/nothing-here")).await;
    assert_eq!(s, 404);
    assert!(err["error"].is_object(), "{err}");
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(local(port)).is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_without_config_serves_the_builtin_demo_route() {
    if !port_free(8080) || !port_free(9080) {
        eprintln!("SKIPPED run_without_config_serves_the_builtin_demo_route: 127.0.0.1:8080 or :9080 is busy on this machine");
        return;
    }
    let mut gw = Gateway::spawn_with(&bin(), &["run"], None, &[]);
    let ready = tokio::task::block_in_place(|| gw.wait_ready(local(9080), Duration::from_secs(20)));
    if let Err(e) = ready {
        if e.contains("cannot listen") || e.contains("in use") {
            eprintln!("SKIPPED run_without_config_serves_the_builtin_demo_route: ports taken meanwhile: {e}");
            return;
        }
        panic!("portico run (defaults) did not become ready: {e}");
    }
    assert!(!gw.dir().join("portico.yaml").exists());
    let (s, v) = get_json("http://127.0.0.1:8080/hello?name=you").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["route"], "demo", "{v}");
    assert_eq!(v["path"], "/hello", "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("Portico"),
        "{v}"
    );
    let (s, _) = get_json("http://127.0.0.1:9080/admin/routes").await;
    assert_eq!(s, 200);
    assert!(gw.signal("TERM"));
    let exit = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    assert_eq!(exit.and_then(|e| e.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn run_uses_portico_yaml_from_the_working_directory() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let yaml = config(&p, &[up.url()], &route("fromfile", "/from-file"));
    let gw = tokio::task::block_in_place(|| {
        Gateway::start_with_args(&bin(), &["run"], Some(&yaml), p.admin())
    });
    let resp = http_client().get(p.url("/from-file")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "up");
    let (_, v) = get_json(&p.admin_url("/admin/routes")).await;
    assert_eq!(v["routes"][0]["name"], "fromfile", "{v}");
    // The file found in the working directory is watched like a --config file.
    gw.write_config(&config(
        &p,
        &[up.url()],
        &format!(
            "{}{}",
            route("fromfile", "/from-file"),
            route("more", "/more")
        ),
    ));
    assert!(wait_generation(&p, 2).await, "{}", gw.logs());
    assert_eq!(get_status(&http_client(), &p.url("/more")).await, Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_flight_request_finishes_on_the_snapshot_it_started_with() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let gw = start(&versioned(&p, &up.url(), "v1"), &p).await;
    let slow_url = p.url("/sleep/1000");
    let slow = tokio::spawn(async move {
        let resp = http_client().get(slow_url).send().await?;
        let version = resp.headers().get("x-config").cloned();
        let status = resp.status().as_u16();
        resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, version))
    });
    assert!(
        wait_until(
            Duration::from_secs(3),
            Duration::from_millis(10),
            || async { up.hits() >= 1 }
        )
        .await
    );
    gw.write_config(&versioned(&p, &up.url(), "v2"));
    assert!(wait_generation(&p, 2).await, "{}", gw.logs());
    let resp = http_client().get(p.url("/now")).send().await.unwrap();
    assert_eq!(resp.headers()["x-config"], "v2");
    assert!(
        !slow.is_finished(),
        "the slow request should still be in flight"
    );
    let (status, version) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        version.as_ref().and_then(|v| v.to_str().ok()),
        Some("v1"),
        "the in-flight request must finish with the policies it started with"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_waiting_after_the_grace_period() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let mut gw = start(
        &format!(
            "{}shutdown: {{grace: 500ms}}\n",
            config(&p, &[up.url()], &route("all", "/*"))
        ),
        &p,
    )
    .await;
    let slow_url = p.url("/sleep/8000");
    let slow = tokio::spawn(async move { http_client().get(slow_url).send().await });
    assert!(
        wait_until(
            Duration::from_secs(3),
            Duration::from_millis(10),
            || async { up.hits() >= 1 }
        )
        .await
    );
    let sent = Instant::now();
    assert!(gw.signal("TERM"));
    // Far sooner than the 8 s request: the 500 ms grace period bounds the drain.
    let exit =
        tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(5))).unwrap_or_else(|| {
            panic!(
                "still running 5 s after SIGTERM (grace 500ms)\n{}",
                gw.logs()
            )
        });
    eprintln!("exited {:?} after SIGTERM with grace 500ms", sent.elapsed());
    assert_eq!(exit.code(), Some(0), "{}", gw.logs());
    // The cut request fails on the client side rather than hanging.
    let res = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the client request must end when the gateway exits")
        .unwrap();
    assert!(
        res.is_err() || res.as_ref().is_ok_and(|r| r.status() != 200),
        "{res:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_can_go_to_a_file_and_records_http2() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let yaml = format!(
        "{}access_log: {{path: access.log}}\n",
        config(&p, &[up.url()], &route("all", "/*"))
    );
    let gw = start(&yaml, &p).await;
    let resp = h2c_client()
        .get(p.url("/h2?x=y"))
        .header("x-request-id", "h2-request")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let len = resp.bytes().await.unwrap().len();
    let file = gw.dir().join("access.log");
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            let found = read().contains("h2-request");
            async move { found }
        })
        .await,
        "no access-log line in {}\n{}",
        file.display(),
        gw.logs()
    );
    let text = read();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let r: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(r["protocol"], "HTTP/2", "{r}");
    assert_eq!(r["path"], "/h2", "{r}");
    assert_eq!(r["query"], "x=y", "{r}");
    assert_eq!(r["bytes_out"], len, "{r}");
    assert!(gw.stdout().trim().is_empty(), "stdout: {}", gw.stdout());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_to_a_busy_port_is_rejected_and_the_old_listener_keeps_serving() {
    let up = Upstream::start("up").await;
    let p = Ports::new();
    let gw = start(&config(&p, &[up.url()], &route("all", "/*")), &p).await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p2 = Ports {
        http: busy.local_addr().unwrap().port(),
        admin: p.admin,
    };
    gw.write_config(&config(&p2, &[up.url()], &route("all", "/*")));
    let resp = http_client()
        .post(p.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["path"] == "listen[0]"),
        "{v}"
    );
    assert_eq!(
        get_status(&http_client(), &p.url("/still")).await,
        Some(200)
    );
    assert_eq!(generation(&p).await, 1);
    drop(busy);
}
