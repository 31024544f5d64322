//! Portico's HTTP/1.1 client codec for pooled upstream connections.
//!
//! hyper's client runs every connection in its own task and hands each request to it
//! through a channel; for a proxy that is two task wake-ups and a channel round trip per
//! request, about a third of the gateway's user-space time (see docs/performance.md).
//! Here the exchange runs inside the request's own task: the request head is encoded
//! once into one buffer, the response head is parsed with `httparse` straight from the
//! read buffer (header values are slices of it, not copies), and the response body is
//! read by the body itself as the client side consumes it. A connection goes back to
//! its pool when the body has been read to the end.
//!
//! Framing follows RFC 9112: `Transfer-Encoding: chunked` (the last coding) is decoded,
//! any other transfer coding makes the body run until the connection closes, a
//! `Content-Length` is checked for consistency, a response with both has its
//! `Content-Length` dropped and its connection closed afterwards; 1xx interim answers
//! are skipped; responses to `HEAD` and 204/304 have no body. Trailers of a chunked
//! response are read and dropped.

use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Frame, SizeHint};
use portico_plugins::body::{IdleTimeout, RawFields, StreamBody};
use portico_plugins::{Body, BoxError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_util::io::poll_read_buf;

use crate::overlay::Overlay;
use crate::pool::TargetPool;

/// Largest response head accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// Most header fields in a response head.
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line that may stay incomplete in the buffer (a complete line is
/// at most one read long, so the memory held is bounded either way).
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 << 10;
/// Read size while a response body streams.
const BODY_READ: usize = 64 << 10;
/// Read size for a response head.
const HEAD_READ: usize = 8 << 10;

/// A connection to an upstream, plain or TLS.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why an HTTP/1.1 exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection ended before any byte of an answer.
    #[error("the upstream closed the connection without answering")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("invalid response head from the upstream: {0}")]
    Parse(#[from] httparse::Error),
    #[error("invalid response from the upstream: {0}")]
    Framing(&'static str),
    #[error("the upstream's response head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the upstream closed the connection before the end of the response body")]
    Truncated,
    /// Reading the client's request body failed (it is the source).
    #[error("the request body could not be read")]
    RequestBody(#[source] BoxError),
    #[error(transparent)]
    Idle(#[from] IdleTimeout),
}

impl Error {
    /// The connection was closed or reset by the upstream (a kept-alive connection it
    /// had just given up on, when nothing of an answer arrived).
    pub fn is_closed(&self) -> bool {
        match self {
            Error::Closed => true,
            Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// An HTTP/1.1 connection between exchanges.
pub struct Conn {
    io: Stream,
    rbuf: BytesMut,
    /// Request heads are encoded here; its memory is reused once a head is written.
    wbuf: BytesMut,
    /// Where response heads' fields are noted while parsing (made once per connection:
    /// it is half a KiB, zeroed when made).
    spans: FieldSpans,
}

impl Conn {
    pub fn new(io: Stream) -> Conn {
        Conn {
            io,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            spans: FieldSpans::default(),
        }
    }

    /// The buffer to encode a request head into (see [`encode_head`]).
    pub fn head_buf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Whether an idle connection can carry a request: the upstream has neither closed
    /// it nor sent anything unasked. Never waits; costs no system call unless the socket
    /// has become readable.
    pub fn usable(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        self.rbuf.reserve(HEAD_READ);
        matches!(
            poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.rbuf),
            Poll::Pending
        )
    }
}

/// How the request body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqFraming {
    /// No body and no `Content-Length`.
    None,
    Length(u64),
    Chunked,
}

impl ReqFraming {
    /// The framing for `body`: its exact length when known, else chunked. A request
    /// without a body carries `Content-Length: 0` when the client sent one (`length`)
    /// or the method expects content.
    pub fn of(method: &Method, length: bool, body: &Body) -> ReqFraming {
        use http_body::Body as _;
        if body.is_end_stream() {
            let expects = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
            if expects || length {
                ReqFraming::Length(0)
            } else {
                ReqFraming::None
            }
        } else {
            match body.size_hint().exact() {
                Some(n) => ReqFraming::Length(n),
                None => ReqFraming::Chunked,
            }
        }
    }
}

/// What the gateway does with a field of a client's request head.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ReqField {
    /// Sent upstream as it is.
    Keep,
    Host,
    Authorization,
    RequestId,
    ForwardedFor,
    ForwardedProto,
    ForwardedHost,
    ContentLength,
    TransferEncoding,
    Expect,
    Connection,
    /// `Keep-Alive`, `Proxy-Connection`: hop-by-hop, never sent upstream.
    Hop,
    /// `TE`, `Trailer`, `Upgrade`: hop-by-hop fields the general path handles (a
    /// request's `TE: trailers` is kept); rare, so such a head is parsed into a map.
    Special,
}

/// Classify a request field by its name (any case).
pub fn req_field(name: &[u8]) -> ReqField {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    match name.len() {
        2 if is(b"te") => ReqField::Special,
        4 if is(b"host") => ReqField::Host,
        6 if is(b"expect") => ReqField::Expect,
        7 if is(b"trailer") || is(b"upgrade") => ReqField::Special,
        10 if is(b"connection") => ReqField::Connection,
        10 if is(b"keep-alive") => ReqField::Hop,
        12 if is(b"x-request-id") => ReqField::RequestId,
        13 if is(b"authorization") => ReqField::Authorization,
        14 if is(b"content-length") => ReqField::ContentLength,
        15 if is(b"x-forwarded-for") => ReqField::ForwardedFor,
        16 if is(b"proxy-connection") => ReqField::Hop,
        16 if is(b"x-forwarded-host") => ReqField::ForwardedHost,
        17 if is(b"transfer-encoding") => ReqField::TransferEncoding,
        17 if is(b"x-forwarded-proto") => ReqField::ForwardedProto,
        _ => ReqField::Keep,
    }
}

/// A client's request head whose fields are still the bytes they were parsed from: on
/// a route where nothing reads or edits request headers they go upstream as they are
/// (see `docs/performance.md`), and a `HeaderMap` is only built ([`RawRequest::fill`])
/// when something needs one. Only heads that need no more than leaving fields out are
/// kept this way (see [`ReqField::Special`], and `Connection` naming fields).
#[derive(Default)]
pub struct RawRequest {
    head: Bytes,
    spans: FieldSpans,
    /// The fields are here and not (yet) in the request's `HeaderMap`.
    pending: bool,
    /// The request has a `Content-Length` field.
    length: bool,
}

impl RawRequest {
    /// The spans to record the next head's fields in (reused: see [`FieldSpans`]).
    pub fn spans_mut(&mut self) -> &mut FieldSpans {
        &mut self.spans
    }

    /// The head whose fields were just recorded (frozen), not yet kept.
    pub fn set_head(&mut self, head: Bytes) {
        self.head = head;
        self.pending = false;
    }

    /// The head the fields are in.
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    /// Keep the fields unparsed; `length`: one of them is `Content-Length`.
    pub fn keep(&mut self, length: bool) {
        self.length = length;
        self.pending = true;
    }

    /// Nothing kept (the fields went into a map, or the head came another way).
    pub fn clear(&mut self) {
        self.pending = false;
        self.head = Bytes::new();
    }

    /// The fields are kept here, and the request's `HeaderMap` is empty.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// The request has a `Content-Length` field.
    pub fn has_length(&self) -> bool {
        self.length
    }

    /// Each field's name and value.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans.spans().iter().map(|&(ns, ne, vs, ve)| {
            (
                self.head.get(ns as usize..ne as usize).unwrap_or_default(),
                self.head.get(vs as usize..ve as usize).unwrap_or_default(),
            )
        })
    }

    /// How many fields, and their size counted as `name: value\r\n`.
    pub fn size(&self) -> (usize, usize) {
        self.fields()
            .fold((0, 0), |(n, b), (k, v)| (n + 1, b + k.len() + v.len() + 4))
    }

    /// Whether a field has one of `names`, also spelt with `_` for `-` (identity
    /// headers the gateway owns; see `remove_identity_headers`).
    pub fn has_any(&self, names: &[HeaderName]) -> bool {
        self.fields().any(|(k, _)| {
            names
                .iter()
                .any(|n| portico_plugins::ctx::is_spelling_of(n, k))
        })
    }

    /// Put the fields into `h` (empty), as the HTTP/1.1 server would have; with
    /// `forwarded`, as they go upstream: without `Connection` and the other hop-by-hop
    /// fields (framing and the gateway's own fields are the sender's business).
    pub fn fill(&self, h: &mut HeaderMap, forwarded: bool) -> Result<(), &'static str> {
        h.reserve(self.spans.spans().len());
        for (name, value) in self.spans.fields(&self.head) {
            if forwarded && matches!(req_field(name), ReqField::Connection | ReqField::Hop) {
                continue;
            }
            let name = field_name(name).map_err(|_| "invalid header name")?;
            let value =
                HeaderValue::from_maybe_shared(value).map_err(|_| "invalid header value")?;
            h.append(name, value);
        }
        Ok(())
    }

    /// Write the fields to send upstream: all but framing, hop-by-hop and those the
    /// overlay replaces, each line as the client wrote it.
    fn encode(&self, buf: &mut BytesMut, overlay: &Overlay) {
        for &(ns, ne, vs, ve) in self.spans.spans() {
            let name = self.head.get(ns as usize..ne as usize).unwrap_or_default();
            let skip = match req_field(name) {
                ReqField::Keep | ReqField::Authorization => false,
                ReqField::Host => overlay.host.overrides(),
                ReqField::RequestId => overlay.request_id.overrides(),
                ReqField::ForwardedFor => overlay.forwarded_for.overrides(),
                ReqField::ForwardedProto => overlay.forwarded_proto.overrides(),
                ReqField::ForwardedHost => overlay.forwarded_host.overrides(),
                ReqField::ContentLength
                | ReqField::TransferEncoding
                | ReqField::Expect
                | ReqField::Connection
                | ReqField::Hop
                | ReqField::Special => true,
            };
            if skip {
                continue;
            }
            let value = self.head.get(vs as usize..ve as usize).unwrap_or_default();
            match self.head.get(ns as usize..ve as usize) {
                // The line as it came (name, colon, spaces, value).
                Some(line) if ve >= ne && vs >= ne => buf.extend_from_slice(line),
                _ => {
                    buf.extend_from_slice(name);
                    buf.extend_from_slice(b": ");
                    buf.extend_from_slice(value);
                }
            }
            buf.extend_from_slice(b"\r\n");
        }
    }
}

/// Encode a request head. The URI must be in origin form (path and query); framing
/// headers come from `framing`, not from `parts`; the fields of `overlay` replace the
/// request's own. With `raw`, the request's fields are those (`parts.headers` is empty).
pub fn encode_head(
    buf: &mut BytesMut,
    parts: &http::request::Parts,
    raw: Option<&RawRequest>,
    overlay: &Overlay,
    framing: ReqFraming,
) {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut size = parts.method.as_str().len() + target.len() + 40 + overlay.encoded_len();
    for (n, v) in &parts.headers {
        size += n.as_str().len() + v.len() + 4;
    }
    if let Some(r) = raw {
        size += r.head.len();
    }
    buf.reserve(size);
    buf.extend_from_slice(parts.method.as_str().as_bytes());
    buf.extend_from_slice(b" ");
    buf.extend_from_slice(target.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    for (n, v) in &parts.headers {
        // The gateway answers `Expect: 100-continue` itself and sends the body at once.
        if n == header::CONTENT_LENGTH
            || n == header::TRANSFER_ENCODING
            || n == header::EXPECT
            || overlay.overrides(n)
        {
            continue;
        }
        buf.extend_from_slice(n.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(v.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    if let Some(r) = raw {
        r.encode(buf, overlay);
    }
    overlay.encode(buf);
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        ReqFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    buf.extend_from_slice(b"\r\n");
}

/// Body pieces up to this size are copied behind the head they follow (see
/// [`Out::poll_write`]): copying them costs less than the kernel's extra work for a
/// vectored write (about 0.1 µs per call here, against a 2 KiB copy's few tens of ns).
const COALESCE_MAX: usize = 2048;

/// What is still to be written: a message head, then one piece of body (with its
/// chunk framing when chunked), then a tail (`\r\n`, the last chunk). Written with
/// one write when the socket takes it all.
#[derive(Default)]
pub struct Out {
    /// The head, in the writer's own reusable buffer, lent for the write (see
    /// [`Out::with_head_buf`]).
    head: BytesMut,
    size_line: [u8; 20],
    size_at: u8,
    size_end: u8,
    data: Bytes,
    tail: &'static [u8],
}

impl Out {
    /// A head encoded into the writer's reusable buffer, written from there: lending
    /// the buffer (and taking it back with [`Out::take_head_buf`]) keeps its memory
    /// unshared, where splitting a `Bytes` off it costs reference-count updates on every
    /// message.
    pub fn with_head_buf(head: BytesMut) -> Out {
        Out {
            head,
            ..Out::default()
        }
    }

    /// The lent buffer back, emptied (its capacity kept).
    pub fn take_head_buf(&mut self) -> BytesMut {
        let mut b = std::mem::take(&mut self.head);
        b.clear();
        b
    }

    /// Body data sent as it is (a length-delimited or close-delimited body).
    pub fn data(&mut self, data: Bytes) {
        self.data = data;
    }

    /// No body data is waiting to be written (a head or tail may be).
    pub fn has_data(&self) -> bool {
        !self.data.is_empty()
    }

    /// End a chunked body: the last chunk, after the chunk in flight if any.
    pub fn last_chunk(&mut self) {
        self.tail = if self.tail.is_empty() {
            b"0\r\n\r\n"
        } else {
            b"\r\n0\r\n\r\n"
        };
    }

    pub fn is_empty(&self) -> bool {
        self.head.is_empty()
            && self.size_at == self.size_end
            && self.data.is_empty()
            && self.tail.is_empty()
    }

    fn advance(&mut self, mut n: usize) {
        let h = n.min(self.head.len());
        self.head.advance(h);
        n -= h;
        let s = n.min(usize::from(self.size_end - self.size_at));
        self.size_at += s as u8;
        n -= s;
        let d = n.min(self.data.len());
        self.data.advance(d);
        n -= d;
        self.tail = &self.tail[n.min(self.tail.len())..];
    }

    /// Body data sent as one chunk.
    pub fn chunk(&mut self, data: Bytes) {
        let line = format_chunk_size(data.len(), &mut self.size_line);
        self.size_at = 0;
        self.size_end = line;
        self.data = data;
        self.tail = b"\r\n";
    }

    /// What is left of the chunk-size line.
    fn size_line(&self) -> &[u8] {
        &self.size_line[usize::from(self.size_at)..usize::from(self.size_end)]
    }

    /// A small body piece behind a head is copied into the head's buffer, so that the
    /// message is one slice.
    fn coalesce(&mut self) {
        // The field, not `size_line()`: the head is written to while this is borrowed.
        let size_line = &self.size_line[usize::from(self.size_at)..usize::from(self.size_end)];
        let rest = size_line.len() + self.data.len() + self.tail.len();
        if self.head.is_empty() || rest == 0 || rest > COALESCE_MAX {
            return;
        }
        self.head.reserve(rest);
        for s in [size_line, &self.data[..], self.tail] {
            if !s.is_empty() {
                self.head.extend_from_slice(s);
            }
        }
        self.size_at = self.size_end;
        self.data = Bytes::new();
        self.tail = b"";
    }

    /// The only segment left to write, when there is just one.
    fn single(&self) -> Option<&[u8]> {
        let mut only = None;
        for s in [&self.head[..], self.size_line(), &self.data[..], self.tail] {
            if !s.is_empty() {
                if only.is_some() {
                    return None;
                }
                only = Some(s);
            }
        }
        only
    }

    /// Write everything out (and flush, for TLS). `wrote` is set once any byte went.
    /// One segment goes out with a plain write (`send`), several with one vectored
    /// write (`writev`, which costs the kernel more per call).
    pub fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
        wrote: &mut bool,
    ) -> Poll<io::Result<()>> {
        self.coalesce();
        while !self.is_empty() {
            let n = if let Some(only) = self.single() {
                ready!(Pin::new(&mut *io).poll_write(cx, only))?
            } else {
                let slices = [
                    IoSlice::new(&self.head),
                    IoSlice::new(self.size_line()),
                    IoSlice::new(&self.data),
                    IoSlice::new(self.tail),
                ];
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *wrote = true;
            self.advance(n);
        }
        Pin::new(io).poll_flush(cx)
    }
}

/// `{len:x}\r\n` into `buf`; returns its length.
fn format_chunk_size(len: usize, buf: &mut [u8; 20]) -> u8 {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut v = len as u64;
    loop {
        i -= 1;
        digits[i] = HEX[(v & 0xf) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    let n = digits.len() - i;
    buf[..n].copy_from_slice(&digits[i..]);
    buf[n] = b'\r';
    buf[n + 1] = b'\n';
    (n + 2) as u8
}

/// The request being written: its head, then its body.
pub struct Sending {
    out: Out,
    body: Option<Body>,
    chunked: bool,
    /// Bytes the declared `Content-Length` still allows.
    left: u64,
    /// The body has been polled (it cannot be given back any more).
    started: bool,
    /// Any byte has been written to the connection.
    pub wrote: bool,
    /// Everything was written and flushed (TLS keeps written bytes in its own buffer
    /// until a flush succeeds, so an empty `out` alone does not say it).
    finished: bool,
}

/// Writing the request failed.
pub enum SendFailure {
    /// The connection failed (the upstream may still have answered).
    Io(io::Error),
    /// The client's body failed.
    Body(BoxError),
}

impl Sending {
    /// `head`: the encoded head, in the connection's buffer (lent: see
    /// [`Sending::take_head_buf`]).
    pub fn new(head: BytesMut, body: Body, framing: ReqFraming) -> Sending {
        use http_body::Body as _;
        let has_body = !body.is_end_stream();
        Sending {
            out: Out::with_head_buf(head),
            body: has_body.then_some(body),
            chunked: framing == ReqFraming::Chunked,
            left: match framing {
                ReqFraming::Length(n) => n,
                _ => u64::MAX,
            },
            started: false,
            wrote: false,
            finished: false,
        }
    }

    /// The body, if none of it has been read (so the request can be sent elsewhere).
    pub fn take_unstarted_body(&mut self) -> Option<Body> {
        if self.started {
            None
        } else {
            Some(self.body.take().unwrap_or_default())
        }
    }

    /// Start over with `head` on another connection (a body not yet started stays).
    pub fn restart(&mut self, head: BytesMut) {
        self.out = Out::with_head_buf(head);
        self.wrote = false;
        self.finished = false;
    }

    /// The head's buffer, emptied, for the connection to reuse.
    pub fn take_head_buf(&mut self) -> BytesMut {
        self.out.take_head_buf()
    }

    /// Write the head and as much of the body as is available.
    pub fn poll(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Poll<Result<(), SendFailure>> {
        use http_body::Body as _;
        loop {
            ready!(self.out.poll_write(io, cx, &mut self.wrote)).map_err(SendFailure::Io)?;
            let Some(body) = self.body.as_mut() else {
                self.finished = true;
                return Poll::Ready(Ok(()));
            };
            self.started = true;
            match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                None => {
                    self.body = None;
                    if self.chunked {
                        self.out.tail = b"0\r\n\r\n";
                    } else if self.left != 0 && self.left != u64::MAX {
                        return Poll::Ready(Err(SendFailure::Body(
                            "the request body ended before its Content-Length".into(),
                        )));
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    return Poll::Ready(Err(SendFailure::Body(e)));
                }
                Some(Ok(frame)) => {
                    let end = body.is_end_stream();
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            if self.chunked {
                                self.out.chunk(data);
                            } else {
                                let n = data.len() as u64;
                                if n > self.left {
                                    self.body = None;
                                    return Poll::Ready(Err(SendFailure::Body(
                                        "the request body is longer than its Content-Length".into(),
                                    )));
                                }
                                self.left -= n;
                                self.out.data = data;
                            }
                        }
                    }
                    if end {
                        self.body = None;
                        if self.chunked {
                            self.out.last_chunk();
                        }
                    }
                }
            }
        }
    }

    /// The whole request has been written and flushed.
    pub fn done(&self) -> bool {
        self.finished
    }
}

/// A parsed response head and how its body is framed.
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: BodyFraming,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
    /// The fields kept unparsed (`headers` is then empty).
    pub raw: Option<RawFields>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Length(u64),
    Chunked,
    /// Until the connection closes.
    Close,
}

/// Send the request and read the response head, writing the body as long as the
/// upstream has not answered.
pub fn poll_exchange(
    conn: &mut Conn,
    sending: &mut Sending,
    write_error: &mut Option<io::Error>,
    (head_request, raw): (bool, bool),
    cx: &mut Context<'_>,
) -> Poll<Result<Head, Error>> {
    if write_error.is_none() && !sending.done() {
        match sending.poll(&mut conn.io, cx) {
            Poll::Ready(Ok(())) | Poll::Pending => {}
            Poll::Ready(Err(SendFailure::Body(e))) => {
                return Poll::Ready(Err(Error::RequestBody(e)))
            }
            // Keep reading: the upstream may have answered before it closed.
            Poll::Ready(Err(SendFailure::Io(e))) => *write_error = Some(e),
        }
    }
    loop {
        if !conn.rbuf.is_empty() {
            if let Some(head) = parse_head(&mut conn.rbuf, head_request, &mut conn.spans, raw)? {
                return Poll::Ready(Ok(head));
            }
            if conn.rbuf.len() >= MAX_HEAD {
                return Poll::Ready(Err(Error::HeadTooLarge));
            }
        }
        if conn.rbuf.capacity() - conn.rbuf.len() < 1024 {
            conn.rbuf.reserve(HEAD_READ);
        }
        let n = match ready!(poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.rbuf)) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(write_error.take().map_or(Error::Io(e), Error::Io))),
        };
        if n == 0 {
            return Poll::Ready(Err(match (conn.rbuf.is_empty(), write_error.take()) {
                (true, Some(e)) => Error::Io(e),
                (true, None) => Error::Closed,
                (false, _) => {
                    Error::Framing("the connection closed in the middle of the response head")
                }
            }));
        }
    }
}

/// Where the fields of a parsed head lie in its buffer, so that once the head is split
/// off and frozen, header values become slices of it instead of copies. Heads with up
/// to 32 fields keep the spans on the stack.
#[derive(Default)]
pub struct FieldSpans {
    stack: [(u32, u32, u32, u32); 32],
    heap: Vec<(u32, u32, u32, u32)>,
    len: usize,
}

impl FieldSpans {
    /// Record the spans of `fields`, parsed from `buf` (filled in place: the struct is
    /// half a KiB, not worth moving on every request).
    pub fn record(&mut self, buf: &[u8], fields: &[httparse::Header<'_>]) {
        let base = buf.as_ptr() as usize;
        self.len = fields.len();
        let slots = if fields.len() > self.stack.len() {
            self.heap.resize(fields.len(), (0, 0, 0, 0));
            &mut self.heap[..]
        } else {
            &mut self.stack[..fields.len()]
        };
        for (slot, h) in slots.iter_mut().zip(fields) {
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            *slot = (
                n as u32,
                (n + h.name.len()) as u32,
                v as u32,
                (v + h.value.len()) as u32,
            );
        }
    }

    /// Each field's name and value as offsets into the buffer they were recorded from.
    pub fn spans(&self) -> &[(u32, u32, u32, u32)] {
        if self.len > self.stack.len() {
            &self.heap[..]
        } else {
            &self.stack[..self.len]
        }
    }

    /// Each field's name and value, the value a slice of `head` (the bytes the spans
    /// were taken from, now frozen).
    pub fn fields<'a>(&'a self, head: &'a Bytes) -> impl Iterator<Item = (&'a [u8], Bytes)> + 'a {
        self.spans().iter().map(move |&(ns, ne, vs, ve)| {
            (
                &head[ns as usize..ne as usize],
                head.slice(vs as usize..ve as usize),
            )
        })
    }
}

/// The name of a parsed header field. The names most messages carry, spelled the way
/// clients and servers send them (`Content-Length` or `content-length`), are matched
/// here directly: `HeaderName::from_bytes` lowercases every name into a buffer and then
/// searches the standard names, about 110 instructions per field. Anything else takes
/// that general path, so the result is always the same as `HeaderName::from_bytes`.
pub fn field_name(raw: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    let known = match raw.len() {
        4 => match raw {
            b"Host" | b"host" => Some(header::HOST),
            b"Date" | b"date" => Some(header::DATE),
            b"Vary" | b"vary" => Some(header::VARY),
            b"ETag" | b"etag" => Some(header::ETAG),
            _ => None,
        },
        6 => match raw {
            b"Accept" | b"accept" => Some(header::ACCEPT),
            b"Server" | b"server" => Some(header::SERVER),
            b"Cookie" | b"cookie" => Some(header::COOKIE),
            b"Origin" | b"origin" => Some(header::ORIGIN),
            _ => None,
        },
        7 => match raw {
            b"Referer" | b"referer" => Some(header::REFERER),
            _ => None,
        },
        10 => match raw {
            b"User-Agent" | b"user-agent" => Some(header::USER_AGENT),
            b"Connection" | b"connection" => Some(header::CONNECTION),
            b"Set-Cookie" | b"set-cookie" => Some(header::SET_COOKIE),
            _ => None,
        },
        12 => match raw {
            b"Content-Type" | b"content-type" => Some(header::CONTENT_TYPE),
            _ => None,
        },
        13 => match raw {
            b"Cache-Control" | b"cache-control" => Some(header::CACHE_CONTROL),
            b"Authorization" | b"authorization" => Some(header::AUTHORIZATION),
            b"Last-Modified" | b"last-modified" => Some(header::LAST_MODIFIED),
            _ => None,
        },
        14 => match raw {
            b"Content-Length" | b"content-length" => Some(header::CONTENT_LENGTH),
            _ => None,
        },
        15 => match raw {
            b"Accept-Encoding" | b"accept-encoding" => Some(header::ACCEPT_ENCODING),
            b"Accept-Language" | b"accept-language" => Some(header::ACCEPT_LANGUAGE),
            _ => None,
        },
        16 => match raw {
            b"Content-Encoding" | b"content-encoding" => Some(header::CONTENT_ENCODING),
            _ => None,
        },
        17 => match raw {
            b"Transfer-Encoding" | b"transfer-encoding" => Some(header::TRANSFER_ENCODING),
            _ => None,
        },
        _ => None,
    };
    match known {
        Some(n) => Ok(n),
        None => HeaderName::from_bytes(raw),
    }
}

/// Add a `Content-Length` field value (possibly a list) to what earlier fields said.
pub fn add_length(raw: &[u8], length: &mut Option<u64>) -> Result<(), &'static str> {
    for part in raw.split(|&b| b == b',') {
        let n = parse_length(part).ok_or("invalid Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length values");
        }
        *length = Some(n);
    }
    Ok(())
}

