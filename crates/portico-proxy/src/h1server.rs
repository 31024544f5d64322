//! Portico's HTTP/1.1 server side (HTTP/2 stays on hyper).
//!
//! One task per connection runs the loop: read and parse a request head (`httparse`,
//! header values kept as slices of the read buffer), run the pipeline on it in the same
//! task (no spawned task, no channel, no boxing of the request's future), and write the
//! response head together with the first piece of body in one vectored write.
//!
//! A request body is read by the body itself: the connection's read side (socket half
//! and buffer) moves into the body and comes back through a one-shot channel when the
//! body has been read to the end, so that the next request on the connection (possibly
//! already buffered: pipelining) is read from where the body stopped. A body that is
//! dropped unfinished leaves the connection unusable, and it is closed after the
//! response. Requests without a body, the common case, never move the read side.
//!
//! Framing per RFC 9112: `Transfer-Encoding` must be exactly `chunked` (anything else is
//! refused with 400 and the connection closed), a request with both `Transfer-Encoding`
//! and `Content-Length` is read as chunked, its length dropped and the connection closed
//! afterwards; conflicting lengths are refused. `Expect: 100-continue` is answered with
//! `100 Continue` when the pipeline first reads the body while the answer is pending;
//! an answer given without asking for the body closes the connection afterwards.
//! Responses carry a `Content-Length` when their size is known, are chunked otherwise
//! (close-delimited for HTTP/1.0 clients), and carry no body for `HEAD`, 1xx, 204 and
//! 304. An absolute-form request target (`GET http://host/path`) replaces the `Host`
//! header (RFC 9112 §3.2.2), so routing and forwarding see the same host.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use portico_plugins::body::{ClientBody, IdleTimeout, RawFields, DRAIN_MAX_TIME};
use portico_plugins::{Body, BoxError, ErrorKind, GatewayError};
use portico_upstream::h1::{
    add_length, connection_names_fields, connection_tokens, parse_length, poll_body, req_field,
    BodyFraming, Decoder, Out, Read, ReqField,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Sleep;
use tokio_util::io::poll_read_buf;

use crate::gateway::Gateway;
use crate::logbody::LogBody;
use crate::pipeline::{handle, ConnInfo, Received};

/// Header fields parsed on the stack; a larger configured limit parses into the heap.
const STACK_HEADERS: usize = 128;
const READ_SIZE: usize = 8 << 10;

/// The limits of a listener's HTTP/1.1 connections.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Bytes of request line and header fields read before answering 431 (or 414 when
    /// the request line alone does not fit).
    pub max_head: usize,
    /// Header fields parsed; more is answered with 431 here. Above the configured limit,
    /// so that the pipeline answers (and logs) most requests over it with its own 431.
    pub max_headers: usize,
    /// A client that takes none of an answer's bytes for this long is disconnected
    /// (`limits.client_idle_timeout`), releasing the upstream connection it holds.
    pub write_idle: Duration,
}

/// The read side of a connection: half the socket and what has been read but not used.
struct Reader<R> {
    io: R,
    buf: BytesMut,
}

/// What the head says about the exchange.
struct Info {
    body: Option<BodyFraming>,
    keep_alive: bool,
    expect_continue: bool,
    head_request: bool,
    version: Version,
}

/// Why a request head was refused.
enum Refusal {
    Status(ErrorKind, &'static str),
}

/// A client connection split into a read half and a write half. Plain TCP splits into
/// tokio's owned halves, which need no lock; other streams (TLS) share one stream behind
/// `tokio::io::split`, which takes a lock at every read and write.
pub trait SplitIo: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn split_io(self) -> (Self::Read, Self::Write);
}

