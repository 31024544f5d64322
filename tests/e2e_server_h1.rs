//! End-to-end tests of Portico's own HTTP/1.1 server (`portico-proxy`'s `h1server`),
//! seen from the client side: the real `portico` binary, raw TCP clients written here
//! that send exact request bytes and parse the answers strictly, and either the test
//! support echo upstream or a raw upstream that records every request it reads (head,
//! and the body decoded strictly, or why it was incomplete).
//!
//! Covers: `Expect: 100-continue` (raw client, curl, and an early answer that must not
//! be preceded by `100 Continue`), chunked request bodies (extensions, upper-case hex,
//! trailers, tiny chunks, many writes) and keep-alive after them, pipelined requests
//! with bodies, invalid request framing (400 and close), HEAD answers, chunked
//! responses to HTTP/1.1 and HTTP/1.0 clients, `Date`, keep-alive rules of both
//! versions, a client that disappears in the middle of its body, and request heads
//! over the server's raw buffer limit.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portico_test_support::{LocalGateway, RawResponse, Upstream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bound on each wait for bytes or events, so that a gateway that hangs fails the test
/// instead of stalling it. Never used to measure anything.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------
// Reading HTTP/1.1 messages off a byte stream, strictly
// ---------------------------------------------------------------------------------

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A byte stream with a read buffer; parses messages off its front.
struct Wire<S> {
    io: S,
    buf: Vec<u8>,
    eof: bool,
    /// How the stream ended: `None` while open or on a clean EOF, else the read error.
    error: Option<std::io::ErrorKind>,
    /// Panic when a read waits longer than this (clients); `None` waits forever
    /// (upstreams, whose pooled connections may idle).
    limit: Option<Duration>,
}

impl<S: AsyncRead + Unpin> Wire<S> {
    fn new(io: S, limit: Option<Duration>) -> Wire<S> {
        Wire {
            io,
            buf: Vec::new(),
            eof: false,
            error: None,
            limit,
        }
    }

