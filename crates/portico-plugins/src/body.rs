//! The body type that flows through the pipeline in both directions.
//!
//! Streaming bodies from hyper pass through unboxed, with an optional idle timeout
//! between frames (its timer is only allocated once a read actually waits).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The idle timeout between two frames of a streamed body expired.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?} (idle timeout)")]
pub struct IdleTimeout(pub Duration);

/// A request or response body.
#[derive(Default)]
pub enum Body {
    #[default]
    Empty,
    Full(Option<Bytes>),
    Incoming {
        inner: Incoming,
        idle: Option<Duration>,
        timer: Option<Pin<Box<Sleep>>>,
    },
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Some(b.into()))
    }

    /// A streamed body from hyper, failing if no frame arrives within `idle`.
    pub fn incoming(inner: Incoming, idle: Option<Duration>) -> Body {
        Body::Incoming {
            inner,
            idle,
            timer: None,
        }
    }

    /// Box any body.
    pub fn boxed<B>(b: B) -> Body
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        Body::Boxed(b.map_err(Into::into).boxed_unsync())
    }

    /// Set the idle timeout of a streamed body.
    pub fn set_idle(&mut self, d: Duration) {
        if let Body::Incoming { idle, .. } = self {
            *idle = Some(d);
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Boxed(b) => Pin::new(b).poll_frame(cx),
            Body::Incoming { inner, idle, timer } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(r) => {
                    if let (Some(t), Some(d)) = (timer.as_mut(), idle) {
                        t.as_mut().reset(Instant::now() + *d);
                    }
                    Poll::Ready(r.map(|r| r.map_err(Into::into)))
                }
                Poll::Pending => {
                    let Some(d) = *idle else { return Poll::Pending };
                    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
                    match t.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeout(d))))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(d) => d.is_none(),
            Body::Incoming { inner, .. } => inner.is_end_stream(),
            Body::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming { inner, .. } => inner.size_hint(),
            Body::Boxed(b) => b.size_hint(),
        }
    }
}

use std::future::Future;

/// A request body exceeded a configured limit while streaming.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the {0} bytes allowed")]
pub struct BodyTooLarge(pub u64);