/// Whether a `Connection` field value says `close`, and whether it says `keep-alive`.
pub fn connection_tokens(raw: &[u8]) -> (bool, bool) {
    raw.split(|&b| b == b',')
        .fold((false, false), |(close, keep), t| {
            let t = t.trim_ascii();
            (
                close || t.eq_ignore_ascii_case(b"close"),
                keep || t.eq_ignore_ascii_case(b"keep-alive"),
            )
        })
}

/// What the gateway does with a field of an upstream's response head.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RespField {
    /// Forwarded as it is.
    Keep,
    /// Forwarded; the gateway then adds no `Date` of its own.
    Date,
    ContentLength,
    TransferEncoding,
    Connection,
    /// Hop-by-hop (`Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Upgrade`), or
    /// the gateway's own (`X-Request-Id`): never forwarded from a head kept raw.
    Drop,
}

fn resp_field(name: &[u8]) -> RespField {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    match name.len() {
        2 if is(b"te") => RespField::Drop,
        4 if is(b"date") => RespField::Date,
        7 if is(b"trailer") || is(b"upgrade") => RespField::Drop,
        10 if is(b"connection") => RespField::Connection,
        10 if is(b"keep-alive") => RespField::Drop,
        12 if is(b"x-request-id") => RespField::Drop,
        14 if is(b"content-length") => RespField::ContentLength,
        16 if is(b"proxy-connection") => RespField::Drop,
        17 if is(b"transfer-encoding") => RespField::TransferEncoding,
        _ => RespField::Keep,
    }
}

