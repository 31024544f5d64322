//! The one gateway error type and the one function that turns it into the client's answer.

use std::borrow::Cow;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};
use serde_json::{Map, Value};

use crate::body::Body;

/// What went wrong, as the client sees it. Each kind has one status and one code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NoRoute,
    /// The route's OpenAPI document (`openapi`) describes no such operation.
    NoOperation,
    MethodNotAllowed,
    BadRequest,
    /// The request is well-formed but does not match what the route expects (e.g. a
    /// `request-validation` schema); the answer lists the violations.
    ValidationFailed,
    Unauthorized,
    Forbidden,
    PayloadTooLarge,
    UnsupportedMediaType,
    UriTooLong,
    TooManyRequests,
    HeadersTooLarge,
    Internal,
    UpstreamUnavailable,
    NoHealthyUpstream,
    UpstreamTimeout,
    /// The upstream's response does not match the route's OpenAPI document.
    ResponseContractViolation,
    /// A response transform that must not be skipped could not read the upstream's
    /// body (`data-masking` over its `max_body`, XML that does not parse, ...).
    ResponseNotTransformable,
    /// A service authentication depends on (a token introspection endpoint) failed.
    AuthUnavailable,
    /// The upstream's circuit breaker is open: the request was not sent.
    CircuitOpen,
    /// The upstream's adaptive concurrency limit is reached: the request was not sent.
    UpstreamOverloaded,
    /// `concurrency-limit`: too many requests in flight for the key, and the queue
    /// was full or the wait ran out.
    ConcurrencyLimited,
    /// `rate-limit` in cluster mode with `on_store_error: deny`: the shared store
    /// (Redis) did not answer.
    RateLimitUnavailable,
    /// `quota`: a limit of the key is used up for the current period.
    QuotaExceeded,
    /// `quota` in cluster mode with `on_store_error: deny`: Redis did not answer.
    QuotaUnavailable,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::NoRoute | ErrorKind::NoOperation => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::BadRequest | ErrorKind::ValidationFailed => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorKind::TooManyRequests | ErrorKind::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::UpstreamUnavailable
            | ErrorKind::ResponseContractViolation
            | ErrorKind::ResponseNotTransformable => StatusCode::BAD_GATEWAY,
            ErrorKind::NoHealthyUpstream => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::AuthUnavailable
            | ErrorKind::CircuitOpen
            | ErrorKind::UpstreamOverloaded
            | ErrorKind::ConcurrencyLimited
            | ErrorKind::RateLimitUnavailable
            | ErrorKind::QuotaUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine-readable code in the JSON error body and the access log.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::NoOperation => "no_operation",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::ValidationFailed => "validation_failed",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::UriTooLong => "uri_too_long",
            ErrorKind::TooManyRequests => "too_many_requests",
            ErrorKind::HeadersTooLarge => "headers_too_large",
            ErrorKind::Internal => "internal_error",
            ErrorKind::UpstreamUnavailable => "upstream_unavailable",
            ErrorKind::NoHealthyUpstream => "no_healthy_upstream",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::ResponseContractViolation => "response_contract_violation",
            ErrorKind::ResponseNotTransformable => "response_not_transformable",
            ErrorKind::AuthUnavailable => "auth_unavailable",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::UpstreamOverloaded => "upstream_overloaded",
            ErrorKind::ConcurrencyLimited => "concurrency_limited",
            ErrorKind::RateLimitUnavailable => "rate_limit_unavailable",
            ErrorKind::QuotaExceeded => "quota_exceeded",
            ErrorKind::QuotaUnavailable => "quota_unavailable",
        }
    }
}

/// Which side caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
    Internal,
}

/// A gateway error: kind, side, message, and extra headers for the answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", kind.code())]
pub struct GatewayError {
    pub kind: ErrorKind,
    pub side: Side,
    pub message: Cow<'static, str>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Close the client connection after answering.
    pub close: bool,
    /// More members of the JSON body's `error` object (e.g. `violations`), next to
    /// `status`, `code`, `message` and `request_id`, which they cannot replace. Boxed:
    /// rare, and it keeps the error (and every `Result` carrying it) small.
    pub details: Option<Box<Map<String, Value>>>,
}

impl GatewayError {
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        let side = match kind {
            ErrorKind::UpstreamUnavailable
            | ErrorKind::NoHealthyUpstream
            | ErrorKind::UpstreamTimeout
            | ErrorKind::ResponseContractViolation
            | ErrorKind::ResponseNotTransformable
            | ErrorKind::AuthUnavailable
            | ErrorKind::CircuitOpen
            | ErrorKind::UpstreamOverloaded => Side::Upstream,
            ErrorKind::Internal => Side::Internal,
            // `RateLimitUnavailable` is the store's fault, but the policy logs store
            // failures itself (rate-limited): not one warning per refused request.
            _ => Side::Downstream,
        };
        GatewayError {
            kind,
            side,
            message: message.into(),
            headers: Vec::new(),
            close: false,
            details: None,
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Add a member to the `error` object of the JSON body (see [`GatewayError::details`]).
    pub fn with_detail(mut self, key: impl Into<String>, value: Value) -> Self {
        self.details
            .get_or_insert_with(Default::default)
            .insert(key.into(), value);
        self
    }

    /// The client's answer: the status of the kind and the standard JSON body.
    pub fn to_response(&self, request_id: &str) -> Response<Body> {
        let body = match &self.details {
            None => serde_json::json!({
                "error": {
                    "status": self.kind.status().as_u16(),
                    "code": self.kind.code(),
                    "message": self.message,
                    "request_id": request_id,
                }
            }),
            Some(details) => {
                let mut e = (**details).clone();
                e.insert("status".into(), self.kind.status().as_u16().into());
                e.insert("code".into(), self.kind.code().into());
                e.insert("message".into(), Value::String(self.message.to_string()));
                e.insert("request_id".into(), request_id.into());
                serde_json::json!({ "error": e })
            }
        };
        let bytes = Bytes::from(body.to_string());
        let mut resp = Response::new(Body::full(bytes));
        *resp.status_mut() = self.kind.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (n, v) in &self.headers {
            h.append(n.clone(), v.clone());
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