    /// Reads more; `false` once the stream has ended (EOF or an error such as a reset).
    async fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        self.buf.reserve(64 << 10);
        let read = self.io.read_buf(&mut self.buf);
        let r = match self.limit {
            Some(limit) => tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
                panic!(
                    "nothing more arrived within {limit:?} (the connection hangs); so far: {:?}",
                    lossy(&self.buf)
                )
            }),
            None => read.await,
        };
        match r {
            Ok(0) => {
                self.eof = true;
                false
            }
            Err(e) => {
                self.eof = true;
                self.error = Some(e.kind());
                false
            }
            Ok(_) => true,
        }
    }

    /// Reads until `done(buffered bytes)` holds; `false` if the stream ended first.
    async fn fill_until(&mut self, done: impl Fn(&[u8]) -> bool) -> bool {
        while !done(&self.buf) {
            if !self.fill().await {
                return false;
            }
        }
        true
    }

    /// The next head (through its empty line); `None` if the stream ends first.
    async fn head(&mut self) -> Option<String> {
        if !self.fill_until(|b| find(b, b"\r\n\r\n").is_some()).await {
            return None;
        }
        let end = find(&self.buf, b"\r\n\r\n")? + 4;
        Some(lossy(&self.buf.drain(..end).collect::<Vec<u8>>()))
    }

    /// The next line, without its CRLF.
    async fn line(&mut self) -> Option<Vec<u8>> {
        if !self.fill_until(|b| find(b, b"\r\n").is_some()).await {
            return None;
        }
        let end = find(&self.buf, b"\r\n")?;
        let line = self.buf.drain(..end + 2).take(end).collect();
        Some(line)
    }

    /// Exactly `n` bytes.
    async fn take(&mut self, n: usize) -> Result<Vec<u8>, String> {
        if !self.fill_until(|b| b.len() >= n).await {
            return Err(format!(
                "the stream ended after {} of {n} body bytes",
                self.buf.len()
            ));
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Everything until the stream ends.
    async fn rest(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// A chunked body, decoded strictly (RFC 9112 §7.1): hex size, optional
    /// extensions, CRLF after the data, a last chunk and a trailer section.
    async fn chunked(&mut self) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await.ok_or_else(|| {
                format!(
                    "the stream ended before a chunk size line, after {} body bytes",
                    body.len()
                )
            })?;
            let line = lossy(&line);
            let size = line.split(';').next().unwrap_or("").trim();
            let n = usize::from_str_radix(size, 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            if n == 0 {
                loop {
                    let t = self
                        .line()
                        .await
                        .ok_or("the stream ended in the trailer section")?;
                    if t.is_empty() {
                        return Ok(body);
                    }
                }
            }
            body.extend(self.take(n).await?);
            let crlf = self.take(2).await?;
            if crlf != b"\r\n" {
                return Err(format!(
                    "chunk data not followed by CRLF: {:?}",
                    lossy(&crlf)
                ));
            }
        }
    }

    /// One response: the body framed by its status, `Transfer-Encoding` (chunked last),
    /// `Content-Length`, or else the connection closing. `Err` when the stream ends
    /// before the response is complete.
    async fn response(&mut self, head_request: bool) -> Result<(String, RawResponse), String> {
        let head = self.head().await.ok_or_else(|| {
            format!(
                "the connection ended ({:?}) without a complete response head; got {:?}",
                self.error,
                lossy(&self.buf)
            )
        })?;
        let (status_line, headers) = split_head(&head);
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        if !status_line.starts_with("HTTP/1.") {
            return Err(format!("bad status line {status_line:?}"));
        }
        let no_body =
            head_request || (100..200).contains(&status) || status == 204 || status == 304;
        let body = if no_body {
            Vec::new()
        } else if is_chunked(&headers) {
            self.chunked()
                .await
                .map_err(|e| format!("{status_line}: {e}"))?
        } else if let Some(v) = first(&headers, "content-length") {
            let n: usize = v.parse().map_err(|_| format!("bad content-length {v:?}"))?;
            self.take(n)
                .await
                .map_err(|e| format!("{status_line}: {e}"))?
        } else {
            self.rest().await
        };
        Ok((
            head,
            RawResponse {
                status,
                headers,
                body: lossy(&body),
            },
        ))
    }
}

/// The start line and the header fields (names lower-cased, values trimmed).
fn split_head(head: &str) -> (String, Vec<(String, String)>) {
    let mut lines = head.trim_end_matches("\r\n").split("\r\n");
    let start = lines.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (start, headers)
}

fn first<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn all<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Whether the last transfer coding is `chunked`.
fn is_chunked(headers: &[(String, String)]) -> bool {
    all(headers, "transfer-encoding")
        .last()
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

// ---------------------------------------------------------------------------------
// `Date`
// ---------------------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 §5.6.7), checking
/// that the day of the week matches the date; returns seconds since the epoch.
fn parse_imf_fixdate(s: &str) -> Option<i64> {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let b = s.as_bytes();
    if b.len() != 29 || &s[3..5] != ", " || &s[25..] != " GMT" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let day = num(5..7)?;
    let month = MONTHS.iter().position(|m| *m == &s[8..11])? as i64 + 1;
    let year = num(12..16)?;
    if b[7] != b' ' || b[11] != b' ' || b[16] != b' ' || b[19] != b':' || b[22] != b':' {
        return None;
    }
    let (h, mi, se) = (num(17..19)?, num(20..22)?, num(23..25)?);
    if !(1..=31).contains(&day) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if DAYS[days.rem_euclid(7) as usize] != &s[..3] {
        return None;
    }
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

/// Exactly one `Date`, a valid IMF-fixdate of today (within a day: a sanity bound on
/// the value, not a measurement).
fn assert_date(r: &RawResponse, what: &str) {
    let dates = r.header_all("date");
    assert_eq!(dates.len(), 1, "{what}: one Date header: {r:?}");
    let t = parse_imf_fixdate(dates[0])
        .unwrap_or_else(|| panic!("{what}: invalid Date {:?}", dates[0]));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - t).abs() < 86_400,
        "{what}: Date {:?} is not today",
        dates[0]
    );
}

#[test]
fn imf_fixdate_parser_accepts_only_valid_dates() {
    assert_eq!(
        parse_imf_fixdate("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(784_111_777)
    );
    assert_eq!(parse_imf_fixdate("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
    for bad in [
        "Mon, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Nox 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:49:37 GMT",
        "",
    ] {
        assert_eq!(parse_imf_fixdate(bad), None, "{bad:?}");
    }
}

// ---------------------------------------------------------------------------------
// A raw client connection to the gateway
// ---------------------------------------------------------------------------------

struct Client {
    wire: Wire<TcpStream>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            wire: Wire::new(s, Some(WAIT)),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.wire.io.write_all(bytes).await.unwrap();
        self.wire.io.flush().await.unwrap();
    }

    /// Sends, ignoring a failure (the gateway may answer and close before reading all).
    async fn send_lenient(&mut self, bytes: &[u8]) {
        if self.wire.io.write_all(bytes).await.is_ok() {
            let _ = self.wire.io.flush().await;
        }
    }

    /// The next response, which must be complete and (if final) carry a valid `Date`;
    /// also returns its raw head.
    async fn response_with_head(
        &mut self,
        head_request: bool,
        what: &str,
    ) -> (String, RawResponse) {
        let (head, r) = self
            .wire
            .response(head_request)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if r.status >= 200 {
            assert_date(&r, what);
        }
        (head, r)
    }

    async fn response(&mut self, what: &str) -> RawResponse {
        self.response_with_head(false, what).await.1
    }

    /// Sends a bodiless request on this connection and reads its response.
    async fn request(&mut self, method: &str, path: &str) -> RawResponse {
        self.send(format!("{method} {path} HTTP/1.1\r\nHost: gateway\r\n\r\n").as_bytes())
            .await;
        let what = format!("{method} {path}");
        self.response_with_head(method == "HEAD", &what).await.1
    }

    /// Reads to the end of the stream, which must come (a hang panics after [`WAIT`]);
    /// returns what arrived first.
    async fn until_closed(&mut self) -> Vec<u8> {
        self.wire.rest().await
    }
}

// ---------------------------------------------------------------------------------
// A raw upstream: reads each request whole (strictly), records it, answers
// ---------------------------------------------------------------------------------

/// A request as the upstream read it.
#[derive(Debug, Clone)]
struct Seen {
    request_line: String,
    headers: Vec<(String, String)>,
    /// The decoded body, or why it was malformed or incomplete.
    body: Result<Vec<u8>, String>,
}

impl Seen {
    fn path(&self) -> &str {
        let target = self.request_line.split(' ').nth(1).unwrap_or("");
        target.split('?').next().unwrap_or("")
    }
    fn header_all(&self, name: &str) -> Vec<&str> {
        all(&self.headers, name)
    }
}

#[derive(Default)]
struct UpLog {
    /// Connections accepted (in the order the gateway opened them) and ended.
    accepted: usize,
    ended: usize,
    /// Request heads read (a request is in progress until it is in `seen` too).
    heads: usize,
    seen: Vec<Seen>,
}

type Answer = dyn Fn(&Seen) -> Vec<u8> + Send + Sync;

struct RawUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<UpLog>>,
    changed: watch::Sender<u64>,
}

impl RawUpstream {
    /// Serves every connection until it closes: reads a request (head, then the body by
    /// `Content-Length` or chunked), records it, answers with `answer`'s bytes. A
    /// request whose body is incomplete or malformed is recorded, then the connection
    /// is closed.
    async fn start(answer: impl Fn(&Seen) -> Vec<u8> + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(UpLog::default()));
        let (changed, _) = watch::channel(0u64);
        let answer: Arc<Answer> = Arc::new(answer);
        let (l, c) = (log.clone(), changed.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                l.lock().unwrap().accepted += 1;
                c.send_modify(|v| *v += 1);
                let (l, c) = (l.clone(), c.clone());
                let answer = answer.clone();
                tokio::spawn(async move {
                    serve_upstream_conn(stream, answer, l.clone(), c.clone()).await;
                    l.lock().unwrap().ended += 1;
                    c.send_modify(|v| *v += 1);
                });
            }
        });
        RawUpstream { addr, log, changed }
    }

    /// Answers `200 OK` with the body `got N bytes`.
    async fn counting() -> RawUpstream {
        RawUpstream::start(|seen| {
            let n = seen.body.as_ref().map_or(0, Vec::len);
            ok(&format!("{} got {n} bytes", seen.path()))
        })
        .await
    }

    fn requests(&self) -> Vec<Seen> {
        self.log.lock().unwrap().seen.clone()
    }

    fn heads(&self) -> usize {
        self.log.lock().unwrap().heads
    }

    fn connections(&self) -> usize {
        self.log.lock().unwrap().accepted
    }

    /// Waits (at most [`WAIT`]) until `cond` holds on the log.
    async fn wait_for(&self, what: &str, cond: impl Fn(&UpLog) -> bool) {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                let done = cond(&self.log.lock().unwrap());
                if done {
                    return;
                }
                rx.changed().await.unwrap();
            }
        };
        if tokio::time::timeout(WAIT, wait).await.is_err() {
            panic!(
                "the upstream never got to: {what}; it saw {} heads and {:?}",
                self.heads(),
                self.requests()
            );
        }
    }

    /// Waits until every request head the upstream read has been read to its end (or
    /// to the end of its connection): no request is half-received any more.
    async fn settled(&self) {
        self.wait_for("every request read to its end", |l| l.heads == l.seen.len())
            .await;
    }
}

async fn serve_upstream_conn(
    stream: TcpStream,
    answer: Arc<Answer>,
    log: Arc<Mutex<UpLog>>,
    changed: watch::Sender<u64>,
) {
    let (rd, mut wr) = stream.into_split();
    let mut wire = Wire::new(rd, None);
    loop {
        let Some(head) = wire.head().await else {
            return;
        };
        log.lock().unwrap().heads += 1;
        changed.send_modify(|v| *v += 1);
        let (request_line, headers) = split_head(&head);
        let body = if is_chunked(&headers) {
            wire.chunked().await
        } else if let Some(v) = first(&headers, "content-length") {
            match v.parse::<usize>() {
                Ok(n) => wire.take(n).await,
                Err(_) => Err(format!("bad content-length {v:?}")),
            }
        } else {
            Ok(Vec::new())
        };
        let seen = Seen {
            request_line,
            headers,
            body,
        };
        let bad = seen.body.is_err();
        let resp = answer(&seen);
        log.lock().unwrap().seen.push(seen);
        changed.send_modify(|v| *v += 1);
        if bad || wr.write_all(&resp).await.is_err() {
            return;
        }
    }
}