/// Parse a complete response head off the front of `rbuf`, skipping 1xx interim
/// responses; `None` while it is incomplete. With `raw`, a head whose fields need no
/// more than leaving out framing and hop-by-hop fields keeps them as bytes
/// ([`RawFields`]) and builds no `HeaderMap`.
fn parse_head(
    rbuf: &mut BytesMut,
    head_request: bool,
    spans: &mut FieldSpans,
    raw: bool,
) -> Result<Option<Head>, Error> {
    loop {
        let mut slots: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
            [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, rbuf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Framing("more than 128 header fields"))
            }
            Err(e) => return Err(Error::Parse(e)),
        };
        let code = resp.code.unwrap_or(0);
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(Error::Framing("switching protocols (101) is not supported"));
            }
            rbuf.advance(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| Error::Framing("invalid status code"))?;
        let version = if resp.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let count = resp.headers.len();
        spans.record(rbuf, resp.headers);
        let head = rbuf.split_to(len).freeze();
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut other_coding = false;
        let mut close = false;
        let mut keep = false;
        let mut kept = raw.then(RawFields::new);
        for &(ns, ne, vs, ve) in spans.spans() {
            let name = head.get(ns as usize..ne as usize).unwrap_or_default();
            let raw = head.get(vs as usize..ve as usize).unwrap_or_default();
            let field = resp_field(name);
            match field {
                RespField::Keep | RespField::Date | RespField::Drop => {}
                RespField::ContentLength => add_length(raw, &mut length).map_err(Error::Framing)?,
                RespField::TransferEncoding => {
                    // Only the last coding decides; a later field overrides an earlier one.
                    for coding in raw.split(|&b| b == b',') {
                        let c = coding.trim_ascii();
                        if c.is_empty() {
                            continue;
                        }
                        chunked = c.eq_ignore_ascii_case(b"chunked");
                        other_coding = !chunked;
                    }
                }
                RespField::Connection => {
                    let (c, k) = connection_tokens(raw);
                    close |= c;
                    keep |= k;
                    // Fields it names are hop-by-hop too: the general path removes them.
                    if kept.is_some() && connection_names_fields(raw) {
                        kept = None;
                    }
                }
            }
            if let (Some(k), RespField::Keep | RespField::Date) = (kept.as_mut(), field) {
                // An empty value may not lie where its line does: take the general path.
                if vs < ne || ve <= vs || !k.keep(&head, ns, ve) {
                    kept = None;
                } else if field == RespField::Date {
                    k.set_date();
                }
            }
        }
        let mut keep_alive = !close && (version == Version::HTTP_11 || keep);
        let coded = chunked || other_coding;
        if coded && version == Version::HTTP_10 {
            // Transfer-Encoding in HTTP/1.0: faulty framing, never reuse (RFC 9112 §6.1).
            keep_alive = false;
        }
        let mut drop_length = false;
        let framing = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            BodyFraming::Length(0)
        } else if coded {
            if length.is_some() {
                // Both: the transfer coding wins, the length goes, the connection too.
                drop_length = true;
                keep_alive = false;
            }
            if chunked {
                BodyFraming::Chunked
            } else {
                keep_alive = false;
                BodyFraming::Close
            }
        } else if let Some(n) = length {
            BodyFraming::Length(n)
        } else {
            keep_alive = false;
            BodyFraming::Close
        };
        // Kept raw only with a body to carry them (see `ResponseBody::raw_fields`).
        let mut raw = kept.filter(|_| framing != BodyFraming::Length(0));
        let headers = if let Some(r) = raw.as_mut() {
            r.set_head(head);
            HeaderMap::new()
        } else {
            // Room for the headers the gateway adds (request id, policies' own).
            let mut headers = HeaderMap::with_capacity(count + 4);
            for (raw_name, value) in spans.fields(&head) {
                let name =
                    field_name(raw_name).map_err(|_| Error::Framing("invalid header name"))?;
                let value = HeaderValue::from_maybe_shared(value)
                    .map_err(|_| Error::Framing("invalid header value"))?;
                headers.append(name, value);
            }
            if drop_length {
                headers.remove(header::CONTENT_LENGTH);
            }
            headers
        };
        return Ok(Some(Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
            raw,
        }));
    }
}

