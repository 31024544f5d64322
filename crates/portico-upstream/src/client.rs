//! TLS settings towards upstream targets, made once per upstream and shared by the
//! connection pools of its targets (see [`crate::pool`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use portico_config::model::{Protocol, Upstream as UpstreamConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::pool::Connector;

/// The connect timeout expired (TCP and TLS handshake together).
#[derive(Debug, thiserror::Error)]
#[error("connect timeout after {0:?}")]
pub struct ConnectTimeout(pub Duration);

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub(crate) fn system_roots() -> Arc<RootCertStore> {
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

/// Build the connector of an upstream. `resolve` turns a config path into a file path.
pub fn build(
    cfg: &UpstreamConfig,
    resolve: &dyn Fn(&str) -> std::path::PathBuf,
) -> Result<Connector, ClientError> {
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

    let mut config = config;
    config.alpn_protocols = match cfg.protocol {
        Protocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::H2 | Protocol::H2c => vec![b"h2".to_vec()],
    };
    let sni = match &tls.sni {
        Some(name) => Some(ServerName::try_from(name.clone()).map_err(|e| {
            err(
                &["tls", "sni"],
                format!("`{name}` is not a valid server name: {e}"),
            )
        })?),
        None => None,
    };
    Ok(Connector {
        tls: Arc::new(config),
        sni,
        protocol: cfg.protocol,
        max_idle: cfg.max_idle_connections,
        keepalive: cfg.timeouts.keepalive.0,
    })
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
