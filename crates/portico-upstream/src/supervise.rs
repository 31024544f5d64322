//! The background tasks that keep target sets current: one discovery task and one
//! active health checker per upstream that configures them. [`Supervisor::sync`] runs
//! after every published snapshot: it starts what is new, restarts what changed (a
//! new [`Live`] or new settings) and stops what is gone. Tasks hold the `Live` they
//! update, never a snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use portico_config::discovery::{ActiveCheck, Discovery};
use tokio::task::JoinHandle;

use crate::discovery::{self, SourceCtx};
use crate::{Live, Upstream};

/// A running task and what it was started with.
struct Running<C> {
    live: Arc<Live>,
    settings: C,
    handle: JoinHandle<()>,
}

impl<C> Drop for Running<C> {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Starts and stops the per-upstream background tasks.
#[derive(Default)]
pub struct Supervisor {
    discovery: Mutex<HashMap<String, Running<Discovery>>>,
    checks: Mutex<HashMap<String, Running<ActiveCheck>>>,
}

impl Supervisor {
    /// Bring the tasks in line with `upstreams` (the snapshot just published). Must be
    /// called on a tokio runtime.
    pub fn sync(&self, upstreams: &HashMap<String, Arc<Upstream>>, ctx: &SourceCtx) {
        sync_one(
            &self.discovery,
            upstreams,
            |u| u.discovery.clone(),
            |u, d| discovery::spawn(u.name.clone(), d, u.live.clone(), ctx.clone()),
        );
        sync_one(
            &self.checks,
            upstreams,
            |u| u.active.clone(),
            |u, c| crate::check::spawn(u.name.clone(), c, u.live.clone()),
        );
    }

    /// Stop every task (shutdown).
    pub fn stop(&self) {
        self.discovery.lock().clear();
        self.checks.lock().clear();
    }
}

fn sync_one<C: PartialEq + Clone>(
    tasks: &Mutex<HashMap<String, Running<C>>>,
    upstreams: &HashMap<String, Arc<Upstream>>,
    wanted: impl Fn(&Upstream) -> Option<C>,
    start: impl Fn(&Upstream, C) -> JoinHandle<()>,
) {
    let mut tasks = tasks.lock();
    tasks.retain(|name, r| {
        upstreams.get(name).is_some_and(|u| {
            Arc::ptr_eq(&u.live, &r.live) && wanted(u).as_ref() == Some(&r.settings)
        })
    });
    for (name, u) in upstreams {
        if tasks.contains_key(name) {
            continue;
        }
        if let Some(settings) = wanted(u) {
            let handle = start(u, settings.clone());
            tasks.insert(
                name.clone(),
                Running {
                    live: u.live.clone(),
                    settings,
                    handle,
                },
            );
        }
    }
}
