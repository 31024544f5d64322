//! Active health checks: every target of an upstream is probed on a jittered timer;
//! consecutive failures take it out of rotation, consecutive successes bring it back.

use std::sync::Arc;

use portico_config::discovery::ActiveCheck;
use tokio::task::JoinHandle;

use crate::Live;

/// Start the checker of upstream `name`.
pub fn spawn(name: Arc<str>, cfg: ActiveCheck, live: Arc<Live>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let _ = (name, cfg, live);
    })
}