/// Whether a `Connection` field value names a field (anything but `close` and
/// `keep-alive`).
pub fn connection_names_fields(raw: &[u8]) -> bool {
    raw.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        !t.is_empty() && !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive")
    })
}

/// A `Content-Length` value (one element of a list): digits only, no overflow.
pub fn parse_length(s: &[u8]) -> Option<u64> {
    let s = s.trim_ascii();
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

/// What decoding the buffered bytes gave.
pub enum Step {
    Data(Bytes),
    /// More bytes are needed.
    More,
    End,
}

/// Decodes an HTTP/1.1 message body from a read buffer: by length, chunked (trailers
/// read and dropped), or until the connection closes. Shared by the upstream client
/// (response bodies) and the gateway's server (request bodies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    pub fn new(framing: BodyFraming) -> Decoder {
        let state = match framing {
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::Chunked(Chunk::Size),
            BodyFraming::Close => State::Close,
        };
        Decoder { state }
    }

    /// The body has been decoded to its end.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    /// The body runs until the connection closes.
    pub fn until_close(&self) -> bool {
        self.state == State::Close
    }

    pub fn finish(&mut self) {
        self.state = State::Done;
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// How much to read next.
    pub fn read_size(&self) -> usize {
        match self.state {
            State::Length(n) | State::Chunked(Chunk::Data(n)) => {
                (n as usize).clamp(HEAD_READ, BODY_READ)
            }
            _ => BODY_READ,
        }
    }

    /// Decode what is buffered, without reading.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Error> {
        self.advance(buf, false)
    }

    /// Decode what is buffered; with `framing_only`, stop before any data (answer
    /// [`Step::More`] there, the data left in `buf` for the next call).
    fn advance(&mut self, buf: &mut BytesMut, framing_only: bool) -> Result<Step, Error> {
        loop {
            match &mut self.state {
                State::Done | State::Length(0) => return Ok(Step::End),
                State::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                State::Chunked(c) => match c {
                    Chunk::Size => {
                        let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                            if buf.len() > MAX_LINE {
                                return Err(Error::Framing("chunk size line too long"));
                            }
                            return Ok(Step::More);
                        };
                        if !buf.first().is_some_and(u8::is_ascii_hexdigit) {
                            return Err(Error::Framing("invalid chunk size"));
                        }
                        let (used, size) = match httparse::parse_chunk_size(&buf[..=end]) {
                            Ok(httparse::Status::Complete(r)) => r,
                            _ => return Err(Error::Framing("invalid chunk size")),
                        };
                        buf.advance(used);
                        *c = if size == 0 {
                            Chunk::Trailers(0)
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() || framing_only {
                            return Ok(Step::More);
                        }
                        let n = (*left).min(buf.len() as u64) as usize;
                        *left -= n as u64;
                        if *left == 0 {
                            *c = Chunk::DataEnd;
                        }
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Step::More);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(Error::Framing("chunk data not followed by CRLF"));
                        }
                        buf.advance(2);
                        *c = Chunk::Size;
                    }
                    Chunk::Trailers(seen) => {
                        let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                            if *seen + buf.len() > MAX_TRAILERS {
                                return Err(Error::Framing("trailer section too large"));
                            }
                            return Ok(Step::More);
                        };
                        let blank = end == 1 && buf[0] == b'\r';
                        if end == 0 || (!blank && buf[end - 1] != b'\r') {
                            return Err(Error::Framing("invalid trailer line"));
                        }
                        *seen += end + 1;
                        if *seen > MAX_TRAILERS {
                            return Err(Error::Framing("trailer section too large"));
                        }
                        buf.advance(end + 1);
                        if blank {
                            self.state = State::Done;
                        }
                    }
                },
            }
        }
    }

    /// After a data frame: if the rest of the message is already buffered and holds no
    /// more data (the usual end of a chunked body), reach the end now. Returns whether
    /// the body is done.
    pub fn settle(&mut self, buf: &mut BytesMut) -> Result<bool, Error> {
        Ok(match self.state {
            State::Length(0) | State::Done => true,
            State::Chunked(Chunk::DataEnd) | State::Chunked(Chunk::Trailers(_)) => {
                matches!(self.advance(buf, true)?, Step::End)
            }
            _ => false,
        })
    }
}

