//! `data-masking`: mask or remove sensitive values in response bodies
//! (docs/transform.md#data-masking).
//!
//! - Detectors (`detect`): payment card numbers (13–19 digits, Luhn-checked; all but the
//!   last 4 digits become `*`), IBANs (mod-97 checked; all but the country code and
//!   the last 4 characters become `*`), e-mail addresses (`j***@example.com`), phone
//!   numbers (international `+…`/`00…`, or `(555) 123-4567` style, 7–15 digits; all
//!   but the last 2 digits become `*`). Separators are kept.
//! - `pointers`: values at JSON pointers (`*` wildcards), masked as `"****"`.
//! - `patterns`: custom regular expressions; each match becomes its `replace` (regex
//!   syntax, `$1`) or as many `*` as it has characters.
//! - `action: remove`: in JSON the member or item holding a match is removed; in text
//!   the match becomes `[REDACTED]`.
//!
//! JSON bodies (`application/json`, `+json`) are walked (string values only, never
//! member names); text bodies (`text/*`, `application/xml`, `+xml`) are scanned as
//! text. A body the policy cannot read — over `max_body`, or content-encoded although
//! the upstream was asked for `identity` — is refused (502) unless `on_unreadable: pass`.

use std::borrow::Cow;

use bytes::Bytes;
use portico_config::units::ByteSize;
use portico_config::KeyPath;
use regex::{Captures, Regex};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::body::{self, Body, Buffered};
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::plugins::jsonops::{self, Pointer, Seg};
use crate::plugins::transform::{ask_identity, upstream_body_error};
use crate::policy::{BodyStep, Policy};
use crate::registry::SettingsErrors;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    Card,
    Iban,
    Email,
    Phone,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Mask,
    Remove,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Unreadable {
    /// Answer `502 response_not_transformable`.
    #[default]
    Reject,
    /// Send the body unmasked (logged as a warning).
    Pass,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pattern {
    /// A regular expression.
    pub regex: String,
    /// What a match becomes (`$1`, `${name}` for captures). Default: one `*` per character.
    #[serde(default)]
    pub replace: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Built-in detectors: `card`, `iban`, `email`, `phone`.
    #[serde(default)]
    pub detect: Vec<Detector>,
    /// JSON pointers whose values are masked or removed (`*` matches every member or item).
    #[serde(default)]
    pub pointers: Vec<String>,
    /// Custom regular expressions.
    #[serde(default)]
    pub patterns: Vec<Pattern>,
    /// `mask` (default) or `remove`.
    #[serde(default)]
    pub action: Action,
    /// Largest body that is scanned. Default `1MiB`.
    #[serde(default)]
    pub max_body: Option<ByteSize>,
    /// A body that cannot be scanned (over `max_body`, or compressed): `reject` (502,
    /// default) or `pass`.
    #[serde(default)]
    pub on_unreadable: Unreadable,
}

struct Rule {
    regex: Regex,
    kind: RuleKind,
}

enum RuleKind {
    Card,
    Iban,
    Email,
    Phone,
    Custom(Option<String>),
}

pub struct DataMasking {
    rules: Vec<Rule>,
    pointers: Vec<Pointer>,
    action: Action,
    max_body: u64,
    on_unreadable: Unreadable,
}

/// The Luhn checksum of a string of digits.
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut n = u32::from(d - b'0');
        if !i.is_multiple_of(2) {
            n *= 2;
            if n > 9 {
                n -= 9;
            }
        }
        sum += n;
    }
    sum.is_multiple_of(10)
}

