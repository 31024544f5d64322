//! Third-party servers an end-to-end test runs as child processes (dnsmasq, etcd, ...).
//!
//! [`require`] finds a server's binary or fails the test naming the package to install:
//! CI installs them (`scripts/test.sh`), so a missing one is a broken setup, not a
//! reason to skip. A [`Daemon`] writes its output to a log file, is killed (SIGKILL)
//! and reaped when dropped, and prints the tail of its log if the test is failing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The first of `candidates` (absolute paths, or names looked up in `PATH`) that
/// exists. Panics naming `package` when none does.
pub fn require(candidates: &[&str], package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for c in candidates {
        let p = Path::new(c);
        if p.is_absolute() {
            if p.is_file() {
                return p.to_path_buf();
            }
            continue;
        }
        for dir in std::env::split_paths(&path) {
            let f = dir.join(c);
            if f.is_file() {
                return f;
            }
        }
    }
    panic!(
        "this test needs {} and found none of {candidates:?}: install the Debian package `{package}` \
         (scripts/test.sh does)",
        candidates.first().copied().unwrap_or("a server")
    )
}

/// A running third-party server.
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program` with `args`, stdout and stderr appended to `log`. Panics if it
    /// cannot be started.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Daemon {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out.try_clone().unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Daemon {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal via `kill -s SIG PID` (`"HUP"`, `"TERM"`, ...); whether it worked.
    pub fn signal(&self, sig: &str) -> bool {
        let sig = sig.strip_prefix("SIG").unwrap_or(sig);
        Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Whether the process still runs. Panics with its log if it exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM, waiting up to `timeout` before SIGKILL.
    pub fn stop(&mut self, timeout: Duration) {
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let mut start = log.len().saturating_sub(8 * 1024);
            while !log.is_char_boundary(start) {
                start += 1;
            }
            eprintln!(
                "=== {} (pid {}) log tail ===\n{}",
                self.name,
                self.pid(),
                &log[start..]
            );
        }
    }
}