/// `200 OK` with a `Content-Length` body (and no `Date`).
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `n` bytes of `a..z` repeated.
fn pattern(n: usize) -> String {
    (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

// ---------------------------------------------------------------------------------
// The gateway, and assertions on its answers
// ---------------------------------------------------------------------------------

async fn gateway(rest_yaml: &str) -> LocalGateway {
    LocalGateway::start(Path::new(env!("CARGO_BIN_EXE_portico")), rest_yaml).await
}

/// One upstream `u` at `url`, every path routed to it.
async fn gateway_to(url: &str) -> LocalGateway {
    gateway(&format!(
        "upstreams:\n  u: {{targets: [{{url: \"{url}\"}}]}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n"
    ))
    .await
}

/// The gateway's JSON error: status, code, a message, and a `request_id` equal to the
/// `X-Request-Id` header.
fn assert_error(r: &RawResponse, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: {r:?}"
    );
    let v = r.json();
    let e = &v["error"];
    assert_eq!(e["status"], status, "{what}: {r:?}");
    assert_eq!(e["code"], code, "{what}: {r:?}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {r:?}"
    );
    let rid = e["request_id"].as_str().unwrap_or("");
    assert!(!rid.is_empty(), "{what}: {r:?}");
    assert_eq!(r.header("x-request-id"), Some(rid), "{what}: {r:?}");
}

// ---------------------------------------------------------------------------------
// Expect: 100-continue
// ---------------------------------------------------------------------------------

/// A client that sends `Expect: 100-continue` and waits gets `100 Continue` (exactly
/// that interim response and nothing else), sends its body, and then gets the final
/// answer, the upstream having seen the whole body; the connection then carries
/// another request.
#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let up = Upstream::start("exp").await;
    let env = gateway_to(&up.url()).await;

    let mut c = Client::connect(env.addr).await;
    c.send(
        b"POST /expect HTTP/1.1\r\nHost: gateway\r\nContent-Type: text/plain\r\n\
          Content-Length: 11\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    // Nothing of the body has been sent: only a 100 Continue can come now.
    let interim = c
        .wire
        .head()
        .await
        .unwrap_or_else(|| panic!("no 100 Continue; got {:?}", lossy(&c.wire.buf)));
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    assert!(
        c.wire.buf.is_empty(),
        "nothing after the 100 Continue yet: {:?}",
        lossy(&c.wire.buf)
    );
    c.send(b"hello world").await;
    let r = c.response("final answer").await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = r.json();
    assert_eq!(seen["path"], "/expect", "{seen}");
    assert_eq!(seen["body_len"], 11, "{seen}");
    assert_eq!(seen["body"], "hello world", "{seen}");

    // Keep-alive after the exchange; the same with a chunked body.
    let r = c.request("GET", "/after").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/after", "{r:?}");
    c.send(
        b"POST /expect-chunked HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .await;
    let interim = c.wire.head().await;
    assert_eq!(interim.as_deref(), Some("HTTP/1.1 100 Continue\r\n\r\n"));
    c.send(b"6\r\nchunky\r\n0\r\n\r\n").await;
    let r = c.response("final answer, chunked").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body"], "chunky", "{r:?}");

    // HTTP/1.0 knows no 100 Continue: the expectation is ignored (RFC 9110 §10.1.1),
    // the first thing the client gets is the final answer.
    let mut c = Client::connect(env.addr).await;
    c.send(
        b"POST /ten HTTP/1.0\r\nHost: gateway\r\nContent-Length: 5\r\n\
          Expect: 100-continue\r\n\r\nhello",
    )
    .await;
    let (head, r) = c.response_with_head(false, "HTTP/1.0 with Expect").await;
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert_eq!(r.json()["body"], "hello", "{r:?}");
    assert_eq!(up.hits(), 4);
}

/// curl uploads a 100 KB file with `Expect: 100-continue`: it gets the `100 Continue`
/// (so it did not have to wait out its expect timeout) and the upstream receives the
/// file byte for byte. (The header is asked for explicitly: recent curl versions, e.g.
/// 7.88, add it on their own only to much larger uploads.)
#[tokio::test(flavor = "multi_thread")]
async fn curl_upload_with_expect_100_continue_arrives_intact() {
    let up = RawUpstream::counting().await;
    let env = gateway_to(&format!("http://{}", up.addr)).await;

    let data = pattern(100 * 1024);
    let file = std::env::temp_dir().join(format!(
        "portico-e2e-server-h1-{}-upload.bin",
        std::process::id()
    ));
    std::fs::write(&file, data.as_bytes()).unwrap();
    let url = format!("http://{}/upload", env.addr);
    let arg = format!("@{}", file.display());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "-v",
                "--http1.1",
                "--max-time",
                "60",
                // Wait for the 100 Continue rather than sending the body after 1 s.
                "--expect100-timeout",
                "60",
                "-H",
                "Expect: 100-continue",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                &arg,
                "-w",
                "\n%{http_code}",
                &url,
            ])
            .output()
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&file);
    let out = out.unwrap_or_else(|e| panic!("curl could not run (is it installed?): {e}"));
    let stdout = lossy(&out.stdout);
    let stderr = lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    assert!(
        stderr.contains("> Expect: 100-continue"),
        "curl sent the expectation: {stderr}"
    );
    assert!(
        stderr.contains("< HTTP/1.1 100 Continue"),
        "curl got 100 Continue: {stderr}"
    );
    assert_eq!(
        stdout,
        format!("/upload got {} bytes\n200", data.len()),
        "{stderr}"
    );
    let seen = up.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].request_line, "POST /upload HTTP/1.1");
    match &seen[0].body {
        Ok(b) => assert!(
            b == data.as_bytes(),
            "the upstream got {} bytes, not the file's {}",
            b.len(),
            data.len()
        ),
        Err(e) => panic!("the upstream got an incomplete body: {e}"),
    }
}

