//! End-to-end tests of Portico's own HTTP/1.1 upstream client (the `h1` codec of
//! `portico-upstream` and its connection pool): the real `portico` binary between
//! clients and raw TCP upstreams written here, which read the gateway's request bytes
//! and answer with exact response bytes.
//!
//! Covers: chunked responses (extensions, trailers, chunks spanning reads, streamed),
//! 1xx interim answers, HEAD / 204 / 304 without a body, connection reuse and
//! `Connection: close`, a body the upstream cuts short, invalid response heads (502
//! with the JSON error), bodies delimited by the connection closing, how request bodies
//! are framed towards the upstream, and an early 413 from an upstream that stops
//! reading a large upload.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portico_test_support::{http_client, LocalGateway, RawResponse};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Bound on each wait for bytes from the gateway, so that a gateway that hangs fails
/// the test instead of stalling it. Never used to measure anything.
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
                    "nothing more arrived within {limit:?}; so far: {:?}",
                    lossy(&self.buf)
                )
            }),
            None => read.await,
        };
        match r {
            Ok(0) | Err(_) => {
                self.eof = true;
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
    async fn response(&mut self, head_request: bool) -> Result<RawResponse, String> {
        let head = self.head().await.ok_or_else(|| {
            format!(
                "the connection ended without a complete response head; got {:?}",
                lossy(&self.buf)
            )
        })?;
        let (status_line, headers) = split_head(&head);
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
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
        Ok(RawResponse {
            status,
            headers,
            body: lossy(&body),
        })
    }
}

/// The data of a chunked body decoded so far from `raw` (a response head, then
/// chunks; a chunk still arriving counts with what is there).
fn decoded_so_far(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(i) = find(raw, b"\r\n\r\n") else {
        return out;
    };
    let mut rest = &raw[i + 4..];
    while let Some(eol) = find(rest, b"\r\n") {
        let line = lossy(&rest[..eol]);
        let Ok(n) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        let data = &rest[eol + 2..];
        out.extend_from_slice(&data[..n.min(data.len())]);
        if n == 0 || data.len() < n + 2 {
            break;
        }
        rest = &data[n + 2..];
    }
    out
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
        Client {
            wire: Wire::new(s, Some(WAIT)),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.wire.io.write_all(bytes).await.unwrap();
    }

    /// Sends a bodiless request on this connection and reads its response.
    async fn request(&mut self, method: &str, path: &str) -> RawResponse {
        self.send(format!("{method} {path} HTTP/1.1\r\nHost: gateway\r\n\r\n").as_bytes())
            .await;
        self.wire
            .response(method == "HEAD")
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

// ---------------------------------------------------------------------------------
// A raw upstream: reads each request whole, answers with scripted bytes
// ---------------------------------------------------------------------------------

/// A request as the upstream read it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which accepted connection it came on (1-based).
    conn: usize,
    /// Its position on that connection (1-based).
    nth: usize,
    request_line: String,
    headers: Vec<(String, String)>,
    /// The head as received.
    head: String,
    /// The decoded body, or why its framing was wrong.
    body: Result<Vec<u8>, String>,
}

impl Seen {
    fn method(&self) -> &str {
        self.request_line.split(' ').next().unwrap_or("")
    }
    fn path(&self) -> &str {
        let target = self.request_line.split(' ').nth(1).unwrap_or("");
        target.split('?').next().unwrap_or("")
    }
    fn header_all(&self, name: &str) -> Vec<&str> {
        all(&self.headers, name)
    }
}

/// What the upstream does after reading a request, in order.
enum Step {
    Send(Vec<u8>),
    /// Wait until the test says so.
    Wait(Arc<Notify>),
    /// Close the connection (cleanly: the request was read whole).
    Close,
}

type Script = dyn Fn(&Seen) -> Vec<Step> + Send + Sync;

struct RawUpstream {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RawUpstream {
    /// Serves every connection until it closes: reads a request (head and body, by
    /// `Content-Length` or chunked), records it, then runs `script`'s steps for it.
    async fn start(script: impl Fn(&Seen) -> Vec<Step> + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let (c, s) = (conns.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve_conn(stream, n, script.clone(), s.clone()));
            }
        });
        RawUpstream { addr, conns, seen }
    }

    /// TCP connections accepted so far.
    fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn last(&self) -> Seen {
        self.requests().pop().expect("the upstream got a request")
    }
}

async fn read_request(wire: &mut Wire<OwnedReadHalf>, conn: usize, nth: usize) -> Option<Seen> {
    let head = wire.head().await?;
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
    Some(Seen {
        conn,
        nth,
        request_line,
        headers,
        head,
        body,
    })
}

async fn serve_conn(
    stream: TcpStream,
    conn: usize,
    script: Arc<Script>,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let (rd, mut wr) = stream.into_split();
    let mut wire = Wire::new(rd, None);
    for nth in 1usize.. {
        let Some(req) = read_request(&mut wire, conn, nth).await else {
            return;
        };
        let bad = req.body.is_err();
        let steps = script(&req);
        seen.lock().unwrap().push(req);
        if bad {
            return;
        }
        for step in steps {
            match step {
                Step::Send(b) => {
                    if wr.write_all(&b).await.is_err() {
                        return;
                    }
                }
                Step::Wait(n) => n.notified().await,
                Step::Close => return,
            }
        }
    }
}

