//! The file form of the upstream resilience settings: `circuit_breaker:` and
//! `retries:` (with the retry budget), their defaults and their checks. The state
//! machines that use them (the breaker, the budget) live in `portico-upstream`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::diag::{Diagnostic, KeyPath};
use crate::model::Scalar;
use crate::units::{ByteSize, Dur};

/// Largest breaker sliding window (requests).
pub const MAX_WINDOW: u32 = 1000;
/// Largest number of half-open trial requests.
pub const MAX_HALF_OPEN_REQUESTS: u32 = 1000;
/// Longest retry budget window.
pub const MAX_WINDOW_SECS: u64 = 60;
/// Largest `attempts`.
pub const MAX_ATTEMPTS: u32 = 10;

/// The pause before a retry, with "full jitter" (AWS Architecture Blog, "Exponential
/// Backoff And Jitter"): a uniformly random time between 0 and
/// `min(max, base · 2^attempt)`. `attempt` is 0 before the first retry (the second
/// try), 1 before the second, ...; `rand01` is a random number in [0, 1) (values
/// outside are clamped, NaN counts as 0).
pub fn backoff(attempt: u32, base: Duration, max: Duration, rand01: f64) -> Duration {
    let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
    let cap = base.saturating_mul(factor).min(max);
    let r = if rand01.is_nan() {
        0.0
    } else {
        rand01.clamp(0.0, 1.0)
    };
    Duration::try_from_secs_f64(cap.as_secs_f64() * r)
        .unwrap_or(cap)
        .min(cap)
}

/// A share: a number between 0 and 1 (`0.5`) or a percentage (`50%`).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Ratio(pub f64);

impl Ratio {
    /// Whether the share is within 0..=1.
    pub fn is_share(self) -> bool {
        (0.0..=1.0).contains(&self.0)
    }

