//! Service discovery: tasks that keep an upstream's discovered targets current
//! ([`Live::set_discovered`]). One module per source; each runs until aborted (by the
//! [`crate::supervise::Supervisor`]), reports every successful answer, and when its
//! source cannot be reached keeps the last known targets in use
//! ([`Live::discovery_failed`]), logs, and tries again with backoff.

pub mod consul;
pub mod dns;
pub mod etcd;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod registry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portico_config::discovery::{DiscoveredScheme, Discovery};
use tokio::task::JoinHandle;

use crate::{Endpoint, Live};

pub use registry::Registry;

/// What sources may need besides their settings.
#[derive(Clone, Default)]
pub struct SourceCtx {
    /// Instances registered through the admin API.
    pub registry: Arc<Registry>,
    /// The configuration file's directory (relative file paths resolve against it).
    pub base_dir: Option<PathBuf>,
}

impl SourceCtx {
    pub fn resolve(&self, p: &str) -> PathBuf {
        match &self.base_dir {
            Some(d) => d.join(p),
            None => PathBuf::from(p),
        }
    }
}

/// The name of the source a build cannot run yet, if `d` uses one.
pub fn unavailable(d: &Discovery) -> Option<&'static str> {
    d.source().filter(|s| !AVAILABLE.contains(s))
}

/// The sources this build runs.
const AVAILABLE: &[&str] = &[
    "dns",
    "etcd",
    "consul",
    #[cfg(feature = "kubernetes")]
    "kubernetes",
    "registry",
];

/// Start the discovery task of upstream `name`.
pub fn spawn(name: Arc<str>, cfg: Discovery, live: Arc<Live>, ctx: SourceCtx) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (scheme, weight, source) = (cfg.scheme, cfg.weight, cfg.source());
        match (cfg.dns, cfg.etcd, cfg.consul, cfg.kubernetes, cfg.registry) {
            (Some(d), ..) => dns::run(name, d, scheme, weight, live).await,
            (_, Some(e), ..) => etcd::run(name, e, scheme, weight, live).await,
            (_, _, Some(c), ..) => consul::run(name, c, scheme, weight, live).await,
            #[cfg(feature = "kubernetes")]
            (_, _, _, Some(k), _) => kubernetes::run(name, k, scheme, weight, live, ctx).await,
            (.., Some(r)) => {
                registry::run(name, r.service, scheme, weight, live, ctx.registry).await
            }
            _ => match source {
                Some(s) => {
                    tracing::error!(upstream = %name, source = s, "this discovery source is not available in this build");
                    live.discovery_failed("this discovery source is not available in this build");
                }
                None => live.discovery_failed("no discovery source configured"),
            },
        }
    })
}

/// The endpoint for `host:port` (an IP address or a name) with `scheme`; `host_header`
/// replaces the `Host` sent (a DNS name whose addresses these are).
pub fn endpoint(
    scheme: DiscoveredScheme,
    host: &str,
    port: u16,
    weight: u32,
    host_header: Option<String>,
) -> Endpoint {
    let h = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    Endpoint {
        url: format!("{}://{h}:{port}", scheme.as_str()),
        weight,
        host: host_header,
    }
}

/// Waits between attempts to reach a source that failed: 1s doubling to 30s, with
/// jitter; reset by a success.
#[derive(Debug, Default)]
pub struct Backoff(u32);

impl Backoff {
    pub fn reset(&mut self) {
        self.0 = 0;
    }

    /// The next pause after a failure.
    pub fn next_delay(&mut self) -> Duration {
        let base = Duration::from_secs(1).saturating_mul(1u32 << self.0.min(5));
        self.0 = self.0.saturating_add(1);
        let cap = base.min(Duration::from_secs(30));
        cap.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_bracket_ipv6() {
        let e = endpoint(DiscoveredScheme::Http, "::1", 80, 1, None);
        assert_eq!(e.url, "http://[::1]:80");
        let e = endpoint(
            DiscoveredScheme::Https,
            "10.0.0.1",
            8443,
            2,
            Some("api".into()),
        );
        assert_eq!(e.url, "https://10.0.0.1:8443");
        assert_eq!(e.host.as_deref(), Some("api"));
    }

    #[test]
    fn this_build_runs_kubernetes_only_with_its_feature() {
        let d =
            |v: serde_json::Value| -> Discovery { serde_json::from_value(v).unwrap_or_default() };
        let k8s = d(serde_json::json!({"kubernetes": {"service": "web"}}));
        let want = if cfg!(feature = "kubernetes") {
            None
        } else {
            Some("kubernetes")
        };
        assert_eq!(unavailable(&k8s), want);
        let consul =
            d(serde_json::json!({"consul": {"address": "http://c:8500", "service": "web"}}));
        assert_eq!(unavailable(&consul), None);
        assert_eq!(
            unavailable(&d(serde_json::json!({"registry": {"service": "web"}}))),
            None
        );
    }

    #[test]
    fn backoff_grows_to_a_cap() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first <= Duration::from_secs(1) && first >= Duration::from_millis(500));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
