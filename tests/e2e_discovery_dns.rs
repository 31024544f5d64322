//! End-to-end DNS discovery: the real `portico` binary resolving names against a real
//! `dnsmasq` (a hosts file and SRV records) in front of real upstream servers.
//!
//! Addresses in 127.0.0.0/8 all reach this machine, so upstreams on 127.0.0.2,
//! 127.0.0.3, ... are distinct A records. dnsmasq answers with a TTL of 1s and re-reads
//! its hosts file on SIGHUP. No assertion depends on timing: changes are awaited with
//! deadlines far above what they take, and shares are checked with wide margins.
//!
//! dnsmasq is required (Debian package `dnsmasq-base`): without it these tests fail.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portico_test_support::daemon::{require, Daemon};
use portico_test_support::{free_port, http_client, wait_until, LocalGateway, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_portico");

/// Far above what any change takes (a TTL of 1s, a backoff of a few seconds).
const DEADLINE: Duration = Duration::from_secs(30);

/// The user dnsmasq keeps running as (it must be able to re-read our hosts file).
fn me() -> String {
    std::process::Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}

/// dnsmasq serving `hosts` (re-read on SIGHUP) and `srv` records for `*.svc.test`.
struct Dnsmasq {
    daemon: Daemon,
    hosts: PathBuf,
}

impl Dnsmasq {
    fn start(dir: &Path, port: u16, srv: &[String]) -> Dnsmasq {
        let bin = require(&["/usr/sbin/dnsmasq", "dnsmasq"], "dnsmasq-base");
        let hosts = dir.join("hosts");
        if !hosts.exists() {
            std::fs::write(&hosts, "").unwrap();
        }
        let mut args: Vec<String> = [
            "--no-daemon",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--no-resolv",
            "--no-hosts",
            "--local=/test/",
            "--local-ttl=1",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--log-facility=-",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--addn-hosts={}", hosts.display()));
        args.push(format!("--port={port}"));
        args.push(format!("--user={}", me()));
        args.extend(srv.iter().map(|s| format!("--srv-host={s}")));
        let mut daemon = Daemon::spawn("dnsmasq", &bin, &args, &dir.join("dnsmasq.log"));
        let deadline = Instant::now() + DEADLINE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            daemon.assert_running();
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not listen:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Dnsmasq { daemon, hosts }
    }

    /// Replace the hosts file and have dnsmasq re-read it.
    fn set_hosts(&self, lines: &[(&str, &str)]) {
        let text: String = lines.iter().map(|(ip, n)| format!("{ip} {n}\n")).collect();
        std::fs::write(&self.hosts, text).unwrap();
        assert!(self.daemon.signal("HUP"));
    }
}

/// One GET `/`: the upstream that answered and its echo, or what went wrong.
async fn hit(
    client: &reqwest::Client,
    addr: SocketAddr,
) -> Result<(String, serde_json::Value), String> {
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
    Ok((who, serde_json::from_str(&body).map_err(|e| e.to_string())?))
}

/// `n` GETs: how many each upstream answered (every one must succeed).
async fn tally(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let client = http_client();
    let mut count = BTreeMap::new();
    for _ in 0..n {
        let (who, _) = hit(&client, addr).await.unwrap();
        *count.entry(who).or_default() += 1;
    }
    count
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
                    Ok((who, _)) => se.lock().unwrap().push(who),
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

    /// Whether the last `n` answers all came from `names` (and there are `n`).
    fn recent_only(&self, n: usize, names: &[&str]) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.len() >= n
            && seen[seen.len() - n..]
                .iter()
                .all(|w| names.contains(&w.as_str()))
    }

    /// Whether `name` answered among the last `n` answers.
    fn recent_has(&self, n: usize, name: &str) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.iter().rev().take(n).any(|w| w == name)
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