impl SplitIo for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split_io(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl<IO> SplitIo for tokio_rustls::server::TlsStream<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split_io(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Serve HTTP/1.1 on `io` until the client closes, an error, or `stop` turns true
/// (graceful shutdown: the exchange in progress finishes, then the connection closes).
pub async fn serve<S>(
    io: S,
    gw: Arc<Gateway>,
    conn: Arc<ConnInfo>,
    settings: Settings,
    stop: watch::Receiver<bool>,
) where
    S: SplitIo,
{
    let (r, mut w) = io.split_io();
    let mut reader = Some(Reader {
        io: r,
        buf: BytesMut::with_capacity(READ_SIZE),
    });
    // One wait for the stop signal for the whole connection (registering a new one
    // before every request costs more than the rest of reading it).
    // Response heads are encoded here; its memory is reused once a head is written.
    let mut wbuf = BytesMut::new();
    // Each request is parsed into this, and the pipeline borrows it (with the spans of
    // the head's fields: half a KiB, made once).
    let mut received = Received::empty();
    let mut snapshot = gw.snapshot_cache();
    let mut watched = stop.clone();
    let stopping = watched.changed();
    let mut stopping = std::pin::pin!(stopping);
    // Whether `stopping` has registered this task (it wakes it when the signal comes).
    let mut stop_registered = false;
    loop {
        if stopped(&stop) {
            return;
        }
        let Some(rd) = reader.as_mut() else { return };
        let parsed = {
            let mut read = std::pin::pin!(read_head(rd, &settings, &mut received));
            poll_fn(|cx| {
                if let Poll::Ready(p) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(p));
                }
                // Registered once per connection (the task is always the same): after that,
                // a plain check on each wake-up instead of polling the wait again (which
                // takes its lock).
                if stop_registered {
                    return if stopped(&stop) {
                        Poll::Ready(None)
                    } else {
                        Poll::Pending
                    };
                }
                match stopping.as_mut().poll(cx) {
                    Poll::Ready(_) => Poll::Ready(None),
                    Poll::Pending => {
                        stop_registered = true;
                        Poll::Pending
                    }
                }
            })
            .await
        };
        let Some(parsed) = parsed else { return };
        let info = match parsed {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(Refusal::Status(kind, msg)) => {
                let e = GatewayError::new(kind, msg);
                let id = crate::pipeline::request_id(None);
                let mut resp = e.to_response(&id);
                resp.headers_mut()
                    .insert(&crate::forward::X_REQUEST_ID, id.header().clone());
                let _ = write_plain(&mut w, resp).await;
                let stopping = stopped(&stop);
                close(&mut w, reader.as_mut().filter(|_| !stopping)).await;
                return;
            }
        };
        // The body takes the read side along; it comes back when the body is read.
        let mut returned = None;
        let mut continue_wanted = None;
        match info.body {
            None => {}
            Some(framing) => {
                let (tx, rx) = oneshot::channel();
                returned = Some(rx);
                let notify = (info.expect_continue).then(|| Arc::new(Notify::new()));
                continue_wanted.clone_from(&notify);
                let body = RequestBody {
                    reader: reader.take(),
                    decoder: Decoder::new(framing),
                    back: Some(tx),
                    idle: None,
                    timer: None,
                    counter: None,
                    continue_wanted: notify,
                };
                received.body = Body::Client(Box::new(body));
            }
        }
        let mut continued = false;
        // In progress until its answer is written (see `Meta::in_flight_kept`).
        conn.in_flight.store(1, Ordering::Relaxed);
        let resp = {
            // Pinned where it is made: the request's future is large, moving it costs.
            let snap = snapshot.current(&gw);
            let mut fut = std::pin::pin!(handle(&gw, &conn, snap, &mut received));
            match &continue_wanted {
                None => fut.await,
                Some(n) => loop {
                    tokio::select! {
                        biased;
                        r = &mut fut => break r,
                        () = n.notified() => {
                            if w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                                return;
                            }
                            let _ = w.flush().await;
                            continued = true;
                        }
                    }
                },
            }
        };
        let Ok(mut resp) = resp;
        let mut keep = info.keep_alive && !stopped(&stop);
        // Answered before asking for the body the client is holding back: it may never
        // send it, or send it after deciding otherwise; close instead of guessing what
        // the next bytes are.
        if info.expect_continue && !continued && returned.is_some() {
            keep = false;
        }
        // A body already dropped unread cannot give the connection back: say so now.
        if let Some(rx) = returned.as_mut() {
            match rx.try_recv() {
                Ok(r) => {
                    reader = Some(r);
                    returned = None;
                }
                Err(oneshot::error::TryRecvError::Closed) => keep = false,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
        let written = write_response(
            &mut w,
            &mut wbuf,
            &mut resp,
            &info,
            keep,
            settings.write_idle,
        )
        .await;
        // The exchange ends with its answer written (logged, if the body was not read
        // to its end), not after the wait for the request body below.
        drop(resp);
        conn.idle_since
            .store(portico_upstream::now_ms(), Ordering::Relaxed);
        conn.in_flight.store(0, Ordering::Relaxed);
        match written {
            Ok(true) => {}
            Ok(false) => {
                let stopping = stopped(&stop);
                close(&mut w, reader.as_mut().filter(|_| !stopping)).await;
                return;
            }
            Err(_) => return,
        }
        if let Some(rx) = returned {
            match tokio::time::timeout(DRAIN_MAX_TIME, rx).await {
                Ok(Ok(r)) => reader = Some(r),
                // The body was not read to its end: the connection cannot go on.
                _ => {
                    let _ = w.shutdown().await;
                    return;
                }
            }
        }
    }
}

/// Whether graceful shutdown has begun. The stop value turns true once and never back,
/// so a version change means it did (the receivers are clones of the channel's first,
/// which never marks a version seen, so a signal sent before a connection began counts
/// too): checking the version is a plain load, where
/// `borrow` takes and releases a read lock (two atomic updates, twice per request).
fn stopped(stop: &watch::Receiver<bool>) -> bool {
    match stop.has_changed() {
        Ok(false) => false,
        _ => *stop.borrow(),
    }
}

/// Lingering close: after the last answer, stop writing, then read and discard what
/// the client still sends (its request body, pipelined requests) for a short while.
/// Closing with unread data makes the kernel reset the connection, and a client can
/// then lose the answer it has not read yet.
async fn close<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(w: &mut W, rd: Option<&mut Reader<R>>) {
    const LINGER_TIME: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 1 << 20;
    let _ = w.shutdown().await;
    let Some(rd) = rd else { return };
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        loop {
            rd.buf.clear();
            rd.buf.reserve(READ_SIZE);
            match poll_fn(|cx| poll_read_buf(Pin::new(&mut rd.io), cx, &mut rd.buf)).await {
                Ok(n) if n > 0 && n < left => left -= n,
                _ => return,
            }
        }
    })
    .await;
}

