//! End-to-end: the gateway's own service registry (docs/upstreams.md, "registry").
//! Real upstream servers register through the admin API with a short TTL; traffic
//! follows registrations, missed heartbeats and deregistrations without a reload.
//!
//! No assertion depends on timing: each change is awaited by polling with a deadline
//! far above what it takes (a 2s TTL is checked within 15s).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use portico_test_support::{http_client, wait_until, LocalGateway, Upstream};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_portico");

const CONFIG: &str = "upstreams:
  users:
    discovery:
      registry: {service: users}
routes:
  - {name: users, paths: [\"/*\"], upstream: users}
";

/// The upstream servers that answered `n` GETs (any non-200 is recorded as its status).
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

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

async fn put(client: &reqwest::Client, admin: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let r = client
        .put(format!("http://{admin}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_json(client: &reqwest::Client, admin: SocketAddr, path: &str) -> Value {
    let r = client
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn registered_instances_take_traffic_until_they_expire_or_leave() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let env = LocalGateway::start(Path::new(BIN), CONFIG).await;
    let client = http_client();

    // Nothing registered: nowhere to send the request.
    let none = answered(&client, env.addr, 1).await;
    assert!(none.iter().all(|s| s.starts_with("status 5")), "{none:?}");

    let (st, ra) = put(
        &client,
        env.admin,
        "/admin/registry/users",
        json!({"address": a.addr().to_string(), "ttl": "6s", "metadata": {"zone": "z1"}}),
    )
    .await;
    assert_eq!(st, 200, "{ra}");
    assert_eq!(ra["expires_in"], 6, "{ra}");
    let id_a = ra["id"].as_str().unwrap().to_owned();
    let (st, rb) = put(
        &client,
        env.admin,
        "/admin/registry/users",
        json!({"address": b.url(), "ttl": 2}),
    )
    .await;
    assert_eq!(st, 200, "{rb}");
    let id_b = rb["id"].as_str().unwrap().to_owned();

    // Registering the same address again renews it under the same id.
    let (_, again) = put(
        &client,
        env.admin,
        "/admin/registry/users",
        json!({"address": a.addr().to_string(), "ttl": "6s", "metadata": {"zone": "z1"}}),
    )
    .await;
    assert_eq!(again["id"], id_a.as_str());

    // a (TTL 6s) heartbeats every 400ms from now on; b (TTL 2s) never does.
    let hb = {
        let (client, admin, id) = (client.clone(), env.admin, id_a.clone());
        tokio::spawn(async move {
            loop {
                let r = client
                    .put(format!("http://{admin}/admin/registry/users/{id}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        })
    };

    // Both take traffic (the first request after registration may race the task).
    assert!(
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { answered(&client, env.addr, 20).await == set(&["a", "b"]) }
        )
        .await,
        "both registered instances should take traffic"
    );

    let listed = get_json(&client, env.admin, "/admin/registry/users").await;
    let ids: BTreeSet<&str> = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from([id_a.as_str(), id_b.as_str()]));

    // b misses its heartbeats: it drops out, a stays.
    assert!(
        wait_until(
            Duration::from_secs(15),
            Duration::from_millis(100),
            || async { answered(&client, env.addr, 20).await == set(&["a"]) }
        )
        .await,
        "b's registration should expire"
    );
    let all = get_json(&client, env.admin, "/admin/registry").await;
    let users = all["services"]["users"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{all}");
    assert_eq!(users[0]["id"], id_a.as_str());
    assert_eq!(users[0]["metadata"]["zone"], "z1");
    // A heartbeat for the expired one is refused: it must register again.
    let (st, e) = put(
        &client,
        env.admin,
        &format!("/admin/registry/users/{id_b}"),
        json!({}),
    )
    .await;
    assert_eq!(st, 404, "{e}");

    let ups = get_json(&client, env.admin, "/admin/upstreams").await;
    assert_eq!(
        ups["upstreams"][0]["discovery"]["source"], "registry",
        "{ups}"
    );

    // Deregistration takes a out at once.
    hb.abort();
    let r = client
        .delete(format!("http://{}/admin/registry/users/{id_a}", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let listed = get_json(&client, env.admin, "/admin/registry/users").await;
    assert_eq!(listed["instances"], json!([]));
    assert!(
        wait_until(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || async {
                answered(&client, env.addr, 5)
                    .await
                    .iter()
                    .all(|s| s.starts_with("status 5"))
            }
        )
        .await,
        "a deregistered instance should take no more traffic"
    );
    let r = client
        .delete(format!("http://{}/admin/registry/users/{id_a}", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(a.hits() > 0 && b.hits() > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_registrations_are_refused_naming_the_field() {
    let env = LocalGateway::start(Path::new(BIN), CONFIG).await;
    let client = http_client();
    let cases = [
        (json!({}), "address"),
        (json!({"address": "no-port"}), "address"),
        (json!({"address": "ftp://h:1"}), "address"),
        (json!({"address": "http://h:1/path"}), "address"),
        (json!({"address": 5}), "address"),
        (json!({"address": "h:1", "ttl": "0s"}), "ttl"),
        (json!({"address": "h:1", "ttl": "2h"}), "ttl"),
        (json!({"address": "h:1", "ttl": "soon"}), "ttl"),
        (json!({"address": "h:1", "weight": 0}), "weight"),
        (json!({"address": "h:1", "weight": -1}), "weight"),
        (json!({"address": "h:1", "metadata": {"k": 1}}), "metadata"),
        (json!({"address": "h:1", "extra": true}), "extra"),
    ];
    for (body, field) in cases {
        let (st, e) = put(&client, env.admin, "/admin/registry/users", body.clone()).await;
        assert_eq!(st, 400, "{body} -> {e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{body}: `{msg}` should name `{field}`");
    }
    let (st, e) = put(
        &client,
        env.admin,
        "/admin/registry/bad%20name",
        json!({"address": "h:1"}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(e["error"]["field"], "service", "{e}");

    let r = client
        .put(format!("http://{}/admin/registry/users", env.admin))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(format!("http://{}/admin/registry/users", env.admin))
        .json(&json!({"address": "h:1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // Nothing was registered by all that.
    let all = get_json(&client, env.admin, "/admin/registry").await;
    assert_eq!(all, json!({"services": {}}));
}
