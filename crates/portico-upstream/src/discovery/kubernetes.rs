//! Kubernetes: the ready endpoints of a service's EndpointSlices
//! (`discovery.k8s.io/v1`, label `kubernetes.io/service-name=<service>`), followed
//! with kube's watcher: a list, then a watch from its `resourceVersion`.
//!
//! A watch that ends with `410 Gone` (the version is too old) re-lists: kube's
//! watcher does so when the API server sends the 410 as an `ERROR` event (what it
//! does for watches); when the 410 comes as the HTTP status of the watch request
//! itself, the watcher would retry the same version forever, so this task starts a
//! new watcher (a fresh list) instead.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use portico_config::discovery::{DiscoveredScheme, Kubernetes};

use crate::discovery::{endpoint, Backoff, SourceCtx};
use crate::{Endpoint, Live};

/// The service account's files (in-cluster defaults).
const SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const SA_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// How the endpoint port is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum PortSel {
    /// The slice's only port.
    Only,
    Number(u16),
    Name(String),
}

impl PortSel {
    pub fn from_config(p: Option<&str>) -> PortSel {
        match p {
            None => PortSel::Only,
            Some(s) => match s.parse::<u16>() {
                Ok(n) => PortSel::Number(n),
                Err(_) => PortSel::Name(s.to_string()),
            },
        }
    }
}

/// The endpoints of one slice: its ready endpoints (`conditions.ready` absent counts
/// as ready, as the API documents) at the chosen port. `Err` says why the slice
/// gives none (no such port).
pub fn slice_endpoints(
    s: &EndpointSlice,
    port: &PortSel,
    scheme: DiscoveredScheme,
    weight: u32,
) -> Result<Vec<Endpoint>, String> {
    let ports = s.ports.as_deref().unwrap_or_default();
    let chosen = match port {
        PortSel::Only => match ports {
            [p] => p.port,
            [] => None,
            _ => {
                let names: Vec<&str> = ports.iter().filter_map(|p| p.name.as_deref()).collect();
                return Err(format!(
                    "slice has {} ports ({}): set `port` to one of them",
                    ports.len(),
                    names.join(", ")
                ));
            }
        },
        PortSel::Number(n) => ports
            .iter()
            .filter_map(|p| p.port)
            .find(|p| i32::from(*n) == *p),
        PortSel::Name(n) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(n.as_str()))
            .and_then(|p| p.port),
    };
    let Some(port) = chosen
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p > 0)
    else {
        return if s.endpoints.is_empty() {
            Ok(Vec::new())
        } else {
            Err(format!("slice has no port matching {port:?}"))
        };
    };
    Ok(s.endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        // The addresses of one endpoint are fungible: use the first.
        .filter_map(|e| e.addresses.first())
        .map(|a| endpoint(scheme, a, port, weight, None))
        .collect())
}

fn slice_key(s: &EndpointSlice) -> String {
    s.metadata
        .name
        .clone()
        .or_else(|| s.metadata.uid.clone())
        .unwrap_or_default()
}

/// The API client for `cfg`.
async fn client(cfg: &Kubernetes, ctx: &SourceCtx) -> Result<Client, String> {
    let mut config = match &cfg.api_server {
        Some(u) => {
            let uri: http::Uri = u.parse().map_err(|_| format!("bad api_server `{u}`"))?;
            let mut c = kube::Config::new(uri);
            if cfg.token_file.is_none() && std::path::Path::new(SA_TOKEN).exists() {
                c.auth_info.token_file = Some(SA_TOKEN.into());
            }
            if cfg.ca_file.is_none() && std::path::Path::new(SA_CA).exists() {
                c.root_cert_file = Some(SA_CA.into());
            }
            c
        }
        None => kube::Config::incluster()
            .map_err(|e| format!("no `api_server` set and no in-cluster settings: {e}"))?,
    };
    if let Some(t) = &cfg.token_file {
        config.auth_info.token = None;
        config.auth_info.token_file = Some(ctx.resolve(t).display().to_string());
    }
    if let Some(ca) = &cfg.ca_file {
        use rustls_pki_types::pem::PemObject;
        let path = ctx.resolve(ca);
        let certs: Vec<Vec<u8>> = rustls_pki_types::CertificateDer::pem_file_iter(&path)
            .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?
            .filter_map(Result::ok)
            .map(|c| c.to_vec())
            .collect();
        if certs.is_empty() {
            return Err(format!("no certificate in ca_file {}", path.display()));
        }
        config.root_cert = Some(certs);
        config.root_cert_file = Some(path);
    }
    config.default_namespace = cfg.namespace.clone();
    Client::try_from(config).map_err(|e| format!("cannot build the Kubernetes client: {e}"))
}

