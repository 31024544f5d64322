//! Runs the real `portico` binary as a child process in a temporary directory.
//!
//! All waits are bounded; the blocking ones block the calling thread only (see the
//! crate-level runtime note), and the `*_async` variants move them to tokio's
//! blocking pool.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Maximum time [`Gateway::start`] waits for `/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

const CONFIG_FILE: &str = "portico.yaml";
const STDOUT_FILE: &str = "stdout.log";
const STDERR_FILE: &str = "stderr.log";
/// How much of each log is printed when a test panics with a live gateway.
const LOG_TAIL_ON_PANIC: usize = 16 * 1024;

/// A running gateway process. Dropping it kills the process (SIGKILL) and removes its
/// directory; if the thread is panicking, the tail of its logs is printed first.
pub struct Gateway {
    child: Child,
    dir: TempDir,
    config_path: PathBuf,
}

impl Gateway {
    /// Writes `config_yaml` to `<tempdir>/portico.yaml`, runs `bin run --config <file>`
    /// and waits (at most 20 s) until `GET http://{ready_addr}/ready` answers 200.
    /// Panics with the process logs if it exits or does not become ready.
    pub fn start(bin: &Path, config_yaml: &str, ready_addr: SocketAddr) -> Gateway {
        let mut gw = Self::spawn(bin, config_yaml);
        if let Err(e) = gw.wait_ready(ready_addr, READY_TIMEOUT) {
            panic!("gateway did not become ready: {e}");
        }
        gw
    }

    /// [`Gateway::start`] on tokio's blocking pool, so the calling runtime (and the
    /// upstreams on it) keep running while waiting.
    pub async fn start_async(bin: &Path, config_yaml: &str, ready_addr: SocketAddr) -> Gateway {
        let (bin, yaml) = (bin.to_owned(), config_yaml.to_owned());
        tokio::task::spawn_blocking(move || Self::start(&bin, &yaml, ready_addr))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Like [`Gateway::start`] with custom arguments (e.g. `&["run"]` with no config);
    /// the config file is written only when `config_yaml` is `Some`.
    pub fn start_with_args(
        bin: &Path,
        args: &[&str],
        config_yaml: Option<&str>,
        ready_addr: SocketAddr,
    ) -> Gateway {
        let mut gw = Self::spawn_with(bin, args, config_yaml, &[]);
        if let Err(e) = gw.wait_ready(ready_addr, READY_TIMEOUT) {
            panic!("gateway did not become ready: {e}");
        }
        gw
    }

    /// Writes the config and runs `bin run --config <file>` without waiting for
    /// readiness (e.g. to assert that an invalid config makes it exit).
    pub fn spawn(bin: &Path, config_yaml: &str) -> Gateway {
        Self::spawn_with(bin, &[], Some(config_yaml), &[])
    }

    /// The general constructor: runs `bin args...` (or `bin run --config <file>` when
    /// `args` is empty) with cwd = a fresh temp dir, extra environment `envs`, stdin
    /// closed, stdout/stderr to `stdout.log`/`stderr.log` in that dir. Does not wait.
    pub fn spawn_with(
        bin: &Path,
        args: &[&str],
        config_yaml: Option<&str>,
        envs: &[(&str, &str)],
    ) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("portico-e2e-")
            .tempdir()
            .unwrap();
        let config_path = dir.path().join(CONFIG_FILE);
        if let Some(yaml) = config_yaml {
            std::fs::write(&config_path, yaml).unwrap();
        }
        let stdout = std::fs::File::create(dir.path().join(STDOUT_FILE)).unwrap();
        let stderr = std::fs::File::create(dir.path().join(STDERR_FILE)).unwrap();
        let mut cmd = Command::new(bin);
        if args.is_empty() {
            cmd.arg("run").arg("--config").arg(&config_path);
        } else {
            cmd.args(args);
        }
        cmd.current_dir(dir.path())
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
        Gateway {
            child,
            dir,
            config_path,
        }
    }

