//! `compression`: gzip, brotli or zstd, negotiated from the request's
//! `Accept-Encoding` (RFC 9110 §12.5.3), applied as the response streams: each body
//! chunk is compressed and flushed as it comes (so streamed answers keep flowing),
//! never buffered whole. Runs on every answer of the route (the upstream's, a
//! policy's such as a cache hit, or the gateway's own), last among the response
//! phases.
//!
//! Not compressed: a response that already has a `Content-Encoding`, says
//! `Cache-Control: no-transform`, has no body (HEAD, 1xx, 204, 304), is a range (206),
//! is shorter than `min_size` (when its length is known), or whose `Content-Type` is
//! not in `content_types`.

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Request;
use http_body::{Body as _, Frame, SizeHint};
use portico_config::units::ByteSize;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::body::BoxError;
use crate::ctx::Ctx;
use crate::policy::{Policy, Step};
use crate::registry::SettingsErrors;
use crate::Body;
use portico_config::KeyPath;

/// `compression` settings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The encodings offered, in order of preference when the client likes several
    /// equally (default `[br, zstd, gzip]`).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// Responses shorter than this (when their length is known) are sent as they are
    /// (default 1KiB).
    #[serde(default = "default_min_size")]
    pub min_size: ByteSize,
    /// Media types compressed: exact (`application/json`) or `type/*` (default: text,
    /// JSON, JavaScript, XML, SVG, WebAssembly and a few more; see docs/traffic.md).
    #[serde(default = "default_types")]
    pub content_types: Vec<String>,
    /// `fastest`, `default` (a level fit for compressing on the fly) or `best`.
    #[serde(default)]
    pub level: Level,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    Gzip,
    Br,
    Zstd,
}

