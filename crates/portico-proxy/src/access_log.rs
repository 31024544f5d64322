//! The access log: one JSON line per request, written by a background thread so a
//! slow disk or pipe never blocks a request (lines are dropped and counted instead).

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::metrics::Metrics;

/// One access-log line.
#[derive(Serialize)]
pub struct Record<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub client_ip: IpAddr,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<std::borrow::Cow<'a, str>>,
    pub protocol: &'a str,
    pub route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
}

enum Msg {
    Line(Vec<u8>),
    Target(Option<PathBuf>),
    /// Write out everything queued before it, then answer.
    Flush(SyncSender<()>),
}

/// Handle to the writer thread.
pub struct AccessLog {
    tx: SyncSender<Msg>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Start the writer; `path` None means standard output.
    pub fn start(path: Option<PathBuf>, metrics: Arc<Metrics>) -> AccessLog {
        let (tx, rx) = sync_channel(16 * 1024);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, path));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access-log writer");
        }
        AccessLog { tx, metrics }
    }

    /// Another handle to the same writer.
    pub fn clone_handle(&self) -> AccessLog {
        AccessLog {
            tx: self.tx.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Switch the destination (on reload).
    pub fn set_target(&self, path: Option<PathBuf>) {
        let _ = self.tx.send(Msg::Target(path));
    }

    /// Wait (at most `within`) until every record queued so far is written: at
    /// shutdown, so the last requests' lines are not lost when the process exits.
    pub fn flush(&self, within: Duration) -> bool {
        let (ack, done) = sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_err() {
            return false;
        }
        done.recv_timeout(within).is_ok()
    }

    /// Queue one record.
    pub fn write(&self, r: &Record<'_>) {
        let mut line = Vec::with_capacity(384);
        if serde_json::to_writer(&mut line, r).is_ok() {
            line.push(b'\n');
            match self.tx.try_send(Msg::Line(line)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.metrics
                        .access_log_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn open(path: &Option<PathBuf>) -> Box<dyn Write + Send> {
    match path {
        None => Box::new(std::io::stdout()),
        Some(p) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                tracing::error!(path = %p.display(), error = %e, "cannot open the access log; writing to stdout");
                Box::new(std::io::stdout())
            }
        },
    }
}

fn writer(rx: Receiver<Msg>, path: Option<PathBuf>) {
    let mut current = path;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, open(&current));
    while let Ok(msg) = rx.recv() {
        let mut next = Some(msg);
        while let Some(m) = next.take() {
            match m {
                Msg::Line(l) => {
                    let _ = out.write_all(&l);
                }
                Msg::Flush(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
                Msg::Target(p) => {
                    if p != current {
                        let _ = out.flush();
                        current = p;
                        out = std::io::BufWriter::with_capacity(64 * 1024, open(&current));
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_shape() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }
}

/// Query parameters whose values are credentials by convention; their values are
/// logged as `REDACTED`.
const SECRET_PARAMS: &[&str] = &[
    "apikey",
    "api_key",
    "api-key",
    "key",
    "access_token",
    "id_token",
    "refresh_token",
    "token",
    "password",
    "client_secret",
    "code",
    "state",
];

/// The query string for the log, with credential values replaced: the conventional
/// names above plus `extra` (every `query:` credential location of the configuration,
/// whichever route or answer the request got).
pub fn redact_query<'a>(
    q: Option<&'a str>,
    extra: &[std::sync::Arc<str>],
) -> Option<std::borrow::Cow<'a, str>> {
    let q = q?;
    let secret = |k: &str| {
        let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
        SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s)) || extra.iter().any(|e| **e == *k)
    };
    if !q
        .split('&')
        .any(|p| p.split_once('=').is_some_and(|(k, _)| secret(k)))
    {
        return Some(std::borrow::Cow::Borrowed(q));
    }
    let parts: Vec<String> = q
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if secret(k) => format!("{k}=REDACTED"),
            _ => p.to_string(),
        })
        .collect();
    Some(std::borrow::Cow::Owned(parts.join("&")))
}

#[cfg(test)]
mod redact_tests {
    use super::redact_query;

    #[test]
    fn credentials_in_queries_are_redacted() {
        assert_eq!(
            redact_query(Some("a=1&b=2"), &[]).as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(
            redact_query(Some("a=1&apikey=s3cret&API_KEY=x"), &[]).as_deref(),
            Some("a=1&apikey=REDACTED&API_KEY=REDACTED")
        );
        assert_eq!(
            redact_query(Some("k=s3cret&z"), &["k".into()]).as_deref(),
            Some("k=REDACTED&z")
        );
        assert_eq!(redact_query(None, &[]), None);
    }
}