/// `200 OK` with a `Content-Length` body.
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `n` bytes of `a..z` repeated (no accidental `hello` in it).
fn pattern(n: usize) -> String {
    (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

// ---------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------

/// A gateway with one route per `(prefix, upstream)`: paths `{prefix}/*` (so `""` takes
/// everything), paths passed unchanged.
async fn gateway(routes: &[(&str, &RawUpstream)]) -> LocalGateway {
    let mut ups = String::from("upstreams:\n");
    let mut rs = String::from("routes:\n");
    for (i, (prefix, up)) in routes.iter().enumerate() {
        ups.push_str(&format!(
            "  u{i}: {{targets: [{{url: \"http://{}\"}}]}}\n",
            up.addr
        ));
        rs.push_str(&format!(
            "  - {{name: r{i}, paths: [\"{prefix}/*\"], upstream: u{i}}}\n"
        ));
    }
    LocalGateway::start(
        Path::new(env!("CARGO_BIN_EXE_portico")),
        &format!("{ups}{rs}"),
    )
    .await
}

/// A gateway with two routes to `up`: `plain` (everything, no policy: fields may go
/// through as bytes) and `policy` (`/policy/*`, prefix stripped, with a policy that
/// changes nothing but makes the fields go through a header map).
async fn plain_and_policy_gateway(up: &RawUpstream) -> LocalGateway {
    let yaml = format!(
        "upstreams:\n  u: {{targets: [{{url: \"http://{}\"}}]}}\nroutes:\n  \
         - {{name: plain, paths: [\"/*\"], upstream: u}}\n  \
         - name: policy\n    paths: [\"/policy/*\"]\n    upstream: u\n    strip_prefix: true\n    \
         plugins:\n      request-size-limit: {{max_body: 1MiB}}\n",
        up.addr
    );
    LocalGateway::start(Path::new(env!("CARGO_BIN_EXE_portico")), &yaml).await
}

/// Asserts the gateway's 502 JSON error, its `request_id` equal to `X-Request-Id`.
fn assert_502(r: &RawResponse, what: &str) {
    assert_eq!(r.status, 502, "{what}: {r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: {r:?}"
    );
    let v = r.json();
    let e = &v["error"];
    assert_eq!(e["status"], 502, "{what}: {r:?}");
    assert_eq!(e["code"], "upstream_unavailable", "{what}: {r:?}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {r:?}"
    );
    let rid = e["request_id"].as_str().unwrap_or("");
    assert!(!rid.is_empty(), "{what}: {r:?}");
    assert_eq!(r.header("x-request-id"), Some(rid), "{what}: {r:?}");
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

/// A chunked response with chunk extensions (a quoted one holding `;`, whitespace
/// before `;`), upper-case hex, a chunk larger than one read, a last chunk with an
/// extension and a trailer section, each piece sent only once the client has the one
/// before (so each chunk ends with nothing after it buffered): the client gets exactly
/// the concatenated data, streamed, and both connections carry the next request: the
/// client's, and the upstream's (so the trailer section was consumed to its end).
#[tokio::test(flavor = "multi_thread")]
async fn chunked_response_is_decoded_streamed_and_both_connections_reused() {
    let big = format!("{}<big-end>", pattern(70_000));
    let gates: Vec<Arc<Notify>> = (0..4).map(|_| Arc::new(Notify::new())).collect();
    let (g, b) = (gates.clone(), big.clone());
    let up = RawUpstream::start(move |req| match req.path() {
        "/chunked" => vec![
            Step::Send(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\
                  Trailer: X-Checksum\r\n\r\n5;name=value\r\nhello\r\n"
                    .to_vec(),
            ),
            Step::Wait(g[0].clone()),
            Step::Send(b"5;flag\r\n-ext-\r\n".to_vec()),
            Step::Wait(g[1].clone()),
            Step::Send(b"6 ; q=\"a;b\"\r\nworld!\r\n".to_vec()),
            Step::Wait(g[2].clone()),
            Step::Send(format!("{:X}\r\n{b}\r\n", b.len()).into_bytes()),
            Step::Wait(g[3].clone()),
            Step::Send(b"0;last=yes\r\nX-Checksum: 1234\r\nX-Other: two\r\n\r\n".to_vec()),
        ],
        _ => vec![Step::Send(ok("after"))],
    })
    .await;
    let env = gateway(&[("", &up)]).await;
    let want = format!("hello-ext-world!{big}");

    let mut c = Client::connect(env.addr).await;
    c.send(b"GET /chunked HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await;
    // Each piece reaches the client before the upstream sends the next.
    for (gate, upto) in gates.iter().zip([5, 10, 16, want.len()]) {
        assert!(
            c.wire.fill_until(|b| decoded_so_far(b).len() >= upto).await,
            "the connection ended early: {:?}",
            lossy(&c.wire.buf)
        );
        let got = decoded_so_far(&c.wire.buf);
        assert!(
            got == want.as_bytes()[..upto],
            "after {upto} bytes: {:?}",
            lossy(&got[..got.len().min(40)])
        );
        gate.notify_one();
    }
    let r = c.wire.response(false).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(
        r.body == want,
        "body of {} bytes instead of {}, starting {:?}",
        r.body.len(),
        want.len(),
        &r.body[..r.body.len().min(40)]
    );

    // Same client connection, and (with the trailers read) the same upstream one.
    let r = c.request("GET", "/after").await;
    assert_eq!((r.status, r.body.as_str()), (200, "after"), "{r:?}");
    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        up.connections(),
        1,
        "the upstream connection was reused: {seen:?}"
    );
    assert_eq!((seen[1].conn, seen[1].nth), (1, 2));
}

/// Chunks that reach the gateway together (one write, as any server streaming small
/// pieces produces) are all delivered. Here ten 1-byte chunks `0`..`9` in one write,
/// then a real (hyper) upstream streaming 1 MiB chunked in 64 KiB chunks.
#[tokio::test(flavor = "multi_thread")]
async fn chunks_that_arrive_together_are_all_delivered() {
    let mut chunked = String::from("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    for d in 0..10 {
        chunked.push_str(&format!("1\r\n{d}\r\n"));
    }
    chunked.push_str("0\r\n\r\n");
    let up = RawUpstream::start(move |_| vec![Step::Send(chunked.clone().into_bytes())]).await;
    let real = portico_test_support::Upstream::start("real").await;
    let env = LocalGateway::start(
        Path::new(env!("CARGO_BIN_EXE_portico")),
        &format!(
            "upstreams:\n  raw: {{targets: [{{url: \"http://{}\"}}]}}\n  \
             real: {{targets: [{{url: \"{}\"}}]}}\nroutes:\n  \
             - {{name: real, paths: [\"/bytes/*\"], upstream: real}}\n  \
             - {{name: raw, paths: [\"/*\"], upstream: raw}}\n",
            up.addr,
            real.url()
        ),
    )
    .await;

    let digits = Client::connect(env.addr)
        .await
        .request("GET", "/digits")
        .await;
    let n = 1 << 20;
    let download = Client::connect(env.addr)
        .await
        .request("GET", &format!("/bytes/{n}?chunked"))
        .await;
    assert_eq!((digits.status, download.status), (200, 200));
    assert!(
        digits.body == "0123456789" && download.body.len() == n,
        "every chunk's data, in order: got {:?} for ten 1-byte chunks, and {} of {n} bytes \
         from a hyper upstream",
        digits.body,
        download.body.len()
    );
}

/// `100 Continue`, and `103 Early Hints` with a header of its own, before the final
/// answer: the client gets only the final status, headers and body.
#[tokio::test(flavor = "multi_thread")]
async fn interim_1xx_answers_are_skipped() {
    let up = RawUpstream::start(|req| match req.path() {
        "/continue" => vec![
            Step::Send(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()),
            Step::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nhello".to_vec()),
        ],
        _ => vec![Step::Send(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
              HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncreated"
                .to_vec(),
        )],
    })
    .await;
    let env = gateway(&[("", &up)]).await;

    let mut c = Client::connect(env.addr).await;
    c.send(b"POST /continue HTTP/1.1\r\nHost: gateway\r\nContent-Length: 4\r\n\r\ndata")
        .await;
    let r = c.wire.response(false).await.unwrap();
    assert_eq!(r.status, 200, "the client gets the final answer: {r:?}");
    assert_eq!(r.header("x-final"), Some("yes"), "{r:?}");
    assert_eq!(r.body, "hello");
    assert_eq!(up.last().body.as_deref(), Ok(&b"data"[..]));

    // Both interim answers and the final one in a single write.
    let r = c.request("GET", "/hints").await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body, "created");
    assert_eq!(
        r.header("link"),
        None,
        "the 103's fields are not the final response's: {r:?}"
    );
    assert_eq!(up.connections(), 1);
}

/// A HEAD answered with `Content-Length: 5` (or `Transfer-Encoding: chunked`) and no
/// body: the client gets the status and the length, no body bytes, and the next
/// requests, on the same client and upstream connections, are answered correctly.
#[tokio::test(flavor = "multi_thread")]
async fn head_response_has_no_body_and_the_connection_is_reused() {
    let up = RawUpstream::start(|req| {
        if req.method() != "HEAD" {
            return vec![Step::Send(ok("hello"))];
        }
        let head: &[u8] = if req.path() == "/chunked" {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\n"
        };
        vec![Step::Send(head.to_vec())]
    })
    .await;
    let env = gateway(&[("", &up)]).await;

    let mut c = Client::connect(env.addr).await;
    for path in ["/x", "/chunked", "/x"] {
        let r = c.request("HEAD", path).await;
        assert_eq!(r.status, 200, "HEAD {path}: {r:?}");
        if path == "/x" {
            assert_eq!(r.header("content-length"), Some("5"), "{r:?}");
            assert_eq!(r.header("content-type"), Some("text/plain"), "{r:?}");
        }
        // Any body byte after the HEAD response would corrupt this one.
        let r = c.request("GET", path).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "hello"),
            "GET after HEAD {path}: {r:?}"
        );
    }
    let seen = up.requests();
    let methods: Vec<&str> = seen.iter().map(Seen::method).collect();
    assert_eq!(methods, ["HEAD", "GET", "HEAD", "GET", "HEAD", "GET"]);
    assert_eq!(up.connections(), 1, "one upstream connection: {seen:?}");
}

