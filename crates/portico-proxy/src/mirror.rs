//! Traffic mirroring (`mirror:` on a route): a sampled copy of a request goes to a
//! shadow upstream in the background. The client's request never waits for it and
//! never fails because of it: the copy's body is collected as the primary request's
//! body streams through (a tee, bounded by `max_body`), and the copy is sent when that
//! body has ended. With `compare`, the primary's answer is collected the same way as
//! it streams to the client, and the two answers are diffed (status, chosen headers,
//! JSON bodies minus ignored pointers); results are counted as metrics and a sampled
//! few mismatches logged.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Response};
use http_body::Body as _;
use portico_config::model::Timeouts;
use portico_config::split::Mirror as MirrorConfig;
use portico_plugins::body::{CopySink, Tee};
use portico_plugins::Body;
use portico_upstream::{now_ms, Overlay, Upstream};

use crate::subrequest::{send_once, Answer, Sub};
use serde_json::Value;
use tokio::sync::oneshot;

/// Counters of one route's mirror, kept across reloads (by route name).
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Copies sent that got an answer.
    pub sent: AtomicU64,
    /// Copies sent that got no answer (no target, connection failed, timeout).
    pub failed: AtomicU64,
    /// Not mirrored: `max_in_flight` copies already in flight.
    pub skipped_busy: AtomicU64,
    /// Not mirrored: the body was larger than `max_body` (or its end never came).
    pub skipped_body: AtomicU64,
    pub matched: AtomicU64,
    pub mismatched: AtomicU64,
    /// A comparison that could not be made (an answer missing or too large).
    pub incomplete: AtomicU64,
    pub mismatch_status: AtomicU64,
    pub mismatch_headers: AtomicU64,
    pub mismatch_body: AtomicU64,
}

/// A compiled `compare`.
struct Compare {
    status: bool,
    headers: Vec<HeaderName>,
    body: bool,
    /// Pointers split into unescaped segments (`*`: any).
    ignore: Vec<Vec<String>>,
    max_body: u64,
    log_per_minute: u32,
    /// The minute (since the clock's start) and the mismatches logged in it.
    logged: AtomicU64,
}

/// A compiled `mirror`.
pub struct Mirror {
    upstream: Arc<Upstream>,
    timeouts: Timeouts,
    /// Requests mirrored per 2^32 (from `percent`).
    threshold: u64,
    max_body: u64,
    max_in_flight: u32,
    in_flight: Arc<AtomicU32>,
    compare: Option<Arc<Compare>>,
    route: Arc<str>,
    pub stats: Arc<MirrorStats>,
}

/// What a mirrored request leaves for its primary's answer.
pub struct Pending {
    /// Where the primary's answer goes (with `compare`).
    primary: Option<(oneshot::Sender<Answer>, u64)>,
}

impl Mirror {
    pub fn new(
        cfg: &MirrorConfig,
        upstream: Arc<Upstream>,
        timeouts: Timeouts,
        route: Arc<str>,
        stats: Arc<MirrorStats>,
    ) -> Mirror {
        let compare = cfg.compare.as_ref().map(|c| {
            Arc::new(Compare {
                status: c.status,
                headers: c
                    .headers
                    .iter()
                    .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                    .collect(),
                body: c.body,
                ignore: c.ignore.iter().map(|p| pointer_segments(p)).collect(),
                max_body: c.max_body.0,
                log_per_minute: c.log_per_minute,
                logged: AtomicU64::new(0),
            })
        });
        Mirror {
            upstream,
            timeouts,
            threshold: ((cfg.percent.clamp(0.0, 100.0) / 100.0) * (1u64 << 32) as f64) as u64,
            max_body: cfg.max_body.0,
            max_in_flight: cfg.max_in_flight,
            in_flight: Arc::new(AtomicU32::new(0)),
            compare,
            route,
            stats,
        }
    }

