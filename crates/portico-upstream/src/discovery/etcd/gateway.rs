//! Just enough HTTP/1.1 for etcd's JSON gateway: one connection per call (a list, an
//! authentication, or a watch that stays open), `https://` with the system's roots.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Connect, TLS handshake and response headers, each.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole unary answer (list, authenticate).
const BODY_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest unary answer, and the largest single watch message.
pub(super) const MAX_BODY: usize = 32 << 20;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn tls() -> Arc<rustls::ClientConfig> {
    static CFG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let cfg = rustls::ClientConfig::builder_with_provider(crate::client::provider())
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_root_certificates(crate::client::system_roots())
                    .with_no_client_auth()
            });
        match cfg {
            Ok(c) => Arc::new(c),
            // The provider supports the default versions; keep a config that fails
            // handshakes rather than panic.
            Err(_) => Arc::new(
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            ),
        }
    })
    .clone()
}

async fn step<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {STEP_TIMEOUT:?}")),
    }
}

/// `POST base + path` with a JSON body; the response once its headers are in. A status
/// other than 200 is an error carrying the gateway's message.
pub(super) async fn post(
    base: &str,
    path: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> Result<hyper::Response<Incoming>, String> {
    let base: Uri = base.parse().map_err(|_| format!("`{base}` is not a URL"))?;
    let https = base.scheme_str() == Some("https");
    let host = base
        .host()
        .ok_or_else(|| format!("`{base}` has no host"))?
        .to_string();
    let port = base.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = step("connect", TcpStream::connect((bare.as_str(), port))).await?;
    let io: Box<dyn Io> = if https {
        let name = ServerName::try_from(bare)
            .map_err(|e| format!("`{host}` is not a server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(tls());
        Box::new(step("TLS handshake", tls.connect(name, tcp)).await?)
    } else {
        Box::new(tcp)
    };
    let (mut send, conn) = step(
        "HTTP handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(io)),
    )
    .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = base
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or(host);
    // An endpoint may carry a path (a gateway behind a proxy's prefix).
    let full = format!("{}{path}", base.path().trim_end_matches('/'));
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(full)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, t);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("building the request: {e}"))?;
    let resp = step(path, send.send_request(req)).await?;
    if resp.status() != http::StatusCode::OK {
        let status = resp.status();
        let text = read_all(resp).await.unwrap_or_default();
        return Err(format!(
            "{path} answered {status}: {}",
            gateway_message(&text)
        ));
    }
    Ok(resp)
}

/// `post` and the whole JSON answer.
pub(super) async fn call(
    base: &str,
    path: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> Result<serde_json::Value, String> {
    let resp = post(base, path, body, token).await?;
    let bytes = read_all(resp).await?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{path}: the answer is not JSON: {e}"))
}

async fn read_all(resp: hyper::Response<Incoming>) -> Result<Bytes, String> {
    let body = Limited::new(resp.into_body(), MAX_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) => Err(format!("reading the answer: {e}")),
        Err(_) => Err(format!("the answer took more than {BODY_TIMEOUT:?}")),
    }
}

/// The `message` (or `error`) of a gateway error body, or the body itself, shortened.
fn gateway_message(body: &[u8]) -> String {
    let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let m = v.as_ref().and_then(|v| {
        v.get("message")
            .or_else(|| v.get("error"))
            .and_then(|m| m.as_str().map(str::to_string))
    });
    let mut m = m.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    if m.len() > 200 {
        let mut end = 200;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m.truncate(end);
    }
    m
}

/// Splits a stream of JSON messages (newline-delimited, or just back to back) into
/// values, holding an incomplete one until its end arrives.
#[derive(Default)]
pub(super) struct JsonStream {
    buf: BytesMut,
}

impl JsonStream {
    /// Add `chunk`; the complete messages so far.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<serde_json::Value>, String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut used = 0;
        {
            let mut it =
                serde_json::Deserializer::from_slice(&self.buf).into_iter::<serde_json::Value>();
            loop {
                match it.next() {
                    Some(Ok(v)) => {
                        used = it.byte_offset();
                        out.push(v);
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => return Err(format!("a watch message is not JSON: {e}")),
                    None => {
                        used = it.byte_offset();
                        break;
                    }
                }
            }
        }
        let _ = self.buf.split_to(used);
        if self.buf.len() > MAX_BODY {
            return Err(format!("a watch message is larger than {MAX_BODY} bytes"));
        }
        Ok(out)
    }
}

/// The next chunk of a streaming body (`None` at its end).
pub(super) async fn next_chunk(body: &mut Incoming) -> Result<Option<Bytes>, String> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    return Ok(Some(d));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_stream_splits_messages_across_chunks() {
        let mut s = JsonStream::default();
        assert!(s.push(b"{\"result\":{\"a\":").unwrap().is_empty());
        let got = s.push(b"1}}\n{\"result\":{}}\n{\"res").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["result"]["a"], 1);
        let got = s.push(b"ult\":2}").unwrap();
        assert_eq!(got, vec![serde_json::json!({"result": 2})]);
        assert!(s.push(b"\n").unwrap().is_empty());
        assert!(s.push(b"}{").is_err());
    }

    #[test]
    fn gateway_messages_are_short() {
        assert_eq!(
            gateway_message(br#"{"error":"etcdserver: user name is empty","code":3,"message":"etcdserver: user name is empty"}"#),
            "etcdserver: user name is empty"
        );
        assert_eq!(gateway_message(&[b'x'; 500]).len(), 200);
    }
}