/// 204, and 304 with the `Content-Length` of the representation but no body: passed
/// through with their headers and no body, on one upstream connection throughout.
#[tokio::test(flavor = "multi_thread")]
async fn no_content_and_not_modified_have_no_body_and_the_connection_is_reused() {
    let up = RawUpstream::start(|req| {
        let resp: &[u8] = match req.path() {
            "/204" => b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n",
            "/304" => b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 7\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine",
        };
        vec![Step::Send(resp.to_vec())]
    })
    .await;
    let env = gateway(&[("", &up)]).await;

    let mut c = Client::connect(env.addr).await;
    for round in 0..2 {
        let r = c.request("GET", "/204").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (204, ""),
            "round {round}: {r:?}"
        );
        assert_eq!(r.header("x-kind"), Some("none"), "{r:?}");
        let r = c.request("GET", "/304").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (304, ""),
            "round {round}: {r:?}"
        );
        assert_eq!(r.header("etag"), Some("\"v1\""), "{r:?}");
        let r = c.request("GET", "/ok").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "fine"),
            "round {round}: {r:?}"
        );
    }
    // And with a pooled client, each request possibly on another client connection.
    let client = http_client();
    for (path, status, body) in [("/204", 204, ""), ("/304", 304, ""), ("/ok", 200, "fine")] {
        let resp = client
            .get(format!("http://{}{path}", env.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(resp.text().await.unwrap(), body, "{path}");
    }
    assert_eq!(up.requests().len(), 9);
    assert_eq!(
        up.connections(),
        1,
        "one upstream connection: {:?}",
        up.requests()
    );
}

/// 20 sequential requests use one upstream connection; when every response says
/// `Connection: close`, each uses its own (whether or not the upstream then actually
/// closes), and all succeed.
#[tokio::test(flavor = "multi_thread")]
async fn sequential_requests_reuse_one_connection_unless_the_upstream_says_close() {
    let answer = |req: &Seen, close: bool| {
        let body = format!("conn {} request {}", req.conn, req.nth);
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes()
    };
    let keep = RawUpstream::start(move |req| vec![Step::Send(answer(req, false))]).await;
    let close =
        RawUpstream::start(move |req| vec![Step::Send(answer(req, true)), Step::Close]).await;
    // Says `close` but keeps serving: only the header can stop the gateway reusing it.
    let says_close = RawUpstream::start(move |req| vec![Step::Send(answer(req, true))]).await;
    let env = gateway(&[
        ("/keep", &keep),
        ("/close", &close),
        ("/says-close", &says_close),
    ])
    .await;

    let client = http_client();
    for (prefix, up, reused) in [
        ("/keep", &keep, true),
        ("/close", &close, false),
        ("/says-close", &says_close, false),
    ] {
        for i in 1..=20 {
            let resp = client
                .get(format!("http://{}{prefix}/{i}", env.addr))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200, "{prefix} request {i}");
            let want = if reused {
                format!("conn 1 request {i}")
            } else {
                format!("conn {i} request 1")
            };
            assert_eq!(resp.text().await.unwrap(), want, "{prefix}");
        }
        assert_eq!(up.requests().len(), 20, "{prefix}");
        assert_eq!(
            up.connections(),
            if reused { 1 } else { 20 },
            "{prefix}: upstream connections"
        );
    }
}

