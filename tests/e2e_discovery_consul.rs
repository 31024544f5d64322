//! End-to-end: Consul discovery (docs/upstreams.md, "consul") against a test server
//! that implements Consul's `GET /v1/health/service/:service` as documented: the
//! entries `{Node, Service, Checks}`, the `X-Consul-Index` header, `passing`, and
//! blocking until the index moves past `index` or `wait` elapses.
//!
//! No assertion depends on timing: each change is awaited by polling with a deadline
//! far above what it takes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use parking_lot::Mutex;
use portico_test_support::upstream::{handler, json_response, BoxBody};
use portico_test_support::{http_client, wait_until, LocalGateway, Upstream};
use serde_json::{json, Value};
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_portico");

/// One registered service instance.
#[derive(Clone)]
struct Inst {
    id: String,
    /// `Service.Address` (empty: the node's address is used).
    address: String,
    port: u16,
    status: &'static str,
}

/// A query string and the token sent with it.
type Query = (String, Option<String>);

#[derive(Default)]
struct Catalog {
    index: u64,
    instances: Vec<Inst>,
}

/// A Consul agent's health endpoint over a catalog the test edits.
#[derive(Clone)]
struct FakeConsul {
    catalog: Arc<Mutex<Catalog>>,
    bump: Arc<watch::Sender<u64>>,
    /// Queries seen: (query string, token).
    seen: Arc<Mutex<Vec<Query>>>,
}

impl FakeConsul {
    fn new(index: u64, instances: Vec<Inst>) -> FakeConsul {
        FakeConsul {
            catalog: Arc::new(Mutex::new(Catalog { index, instances })),
            bump: Arc::new(watch::channel(index).0),
            seen: Arc::default(),
        }
    }

    /// Change the catalog; the index moves on and blocked queries return.
    fn edit(&self, f: impl FnOnce(&mut Vec<Inst>)) {
        let mut c = self.catalog.lock();
        f(&mut c.instances);
        c.index += 1;
        self.bump.send_replace(c.index);
    }

    fn body(&self, service: &str, passing: bool) -> (u64, Value) {
        let c = self.catalog.lock();
        let entries: Vec<Value> = c
            .instances
            .iter()
            .filter(|i| !passing || i.status == "passing")
            .map(|i| {
                json!({
                    "Node": {"ID": "40e4a748-2192-161a-0510-9bf59fe950b5", "Node": "node-1",
                             "Address": "127.0.0.1", "Datacenter": "dc1",
                             "TaggedAddresses": {"lan": "127.0.0.1", "wan": "127.0.0.1"}, "Meta": {}},
                    "Service": {"ID": i.id, "Service": service, "Tags": ["v1"],
                                "Address": i.address, "Port": i.port,
                                "Weights": {"Passing": 1, "Warning": 1}, "Meta": {}},
                    "Checks": [
                        {"Node": "node-1", "CheckID": "serfHealth", "Name": "Serf Health Status",
                         "Status": "passing", "Notes": "", "Output": "", "ServiceID": "", "ServiceName": ""},
                        {"Node": "node-1", "CheckID": format!("service:{}", i.id), "Name": "http",
                         "Status": i.status, "Notes": "", "Output": "", "ServiceID": i.id, "ServiceName": service}
                    ]
                })
            })
            .collect();
        (c.index, Value::Array(entries))
    }

    async fn serve_on(&self, addr: SocketAddr) -> Upstream {
        let me = self.clone();
        let h = handler(move |req| {
            let me = me.clone();
            async move { me.answer(req).await }
        });
        Upstream::spawn("consul", addr, None, Some(h)).await
    }

    async fn answer(&self, req: http::Request<hyper::body::Incoming>) -> Response<BoxBody> {
        let path = req.uri().path().to_owned();
        let Some(service) = path.strip_prefix("/v1/health/service/") else {
            return json_response(StatusCode::NOT_FOUND, &json!("not found"));
        };
        let query = req.uri().query().unwrap_or("").to_owned();
        let token = req
            .headers()
            .get("x-consul-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.seen.lock().push((query.clone(), token));
        let param = |k: &str| {
            query
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_owned())
        };
        let passing = param("passing").is_some_and(|v| v != "false");
        let index: u64 = param("index").and_then(|v| v.parse().ok()).unwrap_or(0);
        let wait = param("wait")
            .and_then(|w| w.strip_suffix('s').and_then(|s| s.parse::<u64>().ok()))
            .map_or(Duration::from_secs(300), Duration::from_secs);
        // Block while the index has not moved past the client's.
        let mut rx = self.bump.subscribe();
        if index > 0 {
            let _ = tokio::time::timeout(wait, rx.wait_for(|&i| i > index)).await;
        }
        let (idx, body) = self.body(service, passing);
        let mut resp = json_response(StatusCode::OK, &body);
        resp.headers_mut()
            .insert("x-consul-index", idx.to_string().parse().unwrap());
        resp
    }
}

