//! Request metrics: lock-free atomics per (route, upstream), rendered as Prometheus text.
//! Handles are fetched when a snapshot is compiled, so a request touches only atomics.
//! (prometheus-client's histogram takes a lock per observation; this one does not.)

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use parking_lot::Mutex;

const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "OTHER",
];
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
/// Latency bucket bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::CONNECT => 8,
        _ => 9,
    }
}

fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    }
}

/// Counters and a latency histogram for one (route, upstream).
pub struct RouteMetrics {
    requests: [[AtomicU64; 6]; 10],
    buckets: [[AtomicU64; BUCKETS.len() + 1]; 10],
    sum_micros: [AtomicU64; 10],
}

impl RouteMetrics {
    fn new() -> Self {
        RouteMetrics {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            buckets: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            sum_micros: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Count one finished request.
    pub fn observe(&self, method: &Method, status: u16, latency: Duration) {
        let m = method_index(method);
        self.requests[m][class_index(status)].fetch_add(1, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        let b = BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(BUCKETS.len());
        self.buckets[m][b].fetch_add(1, Ordering::Relaxed);
        self.sum_micros[m].fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }
}

/// All metrics of the process; outlives snapshots.
#[derive(Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<(String, String), Arc<RouteMetrics>>>,
    mirrors: Mutex<BTreeMap<String, Arc<crate::mirror::MirrorStats>>>,
    pub open_connections: AtomicI64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub access_log_dropped: AtomicU64,
}

impl Metrics {
    /// The handle for (route, upstream); the same one across reloads.
    pub fn route(&self, route: &str, upstream: &str) -> Arc<RouteMetrics> {
        self.routes
            .lock()
            .entry((route.to_string(), upstream.to_string()))
            .or_insert_with(|| Arc::new(RouteMetrics::new()))
            .clone()
    }

    /// The mirror counters of a route; the same across reloads.
    pub fn mirror(&self, route: &str) -> Arc<crate::mirror::MirrorStats> {
        self.mirrors
            .lock()
            .entry(route.to_string())
            .or_default()
            .clone()
    }

    /// Forget routes no longer configured (mirror counters).
    pub fn retain_mirrors(&self, routes: &[&str]) {
        self.mirrors
            .lock()
            .retain(|r, _| routes.contains(&r.as_str()));
    }

    fn render_mirrors(&self, out: &mut String) {
        let mirrors: Vec<(String, Arc<crate::mirror::MirrorStats>)> = self
            .mirrors
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if mirrors.is_empty() {
            return;
        }
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP portico_mirror_requests_total Mirrored copies, by what became of them.\n# TYPE portico_mirror_requests_total counter\n");
        for (route, s) in &mirrors {
            for (result, n) in [
                ("sent", get(&s.sent)),
                ("failed", get(&s.failed)),
                ("skipped_busy", get(&s.skipped_busy)),
                ("skipped_body", get(&s.skipped_body)),
            ] {
                let _ = writeln!(
                    out,
                    "portico_mirror_requests_total{{route=\"{}\",result=\"{result}\"}} {n}",
                    esc(route)
                );
            }
        }
        out.push_str("# HELP portico_mirror_comparisons_total Comparisons of the mirror's answer with the primary's.\n# TYPE portico_mirror_comparisons_total counter\n");
        for (route, s) in &mirrors {
            for (result, n) in [
                ("match", get(&s.matched)),
                ("mismatch", get(&s.mismatched)),
                ("incomplete", get(&s.incomplete)),
            ] {
                let _ = writeln!(
                    out,
                    "portico_mirror_comparisons_total{{route=\"{}\",result=\"{result}\"}} {n}",
                    esc(route)
                );
            }
        }
        out.push_str("# HELP portico_mirror_mismatches_total Mismatched comparisons, by the part that differed.\n# TYPE portico_mirror_mismatches_total counter\n");
        for (route, s) in &mirrors {
            for (part, n) in [
                ("status", get(&s.mismatch_status)),
                ("headers", get(&s.mismatch_headers)),
                ("body", get(&s.mismatch_body)),
            ] {
                let _ = writeln!(
                    out,
                    "portico_mirror_mismatches_total{{route=\"{}\",part=\"{part}\"}} {n}",
                    esc(route)
                );
            }
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let routes: Vec<((String, String), Arc<RouteMetrics>)> = self
            .routes
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.push_str("# HELP portico_requests_total Requests handled, by route, method, status class and upstream.\n");
        out.push_str("# TYPE portico_requests_total counter\n");
        for ((route, upstream), m) in &routes {
            for (mi, method) in METHODS.iter().enumerate() {
                for (ci, class) in CLASSES.iter().enumerate() {
                    let n = m.requests[mi][ci].load(Ordering::Relaxed);
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "portico_requests_total{{route=\"{}\",method=\"{method}\",status=\"{class}\",upstream=\"{}\"}} {n}",
                            esc(route),
                            esc(upstream)
                        );
                    }
                }
            }
        }
        out.push_str("# HELP portico_request_duration_seconds Time from request received to response finished.\n");
        out.push_str("# TYPE portico_request_duration_seconds histogram\n");
        for ((route, upstream), m) in &routes {
            for (mi, method) in METHODS.iter().enumerate() {
                let counts: Vec<u64> = m.buckets[mi]
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect();
                let total: u64 = counts.iter().sum();
                if total == 0 {
                    continue;
                }
                let labels = format!(
                    "route=\"{}\",method=\"{method}\",upstream=\"{}\"",
                    esc(route),
                    esc(upstream)
                );
                let mut cum = 0;
                for (i, le) in BUCKETS.iter().enumerate() {
                    cum += counts[i];
                    let _ = writeln!(
                        out,
                        "portico_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cum}"
                    );
                }
                let _ = writeln!(
                    out,
                    "portico_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {total}"
                );
                let sum = m.sum_micros[mi].load(Ordering::Relaxed) as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "portico_request_duration_seconds_sum{{{labels}}} {sum}"
                );
                let _ = writeln!(
                    out,
                    "portico_request_duration_seconds_count{{{labels}}} {total}"
                );
            }
        }
        let gauges = [
            (
                "portico_open_connections",
                "gauge",
                "Client connections currently open.",
                self.open_connections.load(Ordering::Relaxed),
            ),
            (
                "portico_config_reloads_total",
                "counter",
                "Successful configuration reloads.",
                self.reloads_ok.load(Ordering::Relaxed) as i64,
            ),
            (
                "portico_config_reload_failures_total",
                "counter",
                "Rejected configuration reloads.",
                self.reloads_failed.load(Ordering::Relaxed) as i64,
            ),
            (
                "portico_access_log_dropped_total",
                "counter",
                "Access-log lines dropped because the writer fell behind.",
                self.access_log_dropped.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        self.render_mirrors(&mut out);
        out
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        let r = m.route("users", "users-up");
        r.observe(&Method::GET, 200, Duration::from_millis(3));
        r.observe(&Method::GET, 503, Duration::from_millis(30));
        let text = m.render();
        assert!(text.contains("portico_requests_total{route=\"users\",method=\"GET\",status=\"2xx\",upstream=\"users-up\"} 1"));
        assert!(text.contains("portico_requests_total{route=\"users\",method=\"GET\",status=\"5xx\",upstream=\"users-up\"} 1"));
        assert!(text.contains("portico_request_duration_seconds_bucket{route=\"users\",method=\"GET\",upstream=\"users-up\",le=\"0.005\"} 1"));
        assert!(text.contains("portico_request_duration_seconds_count{route=\"users\",method=\"GET\",upstream=\"users-up\"} 2"));
        assert!(Arc::ptr_eq(&r, &m.route("users", "users-up")));
    }
}
