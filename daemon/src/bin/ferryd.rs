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
#[command(name = "ferryd", version, about)]
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
    // What the error messages name as the configuration.
    let source = if explicit || path.exists() {
        path.display().to_string()
    } else {
        "(built-in defaults and command-line flags)".to_string()
    };
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
        ferry_shm::sys::default_sigpipe();
        // Exactly what start-up checks before it binds anything, the log
        // filter (RUST_LOG too) included.
        log_filter(&cfg)?;
        let pre = cfg
            .preflight()
            .with_context(|| format!("invalid configuration {source}"))?;
        let sel = &pre.fabric;
        for p in &pre.live {
            eprintln!(
                "ferryd: note: a ferryd is listening on {} now; this configuration starts once it has stopped",
                p.display()
            );
        }
        println!("configuration {source} is valid");
        let d = &cfg.daemon;
        println!(
            "socket: {} (mode {}{})",
            cfg.socket_path().display(),
            d.socket_mode,
            d.socket_group
                .as_ref()
                .map(|g| format!(", group {g}"))
                .unwrap_or_default()
        );
        println!("admin socket: {}", cfg.admin_socket_path().display());
        match &cfg.admin.http {
            Some(a) => println!(
                "admin endpoint: http://{a}/metrics, /live, /ready (ready needs {})",
                if cfg.admin.ready_needs_peers {
                    "every peer up"
                } else {
                    "no peers"
                }
            ),
            None => println!("admin endpoint: off (no [admin] http)"),
        }
        println!("fabric: {:?} ({})", sel.choice, sel.reason);
        println!("data plane: {}", pre.placement);
        // While a consumer waits the loop polls the longer of the two.
        println!(
            "waiting: the loop polls {} us after its last work, {} us while a consumer waits; replay window {} per stream",
            d.spin_us,
            d.spin_us.max(d.spin_while_waited_us),
            replay_window_text(d.replay_window)
        );
        println!(
            "allowed: uids {:?}, gids {:?}{}",
            cfg.allowed_uids(),
            d.allowed_gids,
            d.socket_group
                .as_ref()
                .map(|g| format!(", and members of group {g}"))
                .unwrap_or_default()
        );
        println!(
            "connections: at most {} ({} per uid); closed without Hello after {} ms, opening nothing after {} ms",
            d.max_connections, d.max_connections_per_uid, d.handshake_timeout_ms, d.idle_timeout_ms
        );
        println!(
            "streams: at most {} ({} per uid), {} partitions ({} per uid), {} slots ({} per uid), {} pool bytes ({} per uid, {} per stream); created streams are {} (stream_access), deleted after {} ms unused (0: never)",
            d.max_streams,
            d.max_streams_per_uid,
            d.max_total_partitions,
            d.max_partitions_per_uid,
            d.max_total_slots,
            d.max_slots_per_uid,
            cfg.max_total_pool_bytes(),
            cfg.max_pool_bytes_per_uid(),
            d.max_pool_bytes,
            if d.stream_access == "owner" { "their owner's alone (root may delete them)" } else { "shared by every allowed user" },
            d.stream_idle_timeout_ms
        );
        println!(
            "groups: at most {} per stream, deleted after {} ms without members (0: never)",
            d.max_groups_per_stream, d.group_idle_timeout_ms
        );
        let c = &cfg.cluster;
        match &c.node_id {
            None => println!("cluster: none (no [cluster] node_id: this host only)"),
            Some(node) => {
                println!(
                    "cluster: node {node}, control plane on {}, secret from {} (readable by its owner only); heartbeat every {} ms, a peer silent for {} ms is down, redialed within {} ms",
                    c.listen.as_deref().unwrap_or("?"),
                    c.secret_file.as_ref().map_or("?".into(), |p| p.display().to_string()),
                    c.heartbeat_ms,
                    c.peer_timeout_ms,
                    c.reconnect_max_ms
                );
                if c.uses_etcd() {
                    println!(
                        "membership: etcd at {} under {}: registered with a {} ms lease (renewed every third of it), peers found there",
                        c.etcd_endpoints.join(","),
                        c.etcd_prefix,
                        c.etcd_ttl_ms
                    );
                }
                for p in &c.peers {
                    println!(
                        "peer {} at {} ({})",
                        p.node_id,
                        p.addr,
                        if *node < p.node_id {
                            "this daemon dials it"
                        } else {
                            "it dials this daemon"
                        }
                    );
                }
            }
        }
        for s in &cfg.streams {
            println!(
                "stream {}: {} partitions, {} slots of {} bytes, replay window {}; producers {}, consumers {}",
                s.name,
                s.partitions,
                s.slot_count,
                s.slot_size,
                replay_window_text(s.replay_window.or(d.replay_window)),
                s.producers
                    .as_ref()
                    .map_or("any allowed user".to_string(), |u| format!(
                        "uids {u:?} and root"
                    )),
                s.consumers
                    .as_ref()
                    .map_or("any allowed user".to_string(), |u| format!(
                        "uids {u:?} and root"
                    ))
            );
        }
        return Ok(());
    }
    let filter = log_filter(&cfg)?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    Server::bind(cfg)
        .with_context(|| format!("configuration {source}"))?
        .run()?;
    Ok(())
}

/// How `ferryd --check` shows a replay window.
fn replay_window_text(w: Option<u32>) -> String {
    w.map_or(
        "every free slot (slots granted to producers or held by groups do not count)".to_string(),
        |w| format!("{w} released batches"),
    )
}

/// The log filter: RUST_LOG when set, which must then be valid too
/// (ignoring a typo there would silently log at another level), else
/// daemon.log.
fn log_filter(cfg: &Config) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => tracing_subscriber::EnvFilter::try_new(&v)
            .map_err(|e| anyhow::anyhow!("RUST_LOG {v:?} is not a valid log filter: {e}")),
        _ => tracing_subscriber::EnvFilter::try_new(&cfg.daemon.log)
            .map_err(|e| anyhow::anyhow!("daemon.log (or --log) {:?}: {e}", cfg.daemon.log)),
    }
}
