//! `mock`: answer with a fixed response (stubs, maintenance pages), without an
//! upstream. `body` is a string (sent as it is, `text/plain` unless `content_type`
//! says otherwise) or any other JSON value (sent as JSON, `application/json`).
//! Strings — the body and header values — may be `${...}` templates.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use portico_config::grammar::Template;
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::body::Body;
use crate::ctx::Ctx;
use crate::policy::{Policy, Step};
use crate::registry::SettingsErrors;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Status of the answer. Default 200.
    #[serde(default)]
    pub status: Option<u16>,
    /// Headers of the answer (values are templates).
    #[serde(default)]
    pub headers: BTreeMap<String, Template>,
    /// The body: a string (a template, sent as it is) or a JSON value.
    #[serde(default)]
    pub body: Option<Value>,
    /// `Content-Type` of the answer. Default: `application/json` for a JSON body,
    /// `text/plain; charset=utf-8` for a string.
    #[serde(default)]
    pub content_type: Option<String>,
}

enum MockBody {
    None,
    Static(Bytes),
    Template(Template),
}

pub struct Mock {
    status: StatusCode,
    headers: Vec<(HeaderName, Template)>,
    body: MockBody,
    content_type: Option<HeaderValue>,
}

impl Mock {
    pub fn new(s: Settings) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        let status = match s.status {
            None => StatusCode::OK,
            Some(code) => match StatusCode::from_u16(code)
                .ok()
                .filter(|c| c.as_u16() >= 200)
            {
                Some(c) => c,
                None => {
                    errs.push((
                        KeyPath::root().key("status"),
                        format!("{code} is not a valid final status (200-999)"),
                    ));
                    StatusCode::OK
                }
            },
        };
        let mut headers = Vec::new();
        for (n, t) in s.headers {
            let at = KeyPath::root().key("headers").key(&n);
            match HeaderName::from_bytes(n.as_bytes()) {
                Ok(h) if t.is_literal() && HeaderValue::from_str(t.source()).is_err() => {
                    errs.push((at, format!("not a valid value for the header `{h}`")));
                }
                Ok(h) => headers.push((h, t)),
                Err(_) => errs.push((at, format!("`{n}` is not a valid header name"))),
            }
        }
        let (body, default_ct) = match s.body {
            None => (MockBody::None, None),
            Some(Value::String(text)) => {
                let b = match Template::parse(&text) {
                    Ok(t) if t.is_literal() => MockBody::Static(Bytes::from(text)),
                    Ok(t) => MockBody::Template(t),
                    Err(m) => {
                        errs.push((KeyPath::root().key("body"), m));
                        MockBody::None
                    }
                };
                (b, Some("text/plain; charset=utf-8"))
            }
            Some(v) => (
                MockBody::Static(Bytes::from(v.to_string())),
                Some("application/json"),
            ),
        };
        let content_type = match s.content_type {
            Some(ct) => match HeaderValue::from_str(&ct) {
                Ok(v) => Some(v),
                Err(_) => {
                    errs.push((
                        KeyPath::root().key("content_type"),
                        "not a valid header value".into(),
                    ));
                    None
                }
            },
            None => default_ct.map(HeaderValue::from_static),
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Mock {
            status,
            headers,
            body,
            content_type,
        })
    }
}

impl Policy for Mock {
    fn name(&self) -> &'static str {
        "mock"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        // The templates see the request's head (the body is discarded by the pipeline).
        let (parts, b) = std::mem::take(req).into_parts();
        let body = match &self.body {
            MockBody::None => Body::Empty,
            MockBody::Static(b) => Body::full(b.clone()),
            MockBody::Template(t) => Body::full(ctx.render(Some(&parts), t)),
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        if let Some(ct) = &self.content_type {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
        }
        for (n, t) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(&ctx.render(Some(&parts), t)) {
                resp.headers_mut().append(n.clone(), v);
            }
        }
        *req = Request::from_parts(parts, b);
        Step::respond(resp)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    async fn answer(settings: Value) -> (http::response::Parts, Bytes) {
        let m = Mock::new(serde_json::from_value(settings).unwrap()).unwrap();
        let mut ctx = Ctx::new(
            "rid-9".into(),
            "127.0.0.1".parse().unwrap(),
            "r".into(),
            "/".into(),
            Default::default(),
        );
        let mut req = Request::builder().uri("/x?a=1").body(Body::Empty).unwrap();
        let crate::policy::Flow::Respond(resp) = m.on_request(&mut ctx, &mut req).await else {
            panic!("mock did not answer");
        };
        let (parts, body) = resp.into_parts();
        let b = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        (parts, b)
    }

    #[tokio::test]
    async fn json_text_and_template_bodies() {
        let (p, b) = answer(
            json!({"status": 503, "body": {"down": true}, "headers": {"retry-after": "60"}}),
        )
        .await;
        assert_eq!(p.status, 503);
        assert_eq!(p.headers["content-type"], "application/json");
        assert_eq!(p.headers["retry-after"], "60");
        assert_eq!(&b[..], br#"{"down":true}"#);
        let (p, b) = answer(
            json!({"body": "<h1>${request_id} ${query.a}</h1>", "content_type": "text/html"}),
        )
        .await;
        assert_eq!(p.status, 200);
        assert_eq!(p.headers["content-type"], "text/html");
        assert_eq!(&b[..], b"<h1>rid-9 1</h1>");
        let (p, b) = answer(json!({"status": 204})).await;
        assert_eq!(p.status, 204);
        assert!(b.is_empty());
        assert!(p.headers.get("content-type").is_none());
    }

    #[test]
    fn bad_settings() {
        let e = Mock::new(
            serde_json::from_value(json!({"status": 99, "headers": {"a b": "x"}})).unwrap(),
        )
        .err()
        .unwrap();
        assert_eq!(e.len(), 2);
    }
}