/// A route that answers without reading the body (a declared length over
/// `request-size-limit`): the client gets the 413 as the first thing on the wire, no
/// `100 Continue` before it (the body it holds back is not wanted), and the connection
/// is closed after it.
#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_not_sent_when_the_route_answers_without_the_body() {
    let up = Upstream::start("small").await;
    let env = gateway(&format!(
        "upstreams:\n  u: {{targets: [{{url: \"{}\"}}]}}\nroutes:\n  - name: small\n    paths: [\"/*\"]\n    upstream: u\n    plugins:\n      request-size-limit: {{max_body: 1KiB}}\n",
        up.url()
    ))
    .await;

    for len in [2000, 50 << 20] {
        let mut c = Client::connect(env.addr).await;
        c.send(
            format!(
                "PUT /big HTTP/1.1\r\nHost: gateway\r\nContent-Length: {len}\r\n\
                 Expect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let what = format!("Content-Length {len}");
        let r = c.response(&what).await;
        assert_ne!(r.status, 100, "{what}: no 100 Continue before the refusal");
        assert_error(&r, 413, "payload_too_large", &what);
        assert_eq!(r.header("connection"), Some("close"), "{what}: {r:?}");
        let after = c.until_closed().await;
        assert!(
            after.is_empty(),
            "{what}: nothing after the 413: {:?}",
            lossy(&after)
        );
    }
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
}

// ---------------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------------

/// Chunked request bodies reach the upstream decoded exactly: chunk extensions (one
/// quoted, holding `;`), upper-case hex sizes, a trailer section, 300 one-byte chunks
/// in one write, and a body written a few bytes at a time, cut inside size lines,
/// between CR and LF, inside data and inside trailers. All on one client connection,
/// which then still serves a bodiless request.
#[tokio::test(flavor = "multi_thread")]
async fn chunked_request_bodies_are_decoded_exactly_and_the_connection_kept() {
    let up = RawUpstream::counting().await;
    let env = gateway_to(&format!("http://{}", up.addr)).await;
    let mut c = Client::connect(env.addr).await;
    let head = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n")
    };

    // Extensions, upper-case hex, trailers; one write.
    let big = pattern(0x1AB);
    let body = format!(
        "5;name=value\r\nhello\r\n1;flag\r\n,\r\n6 ; q=\"a;b\"\r\nworld!\r\n1AB\r\n{big}\r\n\
         0;last=yes\r\nX-Checksum: 1234\r\nX-Other: two\r\n\r\n"
    );
    c.send(format!("{}{body}", head("/ext")).as_bytes()).await;
    let r = c.response("/ext").await;
    let want_ext = format!("hello,world!{big}");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, format!("/ext got {} bytes", want_ext.len()).as_str())
    );

    // 300 one-byte chunks in one write.
    let mut tiny = head("/tiny");
    let mut want_tiny = String::new();
    for i in 0..300 {
        let ch = char::from(b'0' + (i % 10) as u8);
        tiny.push_str(&format!("1\r\n{ch}\r\n"));
        want_tiny.push(ch);
    }
    tiny.push_str("0\r\n\r\n");
    c.send(tiny.as_bytes()).await;
    let r = c.response("/tiny").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "/tiny got 300 bytes"),
        "{r:?}"
    );

    // A body written in many small pieces, cut everywhere.
    let split = format!(
        "{}A\r\n0123456789\r\n1f;x=y\r\n{}\r\n0\r\nX-Trailer: split\r\n\r\n",
        head("/split"),
        pattern(31)
    );
    for piece in split.as_bytes().chunks(3) {
        c.send(piece).await;
        tokio::task::yield_now().await;
    }
    let r = c.response("/split").await;
    let want_split = format!("0123456789{}", pattern(31));
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "/split got 41 bytes"),
        "{r:?}"
    );

    // Keep-alive after chunked bodies.
    let r = c.request("GET", "/after").await;
    assert_eq!((r.status, r.body.as_str()), (200, "/after got 0 bytes"));

    let seen = up.requests();
    let bodies: Vec<(&str, Result<String, String>)> = seen
        .iter()
        .map(|s| (s.path(), s.body.clone().map(|b| lossy(&b))))
        .collect();
    assert_eq!(
        bodies,
        [
            ("/ext", Ok(want_ext)),
            ("/tiny", Ok(want_tiny)),
            ("/split", Ok(want_split)),
            ("/after", Ok(String::new())),
        ]
    );
}

/// Two POSTs with `Content-Length` bodies and a GET, all in one write: three answers,
/// in order, each upstream request with its own body.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_with_bodies_are_answered_in_order() {
    let up = RawUpstream::start(|seen| {
        let body = seen.body.as_ref().map(|b| lossy(b)).unwrap_or_default();
        ok(&format!("{} [{body}]", seen.path()))
    })
    .await;
    let env = gateway_to(&format!("http://{}", up.addr)).await;

    let mut c = Client::connect(env.addr).await;
    c.send(
        b"POST /one HTTP/1.1\r\nHost: gateway\r\nContent-Length: 5\r\n\r\nhello\
          POST /two HTTP/1.1\r\nHost: gateway\r\nContent-Length: 13\r\n\r\nGET /x HTTP/1\
          GET /three HTTP/1.1\r\nHost: gateway\r\n\r\n",
    )
    .await;
    let mut got = Vec::new();
    for what in ["first", "second", "third"] {
        let r = c.response(what).await;
        assert_eq!(r.status, 200, "{what}: {r:?}");
        got.push(r.body);
    }
    assert_eq!(got, ["/one [hello]", "/two [GET /x HTTP/1]", "/three []"]);
    let seen: Vec<(String, Vec<u8>)> = up
        .requests()
        .into_iter()
        .map(|s| (s.request_line.clone(), s.body.unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("POST /one HTTP/1.1".to_string(), b"hello".to_vec()),
            ("POST /two HTTP/1.1".to_string(), b"GET /x HTTP/1".to_vec()),
            ("GET /three HTTP/1.1".to_string(), Vec::new()),
        ]
    );
    // Still open for a fourth.
    let r = c.request("GET", "/four").await;
    assert_eq!((r.status, r.body.as_str()), (200, "/four []"));
}

/// A body the route never reads (the `echo` policy answers without it; a request no
/// route matches is refused) is read past, not parsed as requests: what follows it on
/// the connection is answered, in order. Each body here looks like a request to the
/// upstream route, which must never see one.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_after_bodies_the_route_did_not_read_are_answered() {
    let up = RawUpstream::counting().await;
    let env = gateway(&format!(
        "upstreams:\n  u: {{targets: [{{url: \"http://{}\"}}]}}\nroutes:\n  \
         - {{name: echo, paths: [\"/echo\"], plugins: {{echo: {{}}}}}}\n  \
         - {{name: up, paths: [\"/up/*\"], upstream: u}}\n",
        up.addr
    ))
    .await;
    let smuggled = |n: u32| format!("GET /up/smuggled-{n} HTTP/1.1\r\nHost: gateway\r\n\r\n");
    let (one, two, three) = (smuggled(1), smuggled(2), smuggled(3));
    let pipeline = format!(
        "POST /echo HTTP/1.1\r\nHost: gateway\r\nContent-Length: {}\r\n\r\n{one}\
         POST /echo HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{two}\r\n0\r\n\r\n\
         POST /nowhere HTTP/1.1\r\nHost: gateway\r\nContent-Length: {}\r\n\r\n{three}\
         GET /up/last HTTP/1.1\r\nHost: gateway\r\n\r\n",
        one.len(),
        two.len(),
        three.len()
    );
    let mut c = Client::connect(env.addr).await;
    c.send(pipeline.as_bytes()).await;
    for what in ["echo, Content-Length", "echo, chunked"] {
        let r = c.response(what).await;
        assert_eq!(r.status, 200, "{what}: {r:?}");
        assert_eq!(
            (r.json()["route"].as_str(), r.json()["method"].as_str()),
            (Some("echo"), Some("POST")),
            "{what}: {r:?}"
        );
    }
    let r = c.response("no route").await;
    assert_error(&r, 404, "no_route", "no route");
    let r = c.response("last").await;
    assert_eq!((r.status, r.body.as_str()), (200, "/up/last got 0 bytes"));
    let paths: Vec<String> = up.requests().iter().map(|s| s.path().to_string()).collect();
    assert_eq!(paths, ["/up/last"]);
}

