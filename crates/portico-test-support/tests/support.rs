//! Exercises the test-support helpers against real sockets.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use portico_test_support::client::{raw_http, tls_client_h1};
use portico_test_support::upstream::{default_handler, handler, json_response};
use portico_test_support::{h2c_client, http_client, tls_client, Ca, Gateway, Upstream};
use serde_json::Value;

#[tokio::test]
async fn echo_over_http1_and_h2c() {
    let up = Upstream::start("alpha").await;
    let resp = http_client()
        .post(format!("{}/some/path?x=1&y=two", up.url()))
        .header("x-multi", "a")
        .header("x-multi", "b")
        .header("X-Single", "S")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "alpha");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["upstream"], "alpha");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/some/path");
    assert_eq!(v["query"], "x=1&y=two");
    assert_eq!(v["uri"], "/some/path?x=1&y=two");
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["headers"]["x-multi"], serde_json::json!(["a", "b"]));
    assert_eq!(v["headers"]["x-single"], "S");
    assert_eq!(v["body_len"], 5);
    assert_eq!(v["body"], "hello");

    let v: Value = h2c_client()
        .get(format!("{}/h2", up.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["version"], "HTTP/2.0");
    assert_eq!(v["path"], "/h2");
    assert_eq!(v["query"], Value::Null);
    assert_eq!(v["body"], "");
    assert_eq!(up.hits(), 2);
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn status_and_sleep() {
    let up = Upstream::start("s").await;
    let c = http_client();
    let resp = c
        .get(format!("{}/status/503", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["path"], "/status/503");
    let resp = c
        .get(format!("{}/status/204", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(resp.bytes().await.unwrap().is_empty());
    let resp = c
        .get(format!("{}/status/abc", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let t = Instant::now();
    let resp = c
        .get(format!("{}/sleep/150", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn bytes_are_streamed() {
    let up = Upstream::start("dl").await;
    let n = 10 * 1024 * 1024 + 7;
    let resp = http_client()
        .get(format!("{}/bytes/{n}", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.content_length(), Some(n));
    let mut stream = resp.bytes_stream();
    let (mut total, mut chunks) = (0u64, 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.iter().all(|&b| b == b'x'));
        total += chunk.len() as u64;
        chunks += 1;
    }
    assert_eq!(total, n);
    assert!(
        chunks > 1,
        "expected a streamed body, got {chunks} chunk(s)"
    );

    let resp = h2c_client()
        .get(format!("{}/bytes/100?chunked", up.url()))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("content-length").is_none());
    assert_eq!(resp.bytes().await.unwrap().len(), 100);

    let t = Instant::now();
    let resp = http_client()
        .get(format!("{}/slowbytes/4096/50", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().len(), 4096);
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn upload_is_counted() {
    let up = Upstream::start("ul").await;
    for client in [http_client(), h2c_client()] {
        let chunks = (0..80).map(|_| Ok::<_, std::io::Error>(vec![b'u'; 64 * 1024]));
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let resp = client
            .post(format!("{}/upload", up.url()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v, serde_json::json!({ "received": 80 * 64 * 1024 }));
    }
}

#[tokio::test]
async fn tls_upstream_negotiates_alpn() {
    let ca = Ca::new();
    let leaf = ca.issue(&["localhost", "127.0.0.1"]);
    let up = Upstream::start_tls("secure", &leaf.cert_pem, &leaf.key_pem).await;
    assert!(up.url().starts_with("https://127.0.0.1:"));

    let client = tls_client(&ca.cert_pem(), &[("localhost", up.addr())]);
    let url = format!("https://localhost:{}/tls", up.port());
    let v: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["version"], "HTTP/2.0");
    assert_eq!(v["upstream"], "secure");

    let v: Value = tls_client_h1(&ca.cert_pem(), &[])
        .get(format!("{}/ip", up.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["version"], "HTTP/1.1");

    // A client trusting another CA must fail the handshake.
    let other = Ca::new();
    let err = tls_client(&other.cert_pem(), &[("localhost", up.addr())])
        .get(&url)
        .send()
        .await;
    assert!(err.is_err());
}

#[tokio::test]
async fn stop_and_restart_on_same_port() {
    let up = Upstream::start("once").await;
    let addr = up.addr();
    let c = http_client();
    assert_eq!(c.get(up.url()).send().await.unwrap().status(), 200);
    up.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert!(c.get(up.url()).send().await.is_err());
    let again = Upstream::start_on("twice", addr).await;
    let resp = http_client().get(again.url()).send().await.unwrap();
    assert_eq!(resp.headers()["x-upstream"], "twice");
}

#[tokio::test]
async fn custom_handler_and_raw_http() {
    let fallback = default_handler("custom");
    let up = Upstream::start_with(
        "custom",
        handler(move |req| {
            let fallback = fallback.clone();
            async move {
                if req.uri().path() == "/teapot" {
                    json_response(http::StatusCode::IM_A_TEAPOT, &serde_json::json!({}))
                } else {
                    fallback(req).await
                }
            }
        }),
    )
    .await;
    let resp = http_client()
        .get(format!("{}/teapot", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 418);
    assert_eq!(resp.headers()["x-upstream"], "custom");

    let reply = raw_http(
        up.addr(),
        b"GET /raw?q HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains(r#""uri":"/raw?q""#), "{reply}");
    let reply = raw_http(up.addr(), b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
}

const FAKE_GATEWAY: &str = r#"
echo "args: $*"
echo "cwd: $(pwd)"
echo "to-stderr" >&2
trap 'echo got-hup' HUP
trap 'echo bye; exit 3' TERM
while true; do sleep 0.05; done
"#;

/// The gateway helpers, driven with a shell script standing in for `portico` and an
/// echo upstream answering `/ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_process_control() {
    let ready = Upstream::start("ready").await;
    let scripts = tempfile::tempdir().unwrap();
    let script = scripts.path().join("fake-portico.sh");
    std::fs::write(&script, FAKE_GATEWAY).unwrap();
    let script = script.to_str().unwrap();

    let mut gw = Gateway::start_with_args(
        Path::new("/bin/sh"),
        &[script, "run", "--config", "portico.yaml"],
        Some("a: 1\n"),
        ready.addr(),
    );
    assert!(ready.hits() >= 1);
    assert!(gw.wait_for_log("args: run --config portico.yaml", Duration::from_secs(5)));
    assert!(gw.wait_for_log("to-stderr", Duration::from_secs(5)));
    assert!(gw.stderr().contains("to-stderr"));
    let cwd = std::fs::canonicalize(gw.dir()).unwrap();
    assert!(gw.stdout().contains(&format!("cwd: {}", cwd.display())));
    assert_eq!(gw.config_path(), gw.dir().join("portico.yaml"));
    assert_eq!(std::fs::read_to_string(gw.config_path()).unwrap(), "a: 1\n");
    gw.write_config("a: 2\n");
    assert_eq!(std::fs::read_to_string(gw.config_path()).unwrap(), "a: 2\n");
    assert!(gw.rss_kib() > 0);

    assert!(gw.signal("HUP"));
    assert!(
        gw.wait_for_log("got-hup", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    assert!(gw.wait_exit(Duration::from_millis(100)).is_none());
    assert!(gw.signal("SIGTERM"));
    let status = gw.wait_exit(Duration::from_secs(5)).unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(!gw.signal("TERM"), "process already reaped");
}

#[test]
fn gateway_default_args_and_early_exit() {
    let mut gw = Gateway::spawn(Path::new("/bin/echo"), "x: y\n");
    assert!(gw.wait_exit(Duration::from_secs(5)).unwrap().success());
    let expected = format!("run --config {}\n", gw.config_path().display());
    assert_eq!(gw.stdout(), expected);

    let port = portico_test_support::free_port();
    let mut gw = Gateway::spawn_with(Path::new("/bin/sh"), &["-c", "exit 2"], None, &[]);
    let err = gw
        .wait_ready(([127, 0, 0, 1], port).into(), Duration::from_secs(5))
        .unwrap_err();
    assert!(err.contains("exited"), "{err}");
    assert!(!gw.config_path().exists());
}
