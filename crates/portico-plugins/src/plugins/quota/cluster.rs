//! The counts of `mode: cluster`: in Redis, shared by every gateway. One key per
//! (scope, limit, period start, request key) holds the period's use, expiring just
//! after the period ends. A request is decided by one Lua script (one round trip for
//! every limit): it reads the counts, refuses when one is used up, and otherwise
//! adds one to the request limits. Bytes are added at the end of the exchange with
//! `INCRBY` (one pipelined round trip, off the request's path).
//!
//! Periods are computed by each gateway from its own clock, so gateways should keep
//! their clocks in sync (NTP): around a period's boundary a gateway whose clock is
//! behind still counts into the ending period.

use std::sync::LazyLock;

use crate::plugins::rate_limit::cluster::RedisStore;

/// KEYS: one per limit. ARGV: 3 per limit: amount, 1 when a request counts one (a
/// request limit) else 0, and the Unix second the key expires at. Returns admitted
/// (0/1) and then each limit's use (after counting the request when admitted).
const SCRIPT: &str = r#"
local used = {}
local ok = 1
for i = 1, #KEYS do
  local u = tonumber(redis.call('GET', KEYS[i]) or '0')
  used[i] = u
  if u >= tonumber(ARGV[(i - 1) * 3 + 1]) then ok = 0 end
end
if ok == 1 then
  for i = 1, #KEYS do
    if ARGV[(i - 1) * 3 + 2] == '1' then
      used[i] = redis.call('INCRBY', KEYS[i], 1)
      redis.call('EXPIREAT', KEYS[i], ARGV[(i - 1) * 3 + 3])
    end
  end
end
local out = {ok}
for i = 1, #KEYS do out[i + 1] = used[i] end
return out
"#;

static LUA: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SCRIPT));

/// How long after its period ends a key stays in Redis.
pub const GRACE_SECS: i64 = 60;

/// One limit of a request: its Redis key, amount, whether a request counts one, and
/// when its period ends.
pub struct Call<'a> {
    pub key: &'a str,
    pub amount: u64,
    pub requests: bool,
    pub end: i64,
}

fn failed(what: &str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, "quota store", what.to_string()))
}

async fn timed<T>(
    store: &RedisStore,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(store.timeout(), f)
        .await
        .map_err(|_| failed("no answer within the timeout"))?
}

/// Admit one request: `(admitted, use of each limit)`.
pub async fn admit(store: &RedisStore, calls: &[Call<'_>]) -> redis::RedisResult<(bool, Vec<u64>)> {
    let r = async {
        let mut conn = store.manager().ok_or_else(|| failed("no Redis client"))?;
        let mut inv = LUA.prepare_invoke();
        for c in calls {
            inv.key(c.key)
                .arg(c.amount)
                .arg(u8::from(c.requests))
                .arg(c.end + GRACE_SECS);
        }
        let reply: Vec<i64> = timed(store, inv.invoke_async(&mut conn)).await?;
        if reply.len() != calls.len() + 1 {
            return Err(failed("unexpected reply from the quota script"));
        }
        let used = reply[1..]
            .iter()
            .map(|v| u64::try_from(*v).unwrap_or(0))
            .collect();
        Ok((reply[0] == 1, used))
    }
    .await;
    store.record("quota", &r);
    r
}

/// Add an exchange's bytes to the byte limits.
pub async fn add_bytes(
    store: &RedisStore,
    calls: &[Call<'_>],
    bytes: u64,
) -> redis::RedisResult<()> {
    let r = async {
        let mut conn = store.manager().ok_or_else(|| failed("no Redis client"))?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for c in calls.iter().filter(|c| !c.requests) {
            pipe.cmd("INCRBY").arg(c.key).arg(bytes).ignore();
            pipe.cmd("EXPIREAT")
                .arg(c.key)
                .arg(c.end + GRACE_SECS)
                .ignore();
        }
        timed(store, pipe.query_async::<()>(&mut conn)).await
    }
    .await;
    store.record("quota", &r);
    r
}

/// `*`, `?`, `[`, `]` and `\` escaped for a `SCAN MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// Every key under `prefix` (the part after it) and its count (admin API; SCAN, so
/// Redis is never blocked).
pub async fn scan(store: &RedisStore, prefix: &str) -> redis::RedisResult<Vec<(String, u64)>> {
    let mut conn = store.manager().ok_or_else(|| failed("no Redis client"))?;
    let pattern = format!("{}*", glob_escape(prefix));
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = timed(
            store,
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn),
        )
        .await?;
        if !keys.is_empty() {
            let values: Vec<Option<u64>> =
                timed(store, redis::cmd("MGET").arg(&keys).query_async(&mut conn)).await?;
            for (k, v) in keys.into_iter().zip(values) {
                if let (Some(rest), Some(v)) = (k.strip_prefix(prefix), v) {
                    out.push((rest.to_string(), v));
                }
            }
        }
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// Delete keys; how many existed.
pub async fn delete(store: &RedisStore, keys: &[String]) -> redis::RedisResult<u64> {
    let mut conn = store.manager().ok_or_else(|| failed("no Redis client"))?;
    timed(store, redis::cmd("DEL").arg(keys).query_async(&mut conn)).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob_patterns_are_escaped() {
        assert_eq!(super::glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
