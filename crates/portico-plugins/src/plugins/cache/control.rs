//! HTTP caching semantics (RFC 9111, RFC 5861): `Cache-Control` parsing, how long a
//! response stays fresh, and whether a client's conditional request matches an entry.
//! Pure functions over headers and times (milliseconds), so tests drive the clock.

use http::header::{
    HeaderMap, CACHE_CONTROL, DATE, ETAG, EXPIRES, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
    PRAGMA,
};

/// The directives of every `Cache-Control` field of a message. Unknown directives are
/// ignored; `private="x"` and `no-cache="x"` (with field names) count as the plain ones.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub must_revalidate: bool,
    /// Seconds. An unparsable value counts as 0 (stale), as RFC 9111 §4.2.1 asks.
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl CacheControl {
    pub fn parse(h: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for v in h.get_all(CACHE_CONTROL) {
            let Ok(line) = v.to_str() else { continue };
            for d in line.split(',') {
                let (name, value) = match d.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                    None => (d.trim(), None),
                };
                let secs = || {
                    Some(value.map_or(0, |v| {
                        if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() {
                            // Too large to count: as good as forever (RFC 9111 §1.2.2).
                            v.parse::<u64>().unwrap_or(u64::from(u32::MAX))
                        } else {
                            0
                        }
                    }))
                };
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    "max-age" => cc.max_age = secs(),
                    "s-maxage" => cc.s_maxage = secs(),
                    "stale-while-revalidate" => cc.stale_while_revalidate = secs(),
                    "stale-if-error" => cc.stale_if_error = secs(),
                    _ => {}
                }
            }
        }
        cc
    }

    /// A request's `Cache-Control` (or HTTP/1.0 `Pragma: no-cache`): whether the client
    /// asks for a fresh answer from the upstream (`no-cache`, `max-age=0`).
    pub fn request_wants_fresh(&self, h: &HeaderMap) -> bool {
        self.no_cache
            || self.max_age == Some(0)
            || h.get_all(PRAGMA)
                .iter()
                .any(|v| v.to_str().is_ok_and(|s| s.contains("no-cache")))
    }
}

/// How long a stored response may be used, in milliseconds from when it was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Fresh for this long (after the age it already had).
    pub ttl_ms: u64,
    /// Then usable while revalidating in the background for this long.
    pub swr_ms: u64,
    /// Then (from the end of freshness) usable when the upstream fails for this long.
    pub sie_ms: u64,
}

/// Policy defaults that apply when the response does not say.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub ttl_ms: u64,
    pub swr_ms: u64,
    pub sie_ms: u64,
}

/// The freshness lifetime of a response (RFC 9111 §4.2.1): `s-maxage`, else
/// `max-age`, else `Expires` minus `Date` (or minus now without a `Date`), else the
/// policy's `default_ttl`. `no-cache` makes it 0 (stored, but revalidated before every
/// use). The stale windows come from the response's `stale-while-revalidate` and
/// `stale-if-error`, else the policy's defaults; `must-revalidate` turns the defaults off.
pub fn lifetime(cc: &CacheControl, h: &HeaderMap, now_ms: u64, d: Defaults) -> Lifetime {
    let ttl_ms = if cc.no_cache {
        0
    } else if let Some(s) = cc.s_maxage.or(cc.max_age) {
        s.saturating_mul(1000)
    } else if let Some(exp) = h.get(EXPIRES) {
        // An invalid date (e.g. `0`) means "already expired".
        match date_ms(exp) {
            Some(exp) => {
                let base = h.get(DATE).and_then(date_ms).unwrap_or(now_ms);
                exp.saturating_sub(base)
            }
            None => 0,
        }
    } else {
        d.ttl_ms
    };
    let (dswr, dsie) = if cc.must_revalidate {
        (0, 0)
    } else {
        (d.swr_ms, d.sie_ms)
    };
    Lifetime {
        ttl_ms,
        swr_ms: cc
            .stale_while_revalidate
            .map_or(dswr, |s| s.saturating_mul(1000)),
        sie_ms: cc.stale_if_error.map_or(dsie, |s| s.saturating_mul(1000)),
    }
}

/// The `Age` a response arrived with, in milliseconds.
pub fn initial_age_ms(h: &HeaderMap) -> u64 {
    h.get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0, |s| s.saturating_mul(1000))
}

/// An HTTP date (any of the three formats of RFC 9110 §5.6.7) in ms since the epoch.
pub fn date_ms(v: &http::HeaderValue) -> Option<u64> {
    let t = httpdate::parse_http_date(v.to_str().ok()?.trim()).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

/// Whether a client's conditional request is satisfied by a stored response with
/// these headers, so `304 Not Modified` is the answer (RFC 9110 §13.2.2): with
/// `If-None-Match`, a weak match of any listed tag (or `*`); otherwise with
/// `If-Modified-Since`, a `Last-Modified` no later than it.
pub fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let inm: Vec<&str> = req
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !inm.is_empty() {
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return inm.iter().any(|l| l.trim() == "*");
        };
        let etag = weak(etag);
        return inm
            .iter()
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .any(|t| t == "*" || weak(t) == etag);
    }
    match (
        req.get(IF_MODIFIED_SINCE).and_then(date_ms),
        stored.get(LAST_MODIFIED).and_then(date_ms),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

fn weak(tag: &str) -> &str {
    tag.trim().strip_prefix("W/").unwrap_or(tag.trim())
}

/// Whether the request is conditional (`If-None-Match` or `If-Modified-Since`).
pub fn is_conditional(req: &HeaderMap) -> bool {
    req.contains_key(IF_NONE_MATCH) || req.contains_key(IF_MODIFIED_SINCE)
}