/// What [`poll_body`] gave.
pub enum Read {
    /// A piece of the body; `true` when it was the last (the end is already decoded).
    Data(Bytes, bool),
    /// The body ended.
    End,
    /// The connection closed before the decoder saw the end.
    Eof,
    Failed(Error),
    /// Nothing arrived for this long.
    IdleTimeout(Duration),
}

/// Decode the next piece of a body from `buf`, reading `io` when more is needed, with
/// an idle timeout between pieces (its timer is made on the first wait). Shared by the
/// upstream client's response bodies and the server's request bodies.
pub fn poll_body<R: AsyncRead + Unpin>(
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    io: &mut R,
    idle: Option<Duration>,
    timer: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<Read> {
    loop {
        match decoder.step(buf) {
            Err(e) => return Poll::Ready(Read::Failed(e)),
            Ok(Step::End) => return Poll::Ready(Read::End),
            Ok(Step::Data(data)) => {
                if let (Some(t), Some(d)) = (timer.as_mut(), idle) {
                    t.as_mut().reset(portico_plugins::clock::now() + d);
                }
                return Poll::Ready(match decoder.settle(buf) {
                    Err(e) => Read::Failed(e),
                    Ok(done) => Read::Data(data, done),
                });
            }
            Ok(Step::More) => {}
        }
        let want = decoder.read_size();
        if buf.capacity() - buf.len() < want / 2 {
            buf.reserve(want);
        }
        match poll_read_buf(Pin::new(&mut *io), cx, buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Read::Eof),
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Read::Failed(Error::Io(e))),
            Poll::Pending => {
                let Some(d) = idle else {
                    return Poll::Pending;
                };
                let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
                return match t.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Read::IdleTimeout(d)),
                    Poll::Pending => Poll::Pending,
                };
            }
        }
    }
}

