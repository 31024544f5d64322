//! `mtls`: callers identified by the client certificate the TLS listener verified
//! (`tls.client_auth`; the handshake precedes routing, so the listener asks and this
//! policy decides per route). The certificate's common name, subject alternative
//! names, full subject or SHA-256 fingerprint — as `consumer_by` says, in order —
//! is looked up among the consumers' `mtls` credentials (`subject:`).

use std::sync::Arc;

use http::{HeaderValue, Request};
use portico_config::KeyPath;
use portico_store::Identity;
use schemars::JsonSchema;
use serde::Deserialize;

use super::auth::{info, unauthorized};
use crate::body::Body;
use crate::ctx::{ClientCert, Ctx};
use crate::policy::{AuthInfo, Policy, Step};
use crate::registry::SettingsErrors;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum By {
    /// The subject's common name (CN).
    CommonName,
    /// Each subject alternative name (DNS, e-mail, URI, IP), in certificate order.
    San,
    /// The whole subject, e.g. `CN=client-a, O=Example`.
    Subject,
    /// The SHA-256 of the certificate, lowercase hex.
    Fingerprint,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Which names of the certificate identify a consumer, tried in order.
    /// Default: `[common_name, san]`.
    #[serde(default = "default_by")]
    pub consumer_by: Vec<By>,
    /// A valid certificate that names no consumer is refused (401) — the default; with
    /// `false` the request goes on authenticated but without a consumer.
    #[serde(default = "default_true")]
    pub require_consumer: bool,
    /// A consumer for requests without a certificate (instead of 401).
    #[serde(default)]
    pub anonymous: Option<String>,
}

fn default_by() -> Vec<By> {
    vec![By::CommonName, By::San]
}
fn default_true() -> bool {
    true
}

pub struct Mtls {
    by: Vec<By>,
    require_consumer: bool,
    anonymous: Option<String>,
    challenge: HeaderValue,
    identity: Arc<Identity>,
}

impl Mtls {
    pub fn new(s: Settings, identity: Arc<Identity>) -> Result<Self, SettingsErrors> {
        if s.consumer_by.is_empty() {
            return Err(vec![(
                KeyPath::root().key("consumer_by"),
                "give at least one of common_name, san, subject, fingerprint".into(),
            )]);
        }
        if let Some(a) = &s.anonymous {
            portico_config::identity::check_name(a)
                .map_err(|e| vec![(KeyPath::root().key("anonymous"), e)])?;
        }
        Ok(Mtls {
            by: s.consumer_by,
            require_consumer: s.require_consumer,
            anonymous: s.anonymous,
            challenge: HeaderValue::from_static("Mutual realm=\"portico\""),
            identity,
        })
    }

    fn names<'c>(&self, c: &'c ClientCert) -> impl Iterator<Item = &'c str> + use<'c, '_> {
        self.by
            .iter()
            .flat_map(move |b| -> Box<dyn Iterator<Item = &'c str> + 'c> {
                match b {
                    By::CommonName => Box::new(c.common_name.as_deref().into_iter()),
                    By::San => Box::new(c.sans.iter().map(String::as_str)),
                    By::Subject => Box::new(std::iter::once(c.subject.as_str())),
                    By::Fingerprint => Box::new(std::iter::once(c.fingerprint.as_str())),
                }
            })
    }
}

impl Policy for Mtls {
    fn name(&self) -> &'static str {
        "mtls"
    }

    fn auth(&self) -> Option<AuthInfo> {
        Some(info(&self.challenge, &self.anonymous))
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, _req: &'a mut Request<Body>) -> Step<'a> {
        let Some(cert) = ctx.client_cert.clone() else {
            return Step::cont();
        };
        let ix = self.identity.index();
        let consumer = self.names(&cert).find_map(|n| ix.cert_subject(n)).cloned();
        match consumer {
            Some(c) => {
                if ctx.consumer.is_none() {
                    ctx.consumer = Some(c);
                    ctx.auth = Some("mtls");
                }
            }
            None if self.require_consumer => {
                return unauthorized(
                    &self.challenge,
                    "the client certificate does not belong to a consumer",
                )
            }
            None => {
                if ctx.auth.is_none() {
                    ctx.auth = Some("mtls");
                }
            }
        }
        Step::cont()
    }
}
