//! `key-auth`: API keys. A key is looked up by its SHA-256 digest in the consumer
//! index (one hash, one map probe); the store and the index keep only digests.
//!
//! Where the key is read, in order (first found wins): `locations`, default
//! `header:apikey` then `query:apikey`. `bearer` reads `Authorization: Bearer <key>`.
//! The key is removed from the request before it goes upstream unless
//! `forward_credentials: true`.

use http::header::AUTHORIZATION;
use http::{HeaderName, HeaderValue, Request};
use portico_config::KeyPath;
use portico_store::{now_secs, Identity, KeyLookup};
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;

use super::auth::{info, unauthorized, without_query_param, REALM};
use crate::body::Body;
use crate::ctx::{query_param, Ctx};
use crate::policy::{AuthInfo, Policy, Step};
use crate::registry::SettingsErrors;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where to read the key, in order: `header:NAME`, `query:NAME` or `bearer`
    /// (`Authorization: Bearer <key>`). Default: `[header:apikey, query:apikey]`.
    #[serde(default = "default_locations")]
    pub locations: Vec<String>,
    /// Send the key on to the upstream (default: removed).
    #[serde(default)]
    pub forward_credentials: bool,
    /// A consumer for requests that carry no key (instead of 401).
    #[serde(default)]
    pub anonymous: Option<String>,
}

fn default_locations() -> Vec<String> {
    vec!["header:apikey".into(), "query:apikey".into()]
}

#[derive(Debug)]
enum Location {
    Header(HeaderName),
    Query(Arc<str>),
    Bearer,
}

pub struct KeyAuth {
    locations: Vec<Location>,
    forward: bool,
    anonymous: Option<String>,
    challenge: HeaderValue,
    identity: Arc<Identity>,
}

impl KeyAuth {
    pub fn new(s: Settings, identity: Arc<Identity>) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        let mut locations = Vec::new();
        for (i, l) in s.locations.iter().enumerate() {
            let p = KeyPath::root().key("locations").index(i);
            match l.split_once(':') {
                Some(("header", n)) => match HeaderName::from_bytes(n.as_bytes()) {
                    Ok(h) => locations.push(Location::Header(h)),
                    Err(_) => errs.push((p, format!("`{n}` is not a valid header name"))),
                },
                Some(("query", n)) if !n.is_empty() => {
                    locations.push(Location::Query(Arc::from(n)))
                }
                None if l == "bearer" => locations.push(Location::Bearer),
                _ => errs.push((
                    p,
                    format!(
                        "`{l}` is not a key location: use `header:NAME`, `query:NAME` or `bearer`"
                    ),
                )),
            }
        }
        if s.locations.is_empty() {
            errs.push((
                KeyPath::root().key("locations"),
                "at least one location is needed".into(),
            ));
        }
        if let Some(a) = &s.anonymous {
            if let Err(e) = portico_config::identity::check_name(a) {
                errs.push((KeyPath::root().key("anonymous"), e));
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let bearer = locations.iter().any(|l| matches!(l, Location::Bearer));
        let challenge = if bearer {
            format!("Bearer realm=\"{REALM}\"")
        } else {
            format!("ApiKey realm=\"{REALM}\"")
        };
        Ok(KeyAuth {
            locations,
            forward: s.forward_credentials,
            anonymous: s.anonymous,
            challenge: HeaderValue::from_str(&challenge)
                .unwrap_or_else(|_| HeaderValue::from_static("ApiKey")),
            identity,
        })
    }

    /// The key and where it was found.
    fn find<'r>(&self, req: &'r Request<Body>) -> Option<(std::borrow::Cow<'r, str>, &Location)> {
        for l in &self.locations {
            let v = match l {
                Location::Header(h) => req
                    .headers()
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .map(std::borrow::Cow::Borrowed),
                Location::Query(n) => query_param(req.uri().query(), n),
                Location::Bearer => req
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        let (scheme, rest) = v.split_once(' ')?;
                        scheme
                            .eq_ignore_ascii_case("bearer")
                            .then(|| std::borrow::Cow::Borrowed(rest.trim()))
                    }),
            };
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                return Some((v, l));
            }
        }
        None
    }
}

impl Policy for KeyAuth {
    fn name(&self) -> &'static str {
        "key-auth"
    }

    fn auth(&self) -> Option<AuthInfo> {
        Some(info(&self.challenge, &self.anonymous))
    }

    fn secret_params(&self) -> Vec<Arc<str>> {
        self.locations
            .iter()
            .filter_map(|l| match l {
                Location::Query(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        // Two values for the key header: the gateway and the upstream could each read
        // a different one.
        if self.locations.iter().any(|l| {
            matches!(l, Location::Header(h) if req.headers().get_all(h).iter().nth(1).is_some())
        }) {
            return unauthorized(&self.challenge, "the request has more than one API key");
        }
        let Some((key, at)) = self.find(req) else {
            // A key header that is there but not readable text is a wrong key, not a
            // missing one (it must not fall through to the anonymous consumer).
            if self.locations.iter().any(|l| {
                matches!(l, Location::Header(h) if req.headers().get(h).is_some_and(|v| v.to_str().is_err()))
            }) {
                return unauthorized(&self.challenge, "the API key is not valid");
            }
            return Step::cont();
        };
        if let Location::Query(n) = at {
            ctx.secret_query = Some(n.clone());
        }
        let consumer = match self.identity.index().key(key.as_bytes(), now_secs()) {
            KeyLookup::Valid(e) => e.consumer.clone(),
            KeyLookup::Expired(_) => {
                return unauthorized(&self.challenge, "the API key has expired")
            }
            KeyLookup::Unknown => return unauthorized(&self.challenge, "the API key is not valid"),
        };
        drop(key);
        if !self.forward {
            match at {
                Location::Header(h) => {
                    req.headers_mut().remove(h);
                }
                Location::Query(n) => {
                    let n = n.clone();
                    *req.uri_mut() = without_query_param(req.uri(), &n);
                }
                Location::Bearer => {
                    req.headers_mut().remove(AUTHORIZATION);
                }
            }
        }
        // The first policy that names a consumer decides (an earlier one may have
        // authenticated the request without naming one).
        if ctx.consumer.is_none() {
            ctx.consumer = Some(consumer);
            ctx.auth = Some("key-auth");
        }
        Step::cont()
    }
}
