//! The response side of `cache`: whether an upstream response is stored (and as
//! what), an entry refreshed by a `304`, and the answers made from entries.

use std::sync::Arc;

use http::header::{AGE, CONTENT_LENGTH, ETAG, LAST_MODIFIED, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::control::{self, CacheControl};
use super::store::Entry;
use super::{key, tee, Cache, Pending, X_CACHE};
use crate::body::Body;

impl Cache {
    /// Whether a response can be stored, and as what (without its body).
    pub(super) fn storable(
        &self,
        p: &Pending,
        parts: &http::response::Parts,
        now: u64,
    ) -> Option<tee::Job> {
        if !self.statuses.contains(&parts.status.as_u16()) {
            return None;
        }
        let h = &parts.headers;
        let cc = CacheControl::parse(h);
        if cc.no_store || cc.private || (!self.cache_set_cookie && h.contains_key(SET_COOKIE)) {
            return None;
        }
        let vary = key::vary_names(h)?;
        let declared = h
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if !p.head && declared.is_some_and(|n| n > self.max_object) {
            return None;
        }
        let entry = self.entry(parts.status, h.clone(), &cc, now)?;
        let (key, vary) = if vary.is_empty() {
            (p.key.to_string(), None)
        } else {
            (
                key::variant(&p.key, &vary, &p.req_headers),
                Some((p.key.to_string(), Arc::from(vary))),
            )
        };
        Some(tee::Job {
            sink: self.sink.clone(),
            key,
            vary,
            entry,
            leader: p.leader.clone(),
        })
    }

    /// An entry (body still empty) for a response stored now; `None` when it would
    /// never be usable.
    fn entry(
        &self,
        status: StatusCode,
        mut headers: HeaderMap,
        cc: &CacheControl,
        now: u64,
    ) -> Option<Entry> {
        let life = control::lifetime(cc, &headers, now, self.defaults);
        let validators = headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED);
        // An entry that can be revalidated is kept past its freshness (as long again,
        // at least `default_ttl`), so a revalidation can refresh it with a `304`.
        let keep = life
            .ttl_ms
            .saturating_add(life.swr_ms.max(life.sie_ms))
            .saturating_add(if validators {
                life.ttl_ms.max(self.defaults.ttl_ms)
            } else {
                0
            });
        if keep == 0 {
            return None;
        }
        let initial_age_ms = control::initial_age_ms(&headers);
        headers.remove(AGE);
        headers.remove(&X_CACHE);
        Some(Entry {
            status,
            headers,
            body: bytes::Bytes::new(),
            stored_ms: now,
            initial_age_ms,
            ttl_ms: life.ttl_ms,
            swr_ms: life.swr_ms,
            sie_ms: life.sie_ms,
            keep_ms: keep,
        })
    }

    /// The stored entry updated by a `304` (RFC 9111 §4.3.4): its headers replace the
    /// stored ones of the same names, and freshness starts again.
    pub(super) fn refreshed(&self, old: &Entry, fresh: &HeaderMap, now: u64) -> Option<Entry> {
        let mut headers = old.headers.clone();
        for name in fresh.keys() {
            if name == CONTENT_LENGTH || name == http::header::CONTENT_ENCODING {
                continue;
            }
            headers.remove(name);
            for v in fresh.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let cc = CacheControl::parse(&headers);
        let mut e = self.entry(old.status, headers, &cc, now)?;
        e.body = old.body.clone();
        Some(e)
    }
}

/// The answer from an entry: `304` (with the headers RFC 9110 §15.4.5 asks for) when
/// the request's conditions match it, else the stored response; with `Age`.
pub(super) fn answer(req: &HeaderMap, head: bool, e: &Entry, now: u64) -> Response<Body> {
    let age = HeaderValue::from(e.age_ms(now) / 1000);
    let mut resp = if e.status == StatusCode::OK && control::not_modified(req, &e.headers) {
        let mut r = Response::new(Body::Empty);
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        for name in [
            http::header::CACHE_CONTROL,
            http::header::CONTENT_LOCATION,
            http::header::DATE,
            ETAG,
            http::header::EXPIRES,
            LAST_MODIFIED,
            http::header::VARY,
        ] {
            for v in e.headers.get_all(&name) {
                r.headers_mut().append(name.clone(), v.clone());
            }
        }
        r
    } else {
        let body = if head || e.body.is_empty() {
            Body::Empty
        } else {
            Body::full(e.body.clone())
        };
        let mut r = Response::new(body);
        *r.status_mut() = e.status;
        *r.headers_mut() = e.headers.clone();
        if !head {
            r.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(e.body.len()));
        }
        r
    };
    resp.headers_mut().insert(AGE, age);
    resp
}
