//! The running gateway: the current snapshot, the state that outlives snapshots, the
//! listeners, and reload/shutdown. Every reload path (file watch, SIGHUP, admin API)
//! goes through [`Gateway::reload`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use portico_config::{Diagnostic, Diagnostics, KeyPath, Loaded};
use portico_plugins::Catalog;
use portico_store::{Declared, Identity};
use portico_upstream::discovery::SourceCtx;
use portico_upstream::supervise::Supervisor;
use portico_upstream::UpstreamState;

use crate::access_log::AccessLog;
use crate::metrics::Metrics;
use crate::server::{ListenKey, Listeners};
use crate::snapshot::{compile, Snapshot};

/// The gateway process state.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    pub upstreams: UpstreamState,
    /// Discovery and active health check tasks.
    supervisor: Supervisor,
    /// What discovery sources share (the service registry).
    pub sources: SourceCtx,
    /// Route name used for requests no route took.
    pub no_route_name: Arc<str>,
    generation: AtomicU64,
    config_path: Option<PathBuf>,
    listeners: tokio::sync::Mutex<Listeners>,
    ready: AtomicBool,
    /// Consumers and credentials: the store and the index built from it.
    pub identity: Arc<Identity>,
    /// Policy state that outlives snapshots (rate-limit counters, in-flight counts).
    pub policy_state: Arc<portico_plugins::PolicyState>,
}

/// A client connection's copy of the current snapshot, looked up again only when a
/// reload published a new one. A request then costs a plain load (the generation)
/// instead of an `ArcSwap` load and its own reference count updates (four atomic
/// read-modify-writes). Each request still starts on the snapshot current when it
/// starts; an idle keep-alive connection holds the one its last request used until its
/// next request or its end.
pub struct SnapshotCache {
    generation: u64,
    snap: Arc<Snapshot>,
}

impl SnapshotCache {
    /// The current snapshot.
    pub fn current(&mut self, gw: &Gateway) -> &Arc<Snapshot> {
        let g = gw.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.snap = gw.snapshot();
            self.generation = g;
        }
        &self.snap
    }
}

/// How often the store file is checked for changes made by another process.
const STORE_POLL: Duration = Duration::from_millis(500);

fn declared(l: &Loaded, prev: Option<&Declared>) -> Result<Declared, Diagnostics> {
    Declared::compile(&l.config.consumers, prev).map_err(|e| {
        Diagnostics(vec![
            l.locate(Diagnostic::new(KeyPath::root().key("consumers"), e))
        ])
    })
}

fn access_log_path(l: &Loaded) -> Option<PathBuf> {
    l.config.access_log.path.as_ref().map(|p| l.resolve(p))
}

fn wanted_listeners(l: &Loaded) -> Vec<ListenKey> {
    let c = &l.config;
    let mut v: Vec<ListenKey> = c
        .listen
        .iter()
        .filter_map(|a| a.parse().ok())
        .map(|addr| ListenKey { addr, tls: false })
        .collect();
    if let Some(t) = &c.tls {
        v.extend(
            t.listen
                .iter()
                .filter_map(|a| a.parse().ok())
                .map(|addr| ListenKey { addr, tls: true }),
        );
    }
    v
}