/// The IBAN check (ISO 13616: move the first 4 characters to the end, letters as
/// 10–35, the number mod 97 must be 1). `s`: upper-case letters and digits.
pub fn iban_valid(s: &[u8]) -> bool {
    if !(15..=34).contains(&s.len()) || !s[..2].iter().all(u8::is_ascii_uppercase) {
        return false;
    }
    let mut rem = 0u32;
    for &c in s[4..].iter().chain(&s[..4]) {
        match c {
            b'0'..=b'9' => rem = (rem * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => rem = (rem * 100 + u32::from(c - b'A') + 10) % 97,
            _ => return false,
        }
    }
    rem == 1
}

/// Replace every character of `s` for which `hide(index among counted, total)` holds
/// by `*`; `count` says which characters are counted (digits, alphanumerics).
fn star(s: &str, count: impl Fn(char) -> bool, keep: impl Fn(usize, usize) -> bool) -> String {
    let total = s.chars().filter(|c| count(*c)).count();
    let mut i = 0;
    s.chars()
        .map(|c| {
            if !count(c) {
                return c;
            }
            let k = keep(i, total);
            i += 1;
            if k {
                c
            } else {
                '*'
            }
        })
        .collect()
}

impl Rule {
    /// The replacement of one match, or `None` when the match is not what the rule
    /// is after (fails its checksum).
    fn mask(&self, caps: &Captures<'_>) -> Option<String> {
        let m = caps.get(0)?.as_str();
        match &self.kind {
            RuleKind::Card => {
                let digits: Vec<u8> = m.bytes().filter(u8::is_ascii_digit).collect();
                ((13..=19).contains(&digits.len()) && luhn(&digits))
                    .then(|| star(m, |c| c.is_ascii_digit(), |i, n| i + 4 >= n))
            }
            RuleKind::Iban => {
                let compact: Vec<u8> = m.bytes().filter(|b| *b != b' ').collect();
                iban_valid(&compact)
                    .then(|| star(m, |c| c.is_ascii_alphanumeric(), |i, n| i < 2 || i + 4 >= n))
            }
            RuleKind::Email => {
                let (local, domain) = m.split_once('@')?;
                let first = local.chars().next()?;
                Some(format!("{first}***@{domain}"))
            }
            RuleKind::Phone => {
                let n = m.bytes().filter(u8::is_ascii_digit).count();
                (7..=15)
                    .contains(&n)
                    .then(|| star(m, |c| c.is_ascii_digit(), |i, n| i + 2 >= n))
            }
            RuleKind::Custom(Some(rep)) => {
                let mut out = String::new();
                caps.expand(rep, &mut out);
                Some(out)
            }
            RuleKind::Custom(None) => Some("*".repeat(m.chars().count())),
        }
    }
}

const REDACTED: &str = "[REDACTED]";

impl DataMasking {
    pub fn new(s: Settings) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        let mut rules = Vec::new();
        let builtin = |src: &str, kind: RuleKind| -> Rule {
            Rule {
                // The built-in expressions are tested below; a failure is a bug, not input.
                regex: Regex::new(src).unwrap_or_else(|e| panic!("built-in regex: {e}")),
                kind,
            }
        };
        // IBANs first: their digits could pass for a card number.
        for d in [
            Detector::Iban,
            Detector::Card,
            Detector::Email,
            Detector::Phone,
        ] {
            if !s.detect.contains(&d) {
                continue;
            }
            rules.push(match d {
                Detector::Card => builtin(r"\b(?:[0-9][ -]?){12,18}[0-9]\b", RuleKind::Card),
                Detector::Iban => builtin(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b", RuleKind::Iban),
                Detector::Email => builtin(
                    r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
                    RuleKind::Email,
                ),
                Detector::Phone => builtin(
                    r"(?:\+|\b00)[1-9][0-9 ().-]{5,20}[0-9]\b|\(?\b[0-9]{3}\)?[ .-][0-9]{3}[ .-][0-9]{4}\b",
                    RuleKind::Phone,
                ),
            });
        }
        for (i, p) in s.patterns.into_iter().enumerate() {
            let at = KeyPath::root().key("patterns").index(i);
            match Regex::new(&p.regex) {
                Ok(regex) if regex.is_match("") => errs.push((
                    at.key("regex"),
                    "the expression matches the empty string".into(),
                )),
                Ok(regex) => rules.push(Rule {
                    regex,
                    kind: RuleKind::Custom(p.replace),
                }),
                Err(e) => errs.push((at.key("regex"), format!("not a regular expression: {e}"))),
            }
        }
        let mut pointers = Vec::new();
        for (i, p) in s.pointers.iter().enumerate() {
            match Pointer::parse(p, true) {
                Ok(p) => pointers.push(p),
                Err(m) => errs.push((KeyPath::root().key("pointers").index(i), m)),
            }
        }
        if rules.is_empty() && pointers.is_empty() {
            errs.push((
                KeyPath::root(),
                "nothing to mask: set `detect`, `pointers` or `patterns`".into(),
            ));
        }
        let max_body = s.max_body.map_or(jsonops::DEFAULT_MAX_BODY, |b| b.0);
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(DataMasking {
            rules,
            pointers,
            action: s.action,
            max_body,
            on_unreadable: s.on_unreadable,
        })
    }

    /// Mask a text; `None` when nothing matched.
    pub fn mask_text(&self, s: &str) -> Option<String> {
        let mut cur: Cow<'_, str> = Cow::Borrowed(s);
        let mut changed = false;
        for r in &self.rules {
            let next = r
                .regex
                .replace_all(&cur, |caps: &Captures<'_>| match r.mask(caps) {
                    Some(masked) => {
                        changed = true;
                        if self.action == Action::Remove {
                            REDACTED.to_string()
                        } else {
                            masked
                        }
                    }
                    None => caps
                        .get(0)
                        .map_or(String::new(), |m| m.as_str().to_string()),
                });
            if let Cow::Owned(o) = next {
                cur = Cow::Owned(o);
            }
        }
        changed.then(|| cur.into_owned())
    }

    /// Mask a JSON document in place. Returns whether anything was masked or removed.
    pub fn mask_json(&self, v: &mut Value) -> bool {
        let mut changed = false;
        for p in &self.pointers {
            changed |= match self.action {
                Action::Remove => jsonops::remove(v, &p.segs) > 0,
                Action::Mask => mask_at(v, &p.segs),
            };
        }
        if !self.rules.is_empty() {
            self.walk(v, &mut changed);
        }
        changed
    }

    /// Walk string values; returns true when `v` itself is to be removed.
    fn walk(&self, v: &mut Value, changed: &mut bool) -> bool {
        match v {
            Value::String(s) => match self.mask_text(s) {
                Some(m) => {
                    *changed = true;
                    if self.action == Action::Remove {
                        return true;
                    }
                    *s = m;
                    false
                }
                None => false,
            },
            Value::Array(a) => {
                a.retain_mut(|c| !self.walk(c, changed));
                false
            }
            Value::Object(m) => {
                let gone: Vec<String> = m
                    .iter_mut()
                    .filter_map(|(k, c)| self.walk(c, changed).then(|| k.clone()))
                    .collect();
                for k in gone {
                    m.remove(&k);
                }
                false
            }
            _ => false,
        }
    }

    fn textual(h: &http::HeaderMap) -> bool {
        body::essence(h).is_some_and(|e| {
            e.starts_with("text/")
                || e == "application/xml"
                || (e.contains('/') && e.ends_with("+xml"))
        })
    }

    fn unreadable(&self, ctx: &Ctx, why: &str, b: Body) -> Result<Body, GatewayError> {
        match self.on_unreadable {
            Unreadable::Pass => {
                tracing::warn!(route = %ctx.route_name, "data-masking: {why}; sent unmasked (on_unreadable: pass)");
                Ok(b)
            }
            Unreadable::Reject => {
                crate::body::drain_in_background(b);
                Err(GatewayError::new(
                    ErrorKind::ResponseNotTransformable,
                    format!("the upstream response could not be masked: {why}"),
                ))
            }
        }
    }

    fn mask_bytes(&self, json: bool, bytes: Bytes) -> Bytes {
        if json {
            if let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) {
                // Re-serialized only when something was masked.
                return if self.mask_json(&mut v) {
                    Bytes::from(v.to_string())
                } else {
                    bytes
                };
            }
        }
        // Text, or JSON that does not parse: scanned as text.
        let text = String::from_utf8_lossy(&bytes);
        match self.mask_text(&text) {
            Some(m) => Bytes::from(m),
            None => bytes,
        }
    }
}

