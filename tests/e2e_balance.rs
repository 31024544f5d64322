//! End-to-end load balancing: the real `portico` binary in front of real upstream
//! servers, one test per `balance:` algorithm (docs/upstreams.md), plus `portico
//! validate` on `hash_key` mistakes.
//!
//! No assertion depends on timing: shares are exact where the algorithm is
//! deterministic, within six standard deviations where it is random, and otherwise
//! (least_connections, p2c_ewma against a slow target) only the direction is checked,
//! with a margin far from what the algorithm gives.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portico_test_support::upstream::{default_handler, handler, Handler};
use portico_test_support::{free_port, http_client, LocalGateway, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_portico");

async fn start(body: &str) -> LocalGateway {
    LocalGateway::start(Path::new(BIN), body).await
}

/// One GET; the name of the upstream server that answered (it must be a 200).
async fn hit(
    client: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    header: Option<(&str, &str)>,
) -> String {
    let mut req = client.get(format!("http://{addr}{path}"));
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let who = r.headers()["x-upstream"].to_str().unwrap().to_owned();
    r.bytes().await.unwrap();
    who
}

/// `n` sequential GETs: how many each upstream server answered.
async fn tally(addr: SocketAddr, path: &str, n: usize) -> BTreeMap<String, usize> {
    let client = http_client();
    let mut count = BTreeMap::new();
    for _ in 0..n {
        *count
            .entry(hit(&client, addr, path, None).await)
            .or_default() += 1;
    }
    count
}

/// `workers` clients sending `total` GETs between them, each one at a time: every
/// client keeps going until the total is reached.
async fn tally_concurrent(
    addr: SocketAddr,
    path: &str,
    workers: usize,
    total: usize,
) -> BTreeMap<String, usize> {
    let left = Arc::new(AtomicUsize::new(total));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (path, left) = (path.to_string(), left.clone());
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut count: BTreeMap<String, usize> = BTreeMap::new();
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                *count
                    .entry(hit(&client, addr, &path, None).await)
                    .or_default() += 1;
            }
            count
        }));
    }
    let mut count = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *count.entry(k).or_default() += v;
        }
    }
    count
}

fn get(count: &BTreeMap<String, usize>, name: &str) -> usize {
    count.get(name).copied().unwrap_or(0)
}

/// Six standard deviations of a binomial count.
fn six_sigma(trials: usize, p: f64) -> f64 {
    6.0 * (trials as f64 * p * (1.0 - p)).sqrt()
}

