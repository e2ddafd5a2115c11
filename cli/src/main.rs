//! ferry: command-line tool for a running ferryd.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ferry_admin::{admin_path_for, default_socket_path, Client, Status};

/// Inspect a running ferryd.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about)]
struct Args {
    /// ferryd's admin socket. Default: FERRY_ADMIN_SOCKET, else beside the
    /// session socket (FERRY_SOCKET, else the daemon's default path).
    #[arg(long, global = true, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Streams, groups, members, lag and slot occupancy.
    Status {
        /// Only this stream, with every partition row (without it, at most
        /// 4096 partition rows are shown in all).
        stream: Option<String>,
        /// Print the raw JSON document instead of tables.
        #[arg(long)]
        json: bool,
        /// Also every peer's streams, groups and lag, gathered over the
        /// cluster's control plane (peers that do not answer within a
        /// second are named).
        #[arg(long)]
        cluster: bool,
        /// Refresh in place every SECS seconds (default 2) until Ctrl-C.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// Live per-stream rates: batches and bytes published and delivered
    /// per second, lag and slots held, refreshed in place until Ctrl-C.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0, value_name = "SECS")]
        interval: f64,
        /// Stop after this many refreshes (default: never).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Manage consumer groups.
    Group {
        #[command(subcommand)]
        action: GroupCmd,
    },
    /// Manage streams.
    Stream {
        #[command(subcommand)]
        action: StreamCmd,
    },
}

#[derive(Subcommand, Debug)]
enum StreamCmd {
    /// Delete a stream a producer created, and free its pool: only its
    /// owner (the uid that created it) or root may, and never a stream
    /// declared in the config. Batches it still holds are lost.
    Delete {
        stream: String,
        /// Also when producers or consumers use it: their sessions are
        /// closed first.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Delete a consumer group that has no members (e.g. left behind by a
    /// finished job): the batches it held no longer hold slots for it,
    /// also when it is the stream's last group (a group formed later gets
    /// them only if it starts at "earliest").
    Delete { stream: String, group: String },
}

/// " pid N", or " on HOST" for a session on another host (its pid is that
/// host's business).
fn located(host: Option<&str>, pid: i32) -> String {
    host.map_or_else(|| format!(" pid {pid}"), |h| format!(" on {h}"))
}

fn main() {
    ferry_shm::sys::default_sigpipe();
    let args = Args::parse();
    let admin = args
        .admin_socket
        .or_else(|| std::env::var_os("FERRY_ADMIN_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| {
            let sock = std::env::var_os("FERRY_SOCKET")
                .map(PathBuf::from)
                .unwrap_or_else(|| default_socket_path(ferry_shm::sys::geteuid()));
            admin_path_for(&sock)
        });
    let client = Client::new(admin);
    match args.cmd {
        Cmd::Stream {
            action: StreamCmd::Delete { stream, force },
        } => match client.delete_stream(&stream, force) {
            Ok(m) => println!("{m}"),
            Err(e) => fail(e),
        },
        Cmd::Group {
            action: GroupCmd::Delete { stream, group },
        } => match client.delete_group(&stream, &group) {
            Ok(m) => println!("{m}"),
            Err(e) => fail(e),
        },
        Cmd::Status {
            stream,
            json,
            cluster,
            watch,
        } => {
            if cluster && stream.is_some() {
                eprintln!("ferry: --cluster shows every stream; leave out the stream name");
                std::process::exit(2);
            }
            let once = || {
                let st = if cluster {
                    client.cluster_status()
                } else {
                    client.status(stream.as_deref())
                };
                match st {
                    Ok(st) if json => println!(
                        "{}",
                        serde_json::to_string_pretty(&st).expect("status serialises")
                    ),
                    Ok(st) => {
                        print_status(&st, stream.as_deref());
                        if cluster {
                            print_cluster(&st);
                        }
                    }
                    Err(e) if watch.is_some() => println!("ferry: {e}"),
                    Err(e) => fail(e),
                }
            };
            match watch {
                None => once(),
                Some(secs) => {
                    let every = interval(secs);
                    loop {
                        clear_screen();
                        once();
                        std::thread::sleep(every);
                    }
                }
            }
        }
        Cmd::Top {
            interval: secs,
            count,
        } => top(&client, interval(secs), count),
    }
}

/// `--watch` and `--interval` seconds, checked.
fn interval(secs: f64) -> std::time::Duration {
    if !(0.1..=3600.0).contains(&secs) {
        eprintln!("ferry: the interval must be 0.1 to 3600 seconds, got {secs}");
        std::process::exit(2);
    }
    std::time::Duration::from_secs_f64(secs)
}

/// Moves the cursor home and clears the terminal (only on a terminal: a
/// pipe gets the refreshes one after another).
fn clear_screen() {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        print!("\x1b[H\x1b[2J");
    } else {
        println!("---");
    }
}

/// The cluster's summaries, one daemon after another.
fn print_cluster(st: &Status) {
    println!();
    println!(
        "cluster: {} daemon(s) answered{}",
        st.cluster.len(),
        if st.cluster_missing.is_empty() {
            String::new()
        } else {
            format!(", no answer from: {}", st.cluster_missing.join(", "))
        }
    );
    for n in &st.cluster {
        println!(
            "  {} up {}s, {} sessions, {} peers up{}",
            if n.node.is_empty() {
                "(this host)"
            } else {
                &n.node
            },
            n.uptime_s,
            n.sessions,
            n.peers_up,
            if n.draining { ", DRAINING" } else { "" }
        );
        for s in &n.streams {
            println!(
                "    stream {}{}: {} partitions, {} published ({}), {} delivered, {}/{} slots held",
                s.name,
                if s.disk { " (disk)" } else { "" },
                s.partitions,
                s.published,
                human(s.published_bytes),
                s.delivered,
                s.slots_held,
                s.slot_count
            );
            for g in &s.groups {
                println!(
                    "      group {}: {} members{}, lag {}",
                    g.name,
                    g.members,
                    if g.remote_members.is_empty() {
                        String::new()
                    } else {
                        format!(" (some on {})", g.remote_members.join(", "))
                    },
                    g.lag
                );
            }
        }
    }
}

/// `ferry top`: per-stream rates between two statuses `every` apart.
fn top(client: &Client, every: std::time::Duration, count: Option<u64>) {
    let mut last = match client.status(None) {
        Ok(st) => (std::time::Instant::now(), st),
        Err(e) => fail(e),
    };
    let mut n = 0;
    loop {
        std::thread::sleep(every);
        let now = match client.status(None) {
            Ok(st) => (std::time::Instant::now(), st),
            Err(e) => fail(e),
        };
        let dt = (now.0 - last.0).as_secs_f64().max(1e-6);
        clear_screen();
        println!(
            "{} pid {}, {} sessions; every {:.1} s (Ctrl-C to stop)",
            now.1.daemon,
            now.1.pid,
            now.1.sessions,
            every.as_secs_f64()
        );
        println!(
            "{:<24} {:>10} {:>11} {:>10} {:>11} {:>10} {:>11} {:>5} {:>5}",
            "STREAM",
            "PUB/s",
            "PUB B/s",
            "DELIV/s",
            "DELIV B/s",
            "LAG",
            "HELD/SLOTS",
            "PROD",
            "CONS"
        );
        for s in &now.1.streams {
            let before = last.1.streams.iter().find(|b| b.name == s.name);
            let rate = |f: fn(&ferry_admin::StreamStatus) -> u64| {
                before.map_or(0.0, |b| f(s).saturating_sub(f(b)) as f64 / dt)
            };
            let lag: u64 = s.groups.iter().map(|g| g.lag).sum();
            let consumers: usize = s.groups.iter().map(|g| g.members.len()).sum();
            println!(
                "{:<24} {:>10.0} {:>11} {:>10.0} {:>11} {:>10} {:>11} {:>5} {:>5}",
                s.name,
                rate(|x| x.published),
                format!("{}/s", human(rate(|x| x.published_bytes) as u64)),
                rate(|x| x.delivered),
                format!("{}/s", human(rate(|x| x.delivered_bytes) as u64)),
                lag,
                format!("{}/{}", s.slots_held, s.slot_count),
                s.producers.len(),
                consumers
            );
        }
        if now.1.streams.is_empty() {
            println!("no streams");
        }
        last = now;
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return;
        }
    }
}

