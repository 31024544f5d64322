//! `/admin/quotas`: what each key used of the `quota` limits in the current period,
//! and resetting a key. Reads come from memory (local mode) or Redis (cluster mode).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use portico_plugins::plugins::quota::registry;
use portico_proxy::Gateway;
use serde_json::json;

use crate::error;

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

/// The query parameters, refusing any but `allowed`, and checking `scope`.
#[allow(clippy::result_large_err)]
fn params(q: Params, allowed: &[&str]) -> Result<HashMap<String, String>, Response> {
    let Query(q) = q.map_err(|e| bad(format!("invalid query string: {e}")))?;
    if let Some(k) = q.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown query parameter `{k}`; use {}",
            allowed
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(" and ")
        )));
    }
    if let Some(s) = q.get("scope") {
        if s != "global" && s.strip_prefix("route:").is_none_or(str::is_empty) {
            return Err(bad(format!(
                "`scope`: `{s}` is not a scope; use `global` or `route:NAME`"
            )));
        }
    }
    if q.get("key").is_some_and(String::is_empty) {
        return Err(bad("`key` is empty"));
    }
    Ok(q)
}

fn unavailable(e: String) -> Response {
    tracing::error!(error = %e, "quota store operation failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "quota_unavailable",
        format!("the quota store did not answer: {e}"),
    )
}

/// `GET /admin/quotas[?scope=...][&key=...]`
pub async fn list(State(gw): State<Arc<Gateway>>, q: Params) -> Response {
    let q = match params(q, &["scope", "key"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let Some(reg) = registry(&gw.policy_state) else {
        return Json(json!({"quotas": []})).into_response();
    };
    match reg
        .usage(
            q.get("scope").map(String::as_str),
            q.get("key").map(String::as_str),
        )
        .await
    {
        Ok(rows) => Json(json!({"quotas": rows})).into_response(),
        Err(e) => unavailable(e),
    }
}

/// `DELETE /admin/quotas?scope=...&key=...`
pub async fn reset(State(gw): State<Arc<Gateway>>, q: Params) -> Response {
    let q = match params(q, &["scope", "key"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let (Some(scope), Some(key)) = (q.get("scope"), q.get("key")) else {
        let missing = if q.contains_key("scope") {
            "key"
        } else {
            "scope"
        };
        return bad(format!(
            "`{missing}` is required: reset one key of one scope (`?scope=route:NAME&key=KEY`)"
        ));
    };
    let found = match registry(&gw.policy_state) {
        Some(reg) => reg.reset(scope, key).await,
        None => Ok(false),
    };
    match found {
        Ok(true) => Json(json!({"status": "reset", "scope": scope, "key": key})).into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no quota usage for key `{key}` in scope `{scope}`"),
        ),
        Err(e) => unavailable(e),
    }
}
