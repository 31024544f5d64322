//! The gateway's own service registry: instances register with
//! `PUT /admin/registry/{service}` and renew by heartbeat; an expired registration
//! drops out. Upstreams with `discovery: {registry: {service}}` follow it.
//!
//! Registrations live in memory only: after a gateway restart the registry is empty,
//! and instances reappear with their next heartbeat (a renewal of an unknown id is
//! answered 404, which tells the instance to register again).
//!
//! Expiry is computed when the registry is read (an expired registration is never
//! shown or used), and the discovery task sleeps until the next expiry of its
//! service, so no sweeper is needed; expired entries are purged on writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use portico_config::discovery::{service_char, DiscoveredScheme};
use tokio::sync::watch;

use crate::{Endpoint, Live};

/// Default time-to-live of a registration.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Shortest time-to-live accepted.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest time-to-live accepted.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// Bounds on what the registry holds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub services: usize,
    pub instances_per_service: usize,
    pub instances: usize,
    pub metadata_entries: usize,
    pub metadata_key_len: usize,
    pub metadata_value_len: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            services: 10_000,
            instances_per_service: 1_000,
            instances: 50_000,
            metadata_entries: 64,
            metadata_key_len: 128,
            metadata_value_len: 1024,
        }
    }
}

/// What an instance sends to register.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// `host:port`, or a URL `http(s)://host:port` (its scheme then wins over the
    /// upstream's `discovery.scheme`).
    pub address: String,
    pub weight: Option<u32>,
    pub metadata: BTreeMap<String, String>,
    pub ttl: Option<Duration>,
}

/// A registered instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    /// `host:port`.
    pub authority: String,
    /// The scheme the instance registered with, if it gave a URL.
    pub scheme: Option<DiscoveredScheme>,
    pub weight: Option<u32>,
    pub metadata: BTreeMap<String, String>,
    pub ttl: Duration,
    /// When it expires (ms on the registry's clock).
    pub expires_at: u64,
}

impl Instance {
    /// Its URL, with the upstream's scheme when it registered a bare `host:port`.
    pub fn url(&self, default: DiscoveredScheme) -> String {
        let s = self.scheme.unwrap_or(default);
        format!("{}://{}", s.as_str(), self.authority)
    }

    /// Milliseconds left at `now`.
    pub fn expires_in_ms(&self, now: u64) -> u64 {
        self.expires_at.saturating_sub(now)
    }
}

/// Why the registry refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegError {
    /// A bad input; `field` names it.
    #[error("`{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    /// A bound was reached.
    #[error("{0}")]
    Full(String),
}

fn invalid(field: &'static str, message: impl Into<String>) -> RegError {
    RegError::Invalid {
        field,
        message: message.into(),
    }
}

/// The clock expiry is measured on, in ms (injectable for tests).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Registered instances, by service.
pub struct Registry {
    services: Mutex<HashMap<String, BTreeMap<String, Instance>>>,
    /// Bumped on every change: discovery tasks wait on it.
    changed: watch::Sender<u64>,
    clock: Clock,
    limits: Limits,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("services", &self.services.lock().len())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Registry {
        Registry::new(Arc::new(crate::now_ms), Limits::default())
    }
}

/// Check a service name (as in the path of `/admin/registry/{service}`).
pub fn check_service(name: &str) -> Result<(), RegError> {
    if name.is_empty() || name.len() > 253 || !name.chars().all(service_char) {
        return Err(invalid(
            "service",
            "a service name is 1 to 253 letters, digits, `-`, `_` and `.`",
        ));
    }
    Ok(())
}