/// The upstream promises 100 bytes (or a chunked body), sends 10 and closes: the client
/// must not get a complete response (its connection ends short of the promised body, a
/// reqwest client sees an error), and the next request is answered normally.
#[tokio::test(flavor = "multi_thread")]
async fn body_cut_short_by_the_upstream_is_not_passed_off_as_complete() {
    let up = RawUpstream::start(|req| match req.path() {
        "/cut" => vec![
            Step::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789".to_vec()),
            Step::Close,
        ],
        "/cut-chunked" => vec![
            Step::Send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"
                    .to_vec(),
            ),
            Step::Close,
        ],
        _ => vec![Step::Send(ok("whole"))],
    })
    .await;
    let env = gateway(&[("", &up)]).await;
    let client = http_client();

    for path in ["/cut", "/cut-chunked"] {
        // Raw: read until the gateway closes the connection (it must: the response
        // can never be completed), then check nothing complete was claimed.
        let mut c = Client::connect(env.addr).await;
        c.send(format!("GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n").as_bytes())
            .await;
        let got = c.wire.rest().await;
        let parsed = Wire::new(&got[..], None).response(false).await;
        assert!(
            parsed.is_err(),
            "GET {path}: the client got a complete response: {:?}",
            lossy(&got)
        );
        if find(&got, b"\r\n\r\n").is_some() {
            assert!(got.starts_with(b"HTTP/1.1 200 "), "{:?}", lossy(&got));
        }

        // reqwest: the exchange fails (head or body).
        let result = match client
            .get(format!("http://{}{path}", env.addr))
            .send()
            .await
        {
            Ok(resp) => resp.bytes().await.map(|b| b.len()),
            Err(e) => Err(e),
        };
        assert!(result.is_err(), "GET {path} with reqwest: {result:?}");

        let r = Client::connect(env.addr).await.request("GET", "/ok").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "whole"),
            "after {path}: {r:?}"
        );
    }
}

/// Responses the gateway cannot relay faithfully are 502 `upstream_unavailable` with
/// the JSON error, and cost nothing to the following requests (the target is neither
/// ejected nor is the bad connection reused).
#[tokio::test(flavor = "multi_thread")]
async fn invalid_upstream_responses_are_502_upstream_unavailable() {
    fn fields(n: usize) -> String {
        // `n` header fields in all, `Content-Length` included.
        let mut s = String::from("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n");
        for i in 1..n {
            s.push_str(&format!("X-H{i}: v{i}\r\n"));
        }
        s + "\r\nok"
    }
    let up = RawUpstream::start(|req| {
        let (resp, close) = match req.path() {
            "/conflicting-lengths" => (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".into(),
                true,
            ),
            "/conflicting-list" => (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!".into(),
                true,
            ),
            "/negative-length" => ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n".into(), true),
            // Not HTTP, and the connection stays open: the gateway must not wait for more.
            "/garbage" => ("this is not HTTP at all\r\n\r\n".into(), false),
            "/ssh" => ("SSH-2.0-OpenSSH_9.6\r\n".into(), false),
            "/129-fields" => (fields(129), true),
            "/128-fields" => (fields(128), false),
            "/huge-head" => (
                format!(
                    "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok",
                    "b".repeat(70 << 10)
                ),
                false,
            ),
            _ => (String::from_utf8(ok("fine")).unwrap(), false),
        };
        let mut steps = vec![Step::Send(resp.into_bytes())];
        if close {
            steps.push(Step::Close);
        }
        steps
    })
    .await;
    let env = gateway(&[("", &up)]).await;

    let mut c = Client::connect(env.addr).await;
    for path in [
        "/conflicting-lengths",
        "/conflicting-list",
        "/negative-length",
        "/garbage",
        "/ssh",
        "/129-fields",
        "/huge-head",
    ] {
        let r = c.request("GET", path).await;
        assert_502(&r, path);
        let r = c.request("GET", "/ok").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "fine"),
            "after {path}: {r:?}"
        );
    }
    // The limit is 128 fields: 128 pass, all of them.
    let r = c.request("GET", "/128-fields").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{r:?}");
    assert_eq!(r.header("x-h127"), Some("v127"), "{r:?}");
    assert_eq!(r.header("x-h1"), Some("v1"), "{r:?}");
}

