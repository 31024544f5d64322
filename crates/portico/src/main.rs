//! The `portico` command: run the gateway, validate a configuration, print its schema.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use portico_config::{load_file, load_str, Diagnostics, Loaded, DEFAULT_CONFIG};
use portico_plugins::Catalog;
use portico_proxy::Gateway;

#[cfg(target_os = "linux")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "portico",
    version,
    about = "Portico: a fast, safe API gateway in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Without --config: ./portico.yaml if present, else the built-in defaults.
    Run {
        /// Configuration file (YAML or JSON).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file; prints every problem and exits 1 if there is any.
    Validate {
        /// Configuration file (YAML or JSON).
        file: PathBuf,
    },
    /// Print the JSON Schema of the configuration (for editor completion).
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { file } => validate(&file),
        Command::Schema => {
            let schema = portico_config::schema(&Catalog);
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Command::Run { config } => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("portico: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn validate(file: &Path) -> ExitCode {
    match load_file(file, &Catalog) {
        Ok(loaded) => match check_compiles(loaded) {
            Ok(()) => {
                println!("{}: configuration is valid", file.display());
                ExitCode::SUCCESS
            }
            Err(d) => report(&d),
        },
        Err(d) => report(&d),
    }
}

/// Files (certificates, CA bundles) are only checked when compiling; do that too.
fn check_compiles(loaded: Loaded) -> Result<(), Diagnostics> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            Diagnostics(vec![portico_config::Diagnostic::new(
                portico_config::KeyPath::root(),
                e.to_string(),
            )])
        })?;
    rt.block_on(async {
        let state = portico_proxy::UpstreamState::default();
        let metrics = portico_proxy::metrics::Metrics::default();
        let identity = std::sync::Arc::new(portico_proxy::store::Identity::detached());
        let policy_state = std::sync::Arc::new(portico_plugins::PolicyState::default());
        // What compiling staged is dropped: validating changes nothing.
        portico_proxy::snapshot::compile(loaded, &state, &metrics, 0, &identity, &policy_state)
            .map(|_| ())
    })
}

fn report(d: &Diagnostics) -> ExitCode {
    for p in &d.0 {
        eprintln!("error: {p}");
    }
    eprintln!(
        "{} problem{} found",
        d.0.len(),
        if d.0.len() == 1 { "" } else { "s" }
    );
    ExitCode::FAILURE
}

fn load(config: Option<PathBuf>) -> anyhow::Result<(Loaded, Option<PathBuf>)> {
    let path = config.or_else(|| {
        let p = PathBuf::from("portico.yaml");
        p.exists().then_some(p)
    });
    match path {
        Some(p) => {
            let abs = std::fs::canonicalize(&p).unwrap_or(p);
            let loaded = load_file(&abs, &Catalog)
                .map_err(|d| anyhow::anyhow!("invalid configuration:\n{d}"))?;
            Ok((loaded, Some(abs)))
        }
        None => {
            let loaded = load_str(DEFAULT_CONFIG, None, PathBuf::from("."), &Catalog)
                .map_err(|d| anyhow::anyhow!("built-in defaults are invalid:\n{d}"))?;
            Ok((loaded, None))
        }
    }
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PORTICO_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let (loaded, path) = load(config)?;
    let workers = loaded.config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // One worker: a current-thread runtime does the same work without the
    // work-stealing scheduler's cross-thread bookkeeping.
    let rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .thread_name("portico-worker")
            .on_thread_unpark(portico_plugins::clock::tick)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("portico-worker")
            .on_thread_unpark(portico_plugins::clock::tick)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    rt.block_on(serve(loaded, path))
}

async fn serve(loaded: Loaded, path: Option<PathBuf>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let admin_addr = loaded.config.admin.listen.clone();
    match &path {
        Some(p) => tracing::info!(config = %p.display(), "starting"),
        None => tracing::info!(
            "starting on the built-in defaults (demo route on /*; see docs/configuration.md)"
        ),
    }
    let gw = Gateway::start(loaded, path)
        .await
        .map_err(|d| anyhow::anyhow!("{d}"))?;
    let admin_sock: std::net::SocketAddr = admin_addr.parse().context("admin.listen")?;
    let admin_listener = portico_proxy::server::bind(admin_sock)
        .with_context(|| format!("cannot listen on {admin_sock} (admin.listen)"))?;
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(portico_admin::serve(gw.clone(), admin_listener, async {
        let _ = admin_stop_rx.await;
    }));
    gw.watch_file();

    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                let _ = gw.reload().await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    gw.shutdown().await;
    let _ = admin_stop_tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), admin).await;
    tracing::info!("stopped");
    Ok(())
}