    /// Maybe mirror this request: `parts` and `overlay` as they go upstream, `body`
    /// the request body, returned (wrapped in a tee when a copy is being made).
    pub fn begin(
        &self,
        parts: &http::request::Parts,
        overlay: &Overlay,
        body: Body,
        known_length: Option<u64>,
    ) -> (Body, Option<Pending>) {
        if u64::from(fastrand::u32(..)) >= self.threshold {
            return (body, None);
        }
        let (body, body_rx) = if body.is_end_stream() {
            (body, None)
        } else if known_length.is_some_and(|n| n <= self.max_body) {
            let (tx, rx) = oneshot::channel();
            (
                Body::boxed(Tee::new(body, self.max_body, CopyTo(tx))),
                Some(rx),
            )
        } else {
            self.stats.skipped_body.fetch_add(1, Ordering::Relaxed);
            return (body, None);
        };
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.stats.skipped_busy.fetch_add(1, Ordering::Relaxed);
            // The tee (if any) just passes the body through; its copy is dropped.
            return (body, None);
        }
        let (primary, primary_rx) = match &self.compare {
            Some(c) => {
                let (tx, rx) = oneshot::channel();
                (Some((tx, c.max_body)), Some(rx))
            }
            None => (None, None),
        };
        let copy = Copy {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            overlay: overlay.clone(),
        };
        let job = Job {
            upstream: self.upstream.clone(),
            timeouts: self.timeouts,
            in_flight: self.in_flight.clone(),
            compare: self.compare.clone(),
            stats: self.stats.clone(),
            route: self.route.clone(),
        };
        tokio::spawn(job.run(copy, body_rx, primary_rx));
        (body, Some(Pending { primary }))
    }
}

impl Pending {
    /// The primary's answer: with `compare`, its body is collected as it streams to
    /// the client and handed to the comparison when it ends.
    pub fn primary(self, resp: Response<Body>) -> Response<Body> {
        let Some((tx, max)) = self.primary else {
            return resp;
        };
        let (parts, body) = resp.into_parts();
        let (btx, brx) = oneshot::channel();
        let body = if body.is_end_stream() {
            let _ = btx.send(Some(Bytes::new()));
            body
        } else {
            Body::boxed(Tee::new(body, max, CopyTo(btx)))
        };
        let (status, headers) = (parts.status, parts.headers.clone());
        tokio::spawn(async move {
            let body = brx.await.ok().flatten();
            let _ = tx.send(Answer {
                status,
                headers,
                body,
            });
        });
        Response::from_parts(parts, body)
    }
}

/// The copy of the request head.
struct Copy {
    method: http::Method,
    uri: http::Uri,
    headers: HeaderMap,
    overlay: Overlay,
}

/// The background side of one mirrored request.
struct Job {
    upstream: Arc<Upstream>,
    timeouts: Timeouts,
    in_flight: Arc<AtomicU32>,
    compare: Option<Arc<Compare>>,
    stats: Arc<MirrorStats>,
    route: Arc<str>,
}

