//! Consul: the passing instances of a service, followed with blocking queries on the
//! health API (`GET /v1/health/service/{service}?passing=true&index=..&wait=..`).
//!
//! Index handling follows Consul's documented rules for blocking queries: the index
//! of the last answer (`X-Consul-Index`) is sent with the next query; an index that
//! goes backwards resets to 0 (a non-blocking query that reads the current state); an
//! index below 1 is raised to 1 so the next query blocks; and queries are rate
//! limited so a server answering at once cannot drive a busy loop. After a failure the
//! index resets to 0, so the first answer after recovery is the current state.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use portico_config::discovery::{Consul, DiscoveredScheme};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::discovery::{endpoint, Backoff};
use crate::{Endpoint, Live};

/// Least time between the starts of two queries.
const MIN_GAP: Duration = Duration::from_millis(500);
/// The largest answer read.
const MAX_BODY: usize = 16 << 20;
/// Connection timeout towards the agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The index to send with the next query after an answer carrying `new`, when the
/// last one carried `old` (Consul's blocking-query rules).
pub fn next_index(old: u64, new: u64) -> u64 {
    if new < old {
        // Went backwards (e.g. a restored snapshot): start over with a plain read.
        0
    } else {
        // 0 would never block: waiting on 1 is always safe.
        new.max(1)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    #[serde(default)]
    node: Node,
    service: Service,
    #[serde(default)]
    checks: Vec<Check>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service {
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    weights: Option<Weights>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    #[serde(default)]
    passing: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    #[serde(default)]
    status: String,
}

/// The endpoints of a `/v1/health/service` answer: every entry whose checks all pass,
/// at `Service.Address` (else `Node.Address`) and `Service.Port`, weighted by
/// `Service.Weights.Passing` (else `weight`).
pub fn parse_entries(
    body: &[u8],
    scheme: DiscoveredScheme,
    weight: u32,
) -> Result<Vec<Endpoint>, String> {
    let entries: Vec<Entry> =
        serde_json::from_slice(body).map_err(|e| format!("unexpected answer from Consul: {e}"))?;
    Ok(entries
        .iter()
        .filter(|e| e.checks.iter().all(|c| c.status == "passing"))
        .filter_map(|e| {
            let host = if e.service.address.is_empty() {
                &e.node.address
            } else {
                &e.service.address
            };
            if host.is_empty() || e.service.port == 0 {
                return None;
            }
            let w = e
                .service
                .weights
                .as_ref()
                .map(|w| w.passing)
                .filter(|&w| w > 0)
                .unwrap_or(weight);
            Some(endpoint(scheme, host, e.service.port, w, None))
        })
        .collect())
}

/// Percent-encode a query or path component.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query URL for `index` (0: a plain read).
pub fn query_url(cfg: &Consul, index: u64) -> String {
    let mut u = format!(
        "{}/v1/health/service/{}?passing=true",
        cfg.address.trim_end_matches('/'),
        enc(&cfg.service)
    );
    if index > 0 {
        u.push_str(&format!(
            "&index={index}&wait={}s",
            cfg.wait.0.as_secs().max(1)
        ));
    }
    if let Some(t) = &cfg.tag {
        u.push_str(&format!("&tag={}", enc(t)));
    }
    if let Some(dc) = &cfg.datacenter {
        u.push_str(&format!("&dc={}", enc(dc)));
    }
    u
}

/// Follow `cfg.service` until aborted.
pub async fn run(
    name: Arc<str>,
    cfg: Consul,
    scheme: DiscoveredScheme,
    weight: u32,
    live: Arc<Live>,
) {
    let mut index = 0u64;
    let mut backoff = Backoff::default();
    // Consul adds up to wait/16 of jitter to a blocking query.
    let timeout = cfg.wait.0 + cfg.wait.0 / 16 + Duration::from_secs(10);
    loop {
        let started = Instant::now();
        let res = async {
            let (status, headers, body) =
                get(&query_url(&cfg, index), cfg.token.as_deref(), timeout).await?;
            if status != StatusCode::OK {
                let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                return Err(format!("Consul answered {status}: {}", text.trim()));
            }
            let got = headers
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            Ok((parse_entries(&body, scheme, weight)?, got))
        }
        .await;
        match res {
            Ok((endpoints, got)) => {
                backoff.reset();
                live.set_discovered(endpoints);
                index = next_index(index, got);
                tokio::time::sleep_until(started + MIN_GAP).await;
            }
            Err(e) => {
                tracing::warn!(upstream = %name, error = %e, "consul discovery failed; keeping the last known targets");
                live.discovery_failed(&e);
                index = 0;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// One GET with an optional Consul token; the whole exchange bounded by `timeout`.
async fn get(
    url: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("bad URL `{url}`"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("no host in `{url}`"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let mut req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or("localhost", |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json");
    if let Some(t) = token {
        req = req.header("x-consul-token", t);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let work = async {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| format!("connecting to {host}:{port} timed out"))?
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if tls {
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("bad TLS name `{host}`: {e}"))?;
            let stream = tls_connector()?
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}:{port} failed: {e}"))?;
            exchange(stream, req).await
        } else {
            exchange(tcp, req).await
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer from {host}:{port} within {timeout:?}"))?
}

async fn exchange<S>(
    io: S,
    req: http::Request<Empty<Bytes>>,
) -> Result<(StatusCode, HeaderMap, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let res = send.send_request(req).await.map_err(|e| e.to_string());
    let out = match res {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map(|b| (parts.status, parts.headers, b.to_bytes()))
                .map_err(|e| format!("reading the answer failed: {e}"))
        }
        Err(e) => Err(e),
    };
    conn.abort();
    out
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use portico_config::units::Dur;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 0), 1, "0 never blocks: wait on 1");
        assert_eq!(next_index(0, 42), 42);
        assert_eq!(next_index(42, 42), 42, "a timed-out wait keeps its index");
        assert_eq!(next_index(42, 50), 50);
        assert_eq!(next_index(50, 7), 0, "backwards resets to a plain read");
        assert_eq!(next_index(0, 7), 7);
    }

    #[test]
    fn entries_to_endpoints() {
        let body = br#"[
          {"Node": {"ID": "n1", "Node": "a", "Address": "10.0.0.1", "Datacenter": "dc1"},
           "Service": {"ID": "web-1", "Service": "web", "Tags": [], "Address": "", "Port": 8080,
                       "Weights": {"Passing": 3, "Warning": 1}, "Meta": {}},
           "Checks": [{"Status": "passing"}]},
          {"Node": {"Address": "10.0.0.2"},
           "Service": {"Address": "192.168.1.9", "Port": 9090},
           "Checks": [{"Status": "passing"}, {"Status": "passing"}]},
          {"Node": {"Address": "10.0.0.3"},
           "Service": {"Address": "", "Port": 9090},
           "Checks": [{"Status": "critical"}]},
          {"Node": {"Address": "::1"}, "Service": {"Port": 1}, "Checks": []}
        ]"#;
        let e = parse_entries(body, DiscoveredScheme::Http, 5).unwrap();
        let got: Vec<(&str, u32)> = e.iter().map(|e| (e.url.as_str(), e.weight)).collect();
        assert_eq!(
            got,
            [
                ("http://10.0.0.1:8080", 3),
                ("http://192.168.1.9:9090", 5),
                ("http://[::1]:1", 5)
            ]
        );
        assert!(parse_entries(b"{}", DiscoveredScheme::Http, 1).is_err());
    }

    #[test]
    fn urls() {
        let mut c = Consul {
            address: "http://127.0.0.1:8500/".into(),
            service: "web api".into(),
            tag: Some("v1".into()),
            datacenter: None,
            token: None,
            wait: Dur::secs(30),
        };
        assert_eq!(
            query_url(&c, 0),
            "http://127.0.0.1:8500/v1/health/service/web%20api?passing=true&tag=v1"
        );
        c.tag = None;
        c.datacenter = Some("dc2".into());
        assert_eq!(
            query_url(&c, 9),
            "http://127.0.0.1:8500/v1/health/service/web%20api?passing=true&index=9&wait=30s&dc=dc2"
        );
    }
}
