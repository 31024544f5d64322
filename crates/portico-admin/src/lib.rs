//! Portico's admin listener.
//!
//! Owns: `GET /health`, `GET /ready`, `GET /metrics` (Prometheus text), and the admin
//! REST API under `/admin` (routes, upstreams, reload, consumers, the service
//! registry, cache purge, quotas). Every answer is JSON except
//! `/metrics`; every error uses the gateway's error shape.
//!
//! Does not own: the state it shows (`portico-proxy`'s [`Gateway`]).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};

mod cache;
mod consumers;
mod quotas;
mod registry;
use axum::{Json, Router};
use portico_proxy::{CompiledRoute, Gateway};
use serde_json::{json, Value};

pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body =
        json!({"error": {"status": status.as_u16(), "code": code, "message": message.into()}});
    (status, Json(body)).into_response()
}

/// The admin API router.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/routes", get(routes))
        .route("/admin/routes/{name}", get(route))
        .route("/admin/upstreams", get(upstreams))
        .route("/admin/reload", post(reload))
        .route("/admin/cache", delete(cache::purge))
        .route(
            "/admin/consumers",
            get(consumers::list).post(consumers::create),
        )
        .route(
            "/admin/consumers/{name}",
            get(consumers::get)
                .put(consumers::put)
                .patch(consumers::patch)
                .delete(consumers::delete),
        )
        .route(
            "/admin/consumers/{name}/credentials",
            get(consumers::credentials).post(consumers::create_credential),
        )
        .route(
            "/admin/consumers/{name}/credentials/{id}",
            get(consumers::get_credential).delete(consumers::delete_credential),
        )
        .route("/admin/registry", get(registry::list))
        .route(
            "/admin/registry/{service}",
            get(registry::service).put(registry::register),
        )
        .route(
            "/admin/registry/{service}/{id}",
            axum::routing::put(registry::renew).delete(registry::deregister),
        )
        .route("/admin/quotas", get(quotas::list).delete(quotas::reset))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this admin endpoint does not take that method",
            )
        })
        .with_state(gw)
}

/// Serve the admin API until `shutdown` resolves.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "admin listening");
    axum::serve(listener, router(gw))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.is_ready() {
        Json(json!({"status": "ready", "generation": gw.generation()})).into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "shutting down",
        )
    }
}

