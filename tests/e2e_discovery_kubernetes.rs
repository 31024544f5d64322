//! End-to-end: Kubernetes discovery (docs/upstreams.md, "kubernetes") against a test
//! API server built from the documented responses: `GET
//! /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=...` (an
//! `EndpointSliceList` with `metadata.resourceVersion`) and the same with
//! `watch=true&resourceVersion=...` streaming `{"type": ..., "object": ...}` lines. A
//! watch from a version the server no longer has is answered `410 Gone` (a `Status`
//! with reason `Expired`), either as an `ERROR` event on a 200 stream, as the API
//! server does, or as the HTTP status of the watch request.
//!
//! No assertion depends on timing: each change is awaited by polling with a deadline
//! far above what it takes.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use parking_lot::Mutex;
use portico_test_support::upstream::{handler, json_response, BoxBody, BoxError};
use portico_test_support::{http_client, wait_until, LocalGateway, Upstream};
use serde_json::{json, Value};
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_portico");
const TOKEN: &str = "tok-123";
const SELECTOR: &str = "kubernetes.io/service-name=web";

#[derive(Default)]
struct State {
    rv: u64,
    slices: BTreeMap<String, Value>,
    /// Watch events by resource version.
    events: Vec<(u64, Value)>,
    /// Watches from a version below this are answered 410.
    oldest: u64,
    /// 410 as the HTTP status of the watch request (else as an `ERROR` event).
    gone_as_http: bool,
    lists: usize,
    watches: usize,
    unauthorized: usize,
}

#[derive(Clone)]
struct FakeApi {
    state: Arc<Mutex<State>>,
    bump: Arc<watch::Sender<u64>>,
}

fn gone(rv: u64) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("too old resource version: {rv}"), "reason": "Expired", "code": 410})
}

fn slice(name: &str, port: u16, ready: Option<bool>) -> Value {
    let conditions = match ready {
        Some(r) => json!({"ready": r, "serving": r, "terminating": false}),
        None => json!({}),
    };
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9, "protocol": "TCP"},
                  {"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": conditions,
                       "nodeName": "node-1", "zone": "z1"}]
    })
}

impl FakeApi {
    fn new() -> FakeApi {
        FakeApi {
            state: Arc::new(Mutex::new(State {
                rv: 1000,
                ..State::default()
            })),
            bump: Arc::new(watch::channel(0).0),
        }
    }

    fn wake(&self) {
        self.bump.send_modify(|v| *v += 1);
    }

    /// Add or replace a slice, as a watch event.
    fn apply(&self, mut obj: Value) {
        let mut s = self.state.lock();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        let kind = if s.slices.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.events
            .push((rv, json!({"type": kind, "object": obj.clone()})));
        s.slices.insert(name, obj);
        drop(s);
        self.wake();
    }

    /// Change the slices with no event for it (history compacted): open watches end
    /// (with an `ERROR` 410 event unless `gone_as_http`) and must re-list to see it.
    fn change_silently(&self, gone_as_http: bool, f: impl FnOnce(&mut BTreeMap<String, Value>)) {
        let mut s = self.state.lock();
        s.rv += 1;
        let rv = s.rv;
        f(&mut s.slices);
        for v in s.slices.values_mut() {
            v["metadata"]["resourceVersion"] = json!(rv.to_string());
        }
        s.oldest = rv;
        s.gone_as_http = gone_as_http;
        drop(s);
        self.wake();
    }

    async fn serve(&self) -> Upstream {
        let me = self.clone();
        let h = handler(move |req| {
            let me = me.clone();
            async move { me.answer(req) }
        });
        Upstream::start_with("apiserver", h).await
    }

