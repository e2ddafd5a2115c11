//! The daemon's event loop: one thread owns all state. It accepts sessions
//! on a SOCK_SEQPACKET socket, answers the admin socket, and moves
//! descriptors between session rings: publish -> deliver, release -> free,
//! free -> grant. While there is work it polls the rings without system
//! calls; after `spin_us` of idleness it announces sleep on every
//! submission ring and blocks in epoll; a client that sees the
//! announcement sends `Wake` on its own session socket. The loop's own
//! eventfd (woken by the admin thread) is never shared with a client, so
//! nothing a client does with its file descriptors can block the loop or
//! take another client's wake-up.

mod admin;
mod catalog;
mod cluster;
mod delivery;
mod durable;
mod inbound;
mod lifecycle;
mod metrics;
mod open;
mod outbox;
mod proxy;
mod remote;
mod sessions;
mod status;
mod submit;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_shm::sys::{self, Epoll};
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{DaemonError, Doing};
use crate::gpu::Gpus;
use crate::inbox;
use crate::stream::SessionId;
use catalog::{StreamEntry, Streams};
use delivery::{entry_flags, publish_copied};
pub use durable::Synced;
use lifecycle::{claim_socket_path, set_socket_access};
use sessions::{
    sub_of, sub_of_mut, ConsumerState, Policy, ProducerState, Role, Session, ACCEPT_PAUSE,
};

/// How often a loop that has work every turn still looks after the rest
/// (housekeeping, disk tick, sockets).
const BUSY_TICK: Duration = Duration::from_millis(2);

/// The ids of the entries of `map` for which `f` holds.
fn ids_where<T>(map: &BTreeMap<SessionId, T>, f: impl Fn(&T) -> bool) -> Vec<SessionId> {
    map.iter()
        .filter(|(_, v)| f(v))
        .map(|(id, _)| *id)
        .collect()
}

/// What an epoll event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Listener,
    Signal,
    /// The inbox's doorbell: another thread sent a message.
    Inbox,
    /// The fabric's receive queue: a landing write arrived.
    Fabric,
    Session(SessionId),
}

impl Token {
    const SESSION_BASE: u64 = 1 << 32;

    fn to_u64(self) -> u64 {
        match self {
            Token::Listener => 1,
            Token::Signal => 3,
            Token::Inbox => 4,
            Token::Fabric => 5,
            Token::Session(id) => Token::SESSION_BASE + id,
        }
    }

    fn from_u64(t: u64) -> Option<Token> {
        match t {
            1 => Some(Token::Listener),
            3 => Some(Token::Signal),
            4 => Some(Token::Inbox),
            5 => Some(Token::Fabric),
            t if t >= Token::SESSION_BASE => Some(Token::Session(t - Token::SESSION_BASE)),
            _ => None,
        }
    }
}

