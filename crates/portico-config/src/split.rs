//! The file form of a route's traffic shaping between upstreams: weighted splits
//! (canary, A/B: `upstreams:` and `split:`) and mirroring (`mirror:`), with their
//! checks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::diag::{Diagnostic, KeyPath};
use crate::grammar::KeySpec;
use crate::units::ByteSize;

/// One upstream of a split and its share.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightedUpstream {
    /// An upstream defined in `upstreams`.
    pub name: String,
    /// Relative share of the route's requests (0: none, unless an override names it).
    pub weight: u32,
}

/// How requests are assigned to the upstreams of a split.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// A request key (`cookie:session`, `header:x-user`, `consumer`, ...): requests with
    /// the same value always go to the same upstream while the weights stay the same.
    /// Requests without it are split by weight.
    #[serde(default)]
    pub sticky: Option<KeySpec>,
    /// A request header that picks the upstream: its value is an upstream name of the
    /// split, `always` (the upstream with the smallest weight: the canary) or `never`
    /// (the one with the largest). Other values are ignored.
    #[serde(default)]
    pub override_header: Option<String>,
    /// The same, from a cookie.
    #[serde(default)]
    pub override_cookie: Option<String>,
}

/// Send a copy of requests to another upstream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// The upstream that gets the copies.
    pub upstream: String,
    /// Share of the route's requests mirrored, 0–100 (default 100).
    #[serde(default = "default_percent")]
    pub percent: f64,
    /// Requests with a body larger than this (or of unknown length larger than this)
    /// are not mirrored (default 64KiB): a copy must be kept until it is sent.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// At most this many copies in flight for the route; more are skipped (default 64).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Compare the mirror's answer with the primary's.
    #[serde(default)]
    pub compare: Option<Compare>,
}

fn default_percent() -> f64 {
    100.0
}
fn default_max_body() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_max_in_flight() -> u32 {
    64
}

/// What of the two answers must agree.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Compare {
    /// The status codes (default true).
    #[serde(default = "default_true")]
    pub status: bool,
    /// These response headers (absent on both counts as equal).
    #[serde(default)]
    pub headers: Vec<String>,
    /// The bodies: as JSON when both parse (object key order and formatting do not
    /// matter), else byte for byte (default true).
    #[serde(default = "default_true")]
    pub body: bool,
    /// JSON pointers left out of the body comparison (`/meta/request_id`, `/items/0/ts`);
    /// a `*` segment matches every array index or object key.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Bodies larger than this are not compared (default 1MiB).
    #[serde(default = "default_max_compare")]
    pub max_body: ByteSize,
    /// At most this many mismatches logged per minute (default 10); all are counted.
    #[serde(default = "default_log_per_minute")]
    pub log_per_minute: u32,
}

fn default_true() -> bool {
    true
}
fn default_max_compare() -> ByteSize {
    ByteSize(1024 * 1024)
}
fn default_log_per_minute() -> u32 {
    10
}

impl Mirror {
    pub fn validate(&self, p: &KeyPath) -> Vec<Diagnostic> {
        let mut d = Vec::new();
        if !(0.0..=100.0).contains(&self.percent) || self.percent.is_nan() {
            d.push(Diagnostic::new(
                p.key("percent"),
                format!("{} is not a percentage (0-100)", self.percent),
            ));
        }
        if self.max_in_flight == 0 {
            d.push(Diagnostic::new(
                p.key("max_in_flight"),
                "`max_in_flight` must be at least 1",
            ));
        }
        if let Some(c) = &self.compare {
            let q = p.key("compare");
            for (i, h) in c.headers.iter().enumerate() {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    d.push(Diagnostic::new(
                        q.key("headers").index(i),
                        format!("`{h}` is not a valid header name"),
                    ));
                }
            }
            for (i, ptr) in c.ignore.iter().enumerate() {
                if !ptr.starts_with('/') {
                    d.push(Diagnostic::new(
                        q.key("ignore").index(i),
                        format!("`{ptr}` is not a JSON pointer (it starts with `/`)"),
                    ));
                }
            }
        }
        d
    }
}

impl Split {
    pub fn validate(&self, p: &KeyPath) -> Vec<Diagnostic> {
        let mut d = Vec::new();
        if let Some(h) = &self.override_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                d.push(Diagnostic::new(
                    p.key("override_header"),
                    format!("`{h}` is not a valid header name"),
                ));
            }
        }
        if let Some(c) = &self.override_cookie {
            if c.is_empty() || c.contains([';', '=', ' ']) {
                d.push(Diagnostic::new(
                    p.key("override_cookie"),
                    format!("`{c}` is not a cookie name"),
                ));
            }
        }
        d
    }
}
