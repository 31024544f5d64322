//! End-to-end tests of HTTP/1.1 message handling at the edge: requests the gateway
//! refuses before routing (ambiguous Host, CONNECT, `OPTIONS *`) and the protocol
//! version the client gets back whatever the upstream speaks.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

use portico_test_support::{raw_http, LocalGateway, RawResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream that answers every request with an HTTP/1.0 response, then closes.
async fn http10_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn gateway(up: SocketAddr) -> LocalGateway {
    let rest = format!(
        "upstreams:\n  u: {{targets: [{{url: \"http://{up}\"}}]}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n"
    );
    LocalGateway::start(Path::new(env!("CARGO_BIN_EXE_portico")), &rest).await
}

/// The status line, which `RawResponse` does not keep (it holds the protocol version).
fn status_line(raw: &str) -> &str {
    raw.split("\r\n").next().unwrap_or("")
}

fn error_code(raw: &str) -> String {
    RawResponse::parse(raw).json()["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn ambiguous_or_unsupported_requests_are_refused_with_json() {
    let up = http10_upstream().await;
    let env = gateway(up).await;
    let addr = env.addr;
    let cases: [(&[u8], &str, &str); 4] = [
        (
            b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            "400",
            "bad_request",
        ),
        (
            b"GET /x HTTP/1.1\r\nHost: bad host\r\nConnection: close\r\n\r\n",
            "400",
            "bad_request",
        ),
        (
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "405",
            "method_not_allowed",
        ),
        (
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "400",
            "bad_request",
        ),
    ];
    for (req, status, code) in cases {
        let raw = raw_http(addr, req).await;
        assert!(
            status_line(&raw).starts_with(&format!("HTTP/1.1 {status}")),
            "{:?} -> {raw}",
            String::from_utf8_lossy(req)
        );
        assert_eq!(error_code(&raw), code, "{raw}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_get_the_gateways_http_version_not_the_upstreams() {
    let up = http10_upstream().await;
    let env = gateway(up).await;
    let addr = env.addr;
    let raw = raw_http(
        addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status_line(&raw).starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.ends_with("hello"), "{raw}");
    // An HTTP/1.0 client is answered in HTTP/1.0.
    let raw = raw_http(addr, b"GET /x HTTP/1.0\r\n\r\n").await;
    assert!(status_line(&raw).starts_with("HTTP/1.0 200"), "{raw}");
}

/// Reads until the peer closes, or gives up after `limit`. Returns what was read and
/// whether the peer closed.
async fn read_until_closed(
    s: &mut tokio::net::TcpStream,
    limit: std::time::Duration,
) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// `limits.client_idle_timeout` closes connections that carry no request in progress:
/// silent ones, idle keep-alive ones, and ones trickling headers (slow loris) — but never
/// one whose request is still being answered.
#[tokio::test(flavor = "multi_thread")]
async fn idle_and_slow_header_connections_are_closed_but_slow_answers_are_not() {
    let up = portico_test_support::Upstream::start("slow").await;
    let env = LocalGateway::start(
        Path::new(env!("CARGO_BIN_EXE_portico")),
        &format!(
            "limits: {{client_idle_timeout: 1s}}\nupstreams:\n  u: {{targets: [{{url: \"{}\"}}]}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
            up.url()
        ),
    )
    .await;
    let generous = std::time::Duration::from_secs(10);

    // Silent connection.
    let mut s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let (got, closed) = read_until_closed(&mut s, generous).await;
    assert!(
        closed && got.is_empty(),
        "silent connection closed without an answer: {got:?}"
    );

    // Headers that never finish.
    let mut s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut s, generous).await;
    assert!(
        closed && got.is_empty(),
        "slow headers closed without an answer: {got:?}"
    );

    // A keep-alive connection: answered, then closed once idle.
    let mut s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut s, generous).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(closed, "idle keep-alive connection closed");

    // An answer slower than the idle timeout is not cut.
    let mut s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    s.write_all(b"GET /sleep/2500 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_until_closed(&mut s, generous).await;
    assert!(
        got.starts_with("HTTP/1.1 200"),
        "slow answer delivered: {got}"
    );
}

/// A request with both `Transfer-Encoding: chunked` and a conflicting `Content-Length`
/// reaches the upstream framed one way only: the chunked body, no length.
#[tokio::test(flavor = "multi_thread")]
async fn transfer_encoding_wins_over_content_length_upstream() {
    let up = portico_test_support::Upstream::start("te").await;
    let env = LocalGateway::start(
        Path::new(env!("CARGO_BIN_EXE_portico")),
        &format!(
            "upstreams:\n  u: {{targets: [{{url: \"{}\"}}]}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
            up.url()
        ),
    )
    .await;
    let raw = raw_http(
        env.addr,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let resp = RawResponse::parse(&raw);
    assert_eq!(resp.status, 200, "{raw}");
    let seen = resp.json();
    assert_eq!(seen["body_len"], 5, "{seen}");
    assert_eq!(seen["body"], "hello", "{seen}");
    assert!(
        seen["headers"]["content-length"].is_null(),
        "no length upstream: {seen}"
    );
}