const CIRCUIT_STATES: [portico_upstream::State; 3] = [
    portico_upstream::State::Closed,
    portico_upstream::State::Open,
    portico_upstream::State::HalfOpen,
];

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let mut text = gw.metrics.render();
    let snap = gw.snapshot();
    text.push_str("# HELP portico_upstream_target_healthy 1 when the target may receive traffic.\n# TYPE portico_upstream_target_healthy gauge\n");
    let now = portico_upstream::now_ms();
    for (name, up) in &snap.upstreams {
        for t in &up.live.current().targets {
            text.push_str(&format!(
                "portico_upstream_target_healthy{{upstream=\"{name}\",target=\"{}\"}} {}\n",
                t.url,
                u8::from(t.health.available(now))
            ));
        }
    }
    text.push_str("# HELP portico_discovery_updates_total Answers from an upstream's discovery source.\n# TYPE portico_discovery_updates_total counter\n");
    let mut errors = String::from("# HELP portico_discovery_errors_total Failed attempts to reach an upstream's discovery source (the last known targets stay in use).\n# TYPE portico_discovery_errors_total counter\n");
    for (name, up) in &snap.upstreams {
        let Some(source) = up.discovery.as_ref().and_then(|d| d.source()) else {
            continue;
        };
        let st = &up.live.discovery;
        text.push_str(&format!(
            "portico_discovery_updates_total{{upstream=\"{name}\",source=\"{source}\"}} {}\n",
            st.updates.load(std::sync::atomic::Ordering::Relaxed)
        ));
        errors.push_str(&format!(
            "portico_discovery_errors_total{{upstream=\"{name}\",source=\"{source}\"}} {}\n",
            st.errors.load(std::sync::atomic::Ordering::Relaxed)
        ));
    }
    text.push_str(&errors);
    let mut shed = String::from("# HELP portico_upstream_concurrency_shed_total Requests refused at the adaptive concurrency limit.\n# TYPE portico_upstream_concurrency_shed_total counter\n");
    let mut hedges = String::from("# HELP portico_upstream_hedges_total Hedged tries sent, and those whose answer was used.\n# TYPE portico_upstream_hedges_total counter\n");
    text.push_str("# HELP portico_upstream_concurrency_limit The adaptive concurrency limit.\n# TYPE portico_upstream_concurrency_limit gauge\n");
    for (name, up) in &snap.upstreams {
        if let Some(a) = &up.adaptive {
            text.push_str(&format!(
                "portico_upstream_concurrency_limit{{upstream=\"{name}\"}} {}\n",
                a.limit()
            ));
            shed.push_str(&format!(
                "portico_upstream_concurrency_shed_total{{upstream=\"{name}\"}} {}\n",
                a.shed.load(std::sync::atomic::Ordering::Relaxed)
            ));
        }
        if up.hedging.is_some() {
            for (result, n) in [
                ("sent", &up.recent.hedges_sent),
                ("won", &up.recent.hedges_won),
            ] {
                hedges.push_str(&format!(
                    "portico_upstream_hedges_total{{upstream=\"{name}\",result=\"{result}\"}} {}\n",
                    n.load(std::sync::atomic::Ordering::Relaxed)
                ));
            }
        }
    }
    text.push_str(&shed);
    text.push_str("# HELP portico_upstream_retries_total Retries and hedges asked of the retry budget, by whether it allowed them.\n# TYPE portico_upstream_retries_total counter\n");
    for (name, up) in &snap.upstreams {
        for (result, n) in [
            ("granted", &up.budget.granted),
            ("refused", &up.budget.refused),
        ] {
            text.push_str(&format!(
                "portico_upstream_retries_total{{upstream=\"{name}\",result=\"{result}\"}} {}\n",
                n.load(std::sync::atomic::Ordering::Relaxed)
            ));
        }
    }
    text.push_str(&hedges);
    text.push_str("# HELP portico_upstream_circuit_state State of the circuit breaker governing the target: 0 closed, 1 open, 2 half-open.\n# TYPE portico_upstream_circuit_state gauge\n");
    for (name, up) in &snap.upstreams {
        let Some(c) = &up.circuit else { continue };
        for t in &up.live.current().targets {
            if let Some(b) = c.breaker(t) {
                let code = match b.state(now) {
                    portico_upstream::State::Closed => 0,
                    portico_upstream::State::Open => 1,
                    portico_upstream::State::HalfOpen => 2,
                };
                text.push_str(&format!(
                    "portico_upstream_circuit_state{{upstream=\"{name}\",target=\"{}\"}} {code}\n",
                    t.url
                ));
            }
        }
    }
    text.push_str("# HELP portico_upstream_circuit_transitions_total Circuit breaker transitions, by the state entered.\n# TYPE portico_upstream_circuit_transitions_total counter\n");
    for (name, up) in &snap.upstreams {
        let Some(c) = &up.circuit else { continue };
        for to in CIRCUIT_STATES {
            text.push_str(&format!(
                "portico_upstream_circuit_transitions_total{{upstream=\"{name}\",to=\"{}\"}} {}\n",
                to.as_str(),
                c.transitions.get(to)
            ));
        }
    }
    // The policies' own metrics, once per instance (a global policy is shared by routes).
    let mut seen = std::collections::HashSet::new();
    let mut policies = String::new();
    for r in &snap.routes {
        for e in &r.chain {
            if seen.insert(Arc::as_ptr(&e.policy).cast::<()>() as usize) {
                e.policy.metrics(&mut policies);
            }
        }
    }
    text.push_str(&group_families(&policies));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Prometheus text with each metric family's lines together and its `# HELP` and
