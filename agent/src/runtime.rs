//! The daemon's life: start-up, the tick thread, the HTTP server, signals, reload and shutdown.
//!
//! Signals map to intent here and only here: TERM or INT drains (readiness turns 503, sd_notify
//! STOPPING, tasks stop, exit 0 within the drain deadline), a second one exits at once, HUP
//! reloads the configuration (an invalid file leaves the running one in place).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Shared;
use crate::identity::cri;
use crate::supervise::{notify, tick_loop, Command};
use crate::tick::{Deps, Ticker};
use tally_exporters::Snapshot;

/// How long draining may take before the process exits anyway: a second under the 5 s that
/// operators are promised, for the tick thread and the exit itself.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(4);

/// How long the OTLP push may take to deliver the last tick on shutdown.
const OTLP_FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// Where the running configuration came from, so HUP can read it again.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// No file: embedded defaults; HUP looks for the default path again.
    Defaults,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub source: ConfigSource,
    /// `--listen` / `TALLY_LISTEN`, which wins over the file on every (re)load.
    pub listen_override: Option<SocketAddr>,
}

/// Runs the agent until a signal stops it.
pub fn run(config: Config, options: Options) -> anyhow::Result<()> {
    // The collector keeps three cgroup files open per workload, up to a budget sized from this
    // limit; the usual soft limit of 1024 would leave room for only a few hundred workloads.
    let open_file_limit = match crate::sys::raise_fd_limit() {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            None
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tally-rt")
        .on_thread_start(crate::sys::short_slice)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(config, options, open_file_limit))
}

async fn serve(
    config: Config,
    options: Options,
    open_file_limit: Option<u64>,
) -> anyhow::Result<()> {
    // Before anything can tell a supervisor we are ready: a SIGTERM that follows READY=1 at once
    // must drain, not meet the default action.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let listen = effective_listen(&config, &options)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let listen = listener.local_addr().unwrap_or(listen);

    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared::default());
    let cri =
        (!config.cri.endpoints.is_empty()).then(|| cri::spawn(&config.cri, cancel.child_token()));
    let otlp_stats = Arc::new(tally_exporters::otlp::OtlpStats::default());
    let otlp_pusher = match crate::otlp::settings(&config) {
        None => None,
        Some(settings) => Some(
            tally_exporters::otlp::Pusher::new(settings, otlp_stats.clone())
                .context("configuring the OTLP exporter")?,
        ),
    };
    let alerts = tally_exporters::alerts::AlertSender::spawn(
        crate::alerts::settings(&config),
        Arc::default(),
        &tokio::runtime::Handle::current(),
    )
    .context("configuring alert delivery")?;
    let pod_resources = (!config.gpu.pod_resources_socket.as_os_str().is_empty()).then(|| {
        crate::identity::podresources::spawn(
            config.gpu.pod_resources_socket.clone(),
            config.tick_interval(),
            cancel.child_token(),
        )
    });
    let cluster = crate::cluster::spawn(&config, cancel.child_token());
    let board = crate::nri::Settings::of(&config).map(|_| {
        let board = Arc::new(crate::budget::verdict::Board::default());
        crate::nri::spawn(&config, board.clone(), cri.clone(), cancel.child_token());
        board
    });
    let deps = Deps {
        cluster: Some(cluster.clone()),
        board,
        cri,
        pod_resources,
        otlp: otlp_pusher.is_some().then_some(otlp_stats),
        alerts: Some(alerts.clone()),
        open_file_limit,
    };
    let ticker = Ticker::new(&config, deps).context("detecting cgroup hierarchies")?;
    let (snapshots_tx, snapshots) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));

    let (commands, inbox) = mpsc::channel();
    let tick_thread = {
        let shared = shared.clone();
        let interval = config.tick_interval();
        std::thread::Builder::new()
            .name("tally-tick".into())
            .spawn(move || tick_loop(ticker, interval, shared, inbox, snapshots_tx))
            .context("starting the tick thread")?
    };

    let server = {
        let cancel = cancel.clone();
        let app = crate::server::router(shared.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await
        })
    };
    let otlp_task = otlp_pusher.map(|pusher| {
        let interval = Duration::from_secs(config.otlp.interval_secs);
        tokio::spawn(crate::otlp::run(
            pusher,
            interval,
            snapshots,
            cancel.clone(),
            OTLP_FLUSH_DEADLINE,
        ))
    });
    tracing::info!(%listen, version = env!("CARGO_PKG_VERSION"), "tally agent started");

    let mut current = config;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Some(next) = reload(&current, &options) {
                    if crate::nri::Settings::of(&next) != crate::nri::Settings::of(&current) {
                        tracing::warn!("`[admission]` changed: the NRI plugin takes it at the next restart");
                    }
                    current = next;
                    if let Err(e) = alerts.update_config(crate::alerts::settings(&current)) {
                        tracing::error!(error = %e, "reload: keeping the previous alert targets");
                    }
                    cluster.update(&current);
                    let _ = commands.send(Command::Reload(Box::new(current.clone())));
                }
            }
        }
    }

    tracing::info!("draining");
    shared.start_draining();
    notify(&[("STOPPING", "1")]);
    // A second signal means now.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    cancel.cancel();
    let _ = commands.send(Command::Stop);
    let deadline = Instant::now() + DRAIN_DEADLINE;
    match tokio::time::timeout(DRAIN_DEADLINE, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "http server stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "http server task failed"),
        Err(_) => tracing::warn!("http server did not stop within the drain deadline"),
    }
    if let Some(task) = otlp_task {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, task).await.is_err() {
            tracing::warn!("OTLP flush did not finish within the drain deadline");
        }
    }
    let joined = tokio::task::spawn_blocking(move || tick_thread.join());
    let left = deadline.saturating_duration_since(Instant::now());
    if tokio::time::timeout(left, joined).await.is_err() {
        tracing::warn!("tick thread did not stop within the drain deadline");
    }
    // Deliver what the last ticks raised (releases on the way out included), within the deadline.
    if !alerts.flush_async(deadline).await {
        tracing::warn!("alerts still undelivered at the drain deadline");
    }
    tracing::info!("stopped");
    Ok(())
}

fn effective_listen(config: &Config, options: &Options) -> anyhow::Result<SocketAddr> {
    match options.listen_override {
        Some(addr) => Ok(addr),
        None => config
            .listen_addr()
            .with_context(|| format!("`agent.listen` = `{}`", config.agent.listen)),
    }
}

/// Reads the configuration again; on any error logs every one and returns `None`.
fn reload(current: &Config, options: &Options) -> Option<Config> {
    let path = match &options.source {
        ConfigSource::File(path) => path.clone(),
        ConfigSource::Defaults => {
            let path = PathBuf::from(crate::config::DEFAULT_PATH);
            if !path.exists() {
                tracing::info!("reload: no configuration file, staying on embedded defaults");
                return None;
            }
            path
        }
    };
    let parsed = Config::load(&path);
    match parsed {
        Ok(next) => {
            if next.agent.listen != current.agent.listen && options.listen_override.is_none() {
                tracing::warn!(
                    old = %current.agent.listen,
                    new = %next.agent.listen,
                    "`agent.listen` changed: takes effect at the next restart"
                );
            }
            tracing::info!(path = %path.display(), "configuration reloaded");
            Some(next)
        }
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(path = %path.display(), error = %e, "invalid configuration on reload");
            }
            tracing::error!(
                count = errors.0.len(),
                "reload refused: keeping the running configuration"
            );
            None
        }
    }
}