    /// A problem for a share out of range, worded for `key`.
    fn check(self, path: KeyPath, key: &str, out: &mut Vec<Diagnostic>) {
        if self.is_share() {
            return;
        }
        let mut d = Diagnostic::new(
            path,
            format!("{key} must be between 0 and 1 (got {})", self.0),
        );
        if self.0 > 1.0 && self.0 <= 100.0 {
            d = d.hint(format!("for a percentage write `{}%`", self.0));
        }
        out.push(d);
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Ratio;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a share: a number between 0 and 1 (e.g. 0.5) or a percentage (e.g. `50%`)",
                )
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Ratio, E> {
                Ok(Ratio(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ratio, E> {
                Ok(Ratio(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ratio, E> {
                Ok(Ratio(v as f64))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Ratio, E> {
                let t = s.trim();
                let (num, scale) = match t.strip_suffix('%') {
                    Some(n) => (n.trim_end(), 100.0),
                    None => (t, 1.0),
                };
                match num.parse::<f64>() {
                    Ok(v) if v.is_finite() => Ok(Ratio(v / scale)),
                    _ => Err(E::custom(format!(
                        "`{s}` is not a share; write a number between 0 and 1 (e.g. 0.5) or a percentage (e.g. `50%`)"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Ratio {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

impl JsonSchema for Ratio {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Ratio".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A share: a number between 0 and 1 (e.g. `0.5`) or a percentage (e.g. `50%`).",
            "anyOf": [
                {"type": "number"},
                {"type": "string", "pattern": "^ *[0-9]+(\\.[0-9]+)? *%? *$"}
            ]
        })
    }
}

/// `circuit_breaker:` of an upstream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// One breaker per target instead of one for the whole upstream.
    pub per_target: bool,
    /// Requests in the sliding window (1-1000).
    pub window: u32,
    /// Share of failed requests in the window that opens the breaker: `0.5` or `50%`.
    pub failure_rate: Ratio,
    /// Requests the window must hold before the failure rate is considered.
    pub min_requests: u32,
    /// Failures in a row that open the breaker regardless of the rate (0: off).
    pub consecutive_failures: u32,
    /// How long the breaker stays open.
    pub open_for: Dur,
    /// When set, each reopening after a failed trial doubles the open time, up to this.
    pub max_open_for: Option<Dur>,
    /// Trial requests let through when the open period is over; all must succeed to close.
    pub half_open_requests: u32,
    /// The answer while open, instead of the JSON 503 error with `Retry-After`.
    pub fallback: Option<Fallback>,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            per_target: false,
            window: 20,
            failure_rate: Ratio(0.5),
            min_requests: 10,
            consecutive_failures: 5,
            open_for: Dur(Duration::from_secs(30)),
            max_open_for: None,
            half_open_requests: 3,
            fallback: None,
        }
    }
}

/// A fixed answer given while the breaker is open.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Fallback {
    /// Status of the answer (200-599, default 503).
    pub status: u16,
    /// Headers of the answer.
    pub headers: BTreeMap<String, Scalar>,
    /// Body of the answer.
    pub body: String,
}

impl Default for Fallback {
    fn default() -> Self {
        Fallback {
            status: 503,
            headers: BTreeMap::new(),
            body: String::new(),
        }
    }
}

impl CircuitBreakerConfig {
    /// Problems with these settings, located below `at` (the `circuit_breaker` key).
    pub fn validate(&self, at: &KeyPath) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        if !(1..=MAX_WINDOW).contains(&self.window) {
            out.push(Diagnostic::new(
                at.key("window"),
                format!(
                    "window must be between 1 and {MAX_WINDOW} requests (got {})",
                    self.window
                ),
            ));
        }
        self.failure_rate
            .check(at.key("failure_rate"), "failure_rate", &mut out);
        if self.failure_rate.0 == 0.0 {
            out.push(
                Diagnostic::new(
                    at.key("failure_rate"),
                    "failure_rate must be more than 0 (0 would open on the first failure)",
                )
                .hint("to open on failures in a row, use `consecutive_failures`"),
            );
        }
        if self.min_requests == 0 {
            out.push(Diagnostic::new(
                at.key("min_requests"),
                "min_requests must be at least 1",
            ));
        } else if self.min_requests > self.window {
            out.push(Diagnostic::new(
                at.key("min_requests"),
                format!(
                    "min_requests ({}) must not exceed window ({}): the failure rate could never be reached",
                    self.min_requests, self.window
                ),
            ));
        }
        if self.open_for.0 < Duration::from_millis(1) {
            out.push(Diagnostic::new(
                at.key("open_for"),
                "open_for must be at least 1ms",
            ));
        }
        if let Some(max) = self.max_open_for {
            if max < self.open_for {
                out.push(Diagnostic::new(
                    at.key("max_open_for"),
                    format!(
                        "max_open_for ({max}) must not be shorter than open_for ({})",
                        self.open_for
                    ),
                ));
            }
        }
        if !(1..=MAX_HALF_OPEN_REQUESTS).contains(&self.half_open_requests) {
            out.push(Diagnostic::new(
                at.key("half_open_requests"),
                format!(
                    "half_open_requests must be between 1 and {MAX_HALF_OPEN_REQUESTS} (got {})",
                    self.half_open_requests
                ),
            ));
        }
        if let Some(fb) = &self.fallback {
            let p = at.key("fallback");
            if !(200..=599).contains(&fb.status) {
                out.push(Diagnostic::new(
                    p.key("status"),
                    format!(
                        "status must be a final status between 200 and 599 (got {})",
                        fb.status
                    ),
                ));
            }
            for (name, value) in &fb.headers {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    out.push(Diagnostic::new(
                        p.key("headers").key(name),
                        format!("`{name}` is not a valid header name"),
                    ));
                } else if http::HeaderValue::from_str(&value.0).is_err() {
                    out.push(Diagnostic::new(
                        p.key("headers").key(name),
                        format!("the value of `{name}` is not a valid header value"),
                    ));
                }
            }
        }
        out
    }
}

/// What makes a try worth repeating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// The connection (TCP or TLS) could not be made: nothing reached the upstream.
    ConnectError,
    /// The upstream closed or reset the connection before a response head arrived.
    Reset,
    /// No response head within the upstream's response timeout.
    Timeout,
    /// The upstream answered with this status.
    Status(u16),
}

const RETRY_ON_NAMES: [&str; 3] = ["connect_error", "reset", "timeout"];

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryOn::ConnectError => f.write_str("connect_error"),
            RetryOn::Reset => f.write_str("reset"),
            RetryOn::Timeout => f.write_str("timeout"),
            RetryOn::Status(s) => write!(f, "{s}"),
        }
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = RetryOn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("connect_error, reset, timeout or a status code")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RetryOn, E> {
                u16::try_from(v)
                    .map(RetryOn::Status)
                    .map_err(|_| E::custom(format!("{v} is not a status code")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RetryOn, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a status code")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RetryOn, E> {
                match s {
                    "connect_error" => Ok(RetryOn::ConnectError),
                    "reset" => Ok(RetryOn::Reset),
                    "timeout" => Ok(RetryOn::Timeout),
                    _ => match s.parse::<u16>() {
                        Ok(n) => Ok(RetryOn::Status(n)),
                        Err(_) => {
                            let mut m = format!(
                                "unknown retry condition `{s}`; expected connect_error, reset, timeout or a status code"
                            );
                            if let Some(c) = crate::diag::closest(s, RETRY_ON_NAMES) {
                                m.push_str(&format!(" (did you mean `{c}`?)"));
                            }
                            Err(E::custom(m))
                        }
                    },
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::Status(n) => s.serialize_u16(*n),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl JsonSchema for RetryOn {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RetryOn".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "`connect_error`, `reset`, `timeout` or a status code (e.g. 503).",
            "anyOf": [
                {"type": "string", "enum": RETRY_ON_NAMES},
                {"type": "integer", "minimum": 0, "maximum": 65535},
                {"type": "string", "pattern": "^[0-9]{3}$"}
            ]
        })
    }
}

/// `retries:` of an upstream (or, replacing it, of a route).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetriesConfig {
    /// Tries in all, the first included (1: no retries).
    pub attempts: u32,
    /// What makes a try worth repeating: `connect_error`, `reset`, `timeout`, status codes.
    pub on: Vec<RetryOn>,
    /// Methods that may be retried after the request reached the upstream
    /// (`connect_error` retries any method: nothing was sent).
    pub methods: Vec<String>,
    /// The pause between tries.
    pub backoff: BackoffConfig,
    /// The share of requests that may be retried.
    pub budget: BudgetConfig,
    /// A request body up to this size is kept so the request can be sent again; a
    /// larger one is streamed and the request is not retried once its body was sent.
    pub max_replay_body: ByteSize,
}

impl Default for RetriesConfig {
    fn default() -> Self {
        RetriesConfig {
            attempts: 3,
            on: vec![
                RetryOn::ConnectError,
                RetryOn::Reset,
                RetryOn::Status(502),
                RetryOn::Status(503),
                RetryOn::Status(504),
            ],
            methods: ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
                .map(String::from)
                .to_vec(),
            backoff: BackoffConfig::default(),
            budget: BudgetConfig::default(),
            max_replay_body: ByteSize(64 * 1024),
        }
    }
}

/// `retries.backoff`: exponential with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// The longest pause before the first retry; doubles with each retry.
    pub base: Dur,
    /// The longest pause at all.
    pub max: Dur,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Dur(Duration::from_millis(25)),
            max: Dur(Duration::from_millis(250)),
        }
    }
}