/// `# TYPE` once: several instances of a policy report the same families.
fn group_families(text: &str) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut families: std::collections::HashMap<&str, (Vec<&str>, Vec<&str>)> = Default::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let meta = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "));
        let name = match meta {
            Some(rest) => rest.split(' ').next().unwrap_or(""),
            None if line.starts_with('#') => continue,
            None => {
                let sample = line.split(['{', ' ']).next().unwrap_or("");
                // Histogram and summary series belong to their family.
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| sample.strip_suffix(s))
                    .filter(|f| families.contains_key(f))
                    .unwrap_or(sample)
            }
        };
        let f = families.entry(name).or_insert_with(|| {
            order.push(name);
            Default::default()
        });
        match meta {
            Some(_) if f.0.iter().any(|m| m[..6] == line[..6]) => {}
            Some(_) => f.0.push(line),
            None => f.1.push(line),
        }
    }
    let mut out = String::with_capacity(text.len());
    for name in order {
        if let Some((meta, samples)) = families.get(name) {
            for l in meta.iter().chain(samples) {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

fn route_json(r: &CompiledRoute) -> Value {
    let c = &r.config;
    let plugins: Vec<Value> = r
        .chain
        .iter()
        .map(|e| json!({"name": e.name, "priority": e.priority, "stage": e.stage, "source": e.source}))
        .collect();
    json!({
        "name": &*r.name,
        "hosts": c.hosts,
        "paths": c.paths,
        "methods": c.methods,
        "headers": c.headers.iter().map(|(k, v)| (k.clone(), Value::String(v.0.clone()))).collect::<serde_json::Map<_, _>>(),
        "upstream": c.upstream,
        "strip_prefix": c.strip_prefix,
        "rewrite": c.rewrite,
        "preserve_host": c.preserve_host,
        "priority": c.priority,
        "timeouts": {"connect": r.timeouts.connect, "request": r.timeouts.request, "idle": r.timeouts.idle},
        "plugins": plugins,
    })
}

async fn routes(State(gw): State<Arc<Gateway>>) -> Response {
    let snap = gw.snapshot();
    let list: Vec<Value> = snap.routes.iter().map(|r| route_json(r)).collect();
    Json(json!({"generation": gw.generation(), "routes": list})).into_response()
}

async fn route(State(gw): State<Arc<Gateway>>, Path(name): Path<String>) -> Response {
    let snap = gw.snapshot();
    match snap.routes.iter().find(|r| *r.name == *name) {
        Some(r) => Json(route_json(r)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route named `{name}`"),
        ),
    }
}

async fn upstreams(State(gw): State<Arc<Gateway>>) -> Response {
    let snap = gw.snapshot();
    let now = portico_upstream::now_ms();
    let mut names: Vec<&String> = snap.upstreams.keys().collect();
    names.sort();
    let list: Vec<Value> = names
        .into_iter()
        .filter_map(|n| snap.upstreams.get(n).map(|u| (n, u)))
        .map(|(n, u)| {
            let cfg = snap.loaded.config.upstreams.get(n);
            let set = u.live.current();
            let targets: Vec<Value> = set
                .targets
                .iter()
                .map(|t| {
                    let circuit = u
                        .circuit
                        .as_ref()
                        .and_then(|c| c.breaker(t))
                        .map(|b| b.state(now).as_str());
                    json!({
                        "url": &*t.url,
                        "weight": t.weight,
                        "healthy": t.health.available(now),
                        "active_check": u.active.as_ref().map(|_| if t.health.active_down() { "down" } else { "up" }),
                        "ejected_for_ms": t.health.ejected(now).then(|| t.health.ejected_until().saturating_sub(now)),
                        "in_flight": t.health.in_flight(),
                        "consecutive_failures": t.health.consecutive_failures(),
                        "ejections": t.health.ejections(),
                        "circuit": circuit,
                    })
                })
                .collect();
            let circuit = u.circuit.as_ref().map(|c| {
                let transitions: serde_json::Map<String, Value> = CIRCUIT_STATES
                    .iter()
                    .map(|s| (s.as_str().to_string(), json!(c.transitions.get(*s))))
                    .collect();
                json!({
                    "per_target": c.per_target,
                    "state": c.upstream_wide.as_ref().map(|b| b.state(now).as_str()),
                    "transitions": transitions,
                })
            });
            let discovery = u.discovery.as_ref().map(|d| {
                let st = &u.live.discovery;
                let last_ok = st.last_ok_ms.load(std::sync::atomic::Ordering::Relaxed);
                json!({
                    "source": d.source(),
                    "updates": st.updates.load(std::sync::atomic::Ordering::Relaxed),
                    "errors": st.errors.load(std::sync::atomic::Ordering::Relaxed),
                    "last_error": st.last_error.lock().clone(),
                    "last_success_ms_ago": (last_ok > 0).then(|| now.saturating_sub(last_ok)),
                })
            });
            json!({
                "name": n,
                "balance": cfg.map(|c| c.balance),
                "discovery": discovery,
                "when_all_unhealthy": u.when_all_unhealthy,
                "adaptive_concurrency": u.adaptive.as_ref().map(|a| json!({
                    "limit": a.limit(),
                    "in_flight": a.in_flight(),
                    "shed": a.shed.load(std::sync::atomic::Ordering::Relaxed),
                })),
                "hedges": u.hedging.as_ref().map(|_| json!({
                    "sent": u.recent.hedges_sent.load(std::sync::atomic::Ordering::Relaxed),
                    "won": u.recent.hedges_won.load(std::sync::atomic::Ordering::Relaxed),
                })),
                "protocol": cfg.map(|c| c.protocol),
                "timeouts": {"connect": u.timeouts.connect, "request": u.timeouts.request, "idle": u.timeouts.idle},
                "targets": targets,
                "circuit_breaker": circuit,
                "retries": u.retries.as_ref().and_then(|r| serde_json::to_value(r).ok()),
            })
        })
        .collect();
    Json(json!({"upstreams": list})).into_response()
}

async fn reload(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.reload().await {
        Ok(g) => Json(json!({"status": "reloaded", "generation": g})).into_response(),
        Err(d) => {
            let problems: Vec<Value> =
                d.0.iter()
                    .map(|p| {
                        json!({
                            "file": p.file,
                            "line": p.pos.map(|x| x.line),
                            "column": p.pos.map(|x| x.col),
                            "path": p.path.to_string(),
                            "message": p.message,
                            "hint": p.hint,
                            "text": p.to_string(),
                        })
                    })
                    .collect();
            let body = json!({"error": {
                "status": 422,
                "code": "invalid_config",
                "message": "the configuration was rejected; the previous one keeps serving",
                "problems": problems,
            }});
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
        }
    }
}
