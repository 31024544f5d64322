//! The body type that flows through the pipeline in both directions.
//!
//! Streaming bodies from hyper pass through unboxed, with an optional idle timeout
//! between frames (its timer is only allocated once a read actually waits).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::Sleep;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The idle timeout between two frames of a streamed body expired.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?} (idle timeout)")]
pub struct IdleTimeout(pub Duration);

/// A request body read from a client connection by the gateway's own HTTP/1.1 server,
/// which the pipeline configures once the route is known.
pub trait ClientBody: http_body::Body<Data = Bytes, Error = BoxError> + Send + Unpin {
    /// Fail when no data arrives for `idle`; add the data bytes read to `counter`.
    fn configure(&mut self, idle: Option<Duration>, counter: Option<Arc<AtomicU64>>);
}

/// The header fields of an upstream's HTTP/1.1 response, kept as the bytes they arrived
/// in instead of parsed into a `HeaderMap`, for a response that goes to an HTTP/1.1
/// client unchanged (a route with no policy; see `docs/performance.md`). The fields
/// that are the gateway's business (framing, hop-by-hop, `X-Request-Id`) are already
/// left out: what remains is written to the client as it is.
#[derive(Default)]
pub struct RawFields {
    head: Bytes,
    ranges: [(u32, u32); RawFields::MAX_RANGES],
    len: u8,
    date: bool,
}

impl RawFields {
    /// Runs of whole field lines kept; a head that would need more is parsed instead.
    pub const MAX_RANGES: usize = 8;

    /// No fields kept yet; the head they are in comes with [`RawFields::set_head`]
    /// once they are all chosen.
    pub fn new() -> RawFields {
        RawFields::default()
    }

    /// The whole head, as received, that the kept runs are in (moved in at the end
    /// rather than shared while the fields are read: a reference count less to update).
    pub fn set_head(&mut self, head: Bytes) {
        self.head = head;
    }

