//! `echo`: answer with a JSON description of the request as the gateway saw it.
//! Used by the built-in demo route and handy for debugging routing and transforms.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::body::Body;
use crate::ctx::Ctx;
use crate::policy::{Policy, Step};
use crate::registry::SettingsErrors;
use portico_config::KeyPath;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// A message included in every answer.
    #[serde(default)]
    pub message: Option<String>,
    /// Status of the answer (default 200).
    #[serde(default)]
    pub status: Option<u16>,
}

pub struct Echo {
    message: Option<String>,
    status: StatusCode,
}

impl Echo {
    pub fn new(s: Settings) -> Result<Self, SettingsErrors> {
        let status = match s.status {
            None => StatusCode::OK,
            Some(code) => StatusCode::from_u16(code)
                .ok()
                .filter(|c| c.as_u16() >= 200)
                .ok_or_else(|| {
                    vec![(
                        KeyPath::root().key("status"),
                        format!("{code} is not a valid final status (200-999)"),
                    )]
                })?,
        };
        Ok(Echo {
            message: s.message,
            status,
        })
    }
}

impl Policy for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let mut headers = Map::new();
        for (n, v) in req.headers() {
            let v = Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned());
            match headers.get_mut(n.as_str()) {
                Some(Value::Array(a)) => a.push(v),
                Some(prev) => *prev = Value::Array(vec![prev.take(), v]),
                None => {
                    headers.insert(n.as_str().to_string(), v);
                }
            }
        }
        let params: Map<String, Value> = ctx
            .params
            .iter(&ctx.path)
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        let mut body = json!({
            "route": &*ctx.route_name,
            "method": req.method().as_str(),
            "path": ctx.path,
            "query": req.uri().query(),
            "params": params,
            "client_ip": ctx.client_ip.to_string(),
            "request_id": ctx.request_id.as_str(),
            "headers": headers,
        });
        if let Some(m) = &self.message {
            body["message"] = Value::String(m.clone());
        }
        let mut resp = Response::new(Body::full(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Step::respond(resp)
    }
}
