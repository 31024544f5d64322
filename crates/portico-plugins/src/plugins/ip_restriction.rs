//! `ip-restriction`: allow or refuse requests by the client IP, with lists of IPv4 and
//! IPv6 CIDR ranges (or single addresses).
//!
//! Semantics (Kong's): an address in `deny` is refused, even when it is also in
//! `allow`; with an `allow` list, an address not in it is refused; anything else goes
//! on. Refusals are `403 forbidden`. The client IP is `Ctx::client_ip` — the socket
//! peer, or the right-most untrusted `X-Forwarded-For`/`Forwarded` address when the
//! peer is in `trusted_proxies` — so a client cannot choose its IP by sending headers.

use std::borrow::Cow;
use std::net::IpAddr;

use http::Request;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use portico_config::load::parse_cidr;
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{Policy, Step};
use crate::registry::SettingsErrors;

const DEFAULT_MESSAGE: &str = "your IP address is not allowed here";

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Only clients in these ranges are let through: IPv4 or IPv6 CIDR ranges
    /// (`10.0.0.0/8`, `2001:db8::/32`) or single addresses (`192.0.2.7`, `::1`).
    /// Empty or absent: every client not in `deny`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Clients in these ranges are refused, even when they are also in `allow`.
    #[serde(default)]
    pub deny: Vec<String>,
    /// The message in the JSON body of the `403 forbidden` answer.
    /// Default: "your IP address is not allowed here".
    #[serde(default)]
    pub message: Option<String>,
}

/// Ranges of one list, by address family (a client address is only ever compared
/// with ranges of its own family).
#[derive(Debug, Default)]
struct Ranges {
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

impl Ranges {
    fn parse(list: &[String], key: &str, errs: &mut SettingsErrors) -> Ranges {
        let mut r = Ranges::default();
        for (i, s) in list.iter().enumerate() {
            match parse_cidr(s.trim()).map(canonical_net) {
                Some(IpNet::V4(n)) => r.v4.push(n.trunc()),
                Some(IpNet::V6(n)) => r.v6.push(n.trunc()),
                None => errs.push((
                    KeyPath::root().key(key).index(i),
                    format!("`{s}` is not an IP address or CIDR range"),
                )),
            }
        }
        r
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.iter().any(|n| n.contains(&a)),
            IpAddr::V6(a) => self.v6.iter().any(|n| n.contains(&a)),
        }
    }
}

/// An IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`) as the IPv4 range it is, since
/// client addresses are IPv4-mapped-as-IPv4 too (`crate::canonical`).
fn canonical_net(n: IpNet) -> IpNet {
    if let IpNet::V6(v6) = n {
        if v6.prefix_len() >= 96 {
            if let Some(a) = v6.addr().to_ipv4_mapped() {
                if let Ok(v4) = Ipv4Net::new(a, v6.prefix_len() - 96) {
                    return IpNet::V4(v4);
                }
            }
        }
    }
    n
}

pub struct IpRestriction {
    allow: Ranges,
    deny: Ranges,
    message: Cow<'static, str>,
}

impl IpRestriction {
    pub fn new(s: Settings) -> Result<Self, SettingsErrors> {
        let mut errs = Vec::new();
        let allow = Ranges::parse(&s.allow, "allow", &mut errs);
        let deny = Ranges::parse(&s.deny, "deny", &mut errs);
        if s.allow.is_empty() && s.deny.is_empty() {
            errs.push((
                KeyPath::root(),
                "set `allow`, `deny` or both: without either every client would be let through"
                    .into(),
            ));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(IpRestriction {
            allow,
            deny,
            message: s.message.map_or(Cow::Borrowed(DEFAULT_MESSAGE), Cow::Owned),
        })
    }

    /// Whether a client at `ip` is let through.
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.deny.contains(ip) {
            return false;
        }
        self.allow.is_empty() || self.allow.contains(ip)
    }
}