/// Parse `address`: `host:port` or `http(s)://host:port` (nothing after the port).
pub fn parse_address(a: &str) -> Result<(Option<DiscoveredScheme>, String), RegError> {
    let bad = || {
        invalid(
            "address",
            format!("`{a}` is not `host:port` or a URL like `http://10.0.0.5:8080`"),
        )
    };
    let (scheme, rest) = match a.split_once("://") {
        Some(("http", r)) => (Some(DiscoveredScheme::Http), r),
        Some(("https", r)) => (Some(DiscoveredScheme::Https), r),
        Some(_) => {
            return Err(invalid(
                "address",
                format!("`{a}` must be `host:port` or start with http:// or https://"),
            ))
        }
        None => (None, a),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return Err(bad());
    }
    let auth: http::uri::Authority = rest.parse().map_err(|_| bad())?;
    let port = auth
        .port_u16()
        .ok_or_else(|| invalid("address", format!("`{a}` has no port (write `host:port`)")))?;
    if port == 0 || auth.host().is_empty() {
        return Err(bad());
    }
    Ok((scheme, auth.as_str().to_ascii_lowercase()))
}

impl Registry {
    pub fn new(clock: Clock, limits: Limits) -> Registry {
        Registry {
            services: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            clock,
            limits,
        }
    }

    /// Now, on the registry's clock.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Register an instance of `service`, or renew it (same address: same id, new
    /// weight, metadata and TTL). Returns the registration.
    pub fn register(&self, service: &str, r: Registration) -> Result<Instance, RegError> {
        check_service(service)?;
        let (scheme, authority) = parse_address(&r.address)?;
        if r.weight == Some(0) || r.weight.is_some_and(|w| w > 10_000) {
            return Err(invalid("weight", "weight must be between 1 and 10000"));
        }
        let ttl = r.ttl.unwrap_or(DEFAULT_TTL);
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(invalid("ttl", "ttl must be between 1s and 1h"));
        }
        let l = &self.limits;
        if r.metadata.len() > l.metadata_entries {
            return Err(invalid(
                "metadata",
                format!("at most {} metadata entries", l.metadata_entries),
            ));
        }
        for (k, v) in &r.metadata {
            if k.is_empty() || k.len() > l.metadata_key_len {
                return Err(invalid(
                    "metadata",
                    format!("metadata keys are 1 to {} bytes", l.metadata_key_len),
                ));
            }
            if v.len() > l.metadata_value_len {
                return Err(invalid(
                    "metadata",
                    format!("the value of `{k}` is over {} bytes", l.metadata_value_len),
                ));
            }
        }
        let now = self.now();
        let mut services = self.services.lock();
        let expires_at = now.saturating_add(ttl.as_millis() as u64);
        // Renewal of the same address.
        if let Some(inst) = services.get_mut(service).and_then(|s| {
            s.values_mut()
                .find(|i| i.authority == authority && i.expires_at > now)
        }) {
            inst.scheme = scheme;
            inst.weight = r.weight;
            inst.metadata = r.metadata;
            inst.ttl = ttl;
            inst.expires_at = expires_at;
            let out = inst.clone();
            drop(services);
            self.notify();
            return Ok(out);
        }
        purge(&mut services, now);
        let total: usize = services.values().map(BTreeMap::len).sum();
        if total >= l.instances {
            return Err(RegError::Full(format!(
                "the registry holds its maximum of {} instances",
                l.instances
            )));
        }
        match services.get(service) {
            Some(s) if s.len() >= l.instances_per_service => {
                return Err(RegError::Full(format!(
                    "service `{service}` has its maximum of {} instances",
                    l.instances_per_service
                )))
            }
            None if services.len() >= l.services => {
                return Err(RegError::Full(format!(
                    "the registry holds its maximum of {} services",
                    l.services
                )))
            }
            _ => {}
        }
        let inst = Instance {
            id: format!("{:016x}", fastrand::u64(..)),
            authority,
            scheme,
            weight: r.weight,
            metadata: r.metadata,
            ttl,
            expires_at,
        };
        services
            .entry(service.to_string())
            .or_default()
            .insert(inst.id.clone(), inst.clone());
        drop(services);
        self.notify();
        Ok(inst)
    }

    /// A heartbeat: extend registration `id` by its TTL.
    pub fn renew(&self, service: &str, id: &str) -> Result<Instance, RegError> {
        let now = self.now();
        let mut services = self.services.lock();
        let inst = services
            .get_mut(service)
            .and_then(|s| s.get_mut(id))
            .filter(|i| i.expires_at > now)
            .ok_or_else(|| not_found(service, id))?;
        inst.expires_at = now.saturating_add(inst.ttl.as_millis() as u64);
        let out = inst.clone();
        drop(services);
        // The set of instances is unchanged, but a task sleeping until the old
        // expiry should sleep on.
        self.notify();
        Ok(out)
    }

    /// Remove registration `id`.
    pub fn deregister(&self, service: &str, id: &str) -> Result<Instance, RegError> {
        let now = self.now();
        let mut services = self.services.lock();
        let s = services
            .get_mut(service)
            .ok_or_else(|| not_found(service, id))?;
        let inst = s
            .remove(id)
            .filter(|i| i.expires_at > now)
            .ok_or_else(|| not_found(service, id))?;
        if s.is_empty() {
            services.remove(service);
        }
        drop(services);
        self.notify();
        Ok(inst)
    }

    /// The live instances of `service`, by id.
    pub fn instances(&self, service: &str) -> Vec<Instance> {
        let now = self.now();
        self.services
            .lock()
            .get(service)
            .map(|s| s.values().filter(|i| i.expires_at > now).cloned().collect())
            .unwrap_or_default()
    }

    /// Every service with live instances, by name.
    pub fn all(&self) -> BTreeMap<String, Vec<Instance>> {
        let now = self.now();
        self.services
            .lock()
            .iter()
            .map(|(k, s)| {
                let live: Vec<Instance> =
                    s.values().filter(|i| i.expires_at > now).cloned().collect();
                (k.clone(), live)
            })
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }

    /// When the next live instance of `service` expires.
    pub fn next_expiry(&self, service: &str) -> Option<u64> {
        let now = self.now();
        self.services
            .lock()
            .get(service)?
            .values()
            .map(|i| i.expires_at)
            .filter(|&t| t > now)
            .min()
    }
}

