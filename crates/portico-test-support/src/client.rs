//! HTTP clients for tests: no proxy, no redirect following, bounded timeouts
//! (5 s connect, 60 s per request), TLS only through aws-lc-rs configs.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::{Client, ClientBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::certs::{self, Cert};

/// Timeout of [`raw_http`], for connecting and for the whole exchange.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(5);

fn base(tls: rustls::ClientConfig) -> ClientBuilder {
    Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .use_preconfigured_tls(tls)
}

/// A TLS config trusting nothing: plain-HTTP clients still need one, since reqwest
/// is built without a default crypto provider.
fn no_roots() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

/// A plain HTTP/1.1 client.
pub fn http_client() -> Client {
    base(no_roots()).http1_only().build().unwrap()
}

/// A cleartext HTTP/2 client (h2c with prior knowledge).
pub fn h2c_client() -> Client {
    base(no_roots()).http2_prior_knowledge().build().unwrap()
}

/// An HTTPS client trusting only `ca_pem`, offering ALPN `h2` and `http/1.1`.
///
/// Each `resolve` entry maps a host name to an address, so `https://name:PORT/` reaches
/// `127.0.0.1`. reqwest uses the port from the URL when present, so write it in the URL.
pub fn tls_client(ca_pem: &str, resolve: &[(&str, SocketAddr)]) -> Client {
    tls_client_with(ca_pem, None, &["h2", "http/1.1"], resolve)
}

/// Like [`tls_client`] but offering only ALPN `http/1.1` and speaking HTTP/1.1.
pub fn tls_client_h1(ca_pem: &str, resolve: &[(&str, SocketAddr)]) -> Client {
    tls_client_with(ca_pem, None, &["http/1.1"], resolve)
}

/// Like [`tls_client`] but presenting `client_cert` (mTLS).
pub fn mtls_client(ca_pem: &str, client_cert: &Cert, resolve: &[(&str, SocketAddr)]) -> Client {
    tls_client_with(ca_pem, Some(client_cert), &["h2", "http/1.1"], resolve)
}

/// The general HTTPS client: trusted CA, optional client certificate, ALPN list
/// (HTTP/1.1 only if it lacks `h2`), name overrides.
pub fn tls_client_with(
    ca_pem: &str,
    client_cert: Option<&Cert>,
    alpn: &[&str],
    resolve: &[(&str, SocketAddr)],
) -> Client {
    let mut cfg = certs::client_config_with(ca_pem, client_cert);
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let mut builder = base(cfg);
    if !alpn.contains(&"h2") {
        builder = builder.http1_only();
    }
    for (name, addr) in resolve {
        builder = builder.resolve(name, *addr);
    }
    builder.build().unwrap()
}

/// Writes `request` verbatim to a new TCP connection to `addr` and returns everything
/// read back until the peer closes, or until [`RAW_TIMEOUT`] has passed since the call
/// (lossy UTF-8). Panics only if the connection cannot be made.
///
/// Remember `Connection: close` (or a malformed request the server will reject),
/// otherwise a keep-alive server makes this wait for the full timeout.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    String::from_utf8_lossy(&raw_http_bytes(addr, request).await).into_owned()
}

/// [`raw_http`] returning the raw bytes.
pub async fn raw_http_bytes(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + RAW_TIMEOUT;
    let mut stream = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connect to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut out = Vec::new();
    // The server may answer (and close) before reading everything; keep what we got.
    if tokio::time::timeout_at(deadline, stream.write_all(request))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        let _ = stream.flush().await;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}