    /// Polls `GET http://{addr}/ready` until it answers 200 (`Ok`), the process exits
    /// or `timeout` passes (`Err` with the reason and the logs).
    pub fn wait_ready(&mut self, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("process exited with {status}\n{}", self.logs()));
            }
            if http_get_status(addr, "/ready") == Some(200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no 200 from http://{addr}/ready within {timeout:?}\n{}",
                    self.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The temp directory (cwd of the process).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `<dir>/portico.yaml`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Atomically replaces the config file (writes a temp file in the same dir, then renames).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join(".portico.yaml.tmp");
        let mut file = std::fs::File::create(&tmp).unwrap();
        file.write_all(yaml.as_bytes()).unwrap();
        file.sync_all().unwrap();
        drop(file);
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Everything the process wrote to stdout so far (lossy UTF-8).
    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.path().join(STDOUT_FILE))
    }

    /// Everything the process wrote to stderr so far (lossy UTF-8).
    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join(STDERR_FILE))
    }

    /// Both logs, labelled, for assertion messages.
    pub fn logs(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// Waits until stdout or stderr contains `needle`; returns whether it appeared.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB (`VmRSS` from `/proc/PID/status`). Panics if the
    /// process is gone.
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {path}"))
    }

    /// Sends a signal via `kill -s SIG PID`; `sig` is e.g. `"HUP"`, `"TERM"` or
    /// `"SIGINT"`. Returns whether `kill` succeeded.
    pub fn signal(&self, sig: &str) -> bool {
        let sig = sig.strip_prefix("SIG").unwrap_or(sig);
        Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits for the process to exit; `None` if still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "=== portico (pid {}) in {} ===\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
                self.pid(),
                self.dir.path().display(),
                tail(&self.stdout(), LOG_TAIL_ON_PANIC),
                tail(&self.stderr(), LOG_TAIL_ON_PANIC),
            );
        }
        self.kill();
    }
}

/// A gateway listening on a free `127.0.0.1` port, with its admin API on another.
pub struct LocalGateway {
    /// The process.
    pub gw: Gateway,
    /// The proxy listener.
    pub addr: SocketAddr,
    /// The admin API listener.
    pub admin: SocketAddr,
}

impl LocalGateway {
    /// Picks two free ports and starts `bin` (as [`Gateway::start_async`], waiting for
    /// the admin `/ready`) with the config
    ///
    /// ```yaml
    /// listen: ["127.0.0.1:PORT"]
    /// admin:
    ///   listen: "127.0.0.1:ADMIN_PORT"
    /// ```
    ///
    /// followed by `rest_yaml` (more top-level keys, e.g. `upstreams:` and `routes:`).
    pub async fn start(bin: &Path, rest_yaml: &str) -> LocalGateway {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let yaml = format!("listen: [\"{addr}\"]\nadmin:\n  listen: \"{admin}\"\n{rest_yaml}");
        let gw = Gateway::start_async(bin, &yaml, admin).await;
        LocalGateway { gw, addr, admin }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A currently free TCP port on `127.0.0.1` (bound once to check, then released).
///
/// Ports come from 20000–32767, below Linux's ephemeral range (32768–60999 by
/// default), and from a counter shared by the whole test binary: an outgoing connection
/// of another test cannot take the port between this call and the gateway binding it
/// (which for a listener added by a reload can be seconds later), and two tests never
/// get the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const BASE: u32 = 20000;
    const SPAN: u32 = 12700;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Binaries run one after another, but start each at its own offset anyway.
    let seed = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (BASE + (seed + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {BASE}..{}", BASE + SPAN)
}

/// A minimal blocking `GET` with short timeouts; returns the status code, or `None`
/// if anything fails (connection refused, timeout, garbage).
pub fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let timeout = Duration::from_millis(1000);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).ok()?;
    let mut buf = [0u8; 64];
    let mut len = 0;
    // Read just enough for the status line.
    while len < 12 {
        let n = stream.read(&mut buf[len..]).ok()?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = std::str::from_utf8(&buf[..len]).ok()?;
    let code = head.strip_prefix("HTTP/1.")?.get(2..5)?;
    code.parse().ok()
}

/// Locates the `portico` binary: `$PORTICO_BIN` if set, else `portico` next to the
/// running test's target profile dir (`target/<profile>/portico`). Inside the
/// `portico` package itself, prefer `env!("CARGO_BIN_EXE_portico")`.
pub fn portico_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTICO_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("unexpected test binary location {}", exe.display()));
    let bin = profile_dir.join("portico");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p portico`) or set PORTICO_BIN",
        bin.display()
    );
    bin
}
