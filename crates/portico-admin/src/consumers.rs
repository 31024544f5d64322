//! `/admin/consumers`: consumers and their credentials in the store.
//!
//! Writes go to the store and rebuild the consumer index before the answer is sent,
//! so a change is live for the next request. Consumers declared in the
//! configuration file are listed but cannot be changed here (409 `declared_in_file`).
//! Secrets are never shown: a generated API key appears once, in the answer to its
//! creation.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use portico_config::units::Dur;
use portico_proxy::store::{
    now_secs, Consumer, CredKind, CredRow, Identity, NewCredential, Refusal,
};
use portico_proxy::Gateway;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error;

fn time(t: i64) -> Value {
    jiff::Timestamp::from_second(t).map_or(Value::Null, |t| Value::String(t.to_string()))
}

fn consumer_json(c: &Consumer, creds: &[CredRow]) -> Value {
    let mut v = json!({
        "name": c.name,
        "groups": c.groups,
        "metadata": c.metadata,
        "source": c.source.as_str(),
        "credentials": creds.iter().map(credential_json).collect::<Vec<_>>(),
    });
    if let (true, Some(o)) = (c.created_at > 0, v.as_object_mut()) {
        o.insert("created_at".into(), time(c.created_at));
        o.insert("updated_at".into(), time(c.updated_at));
    }
    v
}

fn credential_json(c: &CredRow) -> Value {
    let mut v = json!({
        "id": c.id,
        "type": c.kind.as_str(),
        "consumer": c.consumer,
    });
    if let Some(o) = v.as_object_mut() {
        let shown = match c.kind {
            CredKind::KeyAuth => "key_hint",
            CredKind::BasicAuth => "username",
            CredKind::Jwt | CredKind::Mtls => "subject",
            CredKind::HmacAuth => "key_id",
        };
        o.insert(shown.into(), Value::String(c.display.clone()));
        if c.created_at > 0 {
            o.insert("created_at".into(), time(c.created_at));
        }
        if let Some(t) = c.expires_at {
            o.insert("expires_at".into(), time(t));
            o.insert("expired".into(), Value::Bool(now_secs() >= t));
        }
    }
    v
}

fn refusal(r: Refusal) -> Response {
    let (status, code) = match &r {
        Refusal::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        Refusal::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        Refusal::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        Refusal::DeclaredInFile(_) => (StatusCode::CONFLICT, "declared_in_file"),
        Refusal::NoStore => (StatusCode::SERVICE_UNAVAILABLE, "no_store"),
        Refusal::Store(e) => {
            tracing::error!(error = %e, "store operation failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "store_error")
        }
    };
    error(status, code, r.to_string())
}

/// Parse a JSON body, saying where it is wrong. (The error is the finished answer:
/// large, but this is the admin API's cold path.)
#[allow(clippy::result_large_err)]
pub(crate) fn body<T: DeserializeOwned>(b: &Bytes) -> Result<T, Response> {
    if b.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the request needs a JSON body",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(b);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let msg = if path == "." {
            format!("invalid JSON body: {}", e.inner())
        } else {
            format!("invalid JSON body at `{path}`: {}", e.inner())
        };
        error(StatusCode::BAD_REQUEST, "invalid_request", msg)
    })
}

/// Run a store operation on the blocking pool.
#[allow(clippy::result_large_err)]
async fn blocking<T: Send + 'static>(
    gw: &Arc<Gateway>,
    f: impl FnOnce(&Identity) -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Response> {
    let id = gw.identity.clone();
    match tokio::task::spawn_blocking(move || f(&id)).await {
        Ok(r) => r.map_err(refusal),
        Err(_) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the store operation failed",
        )),
    }
}

fn view(gw: &Gateway, name: &str) -> Option<Value> {
    let ix = gw.identity.index();
    let c = ix.consumer(name)?;
    Some(consumer_json(c, ix.credentials_of(name)))
}

