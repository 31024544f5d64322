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
