//! End-to-end etcd discovery: the real `portico` binary following a key prefix in a
//! real `etcd` (v3, through its JSON gateway) in front of real upstream servers. Keys
//! are written through the same gateway, as an operator's tooling would.
//!
//! No assertion depends on timing: changes are awaited with deadlines far above what
//! they take. etcd is required (Debian package `etcd-server`): without it these tests
//! fail.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use portico_test_support::daemon::{require, Daemon};
use portico_test_support::{free_port, http_client, wait_until, LocalGateway, Upstream};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_portico");

/// Far above what any change takes (a watch event, a backoff of a few seconds).
const DEADLINE: Duration = Duration::from_secs(40);

/// A single-member etcd on 127.0.0.1.
struct Etcd {
    daemon: Daemon,
    url: String,
}

impl Etcd {
    /// Starts etcd with its data in `dir` (kept across restarts) and waits until it
    /// answers.
    async fn start(dir: &Path, client: u16, peer: u16) -> Etcd {
        let bin = require(&["/usr/bin/etcd", "etcd"], "etcd-server");
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args = vec![
            "--name=portico-test".to_string(),
            format!("--data-dir={}", dir.join("data").display()),
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=portico-test={peer_url}"),
            "--logger=zap".to_string(),
            "--log-outputs=stderr".to_string(),
        ];
        let mut daemon = Daemon::spawn("etcd", &bin, &args, &dir.join("etcd.log"));
        let deadline = Instant::now() + DEADLINE;
        loop {
            daemon.assert_running();
            let r = http_client()
                .post(format!("{url}/v3/kv/range"))
                .json(&json!({"key": B64.encode("/")}))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer:\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Etcd { daemon, url }
    }

    async fn call(&self, path: &str, body: Value, token: Option<&str>) -> Value {
        let mut req = http_client()
            .post(format!("{}{path}", self.url))
            .json(&body);
        if let Some(t) = token {
            req = req.header("authorization", t);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{path}: {v}");
        v
    }

    async fn put(&self, key: &str, value: &str) {
        self.put_as(key, value, None).await;
    }

    async fn put_as(&self, key: &str, value: &str, token: Option<&str>) {
        let body = json!({"key": B64.encode(key), "value": B64.encode(value)});
        self.call("/v3/kv/put", body, token).await;
    }

    async fn delete(&self, key: &str) {
        self.call("/v3/kv/deleterange", json!({"key": B64.encode(key)}), None)
            .await;
    }
}

/// One GET `/`: the upstream that answered, or what went wrong.
async fn hit(client: &reqwest::Client, addr: SocketAddr) -> Result<String, String> {
    let r = client
        .get(format!("http://{addr}/"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let who = r
        .headers()
        .get("x-upstream")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = r.text().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    Ok(who)
}

/// `n` GETs: how many each upstream answered (every one must succeed).
async fn tally(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let client = http_client();
    let mut count = BTreeMap::new();
    for _ in 0..n {
        *count.entry(hit(&client, addr).await.unwrap()).or_default() += 1;
    }
    count
}

/// Whether `n` GETs are all answered, by exactly the upstreams `names`.
async fn served_by(addr: SocketAddr, n: usize, names: &[&str]) -> bool {
    let client = http_client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        match hit(&client, addr).await {
            Ok(w) => {
                seen.insert(w);
            }
            Err(_) => return false,
        }
    }
    seen.iter().map(String::as_str).eq(names.iter().copied())
}

/// Requests sent one after another in the background, each answer recorded.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, se, er) = (stop.clone(), seen.clone(), errors.clone());
        let task = tokio::spawn(async move {
            let client = http_client();
            // Bounded in count and time whatever happens to the test.
            let end = Instant::now() + Duration::from_secs(180);
            for _ in 0..100_000 {
                if s.load(Ordering::Relaxed) || Instant::now() > end {
                    break;
                }
                match hit(&client, addr).await {
                    Ok(who) => se.lock().unwrap().push(who),
                    Err(e) => er.lock().unwrap().push(e),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Load {
            stop,
            seen,
            errors,
            task,
        }
    }

    /// Whether the last `n` answers all came from `names`, and `must` is among them.
    fn recent(&self, n: usize, names: &[&str], must: &str) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.len() >= n && {
            let last = &seen[seen.len() - n..];
            last.iter().all(|w| names.contains(&w.as_str())) && last.iter().any(|w| w == must)
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let n = self.seen.lock().unwrap().len();
        (n, self.errors.lock().unwrap().clone())
    }
}

/// A counter of the admin `/metrics` page.
async fn metric(admin: SocketAddr, line_prefix: &str) -> u64 {
    let text = http_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{line_prefix}` in\n{text}"))
}

fn config(endpoints: &str, extra: &str) -> String {
    format!(
        "upstreams:
  web:
    balance: round_robin
    discovery:
      etcd: {{endpoints: [{endpoints}], prefix: /services/web/{extra}}}
routes:
  - {{name: web, paths: [\"/*\"], upstream: web}}
"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefix_is_listed_watched_and_kept_through_an_etcd_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let (client_port, peer_port) = (free_port(), free_port());
    let etcd = Etcd::start(dir.path(), client_port, peer_port).await;
    etcd.put("/services/web/a", &format!("127.0.0.1:{}", a.port()))
        .await;
    // Outside the prefix: ignored.
    etcd.put("/services/webshop/x", &format!("127.0.0.1:{}", c.port()))
        .await;

    // The first endpoint answers nothing: the next one is tried.
    let dead = format!("\"http://127.0.0.1:{}\"", free_port());
    let env = LocalGateway::start(
        Path::new(BIN),
        &config(&format!("{dead}, \"{}\"", etcd.url), ""),
    )
    .await;

    // The initial list.
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || served_by(
            env.addr,
            4,
            &["a"]
        ))
        .await,
        "the listed key was not used:\n{}",
        env.gw.logs()
    );

    // A PUT adds a target, a DELETE removes one, without a reload or a failed request.
    let load = Load::start(env.addr);
    let b_value = json!({"url": format!("http://127.0.0.1:{}", b.port()), "weight": 1});
    etcd.put("/services/web/b", &b_value.to_string()).await;
    let added = wait_until(DEADLINE, Duration::from_millis(50), || async {
        load.recent(10, &["a", "b"], "b")
    })
    .await;
    etcd.delete("/services/web/a").await;
    let removed = wait_until(DEADLINE, Duration::from_millis(50), || async {
        load.recent(20, &["b"], "b")
    })
    .await;
    let (sent, errors) = load.finish().await;
    assert!(added, "the PUT target was not used");
    assert!(removed, "the DELETEd target kept receiving requests");
    assert!(
        errors.is_empty(),
        "{} of {sent} requests failed: {errors:?}",
        errors.len()
    );

    // A bad value is skipped and named in the log; the rest keeps working.
    etcd.put("/services/web/bad", "not a target").await;
    assert!(
        env.gw.wait_for_log("/services/web/bad", DEADLINE),
        "the bad key was not named:\n{}",
        env.gw.logs()
    );
    assert!(served_by(env.addr, 6, &["b"]).await);

    // etcd stops: the last targets stay in use and errors are counted.
    let errors_metric = "portico_discovery_errors_total{upstream=\"web\",source=\"etcd\"}";
    let before = metric(env.admin, errors_metric).await;
    let mut etcd = etcd;
    etcd.daemon.stop(Duration::from_secs(10));
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || async {
            metric(env.admin, errors_metric).await > before
        })
        .await,
        "no discovery error was counted"
    );
    let count = tally(env.addr, 10).await;
    assert_eq!(count.get("b"), Some(&10), "{count:?}");

    // etcd comes back with the same data and port: the watch resumes.
    let etcd = Etcd::start(dir.path(), client_port, peer_port).await;
    etcd.put("/services/web/c", &format!("127.0.0.1:{}", c.port()))
        .await;
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || served_by(
            env.addr,
            6,
            &["b", "c"]
        ))
        .await,
        "the key written after the restart was not used:\n{}",
        env.gw.logs()
    );
    etcd.delete("/services/web/c").await;
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || served_by(
            env.addr,
            6,
            &["b"]
        ))
        .await,
        "the watch did not resume after the restart:\n{}",
        env.gw.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_are_used_when_etcd_requires_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = Upstream::start("a").await;
    let etcd = Etcd::start(dir.path(), free_port(), free_port()).await;
    etcd.call(
        "/v3/auth/user/add",
        json!({"name": "root", "password": "s3cret"}),
        None,
    )
    .await;
    etcd.call(
        "/v3/auth/user/grant",
        json!({"user": "root", "role": "root"}),
        None,
    )
    .await;
    etcd.call("/v3/auth/enable", json!({}), None).await;
    let token = etcd
        .call(
            "/v3/auth/authenticate",
            json!({"name": "root", "password": "s3cret"}),
            None,
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_string();
    etcd.put_as(
        "/services/web/a",
        &format!("127.0.0.1:{}", a.port()),
        Some(&token),
    )
    .await;

    let env = LocalGateway::start(
        Path::new(BIN),
        &config(
            &format!("\"{}\"", etcd.url),
            ", username: root, password: s3cret",
        ),
    )
    .await;
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || served_by(
            env.addr,
            4,
            &["a"]
        ))
        .await,
        "nothing was discovered with credentials:\n{}",
        env.gw.logs()
    );
}