/// Requests whose framing cannot be trusted are refused before anything is proxied:
/// 400 with the JSON error and `Connection: close`, and the connection is closed.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_request_framing_is_refused_with_400_and_the_connection_closed() {
    let up = RawUpstream::counting().await;
    let env = gateway_to(&format!("http://{}", up.addr)).await;

    let cases: [(&str, &[u8]); 17] = [
        (
            "Transfer-Encoding: gzip",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        ),
        (
            "Transfer-Encoding: gzip, chunked",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding: chunked, chunked",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "two Transfer-Encoding: chunked fields",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b"POST /x HTTP/1.0\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "two different Content-Length fields",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "Content-Length: 5, 6",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nContent-Length: 5, 6\r\n\r\nhello!",
        ),
        (
            "Content-Length: abc",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nContent-Length: abc\r\n\r\nhello",
        ),
        (
            "Content-Length: -1",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nContent-Length: -1\r\n\r\nhello",
        ),
        (
            "Content-Length: +5",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nContent-Length: +5\r\n\r\nhello",
        ),
        (
            "empty Content-Length",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nContent-Length: \r\n\r\nhello",
        ),
        (
            "empty Transfer-Encoding",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: \r\n\r\nhello",
        ),
        (
            "whitespace between a field name and its colon",
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("request line without a version", b"GET /x\r\n\r\n"),
        (
            "HTTP/1.1 request without Host (RFC 9112 section 3.2)",
            b"GET /x HTTP/1.1\r\nAccept: */*\r\n\r\n",
        ),
        (
            "not HTTP at all",
            b"hello gateway, this is not HTTP\r\n\r\n",
        ),
        (
            "binary garbage",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\x00\xff\r\n\r\n",
        ),
    ];
    for (what, req) in cases {
        let mut c = Client::connect(env.addr).await;
        c.send(req).await;
        let r = c.response(what).await;
        assert_error(&r, 400, "bad_request", what);
        assert_eq!(r.header("connection"), Some("close"), "{what}: {r:?}");
        let after = c.until_closed().await;
        assert!(
            after.is_empty(),
            "{what}: nothing after the 400: {:?}",
            lossy(&after)
        );
    }
    // A request after them is the first and only one the upstream ever sees (it accepts
    // connections in the order they were opened).
    let r = Client::connect(env.addr).await.request("GET", "/ok").await;
    assert_eq!((r.status, r.body.as_str()), (200, "/ok got 0 bytes"));
    assert_eq!(up.connections(), 1, "nothing else reached the upstream");
    assert_eq!(up.heads(), 1, "nothing else reached the upstream");
}

/// Chunked bodies that go wrong part-way (an invalid size first, an invalid size after
/// a good chunk, data not followed by CRLF, a size that overflows).
const BAD_CHUNKS: [(&str, &str); 4] = [
    ("/bad-first", "zz\r\nhello\r\n0\r\n\r\n"),
    ("/bad-second", "5\r\nhello\r\nxyz\r\nmore!\r\n0\r\n\r\n"),
    ("/bad-crlf", "5\r\nhelloXX\r\n0\r\n\r\n"),
    ("/bad-overflow", "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
];

/// Sends each [`BAD_CHUNKS`] request on its own connection and reads until the gateway
/// closes it (a hang panics); returns, per case, the one response that came, if any.
async fn send_bad_chunks(addr: SocketAddr) -> Vec<(&'static str, Option<RawResponse>)> {
    let mut out = Vec::new();
    for (path, body) in BAD_CHUNKS {
        let mut c = Client::connect(addr).await;
        c.send(
            format!(
                "POST {path} HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
            )
            .as_bytes(),
        )
        .await;
        // Everything the gateway sends, up to its closing the connection (a hang panics).
        let got = c.until_closed().await;
        let r = if got.is_empty() {
            None
        } else {
            let mut w = Wire::new(&got[..], None);
            let (_, r) = w
                .response(false)
                .await
                .unwrap_or_else(|e| panic!("{path}: an incomplete answer: {e}"));
            assert!(
                w.buf.is_empty() && w.rest().await.is_empty(),
                "{path}: one answer only: {:?}",
                lossy(&got)
            );
            Some(r)
        };
        out.push((path, r));
    }
    out
}

/// An invalid chunked body never reaches the upstream as a complete request: whatever
/// the upstream got of it ends short (its connection closed mid-body), the client gets
/// no success, and the connection is closed.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_chunked_body_never_reaches_the_upstream_as_a_complete_request() {
    let up = RawUpstream::counting().await;
    let env = gateway_to(&format!("http://{}", up.addr)).await;
    for (path, r) in send_bad_chunks(env.addr).await {
        if let Some(r) = r {
            assert!(r.status >= 400, "{path}: no success: {r:?}");
        }
    }
    // The gateway still serves. This request's upstream connection is the last one
    // opened (the upstream accepts in order), and stays pooled; every connection
    // before it must end (none can be reused mid-body), each request read to its end.
    let r = Client::connect(env.addr).await.request("GET", "/ok").await;
    assert_eq!((r.status, r.body.as_str()), (200, "/ok got 0 bytes"));
    up.wait_for("every connection but the last one ended", |l| {
        l.ended + 1 == l.accepted
    })
    .await;
    up.settled().await;
    for seen in up.requests() {
        if seen.path() == "/ok" {
            continue;
        }
        assert!(
            seen.body.is_err(),
            "the upstream got a complete request for {}: {:?} (headers {:?})",
            seen.path(),
            seen.body.as_ref().map(|b| lossy(b)),
            seen.headers
        );
    }
}

/// A malformed chunked body is the client's error: it is answered `400 bad_request`
/// (or the connection is just closed), not blamed on the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_chunked_body_is_answered_400_or_closed() {
    let up = RawUpstream::counting().await;
    let env = gateway_to(&format!("http://{}", up.addr)).await;
    for (path, r) in send_bad_chunks(env.addr).await {
        if let Some(r) = r {
            assert_error(&r, 400, "bad_request", path);
            assert_eq!(r.header("connection"), Some("close"), "{path}: {r:?}");
        }
    }
}

// ---------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------