/// A streamed response body read from an HTTP/1.1 connection; the connection goes back
/// to its pool when the body has been read to the end.
pub struct ResponseBody {
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    /// The rest of the request, when the upstream answered before taking all of it.
    sending: Option<Box<Sending>>,
    keep_alive: bool,
    pool: Option<Arc<TargetPool>>,
    idle: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The response head's fields, when kept unparsed.
    raw: Option<RawFields>,
}

impl StreamBody for ResponseBody {
    fn raw_fields(&self) -> Option<&RawFields> {
        self.raw.as_ref()
    }
}

impl ResponseBody {
    /// The body of `head`, read from `conn`; `unsent` is the rest of the request when
    /// the upstream answered before taking all of it. Returns `None` when there is no
    /// body (the connection has then already been given back, when it can be).
    /// Boxed here, where it is made: it is large, and it goes into the response.
    pub fn new(
        conn: Box<Conn>,
        head: &mut Head,
        unsent: Option<Box<Sending>>,
        pool: Option<Arc<TargetPool>>,
        idle: Option<Duration>,
    ) -> Option<Pin<Box<ResponseBody>>> {
        // An answer that came before the whole request was sent: the rest is still
        // sent (the upstream may be reading it), but the connection is not reused,
        // since an upstream that stopped reading could take it for a next request.
        let keep_alive = head.keep_alive && unsent.is_none();
        let decoder = Decoder::new(head.framing);
        if decoder.is_done() {
            if let (Some(pool), true) = (pool, keep_alive) {
                give_back(conn, &pool);
            }
            return None;
        }
        Some(Box::pin(ResponseBody {
            conn: Some(conn),
            decoder,
            sending: unsent,
            keep_alive,
            pool,
            idle,
            timer: None,
            raw: head.raw.take(),
        }))
    }

