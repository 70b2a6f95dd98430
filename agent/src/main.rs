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
        Command::Validate { file } => {
            let path = file.unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
            match Config::load(&path) {
                Ok(_) => {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    for e in &errors.0 {
                        match e.line {
                            Some(line) => eprint!("{}:{line}: ", path.display()),
                            None => eprint!("{}: ", path.display()),
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
