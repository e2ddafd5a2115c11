//! ferryd: the Ferry data-plane daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferry_daemon::config::{Config, DEFAULT_CONFIG};
use ferry_daemon::server::Server;

/// The Ferry data-plane daemon: hands training batches from producer
/// processes to consumer processes on this host through shared-memory
/// rings, with no copy of the payload.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Built-in defaults are used when the
    /// default file does not exist; a file named here must exist.
    #[arg(long, short = 'c', value_name = "PATH")]
    config: Option<PathBuf>,
    /// Session socket path (overrides daemon.socket).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Admin socket path for `ferry status` (overrides daemon.admin_socket).
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Microseconds the data-plane loop spins before sleeping (overrides
    /// daemon.spin_us).
    #[arg(long, value_name = "US")]
    spin_us: Option<u64>,
    /// Milliseconds SIGTERM waits for in-flight batches (overrides
    /// daemon.drain_timeout_ms).
    #[arg(long, value_name = "MS")]
    drain_timeout_ms: Option<u64>,
    /// Log filter, e.g. "info" or "ferry_daemon=debug" (overrides daemon.log;
    /// RUST_LOG overrides both).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Validate the configuration, print what would run, and exit.
    #[arg(long)]
    check: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ferryd: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut cfg = Config::load(&path, explicit)?;
    if let Some(s) = args.socket {
        cfg.daemon.socket = Some(s);
    }
    if let Some(s) = args.admin_socket {
        cfg.daemon.admin_socket = Some(s);
    }
    if let Some(v) = args.spin_us {
        cfg.daemon.spin_us = v;
    }
    if let Some(v) = args.drain_timeout_ms {
        cfg.daemon.drain_timeout_ms = v;
    }
    if let Some(v) = args.log {
        cfg.daemon.log = v;
    }
    if args.check {
        // Exactly what start-up checks before it binds anything.
        let sel = cfg
            .preflight()
            .with_context(|| format!("invalid configuration {}", path.display()))?;
        println!(
            "configuration {} is valid",
            if path.exists() {
                path.display().to_string()
            } else {
                "(built-in defaults)".into()
            }
        );
        println!("socket: {}", cfg.socket_path().display());
        println!("fabric: {:?} ({})", sel.choice, sel.reason);
        println!("admin socket: {}", cfg.admin_socket_path().display());
        println!(
            "allowed uids: {:?}, allowed gids: {:?}",
            cfg.allowed_uids(),
            cfg.daemon.allowed_gids
        );
        for s in &cfg.streams {
            println!(
                "stream {}: {} partitions, {} slots of {} bytes",
                s.name, s.partitions, s.slot_count, s.slot_size
            );
        }
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.daemon.log))
        .context("invalid log filter")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    Server::bind(cfg)
        .with_context(|| format!("configuration {}", path.display()))?
        .run()
}
