//! `/admin/registry`: the gateway's own service registry (upstreams with
//! `discovery: {registry: {service}}` follow it).
//!
//! An instance registers with `PUT /admin/registry/{service}` (the same address again
//! renews it under the same id), heartbeats with `PUT /admin/registry/{service}/{id}`
//! and leaves with `DELETE`. A registration not renewed within its TTL drops out.
//! Registrations are kept in memory: after a restart, instances come back with their
//! next registration (a heartbeat for an unknown id is answered 404).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use portico_proxy::Gateway;
use portico_upstream::discovery::registry::{check_service, Instance, RegError, Registration};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::consumers::body;
use crate::error;

/// A time-to-live: `"30s"` or a number of seconds.
struct Ttl(Duration);

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let bad = || D::Error::custom("expected a duration like \"30s\" or a number of seconds");
        match Value::deserialize(d)? {
            Value::String(s) => portico_config::units::parse_duration(&s)
                .map(Ttl)
                .map_err(D::Error::custom),
            Value::Number(n) => n
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
                .map(|s| Ttl(Duration::from_secs_f64(s)))
                .ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewInstance {
    /// `host:port` or `http(s)://host:port`.
    address: String,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    ttl: Option<Ttl>,
}

fn secs(ms: u64) -> Value {
    if ms.is_multiple_of(1000) {
        json!(ms / 1000)
    } else {
        json!(ms as f64 / 1000.0)
    }
}

fn instance_json(i: &Instance, now: u64) -> Value {
    json!({
        "id": i.id,
        "address": i.authority,
        "scheme": i.scheme.map(|s| s.as_str()),
        "weight": i.weight,
        "metadata": i.metadata,
        "ttl": secs(i.ttl.as_millis() as u64),
        "expires_in": secs(i.expires_in_ms(now)),
    })
}

fn refusal(e: RegError) -> Response {
    match &e {
        RegError::Invalid { field, message } => {
            let body = json!({"error": {
                "status": 400,
                "code": "invalid_request",
                "field": field,
                "message": format!("`{field}`: {message}"),
            }});
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
        RegError::NotFound(m) => error(StatusCode::NOT_FOUND, "not_found", m.clone()),
        RegError::Full(m) => error(StatusCode::CONFLICT, "registry_full", m.clone()),
    }
}

pub async fn list(State(gw): State<Arc<Gateway>>) -> Response {
    let reg = &gw.sources.registry;
    let now = reg.now();
    let services: serde_json::Map<String, Value> = reg
        .all()
        .into_iter()
        .map(|(k, v)| {
            let list: Vec<Value> = v.iter().map(|i| instance_json(i, now)).collect();
            (k, Value::Array(list))
        })
        .collect();
    Json(json!({"services": services})).into_response()
}

pub async fn service(State(gw): State<Arc<Gateway>>, Path(service): Path<String>) -> Response {
    if let Err(e) = check_service(&service) {
        return refusal(e);
    }
    let reg = &gw.sources.registry;
    let now = reg.now();
    let list: Vec<Value> = reg
        .instances(&service)
        .iter()
        .map(|i| instance_json(i, now))
        .collect();
    Json(json!({"service": service, "instances": list})).into_response()
}

pub async fn register(
    State(gw): State<Arc<Gateway>>,
    Path(service): Path<String>,
    b: Bytes,
) -> Response {
    if let Err(e) = check_service(&service) {
        return refusal(e);
    }
    let n: NewInstance = match body(&b) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let reg = &gw.sources.registry;
    let r = Registration {
        address: n.address,
        weight: n.weight,
        metadata: n.metadata,
        ttl: n.ttl.map(|t| t.0),
    };
    match reg.register(&service, r) {
        Ok(i) => {
            tracing::info!(service = %service, id = %i.id, address = %i.authority, "instance registered");
            // Just set: it expires a whole TTL from the registration.
            let at = i.expires_at.saturating_sub(i.ttl.as_millis() as u64);
            Json(instance_json(&i, at)).into_response()
        }
        Err(e) => refusal(e),
    }
}

pub async fn renew(
    State(gw): State<Arc<Gateway>>,
    Path((service, id)): Path<(String, String)>,
) -> Response {
    let reg = &gw.sources.registry;
    match reg.renew(&service, &id) {
        Ok(i) => {
            Json(json!({"id": i.id, "expires_in": secs(i.ttl.as_millis() as u64)})).into_response()
        }
        Err(e) => refusal(e),
    }
}

pub async fn deregister(
    State(gw): State<Arc<Gateway>>,
    Path((service, id)): Path<(String, String)>,
) -> Response {
    match gw.sources.registry.deregister(&service, &id) {
        Ok(i) => {
            tracing::info!(service = %service, id = %i.id, "instance deregistered");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => refusal(e),
    }
}
