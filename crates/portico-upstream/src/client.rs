//! Pooled HTTP clients towards upstream targets (hyper-util's pooled client over
//! hyper-rustls), one per upstream, kept across snapshots while its settings hold.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use portico_config::model::{Protocol, Upstream as UpstreamConfig};
use portico_plugins::Body;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

pub type HttpClient = Client<TimeoutConnector, Body>;

/// The connect timeout expired (TCP and TLS handshake together).
#[derive(Debug, thiserror::Error)]
#[error("connect timeout after {0:?}")]
pub struct ConnectTimeout(pub Duration);

/// Wraps the HTTPS connector so that `connect` covers TCP and the TLS handshake.
#[derive(Clone)]
pub struct TimeoutConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ConnFuture = Pin<
    Box<
        dyn Future<
                Output = Result<
                    <HttpsConnector<HttpConnector> as tower_service::Service<Uri>>::Response,
                    BoxError,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<Uri> for TimeoutConnector {
    type Response = <HttpsConnector<HttpConnector> as tower_service::Service<Uri>>::Response;
    type Error = BoxError;
    type Future = ConnFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> ConnFuture {
        let fut = self.inner.call(uri);
        let t = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => Err(Box::new(ConnectTimeout(t)) as BoxError),
            }
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = store.add(c);
            }
            Arc::new(store)
        })
        .clone()
}

/// A problem building the client, with the config key it concerns.
#[derive(Debug)]
pub struct ClientError {
    pub key: &'static [&'static str],
    pub message: String,
}

fn err(key: &'static [&'static str], message: String) -> ClientError {
    ClientError { key, message }
}

/// Build the client for an upstream. `resolve` turns a config path into a file path.
pub fn build(
    cfg: &UpstreamConfig,
    resolve: &dyn Fn(&str) -> std::path::PathBuf,
) -> Result<HttpClient, ClientError> {
    let tls = &cfg.tls;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&["tls"], e.to_string()))?;
    let builder = if !tls.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    } else if let Some(ca) = &tls.ca {
        let path = resolve(ca);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                err(
                    &["tls", "ca"],
                    format!("cannot read CA bundle {}: {e}", path.display()),
                )
            })?;
        let mut store = RootCertStore::empty();
        for c in certs {
            store.add(c).map_err(|e| {
                err(
                    &["tls", "ca"],
                    format!("bad CA certificate in {}: {e}", path.display()),
                )
            })?;
        }
        if store.is_empty() {
            return Err(err(
                &["tls", "ca"],
                format!("no certificate found in {}", path.display()),
            ));
        }
        builder.with_root_certificates(store)
    } else {
        builder.with_root_certificates(system_roots())
    };
    let config = match &tls.client_cert {
        Some(cc) => {
            let cp = resolve(&cc.cert);
            let kp = resolve(&cc.key);
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cp)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    err(
                        &["tls", "client_cert", "cert"],
                        format!("cannot read {}: {e}", cp.display()),
                    )
                })?;
            let key = PrivateKeyDer::from_pem_file(&kp).map_err(|e| {
                err(
                    &["tls", "client_cert", "key"],
                    format!("cannot read {}: {e}", kp.display()),
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| err(&["tls", "client_cert"], e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let b = match &tls.sni {
        Some(name) => {
            let name = name.clone();
            b.with_server_name_resolver(move |_: &Uri| ServerName::try_from(name.clone()))
        }
        None => b,
    };
    let https = match cfg.protocol {
        Protocol::Http1 => b.enable_http1().wrap_connector(http),
        Protocol::H2 | Protocol::H2c => b.enable_http2().wrap_connector(http),
        Protocol::Auto => b.enable_all_versions().wrap_connector(http),
    };
    let connector = TimeoutConnector {
        inner: https,
        timeout: cfg.timeouts.connect.0,
    };
    let mut cb = Client::builder(TokioExecutor::new());
    cb.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(cfg.max_idle_connections)
        .retry_canceled_requests(true)
        .set_host(false);
    if matches!(cfg.protocol, Protocol::H2 | Protocol::H2c) {
        cb.http2_only(true);
    }
    Ok(cb.build(connector))
}

/// Accepts any server certificate (`tls.verify: false`). Signatures are still checked.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
