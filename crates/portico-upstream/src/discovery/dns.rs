//! DNS discovery: the A/AAAA or SRV records of one name, resolved again when their TTL
//! (clamped to `[min_ttl, max_ttl]`) runs out. The resolver's cache is cleared before
//! every round, so each round asks the server.
//!
//! A round that finds no address (NXDOMAIN, no records, no answer in time) is a
//! failure: the last known targets stay in use, and the next try comes after a backoff
//! (1s doubling to 30s, kept within `[min_ttl, max_ttl]`). An empty answer never
//! empties the target set: DNS has no way to tell "no instances" from "broken zone".

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use portico_config::discovery::{DiscoveredScheme, Dns, DnsRecord};

use super::{endpoint, Backoff};
use crate::{Endpoint, Live};

/// How long one round may take in all (every query, every SRV target).
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// A successful round: the endpoints and how long they may be trusted.
#[derive(Debug, PartialEq)]
pub(crate) struct Answer {
    pub endpoints: Vec<Endpoint>,
    /// The smallest TTL of the records used.
    pub ttl: Duration,
}

/// One SRV record, as far as discovery cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The target's name, without the final dot.
    pub target: String,
}

/// Run the DNS source of upstream `name` until aborted.
pub async fn run(name: Arc<str>, cfg: Dns, scheme: DiscoveredScheme, weight: u32, live: Arc<Live>) {
    let (min, max) = (cfg.min_ttl.0, cfg.max_ttl.0.max(cfg.min_ttl.0));
    let mut backoff = Backoff::default();
    // The system's settings (/etc/resolv.conf) may be missing for a while.
    let mut warned = false;
    let resolver = loop {
        match build_resolver(&cfg) {
            Ok(r) => break r,
            Err(e) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::error!(upstream = %name, "dns discovery: cannot set up the resolver: {e}");
                }
                live.discovery_failed(&format!("cannot set up the resolver: {e}"));
                tokio::time::sleep(backoff.next_delay().clamp(min, max)).await;
            }
        }
    };
    backoff.reset();
    let mut failing = false;
    loop {
        resolver.clear_cache();
        let round = tokio::time::timeout(ROUND_TIMEOUT, resolve(&resolver, &cfg, scheme, weight));
        let result = match round.await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer for `{}` within {ROUND_TIMEOUT:?}",
                cfg.name
            )),
        };
        let pause = match result {
            Ok(answer) => {
                if failing {
                    tracing::info!(upstream = %name, dns = %cfg.name, targets = answer.endpoints.len(), "dns discovery answers again");
                }
                failing = false;
                backoff.reset();
                live.set_discovered(answer.endpoints);
                clamp_ttl(answer.ttl, min, max)
            }
            Err(e) => {
                if failing {
                    tracing::debug!(upstream = %name, dns = %cfg.name, "dns discovery still failing: {e}");
                } else {
                    tracing::warn!(upstream = %name, dns = %cfg.name, "dns discovery failed, keeping the last known targets: {e}");
                }
                failing = true;
                live.discovery_failed(&e);
                backoff.next_delay().clamp(min, max)
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// The TTL bounded by `[min, max]`.
pub(crate) fn clamp_ttl(ttl: Duration, min: Duration, max: Duration) -> Duration {
    ttl.max(min).min(max.max(min))
}

/// The records of the lowest priority value (the ones RFC 2782 says to use first);
/// a target of `.` ("no service here") is dropped.
pub(crate) fn lowest_priority(records: &[Srv]) -> Vec<Srv> {
    let usable = records
        .iter()
        .filter(|r| !r.target.is_empty() && r.target != ".");
    let Some(best) = usable.clone().map(|r| r.priority).min() else {
        return Vec::new();
    };
    usable.filter(|r| r.priority == best).cloned().collect()
}

/// The weight of a target with SRV weight `w` (0, "rarely", still gets some traffic).
pub(crate) fn srv_weight(w: u16) -> u32 {
    u32::from(w).max(1)
}

/// The `Host` header for `name` on `port`: the port is left out when it is the
/// scheme's default.
pub(crate) fn host_header(name: &str, port: u16, scheme: DiscoveredScheme) -> String {
    let name = name.trim_end_matches('.');
    let default = match scheme {
        DiscoveredScheme::Http => 80,
        DiscoveredScheme::Https => 443,
    };
    if port == default {
        name.to_string()
    } else {
        format!("{name}:{port}")
    }
}

fn build_resolver(cfg: &Dns) -> Result<TokioResolver, String> {
    let mut builder = match cfg.resolver.as_deref() {
        Some(r) => {
            let addr = portico_config::discovery::resolver_addr(r)
                .ok_or_else(|| format!("`{r}` is not an address like `127.0.0.1:53`"))?;
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            let config = ResolverConfig::from_parts(None, Vec::new(), vec![ns]);
            let mut b = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
            // This server is the whole truth: /etc/hosts is not consulted.
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        }
        None => TokioResolver::builder_tokio().map_err(|e| e.to_string())?,
    };
    let opts = builder.options_mut();
    opts.timeout = Duration::from_secs(3);
    opts.attempts = 1;
    builder.build().map_err(|e| e.to_string())
}

/// One round: the endpoints `cfg` names now.
async fn resolve(
    r: &TokioResolver,
    cfg: &Dns,
    scheme: DiscoveredScheme,
    weight: u32,
) -> Result<Answer, String> {
    let host = |name: &str, port: u16| cfg.host_header.then(|| host_header(name, port, scheme));
    match cfg.record {
        DnsRecord::Srv => {
            let (records, mut ttl) = srv(r, &cfg.name).await?;
            let chosen = lowest_priority(&records);
            let mut endpoints = Vec::new();
            let mut errors = Vec::new();
            for s in &chosen {
                match addresses(r, &s.target, DnsRecord::AAaaa).await {
                    Ok((ips, t)) => {
                        ttl = ttl.min(t);
                        endpoints.extend(ips.iter().map(|ip| {
                            endpoint(
                                scheme,
                                &ip.to_string(),
                                s.port,
                                srv_weight(s.weight),
                                host(&s.target, s.port),
                            )
                        }));
                    }
                    Err(e) => errors.push(e),
                }
            }
            if endpoints.is_empty() {
                return Err(match errors.first() {
                    Some(e) => format!("no SRV target of `{}` resolves: {e}", cfg.name),
                    None => format!("`{}` has no usable SRV records", cfg.name),
                });
            }
            Ok(Answer { endpoints, ttl })
        }
        kind => {
            // Validation makes `port` required for A/AAAA.
            let port = cfg.port.unwrap_or(80);
            let (ips, ttl) = addresses(r, &cfg.name, kind).await?;
            let endpoints = ips
                .iter()
                .map(|ip| endpoint(scheme, &ip.to_string(), port, weight, host(&cfg.name, port)))
                .collect();
            Ok(Answer { endpoints, ttl })
        }
    }
}

/// The addresses of `name` (A, AAAA or both) and the smallest TTL among them. For
/// both, one family missing is fine; both missing is an error.
async fn addresses(
    r: &TokioResolver,
    name: &str,
    kind: DnsRecord,
) -> Result<(Vec<IpAddr>, Duration), String> {
    let lookups: Vec<(RecordType, Result<Lookup, NetError>)> = match kind {
        DnsRecord::A => vec![(RecordType::A, r.lookup(name, RecordType::A).await)],
        DnsRecord::Aaaa => vec![(RecordType::AAAA, r.lookup(name, RecordType::AAAA).await)],
        DnsRecord::AAaaa | DnsRecord::Srv => {
            let (a, aaaa) = tokio::join!(
                r.lookup(name, RecordType::A),
                r.lookup(name, RecordType::AAAA)
            );
            vec![(RecordType::A, a), (RecordType::AAAA, aaaa)]
        }
    };
    let mut ips = BTreeSet::new();
    let mut ttl = u32::MAX;
    let mut first_err = None;
    for (t, l) in lookups {
        match l {
            Ok(l) => {
                for rec in l.answers() {
                    let ip = match &rec.data {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(a) => IpAddr::V6(a.0),
                        _ => continue,
                    };
                    ips.insert(ip);
                    ttl = ttl.min(rec.ttl);
                }
            }
            Err(e) => {
                first_err.get_or_insert_with(|| describe(name, t, &e));
            }
        }
    }
    if ips.is_empty() {
        return Err(first_err.unwrap_or_else(|| format!("`{name}` has no address records")));
    }
    Ok((
        ips.into_iter().collect(),
        Duration::from_secs(u64::from(ttl)),
    ))
}

/// The SRV records of `name` and their smallest TTL.
async fn srv(r: &TokioResolver, name: &str) -> Result<(Vec<Srv>, Duration), String> {
    let l = r
        .lookup(name, RecordType::SRV)
        .await
        .map_err(|e| describe(name, RecordType::SRV, &e))?;
    let mut ttl = u32::MAX;
    let mut out = Vec::new();
    for rec in l.answers() {
        if let RData::SRV(s) = &rec.data {
            ttl = ttl.min(rec.ttl);
            out.push(Srv {
                priority: s.priority,
                weight: s.weight,
                port: s.port,
                target: s.target.to_string().trim_end_matches('.').to_string(),
            });
        }
    }
    if out.is_empty() {
        return Err(format!("`{name}` has no SRV records"));
    }
    Ok((out, Duration::from_secs(u64::from(ttl))))
}

fn describe(name: &str, t: RecordType, e: &NetError) -> String {
    if e.is_nx_domain() {
        format!("`{name}` does not exist (NXDOMAIN)")
    } else if e.is_no_records_found() {
        format!("`{name}` has no {t} records")
    } else if matches!(e, NetError::Timeout) {
        format!("no answer for `{name}` ({t}) in time")
    } else {
        format!("resolving `{name}` ({t}): {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(priority: u16, weight: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port: 80,
            target: target.into(),
        }
    }

    #[test]
    fn ttl_is_clamped_to_the_bounds() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(clamp_ttl(Duration::ZERO, min, max), min);
        assert_eq!(
            clamp_ttl(Duration::from_secs(30), min, max),
            Duration::from_secs(30)
        );
        assert_eq!(clamp_ttl(Duration::from_secs(86400), min, max), max);
        // A max below the min (refused by validation) cannot make the pause shorter.
        assert_eq!(clamp_ttl(Duration::ZERO, max, min), max);
    }

    #[test]
    fn only_the_lowest_priority_value_is_used() {
        let got = lowest_priority(&[s(20, 1, "c"), s(10, 5, "a"), s(10, 0, "b"), s(5, 1, ".")]);
        assert_eq!(got, vec![s(10, 5, "a"), s(10, 0, "b")]);
        assert!(lowest_priority(&[s(0, 1, ".")]).is_empty());
        assert!(lowest_priority(&[]).is_empty());
    }

    #[test]
    fn srv_weight_zero_still_counts() {
        assert_eq!(srv_weight(0), 1);
        assert_eq!(srv_weight(7), 7);
    }

    #[test]
    fn host_header_names_a_port_only_when_needed() {
        assert_eq!(
            host_header("api.internal.", 80, DiscoveredScheme::Http),
            "api.internal"
        );
        assert_eq!(
            host_header("api.internal", 8080, DiscoveredScheme::Http),
            "api.internal:8080"
        );
        assert_eq!(
            host_header("api.internal", 443, DiscoveredScheme::Https),
            "api.internal"
        );
        assert_eq!(
            host_header("api.internal", 80, DiscoveredScheme::Https),
            "api.internal:80"
        );
    }
}
