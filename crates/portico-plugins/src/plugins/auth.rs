//! What authentication policies share: the 401 answer, the anonymous consumer
//! setting, and removing a credential from the request before it goes upstream.

use std::sync::Arc;

use http::header::WWW_AUTHENTICATE;
use http::uri::PathAndQuery;
use http::{HeaderValue, Uri};

use crate::error::{ErrorKind, GatewayError};
use crate::policy::{AuthInfo, Step};

/// The realm in every challenge.
pub const REALM: &str = "portico";

/// Headers a claim may not be sent upstream as: framing and hop-by-hop headers, the
/// credential headers, and the gateway's own forwarding and identity headers.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "authorization",
    "cookie",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
    "x-consumer-name",
    "x-consumer-groups",
];

/// The header a `claims_to_headers` entry sends a claim as.
pub fn claim_header(name: &str) -> Result<http::HeaderName, String> {
    match http::HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) if RESERVED.contains(&h.as_str()) => Err(format!("`{name}` cannot carry a claim")),
        Ok(h) => Ok(h),
        Err(_) => Err(format!("`{name}` is not a valid header name")),
    }
}

/// The consumer a verified token names: its `consumer_claim` (a string or a number)
/// matched against the consumers' `jwt` credentials, those naming the token's `iss`
/// first. Shared by `jwt`, `oauth2-introspection` and `oidc`.
pub fn token_consumer(
    identity: &portico_store::Identity,
    claims: &serde_json::Map<String, serde_json::Value>,
    consumer_claim: &str,
) -> Option<Arc<portico_store::Consumer>> {
    use serde_json::Value;
    let iss = claims.get("iss").and_then(Value::as_str);
    let ix = identity.index();
    match claims.get(consumer_claim) {
        Some(Value::String(s)) => ix.jwt_consumer(iss, s).cloned(),
        Some(Value::Number(n)) => ix.jwt_consumer(iss, &n.to_string()).cloned(),
        _ => None,
    }
}

/// Send the configured claims upstream as headers (strings as they are, other JSON
/// values serialized; absent and null claims send nothing).
pub fn set_claim_headers(
    h: &mut http::HeaderMap,
    claims: &serde_json::Map<String, serde_json::Value>,
    list: &[(String, http::HeaderName)],
) {
    use serde_json::Value;
    for (claim, name) in list {
        let value = match claims.get(claim) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => HeaderValue::from_bytes(s.as_bytes()),
            Some(other) => HeaderValue::from_str(&other.to_string()),
        };
        if let Ok(v) = value {
            h.insert(name.clone(), v);
        }
    }
}

/// A 401 with this policy's challenge.
pub fn refusal(challenge: &HeaderValue, message: &'static str) -> GatewayError {
    GatewayError::new(ErrorKind::Unauthorized, message)
        .with_header(WWW_AUTHENTICATE, challenge.clone())
}

/// [`refusal`] as a request phase's answer.
pub fn unauthorized(challenge: &HeaderValue, message: &'static str) -> Step<'static> {
    Step::error(refusal(challenge, message))
}

/// The policy's [`AuthInfo`].
pub fn info(challenge: &HeaderValue, anonymous: &Option<String>) -> AuthInfo {
    AuthInfo {
        challenge: challenge.clone(),
        anonymous: anonymous.as_deref().map(Arc::from),
    }
}

/// The URI without every `name=` query parameter (names compared percent-decoded).
pub fn without_query_param(uri: &Uri, name: &str) -> Uri {
    let Some(q) = uri.query() else {
        return uri.clone();
    };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            let k = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !decoded_eq(k, name)
        })
        .collect();
    let mut pq = uri.path().to_string();
    if !kept.is_empty() {
        pq.push('?');
        pq.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    match PathAndQuery::try_from(pq) {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return uri.clone(),
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

fn decoded_eq(k: &str, name: &str) -> bool {
    percent_encoding::percent_decode_str(&k.replace('+', " "))
        .decode_utf8_lossy()
        .as_ref()
        == name
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn query_param_removed() {
        let u: Uri = "/a/b?x=1&apikey=secret&y=2&api%6Bey=s2".parse().unwrap();
        assert_eq!(
            without_query_param(&u, "apikey").to_string(),
            "/a/b?x=1&y=2"
        );
        let u: Uri = "/a?apikey=secret".parse().unwrap();
        assert_eq!(without_query_param(&u, "apikey").to_string(), "/a");
        let u: Uri = "/a".parse().unwrap();
        assert_eq!(without_query_param(&u, "apikey").to_string(), "/a");
    }
}