/// HEAD answers carry the headers, `Content-Length` included, and no body byte: the
/// same connection then answers a GET correctly (a stray body byte would corrupt its
/// status line). Proxied (a hyper upstream, with a fixed-length and a chunked body)
/// and answered by the `echo` policy; also HEAD and GET pipelined in one write.
#[tokio::test(flavor = "multi_thread")]
async fn head_answers_have_headers_and_no_body() {
    let up = Upstream::start("head").await;
    let env = gateway(&format!(
        "upstreams:\n  u: {{targets: [{{url: \"{}\"}}]}}\nroutes:\n  \
         - {{name: echo, paths: [\"/echo\"], plugins: {{echo: {{}}}}}}\n  \
         - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.url()
    ))
    .await;

    let mut c = Client::connect(env.addr).await;
    // Proxied, fixed length.
    let r = c.request("HEAD", "/bytes/100000").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-length"), Some("100000"), "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("x-upstream"), Some("head"), "{r:?}");
    let r = c.request("GET", "/bytes/10").await;
    assert_eq!((r.status, r.body.as_str()), (200, "xxxxxxxxxx"), "{r:?}");

    // Proxied, echo JSON: the length is the one the upstream announced.
    let r = c.request("HEAD", "/json").await;
    assert_eq!(r.status, 200, "{r:?}");
    let n: usize = r.header("content-length").unwrap().parse().unwrap();
    assert!(n > 0, "{r:?}");
    let r = c.request("GET", "/json").await;
    assert_eq!((r.status, r.json()["method"].as_str()), (200, Some("GET")));

    // Proxied, chunked upstream body: no body either.
    let r = c.request("HEAD", "/bytes/5000?chunked").await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c.request("GET", "/bytes/3").await;
    assert_eq!((r.status, r.body.as_str()), (200, "xxx"), "{r:?}");

    // The echo policy: its length, no body.
    let r = c.request("HEAD", "/echo").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let n: usize = r.header("content-length").unwrap().parse().unwrap();
    assert!(n > 0, "{r:?}");
    let r = c.request("GET", "/echo").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["route"], "echo", "{r:?}");
    assert_eq!(r.json()["method"], "GET", "{r:?}");

    // HEAD and GET in one write.
    c.send(
        b"HEAD /echo HTTP/1.1\r\nHost: gateway\r\n\r\nGET /bytes/4 HTTP/1.1\r\nHost: gateway\r\n\r\n",
    )
    .await;
    let (_, r) = c.response_with_head(true, "pipelined HEAD").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("content-length").is_some(), "{r:?}");
    let r = c.response("pipelined GET").await;
    assert_eq!((r.status, r.body.as_str()), (200, "xxxx"), "{r:?}");
}

/// A body the upstream sends chunked (no length) reaches an HTTP/1.1 client chunked,
/// on a connection that stays open; an HTTP/1.0 client, which knows no chunked coding,
/// gets it delimited by the connection closing, in HTTP/1.0, with `connection: close`
/// even if it asked for keep-alive.
#[tokio::test(flavor = "multi_thread")]
async fn chunked_upstream_body_is_chunked_for_http11_and_close_delimited_for_http10() {
    let up = Upstream::start("chunky").await;
    let env = gateway_to(&up.url()).await;
    let n = 100_000;
    let want = "x".repeat(n);

    let mut c = Client::connect(env.addr).await;
    c.send(format!("GET /bytes/{n}?chunked HTTP/1.1\r\nHost: gateway\r\n\r\n").as_bytes())
        .await;
    let (head, r) = c.response_with_head(false, "HTTP/1.1").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(r.header_all("transfer-encoding"), ["chunked"], "{head}");
    assert!(r.header("content-length").is_none(), "{head}");
    assert!(r.body == want, "{} bytes instead of {n}", r.body.len());
    let r = c.request("GET", "/after").await;
    assert_eq!(r.status, 200, "the connection stays open: {r:?}");

    for keep_alive in ["", "Connection: keep-alive\r\n"] {
        let what = format!("HTTP/1.0 {keep_alive:?}");
        let mut c = Client::connect(env.addr).await;
        c.send(
            format!("GET /bytes/{n}?chunked HTTP/1.0\r\nHost: gateway\r\n{keep_alive}\r\n")
                .as_bytes(),
        )
        .await;
        // No length and not chunked: `response` reads the body to the connection's end.
        let (head, r) = c.response_with_head(false, &what).await;
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{what}: {head}");
        assert!(
            r.header("transfer-encoding").is_none(),
            "{what}: not chunked: {head}"
        );
        assert!(r.header("content-length").is_none(), "{what}: {head}");
        assert_eq!(r.header("connection"), Some("close"), "{what}: {head}");
        assert!(
            r.body == want,
            "{what}: {} bytes instead of {n}",
            r.body.len()
        );
        assert!(
            c.wire.eof && c.wire.error.is_none(),
            "{what}: a clean close"
        );
    }
}

/// Every answer has one valid `Date`: the gateway's own (an upstream that sends none,
/// the echo policy, a routing error, a parser refusal), or the upstream's, passed
/// through once.
#[tokio::test(flavor = "multi_thread")]
async fn every_response_carries_a_valid_date() {
    let raw = RawUpstream::counting().await;
    let dated = RawUpstream::start(|_| {
        b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 2\r\n\r\nok"
            .to_vec()
    })
    .await;
    let env = gateway(&format!(
        "upstreams:\n  raw: {{targets: [{{url: \"http://{}\"}}]}}\n  \
         dated: {{targets: [{{url: \"http://{}\"}}]}}\nroutes:\n  \
         - {{name: echo, paths: [\"/echo\"], plugins: {{echo: {{}}}}}}\n  \
         - {{name: dated, paths: [\"/dated\"], upstream: dated}}\n  \
         - {{name: raw, paths: [\"/raw/*\"], upstream: raw}}\n",
        raw.addr, dated.addr
    ))
    .await;

    // `Client::response` checks the Date of each of these.
    let mut c = Client::connect(env.addr).await;
    let r = c.request("GET", "/raw/x").await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c.request("GET", "/echo").await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c.request("GET", "/nowhere").await;
    assert_error(&r, 404, "no_route", "no route");
    let mut bad = Client::connect(env.addr).await;
    bad.send(b"GET /x\r\n\r\n").await;
    let r = bad.response("parser refusal").await;
    assert_eq!(r.status, 400, "{r:?}");

    // The upstream's own Date is kept, not doubled (and not checked against today).
    c.send(b"GET /dated HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await;
    let (_, r) = c.wire.response(false).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header_all("date"),
        ["Sun, 06 Nov 1994 08:49:37 GMT"],
        "{r:?}"
    );
}

// ---------------------------------------------------------------------------------
// Keep-alive
// ---------------------------------------------------------------------------------