/// Read until a whole request head is buffered, and parse it. `None` when the client
/// closed the connection between requests.
async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut Reader<R>,
    settings: &Settings,
    rx: &mut Received,
) -> Result<Option<Info>, Refusal> {
    // Where the search for the end of the head resumes: a head trickling in is parsed
    // once it can be complete, not again on every read.
    let mut scanned: usize = 0;
    loop {
        let from = scanned.saturating_sub(3);
        if rd.buf.len() > from && head_may_end(&rd.buf[from..]) {
            if let Some(p) = parse(&mut rd.buf, settings, rx)? {
                return Ok(Some(p));
            }
        }
        scanned = rd.buf.len();
        if rd.buf.len() >= settings.max_head {
            let line_ends = memchr::memmem::find(&rd.buf, b"\r\n").is_some();
            return Err(if line_ends {
                Refusal::Status(
                    ErrorKind::HeadersTooLarge,
                    "the request headers are too large",
                )
            } else {
                Refusal::Status(ErrorKind::UriTooLong, "the request line is too long")
            });
        }
        if rd.buf.capacity() - rd.buf.len() < 1024 {
            rd.buf.reserve(READ_SIZE);
        }
        let n = match poll_fn(|cx| poll_read_buf(Pin::new(&mut rd.io), cx, &mut rd.buf)).await {
            Ok(n) => n,
            Err(_) => return Ok(None),
        };
        if n == 0 {
            // Closed between requests (or in the middle of a head: nothing to answer).
            return Ok(None);
        }
    }
}

/// Whether `b` holds an empty line (`\r\n\r\n`, or bare `\n\n`): the end of a head.
fn head_may_end(b: &[u8]) -> bool {
    // Usually the head is all that was read: check its end first.
    b.ends_with(b"\r\n\r\n")
        || memchr::memmem::find(b, b"\n\r\n").is_some()
        || memchr::memmem::find(b, b"\n\n").is_some()
}

fn bad(msg: &'static str) -> Refusal {
    Refusal::Status(ErrorKind::BadRequest, msg)
}