/// Replace the values at a pointer (with wildcards) by `"****"`; whether there was one.
fn mask_at(v: &mut Value, segs: &[Seg]) -> bool {
    let Some((first, rest)) = segs.split_first() else {
        *v = Value::String("****".into());
        return true;
    };
    let children: Vec<&mut Value> = match (v, first) {
        (Value::Object(m), Seg::Key(k)) => m.get_mut(k).into_iter().collect(),
        (Value::Object(m), Seg::Any) => m.values_mut().collect(),
        (Value::Array(a), Seg::Key(k)) => k
            .parse::<usize>()
            .ok()
            .and_then(|i| a.get_mut(i))
            .into_iter()
            .collect(),
        (Value::Array(a), Seg::Any) => a.iter_mut().collect(),
        _ => Vec::new(),
    };
    let mut any = false;
    for c in children {
        any |= mask_at(c, rest);
    }
    any
}

impl Policy for DataMasking {
    fn name(&self) -> &'static str {
        "data-masking"
    }

    fn edits_upstream_request(&self) -> bool {
        true
    }

    fn upstream_request(&self, _ctx: &mut Ctx, req: &mut http::request::Parts) {
        ask_identity(req);
    }

    fn wants_response_body(&self) -> bool {
        true
    }

    fn response_body<'a>(
        &'a self,
        ctx: &'a mut Ctx,
        parts: &'a mut http::response::Parts,
        b: Body,
    ) -> BodyStep<'a> {
        let json = body::is_json(&parts.headers);
        if !(json || Self::textual(&parts.headers))
            || http_body::Body::is_end_stream(&b)
            || body::declared_length(&parts.headers) == Some(0)
        {
            return BodyStep::pass(b);
        }
        if body::is_encoded(&parts.headers) {
            return BodyStep::Ready(Some(self.unreadable(ctx, "the body is compressed", b)));
        }
        BodyStep::Pending(Box::pin(async move {
            let declared = body::declared_length(&parts.headers);
            match body::buffer_upto(b, declared, self.max_body).await {
                Ok(Buffered::TooLarge(b)) => {
                    let why = format!("the body is larger than max_body ({} bytes)", self.max_body);
                    self.unreadable(ctx, &why, b)
                }
                // A body that turned out empty (e.g. the answer to a HEAD): as it is.
                Ok(Buffered::Whole(bytes)) if bytes.is_empty() => Ok(Body::Empty),
                Ok(Buffered::Whole(bytes)) => {
                    let out = self.mask_bytes(json, bytes);
                    body::set_length(&mut parts.headers, out.len());
                    Ok(Body::full(out))
                }
                Err(e) => Err(upstream_body_error(&e)),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn policy(v: Value) -> DataMasking {
        DataMasking::new(serde_json::from_value(v).unwrap()).unwrap()
    }

    #[test]
    fn luhn_and_iban_checks() {
        assert!(luhn(b"4111111111111111"));
        assert!(luhn(b"79927398713"));
        assert!(!luhn(b"4111111111111112"));
        assert!(iban_valid(b"DE89370400440532013000"));
        assert!(iban_valid(b"GB82WEST12345698765432"));
        assert!(!iban_valid(b"DE89370400440532013001"));
        assert!(!iban_valid(b"de89370400440532013000"));
    }

    #[test]
    fn built_in_detectors_mask_only_valid_values() {
        let p = policy(json!({"detect": ["card", "iban", "email", "phone"]}));
        assert_eq!(
            p.mask_text("card 4111111111111111.").unwrap(),
            "card ************1111."
        );
        assert_eq!(
            p.mask_text("4111 1111 1111 1111").unwrap(),
            "**** **** **** 1111"
        );
        // Fails Luhn: left alone (an order number).
        assert_eq!(p.mask_text("order 4111111111111112"), None);
        assert_eq!(
            p.mask_text("IBAN DE89 3704 0044 0532 0130 00").unwrap(),
            "IBAN DE** **** **** **** **30 00"
        );
        assert_eq!(p.mask_text("DE89370400440532013001"), None);
        assert_eq!(
            p.mask_text("mail john.doe@example.com now").unwrap(),
            "mail j***@example.com now"
        );
        assert_eq!(
            p.mask_text("call +44 20 7946 0958").unwrap(),
            "call +** ** **** **58"
        );
        assert_eq!(p.mask_text("(555) 123-4567").unwrap(), "(***) ***-**67");
        assert_eq!(p.mask_text("nothing 12345 here"), None);
    }

    #[test]
    fn json_values_pointers_and_remove() {
        let p = policy(
            json!({"detect": ["card", "email"], "pointers": ["/users/*/ssn"],
                              "patterns": [{"regex": "tok_[a-z0-9]+", "replace": "tok_…"}]}),
        );
        let mut v = json!({"users": [{"ssn": "123-45-6789", "email": "ann@example.org",
                                      "card": "4111111111111111", "n": 4111111111111111u64}],
                           "token": "tok_abc123", "user@example.com": 1});
        assert!(p.mask_json(&mut v));
        assert_eq!(
            v,
            json!({"users": [{"ssn": "****", "email": "a***@example.org",
                              "card": "************1111", "n": 4111111111111111u64}],
                   "token": "tok_…", "user@example.com": 1})
        );
        let p = policy(json!({"detect": ["card"], "pointers": ["/secret"], "action": "remove"}));
        let mut v =
            json!({"secret": 1, "cards": ["4111111111111111", "x"], "c": "pay 4111111111111111"});
        assert!(p.mask_json(&mut v));
        assert_eq!(v, json!({"cards": ["x"]}));
        let mut clean = json!({"a": "nothing here"});
        assert!(!p.mask_json(&mut clean));
        // Nothing to mask: the very bytes, formatting kept.
        let raw = Bytes::from_static(b"{ \"a\" :  1 }");
        assert_eq!(p.mask_bytes(true, raw.clone()), raw);
        assert_eq!(
            p.mask_text("pay 4111111111111111 now").unwrap(),
            "pay [REDACTED] now"
        );
    }

    #[test]
    fn settings_are_checked() {
        assert!(DataMasking::new(serde_json::from_value(json!({})).unwrap()).is_err());
        let e = DataMasking::new(
            serde_json::from_value(
                json!({"patterns": [{"regex": "("}, {"regex": "a*"}], "pointers": ["x"]}),
            )
            .unwrap(),
        )
        .err()
        .unwrap();
        // The two patterns, the pointer, and then nothing left to mask.
        assert_eq!(e.len(), 4);
    }
}