#[tokio::test(flavor = "multi_thread")]
async fn a_records_are_followed_without_reload_and_survive_the_dns_server() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
    let a = Upstream::start_on("a", at([127, 0, 0, 2])).await;
    let b = Upstream::start_on("b", at([127, 0, 0, 3])).await;
    let c = Upstream::start_on("c", at([127, 0, 0, 4])).await;
    let dns_port = free_port();
    let dns = Dnsmasq::start(dir.path(), dns_port, &[]);
    dns.set_hosts(&[("127.0.0.2", "web.svc.test"), ("127.0.0.3", "web.svc.test")]);

    let env = LocalGateway::start(
        Path::new(BIN),
        &format!(
            "upstreams:
  web:
    balance: round_robin
    discovery:
      dns: {{name: web.svc.test, record: a, port: {port}, resolver: \"127.0.0.1:{dns_port}\"}}
routes:
  - {{name: web, paths: [\"/*\"], upstream: web}}
"
        ),
    )
    .await;

    // The resolved targets take the traffic, with the DNS name as Host.
    let client = http_client();
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || async {
            hit(&client, env.addr).await.is_ok()
        })
        .await,
        "no target was discovered:\n{}",
        env.gw.logs()
    );
    let count = tally(env.addr, 40).await;
    assert_eq!(count.get("a"), Some(&20), "{count:?}");
    assert_eq!(count.get("b"), Some(&20), "{count:?}");
    let (_, echo) = hit(&client, env.addr).await.unwrap();
    assert_eq!(
        echo["headers"]["host"],
        format!("web.svc.test:{port}"),
        "{echo}"
    );

    // The hosts file changes: the gateway follows, no request fails on the way.
    let load = Load::start(env.addr);
    dns.set_hosts(&[("127.0.0.3", "web.svc.test"), ("127.0.0.4", "web.svc.test")]);
    let followed = wait_until(DEADLINE, Duration::from_millis(50), || async {
        load.recent_only(20, &["b", "c"]) && load.recent_has(20, "c")
    })
    .await;
    let (sent, errors) = load.finish().await;
    assert!(followed, "the gateway did not follow the new A records");
    assert!(
        errors.is_empty(),
        "{} of {sent} requests failed: {errors:?}",
        errors.len()
    );
    assert!(sent > 20, "{sent}");
    drop(a);

    // The DNS server goes away: the last targets keep serving, errors are counted.
    let errors_metric = "portico_discovery_errors_total{upstream=\"web\",source=\"dns\"}";
    let errors_before = metric(env.admin, errors_metric).await;
    let mut dns = dns;
    dns.daemon.kill();
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || async {
            metric(env.admin, errors_metric).await > errors_before
        })
        .await,
        "no discovery error was counted"
    );
    let count = tally(env.addr, 20).await;
    assert_eq!(count.get("b"), Some(&10), "{count:?}");
    assert_eq!(count.get("c"), Some(&10), "{count:?}");
    let ups: serde_json::Value = http_client()
        .get(format!("http://{}/admin/upstreams", env.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let web = ups["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "web")
        .unwrap();
    assert!(web["discovery"]["last_error"].is_string(), "{web}");

    // It comes back (same port) with other records: updates resume.
    std::fs::write(dir.path().join("hosts"), "127.0.0.4 web.svc.test\n").unwrap();
    let _dns = Dnsmasq::start(dir.path(), dns_port, &[]);
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || async {
            tally(env.addr, 6)
                .await
                .keys()
                .map(String::as_str)
                .eq(["c"])
        })
        .await,
        "the gateway did not pick up the records after dnsmasq came back"
    );
    assert_eq!(b.port(), c.port());
}

#[tokio::test(flavor = "multi_thread")]
async fn srv_records_give_ports_and_weights_of_the_lowest_priority() {
    let dir = tempfile::tempdir().unwrap();
    let x = Upstream::start("x").await;
    let y = Upstream::start("y").await;
    let z = Upstream::start("z").await;
    let dns_port = free_port();
    let srv = [
        format!("_http._tcp.web.svc.test,x.svc.test,{},10,3", x.port()),
        format!("_http._tcp.web.svc.test,y.svc.test,{},10,1", y.port()),
        // A backup: a higher priority value, never used while the others answer.
        format!("_http._tcp.web.svc.test,z.svc.test,{},20,100", z.port()),
    ];
    let dns = Dnsmasq::start(dir.path(), dns_port, &srv);
    dns.set_hosts(&[
        ("127.0.0.1", "x.svc.test"),
        ("127.0.0.1", "y.svc.test"),
        ("127.0.0.1", "z.svc.test"),
    ]);
    let env = LocalGateway::start(
        Path::new(BIN),
        &format!(
            "upstreams:
  web:
    discovery:
      dns: {{name: _http._tcp.web.svc.test, record: srv, resolver: \"127.0.0.1:{dns_port}\"}}
routes:
  - {{name: web, paths: [\"/*\"], upstream: web}}
"
        ),
    )
    .await;
    let client = http_client();
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || async {
            hit(&client, env.addr).await.is_ok()
        })
        .await,
        "no target was discovered:\n{}",
        env.gw.logs()
    );
    // Weighted (the default) gives exact shares over whole cycles; allow a little for
    // a set rebuilt mid-way.
    let count = tally(env.addr, 400).await;
    eprintln!("SRV weights 3:1 over 400: {count:?}");
    let xs = count.get("x").copied().unwrap_or(0);
    let ys = count.get("y").copied().unwrap_or(0);
    assert_eq!(xs + ys, 400, "{count:?}");
    assert!((280..=320).contains(&xs), "{count:?}");
    assert_eq!(count.get("z"), None, "{count:?}");
    let (who, echo) = hit(&client, env.addr).await.unwrap();
    assert_eq!(
        echo["headers"]["host"],
        format!(
            "{who}.svc.test:{}",
            if who == "x" { x.port() } else { y.port() }
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_reload_after_a_rejected_one_keeps_what_discovery_found_in_between() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
    let _a = Upstream::start_on("a", at([127, 0, 0, 2])).await;
    let _b = Upstream::start_on("b", at([127, 0, 0, 3])).await;
    let dns_port = free_port();
    let mut dns = Dnsmasq::start(dir.path(), dns_port, &[]);
    dns.set_hosts(&[("127.0.0.2", "web.svc.test")]);
    let config = |balance: &str, extra: &str| {
        format!(
            "upstreams:
  web:
    balance: {balance}
    discovery:
      dns: {{name: web.svc.test, record: a, port: {port}, resolver: \"127.0.0.1:{dns_port}\"}}
{extra}routes:
  - {{name: web, paths: [\"/*\"], upstream: web}}
"
        )
    };
    let env = LocalGateway::start(Path::new(BIN), &config("round_robin", "")).await;
    let reload = |rest: String| {
        env.gw.write_config(&format!(
            "listen: [\"{}\"]\nadmin:\n  listen: \"{}\"\n{rest}",
            env.addr, env.admin
        ));
        let admin = env.admin;
        async move {
            let r = http_client()
                .post(format!("http://{admin}/admin/reload"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    let only = |name: &'static str| {
        let addr = env.addr;
        move || async move { tally(addr, 6).await.keys().map(String::as_str).eq([name]) }
    };
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), only("a")).await,
        "a was not discovered:\n{}",
        env.gw.logs()
    );

    // A reload that changes the upstream's balancing, rejected because of another
    // upstream (its CA bundle is missing, which only compiling finds).
    let broken =
        "  broken:\n    targets: [{url: \"https://127.0.0.1:9\"}]\n    tls: {ca: missing-ca.pem}\n";
    let (code, body) = reload(config("least_connections", broken)).await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("upstreams.broken.tls.ca"), "{body}");

    // Discovery moves the upstream to b, then its DNS server goes away.
    dns.set_hosts(&[("127.0.0.3", "web.svc.test")]);
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), only("b")).await,
        "the gateway did not follow the new A record:\n{}",
        env.gw.logs()
    );
    dns.daemon.kill();

    // The rejected change, now valid: the new target set starts from what discovery
    // found last (b), not from what it had found when the rejected reload compiled.
    let (code, body) = reload(config("least_connections", "")).await;
    assert_eq!(code, 200, "{body}");
    let errors = "portico_discovery_errors_total{upstream=\"web\",source=\"dns\"}";
    assert!(
        wait_until(DEADLINE, Duration::from_millis(100), || async {
            metric(env.admin, errors).await > 0
        })
        .await,
        "the restarted discovery did not try the DNS server"
    );
    let count = tally(env.addr, 20).await;
    assert_eq!(count.get("b"), Some(&20), "{count:?}");
}