/// HTTP/1.1 with `Connection: close`: the answer says `connection: close` and the
/// gateway closes. HTTP/1.0 with `Connection: keep-alive`: the answer says
/// `connection: keep-alive` and the connection carries more requests. HTTP/1.0
/// without it: closed after the answer.
#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_follows_the_version_and_the_connection_header() {
    let up = Upstream::start("ka").await;
    let env = gateway_to(&up.url()).await;

    // HTTP/1.1, Connection: close (with a body, and without).
    for req in [
        &b"GET /a HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"[..],
        b"POST /a HTTP/1.1\r\nHost: gateway\r\nConnection: Close\r\nContent-Length: 2\r\n\r\nhi",
    ] {
        let what = lossy(req);
        let mut c = Client::connect(env.addr).await;
        c.send(req).await;
        let (head, r) = c.response_with_head(false, &what).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(r.header("connection"), Some("close"), "{what}: {head}");
        let after = c.until_closed().await;
        assert!(after.is_empty(), "{what}: {:?}", lossy(&after));
    }

    // HTTP/1.0 with keep-alive: three requests on one connection, the last without.
    let mut c = Client::connect(env.addr).await;
    for i in 0..2 {
        c.send(b"GET /ten HTTP/1.0\r\nHost: gateway\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let (head, r) = c
            .response_with_head(false, &format!("HTTP/1.0 keep-alive #{i}"))
            .await;
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert_eq!(r.header("connection"), Some("keep-alive"), "{head}");
        assert!(r.header("content-length").is_some(), "{head}");
        assert_eq!(r.json()["path"], "/ten", "{r:?}");
    }
    c.send(b"GET /last HTTP/1.0\r\nHost: gateway\r\n\r\n").await;
    let (head, r) = c.response_with_head(false, "HTTP/1.0 last").await;
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert_ne!(r.header("connection"), Some("keep-alive"), "{head}");
    assert_eq!(r.json()["path"], "/last", "{r:?}");
    let after = c.until_closed().await;
    assert!(after.is_empty(), "{:?}", lossy(&after));

    // HTTP/1.0 without keep-alive: closed at once.
    let mut c = Client::connect(env.addr).await;
    c.send(b"GET /once HTTP/1.0\r\nHost: gateway\r\n\r\n").await;
    let (head, r) = c.response_with_head(false, "HTTP/1.0").await;
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert_ne!(r.header("connection"), Some("keep-alive"), "{head}");
    let after = c.until_closed().await;
    assert!(after.is_empty(), "{:?}", lossy(&after));
    assert_eq!(up.hits(), 6);
}

/// When the gateway closes a connection after an answer, the answer says
/// `connection: close` (RFC 9112 section 9.6), so that a client does not send or
/// pipeline another request on it. Here a POST whose upstream cannot be reached: its
/// body is never read, and a GET follows in the same write. Either the body is read
/// past and the GET answered too, or the first answer announces the close.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_after_which_the_gateway_closes_says_connection_close() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let env = gateway_to(&format!("http://{dead}")).await;
    let mut c = Client::connect(env.addr).await;
    c.send(
        b"POST /x HTTP/1.1\r\nHost: gateway\r\nContent-Length: 5\r\n\r\nhello\
          GET /y HTTP/1.1\r\nHost: gateway\r\n\r\n",
    )
    .await;
    let r = c.response("POST").await;
    assert_error(&r, 502, "upstream_unavailable", "POST");
    if r.header("connection") == Some("close") {
        let after = c.until_closed().await;
        assert!(after.is_empty(), "{:?}", lossy(&after));
    } else {
        let (_, r) = c.wire.response(false).await.unwrap_or_else(|e| {
            panic!(
                "the 502 did not say `connection: close`, yet the gateway closed the \
                 connection without answering the pipelined GET: {e}"
            )
        });
        assert_error(&r, 502, "upstream_unavailable", "GET");
    }
}

// ---------------------------------------------------------------------------------
// A client that goes away mid-body
// ---------------------------------------------------------------------------------