    /// Keep the field line(s) `start..end` of `head` (from the first field's name to
    /// the last one's value, without the line end). A run that follows the previous
    /// one after exactly `\r\n` joins it. `false` when there is no room for another.
    pub fn keep(&mut self, head: &[u8], start: u32, end: u32) -> bool {
        if let Some(last) = self.len.checked_sub(1).map(usize::from) {
            let prev_end = self.ranges[last].1 as usize;
            if head.get(prev_end..start as usize) == Some(&b"\r\n"[..]) {
                self.ranges[last].1 = end;
                return true;
            }
        }
        match self.ranges.get_mut(usize::from(self.len)) {
            Some(r) => {
                *r = (start, end);
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// One of the kept fields is `Date`.
    pub fn set_date(&mut self) {
        self.date = true;
    }

    pub fn has_date(&self) -> bool {
        self.date
    }

    /// The kept runs of field lines, each without its final line end.
    pub fn runs(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.ranges[..usize::from(self.len)]
            .iter()
            .map(|&(s, e)| self.head.get(s as usize..e as usize).unwrap_or_default())
    }

    /// Bytes of all runs (without line ends).
    pub fn len(&self) -> usize {
        self.runs().map(<[u8]>::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A streamed body boxed where it was made; an upstream's HTTP/1.1 response body may
/// carry its head's fields unparsed ([`RawFields`]).
pub trait StreamBody: http_body::Body<Data = Bytes, Error = BoxError> + Send {
    fn raw_fields(&self) -> Option<&RawFields> {
        None
    }
}

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
        /// Counts the data bytes read (for the access log when there is no Content-Length).
        counter: Option<Arc<AtomicU64>>,
    },
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
    Client(Box<dyn ClientBody>),
    /// A body boxed where it was made (an upstream's HTTP/1.1 response body): no
    /// wrapper, and no second move into a box.
    Stream(Pin<Box<dyn StreamBody>>),
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
            counter: None,
        }
    }

    /// Like [`Body::incoming`], adding the length of every data frame read to `counter`.
    pub fn incoming_counted(
        inner: Incoming,
        idle: Option<Duration>,
        counter: Arc<AtomicU64>,
    ) -> Body {
        Body::Incoming {
            inner,
            idle,
            timer: None,
            counter: Some(counter),
        }
    }

    /// Apply the route's idle timeout and a byte counter to a body read from the
    /// client (no effect on other bodies).
    pub fn configure(&mut self, idle: Option<Duration>, counter: Option<Arc<AtomicU64>>) {
        match self {
            Body::Incoming {
                idle: i,
                counter: c,
                ..
            } => {
                *i = idle;
                *c = counter;
            }
            Body::Client(b) => b.configure(idle, counter),
            _ => {}
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
}

impl Body {
    /// The response head's fields when they were kept unparsed (then the response's
    /// `HeaderMap` holds none of them).
    pub fn raw_fields(&self) -> Option<&RawFields> {
        match self {
            Body::Stream(b) => b.raw_fields(),
            _ => None,
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
            Body::Client(b) => Pin::new(&mut **b).poll_frame(cx),
            Body::Stream(b) => b.as_mut().poll_frame(cx),
            Body::Incoming {
                inner,
                idle,
                timer,
                counter,
            } => match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(r) => {
                    if let (Some(t), Some(d)) = (timer.as_mut(), idle) {
                        t.as_mut().reset(crate::clock::now() + *d);
                    }
                    if let (Some(c), Some(Ok(f))) = (counter.as_ref(), r.as_ref()) {
                        if let Some(data) = f.data_ref() {
                            c.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
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
            Body::Client(b) => b.is_end_stream(),
            Body::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming { inner, .. } => inner.size_hint(),
            Body::Boxed(b) => b.size_hint(),
            Body::Client(b) => b.size_hint(),
            Body::Stream(b) => b.size_hint(),
        }
    }
}

use std::future::Future;

/// A request body exceeded a configured limit while streaming.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the {0} bytes allowed")]
pub struct BodyTooLarge(pub u64);

/// At most this much of an unwanted request body is read and discarded after an early
/// answer (see [`drain_in_background`]).
pub const DRAIN_MAX_BYTES: u64 = 64 << 20;
/// At most this long is spent discarding an unwanted request body.
pub const DRAIN_MAX_TIME: Duration = Duration::from_secs(5);

/// Lingering close: reads and discards a request body the gateway answered without
/// consuming (an error, a policy's own answer), for at most [`DRAIN_MAX_BYTES`] and
/// [`DRAIN_MAX_TIME`]. Dropping the body instead makes hyper close the HTTP/1.1
/// connection while the client is still sending, and the client then sees a
/// connection reset instead of the answer (e.g. the 413 of a size limit).
pub fn drain_in_background(body: Body) {
    if http_body::Body::is_end_stream(&body) {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let mut body = body;
        let mut left = DRAIN_MAX_BYTES;
        let _ = tokio::time::timeout(DRAIN_MAX_TIME, async {
            while let Some(Ok(frame)) =
                std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx))
                    .await
            {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    if n >= left {
                        break;
                    }
                    left -= n;
                }
            }
        })
        .await;
    });
}

/// Why [`read_limited`] stopped: the body is larger than allowed (the caller says
/// what the limit is for), or reading it failed (the answer to give).
pub struct ReadStopped(Option<crate::error::GatewayError>);

impl ReadStopped {
    /// The answer: the read failure, or `too_large()` when the body was too large.
    pub fn or_else(
        self,
        too_large: impl FnOnce() -> crate::error::GatewayError,
    ) -> crate::error::GatewayError {
        self.0.unwrap_or_else(too_large)
    }
}

/// The whole body of a request, at most `max` bytes (a policy that must see it all:
/// validation, digests). `declared` (Content-Length) sizes the buffer. A body of one
/// frame is returned without a copy. Trailers are dropped. On a body too large the
/// rest stays in `body`, for the pipeline to discard (so the client gets the answer).
pub async fn read_limited(
    body: &mut Body,
    declared: Option<u64>,
    max: u64,
) -> Result<Bytes, ReadStopped> {
    use http_body_util::BodyExt;
    let mut first: Option<Bytes> = None;
    let mut buf = bytes::BytesMut::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadStopped(Some(read_error(&e))))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        total += data.len() as u64;
        if total > max {
            return Err(ReadStopped(None));
        }
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            earlier => {
                if let Some(f) = earlier {
                    let want = usize::try_from(declared.unwrap_or(0).min(max)).unwrap_or(0);
                    buf.reserve(want.max(f.len() + data.len()));
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// The answer to a request body that could not be read: 413 when a limit stopped it,
/// 400 when it stalled or broke off; the connection is closed either way.
pub fn read_error(e: &BoxError) -> crate::error::GatewayError {
    use crate::error::{ErrorKind, GatewayError};
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(s) = src {
        if let Some(b) = s.downcast_ref::<BodyTooLarge>() {
            let mut err = GatewayError::new(ErrorKind::PayloadTooLarge, b.to_string());
            err.close = true;
            return err;
        }
        if s.is::<IdleTimeout>() {
            let mut err = GatewayError::new(
                ErrorKind::BadRequest,
                "the request body stalled (idle timeout)",
            );
            err.close = true;
            return err;
        }
        src = s.source();
    }
    let mut err = GatewayError::new(
        ErrorKind::BadRequest,
        format!("the request body could not be read: {e}"),
    );
    err.close = true;
    err
}

/// What [`buffer_upto`] found.
pub enum Buffered {
    /// The whole body, at most the limit.
    Whole(Bytes),
    /// The body is larger than the limit: the same bytes, still to be streamed (what
    /// was read so far first, then the rest), for a policy that lets it through.
    TooLarge(Body),
}

/// A body of which a first part was already read.
struct Prefixed {
    head: std::collections::VecDeque<Bytes>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && http_body::Body::is_end_stream(&self.rest)
    }
}

/// Where a [`Tee`] hands its copy.
pub trait CopySink: Send + Unpin + 'static {
    /// Whether the sink is still told of the body's end once the copy went past the
    /// limit (with `None`); if not, it is dropped as soon as that happens.
    const WANTS_OVERFLOW: bool;
    /// The body ended: its copy, or `None` if it grew past the limit.
    fn complete(self, copy: Option<Bytes>);
}

/// A body passed through unchanged, frame by frame, while a copy of it (at most `max`
/// bytes) is kept. At its end the copy goes to the sink. If the body fails or is
/// dropped before its end, the sink is dropped without a word.
pub struct Tee<S: CopySink> {
    inner: Body,
    buf: bytes::BytesMut,
    max: u64,
    over: bool,
    sink: Option<S>,
}

impl<S: CopySink> Tee<S> {
    pub fn new(inner: Body, max: u64, sink: S) -> Tee<S> {
        // Sized at once when the body's exact length is known and fits.
        let cap = http_body::Body::size_hint(&inner)
            .exact()
            .filter(|n| *n <= max)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0);
        Tee {
            inner,
            buf: bytes::BytesMut::with_capacity(cap),
            max,
            over: false,
            sink: Some(sink),
        }
    }

    fn finish(&mut self) {
        if let Some(sink) = self.sink.take() {
            let copy = (!self.over).then(|| std::mem::take(&mut self.buf).freeze());
            sink.complete(copy);
        }
    }
}

impl<S: CopySink> http_body::Body for Tee<S> {
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
                    if !this.over {
                        if this.buf.len() as u64 + d.len() as u64 > this.max {
                            this.over = true;
                            this.buf = bytes::BytesMut::new();
                            if !S::WANTS_OVERFLOW {
                                this.sink = None;
                            }
                        } else {
                            this.buf.extend_from_slice(d);
                        }
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.sink = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Read a whole body of at most `max` bytes (a transform that must see it all), or,
/// when it turns out larger, hand it back intact for streaming. `declared`
/// (Content-Length) above `max` is not read at all. A read error is returned as is.
pub async fn buffer_upto(
    mut body: Body,
    declared: Option<u64>,
    max: u64,
) -> Result<Buffered, BoxError> {
    use http_body_util::BodyExt;
    if declared.is_some_and(|n| n > max) {
        return Ok(Buffered::TooLarge(body));
    }
    let mut chunks: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        total += data.len() as u64;
        chunks.push_back(data);
        if total > max {
            return Ok(Buffered::TooLarge(Body::boxed(Prefixed {
                head: chunks,
                rest: body,
            })));
        }
    }
    Ok(Buffered::Whole(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut buf = bytes::BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
            for c in chunks {
                buf.extend_from_slice(&c);
            }
            buf.freeze()
        }
    }))
}

/// The media type of a `Content-Type` value, lower-case, without parameters.
pub fn essence(h: &http::HeaderMap) -> Option<String> {
    let v = h.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

/// `application/json` or a `+json` type.
pub fn is_json(h: &http::HeaderMap) -> bool {
    essence(h).is_some_and(|e| e == "application/json" || (e.contains('/') && e.ends_with("+json")))
}

/// Whether the body is sent with a `Content-Encoding` other than `identity` (a
/// transform cannot read it).
pub fn is_encoded(h: &http::HeaderMap) -> bool {
    h.get_all(http::header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// The `Content-Length` header, when it is one number.
pub fn declared_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Put a replaced body's framing right: its `Content-Length`, no `Transfer-Encoding`.
pub fn set_length(h: &mut http::HeaderMap, len: usize) {
    h.remove(http::header::TRANSFER_ENCODING);
    h.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    /// A body in several frames, without a known length.
    fn frames(parts: &[&'static str]) -> Body {
        Body::boxed(Prefixed {
            head: parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
            rest: Body::Empty,
        })
    }

    #[tokio::test]
    async fn buffer_upto_reads_small_bodies_and_hands_back_large_ones_whole() {
        match buffer_upto(frames(&["ab", "cd"]), None, 4).await.unwrap() {
            Buffered::Whole(b) => assert_eq!(&b[..], b"abcd"),
            Buffered::TooLarge(_) => panic!("4 bytes fit in 4"),
        }
        let Buffered::TooLarge(b) = buffer_upto(frames(&["ab", "cd", "ef", "gh"]), None, 5)
            .await
            .unwrap()
        else {
            panic!("8 bytes do not fit in 5");
        };
        assert_eq!(&b.collect().await.unwrap().to_bytes()[..], b"abcdefgh");
        // Announced as too large: not read at all.
        let Buffered::TooLarge(b) = buffer_upto(frames(&["abcdef"]), Some(6), 5).await.unwrap()
        else {
            panic!("announced 6 bytes do not fit in 5");
        };
        assert_eq!(&b.collect().await.unwrap().to_bytes()[..], b"abcdef");
    }

    /// Records what a tee hands over, and whether it was dropped without a word.
    struct Probe<const OVERFLOW: bool>(Arc<std::sync::Mutex<Vec<String>>>);

    impl<const OVERFLOW: bool> CopySink for Probe<OVERFLOW> {
        const WANTS_OVERFLOW: bool = OVERFLOW;
        fn complete(self, copy: Option<Bytes>) {
            let said = copy.map_or("over".to_owned(), |b| {
                String::from_utf8_lossy(&b).into_owned()
            });
            self.0.lock().unwrap().push(said);
        }
    }

    impl<const OVERFLOW: bool> Drop for Probe<OVERFLOW> {
        fn drop(&mut self) {
            self.0.lock().unwrap().push("dropped".to_owned());
        }
    }

    async fn tee<const OVERFLOW: bool>(parts: &[&'static str], max: u64) -> (String, Vec<String>) {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let body = Body::boxed(Tee::new(frames(parts), max, Probe::<OVERFLOW>(log.clone())));
        let passed = body.collect().await.unwrap().to_bytes();
        let log = log.lock().unwrap().clone();
        (String::from_utf8_lossy(&passed).into_owned(), log)
    }

    #[tokio::test]
    async fn tee_passes_the_body_through_and_hands_over_its_copy() {
        assert_eq!(
            tee::<true>(&["ab", "cd"], 4).await,
            ("abcd".into(), vec!["abcd".into(), "dropped".into()])
        );
        // Past the limit: the whole body still passes; the sink hears `None` at the end,
        // or is dropped at once when it does not want to.
        assert_eq!(
            tee::<true>(&["ab", "cd", "ef"], 4).await,
            ("abcdef".into(), vec!["over".into(), "dropped".into()])
        );
        assert_eq!(
            tee::<false>(&["ab", "cd", "ef"], 4).await,
            ("abcdef".into(), vec!["dropped".into()])
        );
    }
}