    fn answer(&self, req: http::Request<hyper::body::Incoming>) -> Response<BoxBody> {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {TOKEN}")) {
            self.state.lock().unauthorized += 1;
            return json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "Unauthorized", "reason": "Unauthorized", "code": 401}),
            );
        }
        if req.uri().path() != "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices" {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"kind": "Status", "code": 404}),
            );
        }
        let params: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| {
                let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                (k.to_owned(), v.into_owned())
            })
            .collect();
        assert_eq!(
            params.get("labelSelector").map(String::as_str),
            Some(SELECTOR)
        );
        if params.get("watch").map(String::as_str) != Some("true") {
            let mut s = self.state.lock();
            s.lists += 1;
            let items: Vec<Value> = s.slices.values().cloned().collect();
            return json_response(
                StatusCode::OK,
                &json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                        "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            );
        }
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        {
            let mut s = self.state.lock();
            s.watches += 1;
            if from < s.oldest && s.gone_as_http {
                return json_response(StatusCode::GONE, &gone(from));
            }
        }
        // The stream: events after `from`, until the history no longer covers it.
        let me = self.clone();
        let rx = self.bump.subscribe();
        let stream = futures_util::stream::unfold(
            (me, rx, from, false),
            |(me, mut rx, mut cursor, done)| async move {
                if done {
                    return None;
                }
                loop {
                    {
                        let s = me.state.lock();
                        if cursor < s.oldest {
                            if s.gone_as_http {
                                return None;
                            }
                            let ev = json!({"type": "ERROR", "object": gone(cursor)});
                            return Some((line(&ev), (me.clone(), rx, cursor, true)));
                        }
                        if let Some((rv, ev)) = s.events.iter().find(|(rv, _)| *rv > cursor) {
                            cursor = *rv;
                            let out = line(ev);
                            drop(s);
                            return Some((out, (me, rx, cursor, false)));
                        }
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        let body = BodyExt::boxed(StreamBody::new(
            stream.map(|b| Ok::<_, BoxError>(Frame::data(b))),
        ));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    }
}

fn line(v: &Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
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

async fn follows(client: &reqwest::Client, addr: SocketAddr, want: &[&str]) -> bool {
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async { answered(client, addr, 30).await == set(want) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_slices_are_followed_through_watches_and_relists() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let api = FakeApi::new();
    api.apply(slice("web-a", a.port(), Some(true)));
    api.apply(slice("web-b", b.port(), Some(false)));
    // No `ready` condition: counts as ready.
    api.apply(slice("web-c", c.port(), None));
    let server = api.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let env = LocalGateway::start(
        Path::new(BIN),
        &format!(
            "upstreams:
  web:
    discovery:
      kubernetes:
        service: web
        namespace: shop
        port: http
        api_server: \"{}\"
        token_file: \"{}\"
routes:
  - {{name: web, paths: [\"/*\"], upstream: web}}
",
            server.url(),
            token.display()
        ),
    )
    .await;
    let client = http_client();

    assert!(
        follows(&client, env.addr, &["a", "c"]).await,
        "the ready endpoints should take traffic"
    );

    // A MODIFIED event: b becomes ready.
    api.apply(slice("web-b", b.port(), Some(true)));
    assert!(
        follows(&client, env.addr, &["a", "b", "c"]).await,
        "a MODIFIED slice should be followed"
    );

    // The history is compacted and a is removed with no event: the open watch ends
    // with an ERROR 410 event and the watcher must re-list to see it.
    let lists = api.state.lock().lists;
    api.change_silently(false, |m| {
        m.remove("web-a");
    });
    assert!(
        follows(&client, env.addr, &["b", "c"]).await,
        "a 410 Gone watch event should lead to a re-list"
    );
    assert!(api.state.lock().lists > lists);

    // Again, now with the watch ending quietly and the new watch request answered
    // 410 as its HTTP status.
    let lists = api.state.lock().lists;
    api.change_silently(true, |m| {
        let mut s = slice("web-a", a.port(), Some(true));
        s["metadata"]["resourceVersion"] = json!("0");
        m.insert("web-a".into(), s);
    });
    assert!(
        follows(&client, env.addr, &["a", "b", "c"]).await,
        "a watch answered 410 Gone should lead to a re-list"
    );
    assert!(api.state.lock().lists > lists);

    // Watching goes on after the re-list.
    api.apply(slice("web-c", c.port(), Some(false)));
    assert!(
        follows(&client, env.addr, &["a", "b"]).await,
        "events after a re-list should be followed"
    );
    let s = api.state.lock();
    assert_eq!(s.unauthorized, 0, "every request should carry the token");
    assert!(s.watches >= 3);
}