fn fail(e: ferry_admin::AdminError) -> ! {
    eprintln!("ferry: {e}");
    std::process::exit(1);
}

/// Bytes for people: "512 B", "20.0 KiB", "1.5 GiB".
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `asked`: the stream `ferry status <stream>` asked for.
fn print_status(st: &Status, asked: Option<&str>) {
    println!(
        "{} pid {} up {}s, socket {}, {} sessions{}",
        st.daemon,
        st.pid,
        st.uptime_s,
        st.socket,
        st.sessions,
        if st.draining { ", DRAINING" } else { "" }
    );
    println!("fabric: {}", st.fabric);
    println!("data plane: {}", st.placement);
    if st.gpus.is_empty() {
        println!("gpus: none ({})", st.gpu_note);
    }
    for g in &st.gpus {
        println!(
            "gpu cuda:{} {} at {}: {} MiB, dma-buf {}, GPUDirect RDMA {}",
            g.ordinal,
            g.name,
            g.pci_bus_id,
            g.total_memory >> 20,
            if g.dma_buf { "yes" } else { "no" },
            if g.gpudirect_rdma { "yes" } else { "no" }
        );
    }
    if let Some(node) = &st.node_id {
        println!(
            "cluster: node {node}, control plane on {}, {} peers, {} connections refused",
            st.cluster_listen.as_deref().unwrap_or("?"),
            st.peers.len(),
            st.peer_connections_refused
        );
    }
    if let Some(m) = &st.membership {
        println!(
            "  membership: etcd at {} under {}: {} for {:.1} s{}",
            m.endpoints.join(","),
            m.prefix,
            if m.etcd_up {
                "answering"
            } else {
                "UNREACHABLE (peers kept, local work goes on)"
            },
            m.state_ms as f64 / 1000.0,
            match (&m.last_error, m.etcd_up) {
                (Some(e), false) => format!(": {e}"),
                _ => String::new(),
            }
        );
    }
    for p in &st.peers {
        println!(
            "  peer {} at {}: {} for {:.1} s{}{}, {} control bytes in, {} out, {} errors{}{}",
            p.node_id,
            p.addr,
            p.state,
            p.state_ms as f64 / 1000.0,
            if p.fabric.is_empty() {
                String::new()
            } else {
                format!(", fabric {}", p.fabric)
            },
            p.rtt_us
                .map(|r| format!(", rtt {r} us"))
                .unwrap_or_default(),
            p.bytes_in,
            p.bytes_out,
            p.errors,
            p.last_error
                .as_ref()
                .map(|e| format!(" (last: {e})"))
                .unwrap_or_default(),
            if p.streams.is_empty() {
                String::new()
            } else {
                format!("; its streams: {}", p.streams.join(", "))
            }
        );
    }
    for r in &st.remote_consumers {
        let device = match &r.device {
            Some(d) => format!(", into {d} ({} copies in flight)", r.copies_in_flight),
            None => String::new(),
        };
        println!(
            "  consumer session {} pid {} of stream {} (home {}), group {}: {}, {}/{} landing slots held, {} delivered{device}",
            r.session, r.pid, r.stream, r.home, r.group, r.state, r.held, r.prefetch, r.delivered
        );
    }
    for r in &st.remote_producers {
        let device = match &r.device {
            Some(d) => format!(", from {d}"),
            None => String::new(),
        };
        println!(
            "  producer session {} pid {} of stream {} (home {}): {}, {} published, {} acknowledged by the home{device}",
            r.session, r.pid, r.stream, r.home, r.state, r.published, r.acked
        );
    }
    let m = &st.memory;
    println!(
        "memory: {} streams (max {}), {} of pools (max {}, {} per uid)",
        m.streams,
        m.max_streams,
        human(m.pool_bytes),
        human(m.max_total_pool_bytes),
        human(m.max_pool_bytes_per_uid)
    );
    for u in &m.per_uid {
        println!(
            "  uid {}: {} streams, {} partitions, {} slots, {}",
            u.uid,
            u.streams,
            u.partitions,
            u.slots,
            human(u.pool_bytes)
        );
    }
    if st.streams.is_empty() {
        let mut elsewhere: std::collections::BTreeSet<(&str, &str)> = st
            .remote_consumers
            .iter()
            .map(|c| (c.stream.as_str(), c.home.as_str()))
            .chain(
                st.remote_producers
                    .iter()
                    .map(|p| (p.stream.as_str(), p.home.as_str())),
            )
            .collect();
        // Asked for by name: its home, from the peers' announcements.
        if let Some(name) = asked {
            if let Some(p) = st
                .peers
                .iter()
                .find(|p| p.streams.iter().any(|s| s == name))
            {
                elsewhere.insert((name, p.node_id.as_str()));
            }
        }
        if elsewhere.is_empty() {
            println!("no streams");
        } else {
            for (s, home) in elsewhere {
                println!(
                    "stream {s}: homed on {home} (its groups and offsets: `ferry status` there)"
                );
            }
        }
    }
    for s in &st.streams {
        println!();
        println!(
            "stream {} ({}): {} partitions, {} x {} B slots: {} free, {} granted, {} held; {} published",
            s.name,
            s.owner_uid
                .map_or_else(|| "declared".to_string(), |u| format!("uid {u}")),
            s.partitions,
            s.slot_count,
            s.slot_size,
            s.slots_free,
            s.slots_granted,
            s.slots_held,
            s.published
        );
        if s.slots_held_for_first_group > 0 || s.groups_expired > 0 {
            println!(
                "  {} slots held for the first group to form; {} groups expired (no member for group_idle_timeout_ms)",
                s.slots_held_for_first_group, s.groups_expired
            );
        }
        if let Some(d) = &s.disk {
            println!(
                "  disk log {} ({}): {} bytes, partitions start at {:?}, {} publishes not yet durable{}",
                d.dir,
                d.settings,
                d.bytes,
                d.start_offsets,
                d.unsynced,
                d.error.as_ref().map_or(String::new(), |e| format!(
                    "; WRITES FAIL (producers wait): {e}"
                ))
            );
        }
        for p in &s.producers {
            let device = match &p.device {
                Some(d) => format!(
                    ", from {d} ({} copies to host in flight, {} bytes copied)",
                    p.gpu_copies_in_flight, p.gpu_bytes_copied
                ),
                None => String::new(),
            };
            let waiting = match p.waiting_for_slot_ms {
                Some(ms) => {
                    let holders: Vec<String> = s
                        .groups
                        .iter()
                        .filter(|g| g.slots_held > 0)
                        .map(|g| {
                            format!("{} ({}, {} members)", g.name, g.slots_held, g.members.len())
                        })
                        .collect();
                    format!(
                        "; WAITING {:.1} s for a free slot, held by: {}",
                        ms as f64 / 1000.0,
                        if holders.is_empty() {
                            "the first group to form".to_string()
                        } else {
                            holders.join(", ")
                        }
                    )
                }
                None => String::new(),
            };
            let at = located(p.host.as_deref(), p.pid);
            println!(
                "  producer session {}{at}: {} slots granted, {} published{device}{waiting}",
                p.session, p.granted, p.published
            );
        }
        for g in &s.groups {
            println!(
                "  group {} (uid {}): {} members, lag {}, {} slots held, {} epochs ended",
                g.name,
                g.owner_uid,
                g.members.len(),
                g.lag,
                g.slots_held,
                g.epochs
            );
            for m in &g.members {
                let device = match &m.device {
                    Some(d) => format!(
                        ", into {d} ({} copies in flight, {} bytes copied, {} of them from GPU memory)",
                        m.gpu_copies_in_flight, m.gpu_bytes_copied, m.gpu_bytes_from_gpu
                    ),
                    None => String::new(),
                };
                let at = located(m.host.as_deref(), m.pid);
                println!(
                    "    member session {}{at}: partitions {:?}, {}/{} in flight, {} delivered, ring {}{device}",
                    m.session, m.partitions, m.inflight, m.prefetch, m.delivered, m.ring_occupancy
                );
            }
            println!(
                "    {:>9} {:>8} {:>10} {:>10} {:>10} {:>8} {:>9}",
                "partition", "owner", "next", "committed", "end", "lag", "inflight"
            );
            for p in &g.partitions {
                println!(
                    "    {:>9} {:>8} {:>10} {:>10} {:>10} {:>8} {:>9}",
                    p.partition,
                    p.owner.map_or("-".to_string(), |o| o.to_string()),
                    p.next,
                    p.committed,
                    p.end,
                    p.lag,
                    p.inflight
                );
            }
            if g.partitions_omitted > 0 {
                println!(
                    "    ({} more partitions: `ferry status {}` shows them all)",
                    g.partitions_omitted, s.name
                );
            }
        }
    }
}
