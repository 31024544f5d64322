//! TLS termination: certificates loaded from PEM files, chosen by SNI from the names in
//! each certificate (exact before wildcard), with a default for clients without SNI.

use std::collections::HashMap;
use std::sync::Arc;

use portico_config::model::{TlsConfig, TlsVersion};
use portico_config::{Diagnostic, KeyPath, Loaded};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;

/// Certificates by name.
#[derive(Debug, Default)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return Some(c.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(c) = self.wildcard.get(parent) {
                return Some(c.clone());
            }
        }
        self.default.clone()
    }
}

/// Build the server TLS configuration (ALPN h2, http/1.1).
pub fn server_config(
    t: &TlsConfig,
    loaded: &Loaded,
) -> Result<rustls::ServerConfig, Vec<Diagnostic>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut diags = Vec::new();
    let mut resolver = SniResolver::default();
    for (i, c) in t.certificates.iter().enumerate() {
        let p = KeyPath::root().key("tls").key("certificates").index(i);
        let cert_path = loaded.resolve(&c.cert);
        let key_path = loaded.resolve(&c.key);
        let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(&cert_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        {
            Ok(ch) if !ch.is_empty() => ch,
            Ok(_) => {
                diags.push(Diagnostic::new(
                    p.key("cert"),
                    format!("no certificate found in {}", cert_path.display()),
                ));
                continue;
            }
            Err(e) => {
                diags.push(Diagnostic::new(
                    p.key("cert"),
                    format!("cannot read {}: {e}", cert_path.display()),
                ));
                continue;
            }
        };
        let key = match PrivateKeyDer::from_pem_file(&key_path) {
            Ok(k) => k,
            Err(e) => {
                diags.push(Diagnostic::new(
                    p.key("key"),
                    format!("cannot read a private key from {}: {e}", key_path.display()),
                ));
                continue;
            }
        };
        let signing = match provider.key_provider.load_private_key(key) {
            Ok(k) => k,
            Err(e) => {
                diags.push(Diagnostic::new(
                    p.key("key"),
                    format!("unsupported private key: {e}"),
                ));
                continue;
            }
        };
        let names: Vec<String> = match webpki::EndEntityCert::try_from(&chain[0]) {
            Ok(ee) => ee
                .valid_dns_names()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
            Err(e) => {
                diags.push(Diagnostic::new(
                    p.key("cert"),
                    format!("cannot parse the certificate: {e:?}"),
                ));
                continue;
            }
        };
        let ck = Arc::new(CertifiedKey::new(chain, signing));
        if ck.keys_match().is_err() {
            diags.push(Diagnostic::new(
                p.key("key"),
                "the private key does not match the certificate",
            ));
            continue;
        }
        if names.is_empty() && !c.default {
            diags.push(Diagnostic::new(
                p.key("cert"),
                "the certificate has no DNS names; mark it `default: true` to serve it without SNI",
            ));
        }
        for n in names {
            match n.strip_prefix("*.") {
                Some(parent) => {
                    resolver
                        .wildcard
                        .entry(parent.to_string())
                        .or_insert_with(|| ck.clone());
                }
                None => {
                    resolver.exact.entry(n).or_insert_with(|| ck.clone());
                }
            }
        }
        if c.default || (i == 0 && !t.certificates.iter().any(|c| c.default)) {
            resolver.default = Some(ck.clone());
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version {
        Some(TlsVersion::V13) => &[&rustls::version::TLS13],
        _ => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| vec![Diagnostic::new(KeyPath::root().key("tls"), e.to_string())])?
        .with_client_cert_verifier(client_verifier(t, loaded, provider.clone())?)
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The client certificate verifier: none, or the CA bundle of `tls.client_auth`.
fn client_verifier(
    t: &TlsConfig,
    loaded: &Loaded,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, Vec<Diagnostic>> {
    let Some(ca) = &t.client_auth else {
        return Ok(rustls::server::WebPkiClientVerifier::no_client_auth());
    };
    let p = KeyPath::root().key("tls").key("client_auth").key("ca");
    let path = loaded.resolve(&ca.ca);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            vec![Diagnostic::new(
                p.clone(),
                format!("cannot read {}: {e}", path.display()),
            )]
        })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| {
            vec![Diagnostic::new(
                p.clone(),
                format!("not a usable CA certificate in {}: {e}", path.display()),
            )]
        })?;
    }
    if roots.is_empty() {
        return Err(vec![Diagnostic::new(
            p,
            format!("no certificate found in {}", path.display()),
        )]);
    }
    let mut b =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if ca.mode == portico_config::model::ClientAuthMode::Optional {
        b = b.allow_unauthenticated();
    }
    b.build().map_err(|e| {
        vec![Diagnostic::new(
            KeyPath::root().key("tls").key("client_auth"),
            format!("cannot use the client CA bundle: {e}"),
        )]
    })
}

/// What the gateway knows about a verified client certificate.
pub fn client_cert(der: &CertificateDer<'_>) -> Option<portico_plugins::ctx::ClientCert> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let subject = cert.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    sans.push((*s).to_string())
                }
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref());
    let fingerprint = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Some(portico_plugins::ctx::ClientCert {
        subject: subject.to_string(),
        common_name,
        sans,
        fingerprint,
    })
}