impl Policy for IpRestriction {
    fn name(&self) -> &'static str {
        "ip-restriction"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, _req: &'a mut Request<Body>) -> Step<'a> {
        if self.allows(ctx.client_ip) {
            Step::cont()
        } else {
            Step::error(GatewayError::new(
                ErrorKind::Forbidden,
                self.message.clone(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> IpRestriction {
        IpRestriction::new(Settings {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            message: None,
        })
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_ranges_and_single_addresses() {
        let p = policy(&["10.0.0.0/8", "192.0.2.7"], &[]);
        assert!(p.allows(ip("10.0.0.1")));
        assert!(p.allows(ip("10.255.255.255")));
        assert!(p.allows(ip("192.0.2.7")));
        assert!(!p.allows(ip("192.0.2.8")));
        assert!(!p.allows(ip("11.0.0.0")));
        assert!(!p.allows(ip("9.255.255.255")));
        // A v4 list says nothing about v6 clients: they are not in it.
        assert!(!p.allows(ip("::1")));
    }

    #[test]
    fn ipv6_ranges() {
        let p = policy(&["2001:db8::/32", "::1"], &[]);
        assert!(p.allows(ip("2001:db8::1")));
        assert!(p.allows(ip("2001:db8:ffff:ffff::42")));
        assert!(p.allows(ip("::1")));
        assert!(!p.allows(ip("2001:db9::1")));
        assert!(!p.allows(ip("::2")));
        assert!(!p.allows(ip("127.0.0.1")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = policy(&["10.0.0.0/8"], &["10.1.0.0/16", "10.2.3.4"]);
        assert!(p.allows(ip("10.0.0.1")));
        assert!(!p.allows(ip("10.1.2.3")));
        assert!(!p.allows(ip("10.2.3.4")));
        assert!(p.allows(ip("10.2.3.5")));
        assert!(!p.allows(ip("8.8.8.8")), "not in allow");
        // The same range in both lists: refused.
        let p = policy(&["127.0.0.1"], &["127.0.0.0/8"]);
        assert!(!p.allows(ip("127.0.0.1")));
    }

    #[test]
    fn deny_only_lets_everything_else_through() {
        let p = policy(&[], &["203.0.113.0/24", "2001:db8:bad::/48"]);
        assert!(!p.allows(ip("203.0.113.99")));
        assert!(!p.allows(ip("2001:db8:bad:1::1")));
        assert!(p.allows(ip("203.0.114.1")));
        assert!(p.allows(ip("2001:db8:600d::1")));
        assert!(p.allows(ip("::1")));
    }

    #[test]
    fn host_bits_and_ipv4_mapped_entries() {
        // Host bits in a range are ignored (10.1.2.3/8 is 10.0.0.0/8).
        let p = policy(&["10.1.2.3/8"], &[]);
        assert!(p.allows(ip("10.200.0.1")));
        // An IPv4-mapped IPv6 entry matches the IPv4 clients it names (client
        // addresses are canonical IPv4).
        let p = policy(&[], &["::ffff:192.0.2.0/120", "::ffff:198.51.100.1"]);
        assert!(!p.allows(ip("192.0.2.200")));
        assert!(!p.allows(ip("198.51.100.1")));
        assert!(p.allows(ip("198.51.100.2")));
        assert!(p.allows(ip("192.0.3.1")));
        // Everything, in both families.
        let p = policy(&[], &["0.0.0.0/0", "::/0"]);
        assert!(!p.allows(ip("1.2.3.4")));
        assert!(!p.allows(ip("2001:db8::1")));
    }

    #[test]
    fn settings_errors_are_located() {
        let errs = IpRestriction::new(Settings {
            allow: vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()],
            deny: vec!["example.com".into()],
            message: None,
        })
        .err()
        .unwrap();
        let got: Vec<String> = errs.iter().map(|(p, m)| format!("{p}: {m}")).collect();
        assert_eq!(
            got,
            [
                "allow[1]: `10.0.0.0/33` is not an IP address or CIDR range",
                "deny[0]: `example.com` is not an IP address or CIDR range",
            ]
        );
        let errs = IpRestriction::new(Settings {
            allow: vec![],
            deny: vec![],
            message: Some("no".into()),
        })
        .err()
        .unwrap();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].0.is_root());
        assert!(errs[0].1.contains("set `allow`, `deny` or both"));
    }

    #[test]
    fn refusal_is_forbidden_with_the_message() {
        let p = IpRestriction::new(Settings {
            allow: vec!["10.0.0.0/8".into()],
            deny: vec![],
            message: Some("internal only".into()),
        })
        .unwrap();
        let mut ctx = Ctx::new(
            "rid".into(),
            ip("192.0.2.1"),
            "r".into(),
            "/".into(),
            Default::default(),
        );
        let mut req = Request::new(Body::default());
        match p.on_request(&mut ctx, &mut req) {
            Step::Ready(Some(crate::policy::Flow::Error(e))) => {
                assert_eq!(e.kind, ErrorKind::Forbidden);
                assert_eq!(e.message, "internal only");
            }
            _ => panic!("expected a refusal"),
        }
        ctx.client_ip = ip("10.9.8.7");
        assert!(matches!(
            p.on_request(&mut ctx, &mut req),
            Step::Ready(Some(crate::policy::Flow::Continue))
        ));
    }
}
