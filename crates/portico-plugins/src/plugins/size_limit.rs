//! `request-size-limit`: reject request bodies above `max_body` with 413, whether the
//! size is announced (`Content-Length`) or discovered while streaming.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use portico_config::units::ByteSize;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::body::{drain_in_background, Body, BodyTooLarge, BoxError};
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{Policy, Step};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Largest accepted request body, e.g. `10MiB`.
    pub max_body: ByteSize,
}

pub struct SizeLimit {
    max: u64,
}

impl SizeLimit {
    pub fn new(s: Settings) -> Self {
        SizeLimit { max: s.max_body.0 }
    }
}

impl Policy for SizeLimit {
    fn name(&self) -> &'static str {
        "request-size-limit"
    }

    fn on_request<'a>(&'a self, _ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared {
            if len > self.max {
                let mut e = GatewayError::new(
                    ErrorKind::PayloadTooLarge,
                    format!(
                        "the request body ({len} bytes) is larger than the {} bytes allowed",
                        self.max
                    ),
                );
                e.close = true;
                return Step::error(e);
            }
            return Step::cont();
        }
        if http_body::Body::is_end_stream(req.body()) {
            return Step::cont();
        }
        let inner = std::mem::take(req.body_mut());
        // HTTP/2 cancels the stream cleanly instead; no need to read on there.
        let linger = req.version() < http::Version::HTTP_2;
        *req.body_mut() = Body::boxed(Limited {
            inner,
            left: self.max,
            max: self.max,
            linger,
        });
        Step::cont()
    }
}

struct Limited {
    inner: Body,
    left: u64,
    max: u64,
    /// Drain the rest of the body after the limit is hit (HTTP/1.x).
    linger: bool,
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    if n > this.left {
                        // Keep reading what the client still sends, so that it receives
                        // the 413 rather than a connection reset.
                        if this.linger {
                            drain_in_background(std::mem::take(&mut this.inner));
                        }
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.max)))));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