/// `retries.budget`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Share of requests that may be retried: `0.2` or `20%`.
    pub ratio: Ratio,
    /// Retries allowed in every second whatever the share.
    pub min_per_second: u32,
    /// How long a request counts towards the share (whole seconds, 1s-60s).
    pub window: Dur,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: Ratio(0.2),
            min_per_second: 10,
            window: Dur(Duration::from_secs(10)),
        }
    }
}

const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

impl RetriesConfig {
    /// Problems with these settings, located below `at` (the `retries` key).
    pub fn validate(&self, at: &KeyPath) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        if !(1..=MAX_ATTEMPTS).contains(&self.attempts) {
            out.push(
                Diagnostic::new(
                    at.key("attempts"),
                    format!(
                        "attempts must be between 1 and {MAX_ATTEMPTS} (got {})",
                        self.attempts
                    ),
                )
                .hint("attempts counts every try, the first included"),
            );
        }
        if self.on.is_empty() && self.attempts > 1 {
            out.push(Diagnostic::new(
                at.key("on"),
                "on must name at least one condition, or nothing is retried",
            ));
        }
        for (i, c) in self.on.iter().enumerate() {
            if let RetryOn::Status(s) = c {
                if !(400..=599).contains(s) {
                    out.push(Diagnostic::new(
                        at.key("on").index(i),
                        format!("{s} is not an error status (400-599)"),
                    ));
                }
            }
        }
        for (i, m) in self.methods.iter().enumerate() {
            let up = m.to_ascii_uppercase();
            let p = at.key("methods").index(i);
            if *m != up && KNOWN_METHODS.contains(&up.as_str()) {
                out.push(Diagnostic::new(
                    p,
                    format!("methods are upper-case: write `{up}`"),
                ));
            } else if http::Method::from_bytes(m.as_bytes()).is_err() {
                out.push(
                    Diagnostic::new(p, format!("`{m}` is not an HTTP method"))
                        .suggest(&up, KNOWN_METHODS),
                );
            }
        }
        if self.backoff.max < self.backoff.base {
            out.push(Diagnostic::new(
                at.key("backoff").key("max"),
                format!(
                    "backoff.max ({}) must not be shorter than backoff.base ({})",
                    self.backoff.max, self.backoff.base
                ),
            ));
        }
        let b = at.key("budget");
        self.budget
            .ratio
            .check(b.key("ratio"), "budget.ratio", &mut out);
        let w = self.budget.window.0;
        if w.subsec_nanos() != 0 || !(1..=MAX_WINDOW_SECS).contains(&w.as_secs()) {
            out.push(Diagnostic::new(
                b.key("window"),
                format!(
                    "budget.window must be whole seconds between 1s and {MAX_WINDOW_SECS}s (got {})",
                    self.budget.window
                ),
            ));
        }
        out
    }

    /// Whether `method` may be retried after the request reached the upstream.
    pub fn retries_method(&self, method: &http::Method) -> bool {
        self.methods.iter().any(|m| m == method.as_str())
    }

    /// Whether `cond` is one of the configured conditions.
    pub fn retries_on(&self, cond: RetryOn) -> bool {
        self.on.contains(&cond)
    }

    /// The pause before retry number `attempt` (0 before the second try).
    pub fn backoff(&self, attempt: u32, rand01: f64) -> Duration {
        backoff(attempt, self.backoff.base.0, self.backoff.max.0, rand01)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse_cb(yaml: &str) -> Result<CircuitBreakerConfig, String> {
        let (v, _) = crate::yaml::parse(yaml).map_err(|d| d.to_string())?;
        CircuitBreakerConfig::deserialize(v).map_err(|e| e.to_string())
    }

    #[test]
    fn breaker_config_defaults_and_full_form() {
        let c = parse_cb("{}").unwrap();
        assert_eq!(c, CircuitBreakerConfig::default());
        assert!(c.validate(&KeyPath::root()).is_empty());

        let c = parse_cb(
            "window: 50\nfailure_rate: 25%\nmin_requests: 20\nconsecutive_failures: 0\n\
             open_for: 10s\nmax_open_for: 5m\nhalf_open_requests: 5\nper_target: true\n\
             fallback:\n  status: 200\n  headers: {content-type: application/json, x-n: 1}\n  body: '{\"items\":[]}'\n",
        )
        .unwrap();
        assert!(c.validate(&KeyPath::root()).is_empty());
        assert_eq!(c.failure_rate, Ratio(0.25));
        assert_eq!(c.consecutive_failures, 0);
        assert_eq!(c.max_open_for, Some(Dur(Duration::from_secs(300))));
        assert!(c.per_target);
        let fb = c.fallback.unwrap();
        assert_eq!(fb.status, 200);
        assert_eq!(fb.headers["x-n"].0, "1");
        assert_eq!(fb.body, "{\"items\":[]}");

        assert_eq!(
            parse_cb("failure_rate: 0.5").unwrap().failure_rate,
            Ratio(0.5)
        );
        assert!(parse_cb("failure_rate: half")
            .unwrap_err()
            .contains("not a share"));
        assert!(parse_cb("windw: 3").unwrap_err().contains("unknown field"));
        assert!(parse_cb("open_for: 3").is_err());
    }

    #[test]
    fn breaker_config_validate_reports_key_paths() {
        let c = parse_cb(
            "window: 5\nfailure_rate: 50\nmin_requests: 6\nopen_for: 1m\nmax_open_for: 30s\n\
             half_open_requests: 0\nfallback: {status: 99, headers: {'bad name': x}}\n",
        )
        .unwrap();
        let at = KeyPath::parse("upstreams.api.circuit_breaker");
        let d: Vec<String> = c.validate(&at).iter().map(|d| d.to_string()).collect();
        assert_eq!(
            d,
            [
                "upstreams.api.circuit_breaker.failure_rate: failure_rate must be between 0 and 1 (got 50) (for a percentage write `50%`)",
                "upstreams.api.circuit_breaker.min_requests: min_requests (6) must not exceed window (5): the failure rate could never be reached",
                "upstreams.api.circuit_breaker.max_open_for: max_open_for (30s) must not be shorter than open_for (60s)",
                "upstreams.api.circuit_breaker.half_open_requests: half_open_requests must be between 1 and 1000 (got 0)",
                "upstreams.api.circuit_breaker.fallback.status: status must be a final status between 200 and 599 (got 99)",
                "upstreams.api.circuit_breaker.fallback.headers[\"bad name\"]: `bad name` is not a valid header name",
            ]
        );
        let c = parse_cb("window: 0\nfailure_rate: 0\nmin_requests: 0\nopen_for: 0ms").unwrap();
        let d: Vec<String> = c
            .validate(&KeyPath::root())
            .iter()
            .map(|d| d.message.clone())
            .collect();
        assert_eq!(d.len(), 4, "{d:?}");
    }

    #[test]
    fn breaker_config_schema() {
        let schema = schemars::schema_for!(CircuitBreakerConfig);
        let s = schema.as_value();
        assert_eq!(s["additionalProperties"], false);
        assert!(s["properties"]["failure_rate"].is_object());
        assert!(s["properties"]["fallback"].is_object());
    }

    fn parse_re(yaml: &str) -> Result<RetriesConfig, String> {
        let (v, _) = crate::yaml::parse(yaml).map_err(|d| d.to_string())?;
        RetriesConfig::deserialize(v).map_err(|e| e.to_string())
    }

    #[test]
    fn budget_retries_config_defaults_and_full_form() {
        let c = parse_re("{}").unwrap();
        assert_eq!(c, RetriesConfig::default());
        assert!(c.validate(&KeyPath::root()).is_empty());
        assert!(c.retries_method(&http::Method::PUT));
        assert!(!c.retries_method(&http::Method::POST));
        assert!(!c.retries_on(RetryOn::Timeout));

        let c = parse_re(
            "attempts: 4\non: [connect_error, reset, timeout, 502, '503', 429]\n\
             methods: [GET, POST]\nbackoff: {base: 10ms, max: 1s}\n\
             budget: {ratio: 10%, min_per_second: 5, window: 30s}\nmax_replay_body: 1MiB\n",
        )
        .unwrap();
        assert!(c.validate(&KeyPath::root()).is_empty());
        assert_eq!(
            c.on,
            [
                RetryOn::ConnectError,
                RetryOn::Reset,
                RetryOn::Timeout,
                RetryOn::Status(502),
                RetryOn::Status(503),
                RetryOn::Status(429)
            ]
        );
        assert!(c.retries_on(RetryOn::Status(429)));
        assert_eq!(c.budget.ratio, Ratio(0.1));
        assert_eq!(c.max_replay_body, ByteSize(1 << 20));
        assert_eq!(c.backoff(0, 1.0), Duration::from_millis(10));
        assert_eq!(c.backoff(10, 1.0), Duration::from_secs(1));
        assert_eq!(c.budget.min_per_second, 5);
        assert_eq!(c.budget.window, Dur(Duration::from_secs(30)));

        let e = parse_re("on: [conect_error]").unwrap_err();
        assert!(e.contains("did you mean `connect_error`"), "{e}");
        assert!(parse_re("on: [70000]").is_err());
        assert!(parse_re("budget: {ratoi: 0.1}")
            .unwrap_err()
            .contains("unknown field"));
        assert!(parse_re("attempt: 3")
            .unwrap_err()
            .contains("unknown field"));
    }

    #[test]
    fn budget_retries_config_validate_reports_key_paths() {
        let c = parse_re(
            "attempts: 0\non: [200, 503]\nmethods: [get, 'NO SUCH']\n\
             backoff: {base: 1s, max: 100ms}\nbudget: {ratio: 20, window: 1500ms}\n",
        )
        .unwrap();
        let at = KeyPath::parse("upstreams.api.retries");
        let d: Vec<String> = c.validate(&at).iter().map(|d| d.to_string()).collect();
        assert_eq!(
            d,
            [
                "upstreams.api.retries.attempts: attempts must be between 1 and 10 (got 0) (attempts counts every try, the first included)",
                "upstreams.api.retries.on[0]: 200 is not an error status (400-599)",
                "upstreams.api.retries.methods[0]: methods are upper-case: write `GET`",
                "upstreams.api.retries.methods[1]: `NO SUCH` is not an HTTP method",
                "upstreams.api.retries.backoff.max: backoff.max (100ms) must not be shorter than backoff.base (1s)",
                "upstreams.api.retries.budget.ratio: budget.ratio must be between 0 and 1 (got 20) (for a percentage write `20%`)",
                "upstreams.api.retries.budget.window: budget.window must be whole seconds between 1s and 60s (got 1500ms)",
            ]
        );
        let c = parse_re("attempts: 2\non: []").unwrap();
        assert_eq!(c.validate(&KeyPath::root()).len(), 1);
    }

    #[test]
    fn budget_retries_config_schema() {
        let schema = schemars::schema_for!(RetriesConfig);
        let s = schema.as_value();
        assert_eq!(s["additionalProperties"], false);
        assert!(s["properties"]["on"].is_object());
        assert!(s["properties"]["budget"].is_object());
    }
}

