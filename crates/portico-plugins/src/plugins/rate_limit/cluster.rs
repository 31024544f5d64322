//! The shared store of `mode: cluster`: every limit of a route is decided by one Lua
//! script in Redis (one round trip; `EVALSHA`, falling back to loading the script on
//! `NOSCRIPT`), on Redis's own clock (`TIME`), so every gateway agrees.
//!
//! The connection is made on first use and kept by redis-rs's connection manager,
//! which reconnects on its own after Redis went away: no restart needed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::algo::{Algorithm, Decision, Params};

/// The algorithms of `algo.rs`, in microseconds of the Redis server's clock.
/// KEYS: one per limit. ARGV: 4 per limit: algorithm (1 gcra, 2 sliding window),
/// requests, per (µs), burst. Returns 4 integers per limit: admitted (0/1),
/// remaining, reset (µs), retry after (µs). Nothing is written unless every limit
/// admits the request.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local writes = {}
local all = true
for i = 1, #KEYS do
  local b = (i - 1) * 4
  local alg = tonumber(ARGV[b + 1])
  local req = tonumber(ARGV[b + 2])
  local per = tonumber(ARGV[b + 3])
  local burst = tonumber(ARGV[b + 4])
  local ok, remaining, reset, retry = 0, 0, 0, 0
  if alg == 1 then
    local T = math.max(1, math.floor(per / req))
    local tau = T * burst
    local tat = now
    local v = redis.call('GET', KEYS[i])
    if v then tat = math.max(tonumber(v), now) end
    local new = tat + T
    local ahead = new - now
    if ahead > tau then
      reset = tat - now
      retry = ahead - tau
    else
      ok = 1
      remaining = math.floor((tau - ahead) / T)
      reset = ahead
      writes[#writes + 1] = {i, 1, new, ahead}
    end
  else
    local win = math.floor(now / per)
    local h = redis.call('HMGET', KEYS[i], 'w', 'p', 'c')
    local w, p, c = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
    if w ~= win then
      if w == win - 1 then p = c else p = 0 end
      c = 0
    end
    local left = (win + 1) * per - now
    local used = p * left + c * per
    local cap = req * per
    reset = left
    if used + per <= cap then
      ok = 1
      remaining = math.floor((cap - used - per) / per)
      writes[#writes + 1] = {i, 2, win, p, c + 1}
    elseif c < req and p > 0 then
      retry = math.max(1, left - math.floor((cap - (c + 1) * per) / p))
    else
      retry = left + per - math.min(per, math.floor((cap - per) / math.max(c, 1)))
    end
  end
  if ok == 0 then all = false end
  out[#out + 1] = ok
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
if all then
  for _, wr in ipairs(writes) do
    local k = KEYS[wr[1]]
    if wr[2] == 1 then
      redis.call('SET', k, string.format('%.0f', wr[3]), 'PX', math.ceil(wr[4] / 1000) + 1)
    else
      local per = tonumber(ARGV[(wr[1] - 1) * 4 + 3])
      redis.call('HSET', k, 'w', string.format('%.0f', wr[3]), 'p', wr[4], 'c', wr[5])
      redis.call('PEXPIRE', k, math.ceil(2 * per / 1000) + 1)
    end
  end
end
return out
"#;

static LUA: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SCRIPT));

/// One Redis server, shared by every policy that names the same URL and timeout.
pub struct RedisStore {
    client: redis::Client,
    timeout: Duration,
    conn: OnceLock<Option<ConnectionManager>>,
    /// Whether the last call failed (to log the recovery once).
    down: AtomicBool,
    /// When a failure was last logged (ms since the Unix epoch): at most one line per
    /// [`LOG_EVERY`].
    last_log_ms: AtomicU64,
    errors: AtomicU64,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why the store gave no answer.
#[derive(Debug)]
pub enum StoreError {
    Timeout,
    Redis(redis::RedisError),
    Reply,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Timeout => f.write_str("no answer within the timeout"),
            StoreError::Redis(e) => write!(f, "{e}"),
            StoreError::Reply => f.write_str("unexpected reply from the rate-limit script"),
        }
    }
}

impl RedisStore {
    /// Parse the URL (no connection is made yet).
    pub fn new(url: &str, timeout: Duration) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("`{url}`: {e}"))?;
        Ok(RedisStore {
            client,
            timeout,
            conn: OnceLock::new(),
            down: AtomicBool::new(false),
            last_log_ms: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    pub(crate) fn manager(&self) -> Option<ConnectionManager> {
        self.conn
            .get_or_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(100))))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                    .inspect_err(
                        |e| tracing::error!(error = %e, "rate-limit store: no Redis client"),
                    )
                    .ok()
            })
            .clone()
    }

    /// Decide on one request under every limit of a route at once: `(params, key)`
    /// per limit. Decisions come back in the same order.
    pub async fn check(&self, limits: &[(Params, &str)]) -> Result<Vec<Decision>, StoreError> {
        let r = self.call(limits).await;
        self.record("rate-limit", &r);
        r
    }

    /// Note how a call went: log a failure (at most every [`LOG_EVERY`]) and the
    /// recovery after one (once). `what` names the policy in the log line.
    pub(crate) fn record<T, E: std::fmt::Display>(&self, what: &str, r: &Result<T, E>) {
        match r {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("{what} store: Redis answers again");
                }
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.down.store(true, Ordering::Relaxed);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let last = self.last_log_ms.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= LOG_EVERY.as_millis() as u64
                    && self
                        .last_log_ms
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(error = %e, errors = self.errors.load(Ordering::Relaxed), "{what} store: Redis failed; applying on_store_error (logged at most every 10 s)");
                }
            }
        }
    }

    /// How long a call may wait for Redis.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn call(&self, limits: &[(Params, &str)]) -> Result<Vec<Decision>, StoreError> {
        let Some(mut conn) = self.manager() else {
            return Err(StoreError::Reply);
        };
        let mut inv = LUA.prepare_invoke();
        for (p, key) in limits {
            let alg = match p.algorithm {
                Algorithm::Gcra => 1,
                Algorithm::SlidingWindow => 2,
            };
            inv.key(*key)
                .arg(alg)
                .arg(p.requests)
                .arg(p.per_ns / 1000)
                .arg(p.burst);
        }
        let reply: Vec<i64> = tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| StoreError::Timeout)?
            .map_err(StoreError::Redis)?;
        if reply.len() != limits.len() * 4 {
            return Err(StoreError::Reply);
        }
        let us = |v: i64| u64::try_from(v).unwrap_or(0).saturating_mul(1000);
        Ok(reply
            .chunks_exact(4)
            .map(|c| Decision {
                allowed: c[0] == 1,
                remaining: u64::try_from(c[1]).unwrap_or(0),
                reset_ns: us(c[2]),
                retry_ns: us(c[3]),
            })
            .collect())
    }
}