/// Whether the watcher cannot recover from `e` by itself (a watch request answered
/// `410 Gone` as its HTTP status).
fn needs_relist(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 410)
}

/// Follow the service's EndpointSlices until aborted.
pub async fn run(
    name: Arc<str>,
    cfg: Kubernetes,
    scheme: DiscoveredScheme,
    weight: u32,
    live: Arc<Live>,
    ctx: SourceCtx,
) {
    let port = PortSel::from_config(cfg.port.as_ref().map(|p| p.0.as_str()));
    let mut backoff = Backoff::default();
    let fail = |e: &str| {
        tracing::warn!(upstream = %name, error = %e, "kubernetes discovery failed; keeping the last known targets");
        live.discovery_failed(e);
    };
    loop {
        let client = match client(&cfg, &ctx).await {
            Ok(c) => c,
            Err(e) => {
                fail(&e);
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let api: Api<EndpointSlice> = Api::namespaced(client, &cfg.namespace);
        let wc = watcher::Config::default()
            .labels(&format!("kubernetes.io/service-name={}", cfg.service));
        let mut stream = watcher::watcher(api, wc).boxed();
        let mut slices: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
        let mut listing: Option<BTreeMap<String, Vec<Endpoint>>> = None;
        let convert = |s: &EndpointSlice| match slice_endpoints(s, &port, scheme, weight) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(upstream = %name, slice = %slice_key(s), "{e}");
                Vec::new()
            }
        };
        let publish = |slices: &BTreeMap<String, Vec<Endpoint>>| {
            live.set_discovered(slices.values().flatten().cloned().collect());
        };
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => listing = Some(BTreeMap::new()),
                Ok(Event::InitApply(s)) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(slice_key(&s), convert(&s));
                    }
                }
                Ok(Event::InitDone) => {
                    if let Some(l) = listing.take() {
                        slices = l;
                    }
                    backoff.reset();
                    publish(&slices);
                }
                Ok(Event::Apply(s)) => {
                    slices.insert(slice_key(&s), convert(&s));
                    backoff.reset();
                    publish(&slices);
                }
                Ok(Event::Delete(s)) => {
                    slices.remove(&slice_key(&s));
                    backoff.reset();
                    publish(&slices);
                }
                Err(e) => {
                    fail(&e.to_string());
                    let relist = needs_relist(&e);
                    // The watcher carries on from where it was (a 410 in an `ERROR`
                    // event makes it re-list); pause first so a failing API server is
                    // not hammered.
                    tokio::time::sleep(backoff.next_delay()).await;
                    if relist {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn ready_endpoints_at_the_chosen_port() {
        let s = slice(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "metrics", "port": 9090}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "conditions": {}},
                {"addresses": ["10.0.0.4", "10.0.0.5"]}
            ]
        }));
        let urls = |p: PortSel| -> Result<Vec<String>, String> {
            slice_endpoints(&s, &p, DiscoveredScheme::Http, 1)
                .map(|v| v.into_iter().map(|e| e.url).collect())
        };
        assert_eq!(
            urls(PortSel::Name("http".into())).unwrap(),
            [
                "http://10.0.0.1:8080",
                "http://10.0.0.3:8080",
                "http://10.0.0.4:8080"
            ]
        );
        assert_eq!(
            urls(PortSel::from_config(Some("9090"))).unwrap(),
            [
                "http://10.0.0.1:9090",
                "http://10.0.0.3:9090",
                "http://10.0.0.4:9090"
            ]
        );
        assert!(urls(PortSel::Only).unwrap_err().contains("2 ports"));
        assert!(urls(PortSel::Name("grpc".into())).is_err());
    }

    #[test]
    fn the_only_port_and_empty_slices() {
        let s = slice(serde_json::json!({
            "metadata": {"name": "a"}, "addressType": "IPv6",
            "ports": [{"port": 80}],
            "endpoints": [{"addresses": ["fd00::1"], "conditions": {"ready": null}}]
        }));
        let e = slice_endpoints(&s, &PortSel::Only, DiscoveredScheme::Https, 2).unwrap();
        assert_eq!(e[0].url, "https://[fd00::1]:80");
        assert_eq!(e[0].weight, 2);
        let empty = slice(serde_json::json!({
            "metadata": {"name": "b"}, "addressType": "IPv4", "endpoints": []
        }));
        assert!(
            slice_endpoints(&empty, &PortSel::Only, DiscoveredScheme::Http, 1)
                .unwrap()
                .is_empty()
        );
    }
}