impl Job {
    async fn run(
        self,
        copy: Copy,
        body_rx: Option<oneshot::Receiver<Option<Bytes>>>,
        primary_rx: Option<oneshot::Receiver<Answer>>,
    ) {
        let answer = self.send(copy, body_rx).await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let (Some(c), Some(rx)) = (&self.compare, primary_rx) else {
            return;
        };
        let (Some(mirror), Ok(primary)) = (answer, rx.await) else {
            self.stats.incomplete.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match c.diff(&primary, &mirror) {
            None => {
                self.stats.incomplete.fetch_add(1, Ordering::Relaxed);
            }
            Some(diffs) if diffs.is_empty() => {
                self.stats.matched.fetch_add(1, Ordering::Relaxed);
            }
            Some(diffs) => {
                self.stats.mismatched.fetch_add(1, Ordering::Relaxed);
                for d in &diffs {
                    match d {
                        Diff::Status => &self.stats.mismatch_status,
                        Diff::Header(_) => &self.stats.mismatch_headers,
                        Diff::Body(_) => &self.stats.mismatch_body,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                }
                if c.may_log() {
                    let what: Vec<String> = diffs
                        .iter()
                        .map(|d| match d {
                            Diff::Status => format!(
                                "status {} vs {}",
                                primary.status.as_u16(),
                                mirror.status.as_u16()
                            ),
                            Diff::Header(h) => format!("header {h}"),
                            Diff::Body(at) => format!("body at {at}"),
                        })
                        .collect();
                    tracing::warn!(route = %self.route, mirror = %self.upstream.name, differences = %what.join(", "), "the mirror's answer differs from the primary's");
                }
            }
        }
    }

    /// Send the copy; its answer (body bounded for comparison), or `None`.
    async fn send(
        &self,
        copy: Copy,
        body_rx: Option<oneshot::Receiver<Option<Bytes>>>,
    ) -> Option<Answer> {
        let body = match body_rx {
            None => Body::Empty,
            Some(rx) => match rx.await {
                Ok(Some(b)) => Body::full(b),
                _ => {
                    self.stats.skipped_body.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            },
        };
        let sub = Sub {
            method: copy.method,
            uri: copy.uri,
            headers: copy.headers,
            overlay: copy.overlay,
            body,
        };
        // The answer is read (and dropped without `compare`) so the connection is reused.
        let max = self.compare.as_ref().map_or(1 << 20, |c| c.max_body);
        match send_once(
            &self.upstream,
            sub,
            self.timeouts.connect.0,
            self.timeouts.request.0,
            max,
        )
        .await
        {
            Ok(a) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                Some(a)
            }
            Err(e) => {
                tracing::debug!(route = %self.route, upstream = %self.upstream.name, error = %e, "mirror request failed");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// One difference between the answers.
#[derive(Debug, PartialEq)]
enum Diff {
    Status,
    Header(HeaderName),
    /// The JSON pointer where the bodies first differ (`""`: the whole body).
    Body(String),
}

impl Compare {
    /// The differences; `None` when a body needed for the comparison is missing.
    fn diff(&self, a: &Answer, b: &Answer) -> Option<Vec<Diff>> {
        let mut out = Vec::new();
        if self.status && a.status != b.status {
            out.push(Diff::Status);
        }
        for h in &self.headers {
            let va: Vec<_> = a.headers.get_all(h).iter().collect();
            let vb: Vec<_> = b.headers.get_all(h).iter().collect();
            if va != vb {
                out.push(Diff::Header(h.clone()));
            }
        }
        if self.body {
            let (ba, bb) = (a.body.as_ref()?, b.body.as_ref()?);
            if let Some(at) = self.body_diff(ba, bb) {
                out.push(Diff::Body(at));
            }
        }
        Some(out)
    }

    /// Where two bodies differ: as JSON when both parse, else as bytes.
    fn body_diff(&self, a: &[u8], b: &[u8]) -> Option<String> {
        match (
            serde_json::from_slice::<Value>(a),
            serde_json::from_slice::<Value>(b),
        ) {
            (Ok(mut va), Ok(mut vb)) => {
                for p in &self.ignore {
                    remove(&mut va, p);
                    remove(&mut vb, p);
                }
                first_difference(&va, &vb, String::new())
            }
            _ => (a != b).then(String::new),
        }
    }

    /// Whether another mismatch may be logged this minute.
    fn may_log(&self) -> bool {
        let minute = now_ms() / 60_000;
        let cur = self.logged.load(Ordering::Relaxed);
        let (m, n) = (cur >> 32, cur & 0xffff_ffff);
        let next = if m == minute {
            (m << 32) | (n + 1)
        } else {
            (minute << 32) | 1
        };
        if m == minute && n >= u64::from(self.log_per_minute) {
            return false;
        }
        self.logged
            .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// The unescaped segments of a JSON pointer (`~1` is `/`, `~0` is `~`).
fn pointer_segments(p: &str) -> Vec<String> {
    p.split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Remove what `path` points at (`*` matches every key or index).
fn remove(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    match v {
        Value::Object(m) => {
            if rest.is_empty() {
                if first == "*" {
                    m.clear();
                } else {
                    m.remove(first);
                }
            } else if first == "*" {
                m.values_mut().for_each(|x| remove(x, rest));
            } else if let Some(x) = m.get_mut(first) {
                remove(x, rest);
            }
        }
        Value::Array(a) => {
            if first == "*" {
                if rest.is_empty() {
                    a.clear();
                } else {
                    a.iter_mut().for_each(|x| remove(x, rest));
                }
            } else if let Ok(i) = first.parse::<usize>() {
                if rest.is_empty() {
                    // Replaced, not removed: later indexes keep their meaning.
                    if let Some(x) = a.get_mut(i) {
                        *x = Value::Null;
                    }
                } else if let Some(x) = a.get_mut(i) {
                    remove(x, rest);
                }
            }
        }
        _ => {}
    }
}

/// The pointer of the first place where `a` and `b` differ, if they do.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                match (ma.get(k), mb.get(k)) {
                    (Some(x), Some(y)) => {
                        if let Some(d) = first_difference(x, y, p) {
                            return Some(d);
                        }
                    }
                    _ => return Some(p),
                }
            }
            None
        }
        (Value::Array(xa), Value::Array(xb)) => {
            for (i, (x, y)) in xa.iter().zip(xb).enumerate() {
                if let Some(d) = first_difference(x, y, format!("{at}/{i}")) {
                    return Some(d);
                }
            }
            (xa.len() != xb.len()).then(|| format!("{at}/{}", xa.len().min(xb.len())))
        }
        _ => (a != b).then_some(at),
    }
}

/// Where a mirrored exchange's body copy goes: to the comparison, `None` when it grew
/// past the limit. Nothing is sent if the body fails or is dropped before its end.
struct CopyTo(oneshot::Sender<Option<Bytes>>);

impl CopySink for CopyTo {
    const WANTS_OVERFLOW: bool = true;

    fn complete(self, copy: Option<Bytes>) {
        let _ = self.0.send(copy);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::StatusCode;
    use serde_json::json;

    fn cmp(ignore: &[&str]) -> Compare {
        Compare {
            status: true,
            headers: vec![HeaderName::from_static("content-type")],
            body: true,
            ignore: ignore.iter().map(|p| pointer_segments(p)).collect(),
            max_body: 1 << 20,
            log_per_minute: 2,
            logged: AtomicU64::new(0),
        }
    }

    fn answer(status: u16, ct: &str, body: Value) -> Answer {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: h,
            body: Some(Bytes::from(body.to_string())),
        }
    }

    #[test]
    fn json_bodies_compare_by_content_minus_ignored_pointers() {
        let c = cmp(&["/meta/request_id", "/items/*/ts"]);
        let a = answer(
            200,
            "application/json",
            json!({"id": 1, "meta": {"request_id": "a"}, "items": [{"n": 1, "ts": 5}]}),
        );
        let b = answer(
            200,
            "application/json",
            json!({"items": [{"ts": 9, "n": 1}], "meta": {"request_id": "b"}, "id": 1}),
        );
        assert_eq!(c.diff(&a, &b), Some(vec![]));
        let b2 = answer(
            200,
            "application/json",
            json!({"id": 2, "meta": {"request_id": "b"}, "items": [{"n": 1, "ts": 9}]}),
        );
        assert_eq!(c.diff(&a, &b2), Some(vec![Diff::Body("/id".into())]));
        let b3 = answer(
            500,
            "text/plain",
            json!({"id": 1, "meta": {}, "items": [{"n": 2}]}),
        );
        assert_eq!(
            c.diff(&a, &b3),
            Some(vec![
                Diff::Status,
                Diff::Header(HeaderName::from_static("content-type")),
                Diff::Body("/items/0/n".into())
            ])
        );
    }

    #[test]
    fn missing_bodies_make_a_comparison_incomplete() {
        let c = cmp(&[]);
        let a = answer(200, "x", json!(1));
        let mut b = answer(200, "x", json!(1));
        b.body = None;
        assert_eq!(c.diff(&a, &b), None);
        // Not JSON: bytes.
        let mut t1 = answer(200, "x", json!(1));
        t1.body = Some(Bytes::from_static(b"<a>"));
        let mut t2 = answer(200, "x", json!(1));
        t2.body = Some(Bytes::from_static(b"<b>"));
        assert_eq!(c.diff(&t1, &t2), Some(vec![Diff::Body(String::new())]));
    }

    #[test]
    fn array_length_and_escaped_keys_are_reported() {
        assert_eq!(
            first_difference(&json!([1, 2]), &json!([1, 2, 3]), String::new()),
            Some("/2".into())
        );
        assert_eq!(
            first_difference(&json!({"a/b": 1}), &json!({"a/b": 2}), String::new()),
            Some("/a~1b".into())
        );
        let mut v = json!({"a/b": 1, "c": 2});
        remove(&mut v, &pointer_segments("/a~1b"));
        assert_eq!(v, json!({"c": 2}));
    }

    #[test]
    fn logging_is_limited_per_minute() {
        let c = cmp(&[]);
        assert!(c.may_log());
        assert!(c.may_log());
        assert!(!c.may_log());
    }
}