fn not_found(service: &str, id: &str) -> RegError {
    RegError::NotFound(format!(
        "no live registration `{id}` of service `{service}` (expired or never registered: register again)"
    ))
}

fn purge(services: &mut HashMap<String, BTreeMap<String, Instance>>, now: u64) {
    services.retain(|_, s| {
        s.retain(|_, i| i.expires_at > now);
        !s.is_empty()
    });
}

/// The endpoints of `service` now.
pub fn endpoints(
    reg: &Registry,
    service: &str,
    scheme: DiscoveredScheme,
    weight: u32,
) -> Vec<Endpoint> {
    reg.instances(service)
        .iter()
        .map(|i| Endpoint {
            url: i.url(scheme),
            weight: i.weight.unwrap_or(weight),
            host: None,
        })
        .collect()
}

/// Follow `service` in the registry: publish its instances on every change and at
/// every expiry.
pub async fn run(
    name: Arc<str>,
    service: String,
    scheme: DiscoveredScheme,
    weight: u32,
    live: Arc<Live>,
    reg: Arc<Registry>,
) {
    let mut rx = reg.subscribe();
    loop {
        rx.borrow_and_update();
        live.set_discovered(endpoints(&reg, &service, scheme, weight));
        let next = reg.next_expiry(&service);
        let sleep = async {
            match next {
                // One ms past the expiry, so the read after it no longer sees it.
                Some(t) => {
                    let wait = t.saturating_sub(reg.now()).saturating_add(1);
                    tokio::time::sleep(Duration::from_millis(wait)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() {
                tracing::debug!(upstream = %name, "registry gone; discovery stops");
                return;
            },
            _ = sleep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn reg_at(limits: Limits) -> (Arc<AtomicU64>, Registry) {
        let t = Arc::new(AtomicU64::new(1_000));
        let c = t.clone();
        (
            t,
            Registry::new(Arc::new(move || c.load(Ordering::SeqCst)), limits),
        )
    }

    fn reg(addr: &str, ttl: u64) -> Registration {
        Registration {
            address: addr.into(),
            ttl: Some(Duration::from_secs(ttl)),
            ..Registration::default()
        }
    }

    #[test]
    fn registrations_expire_on_the_clock_and_renew() {
        let (t, r) = reg_at(Limits::default());
        let a = r.register("users", reg("10.0.0.1:80", 2)).unwrap();
        let b = r.register("users", reg("10.0.0.2:80", 5)).unwrap();
        assert_eq!(r.instances("users").len(), 2);
        assert_eq!(r.next_expiry("users"), Some(3_000));
        t.store(2_500, Ordering::SeqCst);
        r.renew("users", &a.id).unwrap();
        t.store(4_000, Ordering::SeqCst);
        assert_eq!(r.instances("users").len(), 2, "a renewed");
        t.store(4_500, Ordering::SeqCst);
        let left = r.instances("users");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, b.id);
        assert!(matches!(
            r.renew("users", &a.id),
            Err(RegError::NotFound(_))
        ));
        t.store(6_000, Ordering::SeqCst);
        assert!(r.instances("users").is_empty());
        assert!(r.all().is_empty());
        assert_eq!(r.next_expiry("users"), None);
    }

    #[test]
    fn same_address_renews_under_the_same_id() {
        let (t, r) = reg_at(Limits::default());
        let a = r.register("users", reg("10.0.0.1:80", 2)).unwrap();
        t.store(2_000, Ordering::SeqCst);
        let mut again = reg("http://10.0.0.1:80/", 10);
        again.weight = Some(3);
        let b = r.register("users", again).unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(b.weight, Some(3));
        assert_eq!(b.expires_in_ms(2_000), 10_000);
        assert_eq!(r.instances("users").len(), 1);
        let e = endpoints(&r, "users", DiscoveredScheme::Https, 1);
        assert_eq!(e[0].url, "http://10.0.0.1:80", "the registered scheme wins");
        r.deregister("users", &a.id).unwrap();
        assert!(r.instances("users").is_empty());
        assert!(r.deregister("users", &a.id).is_err());
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let (_, r) = reg_at(Limits::default());
        let field = |e: RegError| match e {
            RegError::Invalid { field, .. } => field,
            other => panic!("{other:?}"),
        };
        for a in [
            "",
            "10.0.0.1",
            "ftp://x:1",
            "x:1/path",
            "x:0",
            "http://:80",
            "u@h:1",
        ] {
            assert_eq!(
                field(r.register("s", reg(a, 5)).unwrap_err()),
                "address",
                "{a}"
            );
        }
        assert_eq!(field(r.register("s", reg("h:1", 0)).unwrap_err()), "ttl");
        assert_eq!(field(r.register("s", reg("h:1", 7200)).unwrap_err()), "ttl");
        assert_eq!(
            field(r.register("a b", reg("h:1", 5)).unwrap_err()),
            "service"
        );
        let mut w = reg("h:1", 5);
        w.weight = Some(0);
        assert_eq!(field(r.register("s", w).unwrap_err()), "weight");
        let mut m = reg("h:1", 5);
        m.metadata.insert(String::new(), "v".into());
        assert_eq!(field(r.register("s", m).unwrap_err()), "metadata");
        assert!(r.register("s", reg("[::1]:8080", 5)).is_ok());
    }

    #[test]
    fn bounds_are_enforced_and_expired_entries_make_room() {
        let limits = Limits {
            services: 2,
            instances_per_service: 2,
            instances: 3,
            ..Limits::default()
        };
        let (t, r) = reg_at(limits);
        r.register("a", reg("h:1", 1)).unwrap();
        r.register("a", reg("h:2", 5)).unwrap();
        assert!(matches!(
            r.register("a", reg("h:3", 5)),
            Err(RegError::Full(_))
        ));
        r.register("b", reg("h:1", 5)).unwrap();
        assert!(matches!(
            r.register("c", reg("h:1", 5)),
            Err(RegError::Full(_))
        ));
        assert!(matches!(
            r.register("b", reg("h:2", 5)),
            Err(RegError::Full(_))
        ));
        t.store(2_500, Ordering::SeqCst);
        r.register("b", reg("h:2", 5)).unwrap();
    }

    #[tokio::test]
    async fn the_task_follows_changes() {
        let r = Arc::new(Registry::default());
        let mut rx = r.subscribe();
        let before = *rx.borrow_and_update();
        r.register("s", reg("h:1", 5)).unwrap();
        assert!(rx.has_changed().unwrap());
        assert_ne!(*rx.borrow_and_update(), before);
    }
}
