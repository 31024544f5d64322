//! Throw-away PKI for TLS tests, and rustls configs built with the aws-lc-rs provider.
//!
//! ```no_run
//! use portico_test_support::certs::Ca;
//! let ca = Ca::new();
//! let leaf = ca.issue(&["localhost", "127.0.0.1"]);
//! let server = portico_test_support::certs::server_config(&leaf.cert_pem, &leaf.key_pem);
//! let client = portico_test_support::certs::client_config(&ca.cert_pem());
//! # let _ = (server, client);
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate authority that can issue leaf certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A PEM-encoded certificate (leaf only, no chain) and its PKCS#8 private key.
#[derive(Clone, Debug)]
pub struct Cert {
    /// The certificate in PEM format.
    pub cert_pem: String,
    /// The private key in PEM (PKCS#8) format.
    pub key_pem: String,
}

impl Default for Ca {
    fn default() -> Self {
        Self::new()
    }
}

impl Ca {
    /// Generates a fresh self-signed CA (ECDSA P-256, common name "Portico Test CA").
    pub fn new() -> Ca {
        Self::named("Portico Test CA")
    }

    /// Generates a fresh self-signed CA with the given common name.
    pub fn named(common_name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate in PEM format (what clients should trust).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// Issues a server certificate for `names`; each entry is a DNS name
    /// (e.g. `"localhost"`, `"*.example.test"`) or an IP address (e.g. `"127.0.0.1"`).
    pub fn issue(&self, names: &[&str]) -> Cert {
        self.issue_with(names, |_| {})
    }

    /// Issues a client-authentication certificate (for mTLS) with the given common name.
    pub fn issue_client(&self, common_name: &str) -> Cert {
        self.issue_with(&[], |params| {
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        })
    }

    /// Like [`Ca::issue`], but lets the caller adjust the parameters before signing
    /// (e.g. set `not_after` in the past for an expired certificate).
    pub fn issue_with(
        &self,
        names: &[&str],
        customize: impl FnOnce(&mut CertificateParams),
    ) -> Cert {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        customize(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Cert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the CA certificate to `<dir>/<stem>.crt` and returns the path.
    pub fn write_cert(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.crt"));
        std::fs::write(&path, &self.cert_pem).unwrap();
        path
    }
}

impl Cert {
    /// A self-signed certificate for `names` (not issued by any [`Ca`]).
    pub fn self_signed(names: &[&str]) -> Cert {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Cert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key`; returns `(cert_path, key_path)`.
    pub fn write_to(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, &self.cert_pem).unwrap();
        std::fs::write(&key_path, &self.key_pem).unwrap();
        (cert_path, key_path)
    }
}

/// The aws-lc-rs crypto provider (the only one rustls is built with here).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Parses every certificate in a PEM string.
pub fn parse_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Parses the first private key in a PEM string.
pub fn parse_key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A root store trusting exactly the certificates in `ca_pem`.
pub fn root_store(ca_pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem) {
        roots.add(cert).unwrap();
    }
    roots
}

/// A server config for `cert_pem`/`key_pem`, no client auth, ALPN `h2` then `http/1.1`.
pub fn server_config(cert_pem: &str, key_pem: &str) -> ServerConfig {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(parse_certs(cert_pem), parse_key(key_pem))
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg
}

/// Like [`server_config`] but requiring a client certificate issued by `client_ca_pem`.
pub fn server_config_mtls(cert_pem: &str, key_pem: &str, client_ca_pem: &str) -> ServerConfig {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(client_ca_pem)),
        provider(),
    )
    .build()
    .unwrap();
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(parse_certs(cert_pem), parse_key(key_pem))
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg
}

/// A client config trusting only `ca_pem`, ALPN `h2` then `http/1.1`, optionally
/// presenting `client_cert` (mTLS).
pub fn client_config_with(ca_pem: &str, client_cert: Option<&Cert>) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(root_store(ca_pem));
    let mut cfg = match client_cert {
        Some(c) => builder
            .with_client_auth_cert(parse_certs(&c.cert_pem), parse_key(&c.key_pem))
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg
}

/// A client config trusting only `ca_pem`, ALPN `h2` then `http/1.1`.
pub fn client_config(ca_pem: &str) -> ClientConfig {
    client_config_with(ca_pem, None)
}