/// No `Content-Length`, no `Transfer-Encoding`: the body runs until the upstream closes,
/// and the client gets all of it (written in several pieces, one larger than a read),
/// properly framed on its kept-alive connection; the closed upstream connection is not
/// reused.
#[tokio::test(flavor = "multi_thread")]
async fn body_delimited_by_the_upstream_closing_reaches_the_client_whole() {
    let big = pattern(100_000);
    let b = big.clone();
    let up = RawUpstream::start(move |req| {
        let version = if req.path() == "/http10" {
            "1.0"
        } else {
            "1.1"
        };
        vec![
            Step::Send(
                format!("HTTP/{version} 200 OK\r\nContent-Type: text/plain\r\n\r\nstart,")
                    .into_bytes(),
            ),
            Step::Send(b.clone().into_bytes()),
            Step::Send(b",end".to_vec()),
            Step::Close,
        ]
    })
    .await;
    let env = gateway(&[("", &up)]).await;
    let want = format!("start,{big},end");

    let mut c = Client::connect(env.addr).await;
    for (i, path) in ["/eof", "/eof", "/http10"].into_iter().enumerate() {
        let r = c.request("GET", path).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert!(
            r.body == want,
            "{path}: {} bytes instead of {}, ending {:?}",
            r.body.len(),
            want.len(),
            &r.body[r.body.len().saturating_sub(20)..]
        );
        assert_eq!(up.connections(), i + 1, "a closed connection is not reused");
    }
    let resp = http_client()
        .get(format!("http://{}/eof", env.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.text().await.unwrap() == want,
        "reqwest gets the whole body"
    );
}

/// The upstream gets well-framed requests: a known-length body with one correct
/// `Content-Length` and no `Transfer-Encoding`; a body of unknown length chunked, with
/// no `Content-Length`, decoding to what the client sent (an empty piece does not end
/// it early); no framing headers at all for a bodiless GET; `Content-Length: 0` for an
/// empty POST.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_receives_well_framed_requests() {
    let up = RawUpstream::start(|_| vec![Step::Send(ok("got"))]).await;
    let env = gateway(&[("", &up)]).await;
    let client = http_client();
    let url = |p: &str| format!("http://{}{p}", env.addr);

    // Known length.
    let body = pattern(100_000);
    let resp = client
        .post(url("/known?x=1"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let seen = up.last();
    assert_eq!(seen.request_line, "POST /known?x=1 HTTP/1.1");
    assert_eq!(seen.header_all("content-length"), ["100000"], "{seen:?}");
    assert!(seen.header_all("transfer-encoding").is_empty(), "{seen:?}");
    assert!(seen.body.as_deref() == Ok(body.as_bytes()), "body as sent");
    assert_eq!(seen.header_all("host"), [up.addr.to_string()], "{seen:?}");

    // Unknown length (a stream): chunked.
    let pieces: Vec<Vec<u8>> = vec![
        b"first,".to_vec(),
        Vec::new(),
        b"second,".to_vec(),
        pattern(50_000).into_bytes(),
        b",end".to_vec(),
    ];
    let expected: Vec<u8> = pieces.concat();
    let stream = futures_util::stream::iter(pieces.into_iter().map(Ok::<_, std::io::Error>));
    let resp = client
        .put(url("/stream"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let seen = up.last();
    assert_eq!(seen.request_line, "PUT /stream HTTP/1.1");
    assert_eq!(
        seen.header_all("transfer-encoding"),
        ["chunked"],
        "{seen:?}"
    );
    assert!(seen.header_all("content-length").is_empty(), "{seen:?}");
    match &seen.body {
        Ok(b) => assert!(
            *b == expected,
            "decoded {} bytes, expected {}",
            b.len(),
            expected.len()
        ),
        Err(e) => panic!("the chunked body was malformed: {e}"),
    }

    // No body.
    let resp = client.get(url("/nobody")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let seen = up.last();
    assert!(seen.header_all("content-length").is_empty(), "{seen:?}");
    assert!(seen.header_all("transfer-encoding").is_empty(), "{seen:?}");
    assert_eq!(seen.body.as_deref(), Ok(&b""[..]));

    // An empty POST.
    let resp = client.post(url("/empty")).body("").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let seen = up.last();
    assert_eq!(seen.header_all("content-length"), ["0"], "{seen:?}");
    assert!(seen.header_all("transfer-encoding").is_empty(), "{seen:?}");

    // All of it on one upstream connection: every body was framed exactly.
    assert_eq!(up.requests().len(), 4);
    assert_eq!(up.connections(), 1, "{:?}", up.requests());
}

const UPLOAD: usize = 16 << 20;

/// An upstream that reads only the request head, answers `413` and closes: at once
/// (`linger` false: with the body unread, the kernel resets the connection), or after
/// shutting down its side and discarding what still arrives (`linger` true, as nginx
/// does). Returns its address and how many requests it answered.
async fn early_413_upstream(linger: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = s.into_split();
                let mut wire = Wire::new(rd, None);
                if wire.head().await.is_none() {
                    return;
                }
                let body = r#"{"error":"too large"}"#;
                let resp = format!(
                    "HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                // Counted before the answer goes out, so the client never sees it first.
                count.fetch_add(1, Ordering::SeqCst);
                if wr.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                if linger {
                    let _ = wr.shutdown().await;
                    while wire.fill().await {
                        wire.buf.clear();
                    }
                }
            });
        }
    });
    (addr, answered)
}

/// The client uploads 16 MiB; the upstream answers 413 after reading only the head:
/// the client receives that 413 with its body, not a 502, whether the upstream resets
/// the connection or closes it gracefully.
///
/// The client is a raw socket that keeps writing while it reads: a client that stops
/// at the first failed write (reqwest/hyper, curl) may never read the answer, which
/// would test the client, not the gateway. On Linux, data that arrived before a reset
/// is still delivered to the reader, so the outcome does not depend on timing.
#[tokio::test(flavor = "multi_thread")]
async fn early_413_from_an_upstream_that_stops_reading_reaches_the_client() {
    let (reset, reset_n) = early_413_upstream(false).await;
    let (linger, linger_n) = early_413_upstream(true).await;
    let env = LocalGateway::start(
        Path::new(env!("CARGO_BIN_EXE_portico")),
        &format!(
            "upstreams:\n  reset: {{targets: [{{url: \"http://{reset}\"}}]}}\n  \
             linger: {{targets: [{{url: \"http://{linger}\"}}]}}\nroutes:\n  \
             - {{name: reset, paths: [\"/reset/*\"], upstream: reset}}\n  \
             - {{name: linger, paths: [\"/linger/*\"], upstream: linger}}\n"
        ),
    )
    .await;

    for (path, answered) in [("/reset/upload", &reset_n), ("/linger/upload", &linger_n)] {
        for round in 0..3 {
            let s = TcpStream::connect(env.addr).await.unwrap();
            let (rd, mut wr) = s.into_split();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {UPLOAD}\r\n\r\n"
            );
            let writer = tokio::spawn(async move {
                wr.write_all(head.as_bytes()).await?;
                let piece = vec![b'u'; 64 << 10];
                for _ in 0..UPLOAD / piece.len() {
                    wr.write_all(&piece).await?;
                }
                Ok::<_, std::io::Error>(wr)
            });
            let r = Wire::new(rd, Some(WAIT)).response(false).await;
            writer.abort();
            let r = r.unwrap_or_else(|e| panic!("{path} round {round}: {e}"));
            assert_eq!(r.status, 413, "{path} round {round}: {r:?}");
            assert_eq!(r.body, r#"{"error":"too large"}"#, "{r:?}");
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert_eq!(answered.load(Ordering::SeqCst), round + 1, "{path}");
        }
    }
}

/// The fields of an upstream's response as an HTTP/1.1 client gets them through a
/// route without policies (where Portico forwards the fields as they arrived, without
/// parsing them into a header map) and through the same route with a policy that
/// leaves responses alone (where they go through the map), and as an HTTP/2 client
/// gets them: the same fields either way. Framing and hop-by-hop fields (and those
/// `Connection` names) are not forwarded, the upstream's `Date` is kept (and not
/// doubled), its `X-Request-Id` gives way to the request's, repeated fields stay
/// repeated, and every line the client gets ends with CRLF, also when the upstream
/// ended its lines with a bare LF.
#[tokio::test(flavor = "multi_thread")]
async fn response_fields_are_the_same_with_and_without_a_header_map() {
    // Heads kept as bytes (a few runs of kept lines), and heads that take the map:
    // a `Connection` naming a field, `TE`, an empty value, more runs than are kept.
    let many: String = (0..12)
        .map(|i| format!("X-Many-{i}: v{i}\r\nKeep-Alive: timeout=5\r\n"))
        .collect();
    let cases: Vec<(&str, String)> = vec![
        (
            "/simple",
            "HTTP/1.1 200 OK\r\nServer: raw-upstream\r\nContent-Type: text/plain\r\n\
             Content-Length: 5\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\
             X-Spaces:   padded value \t \r\n\r\nhello"
                .to_string(),
        ),
        (
            "/hop",
            "HTTP/1.1 200 OK\r\nX-Before: 1\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\nX-Request-Id: upstream-id\r\nUpgrade: h2c\r\n\
             Date: Tue, 01 Jan 2030 00:00:00 GMT\r\nX-After: 2\r\nContent-Length: 5\r\n\r\nhello"
                .to_string(),
        ),
        (
            "/bare-lf",
            "HTTP/1.1 200 OK\nX-One: 1\nX-Two: 2\nContent-Length: 5\nX-Three: 3\n\nhello".to_string(),
        ),
        (
            "/chunked",
            "HTTP/1.1 200 OK\r\nX-Coded: yes\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n\
             5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"
                .to_string(),
        ),
        (
            "/named",
            "HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: secret\r\nX-Kept: 1\r\n\
             Content-Length: 5\r\n\r\nhello"
                .to_string(),
        ),
        (
            "/te",
            "HTTP/1.1 200 OK\r\nTE: trailers\r\nX-Kept: 1\r\nContent-Length: 5\r\n\r\nhello"
                .to_string(),
        ),
        (
            "/empty",
            "HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Kept: 1\r\nContent-Length: 5\r\n\r\nhello".to_string(),
        ),
        (
            "/many",
            format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 5\r\n\r\nhello"),
        ),
    ];
    let scripted: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(p, r)| (p.to_string(), r.clone().into_bytes()))
        .collect();
    let up = RawUpstream::start(move |req| {
        let path = req.path().trim_start_matches("/policy");
        match scripted.iter().find(|(p, _)| p == path) {
            Some((_, r)) => vec![Step::Send(r.clone())],
            None => vec![Step::Send(ok("unknown")), Step::Close],
        }
    })
    .await;
    let gw = plain_and_policy_gateway(&up).await;
    // The fields a client sees, in order, but for `Date` (the gateway's own differs
    // from one answer to the next).
    let comparable = |h: &[(String, String)]| -> Vec<(String, String)> {
        h.iter().filter(|(k, _)| k != "date").cloned().collect()
    };
    let mut c = Client::connect(gw.addr).await;
    let h2 = portico_test_support::h2c_client();
    for (path, _) in &cases {
        let mut seen = Vec::new();
        for prefix in ["", "/policy"] {
            c.send(
                format!("GET {prefix}{path} HTTP/1.1\r\nHost: gateway\r\nX-Request-Id: client-id\r\n\r\n")
                    .as_bytes(),
            )
            .await;
            let head = c.wire.head().await.expect("a response head");
            let lone_lf = head
                .bytes()
                .enumerate()
                .any(|(i, b)| b == b'\n' && (i == 0 || head.as_bytes()[i - 1] != b'\r'));
            assert!(
                !lone_lf,
                "{prefix}{path}: a line not ended by CRLF in {head:?}"
            );
            let (status, headers) = split_head(&head);
            assert_eq!(status, "HTTP/1.1 200 OK", "{prefix}{path}");
            let body = if is_chunked(&headers) {
                c.wire.chunked().await.unwrap()
            } else {
                let n: usize = first(&headers, "content-length")
                    .unwrap_or_else(|| panic!("{prefix}{path}: no length in {head:?}"))
                    .parse()
                    .unwrap();
                c.wire.take(n).await.unwrap()
            };
            assert_eq!(lossy(&body), "hello", "{prefix}{path}");
            assert_eq!(
                all(&headers, "x-request-id"),
                ["client-id"],
                "{prefix}{path}: {head:?}"
            );
            assert_eq!(all(&headers, "date").len(), 1, "{prefix}{path}: {head:?}");
            for gone in [
                "connection",
                "keep-alive",
                "proxy-connection",
                "upgrade",
                "te",
                "trailer",
                "x-hop",
            ] {
                assert!(
                    first(&headers, gone).is_none(),
                    "{prefix}{path}: {gone} in {head:?}"
                );
            }
            seen.push(headers);
        }
        assert_eq!(
            comparable(&seen[0]),
            comparable(&seen[1]),
            "{path}: without and with a header map"
        );
        // HTTP/2 (a header map, always): the same fields, names lower-cased.
        let r = h2
            .get(format!("http://{}{path}", gw.addr))
            .header("x-request-id", "client-id")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "h2 {path}");
        let mut h2_fields: Vec<(String, String)> = r
            .headers()
            .iter()
            .filter(|(k, _)| *k != "date")
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().trim().to_string()))
            .collect();
        let mut h1_fields: Vec<(String, String)> = comparable(&seen[0])
            .into_iter()
            .filter(|(k, _)| k != "transfer-encoding")
            .collect();
        h2_fields.sort();
        h1_fields.sort();
        // A chunked answer carries no length over HTTP/2.
        h1_fields.retain(|(k, _)| k != "content-length" || path != &"/chunked");
        h2_fields.retain(|(k, _)| k != "content-length" || path != &"/chunked");
        assert_eq!(h1_fields, h2_fields, "h2 {path}");
    }
    // What the kept fields say, spelled as the upstream spelled them.
    c.send(b"GET /hop HTTP/1.1\r\nHost: gateway\r\n\r\n").await;
    let head = c.wire.head().await.unwrap();
    assert!(head.contains("\r\nX-Before: 1\r\n"), "{head:?}");
    assert!(
        head.contains("\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n"),
        "{head:?}"
    );
    assert!(!head.contains("upstream-id"), "{head:?}");
    c.wire.take(5).await.unwrap();
    c.send(b"GET /simple HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await;
    let head = c.wire.head().await.unwrap();
    let (_, headers) = split_head(&head);
    assert_eq!(all(&headers, "set-cookie"), ["a=1", "b=2"], "{head:?}");
    assert_eq!(
        first(&headers, "x-spaces"),
        Some("padded value"),
        "{head:?}"
    );
    c.wire.take(5).await.unwrap();
    // One connection upstream carried all of it (each answer framed correctly).
    assert_eq!(up.connections(), 1);
}

