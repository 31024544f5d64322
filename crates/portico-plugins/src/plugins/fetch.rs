//! HTTP fetches made by policies themselves (not proxied requests): JWKS documents and
//! OpenID Connect discovery for `jwt`, later token introspection.
//!
//! One client trusting the system's root certificates is built lazily, at the first
//! fetch (never when a policy is built, so `portico validate` stays offline), and
//! shared by every policy. A policy with its own `ca` bundle gets a client of its own,
//! also built at its first fetch, that trusts only that bundle. TLS goes through
//! rustls with the aws-lc-rs provider. Fetches go straight to the server (proxy
//! environment variables are not used), follow no redirects, and have a timeout for
//! the whole exchange and a bounded body.

use std::error::Error as _;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;

/// The largest body a fetch reads.
pub const MAX_BODY: usize = 1024 * 1024;

/// A fetched answer.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    /// The `Cache-Control` header, if any.
    pub cache_control: Option<String>,
    pub body: Bytes,
}

/// The future of a fetch.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Fetched, String>> + Send + 'a>>;

/// Something that GETs a URL (an HTTP client, or a stand-in in tests).
pub trait Fetch: Send + Sync {
    fn get<'a>(&'a self, url: &'a str) -> FetchFuture<'a>;
}

/// GETs over HTTP(S) with [`reqwest`].
pub struct HttpFetch {
    timeout: Duration,
    /// A digest of the CA bundle's content (0 without one).
    ca_digest: u64,
    /// Only these roots (the policy's `ca`), or None for the shared client.
    roots: Option<Arc<RootCertStore>>,
    own: OnceLock<Result<reqwest::Client, String>>,
}

impl HttpFetch {
    /// A fetcher with this timeout for each whole exchange, trusting the system's
    /// roots, or only `ca` (see [`ca_roots`]).
    pub fn new(timeout: Duration, ca: Option<RootCertStore>) -> HttpFetch {
        let (roots, ca_digest) = match ca {
            None => (None, 0),
            Some(store) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                for c in &store.roots {
                    std::hash::Hash::hash(c.subject.as_ref(), &mut h);
                    std::hash::Hash::hash(c.subject_public_key_info.as_ref(), &mut h);
                }
                (Some(Arc::new(store)), std::hash::Hasher::finish(&h))
            }
        };
        HttpFetch {
            timeout,
            ca_digest,
            roots,
            own: OnceLock::new(),
        }
    }

    /// What tells two fetchers apart (timeout and trusted CAs), for sharing state
    /// between policy instances built with the same settings.
    pub fn identity(&self) -> String {
        format!("{:?}|{:x}", self.timeout, self.ca_digest)
    }

    fn client(&self) -> Result<reqwest::Client, String> {
        match &self.roots {
            None => shared_client(),
            Some(roots) => self.own.get_or_init(|| build_client(roots.clone())).clone(),
        }
    }

    async fn fetch(&self, url: &str) -> Result<Fetched, String> {
        let client = self.client()?;
        self.send(client.get(url)).await
    }

    /// POST `form` as `application/x-www-form-urlencoded` (token introspection, token
    /// endpoints), with HTTP Basic client authentication when `basic` is given
    /// (RFC 6749 §2.3.1: both parts form-urlencoded first).
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> Result<Fetched, String> {
        let client = self.client()?;
        let mut rb = client.post(url).form(form);
        if let Some((id, secret)) = basic {
            rb = rb.basic_auth(form_encode(id), Some(form_encode(secret)));
        }
        self.send(rb).await
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<Fetched, String> {
        let mut resp = rb
            .header(http::header::ACCEPT, "application/json")
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = resp.status().as_u16();
        let cache_control = resp
            .headers()
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(format!("the answer is larger than {MAX_BODY} bytes"));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(format!("the answer is larger than {MAX_BODY} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            status,
            cache_control,
            body: body.freeze(),
        })
    }
}

impl Fetch for HttpFetch {
    fn get<'a>(&'a self, url: &'a str) -> FetchFuture<'a> {
        Box::pin(self.fetch(url))
    }
}

/// The client shared by every policy without a `ca` of its own: system roots.
pub fn shared_client() -> Result<reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's root certificates");
            }
            for c in found.certs {
                let _ = store.add(c);
            }
            build_client(Arc::new(store))
        })
        .clone()
}

fn build_client(roots: Arc<RootCertStore>) -> Result<reqwest::Client, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("portico/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| describe(&e))
}

/// The root store of a `ca` setting: a PEM bundle given inline, or the absolute path
/// of a file holding one (read now, so a missing or bad bundle is a settings error).
pub fn ca_roots(ca: &str) -> Result<RootCertStore, String> {
    if ca.contains("-----BEGIN") {
        return roots_of(ca.as_bytes(), "the CA bundle");
    }
    let path = Path::new(ca.trim());
    if !path.is_absolute() {
        return Err("give the CA bundle as PEM text or as an absolute path".into());
    }
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read the CA bundle {}: {e}", path.display()))?;
    roots_of(&pem, &path.display().to_string())
}

fn roots_of(pem: &[u8], what: &str) -> Result<RootCertStore, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} holds no PEM certificate"));
    }
    let mut store = RootCertStore::empty();
    for c in certs {
        store
            .add(c)
            .map_err(|e| format!("bad CA certificate in {what}: {e}"))?;
    }
    Ok(store)
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// An error with its causes (reqwest's own message rarely says what failed).
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// Whether a URL is acceptable for fetching keys: `https://`, or `http://` to a
/// loopback address (or anywhere with `allow_http`).
pub fn check_url(url: &str, allow_http: bool) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("`{url}` has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if allow_http || is_loopback(host) => Ok(()),
        Some("http") => Err(format!(
            "`{url}` is plain http: keys must come over https (plain http is accepted for \
             loopback addresses, or anywhere with `allow_http: true`)"
        )),
        _ => Err(format!("`{url}` is not an http(s) URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls() {
        assert!(check_url("https://idp.example.com/jwks", false).is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks", false).is_ok());
        assert!(check_url("http://[::1]:8080/jwks", false).is_ok());
        assert!(check_url("http://localhost/jwks", false).is_ok());
        assert!(check_url("http://idp.example.com/jwks", false)
            .unwrap_err()
            .contains("https"));
        assert!(check_url("http://idp.example.com/jwks", true).is_ok());
        assert!(check_url("ftp://idp.example.com/jwks", true).is_err());
        assert!(check_url("not a url", true).is_err());
        assert!(check_url("/relative", true).is_err());
    }

    #[test]
    fn ca_bundles() {
        let e = ca_roots("/nonexistent/ca.pem").err().unwrap();
        assert!(
            e.contains("cannot read the CA bundle /nonexistent/ca.pem"),
            "{e}"
        );
        let e = ca_roots("certs/ca.pem").err().unwrap();
        assert!(e.contains("absolute path"), "{e}");
        let e = ca_roots("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .err()
            .unwrap();
        assert!(e.contains("CA"), "{e}");
        // The identity of a fetcher says which CAs it trusts and its timeout.
        let a = HttpFetch::new(Duration::from_secs(1), None);
        let b = HttpFetch::new(Duration::from_secs(2), None);
        assert_ne!(a.identity(), b.identity());
    }
}