/// `adaptive_concurrency:` — an in-flight limit per upstream that follows latency
/// (docs/upstreams.md, "Adaptive concurrency").
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConcurrency {
    /// The limit to start from (default 20).
    #[serde(default = "default_initial_limit")]
    pub initial_limit: u32,
    /// The limit never goes below this, and is this while the no-load latency is
    /// measured (default 3).
    #[serde(default = "default_min_limit")]
    pub min_limit: u32,
    /// The limit never goes above this (default 1000).
    #[serde(default = "default_max_limit")]
    pub max_limit: u32,
    /// How often the limit is recomputed from the latencies seen (default 1s).
    #[serde(default = "default_adaptive_window")]
    pub window: Dur,
    /// Fewer samples than this in a window: it is merged into the next (default 10).
    #[serde(default = "default_min_samples")]
    pub min_samples: u32,
    /// How much slower than usual answers may get before the limit falls (default 1.5:
    /// 50 % slower).
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// The share of the computed change applied per window, 0–1 (default 0.2).
    #[serde(default = "default_smoothing")]
    pub smoothing: f64,
    /// How often the no-load latency is measured again (default 30s).
    #[serde(default = "default_min_rtt_interval")]
    pub min_rtt_interval: Dur,
}

fn default_min_rtt_interval() -> Dur {
    Dur(Duration::from_secs(30))
}