/// The fields an upstream gets from an HTTP/1.1 client through a route without
/// policies (where Portico sends the client's field lines as they came, without a
/// header map) and through the same route with a policy that leaves requests alone
/// (where they go through the map): the same fields either way. Hop-by-hop fields (and
/// those `Connection` names) are not forwarded, a client's `X-Forwarded-*` and identity
/// headers are replaced or removed, `TE: trailers` is kept, repeated fields stay
/// repeated and in order, bodies keep their framing, and every line ends with CRLF.
#[tokio::test(flavor = "multi_thread")]
async fn request_fields_are_the_same_with_and_without_a_header_map() {
    let up = RawUpstream::start(|_| vec![Step::Send(ok("done"))]).await;
    let gw = plain_and_policy_gateway(&up).await;
    // (what, the request after its request line, the body the upstream must get)
    let cases: [(&str, &str, &str); 9] = [
        (
            "plain fields",
            "Host: gateway\r\nUser-Agent: test/1\r\nAccept: */*\r\nX-Custom:  spaced \r\n\
             Authorization: Bearer abc\r\nCookie: a=1; b=2\r\nX-Multi: a\r\nX-Multi: b\r\n\
             X-Request-Id: client-id\r\n\r\n",
            "",
        ),
        (
            "hop-by-hop",
            "Host: gateway\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\nX-After: 1\r\nX-Request-Id: client-id\r\n\r\n",
            "",
        ),
        (
            "forwarded from an untrusted client",
            "Host: gateway\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Host: evil.example\r\n\
             X-Forwarded-Proto: https\r\nX-Request-Id: client-id\r\n\r\n",
            "",
        ),
        (
            "identity headers",
            "Host: gateway\r\nX-Consumer-Name: admin\r\nX-Consumer_Groups: root\r\n\
             X-Kept: 1\r\nX-Request-Id: client-id\r\n\r\n",
            "",
        ),
        (
            "a field named by Connection",
            "Host: gateway\r\nConnection: X-Hop\r\nX-Hop: secret\r\nX-Kept: 1\r\n\
             X-Request-Id: client-id\r\n\r\n",
            "",
        ),
        (
            "TE and Upgrade",
            "Host: gateway\r\nTE: trailers, deflate\r\nUpgrade: websocket\r\nX-Kept: 1\r\n\
             X-Request-Id: client-id\r\n\r\n",
            "",
        ),
        (
            "bare LF",
            "Host: gateway\nX-One: 1\nX-Two: 2\nX-Request-Id: client-id\n\n",
            "",
        ),
        (
            "a body with a length",
            "Host: gateway\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\
             Expect: 100-continue\r\nX-Request-Id: client-id\r\n\r\nhello",
            "hello",
        ),
        (
            "a chunked body",
            "Host: gateway\r\nTransfer-Encoding: chunked\r\nX-Request-Id: client-id\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n",
            "hello",
        ),
    ];
    let mut c = Client::connect(gw.addr).await;
    for (what, rest, body) in cases {
        let mut seen = Vec::new();
        for prefix in ["", "/policy"] {
            let method = if body.is_empty() { "GET" } else { "POST" };
            c.send(format!("{method} {prefix}/x?q=1 HTTP/1.1\r\n{rest}").as_bytes())
                .await;
            if rest.contains("100-continue") {
                let interim = c.wire.head().await.unwrap();
                assert!(interim.starts_with("HTTP/1.1 100"), "{what}: {interim:?}");
            }
            let r = c.wire.response(false).await.unwrap();
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, "done"),
                "{what} {prefix}"
            );
            let req = up.last();
            assert_eq!(
                req.request_line,
                format!("{method} /x?q=1 HTTP/1.1"),
                "{what}"
            );
            assert_eq!(req.body.as_deref(), Ok(body.as_bytes()), "{what} {prefix}");
            let lone_lf = req
                .head
                .bytes()
                .enumerate()
                .any(|(i, b)| b == b'\n' && (i == 0 || req.head.as_bytes()[i - 1] != b'\r'));
            assert!(!lone_lf, "{what} {prefix}: {:?}", req.head);
            for gone in [
                "connection",
                "keep-alive",
                "proxy-connection",
                "upgrade",
                "x-hop",
                "x-consumer-name",
                "x-consumer_groups",
                "expect",
            ] {
                assert!(
                    first(&req.headers, gone).is_none(),
                    "{what} {prefix}: {gone} in {:?}",
                    req.head
                );
            }
            assert_eq!(
                req.header_all("x-forwarded-for"),
                ["127.0.0.1"],
                "{what} {prefix}"
            );
            assert_eq!(
                req.header_all("x-forwarded-proto"),
                ["http"],
                "{what} {prefix}"
            );
            assert_eq!(
                req.header_all("x-forwarded-host"),
                ["gateway"],
                "{what} {prefix}"
            );
            assert_eq!(
                req.header_all("x-request-id"),
                ["client-id"],
                "{what} {prefix}"
            );
            assert_eq!(req.header_all("host").len(), 1, "{what} {prefix}");
            seen.push(req);
        }
        // The same fields (names compared lower-cased: the map lower-cases them).
        let mut a = seen[0].headers.clone();
        let mut b = seen[1].headers.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{what}: without and with a header map");
        if what == "plain fields" {
            // Without the map the client's lines go as they were written.
            assert!(
                seen[0].head.contains("\r\nX-Custom:  spaced\r\n"),
                "{:?}",
                seen[0].head
            );
            assert!(
                seen[1].head.contains("\r\nx-custom: spaced\r\n"),
                "{:?}",
                seen[1].head
            );
            assert_eq!(seen[0].header_all("x-multi"), ["a", "b"]);
            assert_eq!(first(&seen[0].headers, "authorization"), Some("Bearer abc"));
        }
        if what == "TE and Upgrade" {
            assert_eq!(seen[0].header_all("te"), ["trailers"]);
        }
    }
}