pub struct Server {
    cfg: Config,
    socket_path: PathBuf,
    admin_path: PathBuf,
    epoll: Epoll,
    listener: Option<OwnedFd>,
    /// Accepting paused (no file descriptor was free) since then.
    listener_paused: Option<Instant>,
    /// Messages from other threads (the admin thread); its doorbell is
    /// never sent to a client.
    inbox: inbox::Inbox,
    signals: OwnedFd,
    sessions: BTreeMap<SessionId, Session>,
    next_session: SessionId,
    streams: Streams,
    by_name: HashMap<String, usize>,
    policy: Policy,
    last_housekeeping: Instant,
    started: Instant,
    draining: Option<Instant>,
    /// Where the data-plane thread runs (pinned in `run`).
    placement: crate::placement::Placement,
    /// The fabric backend chosen at start-up, and why (not yet used for
    /// data: moving batches between hosts comes with the peers work).
    fabric: String,
    /// GPUs found at start-up (or why there are none), opened on demand.
    gpus: Gpus,
    /// The peer control plane and what it said, in a cluster.
    cluster: Option<cluster::Cluster>,
    /// For threads the loop starts (data-link connects).
    inbox_sender: inbox::Sender,
    /// Members on other hosts of groups of streams homed here.
    remotes: BTreeMap<SessionId, remote::RemoteMember>,
    /// Their ids: (host, the host's id for the member).
    remote_ids: HashMap<(String, u64), SessionId>,
    /// Producers on other hosts of streams homed here.
    remote_producers: BTreeMap<SessionId, inbound::RemoteProducer>,
    remote_producer_ids: HashMap<(String, u64), SessionId>,
    /// What the immediates of writes that land here name: landing areas
    /// of trainers here reading streams homed elsewhere, inboxes of
    /// producers elsewhere writing into streams homed here.
    landings: HashMap<u16, inbound::Landed>,
    retired: Vec<proxy::Retired>,
    /// Outboxes of producers that closed, until what they published went
    /// to the home.
    closing_outboxes: Vec<(SessionId, Box<outbox::Outbox>)>,
    next_landing: u16,
    fabric_scratch: Vec<ferry_verbs::Completion>,
    /// Sessions using a GPU (0: skip the GPU work entirely).
    gpu_sessions: usize,
    events: Vec<(u64, u32)>,
    /// Scratch list of session ids, reused by every loop iteration.
    scratch: Vec<SessionId>,
    /// Sessions to wake after a pump, reused likewise.
    wake_scratch: Vec<SessionId>,
    /// The thread that syncs disk logs and writes committed offsets.
    syncer: std::sync::mpsc::Sender<durable::SyncJob>,
    last_disk_tick: Instant,
    /// `/live`, `/ready`, the watchdog and the loop's turns.
    monitor: metrics::Monitor,
    /// `ferry status --cluster` requests waiting for peers.
    cluster_asks: Vec<cluster::ClusterAsk>,
    next_ask: u64,
}