impl Algorithm {
    fn token(self) -> &'static str {
        match self {
            Algorithm::Gzip => "gzip",
            Algorithm::Br => "br",
            Algorithm::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Fastest,
    #[default]
    Default,
    Best,
}

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::Br, Algorithm::Zstd, Algorithm::Gzip]
}
fn default_min_size() -> ByteSize {
    ByteSize(1024)
}
fn default_types() -> Vec<String> {
    [
        "text/*",
        "application/json",
        "application/*+json",
        "application/javascript",
        "application/xml",
        "application/*+xml",
        "application/wasm",
        "application/x-ndjson",
        "image/svg+xml",
        "font/ttf",
        "font/otf",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The compiled policy.
pub struct Compression {
    algorithms: Vec<Algorithm>,
    min_size: u64,
    /// (type, subtype) patterns, lower-cased; `*` as the subtype matches any, and
    /// `*+json` any subtype ending in `+json`.
    types: Vec<(String, String)>,
    level: Level,
    compressed: [AtomicU64; 3],
}

/// The encoding chosen for this request (in `Ctx::extensions`).
#[derive(Debug, Clone, Copy)]
struct Chosen(Option<Algorithm>);

impl Compression {
    pub fn new(s: Settings) -> Result<Compression, SettingsErrors> {
        let mut errs: SettingsErrors = Vec::new();
        if s.algorithms.is_empty() {
            errs.push((
                KeyPath::root().key("algorithms"),
                "give at least one of gzip, br, zstd".into(),
            ));
        }
        let mut types = Vec::new();
        for (i, t) in s.content_types.iter().enumerate() {
            let t = t.trim().to_ascii_lowercase();
            match t.split_once('/') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && a != "*" => {
                    types.push((a.to_string(), b.to_string()))
                }
                _ => errs.push((
                    KeyPath::root().key("content_types").index(i),
                    format!("`{t}` is not a media type like `text/*` or `application/json`"),
                )),
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Compression {
            algorithms: s.algorithms,
            min_size: s.min_size.0,
            types,
            level: s.level,
            compressed: Default::default(),
        })
    }

    /// The best encoding both sides accept, by the client's q-values, then ours.
    fn negotiate(&self, accept: &str) -> Option<Algorithm> {
        let mut best: Option<(Algorithm, f32, usize)> = None;
        let mut star: Option<f32> = None;
        let mut listed: Vec<(&str, f32)> = Vec::new();
        for item in accept.split(',') {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or("").trim();
            if token.is_empty() {
                continue;
            }
            let mut q = 1.0f32;
            for p in parts {
                if let Some(v) = p
                    .trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
                {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
            if token == "*" {
                star = Some(q);
            } else {
                listed.push((token, q));
            }
        }
        for (rank, a) in self.algorithms.iter().enumerate() {
            let q = listed
                .iter()
                .find(|(t, _)| t.eq_ignore_ascii_case(a.token()))
                .map(|(_, q)| *q)
                .or(star)
                .unwrap_or(0.0);
            if q > 0.0 && best.is_none_or(|(_, bq, br)| q > bq || (q == bq && rank < br)) {
                best = Some((*a, q, rank));
            }
        }
        best.map(|(a, _, _)| a)
    }

    fn compressible(&self, content_type: Option<&HeaderValue>) -> bool {
        let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let Some((a, b)) = essence.split_once('/') else {
            return false;
        };
        self.types.iter().any(|(ta, tb)| {
            ta == a
                && (tb == b
                    || tb == "*"
                    || tb
                        .strip_prefix('*')
                        .is_some_and(|suffix| b.ends_with(suffix)))
        })
    }
}

impl Policy for Compression {
    fn name(&self) -> &'static str {
        "compression"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let mut chosen = None;
        if req.method() != http::Method::HEAD {
            let mut values = req.headers().get_all(header::ACCEPT_ENCODING).iter();
            chosen = match (values.next(), values.next()) {
                (None, _) => None,
                (Some(one), None) => one.to_str().ok().and_then(|a| self.negotiate(a)),
                (Some(_), Some(_)) => {
                    let all: Vec<&str> = req
                        .headers()
                        .get_all(header::ACCEPT_ENCODING)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    self.negotiate(&all.join(","))
                }
            };
        }
        ctx.extensions.insert(Chosen(chosen));
        Step::cont()
    }

    fn finishes_response(&self) -> bool {
        true
    }

    fn finish_response(&self, ctx: &mut Ctx, resp: &mut http::response::Parts, body: Body) -> Body {
        let h = &mut resp.headers;
        if !self.compressible(h.get(header::CONTENT_TYPE)) {
            return body;
        }
        // The answer depends on Accept-Encoding, whether compressed or not.
        if !h.get_all(header::VARY).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.to_ascii_lowercase().contains("accept-encoding") || s.trim() == "*"
            })
        }) {
            h.append(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        let Some(Chosen(Some(alg))) = ctx.extensions.get::<Chosen>().copied() else {
            return body;
        };
        let status = resp.status;
        if status.is_informational()
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED
            || status == http::StatusCode::PARTIAL_CONTENT
            || body.is_end_stream()
            || h.get(header::CONTENT_ENCODING)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
            || h.get_all(header::CACHE_CONTROL).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|s| s.to_ascii_lowercase().contains("no-transform"))
            })
        {
            return body;
        }
        let len = body.size_hint().exact().or_else(|| {
            h.get(header::CONTENT_LENGTH)?
                .to_str()
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        if len.is_some_and(|n| n < self.min_size) {
            return body;
        }
        let Some(encoder) = Encoder::new(alg, self.level) else {
            return body;
        };
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(alg.token()),
        );
        h.remove(header::CONTENT_LENGTH);
        h.remove(header::ACCEPT_RANGES);
        // The bytes change: a strong validator would now be wrong.
        if let Some(etag) = h.get(header::ETAG).and_then(|v| v.to_str().ok()) {
            if !etag.starts_with("W/") {
                if let Ok(weak) = HeaderValue::from_str(&format!("W/{etag}")) {
                    h.insert(header::ETAG, weak);
                }
            }
        }
        let slot = match alg {
            Algorithm::Gzip => 0,
            Algorithm::Br => 1,
            Algorithm::Zstd => 2,
        };
        self.compressed[slot].fetch_add(1, Ordering::Relaxed);
        Body::boxed(Compressed {
            inner: body,
            encoder: Some(encoder),
            trailers: None,
        })
    }

    fn metrics(&self, out: &mut String) {
        out.push_str("# HELP portico_compressed_responses_total Responses compressed by the compression policy.\n# TYPE portico_compressed_responses_total counter\n");
        for (i, a) in ["gzip", "br", "zstd"].iter().enumerate() {
            out.push_str(&format!(
                "portico_compressed_responses_total{{encoding=\"{a}\"}} {}\n",
                self.compressed[i].load(Ordering::Relaxed)
            ));
        }
    }
}