pub async fn list(State(gw): State<Arc<Gateway>>) -> Response {
    let ix = gw.identity.index();
    let list: Vec<Value> = ix
        .consumers()
        .into_iter()
        .map(|c| consumer_json(c, ix.credentials_of(&c.name)))
        .collect();
    Json(json!({"consumers": list})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewConsumer {
    name: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    metadata: Map<String, Value>,
}

pub async fn create(State(gw): State<Arc<Gateway>>, b: Bytes) -> Response {
    let n: NewConsumer = match body(&b) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let name = n.name.clone();
    match blocking(&gw, move |id| {
        id.create_consumer(&n.name, n.groups, n.metadata)
    })
    .await
    {
        Ok(_) => match view(&gw, &name) {
            Some(v) => (StatusCode::CREATED, Json(v)).into_response(),
            None => (StatusCode::CREATED, Json(json!({"name": name}))).into_response(),
        },
        Err(r) => r,
    }
}

pub async fn get(State(gw): State<Arc<Gateway>>, Path(name): Path<String>) -> Response {
    match view(&gw, &name) {
        Some(v) => Json(v).into_response(),
        None => not_found(&name),
    }
}

fn not_found(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no consumer named `{name}`"),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

/// PATCH changes the keys given; PUT replaces groups and metadata (absent: empty).
pub async fn patch(State(gw): State<Arc<Gateway>>, Path(name): Path<String>, b: Bytes) -> Response {
    update(gw, name, b, false).await
}

pub async fn put(State(gw): State<Arc<Gateway>>, Path(name): Path<String>, b: Bytes) -> Response {
    update(gw, name, b, true).await
}

async fn update(gw: Arc<Gateway>, name: String, b: Bytes, replace: bool) -> Response {
    let p: Patch = match body(&b) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (groups, metadata) = if replace {
        (
            Some(p.groups.unwrap_or_default()),
            Some(p.metadata.unwrap_or_default()),
        )
    } else {
        (p.groups, p.metadata)
    };
    let n = name.clone();
    match blocking(&gw, move |id| id.update_consumer(&n, groups, metadata)).await {
        Ok(_) => view(&gw, &name).map_or_else(|| not_found(&name), |v| Json(v).into_response()),
        Err(r) => r,
    }
}

pub async fn delete(State(gw): State<Arc<Gateway>>, Path(name): Path<String>) -> Response {
    match blocking(&gw, move |id| id.delete_consumer(&name)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

pub async fn credentials(State(gw): State<Arc<Gateway>>, Path(name): Path<String>) -> Response {
    let ix = gw.identity.index();
    if ix.consumer(&name).is_none() {
        return not_found(&name);
    }
    let list: Vec<Value> = ix
        .credentials_of(&name)
        .iter()
        .map(credential_json)
        .collect();
    Json(json!({"credentials": list})).into_response()
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
enum NewCred {
    KeyAuth {
        /// A key of your own (16+ characters); absent: the gateway makes one.
        #[serde(default)]
        key: Option<String>,
        #[serde(default)]
        expires_at: Option<String>,
        #[serde(default)]
        expires_in: Option<Dur>,
    },
    BasicAuth {
        username: String,
        password: String,
    },
    Jwt {
        subject: String,
        #[serde(default)]
        issuer: Option<String>,
    },
    Mtls {
        subject: String,
    },
    HmacAuth {
        #[serde(default)]
        key_id: Option<String>,
        #[serde(default)]
        secret: Option<String>,
    },
}

pub async fn create_credential(
    State(gw): State<Arc<Gateway>>,
    Path(name): Path<String>,
    b: Bytes,
) -> Response {
    let v: Value = match body(&b) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match v.get("type").and_then(Value::as_str) {
        Some(t) if CredKind::parse(t).is_some() => {}
        Some(t) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!(
                    "unknown credential type `{t}`; use one of: {}",
                    CredKind::ALL.join(", ")
                ),
            )
        }
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("`type` is required: one of {}", CredKind::ALL.join(", ")),
            )
        }
    }
    let c: NewCred = match body(&b) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let new = match c {
        NewCred::KeyAuth {
            key,
            expires_at,
            expires_in,
        } => {
            let at = match (expires_at, expires_in) {
                (Some(_), Some(_)) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "give `expires_at` or `expires_in`, not both",
                    )
                }
                (Some(t), None) => match portico_config::identity::parse_time(&t) {
                    Ok(t) => Some(t),
                    Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e),
                },
                (None, Some(d)) => Some(
                    now_secs().saturating_add(i64::try_from(d.0.as_secs()).unwrap_or(i64::MAX)),
                ),
                (None, None) => None,
            };
            NewCredential::KeyAuth {
                key,
                expires_at: at,
            }
        }
        NewCred::BasicAuth { username, password } => {
            NewCredential::BasicAuth { username, password }
        }
        NewCred::Jwt { subject, issuer } => NewCredential::Jwt { subject, issuer },
        NewCred::Mtls { subject } => NewCredential::Mtls { subject },
        NewCred::HmacAuth { key_id, secret } => NewCredential::HmacAuth { key_id, secret },
    };
    match blocking(&gw, move |id| id.add_credential(&name, new)).await {
        Ok((row, key)) => {
            let mut v = credential_json(&row);
            if let (Some(k), Some(o)) = (key, v.as_object_mut()) {
                let (field, note) = if row.kind == CredKind::HmacAuth {
                    ("secret", "the secret is shown only now")
                } else {
                    ("key", "the key is shown only now; it is stored as a digest")
                };
                o.insert(field.into(), Value::String(k));
                o.insert("note".into(), Value::String(note.into()));
            }
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Err(r) => r,
    }
}

pub async fn get_credential(
    State(gw): State<Arc<Gateway>>,
    Path((name, cid)): Path<(String, String)>,
) -> Response {
    let ix = gw.identity.index();
    match ix.credentials_of(&name).iter().find(|c| c.id == cid) {
        Some(c) => Json(credential_json(c)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("consumer `{name}` has no credential `{cid}`"),
        ),
    }
}

pub async fn delete_credential(
    State(gw): State<Arc<Gateway>>,
    Path((name, cid)): Path<(String, String)>,
) -> Response {
    match blocking(&gw, move |id| id.delete_credential(&name, &cid)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}
