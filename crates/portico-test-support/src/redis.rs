//! A `redis-server` of the test's own (no persistence), for the policies that share
//! state through Redis. Its absence fails the test: CI installs it (scripts/test.sh).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` on `127.0.0.1:port`; killed when dropped.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    /// Start one on `port` and wait (10 s at most) until it listens.
    pub fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start `redis-server` ({e}): this test needs it; install it (apt-get install redis-server; scripts/test.sh does)")
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { port, child }
    }

    /// Kill it now (a test of what happens while Redis is down).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