impl Server {
    /// Binds the sockets and creates the configured streams.
    pub fn bind(cfg: Config) -> Result<Server, DaemonError> {
        // The same checks as `ferryd --check`, before anything is bound.
        let pre = cfg.preflight()?;
        let (sel, placement) = (pre.fabric, pre.placement);
        sys::ignore_sigpipe();
        let signals = sys::signalfd_termination().doing(|| "setting up signal handling".into())?;
        let socket_path = cfg.socket_path();
        let admin_path = cfg.admin_socket_path();
        let mode = cfg.socket_mode();
        let gid = cfg.socket_gid();

        // Each session holds its socket and its ring region open; each
        // stream its pool twice.
        let d = &cfg.daemon;
        let want = 2 * d.max_connections as u64 + 2 * d.max_streams as u64 + 256;
        match sys::raise_nofile_limit(want) {
            Ok((soft, _)) if soft >= want => {}
            Ok((soft, hard)) => warn!(
                soft,
                hard,
                want,
                "the open-file limit is below what max_connections and max_streams need; new connections wait while no descriptor is free"
            ),
            Err(e) => warn!("reading the open-file limit: {e}"),
        }

        // Before any socket file is made: a busy address leaves nothing.
        let http = match &cfg.admin.http {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr.as_str())
                    .doing(|| format!("admin.http: listening on {addr}"))?,
            ),
            None => None,
        };
        claim_socket_path(&socket_path)?;
        let listener = sys::seqpacket_listen(&socket_path)
            .doing(|| format!("listening on {}", socket_path.display()))?;
        set_socket_access(&socket_path, mode, gid)?;
        claim_socket_path(&admin_path)?;
        let admin = UnixListener::bind(&admin_path)
            .doing(|| format!("listening on {}", admin_path.display()))?;
        set_socket_access(&admin_path, mode, gid)?;

        let setup = || "setting up the event loop".to_string();
        let epoll = Epoll::new().doing(setup)?;
        let (inbox, outside) = inbox::Inbox::new().doing(setup)?;
        epoll
            .add(listener.as_raw_fd(), Token::Listener.to_u64())
            .doing(setup)?;
        epoll
            .add(signals.as_raw_fd(), Token::Signal.to_u64())
            .doing(setup)?;
        epoll.add(inbox.fd(), Token::Inbox.to_u64()).doing(setup)?;

        let fabric = match &sel.choice {
            ferry_verbs::select::Choice::Ibv { device } => format!("ibv {device} ({})", sel.reason),
            ferry_verbs::select::Choice::Soft => format!("soft ({})", sel.reason),
        };
        info!(fabric = %fabric, "fabric chosen");
        let gpus = ferry_cuda::probe();
        match &gpus {
            Ok(p) => {
                info!(
                    driver = p.driver_version,
                    count = p.gpus.len(),
                    "CUDA driver found"
                );
                for g in &p.gpus {
                    info!(
                        ordinal = g.ordinal,
                        name = %g.name,
                        pci = %g.pci_bus_id,
                        memory = g.total_memory,
                        dma_buf = g.dma_buf,
                        gpudirect_rdma = g.gpudirect_rdma,
                        "GPU"
                    );
                }
            }
            Err(e) => info!("no GPUs: {e}"),
        }
        let mut gids = cfg.daemon.allowed_gids.clone();
        gids.extend(gid);
        let policy = Policy {
            uids: cfg.allowed_uids(),
            gids,
        };
        let outside_loop = outside.clone();
        let syncer = durable::spawn_syncer(outside.clone())
            .doing(|| "starting the disk sync thread".into())?;
        let cluster = cluster::Cluster::start(&cfg, pre.secret, &sel.choice, outside.clone())
            .map_err(DaemonError::Other)?;
        if let Some(c) = &cluster {
            epoll
                .add(c.fabric.recv_fd(), Token::Fabric.to_u64())
                .doing(setup)?;
            info!(node = %c.node, listen = %c.peers.listen, peers = c.table.len(), "cluster control plane listening");
        }
        let health = std::sync::Arc::new(crate::http::Health::default());
        if let Some(l) = http {
            crate::http::spawn(l, health.clone(), outside.clone())
                .doing(|| "starting the admin HTTP thread".into())?;
            info!(http = ?cfg.admin.http, "admin endpoint: /metrics, /live, /ready");
        }
        admin::spawn_admin(
            admin,
            policy.clone(),
            Duration::from_millis(cfg.daemon.admin_timeout_ms),
            outside,
        )
        .doing(|| "starting the admin thread".into())?;
        let mut server = Server {
            socket_path,
            admin_path,
            epoll,
            listener: Some(listener),
            listener_paused: None,
            inbox,
            signals,
            sessions: BTreeMap::new(),
            next_session: 1,
            streams: Streams::default(),
            by_name: HashMap::new(),
            policy,
            last_housekeeping: Instant::now(),
            started: Instant::now(),
            draining: None,
            fabric,
            placement,
            gpus: Gpus::new(gpus, cfg.daemon.max_gpu_pool_bytes),
            cluster,
            inbox_sender: outside_loop,
            remotes: BTreeMap::new(),
            remote_ids: HashMap::new(),
            remote_producers: BTreeMap::new(),
            remote_producer_ids: HashMap::new(),
            landings: HashMap::new(),
            retired: Vec::new(),
            closing_outboxes: Vec::new(),
            next_landing: 0,
            fabric_scratch: Vec::with_capacity(64),
            gpu_sessions: 0,
            events: Vec::with_capacity(64),
            scratch: Vec::with_capacity(64),
            wake_scratch: Vec::with_capacity(64),
            syncer,
            last_disk_tick: Instant::now(),
            monitor: metrics::Monitor::new(health),
            cluster_asks: Vec::new(),
            next_ask: 0,
            cfg,
        };
        for s in server.cfg.streams.clone() {
            server
                .create_stream(&s.name, s.spec(), None)
                .map(|idx| {
                    server.streams[idx].acl = (s.producers.clone(), s.consumers.clone());
                    server.streams[idx].group_idle_timeout_ms = s.group_idle_timeout_ms;
                    if let Some(w) = s.replay_window {
                        server.streams[idx].stream.set_replay_window(w);
                    }
                })
                .map_err(|r| DaemonError::Other(r.message))?;
        }
        server.reopen_disk_streams()?;
        Ok(server)
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Runs until SIGTERM/SIGINT, then drains and returns.
    pub fn run(mut self) -> Result<(), DaemonError> {
        let want = crate::placement::parse(&self.cfg.daemon.data_plane_cpus)
            .map_err(|m| DaemonError::Other(format!("daemon.{m}")))?;
        crate::placement::pin_thread(&mut self.placement, &want).map_err(DaemonError::Other)?;
        info!(placement = %self.placement, "data-plane thread placed");
        info!(
            socket = %self.socket_path.display(),
            admin = %self.admin_path.display(),
            streams = self.streams.len(),
            "ferryd ready"
        );
        // Ready for systemd once the streams are open (they are, here);
        // `/ready` says more (peers, disk) from the first housekeeping on.
        self.monitor_tick();
        metrics::notify(&[sd_notify::NotifyState::Ready]);
        let spin = Duration::from_micros(self.cfg.daemon.spin_us);
        let waited_spin = Duration::from_micros(self.cfg.daemon.spin_while_waited_us);
        let mut waited = false;
        let mut last_work = Instant::now();
        // The clock is read once after each burst of work and then every
        // 32 idle turns, not on every turn (it showed in the hand-off
        // path's profile): `idle` is how long the loop has had no work.
        let mut worked = false;
        let mut idle_turns: u32 = 0;
        let mut idle = Duration::ZERO;
        let mut spinner = ferry_shm::wait::Spinner::new();
        let mut iter: u32 = 0;
        let mut last_tick = Instant::now();
        loop {
            iter = iter.wrapping_add(1);
            self.monitor.turns += 1;
            let work =
                self.poll_rings() + self.progress_fabric() + self.pump() + self.progress_gpu();
            if let Some(since) = self.draining {
                if self.drained() {
                    // A disk stream keeps what its groups have not read in
                    // its log (in a slot or not): nothing of it is lost.
                    let memory = || self.streams.iter().filter(|s| !s.stream.tiered());
                    let held: u32 = memory().map(|s| s.stream.slot_counts().2).sum();
                    let disk = self.streams.iter().any(|s| s.stream.tiered());
                    if held == 0 && !disk {
                        info!("drained: every published batch was delivered and released");
                    } else if held == 0 {
                        info!("drained: every batch of the memory streams was delivered and released; the disk streams keep what their groups have not read in their logs, and the groups go on from their commits at the next start");
                    } else {
                        warn!(
                            held,
                            "drained as far as it can: {held} batches were never released, and no consumer is left to take them (they are in memory streams, and lost when ferryd exits; disk streams keep theirs in their logs): {}",
                            self.describe_held_in_memory()
                        );
                    }
                    break;
                }
                if since.elapsed() >= Duration::from_millis(self.cfg.daemon.drain_timeout_ms) {
                    let held: u32 = self.streams.iter().map(|s| s.stream.slot_counts().2).sum();
                    warn!(
                        held,
                        "drain timeout: exiting with {held} batches not yet released: {}",
                        self.describe_held()
                    );
                    break;
                }
            }
            // Every 2 ms of a busy loop, whose turns may each take
            // milliseconds (writing and reading disk logs): housekeeping
            // (the watchdog's ping), the disk tick (commits stored,
            // interval syncs, retention; each returns at once unless due)
            // and the sockets (connections, requests, peers). One clock
            // read per 8 turns decides.
            if iter.is_multiple_of(8) {
                let now = Instant::now();
                if now - last_tick >= BUSY_TICK {
                    last_tick = now;
                    self.housekeeping();
                    self.disk_tick();
                    self.poll_events(0)?;
                }
            }
            if work > 0 {
                worked = true;
                idle_turns = 0;
                if iter.is_multiple_of(64) {
                    self.poll_events(0)?;
                }
                continue;
            }
            if idle_turns.is_multiple_of(32) {
                let now = Instant::now();
                if worked {
                    last_work = now;
                    worked = false;
                }
                idle = now - last_work;
            }
            idle_turns = idle_turns.wrapping_add(1);
            if idle >= spin && idle < waited_spin && iter.is_multiple_of(64) {
                waited = self.consumers_waiting();
            }
            if idle < spin || self.copies_pending() || (waited && idle < waited_spin) {
                spinner.spin();
                if iter.is_multiple_of(128) {
                    self.poll_events(0)?;
                }
                continue;
            }
            // Announce sleep on every submission ring; if any has work
            // after the announcement, stay awake.
            let mut can_sleep = true;
            let mut bad = Vec::new();
            for s in self.sessions.values_mut() {
                if let Some(sub) = sub_of_mut(&mut s.role) {
                    match sub.prepare_sleep() {
                        Ok(true) => {}
                        Ok(false) => can_sleep = false,
                        Err(e) => bad.push((s.id, e.to_string())),
                    }
                }
            }
            for (id, why) in bad {
                self.fail_session(id, &why);
            }
            self.housekeeping();
            self.disk_tick();
            if can_sleep {
                if let Some(c) = &self.cluster {
                    c.fabric.unpolled();
                }
            }
            let timeout = if !can_sleep {
                0
            } else if self.draining.is_some() {
                50
            } else {
                self.disk_wait_ms()
                    .unwrap_or(500)
                    .min(self.monitor.max_sleep_ms())
            };
            self.poll_events(timeout)?;
            for s in self.sessions.values() {
                if let Some(sub) = sub_of(&s.role) {
                    sub.finish_sleep();
                }
            }
            last_work = Instant::now();
            idle = Duration::ZERO;
            idle_turns = 1;
            worked = false;
        }
        self.shutdown();
        Ok(())
    }

    /// Whether some consumer sleeps on its ring waiting for a batch: it
    /// has credit left and its stream has a producer attached.
    fn consumers_waiting(&self) -> bool {
        self.sessions.values().any(|s| match &s.role {
            Role::Consumer(c) => {
                c.m.inflight < c.m.prefetch
                    && c.m.sink.consumer_sleeping()
                    && self
                        .streams
                        .slots
                        .get(c.m.stream)
                        .and_then(Option::as_ref)
                        .is_some_and(|e| !e.producers.is_empty())
            }
            _ => false,
        })
    }

    fn poll_events(&mut self, timeout_ms: i32) -> Result<(), DaemonError> {
        let mut events = std::mem::take(&mut self.events);
        self.epoll
            .wait(&mut events, timeout_ms)
            .doing(|| "waiting for events".into())?;
        for &(token, _ev) in &events {
            match Token::from_u64(token) {
                Some(Token::Listener) => self.accept_all(),
                Some(Token::Signal) => {
                    while let Some(sig) = sys::signalfd_read(&self.signals) {
                        self.start_drain(sig);
                    }
                }
                Some(Token::Inbox) => self.inbox.rang(),
                Some(Token::Fabric) => {} // the loop polls it next
                Some(Token::Session(id)) => self.session_readable(id),
                None => {}
            }
        }
        self.events = events;
        while let Some(m) = self.inbox.next() {
            match m {
                inbox::Message::Admin { req, uid, reply } => self.answer_admin(req, uid, reply),
                inbox::Message::Peer(e) => self.peer_event(e),
                inbox::Message::Link {
                    node,
                    generation,
                    result,
                } => self.link_ready(node, generation, result),
                inbox::Message::Synced(s) => self.on_synced(s),
                inbox::Message::Members(e) => self.member_event(e),
                inbox::Message::Metrics { reply } => {
                    let _ = reply.send(self.metrics_snapshot());
                }
            }
        }
        Ok(())
    }
}