impl Gateway {
    /// Compile the configuration, bind the listeners and start serving.
    pub async fn start(
        loaded: Loaded,
        config_path: Option<PathBuf>,
    ) -> Result<Arc<Gateway>, Diagnostics> {
        let metrics = Arc::new(Metrics::default());
        let upstreams = UpstreamState::default();
        let log_path = access_log_path(&loaded);
        let wanted = wanted_listeners(&loaded);
        let store_path = loaded.resolve(&loaded.config.store.path);
        let identity = Identity::open(&store_path, declared(&loaded, None)?).map_err(|e| {
            Diagnostics(vec![loaded.locate(Diagnostic::new(
                KeyPath::root().key("store").key("path"),
                e.to_string(),
            ))])
        })?;
        let identity = Arc::new(identity);
        identity.watch(STORE_POLL);
        let policy_state = Arc::new(portico_plugins::PolicyState::default());
        let (snap, staged) = compile(loaded, &upstreams, &metrics, 1, &identity, &policy_state)?;
        upstreams.commit(staged);
        let sources = SourceCtx {
            base_dir: Some(snap.loaded.base_dir.clone()),
            ..SourceCtx::default()
        };
        let gw = Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snap),
            access_log: AccessLog::start(log_path, metrics.clone()),
            metrics,
            upstreams,
            supervisor: Supervisor::default(),
            sources,
            no_route_name: Arc::from(""),
            generation: AtomicU64::new(1),
            config_path,
            listeners: tokio::sync::Mutex::new(Listeners::default()),
            ready: AtomicBool::new(false),
            identity,
            policy_state,
        });
        {
            let mut l = gw.listeners.lock().await;
            let bound = l
                .bind_missing(&wanted)
                .map_err(|(k, e)| bind_error(&gw.snapshot(), k, e))?;
            l.start(&gw, bound);
        }
        gw.supervisor.sync(&gw.snapshot().upstreams, &gw.sources);
        gw.ready.store(true, Ordering::Release);
        Ok(gw)
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// A copy of the current snapshot for a client connection to keep between requests
    /// (see [`SnapshotCache`]).
    pub fn snapshot_cache(&self) -> SnapshotCache {
        // The generation first: a reload in between only makes the next request look
        // again.
        let generation = self.generation.load(Ordering::Acquire);
        SnapshotCache {
            generation,
            snap: self.snapshot(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn config_path(&self) -> Option<&PathBuf> {
        self.config_path.as_ref()
    }

    /// True while serving; false once shutdown started.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Re-read the configuration file, validate, compile and swap it in atomically.
    /// On any problem the current snapshot keeps serving.
    pub async fn reload(self: &Arc<Self>) -> Result<u64, Diagnostics> {
        let result = self.reload_inner().await;
        match &result {
            Ok(g) => {
                self.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(generation = g, "configuration reloaded");
            }
            Err(d) => {
                self.metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(problems = %d, "configuration rejected; still serving the previous one");
            }
        }
        result
    }

    async fn reload_inner(self: &Arc<Self>) -> Result<u64, Diagnostics> {
        let Some(path) = self.config_path.clone() else {
            return Err(Diagnostics(vec![Diagnostic::new(
                KeyPath::root(),
                "running on the built-in defaults; there is no file to reload",
            )]));
        };
        let mut listeners = self.listeners.lock().await;
        let loaded = portico_config::load_file(&path, &Catalog)?;
        let old = self.snapshot();
        if loaded.config.admin.listen != old.loaded.config.admin.listen {
            tracing::warn!("admin.listen changed; the admin listener moves only on restart");
        }
        if loaded.config.workers != old.loaded.config.workers {
            tracing::warn!("workers changed; the number of worker threads changes only on restart");
        }
        if loaded.config.store != old.loaded.config.store {
            tracing::warn!("store.path changed; the store moves only on restart");
        }
        let log_path = access_log_path(&loaded);
        let wanted = wanted_listeners(&loaded);
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        // Hashing new passwords (Argon2id) takes tens of milliseconds each: not on the
        // runtime's threads.
        let consumers = loaded.config.consumers.clone();
        let prev = self.identity.declared();
        let hashed =
            tokio::task::spawn_blocking(move || Declared::compile(&consumers, Some(&prev)))
                .await
                .unwrap_or_else(|_| Err("hashing the declared credentials failed".into()));
        let declared = hashed.map_err(|e| {
            Diagnostics(vec![
                loaded.locate(Diagnostic::new(KeyPath::root().key("consumers"), e))
            ])
        })?;
        // Compiling changes no serving state: what the snapshot makes anew is staged
        // and committed only once nothing can reject it.
        let (snap, staged) = compile(
            loaded,
            &self.upstreams,
            &self.metrics,
            generation,
            &self.identity,
            &self.policy_state,
        )?;
        let bound = listeners
            .bind_missing(&wanted)
            .map_err(|(k, e)| bind_error(&snap, k, e))?;
        if let Err(e) = self.identity.set_declared(declared) {
            tracing::error!(error = %e, "cannot re-read the store; consumers from the file apply once it reads");
        }
        self.upstreams.commit(staged);
        let snap = Arc::new(snap);
        self.snapshot.store(snap.clone());
        // Released after the store: whoever sees this generation loads this snapshot
        // (or a newer one).
        self.generation.store(generation, Ordering::Release);
        listeners.start(self, bound);
        listeners.stop_unwanted(&wanted);
        self.access_log.set_target(log_path);
        self.upstreams.retain(&snap.upstreams);
        self.supervisor.sync(&snap.upstreams, &self.sources);
        let mirrored: Vec<&str> = snap
            .routes
            .iter()
            .filter(|r| r.mirror.is_some())
            .map(|r| &*r.name)
            .collect();
        self.metrics.retain_mirrors(&mirrored);
        Ok(generation)
    }

    /// Stop accepting, let in-flight requests finish (up to the grace period), return.
    pub async fn shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        let grace = self.snapshot().loaded.config.shutdown.grace.0;
        tracing::info!(
            ?grace,
            "shutting down: no new connections; finishing in-flight requests"
        );
        self.listeners.lock().await.shutdown(grace).await;
        self.supervisor.stop();
        // The last requests' log lines, before the process exits.
        let log = self.access_log.clone_handle();
        let flushed = tokio::task::spawn_blocking(move || log.flush(Duration::from_secs(2)))
            .await
            .unwrap_or(false);
        if !flushed {
            tracing::warn!("the access log could not be flushed within 2s");
        }
        // The last `quota` counts of local mode (saved every second otherwise).
        if let Some(r) = portico_plugins::plugins::quota::registry(&self.policy_state) {
            let _ = tokio::task::spawn_blocking(move || r.flush()).await;
        }
    }

    /// Watch the configuration file and reload when it changes (polling every 250 ms:
    /// robust against editors that replace files and against missed events).
    pub fn watch_file(self: &Arc<Self>) {
        let Some(path) = self.config_path.clone() else {
            return;
        };
        let gw = Arc::downgrade(self);
        tokio::spawn(async move {
            let stamp = |p: &PathBuf| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
            };
            let mut last = stamp(&path);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Some(gw) = gw.upgrade() else { return };
                if !gw.is_ready() {
                    return;
                }
                let now = stamp(&path);
                if now.is_some() && now != last {
                    last = now;
                    let _ = gw.reload().await;
                }
            }
        });
    }
}

fn bind_error(snap: &Snapshot, k: ListenKey, e: std::io::Error) -> Diagnostics {
    let c = &snap.loaded.config;
    let path = if k.tls {
        let i = c
            .tls
            .as_ref()
            .and_then(|t| t.listen.iter().position(|a| a.parse().ok() == Some(k.addr)))
            .unwrap_or(0);
        KeyPath::root().key("tls").key("listen").index(i)
    } else {
        let i = c
            .listen
            .iter()
            .position(|a| a.parse().ok() == Some(k.addr))
            .unwrap_or(0);
        KeyPath::root().key("listen").index(i)
    };
    Diagnostics(vec![snap.loaded.locate(Diagnostic::new(
        path,
        format!("cannot listen on {}: {e}", k.addr),
    ))])
}
