//! End-to-end aggregation: a route of kind `aggregate` calling real upstream servers,
//! fast, slow, failing and dependent (docs/traffic.md, "Aggregation").

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use portico_test_support::upstream::{handler, json_response};
use portico_test_support::{http_client, LocalGateway, Upstream};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_portico");

async fn start(body: &str) -> LocalGateway {
    LocalGateway::start(Path::new(BIN), body).await
}

/// Users: `/users/{id}` answers `{id, name, team}`; `/users/0` is 404.
async fn users() -> Upstream {
    Upstream::start_with(
        "users",
        handler(|req| async move {
            let path = req.uri().path().to_string();
            let id = path.trim_start_matches("/users/").to_string();
            if id == "0" {
                return json_response(StatusCode::NOT_FOUND, &json!({"error": "no such user"}));
            }
            json_response(
                StatusCode::OK,
                &json!({"id": id, "name": format!("user {id}"), "team": "t-9", "profile": {"lang": "en"}}),
            )
        }),
    )
    .await
}

/// Echoes what it was asked: path, query and a header, under `orders`.
async fn orders() -> Upstream {
    Upstream::start_with(
        "orders",
        handler(|req| async move {
            json_response(
                StatusCode::OK,
                &json!({
                    "path": req.uri().path(),
                    "query": req.uri().query(),
                    "tenant": req.headers().get("x-tenant").and_then(|v| v.to_str().ok()),
                    "request_id": req.headers().get("x-request-id").is_some(),
                    "profile": {"orders": 3},
                }),
            )
        }),
    )
    .await
}

