//! `acl`: allow or refuse authenticated consumers by group. Runs after
//! authentication. `deny` wins over `allow`; with an `allow` list, a consumer in
//! none of its groups is refused. A request without a consumer is refused with 401
//! (it was not authenticated) or 403 (authenticated by a token that names no
//! consumer, so its groups are unknown).

use http::Request;
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{Policy, Step};
use crate::registry::SettingsErrors;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Consumers in at least one of these groups are let through.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Consumers in any of these groups are refused (even when also allowed).
    #[serde(default)]
    pub deny: Vec<String>,
}

pub struct Acl {
    allow: Vec<String>,
    deny: Vec<String>,
}

impl Acl {
    pub fn new(s: Settings) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        if s.allow.is_empty() && s.deny.is_empty() {
            errs.push((
                KeyPath::root(),
                "give `allow`, `deny` or both (lists of consumer groups)".into(),
            ));
        }
        for (key, list) in [("allow", &s.allow), ("deny", &s.deny)] {
            for (i, g) in list.iter().enumerate() {
                if let Err(e) = portico_config::identity::check_group(g) {
                    errs.push((KeyPath::root().key(key).index(i), e));
                }
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Acl {
            allow: s.allow,
            deny: s.deny,
        })
    }
}

impl Policy for Acl {
    fn name(&self) -> &'static str {
        "acl"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, _req: &'a mut Request<Body>) -> Step<'a> {
        let Some(c) = &ctx.consumer else {
            return if ctx.auth.is_some() {
                Step::error(GatewayError::new(
                    ErrorKind::Forbidden,
                    "this route allows consumers by group; the credential names no consumer",
                ))
            } else {
                Step::error(GatewayError::new(
                    ErrorKind::Unauthorized,
                    "this route needs an authenticated consumer",
                ))
            };
        };
        let denied = self.deny.iter().any(|g| c.in_group(g))
            || (!self.allow.is_empty() && !self.allow.iter().any(|g| c.in_group(g)));
        if denied {
            return Step::error(GatewayError::new(
                ErrorKind::Forbidden,
                "this consumer is not allowed to use this route",
            ));
        }
        Step::cont()
    }
}