/// A streaming encoder writing into a buffer that is drained after each chunk.
enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    fn new(alg: Algorithm, level: Level) -> Option<Encoder> {
        Some(match alg {
            Algorithm::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(match level {
                    Level::Fastest => 1,
                    Level::Default => 5,
                    Level::Best => 9,
                }),
            )),
            Algorithm::Br => Encoder::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                match level {
                    Level::Fastest => 1,
                    Level::Default => 4,
                    Level::Best => 9,
                },
                22,
            ))),
            Algorithm::Zstd => Encoder::Zstd(
                zstd::stream::write::Encoder::new(
                    Vec::new(),
                    match level {
                        Level::Fastest => 1,
                        Level::Default => 3,
                        Level::Best => 12,
                    },
                )
                .ok()?,
            ),
        })
    }

    /// Compress `data` and flush, returning what came out.
    fn chunk(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
        match self {
            Encoder::Gzip(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
            Encoder::Br(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
            Encoder::Zstd(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
        }
    }

    /// End the stream, returning the last bytes.
    fn finish(self) -> std::io::Result<Bytes> {
        match self {
            Encoder::Gzip(e) => e.finish().map(Bytes::from),
            Encoder::Br(e) => Ok(Bytes::from(e.into_inner())),
            Encoder::Zstd(e) => e.finish().map(Bytes::from),
        }
    }
}

/// A body compressed as it streams.
struct Compressed {
    inner: Body,
    encoder: Option<Encoder>,
    /// Trailers that arrived, sent after the encoder's last bytes.
    trailers: Option<Frame<Bytes>>,
}

impl http_body::Body for Compressed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(enc) = this.encoder.as_mut() else {
                return Poll::Ready(this.trailers.take().map(Ok));
            };
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    this.encoder = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => {
                        let out = enc.chunk(&d).map_err(|e| Box::new(e) as BoxError)?;
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    // Trailers end the data: the encoder's last bytes, then them.
                    Err(frame) => {
                        this.trailers = Some(frame);
                        if let Some(enc) = this.encoder.take() {
                            let last = enc.finish().map_err(|e| Box::new(e) as BoxError)?;
                            if !last.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(last))));
                            }
                        }
                        return Poll::Ready(this.trailers.take().map(Ok));
                    }
                },
                Poll::Ready(None) => {
                    let Some(enc) = this.encoder.take() else {
                        return Poll::Ready(None);
                    };
                    let last = enc.finish().map_err(|e| Box::new(e) as BoxError)?;
                    return Poll::Ready(if last.is_empty() {
                        None
                    } else {
                        Some(Ok(Frame::data(last)))
                    });
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read;

    fn policy() -> Compression {
        Compression::new(serde_json::from_str("{}").unwrap()).unwrap()
    }

    #[test]
    fn negotiation_follows_q_values_then_our_order() {
        let p = policy();
        assert_eq!(p.negotiate("gzip, deflate, br"), Some(Algorithm::Br));
        assert_eq!(p.negotiate("gzip;q=1, br;q=0.5"), Some(Algorithm::Gzip));
        assert_eq!(p.negotiate("zstd, gzip"), Some(Algorithm::Zstd));
        assert_eq!(p.negotiate("br;q=0, gzip"), Some(Algorithm::Gzip));
        assert_eq!(p.negotiate("identity"), None);
        assert_eq!(p.negotiate(""), None);
        assert_eq!(p.negotiate("*"), Some(Algorithm::Br));
        assert_eq!(p.negotiate("*;q=0.1, gzip;q=0.5"), Some(Algorithm::Gzip));
        assert_eq!(p.negotiate("deflate"), None);
    }

    #[test]
    fn content_types_match_exactly_by_family_or_suffix() {
        let p = policy();
        let ct = |s: &'static str| HeaderValue::from_static(s);
        assert!(p.compressible(Some(&ct("text/html; charset=utf-8"))));
        assert!(p.compressible(Some(&ct("application/json"))));
        assert!(p.compressible(Some(&ct("application/problem+json"))));
        assert!(!p.compressible(Some(&ct("image/png"))));
        assert!(!p.compressible(Some(&ct("application/octet-stream"))));
        assert!(!p.compressible(None));
    }

    fn roundtrip(alg: Algorithm, chunks: &[&[u8]]) -> Vec<u8> {
        let mut e = Encoder::new(alg, Level::Default).unwrap();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&e.chunk(c).unwrap());
        }
        out.extend_from_slice(&e.finish().unwrap());
        let mut plain = Vec::new();
        match alg {
            Algorithm::Gzip => {
                flate2::read::GzDecoder::new(&out[..])
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Algorithm::Br => {
                brotli::Decompressor::new(&out[..], 4096)
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Algorithm::Zstd => {
                plain = zstd::stream::decode_all(&out[..]).unwrap();
            }
        }
        plain
    }

    #[test]
    fn each_encoding_streams_and_round_trips() {
        let text = b"{\"items\": [1, 2, 3], \"name\": \"portico\"}".repeat(200);
        for alg in [Algorithm::Gzip, Algorithm::Br, Algorithm::Zstd] {
            let (a, b) = text.split_at(1000);
            assert_eq!(roundtrip(alg, &[a, b]), text, "{alg:?}");
        }
    }
}