    /// The body is complete: give the connection back if it can carry another request.
    fn finish(&mut self) {
        self.decoder.finish();
        let conn = self.conn.take();
        let sent = self.sending.take().is_none();
        if let (Some(conn), Some(pool), true, true) =
            (conn, self.pool.take(), self.keep_alive, sent)
        {
            give_back(conn, &pool);
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.decoder.finish();
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

/// A connection whose exchange ended cleanly goes back to its pool, unless the
/// upstream sent more than the response (nothing may follow an answer unasked).
fn give_back(conn: Box<Conn>, pool: &TargetPool) {
    if conn.rbuf.is_empty() {
        pool.put_h1(conn);
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        // Keep sending the request while the upstream still reads it.
        if let Some(s) = this.sending.as_mut() {
            match s.poll(&mut conn.io, cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => this.sending = None,
                Poll::Ready(Err(_)) => {
                    this.sending = None;
                    this.keep_alive = false;
                }
            }
        }
        let read = poll_body(
            &mut this.decoder,
            &mut conn.rbuf,
            &mut conn.io,
            this.idle,
            &mut this.timer,
            cx,
        );
        match ready!(read) {
            Read::Data(data, done) => {
                if done {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Read::End => {
                this.finish();
                Poll::Ready(None)
            }
            Read::Eof if this.decoder.until_close() => {
                this.keep_alive = false;
                this.finish();
                Poll::Ready(None)
            }
            Read::Eof => this.fail(Error::Truncated),
            Read::Failed(e) => this.fail(e),
            Read::IdleTimeout(d) => this.fail(Error::Idle(IdleTimeout(d))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn head(raw: &[u8], head_request: bool) -> Result<Option<Head>, Error> {
        let mut b = BytesMut::from(raw);
        parse_head(&mut b, head_request, &mut FieldSpans::default(), false)
    }

    /// A client's request head kept unparsed, as the HTTP/1.1 server keeps it.
    fn raw_request(head: &[u8]) -> RawRequest {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut slots);
        let n = match req.parse(head).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("partial"),
        };
        let mut r = RawRequest::default();
        r.spans_mut().record(head, req.headers);
        r.set_head(Bytes::copy_from_slice(&head[..n]));
        r.keep(true);
        r
    }

    #[test]
    fn request_fields_kept_raw_are_encoded_without_hop_by_hop_and_overridden_ones() {
        let r = raw_request(
            b"GET / HTTP/1.1\r\nHost: a.example\r\nX-One:  1 \r\nConnection: keep-alive\r\n\
              Keep-Alive: 5\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\
              X-Forwarded-For: 1.2.3.4\r\nX-Request-Id: mine\r\nX_Consumer_Name: x\r\n\r\n",
        );
        assert!(r.pending() && r.has_length());
        let (n, bytes) = r.size();
        assert_eq!(n, 9);
        assert_eq!(
            bytes,
            r.fields()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
        );
        let consumer = [HeaderName::from_static("x-consumer-name")];
        assert!(r.has_any(&consumer), "`_` for `-`, any case");
        assert!(!r.has_any(&[HeaderName::from_static("x-consumer-groups")]));
        let (mut parts, ()) = http::Request::get("/p?q").body(()).unwrap().into_parts();
        let overlay = Overlay {
            host: crate::Field::Set(HeaderValue::from_static("up:80")),
            forwarded_for: crate::Field::Set(HeaderValue::from_static("10.0.0.1")),
            ..Overlay::default()
        };
        let mut buf = BytesMut::new();
        encode_head(&mut buf, &parts, Some(&r), &overlay, ReqFraming::None);
        assert_eq!(
            std::str::from_utf8(&buf).unwrap(),
            "GET /p?q HTTP/1.1\r\nX-One:  1\r\nX-Request-Id: mine\r\nX_Consumer_Name: x\r\n\
             host: up:80\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
        // Into a map: every field, or only those that go upstream.
        r.fill(&mut parts.headers, false).unwrap();
        assert_eq!(parts.headers.len(), 9);
        assert_eq!(parts.headers["x-one"], "1");
        let mut forwarded = HeaderMap::new();
        r.fill(&mut forwarded, true).unwrap();
        assert!(forwarded.get("connection").is_none() && forwarded.get("keep-alive").is_none());
        assert_eq!(forwarded.len(), 7);
    }

    fn raw_head(raw: &[u8], head_request: bool) -> Head {
        let mut b = BytesMut::from(raw);
        parse_head(&mut b, head_request, &mut FieldSpans::default(), true)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn response_fields_kept_raw_leave_out_framing_and_hop_by_hop() {
        let h = raw_head(
            b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 5\r\nDate: d\r\nx-a:1\r\n\
              Keep-Alive: x\r\nTE: trailers\r\nX-Request-Id: up\r\nX-B: 2 \r\nX-C: 3\r\n\r\nhello",
            false,
        );
        assert!(h.headers.is_empty());
        assert_eq!(h.framing, BodyFraming::Length(5));
        let r = h.raw.unwrap();
        let runs: Vec<&[u8]> = r.runs().collect();
        // Adjacent kept lines make one run; the value's trailing space ends one.
        assert_eq!(
            runs,
            [&b"Server: s"[..], b"Date: d\r\nx-a:1", b"X-B: 2", b"X-C: 3"]
        );
        assert!(r.has_date());
        // Bare LF line ends: each line is a run of its own.
        let h = raw_head(
            b"HTTP/1.1 200 OK\nX-A: 1\nX-B: 2\nContent-Length: 0\n\n",
            true,
        );
        assert!(h.raw.is_none(), "no body: the map");
        let h = raw_head(
            b"HTTP/1.1 200 OK\nX-A: 1\nX-B: 2\nTransfer-Encoding: chunked\n\n",
            false,
        );
        let r = h.raw.unwrap();
        assert_eq!(r.runs().collect::<Vec<_>>(), [&b"X-A: 1"[..], b"X-B: 2"]);
        assert!(!r.has_date());
        assert_eq!(h.framing, BodyFraming::Chunked);
        // These take the map (and keep their fields there).
        let many: String = (0..9)
            .map(|i| format!("X-{i}: {i}\r\nKeep-Alive: 1\r\n"))
            .collect();
        for (what, head, head_request) in [
            (
                "a field named by Connection",
                "Connection: x-hop\r\nX-Hop: 1\r\nX-A: 1\r\nContent-Length: 1\r\n".to_string(),
                false,
            ),
            (
                "an empty value",
                "X-Empty:\r\nX-A: 1\r\nContent-Length: 1\r\n".to_string(),
                false,
            ),
            (
                "a HEAD answer",
                "X-A: 1\r\nContent-Length: 1\r\n".to_string(),
                true,
            ),
            (
                "more runs than kept",
                format!("{many}X-A: 1\r\nContent-Length: 1\r\n"),
                false,
            ),
        ] {
            let h = raw_head(
                format!("HTTP/1.1 200 OK\r\n{head}\r\n").as_bytes(),
                head_request,
            );
            assert!(h.raw.is_none(), "{what}");
            assert_eq!(h.headers.get("x-a").unwrap(), "1", "{what}");
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, BodyFraming::Length(5));
        assert!(h.keep_alive);
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, BodyFraming::Chunked);
        assert!(!h.keep_alive, "both framings: the connection is not reused");
        assert!(h.headers.get("content-length").is_none());
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, BodyFraming::Close);
        let h = head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = head(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(h.keep_alive);
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::Close);
        assert!(!h.keep_alive);
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, BodyFraming::Length(0), "no body for HEAD");
        let h = head(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, BodyFraming::Length(0));
        let h = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.status, 201, "interim answers are skipped");
        assert!(head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            false
        )
        .is_err());
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", false).is_ok());
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false).is_err());
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-Le", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn chunks_buffered_together_are_all_decoded() {
        let mut buf = BytesMut::from(&b"1\r\na\r\n1\r\nb\r\n2\r\ncd\r\n0\r\nx-t: 1\r\n\r\n"[..]);
        let mut d = Decoder::new(BodyFraming::Chunked);
        let mut got = Vec::new();
        loop {
            match d.step(&mut buf).unwrap() {
                Step::Data(b) => {
                    got.extend_from_slice(&b);
                    if d.settle(&mut buf).unwrap() {
                        break;
                    }
                }
                Step::End => break,
                Step::More => panic!("everything is buffered"),
            }
        }
        assert_eq!(got, b"abcd");
        assert!(d.is_done());
        assert!(buf.is_empty());
    }

    #[test]
    fn field_names_match_the_general_parser() {
        let names = [
            "Host",
            "host",
            "HOST",
            "Date",
            "date",
            "Vary",
            "ETag",
            "etag",
            "Accept",
            "Server",
            "Cookie",
            "Origin",
            "Referer",
            "User-Agent",
            "user-agent",
            "User-agent",
            "Connection",
            "Set-Cookie",
            "Content-Type",
            "content-type",
            "Cache-Control",
            "Authorization",
            "Last-Modified",
            "Content-Length",
            "content-length",
            "CONTENT-LENGTH",
            "Accept-Encoding",
            "Accept-Language",
            "Content-Encoding",
            "Transfer-Encoding",
            "X-Request-Id",
            "x-custom",
            "Hostx",
            "Dat",
            "a_b",
        ];
        // Each spelling as written and in lowercase, so every arm of both spellings is
        // checked against the general parser.
        for n in names
            .iter()
            .flat_map(|n| [n.to_string(), n.to_ascii_lowercase()])
        {
            let fast = field_name(n.as_bytes()).unwrap();
            let general = HeaderName::from_bytes(n.as_bytes()).unwrap();
            assert_eq!(fast, general, "{n}");
            assert_eq!(fast.as_str(), general.as_str(), "{n}");
        }
        for bad in ["", "Ho st", "Host:", "Content-Length\r"] {
            assert!(field_name(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunk_size_lines() {
        let mut b = [0u8; 20];
        let n = format_chunk_size(0x1f40, &mut b);
        assert_eq!(&b[..usize::from(n)], b"1f40\r\n");
        let n = format_chunk_size(1, &mut b);
        assert_eq!(&b[..usize::from(n)], b"1\r\n");
    }

    /// Everything `out` writes to a real socket pair, in order.
    async fn written(mut out: Out) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let mut wrote = false;
        std::future::poll_fn(|cx| out.poll_write(&mut c, cx, &mut wrote))
            .await
            .unwrap();
        drop(c);
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn small_pieces_join_the_head_and_large_ones_do_not() {
        let mut o = Out::with_head_buf(BytesMut::from(&b"HEAD\r\n\r\n"[..]));
        o.chunk(Bytes::from_static(b"abc"));
        o.last_chunk();
        o.coalesce();
        assert!(
            o.single().is_some(),
            "head, chunk and last chunk in one slice"
        );
        assert!(!o.has_data());
        assert_eq!(written(o).await, b"HEAD\r\n\r\n3\r\nabc\r\n0\r\n\r\n");

        let big = Bytes::from(vec![b'x'; COALESCE_MAX + 1]);
        let mut o = Out::with_head_buf(BytesMut::from(&b"HEAD"[..]));
        o.data(big.clone());
        o.coalesce();
        assert!(o.has_data(), "a large piece is written from where it is");
        assert!(o.single().is_none());
        let mut want = b"HEAD".to_vec();
        want.extend_from_slice(&big);
        assert_eq!(written(o).await, want);

        // Without a head nothing is copied; one piece is still one slice.
        let mut o = Out::default();
        o.data(Bytes::from_static(b"tail"));
        o.coalesce();
        assert!(o.has_data());
        assert_eq!(o.single(), Some(&b"tail"[..]));
        assert_eq!(written(o).await, b"tail");
    }

    #[test]
    fn out_advances_across_segments() {
        let mut o = Out::with_head_buf(BytesMut::from(&b"HEAD"[..]));
        o.chunk(Bytes::from_static(b"abc"));
        o.advance(5);
        assert!(o.head.is_empty());
        assert_eq!(o.size_at, 1);
        o.advance(2 + 3 + 1);
        assert!(o.data.is_empty());
        assert_eq!(o.tail, b"\n");
        o.advance(1);
        assert!(o.is_empty());
    }
}
