//! The background tasks that keep target sets current: one discovery task and one
//! active health checker per upstream that configures them. [`Supervisor::sync`] runs
//! after every published snapshot: it starts what is new, restarts what changed (a
//! new [`Live`] or new settings) and stops what is gone. Tasks hold the `Live` they
//! update, never a snapshot.
//!
//! Turning active checks off is applied here too, once the snapshot that does it is
//! published: the checker is stopped (no verdict of a round under way lands after
//! that, see [`Stop`]), then what active checks said is forgotten.

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
    stop: Arc<Stop>,
}

impl<C> Drop for Running<C> {
    fn drop(&mut self) {
        self.stop.stop();
        self.handle.abort();
    }
}

/// Whether a task was stopped. Aborting a task does not stop a poll under way on
/// another thread; a task that must not act once stopped does so through
/// [`Stop::unless_stopped`].
#[derive(Debug, Default)]
pub struct Stop(Mutex<bool>);

impl Stop {
    /// Stop: once this returns, no `unless_stopped` runs its action.
    pub fn stop(&self) {
        *self.0.lock() = true;
    }

    /// Run `action` unless stopped (`None` then).
    pub fn unless_stopped<R>(&self, action: impl FnOnce() -> R) -> Option<R> {
        let stopped = self.0.lock();
        (!*stopped).then(action)
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
            |u, d, _| discovery::spawn(u.name.clone(), d, u.live.clone(), ctx.clone()),
        );
        sync_one(
            &self.checks,
            upstreams,
            |u| u.active.clone(),
            |u, c, stop| crate::check::spawn(u.name.clone(), c, u.live.clone(), stop),
        );
        // Active checks off (or turned off by this snapshot, their checker stopped
        // above): what they last said must not keep targets out of rotation.
        for u in upstreams.values().filter(|u| u.active.is_none()) {
            for t in &u.live.current().targets {
                t.health.clear_active();
            }
        }
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
    start: impl Fn(&Upstream, C, Arc<Stop>) -> JoinHandle<()>,
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
            let stop = Arc::new(Stop::default());
            let handle = start(u, settings.clone(), stop.clone());
            tasks.insert(
                name.clone(),
                Running {
                    live: u.live.clone(),
                    settings,
                    handle,
                    stop,
                },
            );
        }
    }
}