fn default_initial_limit() -> u32 {
    20
}
fn default_min_limit() -> u32 {
    3
}
fn default_max_limit() -> u32 {
    1000
}
fn default_adaptive_window() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_min_samples() -> u32 {
    10
}
fn default_tolerance() -> f64 {
    1.5
}
fn default_smoothing() -> f64 {
    0.2
}

impl AdaptiveConcurrency {
    pub fn validate(&self, p: &KeyPath) -> Vec<Diagnostic> {
        let mut d = Vec::new();
        if self.min_limit == 0 {
            d.push(Diagnostic::new(
                p.key("min_limit"),
                "`min_limit` must be at least 1",
            ));
        }
        if self.min_limit > self.max_limit {
            d.push(Diagnostic::new(
                p.key("min_limit"),
                "`min_limit` is above `max_limit`",
            ));
        }
        if self.min_rtt_interval.0 < self.window.0 {
            d.push(Diagnostic::new(
                p.key("min_rtt_interval"),
                "`min_rtt_interval` must be at least `window`",
            ));
        }
        if self.window.0.as_millis() < 10 {
            d.push(Diagnostic::new(
                p.key("window"),
                "`window` must be at least 10ms",
            ));
        }
        if !(self.tolerance >= 1.0 && self.tolerance <= 10.0) {
            d.push(Diagnostic::new(
                p.key("tolerance"),
                format!(
                    "`tolerance` must be between 1 and 10, not {}",
                    self.tolerance
                ),
            ));
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            d.push(Diagnostic::new(
                p.key("smoothing"),
                format!(
                    "`smoothing` must be above 0 and at most 1, not {}",
                    self.smoothing
                ),
            ));
        }
        d
    }
}

