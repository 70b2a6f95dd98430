//! `tally`: the node agent and its command-line tools.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tally_agent::config::{self, Config, LogFormat};
use tally_agent::runtime::{self, ConfigSource, Options};

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Per-workload GPU, network, disk, CPU and memory metering for GPU nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Agent {
        /// Configuration file; without it, /etc/tally/tally.toml if present, else embedded defaults.
        #[arg(long, env = "TALLY_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address of the HTTP endpoint, overriding `agent.listen`.
        #[arg(long, env = "TALLY_LISTEN")]
        listen: Option<String>,
    },
    /// Print a node readiness report. Exit 0: full function, 1: degraded, 2: cannot run.
    Check {
        #[arg(long, env = "TALLY_CONFIG")]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Release every throttle the state file records (what a stopped or crashed agent left):
    /// restore the cgroup files it changed and thaw frozen cgroups. Windows are kept.
    Release {
        #[arg(long, env = "TALLY_CONFIG")]
        config: Option<PathBuf>,
        /// The state directory, instead of the configuration's `enforcement.state_dir`. Without
        /// it, an unreadable configuration falls back to /var/lib/tally: releasing must work
        /// even when the configuration that throttled is broken.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Show the running agent's workloads, budgets and throttles, refreshed live.
    Top {
        /// The agent's address (`host:port`).
        #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:9811")]
        agent: String,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Print one view (after two samples, for rates) and exit.
        #[arg(long)]
        once: bool,
        /// Rows shown.
        #[arg(long, default_value_t = 30)]
        rows: usize,
        /// Sum the rows by this label instead (`team`, a `[tenants]` label, or `namespace`).
        #[arg(long)]
        by: Option<String>,
    },
    /// Internal: thaws the cgroups the agent's freeze cycle may have frozen once the agent
    /// exits (started by the agent itself).
    #[command(hide = true)]
    FreezeGuard,
    /// Check a configuration file and print every error with its key path and line.
    Validate {
        /// The file to check (default /etc/tally/tally.toml).
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config, listen } => agent(config, listen),
        Command::Check { config, json } => {
            let Some((config, _)) = load(config.as_deref()) else {
                return ExitCode::from(2);
            };
            init_logging(&config, true);
            let report = tally_agent::check::gather(&config);
            if json {
                println!("{:#}", report.to_json());
            } else {
                print!("{}", report.render_text());
            }
            ExitCode::from(report.exit_code().clamp(0, 255) as u8)
        }
        Command::FreezeGuard => tally_agent::budget::freeze::guard_main(),
        Command::Release { config, state_dir } => {
            let dir = match (state_dir, load(config.as_deref())) {
                (Some(dir), _) => dir,
                (None, Some((config, _))) => config.enforcement.state_dir,
                (None, None) => {
                    let fallback = config::EnforcementConfig::default().state_dir;
                    eprintln!(
                        "tally release: using the default state directory {}",
                        fallback.display()
                    );
                    fallback
                }
            };
            release(&dir)
        }
        Command::Top {
            agent,
            interval,
            once,
            rows,
            by,
        } => match tally_agent::top::run(&agent, interval, once, rows, by.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tally top: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Validate { file } => {
            let path = file.unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
            match Config::load(&path) {
                Ok(_) => {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    for e in &errors.0 {
                        let file = e.file.as_deref().unwrap_or(&path);
                        match e.line {
                            Some(line) => eprint!("{}:{line}: ", file.display()),
                            None => eprint!("{}: ", file.display()),
                        }
                        if e.path.is_empty() {
                            eprintln!("{}", e.message);
                        } else {
                            eprintln!("`{}`: {}", e.path, e.message);
                        }
                    }
                    eprintln!("{}: {} error(s)", path.display(), errors.0.len());
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn release(dir: &Path) -> ExitCode {
    use tally_agent::budget::state::{self, State};
    let mut saved = match State::load(dir) {
        Ok(s) => s,
        Err(e @ (state::StateError::Parse { .. } | state::StateError::Version { .. })) => {
            // Not discarded: kept aside, and what it still says of its throttles undone.
            eprintln!("tally release: {e}");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            return match tally_agent::budget::salvage::salvage(dir, now) {
                Ok(s) => {
                    for failure in &s.errors {
                        eprintln!("tally release: {failure}");
                    }
                    println!(
                        "kept the unreadable state aside as {}; {} control file(s) restored or thawed, {} failed",
                        s.kept_as.display(),
                        s.restored,
                        s.errors.len()
                    );
                    ExitCode::from(1)
                }
                Err(io) => {
                    eprintln!("tally release: keeping the state file aside: {io}");
                    ExitCode::from(2)
                }
            };
        }
        Err(e) => {
            eprintln!("tally release: {e}");
            return ExitCode::from(2);
        }
    };
    if saved == State::default() {
        println!("nothing to release: no state in {}", dir.display());
        return ExitCode::SUCCESS;
    }
    let mut failed = 0;
    for t in &saved.throttles {
        let errors = state::release_files(t);
        if errors.is_empty() {
            println!(
                "released {} on {} (budget {})",
                t.action.as_str(),
                t.subject,
                t.budget
            );
        } else {
            failed += 1;
            for e in errors {
                eprintln!("tally release: budget {} on {}: {e}", t.budget, t.subject);
            }
        }
    }
    let released = saved.throttles.len() - failed;
    saved.throttles.clear();
    // Windows are kept: releasing a throttle is not forgiving the budget.
    for w in &mut saved.windows {
        w.enforcing = false;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    if let Err(e) = saved.save(dir, now) {
        eprintln!("tally release: {e}");
        return ExitCode::from(1);
    }
    println!("{released} throttle(s) released, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn agent(config_path: Option<PathBuf>, listen: Option<String>) -> ExitCode {
    let Some((config, source)) = load(config_path.as_deref()) else {
        return ExitCode::from(2);
    };
    let listen_override = match listen.as_deref().map(str::parse::<SocketAddr>) {
        None => None,
        Some(Ok(addr)) => Some(addr),
        Some(Err(e)) => {
            eprintln!(
                "tally: `--listen` / TALLY_LISTEN = `{}` is not a socket address (host:port): {e}",
                listen.unwrap_or_default()
            );
            return ExitCode::from(2);
        }
    };
    init_logging(&config, false);
    if matches!(source, ConfigSource::Defaults) {
        tracing::info!(
            path = config::DEFAULT_PATH,
            "no configuration file: running on embedded defaults"
        );
    }
    match runtime::run(
        config,
        Options {
            source,
            listen_override,
        },
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent failed");
            eprintln!("tally: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The explicit file, else the default path when it exists, else the embedded defaults. Errors
/// are printed, every one of them.
fn load(path: Option<&Path>) -> Option<(Config, ConfigSource)> {
    let (path, explicit) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(config::DEFAULT_PATH), false),
    };
    if !explicit && !path.exists() {
        return Some((Config::default(), ConfigSource::Defaults));
    }
    match Config::load(&path) {
        Ok(config) => Some((config, ConfigSource::File(path))),
        Err(errors) => {
            eprintln!("tally: invalid configuration {}:", path.display());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            None
        }
    }
}

fn init_logging(config: &Config, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet {
        "warn"
    } else {
        config.agent.log_level.as_str()
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.agent.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