/// An upstream server that waits `delay` before every answer (the echo otherwise).
async fn slow_upstream(name: &str, delay: Duration) -> Upstream {
    let echo: Handler = default_handler(name);
    Upstream::start_with(
        name,
        handler(move |req| {
            let echo = echo.clone();
            async move {
                tokio::time::sleep(delay).await;
                echo(req).await
            }
        }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_gives_exact_shares_and_round_robin_alternates() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let env = start(&format!(
        "upstreams:
  w:
    targets: [{{url: \"{a}\", weight: 3}}, {{url: \"{b}\", weight: 1}}]
  rr:
    balance: round_robin
    targets: [{{url: \"{a}\", weight: 3}}, {{url: \"{b}\", weight: 1}}]
routes:
  - {{name: w, paths: [\"/w\"], upstream: w}}
  - {{name: rr, paths: [\"/rr\"], upstream: rr}}
",
        a = a.url(),
        b = b.url()
    ))
    .await;
    let count = tally(env.addr, "/w", 2000).await;
    eprintln!("weighted 3:1 over 2000: {count:?}");
    let share = get(&count, "a") as f64 / 2000.0;
    assert!((share - 0.75).abs() <= 0.03, "{count:?}");
    assert_eq!((get(&count, "a"), get(&count, "b")), (1500, 500));

    let client = http_client();
    let mut seq = Vec::new();
    for _ in 0..200 {
        seq.push(hit(&client, env.addr, "/rr", None).await);
    }
    assert!(seq.windows(2).all(|w| w[0] != w[1]), "{seq:?}");
    assert_eq!(seq.iter().filter(|s| *s == "a").count(), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn random_follows_the_weights() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let env = start(&format!(
        "upstreams:
  r:
    balance: random
    targets: [{{url: \"{a}\", weight: 3}}, {{url: \"{b}\", weight: 1}}]
routes:
  - {{name: r, paths: [\"/*\"], upstream: r}}
",
        a = a.url(),
        b = b.url()
    ))
    .await;
    const N: usize = 2000;
    let count = tally(env.addr, "/r", N).await;
    eprintln!("random 3:1 over {N}: {count:?}");
    assert_eq!(get(&count, "a") + get(&count, "b"), N);
    let dev = (get(&count, "a") as f64 - 0.75 * N as f64).abs();
    assert!(dev <= six_sigma(N, 0.75), "{count:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn least_connections_sends_new_requests_away_from_busy_targets() {
    // `slow` holds every request for 200 ms; `fast` answers at once.
    let slow = slow_upstream("slow", Duration::from_millis(200)).await;
    let fast = Upstream::start("fast").await;
    let env = start(&format!(
        "upstreams:
  lc:
    balance: least_connections
    targets: [{{url: \"{s}\"}}, {{url: \"{f}\"}}]
  rr:
    balance: round_robin
    targets: [{{url: \"{s}\"}}, {{url: \"{f}\"}}]
routes:
  - {{name: lc, paths: [\"/lc\"], upstream: lc}}
  - {{name: rr, paths: [\"/rr\"], upstream: rr}}
",
        s = slow.url(),
        f = fast.url()
    ))
    .await;
    // 8 clients, each one request at a time. Whenever requests wait at `slow`, new
    // ones go to `fast` (fewer in flight): `slow` only gets one when as many are in
    // flight at `fast`, which answers at once. It ends up holding a few at a time,
    // each for 200 ms, while the other clients go round through `fast`: its share
    // stays far below round robin's 50 % unless a round trip through `fast` took
    // about as long.
    let count = tally_concurrent(env.addr, "/lc", 8, 400).await;
    eprintln!("least_connections, 8 clients, 400 requests: {count:?}");
    assert_eq!(get(&count, "slow") + get(&count, "fast"), 400);
    assert!(get(&count, "slow") < 100, "{count:?}");
    // The same clients against round_robin: half each, however slow.
    let count = tally_concurrent(env.addr, "/rr", 8, 80).await;
    eprintln!("round_robin, 8 clients, 80 requests: {count:?}");
    assert_eq!((get(&count, "slow"), get(&count, "fast")), (40, 40));
}

#[tokio::test(flavor = "multi_thread")]
async fn p2c_ewma_sends_fewer_requests_to_a_slow_target() {
    let slow = slow_upstream("slow", Duration::from_millis(50)).await;
    let fast = Upstream::start("fast").await;
    let env = start(&format!(
        "upstreams:
  p2c:
    balance: p2c_ewma
    targets: [{{url: \"{s}\"}}, {{url: \"{f}\"}}]
routes:
  - {{name: p2c, paths: [\"/*\"], upstream: p2c}}
",
        s = slow.url(),
        f = fast.url()
    ))
    .await;
    // `slow` answers in 50 ms: once one answer of each is in, `fast` wins every
    // comparison for the next ~40 s (docs/upstreams.md); before that both are new and
    // compare by requests in flight.
    let count = tally_concurrent(env.addr, "/p", 4, 400).await;
    eprintln!("p2c_ewma 50 ms vs 0 ms, 4 clients, 400 requests: {count:?}");
    assert_eq!(get(&count, "slow") + get(&count, "fast"), 400);
    assert!(get(&count, "slow") * 100 < 35 * 400, "{count:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_keeps_each_key_on_one_target() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let env = start(&format!(
        "upstreams:
  by-user:
    balance: consistent_hash
    hash_key: \"header:x-user\"
    targets: [{{url: \"{a}\"}}, {{url: \"{b}\"}}, {{url: \"{c}\"}}]
  by-session:
    balance: consistent_hash
    hash_key: \"cookie:session\"
    targets: [{{url: \"{a}\"}}, {{url: \"{b}\"}}, {{url: \"{c}\"}}]
  with-dead:
    balance: consistent_hash
    hash_key: \"header:x-user\"
    targets: [{{url: \"{dead}\"}}, {{url: \"{a}\"}}, {{url: \"{b}\"}}]
routes:
  - {{name: user, paths: [\"/user\"], upstream: by-user}}
  - {{name: session, paths: [\"/session\"], upstream: by-session}}
  - {{name: dead, paths: [\"/dead\"], upstream: with-dead}}
",
        a = a.url(),
        b = b.url(),
        c = c.url()
    ))
    .await;
    let client = http_client();
    // 100 users, 3 rounds: a user always lands on the same target.
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for _round in 0..3 {
        for u in 0..100 {
            let user = format!("user-{u}");
            let who = hit(&client, env.addr, "/user", Some(("x-user", &user))).await;
            seen.entry(user).or_default().insert(who);
        }
    }
    assert!(seen.values().all(|s| s.len() == 1), "{seen:?}");
    let mut per_target: BTreeMap<&str, usize> = BTreeMap::new();
    for s in seen.values() {
        for t in s {
            *per_target.entry(t.as_str()).or_default() += 1;
        }
    }
    eprintln!("consistent_hash: 100 users over 3 targets: {per_target:?}");
    // Each target owns a third of the table: with 100 random keys, the chance that
    // one gets none is 3 × (2/3)^100 < 10^-17.
    assert_eq!(per_target.len(), 3, "{per_target:?}");

    // Without the header: the weighted order (equal weights: turns).
    let count = tally(env.addr, "/user", 6).await;
    assert_eq!(count.values().copied().collect::<Vec<_>>(), [2, 2, 2]);

    // By cookie.
    for s in 0..20 {
        let cookie = format!("theme=dark; session=s{s}");
        let first = hit(&client, env.addr, "/session", Some(("cookie", &cookie))).await;
        for _ in 0..2 {
            let again = hit(&client, env.addr, "/session", Some(("cookie", &cookie))).await;
            assert_eq!(again, first, "session s{s}");
        }
    }

    // A dead target: its keys go to the next distinct target of the table — the same
    // one every time, before and after the dead target is ejected.
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for _round in 0..3 {
        for u in 0..30 {
            let user = format!("user-{u}");
            let who = hit(&client, env.addr, "/dead", Some(("x-user", &user))).await;
            seen.entry(user).or_default().insert(who);
        }
    }
    assert!(seen.values().all(|s| s.len() == 1), "{seen:?}");
}

/// `portico validate` on a file with these upstreams: (exit code, stderr).
fn validate(upstreams: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("portico.yaml");
    std::fs::write(
        &file,
        format!("{upstreams}routes:\n  - {{name: r, paths: [\"/\"], upstream: u}}\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_checks_hash_key() {
    let t = "    targets: [{url: \"http://127.0.0.1:9001\"}]\n";
    // consistent_hash without hash_key (located at the upstream).
    let (code, err) = validate(&format!(
        "upstreams:\n  u:\n{t}    balance: consistent_hash\n"
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            ":3:5: upstreams.u.hash_key: `balance: consistent_hash` needs a `hash_key`: the request key to hash"
        ),
        "{err}"
    );
    // hash_key with another algorithm.
    let (code, err) = validate(&format!(
        "upstreams:\n  u:\n{t}    balance: p2c_ewma\n    hash_key: ip\n"
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(":5:15: upstreams.u.hash_key: `hash_key` is only used by `balance: consistent_hash` (this upstream has `p2c_ewma`)"),
        "{err}"
    );
    // Not a key of the shared grammar: reported once, where it is written.
    let (code, err) = validate(&format!(
        "upstreams:\n  u:\n{t}    balance: consistent_hash\n    hash_key: \"headr:x-user\"\n"
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(":5:15: upstreams.u.hash_key: `headr:x-user` is not a key; use ip, consumer"),
        "{err}"
    );
    assert!(!err.contains("needs a `hash_key`"), "{err}");
    let (code, err) = validate(&format!(
        "upstreams:\n  u:\n{t}    balance: consistent_hash\n    hash_key: [ip, \"jwt:sub\"]\n"
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("upstreams.u.hash_key[1]: `jwt:sub` is not a key"),
        "{err}"
    );
    // Valid: one key or a list of parts.
    for key in [
        "\"header:x-user\"",
        "[consumer, \"cookie:session\"]",
        "ip",
        "\"query:user\"",
    ] {
        let (code, err) = validate(&format!(
            "upstreams:\n  u:\n{t}    balance: consistent_hash\n    hash_key: {key}\n"
        ));
        assert_eq!(code, Some(0), "{key}: {err}");
    }
}