/// `hedging:` — a second try to another target when the first is slow.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hedging {
    /// How long the first try may go unanswered before the hedge is sent: a duration,
    /// or `p95` (the upstream's recent 95th percentile latency; default).
    #[serde(default)]
    pub delay: HedgeDelay,
    /// The least delay when it comes from `p95` (default 10ms).
    #[serde(default = "default_min_hedge_delay")]
    pub min_delay: Dur,
}

fn default_min_hedge_delay() -> Dur {
    Dur(Duration::from_millis(10))
}

/// When to hedge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HedgeDelay {
    /// The upstream's observed 95th percentile latency.
    #[default]
    P95,
    /// A fixed time.
    Fixed(Dur),
}

impl Serialize for HedgeDelay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HedgeDelay::P95 => s.serialize_str("p95"),
            HedgeDelay::Fixed(d) => d.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for HedgeDelay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "p95" {
            return Ok(HedgeDelay::P95);
        }
        let dur = crate::units::parse_duration(&s).map_err(|e| {
            de::Error::custom(format!("`{s}` is neither `p95` nor a duration: {e}"))
        })?;
        Ok(HedgeDelay::Fixed(Dur(dur)))
    }
}

impl JsonSchema for HedgeDelay {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HedgeDelay".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "`p95` or a duration such as `50ms`",
            "type": "string",
            "pattern": "^(p95|[0-9]+(\\.[0-9]+)?(ms|s|m|h))$"
        })
    }
}

impl Hedging {
    pub fn validate(&self, p: &KeyPath) -> Vec<Diagnostic> {
        let mut d = Vec::new();
        if let HedgeDelay::Fixed(t) = self.delay {
            if t.0.is_zero() {
                d.push(Diagnostic::new(
                    p.key("delay"),
                    "a hedging `delay` of 0 would double every request; give a time or `p95`",
                ));
            }
        }
        d
    }
}