fn inst(id: &str, address: &str, up: &Upstream) -> Inst {
    Inst {
        id: id.into(),
        address: address.into(),
        port: up.port(),
        status: "passing",
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

async fn answered(client: &reqwest::Client, addr: SocketAddr, n: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let r = client.get(format!("http://{addr}/x")).send().await.unwrap();
        let who = match r.headers().get("x-upstream") {
            Some(v) if r.status() == 200 => v.to_str().unwrap().to_owned(),
            _ => format!("status {}", r.status().as_u16()),
        };
        r.bytes().await.unwrap();
        seen.insert(who);
    }
    seen
}

async fn discovery_errors(client: &reqwest::Client, admin: SocketAddr) -> u64 {
    let text = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| {
            l.starts_with("portico_discovery_errors_total{upstream=\"web\",source=\"consul\"}")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_instances_are_followed_without_reload() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    // a is registered without a service address: the node's is used.
    let consul = FakeConsul::new(100, vec![inst("a", "", &a), inst("b", "127.0.0.1", &b)]);
    let server = consul.serve_on("127.0.0.1:0".parse().unwrap()).await;
    let consul_addr = server.addr();
    let env = LocalGateway::start(
        Path::new(BIN),
        &format!(
            "upstreams:
  web:
    discovery:
      consul: {{address: \"http://{consul_addr}\", service: web, token: s3cret, wait: 5s}}
routes:
  - {{name: web, paths: [\"/*\"], upstream: web}}
"
        ),
    )
    .await;
    let client = http_client();

    assert!(
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { answered(&client, env.addr, 20).await == set(&["a", "b"]) }
        )
        .await,
        "the passing instances should take traffic"
    );

    // From here on a client keeps sending requests: none may fail.
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let load = {
        let (failures, sent, addr) = (failures.clone(), sent.clone(), env.addr);
        tokio::spawn(async move {
            let client = http_client();
            loop {
                let ok = match client.get(format!("http://{addr}/load")).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // An instance added.
    consul.edit(|v| v.push(inst("c", "127.0.0.1", &c)));
    assert!(
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { answered(&client, env.addr, 30).await == set(&["a", "b", "c"]) }
        )
        .await,
        "a new instance should be followed"
    );
    // An instance whose check turns critical.
    consul.edit(|v| v[1].status = "critical");
    assert!(
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { answered(&client, env.addr, 30).await == set(&["a", "c"]) }
        )
        .await,
        "a critical instance should leave rotation"
    );
    // The gateway used blocking queries with the token.
    {
        let seen = consul.seen.lock();
        assert!(seen.iter().all(|(_, t)| t.as_deref() == Some("s3cret")));
        assert!(
            seen.iter().any(|(q, _)| q.contains("passing=true")
                && q.contains("index=10")
                && q.contains("wait=5s")),
            "{:?}",
            *seen
        );
    }

    // Consul goes away: the last targets stay, errors are counted.
    server.stop().await;
    assert!(
        wait_until(
            Duration::from_secs(15),
            Duration::from_millis(100),
            || async { discovery_errors(&client, env.admin).await > 0 }
        )
        .await,
        "a failed query should be counted"
    );
    assert_eq!(answered(&client, env.addr, 30).await, set(&["a", "c"]));
    let ups: Value = client
        .get(format!("http://{}/admin/upstreams", env.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        ups["upstreams"][0]["discovery"]["last_error"].is_string(),
        "{ups}"
    );

    // Consul comes back (a fresh one: its index starts lower) with b passing again.
    let back = FakeConsul::new(
        3,
        vec![
            inst("a", "", &a),
            inst("b", "127.0.0.1", &b),
            inst("c", "127.0.0.1", &c),
        ],
    );
    let _server = back.serve_on(consul_addr).await;
    assert!(
        wait_until(
            Duration::from_secs(40),
            Duration::from_millis(100),
            || async { answered(&client, env.addr, 30).await == set(&["a", "b", "c"]) }
        )
        .await,
        "discovery should resume when Consul is back"
    );
    // And follows changes again, from the new server's lower index.
    back.edit(|v| v.retain(|i| i.id != "a"));
    assert!(
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { answered(&client, env.addr, 30).await == set(&["b", "c"]) }
        )
        .await,
        "a removed instance should be followed after the restart"
    );

    load.abort();
    assert!(sent.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request may fail while instances come and go or Consul is down"
    );
}