/// A field's value as a header value sharing the head's memory.
fn field_value(head: &Bytes, value: &[u8]) -> Result<HeaderValue, Refusal> {
    let v = head.slice_ref(value);
    HeaderValue::from_maybe_shared(v).map_err(|_| bad("invalid header value"))
}

/// Parse a complete request head off the front of `buf`; `None` while incomplete.
/// The head goes into `rx` (the connection's, reused: its header map keeps its memory).
fn parse(
    buf: &mut BytesMut,
    settings: &Settings,
    rx: &mut Received,
) -> Result<Option<Info>, Refusal> {
    let mut stack: [MaybeUninit<httparse::Header<'_>>; STACK_HEADERS] =
        [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if settings.max_headers <= STACK_HEADERS {
        &mut stack[..settings.max_headers.max(1)]
    } else {
        heap.resize_with(settings.max_headers, MaybeUninit::uninit);
        &mut heap[..]
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::Status(
                ErrorKind::HeadersTooLarge,
                "the request has too many header fields",
            ))
        }
        Err(_) => return Err(bad("the request head is not valid HTTP/1.1")),
    };
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| bad("invalid method"))?;
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let base = buf.as_ptr() as usize;
    let path = req.path.unwrap_or_default();
    let path_at = (path.as_ptr() as usize - base, path.len());
    rx.raw.spans_mut().record(buf, req.headers);
    // The head is kept once, with the fields' spans; the URI and the values read here
    // share its memory.
    rx.raw.set_head(buf.split_to(len).freeze());
    let Received {
        parts,
        meta,
        body,
        raw,
    } = rx;
    let head = raw.head();
    *body = Body::Empty;
    *meta = crate::pipeline::Meta {
        raw_response: true,
        in_flight_kept: true,
        ..crate::pipeline::Meta::default()
    };
    parts.extensions.clear();
    parts.headers.clear();
    // A URI has at most 65534 bytes (the `http` crate's limit, far above the default
    // `limits.max_uri_length`): a longer target is too long, not malformed.
    if path_at.1 > usize::from(u16::MAX - 1) {
        return Err(Refusal::Status(
            ErrorKind::UriTooLong,
            "the request target is longer than 65534 bytes",
        ));
    }
    let uri = Uri::from_maybe_shared(head.slice(path_at.0..path_at.0 + path_at.1))
        .map_err(|_| bad("the request target is not a valid URI"))?;
    let mut length: Option<u64> = None;
    let mut te_seen = false;
    let mut chunked = false;
    let mut close = false;
    let mut keep = false;
    let mut expect_continue = false;
    // The fields stay unparsed (see `RawRequest`) unless one needs the general path.
    let mut parse_all = false;
    for (raw_name, value) in raw.fields() {
        meta.underscores |= raw_name.contains(&b'_');
        match req_field(raw_name) {
            ReqField::Host => {
                meta.hosts = meta.hosts.saturating_add(1);
                if meta.host.is_none() {
                    meta.host = Some(field_value(head, value)?);
                }
            }
            ReqField::Authorization => {
                meta.authorizations = meta.authorizations.saturating_add(1);
            }
            ReqField::RequestId => {
                if meta.request_id.is_none() {
                    meta.request_id = Some(field_value(head, value)?);
                }
            }
            ReqField::ContentLength => add_length(value, &mut length).map_err(bad)?,
            ReqField::TransferEncoding => {
                te_seen = true;
                for coding in value.split(|&b| b == b',') {
                    let c = coding.trim_ascii();
                    if !c.is_empty() {
                        if chunked || !c.eq_ignore_ascii_case(b"chunked") {
                            return Err(bad(
                                "unsupported Transfer-Encoding (only `chunked` is accepted)",
                            ));
                        }
                        chunked = true;
                    }
                }
            }
            ReqField::Connection => {
                let (c, k) = connection_tokens(value);
                close |= c;
                keep |= k;
                // The fields it names are hop-by-hop too: the general path removes them.
                parse_all |= connection_names_fields(value);
            }
            ReqField::Expect => {
                expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            ReqField::Special => parse_all = true,
            ReqField::Hop
            | ReqField::ForwardedFor
            | ReqField::ForwardedProto
            | ReqField::ForwardedHost
            | ReqField::Keep => {}
        }
    }
    let mut keep_alive = !close && (version == Version::HTTP_11 || keep);
    let absolute = uri.authority().is_some();
    // Both framings: the coding wins, the length goes (from the map), and so does the
    // connection.
    let drop_length = te_seen && length.is_some();
    if absolute || drop_length || parse_all {
        let filled = raw.fill(&mut parts.headers, false);
        raw.clear();
        filled.map_err(bad)?;
    } else {
        raw.keep(length.is_some());
    }
    let headers = &mut parts.headers;
    let body = if te_seen {
        if !chunked {
            return Err(bad("empty Transfer-Encoding"));
        }
        if version == Version::HTTP_10 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if drop_length {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        Some(BodyFraming::Chunked)
    } else {
        meta.content_length = length;
        match length {
            Some(0) | None => None,
            Some(n) => Some(BodyFraming::Length(n)),
        }
    };
    if let Some(authority) = uri.authority() {
        // Absolute form: the target's authority is the host, whatever `Host` says.
        let v = HeaderValue::from_str(authority.as_str())
            .map_err(|_| bad("the request target's authority is not a valid host"))?;
        headers.insert(header::HOST, v.clone());
        meta.host = Some(v);
        meta.hosts = 1;
    } else if version == Version::HTTP_11 && meta.hosts == 0 {
        return Err(bad("an HTTP/1.1 request must carry a Host header"));
    }
    let head_request = method == Method::HEAD;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    Ok(Some(Info {
        expect_continue: expect_continue && body.is_some() && version == Version::HTTP_11,
        body,
        keep_alive,
        head_request,
        version,
    }))
}

/// A request body read from the client connection.
struct RequestBody<R> {
    reader: Option<Reader<R>>,
    decoder: Decoder,
    back: Option<oneshot::Sender<Reader<R>>>,
    idle: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    counter: Option<Arc<AtomicU64>>,
    /// Tells the connection to send `100 Continue` on the first read.
    continue_wanted: Option<Arc<Notify>>,
}

impl<R> RequestBody<R> {
    /// The body is complete: the read side goes back to the connection.
    fn finish(&mut self) {
        self.decoder.finish();
        if let (Some(r), Some(tx)) = (self.reader.take(), self.back.take()) {
            let _ = tx.send(r);
        }
    }

    fn fail(&mut self, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.decoder.finish();
        self.reader = None;
        self.back = None;
        Poll::Ready(Some(Err(e)))
    }
}

/// The client's request body was malformed (bad chunk framing) or cut short; answered
/// with 400 and the connection closed.
#[derive(Debug, thiserror::Error)]
pub enum BadBody {
    #[error("the client closed the connection before the end of the request body")]
    Closed,
    #[error("reading the request body from the client failed: {0}")]
    Io(std::io::Error),
    #[error("the request body is not valid chunked encoding: {0}")]
    Framing(&'static str),
}

/// The shared decoder's error, said of the client's body.
fn client_framing(e: portico_upstream::h1::Error) -> BadBody {
    match e {
        portico_upstream::h1::Error::Framing(m) => BadBody::Framing(m),
        _ => BadBody::Framing("unreadable"),
    }
}

impl<R: AsyncRead + Unpin + Send> http_body::Body for RequestBody<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(n) = this.continue_wanted.take() {
            n.notify_one();
        }
        let Some(rd) = this.reader.as_mut() else {
            return Poll::Ready(None);
        };
        let read = poll_body(
            &mut this.decoder,
            &mut rd.buf,
            &mut rd.io,
            this.idle,
            &mut this.timer,
            cx,
        );
        match ready!(read) {
            Read::Data(data, done) => {
                if let Some(c) = &this.counter {
                    c.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if done {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Read::End => {
                this.finish();
                Poll::Ready(None)
            }
            Read::Eof => this.fail(Box::new(BadBody::Closed)),
            Read::Failed(portico_upstream::h1::Error::Io(e)) => this.fail(Box::new(BadBody::Io(e))),
            Read::Failed(e) => this.fail(Box::new(client_framing(e))),
            Read::IdleTimeout(d) => this.fail(Box::new(IdleTimeout(d))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

impl<R: AsyncRead + Unpin + Send> ClientBody for RequestBody<R> {
    fn configure(&mut self, idle: Option<Duration>, counter: Option<Arc<AtomicU64>>) {
        self.idle = idle;
        self.counter = counter;
    }
}

/// The `Date` header value, formatted once per second per thread. The wall clock is
/// read only when the cached value's second has passed by the request path's clock.
fn date() -> HeaderValue {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<Option<(tokio::time::Instant, HeaderValue)>> = const { RefCell::new(None) };
    }
    let mono = portico_plugins::clock::now();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        match &*c {
            Some((until, v)) if mono < *until => v.clone(),
            _ => {
                let now = SystemTime::now();
                let into_second = now.duration_since(UNIX_EPOCH).map_or(Duration::ZERO, |d| {
                    Duration::from_nanos(d.subsec_nanos().into())
                });
                let v = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                    .unwrap_or_else(|_| HeaderValue::from_static(""));
                *c = Some((mono + (Duration::from_secs(1) - into_second), v.clone()));
                v
            }
        }
    })
}

/// How a response body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Encode the response head; returns how the body is framed and whether the connection
/// stays open afterwards.
fn encode_head<B: http_body::Body>(
    buf: &mut BytesMut,
    (status, h): (StatusCode, &HeaderMap),
    body: &B,
    raw: Option<(&RawFields, Option<&HeaderValue>)>,
    info: &Info,
    mut keep: bool,
) -> (Framing, bool) {
    let bodiless = info.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut size = 64;
    for (n, v) in h {
        size += n.as_str().len() + v.len() + 4;
    }
    if let Some((r, id)) = raw {
        size += r.len() + 2 * RawFields::MAX_RANGES + id.map_or(0, |v| v.len() + 16);
    }
    buf.reserve(size + 96);
    // An HTTP/1.0 client is answered in its version (it may not know 1.1's framing).
    buf.extend_from_slice(if info.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    buf.extend_from_slice(status.as_str().as_bytes());
    buf.extend_from_slice(b" ");
    buf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    buf.extend_from_slice(b"\r\n");
    // One pass over the fields: copy them, and note the ones that decide the framing.
    let mut has_date = false;
    let mut declared = None;
    for (n, v) in h {
        if n == header::CONNECTION {
            if v.as_bytes().eq_ignore_ascii_case(b"close") {
                keep = false;
            }
            continue;
        }
        if n == header::CONTENT_LENGTH {
            declared = declared.or_else(|| parse_length(v.as_bytes()));
            continue;
        }
        if n == header::TRANSFER_ENCODING || n.as_str() == "keep-alive" {
            continue;
        }
        has_date |= n == header::DATE;
        buf.extend_from_slice(n.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(v.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    // An upstream's fields kept unparsed: framing and hop-by-hop fields are already
    // left out of them.
    if let Some((r, id)) = raw {
        for run in r.runs() {
            buf.extend_from_slice(run);
            buf.extend_from_slice(b"\r\n");
        }
        has_date |= r.has_date();
        if let Some(v) = id {
            buf.extend_from_slice(b"x-request-id: ");
            buf.extend_from_slice(v.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
    }
    let exact = body.size_hint().exact();
    let (framing, length_header) = if bodiless {
        // HEAD answers say how long the body would be: the upstream's length, or that
        // of a body the gateway made itself; an empty body (a proxied HEAD answer
        // without a length) says nothing. 1xx and 204 never carry a length.
        let len = if status.is_informational() || status == StatusCode::NO_CONTENT {
            None
        } else if info.head_request {
            declared.or(exact.filter(|&n| n > 0))
        } else {
            declared
        };
        (Framing::None, len)
    } else if let Some(n) = exact {
        (Framing::Length(n), Some(n))
    } else if let Some(n) = declared {
        (Framing::Length(n), Some(n))
    } else if info.version == Version::HTTP_11 {
        (Framing::Chunked, None)
    } else {
        keep = false;
        (Framing::Close, None)
    };
    if let Some(n) = length_header {
        buf.extend_from_slice(b"content-length: ");
        buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Chunked {
        buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !has_date {
        buf.extend_from_slice(b"date: ");
        buf.extend_from_slice(date().as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    if !keep {
        buf.extend_from_slice(b"connection: close\r\n");
    } else if info.version == Version::HTTP_10 {
        buf.extend_from_slice(b"connection: keep-alive\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    (framing, keep)
}

/// Write a response; `Ok(true)` when the connection can carry another request.
async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    resp: &mut Response<LogBody>,
    info: &Info,
    keep: bool,
    idle: Duration,
) -> io::Result<bool> {
    let head = (resp.status(), resp.headers());
    let raw = resp.body().raw_fields();
    let (framing, keep) = encode_head(buf, head, resp.body(), raw, info, keep);
    // The head is written from the connection's buffer, which comes back afterwards.
    let mut out = Out::with_head_buf(std::mem::take(buf));
    let written = write_message(w, &mut out, resp.body_mut(), framing, keep, idle).await;
    *buf = out.take_head_buf();
    written
}

/// Write the head in `out`, then the body with its framing.
async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut Out,
    body: &mut LogBody,
    framing: Framing,
    keep: bool,
    idle: Duration,
) -> io::Result<bool> {
    if framing == Framing::None {
        write_out(w, out, idle).await?;
        return Ok(keep);
    }
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut done = body.is_end_stream();
    if done && framing == Framing::Chunked {
        out.last_chunk();
    }
    let mut clean = true;
    loop {
        if !done && !out.has_data() {
            // With output pending, take a frame only if one is ready (so the head and
            // the first data go out in one write); with nothing to write, wait for one.
            let waiting = !out.is_empty();
            let next = poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(f) => Poll::Ready(Some(f)),
                Poll::Pending if waiting => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            })
            .await;
            match next {
                None => {}
                Some(None) => {
                    done = true;
                    if framing == Framing::Chunked {
                        out.last_chunk();
                    }
                }
                Some(Some(Err(_))) => return Ok(false),
                Some(Some(Ok(frame))) => {
                    if let Ok(mut data) = frame.into_data() {
                        match framing {
                            Framing::Chunked if !data.is_empty() => out.chunk(data),
                            Framing::Length(_) => {
                                let n = data.len() as u64;
                                if n > left {
                                    // More than announced: cut, and close.
                                    data.truncate(left as usize);
                                    clean = false;
                                    done = true;
                                }
                                left -= data.len() as u64;
                                out.data(data);
                            }
                            Framing::Close => out.data(data),
                            _ => {}
                        }
                    }
                    if !done && body.is_end_stream() {
                        done = true;
                        if framing == Framing::Chunked {
                            out.last_chunk();
                        }
                    }
                }
            }
        }
        if !out.is_empty() {
            write_out(w, out, idle).await?;
        } else if done {
            break;
        }
    }
    if let Framing::Length(_) = framing {
        clean &= left == 0;
    }
    Ok(keep && clean && framing != Framing::Close)
}

/// Write `out` whole. A client that takes no byte of it for `idle` is given up on; the
/// timer only exists once a write had to wait (usually the socket takes it all).
async fn write_out<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut Out,
    idle: Duration,
) -> io::Result<()> {
    let mut wrote = false;
    if let Poll::Ready(r) = poll_fn(|cx| Poll::Ready(out.poll_write(w, cx, &mut wrote))).await {
        return r;
    }
    loop {
        wrote = false;
        let step = poll_fn(|cx| match out.poll_write(w, cx, &mut wrote) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            // Some progress: the idle clock starts again.
            Poll::Pending if wrote => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        });
        match tokio::time::timeout(idle, step).await {
            Ok(Some(r)) => return r,
            Ok(None) => {}
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

/// Write a response that has a complete body (the gateway's own refusals).
async fn write_plain<W: AsyncWrite + Unpin>(w: &mut W, resp: Response<Body>) -> io::Result<()> {
    let (parts, body) = resp.into_parts();
    let data = match body {
        Body::Full(Some(b)) => b,
        _ => Bytes::new(),
    };
    let info = Info {
        body: None,
        keep_alive: false,
        expect_continue: false,
        head_request: false,
        version: Version::HTTP_11,
    };
    let fixed = http_body_util::Full::new(data.clone());
    let mut buf = BytesMut::new();
    encode_head(
        &mut buf,
        (parts.status, &parts.headers),
        &fixed,
        None,
        &info,
        false,
    );
    let mut out = Out::with_head_buf(buf);
    out.data(data);
    let mut wrote = false;
    poll_fn(|cx| out.poll_write(w, cx, &mut wrote)).await
}