/// A client that closes its connection in the middle of its request body (a
/// `Content-Length` body, a chunked body cut inside a chunk, and one cut after a whole
/// chunk, where only the last chunk is missing), once the upstream has the request
/// head: the upstream never gets a complete request (its connection ends mid-body), the
/// gateway survives and serves new connections.
#[tokio::test(flavor = "multi_thread")]
async fn client_closing_mid_body_never_yields_a_complete_upstream_request() {
    let up = RawUpstream::counting().await;
    let mut env = gateway_to(&format!("http://{}", up.addr)).await;
    let cases: [(&str, String); 3] = [
        (
            "/cl",
            format!(
                "POST /cl HTTP/1.1\r\nHost: gateway\r\nContent-Length: 1000\r\n\r\n{}",
                pattern(100)
            ),
        ),
        (
            "/in-chunk",
            "POST /in-chunk HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n\
             10\r\nabc"
                .to_string(),
        ),
        (
            "/no-last-chunk",
            "POST /no-last-chunk HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n"
                .to_string(),
        ),
    ];
    for (i, (path, req)) in cases.iter().enumerate() {
        for half_close in [false, true] {
            let what = format!("{path} (half-close: {half_close})");
            let before = up.heads();
            let mut c = Client::connect(env.addr).await;
            c.send(req.as_bytes()).await;
            up.wait_for(&format!("{what}: head received"), |l| l.heads > before)
                .await;
            if half_close {
                // Only the sending side: the client still reads what it is told.
                c.wire.io.shutdown().await.unwrap();
                let got = c.until_closed().await;
                if !got.is_empty() {
                    let (_, r) = Wire::new(&got[..], None)
                        .response(false)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(r.status >= 400, "{what}: no success: {r:?}");
                }
            } else {
                drop(c);
            }
            up.wait_for(&format!("{what}: request read to its end"), |l| {
                l.seen.len() > before
            })
            .await;
            let seen = up.requests().pop().unwrap();
            assert_eq!(seen.path(), *path, "{what}");
            assert!(
                seen.body.is_err(),
                "{what}: the upstream got a complete request, body {:?}, headers {:?}",
                seen.body.as_ref().map(|b| lossy(b)),
                seen.headers
            );
        }
        assert!(
            env.gw.try_exit_status().is_none(),
            "the gateway is still running after case {i}"
        );
        let r = Client::connect(env.addr).await.request("GET", "/ok").await;
        assert_eq!((r.status, r.body.as_str()), (200, "/ok got 0 bytes"));
    }
    // The bodies that went upstream were framed as the client framed them.
    for seen in up.requests() {
        match seen.path() {
            "/cl" => assert_eq!(seen.header_all("content-length"), ["1000"], "{seen:?}"),
            "/in-chunk" | "/no-last-chunk" => {
                assert_eq!(
                    seen.header_all("transfer-encoding"),
                    ["chunked"],
                    "{seen:?}"
                )
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------
// Heads over the server's buffer
// ---------------------------------------------------------------------------------

/// With small limits (`max_uri_length: 100`, `max_header_bytes: 2KiB`), the server's
/// raw head buffer is 16 KiB. A 100 KB request line, 100 KB of header fields, or one
/// 100 KB field are far over it: the client gets the JSON 414 / 431 with an
/// `X-Request-Id`, then the connection ends; it neither hangs nor is reset first.
#[tokio::test(flavor = "multi_thread")]
async fn heads_over_the_raw_buffer_get_json_414_or_431() {
    let up = RawUpstream::counting().await;
    let env = gateway(&format!(
        "limits: {{max_uri_length: 100, max_header_bytes: 2KiB}}\n\
         upstreams:\n  u: {{targets: [{{url: \"http://{}\"}}]}}\n\
         routes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.addr
    ))
    .await;

    let long_line = format!(
        "GET /{} HTTP/1.1\r\nHost: gateway\r\n\r\n",
        "a".repeat(100_000)
    );
    let many_fields = format!(
        "GET /h HTTP/1.1\r\nHost: gateway\r\n{}\r\n",
        (0..10)
            .map(|i| format!("X-Fill-{i}: {}\r\n", "v".repeat(10_000)))
            .collect::<String>()
    );
    let one_field = format!(
        "GET /h HTTP/1.1\r\nHost: gateway\r\nX-Big: {}\r\n\r\n",
        "b".repeat(100_000)
    );
    for (what, req, status, code) in [
        ("100 KB request line", long_line, 414, "uri_too_long"),
        ("100 KB of fields", many_fields, 431, "headers_too_large"),
        ("one 100 KB field", one_field, 431, "headers_too_large"),
    ] {
        let mut c = Client::connect(env.addr).await;
        c.send_lenient(req.as_bytes()).await;
        let r = c.response(what).await;
        assert_error(&r, status, code, what);
        // Whatever ends the connection, it comes after the whole answer.
        let after = c.until_closed().await;
        assert!(after.is_empty(), "{what}: {:?}", lossy(&after));
    }
    // Requests within the limits still pass, and are the first the upstream sees.
    let r = Client::connect(env.addr)
        .await
        .request("GET", "/fine")
        .await;
    assert_eq!((r.status, r.body.as_str()), (200, "/fine got 0 bytes"));
    assert_eq!(up.connections(), 1, "nothing else reached the upstream");
    assert_eq!(up.heads(), 1, "nothing else reached the upstream");
}

/// With the default limits the raw head buffer holds more than a URI can be (the
/// `http` crate stops at 65534 bytes): a 70 KB target is too long (414), not a malformed
/// one (400).
#[tokio::test(flavor = "multi_thread")]
async fn a_target_longer_than_any_uri_is_414_with_default_limits() {
    let up = RawUpstream::counting().await;
    let env = gateway(&format!(
        "upstreams:\n  u: {{targets: [{{url: \"http://{}\"}}]}}\n\
         routes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.addr
    ))
    .await;
    for n in [20_000, 70_000] {
        let what = format!("{n}-byte target");
        let req = format!("GET /{} HTTP/1.1\r\nHost: gateway\r\n\r\n", "a".repeat(n));
        let mut c = Client::connect(env.addr).await;
        c.send_lenient(req.as_bytes()).await;
        let r = c.response(&what).await;
        assert_error(&r, 414, "uri_too_long", &what);
    }
    assert_eq!(up.heads(), 0, "nothing reached the upstream");
}

// ---------------------------------------------------------------------------------
// Regressions from the review of the HTTP/1.1 codec
// ---------------------------------------------------------------------------------

/// An absolute-form target names the host: routing and what the upstream is told
/// follow it, not a different `Host` header (RFC 9112 §3.2.2), so a request cannot be
/// routed by one host and forwarded as another.
#[tokio::test(flavor = "multi_thread")]
async fn absolute_form_target_overrides_the_host_header() {
    let up = portico_test_support::Upstream::start("abs").await;
    let env = gateway(&format!(
        "upstreams:\n  u: {{targets: [{{url: \"{}\"}}]}}\nroutes:\n  - {{name: public, hosts: [public.example], paths: [\"/*\"], upstream: u, preserve_host: true}}\n  - {{name: admin, hosts: [admin.example], paths: [\"/*\"], plugins: {{echo: {{}}}}}}\n",
        up.url()
    ))
    .await;
    let mut c = Client::connect(env.addr).await;
    c.send(b"GET http://public.example/x HTTP/1.1\r\nHost: admin.example\r\n\r\n")
        .await;
    let r = c.response("absolute form").await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = r.json();
    assert_eq!(seen["headers"]["host"], "public.example", "{seen}");
    assert_eq!(
        seen["headers"]["x-forwarded-host"], "public.example",
        "{seen}"
    );
    assert_eq!(up.hits(), 1, "routed by the target's host, not by Host");
}

/// An answer given before the client was told to send its body (`Expect:
/// 100-continue`) closes the connection: the client may or may not send the body, and
/// the gateway must not read it as the next request.
#[tokio::test(flavor = "multi_thread")]
async fn early_answer_to_expect_continue_closes_the_connection() {
    let env = gateway("routes:\n  - {name: only, paths: [\"/only\"], plugins: {echo: {}}}\n").await;
    let mut c = Client::connect(env.addr).await;
    c.send(b"POST /nope HTTP/1.1\r\nHost: gateway\r\nContent-Length: 40\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let (head, r) = c.response_with_head(false, "404 before 100").await;
    assert!(!head.contains("100 Continue"), "{head}");
    assert_error(&r, 404, "no_route", "404 before 100");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    c.until_closed().await;
}

/// A proxied HEAD answer without a length (here chunked) does not claim an empty
/// body; a 204 never carries a length.
#[tokio::test(flavor = "multi_thread")]
async fn head_without_length_and_204_carry_no_content_length() {
    let up = RawUpstream::start(|seen| {
        if seen.path() == "/nc" {
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
        }
    })
    .await;
    let env = gateway_to(&format!("http://{}", up.addr)).await;
    let mut c = Client::connect(env.addr).await;
    c.send(b"HEAD /x HTTP/1.1\r\nHost: gateway\r\n\r\n").await;
    let (head, r) = c.response_with_head(true, "HEAD chunked").await;
    assert_eq!(r.status, 200, "{head}");
    assert_eq!(r.header("content-length"), None, "{head}");
    let r = c.request("GET", "/nc").await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("content-length"), None, "{r:?}");
}

/// A refused request whose body the client keeps sending (512 KiB in one write) still
/// gets its whole answer, and the client's write is not left stuck: the gateway reads
/// and discards for a while before it closes. (On Linux over loopback the answer also
/// survives a reset, so this checks the outcome, not the lingering itself.)
#[tokio::test(flavor = "multi_thread")]
async fn refusal_is_delivered_while_the_client_is_still_sending() {
    let env = gateway("routes:\n  - {name: r, paths: [\"/*\"], plugins: {echo: {}}}\n").await;
    for _ in 0..5 {
        let mut c = Client::connect(env.addr).await;
        let mut req =
            b"POST /x HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec();
        req.extend(std::iter::repeat_n(b'q', 512 << 10));
        c.send_lenient(&req).await;
        let r = c.response("refused while sending").await;
        assert_error(&r, 400, "bad_request", "refused while sending");
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    }
}

/// A client that stops reading an answer is disconnected after
/// `limits.client_idle_timeout` without progress (releasing the upstream side), while
/// the gateway keeps serving others.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_disconnected() {
    let up = portico_test_support::Upstream::start("big").await;
    let env = gateway(&format!(
        "limits: {{client_idle_timeout: 1s}}\nupstreams:\n  u: {{targets: [{{url: \"{}\"}}]}}\nroutes:\n  - {{name: r, paths: [\"/*\"], upstream: u}}\n",
        up.url()
    ))
    .await;
    const TOTAL: usize = 256 << 20;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    s.write_all(format!("GET /bytes/{TOTAL} HTTP/1.1\r\nHost: gateway\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let n = s.read(&mut buf).await.unwrap();
    assert!(n > 0);
    // Stop reading well past the idle timeout, then drain what is left.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut got = n;
    let drained = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "the gateway never closed the stalled connection"
    );
    assert!(
        got < TOTAL,
        "the whole answer arrived ({got} bytes): not disconnected"
    );
    // Others are still served.
    let mut c = Client::connect(env.addr).await;
    let r = c.request("GET", "/after").await;
    assert_eq!(r.status, 200, "{r:?}");
}
