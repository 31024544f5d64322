//! The default upstream behaviour (echo, status, sleep, bytes, slowbytes, upload).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Map, Value};

use super::{handler, json_response, BoxBody, BoxError, Handler};

/// Bodies up to this size are echoed back as text.
const ECHO_BODY_LIMIT: usize = 64 * 1024;
const BIG_CHUNK: usize = 64 * 1024;
const SMALL_CHUNK: usize = 1024;
static XS: [u8; BIG_CHUNK] = [b'x'; BIG_CHUNK];

/// The default behaviour described in the [module docs](super), as a [`Handler`] that
/// custom handlers can delegate to.
pub fn default_handler(name: &str) -> Handler {
    let name: Arc<str> = Arc::from(name);
    handler(move |req| dispatch(Arc::clone(&name), req))
}

async fn dispatch(name: Arc<str>, req: Request<Incoming>) -> Response<BoxBody> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let chunked = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "chunked" || p.starts_with("chunked="))
    });
    match segments.as_slice() {
        ["status", code] => match code.parse::<u16>().ok().map(StatusCode::from_u16) {
            Some(Ok(status)) => echo(&name, req, status).await,
            _ => bad_request(&format!("bad status code {code:?}")),
        },
        ["sleep", ms] => match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                echo(&name, req, StatusCode::OK).await
            }
            Err(_) => bad_request(&format!("bad sleep {ms:?}")),
        },
        ["bytes", n] => match n.parse::<u64>() {
            Ok(n) => bytes_response(n, BIG_CHUNK, Duration::ZERO, chunked),
            Err(_) => bad_request(&format!("bad byte count {n:?}")),
        },
        ["slowbytes", n, ms] => match (n.parse::<u64>(), ms.parse::<u64>()) {
            (Ok(n), Ok(ms)) => bytes_response(n, SMALL_CHUNK, Duration::from_millis(ms), chunked),
            _ => bad_request(&format!("bad slowbytes {n:?}/{ms:?}")),
        },
        ["upload"] => upload(req).await,
        _ => echo(&name, req, StatusCode::OK).await,
    }
}

fn bad_request(msg: &str) -> Response<BoxBody> {
    json_response(StatusCode::BAD_REQUEST, &json!({ "error": msg }))
}

/// Describes the request as JSON, answered with `status`.
async fn echo(name: &str, req: Request<Incoming>, status: StatusCode) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return bad_request(&format!("reading request body: {e}")),
    };
    let mut headers = Map::new();
    for key in parts.headers.keys() {
        let values: Vec<Value> = parts
            .headers
            .get_all(key)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let value = if values.len() == 1 {
            values.into_iter().next().unwrap_or(Value::Null)
        } else {
            Value::Array(values)
        };
        headers.insert(key.as_str().to_owned(), value);
    }
    let body_text = if body.len() < ECHO_BODY_LIMIT {
        std::str::from_utf8(&body)
            .ok()
            .map(|s| Value::String(s.to_owned()))
    } else {
        None
    };
    let value = json!({
        "upstream": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body.len(),
        "body": body_text.unwrap_or(Value::Null),
    });
    let mut resp = json_response(status, &value);
    // These statuses must not carry a body.
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        *resp.body_mut() = super::empty();
        resp.headers_mut().remove(http::header::CONTENT_TYPE);
    }
    resp
}

/// Streams `n` bytes of `x` in `chunk`-sized frames, waiting `delay` between frames.
fn bytes_response(n: u64, chunk: usize, delay: Duration, chunked: bool) -> Response<BoxBody> {
    let stream = futures_util::stream::unfold((n, true), move |(remaining, first)| async move {
        if remaining == 0 {
            return None;
        }
        if !first && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let len = usize::try_from(remaining).map_or(chunk, |r| r.min(chunk));
        let frame = Frame::data(Bytes::from_static(&XS[..len]));
        Some((Ok::<_, BoxError>(frame), (remaining - len as u64, false)))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if !chunked {
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    resp
}

/// Consumes the request body frame by frame, counting data bytes.
async fn upload(req: Request<Incoming>) -> Response<BoxBody> {
    let mut body = req.into_body();
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    received += data.len() as u64;
                }
            }
            Err(e) => {
                return bad_request(&format!("after {received} bytes: {e}"));
            }
        }
    }
    json_response(StatusCode::OK, &json!({ "received": received }))
}
