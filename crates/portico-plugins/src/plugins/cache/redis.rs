//! The shared store of `redis: {url}`: one Redis string per key (`PREFIX` + the cache
//! key), holding an encoded [`Slot`], set with an expiry of the entry's whole lifetime
//! (fresh + stale windows), so Redis forgets entries on its own.
//!
//! Purge by route, URL or prefix walks the keys with `SCAN MATCH PREFIX*` and deletes
//! those whose parsed key matches: no index to keep in step, at the cost of a walk over
//! the cache's keys per purge (an administrative, rare operation).
//!
//! Errors (Redis down, timeout) count as misses and failed stores: the cache never
//! fails a request; a warning is logged at most every 10 s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::store::{Entry, Slot};

pub struct RedisCache {
    client: redis::Client,
    timeout: Duration,
    pub prefix: String,
    conn: OnceLock<Option<ConnectionManager>>,
    last_log_ms: AtomicU64,
    pub errors: AtomicU64,
}

impl RedisCache {
    pub fn new(url: &str, timeout: Duration, prefix: String) -> Result<RedisCache, String> {
        let client = redis::Client::open(url).map_err(|e| format!("`{url}`: {e}"))?;
        Ok(RedisCache {
            client,
            timeout,
            prefix,
            conn: OnceLock::new(),
            last_log_ms: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    fn manager(&self) -> Option<ConnectionManager> {
        self.conn
            .get_or_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(100))))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                    .inspect_err(|e| tracing::error!(error = %e, "cache: no Redis client"))
                    .ok()
            })
            .clone()
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %e, "cache: Redis {what} failed (treated as a miss; logged at most every 10 s)");
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Option<T> {
        let mut conn = self.manager()?;
        match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failed(what, &e);
                None
            }
            Err(_) => {
                self.failed(what, &"no answer within the timeout");
                None
            }
        }
    }

    pub async fn get(&self, key: &str) -> Option<Slot> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(format!("{}{key}", self.prefix));
        let v: Option<Vec<u8>> = self.run("GET", &cmd).await?;
        decode(Bytes::from(v?))
    }

    pub async fn put(&self, key: &str, slot: &Slot, keep_ms: u64) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{}{key}", self.prefix))
            .arg(encode(slot).as_ref())
            .arg("PX")
            .arg(keep_ms.max(1));
        let _: Option<()> = self.run("SET", &cmd).await;
    }

    /// Delete the keys (cache keys, without the prefix) `matches` selects.
    pub async fn purge(&self, matches: &(dyn Fn(&str) -> bool + Sync)) -> Result<u64, String> {
        let pattern = format!("{}*", glob_escape(&self.prefix));
        let mut cursor: u64 = 0;
        let mut n = 0u64;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .run("SCAN", &cmd)
                .await
                .ok_or("the Redis cache store did not answer")?;
            let doomed: Vec<&Vec<u8>> = keys
                .iter()
                .filter(|k| {
                    let k = String::from_utf8_lossy(k);
                    k.strip_prefix(self.prefix.as_str()).is_some_and(matches)
                })
                .collect();
            if !doomed.is_empty() {
                let mut del = redis::cmd("DEL");
                for k in doomed {
                    del.arg(k.as_slice());
                }
                let d: u64 = self
                    .run("DEL", &del)
                    .await
                    .ok_or("the Redis cache store did not answer")?;
                n += d;
            }
            cursor = next;
            if cursor == 0 {
                return Ok(n);
            }
        }
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

const RESPONSE: u8 = 1;
const VARY: u8 = 2;
const VERSION: u8 = 1;

/// `VERSION KIND` then, for a response: status (u16), stored, initial age, ttl, swr,
/// sie, keep (u64 ms each), header count (u32), each header as name length (u16), name,
/// value length (u32), value; then the body. For a marker: until (u64), name count
/// (u16), each name as length (u16) and bytes. Big-endian.
pub fn encode(slot: &Slot) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(VERSION);
    match slot {
        Slot::Response(e) => {
            b.reserve(64 + e.body.len());
            b.put_u8(RESPONSE);
            b.put_u16(e.status.as_u16());
            for v in [
                e.stored_ms,
                e.initial_age_ms,
                e.ttl_ms,
                e.swr_ms,
                e.sie_ms,
                e.keep_ms,
            ] {
                b.put_u64(v);
            }
            b.put_u32(e.headers.len() as u32);
            for (n, v) in &e.headers {
                b.put_u16(n.as_str().len() as u16);
                b.put_slice(n.as_str().as_bytes());
                b.put_u32(v.len() as u32);
                b.put_slice(v.as_bytes());
            }
            b.put_slice(&e.body);
        }
        Slot::Vary { names, until_ms } => {
            b.put_u8(VARY);
            b.put_u64(*until_ms);
            b.put_u16(names.len() as u16);
            for n in names.iter() {
                b.put_u16(n.as_str().len() as u16);
                b.put_slice(n.as_str().as_bytes());
            }
        }
    }
    b.freeze()
}

/// The inverse of [`encode`]; `None` for anything malformed (or of another version).
pub fn decode(mut b: Bytes) -> Option<Slot> {
    fn take(b: &mut Bytes, n: usize) -> Option<Bytes> {
        (b.remaining() >= n).then(|| b.split_to(n))
    }
    fn u16_(b: &mut Bytes) -> Option<u16> {
        (b.remaining() >= 2).then(|| b.get_u16())
    }
    fn u32_(b: &mut Bytes) -> Option<u32> {
        (b.remaining() >= 4).then(|| b.get_u32())
    }
    fn u64_(b: &mut Bytes) -> Option<u64> {
        (b.remaining() >= 8).then(|| b.get_u64())
    }
    if take(&mut b, 1)?.as_ref() != [VERSION] {
        return None;
    }
    match take(&mut b, 1)?[0] {
        RESPONSE => {
            let status = StatusCode::from_u16(u16_(&mut b)?).ok()?;
            let mut t = [0u64; 6];
            for x in &mut t {
                *x = u64_(&mut b)?;
            }
            let count = u32_(&mut b)? as usize;
            let mut headers = HeaderMap::with_capacity(count.min(256));
            for _ in 0..count {
                let nl = u16_(&mut b)? as usize;
                let name = HeaderName::from_bytes(&take(&mut b, nl)?).ok()?;
                let vl = u32_(&mut b)? as usize;
                let value = HeaderValue::from_maybe_shared(take(&mut b, vl)?).ok()?;
                headers.append(name, value);
            }
            Some(Slot::Response(Arc::new(Entry {
                status,
                headers,
                body: b,
                stored_ms: t[0],
                initial_age_ms: t[1],
                ttl_ms: t[2],
                swr_ms: t[3],
                sie_ms: t[4],
                keep_ms: t[5],
            })))
        }
        VARY => {
            let until_ms = u64_(&mut b)?;
            let count = u16_(&mut b)? as usize;
            let mut names = Vec::with_capacity(count);
            for _ in 0..count {
                let nl = u16_(&mut b)? as usize;
                names.push(HeaderName::from_bytes(&take(&mut b, nl)?).ok()?);
            }
            Some(Slot::Vary {
                names: names.into(),
                until_ms,
            })
        }
        _ => None,
    }
}