async fn get(
    env: &LocalGateway,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Value) {
    let mut req = http_client().get(format!("http://{}{path}", env.addr));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let text = r.text().await.unwrap();
    (
        status,
        h,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn two_upstreams(u: &Upstream, o: &Upstream) -> String {
    format!(
        "upstreams:\n  users:\n    targets: [{{url: \"{}\"}}]\n  orders:\n    targets: [{{url: \"{}\"}}]\n",
        u.url(),
        o.url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_are_combined_under_their_keys_with_values_from_the_request() {
    let (u, o) = (users().await, orders().await);
    let env = start(&format!(
        "{}routes:\n  - name: dashboard\n    paths: [\"/dashboard/{{id}}\"]\n    aggregate:\n      calls:\n        - {{name: user, upstream: users, path: \"/users/{{id}}\"}}\n        - {{name: orders, upstream: orders, path: \"/orders?user={{id}}&since=${{query.since}}\", headers: {{x-tenant: \"${{header.x-tenant}}\"}}}}\n",
        two_upstreams(&u, &o)
    ))
    .await;
    let (code, h, v) = get(
        &env,
        "/dashboard/7?since=2024-01-01",
        &[("x-tenant", "acme")],
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(v["user"]["name"], "user 7", "{v}");
    assert_eq!(v["orders"]["path"], "/orders");
    assert_eq!(v["orders"]["query"], "user=7&since=2024-01-01");
    assert_eq!(v["orders"]["tenant"], "acme");
    assert_eq!(v["orders"]["request_id"], true);
    assert!(v.get("_aggregate").is_none(), "{v}");
    assert!(h.get("portico-aggregate-missing").is_none());
    // Values are encoded: a client cannot add path segments or query parameters.
    let (_, _, v) = get(&env, "/dashboard/7?since=x%26admin%3D1", &[]).await;
    assert_eq!(v["orders"]["query"], "user=7&since=x%26admin%3D1", "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn independent_calls_run_in_parallel() {
    // Each answers only once both have arrived: one after the other, neither would.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mk = |name: &'static str, b: Arc<tokio::sync::Barrier>| {
        handler(move |_req| {
            let b = b.clone();
            async move {
                let waited = tokio::time::timeout(Duration::from_secs(5), b.wait()).await;
                json_response(
                    StatusCode::OK,
                    &json!({"name": name, "together": waited.is_ok()}),
                )
            }
        })
    };
    let a = Upstream::start_with("a", mk("a", barrier.clone())).await;
    let b = Upstream::start_with("b", mk("b", barrier.clone())).await;
    let env = start(&format!(
        "upstreams:\n  a:\n    targets: [{{url: \"{}\"}}]\n  b:\n    targets: [{{url: \"{}\"}}]\nroutes:\n  - name: both\n    paths: [\"/both\"]\n    aggregate:\n      calls:\n        - {{name: a, upstream: a, path: /a}}\n        - {{name: b, upstream: b, path: /b}}\n",
        a.url(),
        b.url()
    ))
    .await;
    let (code, _, v) = get(&env, "/both", &[]).await;
    assert_eq!(code, 200);
    assert_eq!(v["a"]["together"], true, "{v}");
    assert_eq!(v["b"]["together"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_can_use_an_earlier_result() {
    let (u, o) = (users().await, orders().await);
    let env = start(&format!(
        "{}routes:\n  - name: team\n    paths: [\"/me/{{id}}\"]\n    aggregate:\n      calls:\n        - {{name: user, upstream: users, path: \"/users/{{id}}\"}}\n        - {{name: team, upstream: orders, path: \"/teams/${{steps.user.body.team}}/lang/${{steps.user.body.profile.lang}}\"}}\n",
        two_upstreams(&u, &o)
    ))
    .await;
    let (code, _, v) = get(&env, "/me/5", &[]).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["team"]["path"], "/teams/t-9/lang/en", "{v}");
    // The user is missing: the dependent call cannot run, and both are reported.
    let (code, h, v) = get(&env, "/me/0", &[]).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(h["portico-aggregate-missing"], "user,team");
    assert_eq!(v["user"]["error"]["status"], 404, "{v}");
    assert!(
        v["team"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("uses the result of `user`"),
        "{v}"
    );
    assert_eq!(v["_aggregate"]["missing"], json!(["user", "team"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_included_omitted_or_fatal_as_configured() {
    let (u, o) = (users().await, orders().await);
    let slow = Upstream::start("slow").await; // default handler: /sleep/MS
    let dead = Upstream::start("dead").await;
    let dead_url = dead.url();
    dead.stop().await;
    drop(dead);
    let env = start(&format!(
        "{}  slow:\n    targets: [{{url: \"{}\"}}]\n  dead:\n    targets: [{{url: \"{dead_url}\"}}]\nroutes:\n  - name: partial\n    paths: [\"/partial\"]\n    aggregate:\n      merge: deep\n      calls:\n        - {{name: user, upstream: users, path: /users/1}}\n        - {{name: orders, upstream: orders, path: /orders}}\n        - {{name: slow, upstream: slow, path: /sleep/3000, timeout: 200ms, on_error: omit}}\n        - {{name: dead, upstream: dead, path: /x}}\n  - name: strict\n    paths: [\"/strict\"]\n    aggregate:\n      on_error: fail\n      calls:\n        - {{name: user, upstream: users, path: /users/1}}\n        - {{name: slow, upstream: slow, path: /sleep/3000, timeout: 200ms}}\n",
        two_upstreams(&u, &o),
        slow.url()
    ))
    .await;
    let (code, h, v) = get(&env, "/partial", &[]).await;
    assert_eq!(code, 200, "{v}");
    // Deep merge: both objects' fields at the top, nested objects merged.
    assert_eq!(v["name"], "user 1", "{v}");
    assert_eq!(v["path"], "/orders");
    assert_eq!(v["profile"], json!({"lang": "en", "orders": 3}));
    assert_eq!(h["portico-aggregate-missing"], "slow,dead");
    assert_eq!(v["_aggregate"]["missing"], json!(["slow", "dead"]));
    // `dead` included as an error; `slow` omitted.
    assert!(
        v["_aggregate"]["errors"]["dead"]["message"].is_string(),
        "{v}"
    );
    assert!(v["_aggregate"]["errors"].get("slow").is_none(), "{v}");

    let (code, _, v) = get(&env, "/strict", &[]).await;
    assert_eq!(code, 504, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("call `slow`"),
        "{v}"
    );
}

#[test]
fn bad_aggregates_are_reported_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  users:\n    targets: [{url: \"http://127.0.0.1:1\"}]\nroutes:\n  - name: a\n    paths: [\"/a\"]\n    aggregate:\n      calls:\n        - {name: one, upstream: userz, path: \"http://evil.example/x\"}\n        - {name: two, upstream: users, path: \"/x/${steps.three.body.id}\"}\n        - {name: three, upstream: users, path: \"/y\", method: \"BAD METHOD\"}\n        - {name: three, upstream: users, path: \"/z/${nope}\"}\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    for needle in [
        "routes[0].aggregate.calls[0].upstream: upstream `userz` is not defined in `upstreams` (did you mean `users`?)",
        "routes[0].aggregate.calls[0].path: a call's path starts with `/`",
        "routes[0].aggregate.calls[1].path: `steps.three` is not a call listed before `two`",
        "routes[0].aggregate.calls[2].method: `BAD METHOD` is not an HTTP method",
        "routes[0].aggregate.calls[3].name: call `three` is listed twice",
        "routes[0].aggregate.calls[3].path: unknown template variable `${nope}`",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_path_value_fails_the_call_instead_of_changing_the_path() {
    let (u, o) = (users().await, orders().await);
    let env = start(&format!(
        "{}routes:\n  - name: by-query\n    paths: [\"/lookup\"]\n    aggregate:\n      calls:\n        - {{name: user, upstream: users, path: \"/users/${{query.id}}\"}}\n        - {{name: orders, upstream: orders, path: \"/orders/${{query.a}}/${{query.b}}?note=${{query.note}}\"}}\n",
        two_upstreams(&u, &o)
    ))
    .await;
    // Without `id`, the call is not sent as `/users/` (another resource).
    let (code, h, v) = get(&env, "/lookup?a=x&b=y", &[]).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(h["portico-aggregate-missing"], "user", "{v}");
    assert!(
        v["user"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("${query.id}"),
        "{v}"
    );
    // An empty query value is fine (it is a value); both path values are given.
    assert_eq!(v["orders"]["path"], "/orders/x/y", "{v}");
    // An empty segment cannot turn the path into `//host/...`.
    let (_, _, v) = get(&env, "/lookup?id=1&a=&b=evil.example", &[]).await;
    assert!(v["orders"]["error"].is_object(), "{v}");
    assert_eq!(u.hits(), 1, "only the request with an id reached users");
}
