//! `DELETE /admin/cache`: purge cached responses (the `cache` policy) by exactly one of
//! `route=NAME`, `url=http://host/path?query` or `prefix=/path/`.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use portico_plugins::plugins::cache::{self, Purge};
use portico_proxy::Gateway;
use serde_json::json;

use crate::error;

const PARAMS: &str = "give exactly one of `route`, `url` or `prefix`";

/// `400` whose error object also names the offending `parameter`.
fn bad(param: &str, message: String) -> Response {
    let body = json!({"error": {
        "status": 400,
        "code": "bad_request",
        "message": message,
        "parameter": param,
    }});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

pub async fn purge(
    State(gw): State<Arc<Gateway>>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let Ok(Query(pairs)) = q else {
        return bad("query", format!("the query string is not valid; {PARAMS}"));
    };
    if let Some((name, _)) = pairs
        .iter()
        .find(|(k, _)| !matches!(k.as_str(), "route" | "url" | "prefix"))
    {
        return bad(name, format!("unknown parameter `{name}`; {PARAMS}"));
    }
    let (name, value) = match pairs.as_slice() {
        [one] => one,
        [] => return bad("route", format!("no parameter; {PARAMS}")),
        [_, (second, _), ..] => {
            return bad(
                second,
                format!("more than one parameter (`{second}`); {PARAMS}"),
            )
        }
    };
    let p = match name.as_str() {
        "route" => {
            if value.is_empty() {
                return bad("route", "`route` is empty; name a route".into());
            }
            let snap = gw.snapshot();
            if !snap.routes.iter().any(|r| *r.name == **value) {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("parameter `route`: no route named `{value}`"),
                );
            }
            Purge::Route(value.clone())
        }
        "prefix" => {
            if !value.starts_with('/') {
                return bad(
                    "prefix",
                    format!("parameter `prefix`: `{value}` is not a path; it must start with `/`"),
                );
            }
            Purge::Prefix(value.clone())
        }
        _ => match Purge::url(value) {
            Ok(p) => p,
            Err(e) => return bad("url", format!("parameter `url`: {e}")),
        },
    };
    match cache::purge(&gw.policy_state, &p).await {
        Ok(n) => Json(json!({"purged": n})).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "cache_store_unavailable",
            format!("the purge did not complete: {e}"),
        ),
    }
}
