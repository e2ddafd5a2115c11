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

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_shm::desc::{self, Desc};
use ferry_shm::layout::{PoolLayout, SessionLayout, META_MAX};
use ferry_shm::proto::{self, ErrorCode, Request, Response, SessionInfo, StreamSpec};
use ferry_shm::sys::{self, Epoll, PeerCred};
use ferry_shm::{init_ring, Region, RingConsumer, RingProducer};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::config::{check_socket_dir, check_socket_file, check_stream_spec, Config, SocketFile};
use crate::gpu::{GpuDelivery, GpuPublish, Gpus};
use crate::idhash::IdSet;
use crate::limited;
use crate::stream::{SessionId, Stream, Violation};

const TOK_LISTENER: u64 = 1;
const TOK_ADMIN: u64 = 2;
const TOK_SIGNAL: u64 = 3;
const TOK_DOORBELL: u64 = 4;
const TOK_SESSION: u64 = 1 << 32;

struct Rings {
    _region: Arc<Region>,
    sub: RingConsumer,
    comp: RingProducer,
}

struct ProducerState {
    stream: usize,
    rings: Rings,
    granted: IdSet<u32>,
    credits: u32,
    published: u64,
    /// Said the epoch is over for it (`OP_END`) and has not published since.
    ended: bool,
    /// Since when it has no slot granted and the pool has none free.
    starved_since: Option<Instant>,
    /// Whether that wait was logged already.
    starved_logged: bool,
    /// Publishing from GPU memory: the stream's mirror on that GPU and the
    /// copies to host slots in flight.
    gpu: Option<GpuPublish>,
}

struct ConsumerState {
    stream: usize,
    group: usize,
    rings: Rings,
    prefetch: u32,
    inflight: u32,
    delivered: u64,
    /// The group's epochs this member was told of (OP_END_OF_EPOCH).
    epoch_seen: u64,
    /// GPU delivery: the consumer's GPU pool and copies in flight.
    gpu: Option<GpuDelivery>,
}

enum Role {
    /// Connected, no Hello yet.
    Fresh,
    /// Said Hello; may open a producer or consumer.
    Control,
    Producer(ProducerState),
    Consumer(ConsumerState),
}

struct Session {
    id: SessionId,
    sock: OwnedFd,
    cred: PeerCred,
    role: Role,
    /// Connected (Fresh), or said Hello (Control): for the timeouts.
    since: Instant,
}

/// What the admin socket can ask.
enum AdminCmd {
    /// Everything (partition rows capped at MAX_STATUS_ROWS), or one stream
    /// in full.
    Status { stream: Option<String> },
    DeleteGroup {
        stream: String,
        group: String,
        uid: u32,
    },
    DeleteStream {
        stream: String,
        force: bool,
        uid: u32,
    },
}

/// A request from the admin thread; the loop answers with JSON.
struct AdminRequest {
    cmd: AdminCmd,
    reply: std::sync::mpsc::Sender<AdminReply>,
}

struct StreamEntry {
    stream: Stream,
    pool: Arc<Region>,
    /// A read-only open file description of the pool, for consumers.
    pool_ro: OwnedFd,
    layout: PoolLayout,
    producers: Vec<SessionId>,
    /// The uid of the producer that created it; None: declared in the
    /// config.
    owner: Option<u32>,
    /// Since when no session uses it (idle expiry of created streams).
    idle_since: Option<Instant>,
    /// A declared stream's `producers` and `consumers` lists.
    acl: (Option<Vec<u32>>, Option<Vec<u32>>),
    /// A declared stream's own group_idle_timeout_ms.
    group_idle_timeout_ms: Option<u64>,
    /// Groups deleted for having no member too long.
    groups_expired: u64,
    /// A producer ended the current epoch and left before the others
    /// ended it: its end still counts.
    end_pending: bool,
    /// Some member of some group was not told yet of an epoch its group
    /// finished (the pump looks at the members only then).
    ends_untold: bool,
    dirty: bool,
}

impl StreamEntry {
    fn in_use(&self) -> bool {
        !self.producers.is_empty() || self.stream.groups.iter().any(|g| !g.members.is_empty())
    }
}

/// The streams by index; a deleted stream's index is reused once no
/// session refers to it (all of them were closed with it).
#[derive(Default)]
struct Streams {
    slots: Vec<Option<StreamEntry>>,
}

impl Streams {
    fn iter(&self) -> impl Iterator<Item = &StreamEntry> {
        self.slots.iter().flatten()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut StreamEntry)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, e)| e.as_mut().map(|e| (i, e)))
    }

    fn len(&self) -> usize {
        self.iter().count()
    }

    fn free_index(&self) -> usize {
        self.slots
            .iter()
            .position(|e| e.is_none())
            .unwrap_or(self.slots.len())
    }

    fn insert(&mut self, idx: usize, e: StreamEntry) {
        if idx == self.slots.len() {
            self.slots.push(Some(e));
        } else {
            self.slots[idx] = Some(e);
        }
    }

    fn remove(&mut self, idx: usize) -> Option<StreamEntry> {
        self.slots.get_mut(idx).and_then(Option::take)
    }
}

impl std::ops::Index<usize> for Streams {
    type Output = StreamEntry;
    fn index(&self, i: usize) -> &StreamEntry {
        self.slots[i]
            .as_ref()
            .expect("sessions refer to live streams")
    }
}

impl std::ops::IndexMut<usize> for Streams {
    fn index_mut(&mut self, i: usize) -> &mut StreamEntry {
        self.slots[i]
            .as_mut()
            .expect("sessions refer to live streams")
    }
}

/// The loop's answer: a status snapshot, which the admin thread turns into
/// JSON (so that a large status costs the loop only its snapshot), or JSON.
enum AdminReply {
    Status(Box<Status>),
    Json(String),
}

/// Most per-partition rows a full status carries (the rest are counted in
/// `partitions_omitted`; `ferry status STREAM` shows one stream in full):
/// a status of every partition of every group of many wide streams would
/// take the loop long enough to stall deliveries.
const MAX_STATUS_ROWS: usize = 4096;

/// What one uid's streams (or all streams) take.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct UidUsage {
    pub uid: u32,
    pub streams: u32,
    pub partitions: u32,
    pub slots: u64,
    pub pool_bytes: u64,
}

impl UidUsage {
    fn add(&mut self, e: &StreamEntry) {
        self.streams += 1;
        self.partitions += e.stream.spec.partitions;
        self.slots += e.stream.spec.slot_count as u64;
        self.pool_bytes += e.layout.total;
    }
}

/// Who may connect: uids, gids (primary or supplementary).
#[derive(Clone)]
struct Policy {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Policy {
    fn allows(&self, sock: impl std::os::fd::AsFd, cred: &PeerCred) -> bool {
        if self.uids.contains(&cred.uid) || self.gids.contains(&cred.gid) {
            return true;
        }
        !self.gids.is_empty()
            && sys::peer_groups(sock).is_ok_and(|g| g.iter().any(|g| self.gids.contains(g)))
    }
}

/// Most admin connections served at once; more are answered "busy".
const MAX_ADMIN_CLIENTS: usize = 16;
/// Most admin connections of one uid served at once, so that one user
/// cannot take them all.
const MAX_ADMIN_CLIENTS_PER_UID: usize = 4;
/// Longest admin request line.
const MAX_ADMIN_REQUEST: usize = 4096;
/// Most messages read from one session socket per readiness event, so
/// one client flooding its socket cannot hold the loop.
const MAX_MESSAGES_PER_EVENT: usize = 64;
/// How long the listener stays paused after running out of file
/// descriptors, unless a connection closes sooner.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How often the timeouts are looked at (see `Server::housekeeping`).
const HOUSEKEEPING_EVERY: Duration = Duration::from_millis(20);

pub struct Server {
    cfg: Config,
    socket_path: PathBuf,
    admin_path: PathBuf,
    epoll: Epoll,
    listener: Option<OwnedFd>,
    /// Accepting paused (no file descriptor was free) since then.
    listener_paused: Option<Instant>,
    admin_rx: std::sync::mpsc::Receiver<AdminRequest>,
    signals: OwnedFd,
    /// The loop's own wake-up (admin thread); never sent to a client.
    doorbell: OwnedFd,
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
    /// Sessions using a GPU (0: skip the GPU work entirely).
    gpu_sessions: usize,
    events: Vec<(u64, u32)>,
    /// Scratch list of session ids, reused by every loop iteration.
    scratch: Vec<SessionId>,
    /// Sessions to wake after a pump, reused likewise.
    wake_scratch: Vec<SessionId>,
}

/// Makes the socket's directory if missing (mode 0755) and checks that it
/// is safe to use.
fn prepare_socket_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    check_socket_dir(dir).map_err(|e| anyhow::anyhow!(e))
}

/// Removes a stale socket (a socket no daemon answers on) at `path`, and
/// refuses anything else: a live daemon, or a file that is not a socket.
fn claim_socket_path(path: &Path) -> anyhow::Result<()> {
    prepare_socket_dir(path)?;
    match check_socket_file(path).map_err(|e| anyhow::anyhow!(e))? {
        SocketFile::Absent => {}
        SocketFile::Stale => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?,
        SocketFile::Live => {
            anyhow::bail!("another ferryd is already listening on {}", path.display())
        }
    }
    Ok(())
}

/// Sets a socket's mode and, with `daemon.socket_group`, its group.
fn set_socket_access(path: &Path, mode: u32, gid: Option<u32>) -> anyhow::Result<()> {
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(())
}

fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let p = path.to_string_lossy().to_string();
    let res = if let Some(name) = p.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &p)
    };
    if let Err(e) = res {
        debug!("sd_notify {state}: {e}");
    }
}

impl Server {
    /// Binds the sockets and creates the configured streams.
    pub fn bind(cfg: Config) -> anyhow::Result<Server> {
        // The same checks as `ferryd --check`, before anything is bound.
        let pre = cfg.preflight()?;
        let (sel, placement) = (pre.fabric, pre.placement);
        sys::ignore_sigpipe();
        let signals = sys::signalfd_termination().context("setting up signal handling")?;
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

        claim_socket_path(&socket_path)?;
        let listener = sys::seqpacket_listen(&socket_path)
            .with_context(|| format!("listening on {}", socket_path.display()))?;
        set_socket_access(&socket_path, mode, gid)?;
        claim_socket_path(&admin_path)?;
        let admin = UnixListener::bind(&admin_path)
            .with_context(|| format!("listening on {}", admin_path.display()))?;
        set_socket_access(&admin_path, mode, gid)?;

        let epoll = Epoll::new()?;
        let doorbell = sys::eventfd()?;
        epoll.add(listener.as_raw_fd(), TOK_LISTENER)?;
        epoll.add(signals.as_raw_fd(), TOK_SIGNAL)?;
        epoll.add(doorbell.as_raw_fd(), TOK_DOORBELL)?;

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
        let admin_rx = spawn_admin(
            admin,
            policy.clone(),
            Duration::from_millis(cfg.daemon.admin_timeout_ms),
            doorbell.try_clone()?,
        )?;
        let mut server = Server {
            socket_path,
            admin_path,
            epoll,
            listener: Some(listener),
            listener_paused: None,
            admin_rx,
            signals,
            doorbell,
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
            gpu_sessions: 0,
            events: Vec::with_capacity(64),
            scratch: Vec::with_capacity(64),
            wake_scratch: Vec::with_capacity(64),
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
                .map_err(|(_, m)| anyhow::anyhow!(m))?;
        }
        Ok(server)
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Creates a stream: declared in the config (`owner` None) or by a
    /// producer of uid `owner`, within the daemon's and that uid's limits.
    fn create_stream(
        &mut self,
        name: &str,
        spec: StreamSpec,
        owner: Option<u32>,
    ) -> Result<usize, (ErrorCode, String)> {
        check_stream_spec(name, &spec, u64::MAX).map_err(|m| (ErrorCode::InvalidArgument, m))?;
        let layout = PoolLayout::new(spec.slot_size, spec.slot_count).ok_or((
            ErrorCode::InvalidArgument,
            "pool size overflows".to_string(),
        ))?;
        let max = self.cfg.daemon.max_pool_bytes;
        if layout.total > max {
            return Err((
                ErrorCode::Limit,
                format!(
                    "stream {name}: a pool of {} bytes ({} slots of {} bytes, each rounded up to 4 KiB, or to 64 B under 4 KiB, and 256 bytes of metadata per slot) is over daemon.max_pool_bytes = {max}",
                    layout.total, spec.slot_count, spec.slot_size
                ),
            ));
        }
        if let Some(uid) = owner {
            self.check_quota(uid, &spec, layout.total)
                .map_err(|m| (ErrorCode::Limit, m))?;
        }
        let pool = Region::create(&format!("ferry-pool-{name}"), layout.total).map_err(|e| {
            (
                ErrorCode::Limit,
                format!("creating the data pool of stream {name}: {e}"),
            )
        })?;
        let pool_ro = pool.open_readonly().map_err(|e| {
            (
                ErrorCode::Limit,
                format!("opening the data pool of stream {name} read-only: {e}"),
            )
        })?;
        let idx = self.streams.free_index();
        crate::limited!(
            INFO,
            stream = name,
            partitions = spec.partitions,
            slot_size = spec.slot_size,
            slot_count = spec.slot_count,
            owner = owner.map_or_else(|| "config".to_string(), |u| format!("uid {u}")),
            "stream created"
        );
        let mut stream = Stream::new(idx as u32, name.to_string(), spec);
        if let Some(w) = self.cfg.daemon.replay_window {
            stream.set_replay_window(w);
        }
        self.streams.insert(
            idx,
            StreamEntry {
                stream,
                pool: Arc::new(pool),
                pool_ro,
                layout,
                producers: Vec::new(),
                owner,
                idle_since: None,
                acl: (None, None),
                group_idle_timeout_ms: None,
                groups_expired: 0,
                end_pending: false,
                ends_untold: false,
                dirty: true,
            },
        );
        self.by_name.insert(name.to_string(), idx);
        Ok(idx)
    }

    /// Whether `uid` may produce into (or consume) stream `idx`: a
    /// created stream its owner only (every allowed user with
    /// `stream_access = "shared"`): root too, so that root never silently
    /// feeds or reads a stream another user set up under the name root
    /// expected; a declared stream root and those its `producers` /
    /// `consumers` list names (everyone without a list).
    fn may_use(&self, idx: usize, uid: u32, produce: bool) -> Result<(), String> {
        let e = &self.streams[idx];
        let verb = if produce { "produce into" } else { "consume" };
        let name = &e.stream.name;
        match e.owner {
            Some(o) if o == uid || self.cfg.daemon.stream_access == "shared" => Ok(()),
            Some(o) => Err(format!(
                "uid {uid} may not {verb} stream {name}: uid {o} created it, and daemon.stream_access = \"owner\" keeps a created stream to its owner{} (declare the stream in the config with producers/consumers lists to share it)",
                if uid == 0 {
                    "; as root you may delete it: `ferry stream delete` (it may have been made to catch your data)"
                } else {
                    ""
                }
            )),
            None if uid == 0 => Ok(()),
            None => {
                let list = if produce { &e.acl.0 } else { &e.acl.1 };
                match list {
                    Some(l) if !l.contains(&uid) => Err(format!(
                        "uid {uid} may not {verb} stream {name}: it is not in the stream's {} list in the config",
                        if produce { "producers" } else { "consumers" }
                    )),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Whether `uid` may `verb` (join, delete) group `group` of stream
    /// `idx`: it must be allowed to consume the stream, and an existing
    /// group belongs to the uid that created it (and root).
    fn may_use_group(&self, idx: usize, group: &str, uid: u32, verb: &str) -> Result<(), String> {
        self.may_use(idx, uid, false)?;
        let s = &self.streams[idx].stream;
        match s.group_index(group).map(|g| s.groups[g].owner) {
            Some(owner) if uid != owner && uid != 0 => Err(format!(
                "uid {uid} may not {verb} group {group} of stream {}: uid {owner} created it (only its creator and root may; pick another group name)",
                s.name
            )),
            _ => Ok(()),
        }
    }

    /// What all streams, and those of each uid, take.
    fn usage(&self) -> (UidUsage, BTreeMap<u32, UidUsage>) {
        let mut total = UidUsage::default();
        let mut per_uid: BTreeMap<u32, UidUsage> = BTreeMap::new();
        for e in self.streams.iter() {
            total.add(e);
            if let Some(uid) = e.owner {
                let u = per_uid.entry(uid).or_default();
                u.uid = uid;
                u.add(e);
            }
        }
        (total, per_uid)
    }

    /// Refuses a new stream of `uid` that would pass a limit, naming it.
    fn check_quota(&self, uid: u32, spec: &StreamSpec, bytes: u64) -> Result<(), String> {
        let d = &self.cfg.daemon;
        let (total, per_uid) = self.usage();
        let mine = per_uid.get(&uid).cloned().unwrap_or_default();
        let checks = [
            (
                "max_streams",
                "streams",
                total.streams as u64 + 1,
                d.max_streams as u64,
                false,
            ),
            (
                "max_streams_per_uid",
                "streams",
                mine.streams as u64 + 1,
                d.max_streams_per_uid as u64,
                true,
            ),
            (
                "max_total_partitions",
                "partitions",
                (total.partitions + spec.partitions) as u64,
                d.max_total_partitions,
                false,
            ),
            (
                "max_partitions_per_uid",
                "partitions",
                (mine.partitions + spec.partitions) as u64,
                d.max_partitions_per_uid,
                true,
            ),
            (
                "max_total_slots",
                "slots",
                total.slots + spec.slot_count as u64,
                d.max_total_slots,
                false,
            ),
            (
                "max_slots_per_uid",
                "slots",
                mine.slots + spec.slot_count as u64,
                d.max_slots_per_uid,
                true,
            ),
            (
                "max_total_pool_bytes",
                "pool bytes",
                total.pool_bytes + bytes,
                self.cfg.max_total_pool_bytes(),
                false,
            ),
            (
                "max_pool_bytes_per_uid",
                "pool bytes",
                mine.pool_bytes + bytes,
                self.cfg.max_pool_bytes_per_uid(),
                true,
            ),
        ];
        for (key, what, need, limit, per) in checks {
            if need > limit {
                let whose = if per {
                    format!("uid {uid}'s streams")
                } else {
                    "all streams together".to_string()
                };
                return Err(format!(
                    "creating this stream would take {whose} to {need} {what}, over daemon.{key} = {limit} (see `ferry status` for what is used; `ferry stream delete` frees a stream)"
                ));
            }
        }
        Ok(())
    }

    /// Deletes stream `name` for admin client `uid`: only its owner or
    /// root, never a declared one; refused while sessions use it unless
    /// `force`, which closes them.
    fn delete_stream(&mut self, name: &str, force: bool, uid: u32) -> serde_json::Value {
        let err = |m: String| serde_json::json!({ "error": m });
        let Some(&idx) = self.by_name.get(name) else {
            return err(format!("no stream named {name:?}"));
        };
        let e = &self.streams[idx];
        let Some(owner) = e.owner else {
            return err(format!(
                "stream {name} is declared in the config; remove it there and restart ferryd"
            ));
        };
        if uid != 0 && uid != owner {
            return err(format!(
                "uid {uid} may not delete stream {name}: it was created by uid {owner} (only its owner or root may)"
            ));
        }
        let users: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| match &s.role {
                Role::Producer(p) => p.stream == idx,
                Role::Consumer(c) => c.stream == idx,
                _ => false,
            })
            .map(|s| s.id)
            .collect();
        if !users.is_empty() && !force {
            return err(format!(
                "stream {name} is in use by {} session(s); stop them first, or delete with --force to close them",
                users.len()
            ));
        }
        for id in &users {
            self.fail_session(*id, &format!("stream {name} deleted by uid {uid}"));
        }
        let (held, bytes) = self.remove_stream(idx);
        limited!(
            INFO,
            stream = name,
            uid,
            held,
            closed = users.len(),
            "stream deleted"
        );
        serde_json::json!({ "ok": format!("deleted stream {name} ({held} batches it held, {bytes} pool bytes freed, {} sessions closed)", users.len()) })
    }

    /// Frees a stream no session refers to any more. Returns (batches
    /// it held, pool bytes).
    fn remove_stream(&mut self, idx: usize) -> (u32, u64) {
        self.gpus.forget_stream(idx);
        let Some(e) = self.streams.remove(idx) else {
            return (0, 0);
        };
        self.by_name.remove(&e.stream.name);
        (e.stream.slot_counts().2, e.layout.total)
    }

    /// Deletes consumer groups that have had no member for
    /// `group_idle_timeout_ms`.
    fn expire_groups(&mut self) {
        for (_, e) in self.streams.iter_mut() {
            let group_timeout = e
                .group_idle_timeout_ms
                .unwrap_or(self.cfg.daemon.group_idle_timeout_ms);
            if group_timeout == 0 {
                continue;
            }
            let t = Duration::from_millis(group_timeout);
            for g in e.stream.idle_groups(t) {
                if let Ok(held) = e.stream.delete_group(&g) {
                    e.dirty = true;
                    e.groups_expired += 1;
                    crate::limited!(
                        INFO,
                        stream = %e.stream.name,
                        group = %g,
                        held,
                        "consumer group deleted: no member for group_idle_timeout_ms = {group_timeout}"
                    );
                }
            }
        }
    }

    /// Deletes streams created by producers that no session has used for
    /// `stream_idle_timeout_ms`.
    fn expire_streams(&mut self) {
        let timeout = self.cfg.daemon.stream_idle_timeout_ms;
        let now = Instant::now();
        let mut expired = Vec::new();
        for (idx, e) in self.streams.iter_mut() {
            if e.owner.is_none() || e.in_use() {
                e.idle_since = None;
                continue;
            }
            let since = *e.idle_since.get_or_insert(now);
            if timeout > 0 && now.duration_since(since) >= Duration::from_millis(timeout) {
                expired.push(idx);
            }
        }
        for idx in expired {
            let name = self.streams[idx].stream.name.clone();
            let (held, bytes) = self.remove_stream(idx);
            crate::limited!(
                INFO,
                stream = %name,
                held,
                pool_bytes = bytes,
                "stream deleted: no session used it for stream_idle_timeout_ms = {timeout}"
            );
        }
    }

    /// Runs until SIGTERM/SIGINT, then drains and returns.
    pub fn run(mut self) -> anyhow::Result<()> {
        let want = crate::placement::parse(&self.cfg.daemon.data_plane_cpus)
            .map_err(|m| anyhow::anyhow!("daemon.{m}"))?;
        crate::placement::pin_thread(&mut self.placement, &want).map_err(|e| anyhow::anyhow!(e))?;
        info!(placement = %self.placement, "data-plane thread placed");
        info!(
            socket = %self.socket_path.display(),
            admin = %self.admin_path.display(),
            streams = self.streams.len(),
            "ferryd ready"
        );
        notify_systemd("READY=1");
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
        loop {
            iter = iter.wrapping_add(1);
            let work = self.poll_rings() + self.pump() + self.progress_gpu();
            if let Some(since) = self.draining {
                if self.drained() {
                    let held: u32 = self.streams.iter().map(|s| s.stream.slot_counts().2).sum();
                    if held == 0 {
                        info!("drained: every published batch was delivered and released");
                    } else {
                        warn!(
                            held,
                            "drained as far as it can: {held} batches were never released, and no consumer is left to take them (they are lost with this memory-only ferryd): {}",
                            self.describe_held()
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
            if iter.is_multiple_of(1024) {
                self.housekeeping();
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
                if let Some(r) = rings_of_mut(&mut s.role) {
                    match r.sub.prepare_sleep() {
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
            let timeout = if !can_sleep {
                0
            } else if self.draining.is_some() {
                50
            } else {
                500
            };
            self.poll_events(timeout)?;
            for s in self.sessions.values() {
                if let Some(r) = rings_of(&s.role) {
                    r.sub.finish_sleep();
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
                c.inflight < c.prefetch
                    && c.rings
                        .comp
                        .ring()
                        .sleep_word()
                        .load(std::sync::atomic::Ordering::Relaxed)
                        == ferry_shm::ring::SLEEPING
                    && self
                        .streams
                        .slots
                        .get(c.stream)
                        .and_then(Option::as_ref)
                        .is_some_and(|e| !e.producers.is_empty())
            }
            _ => false,
        })
    }

    /// The streams with held slots and who holds them, for the drain
    /// summary.
    fn describe_held(&self) -> String {
        self.streams
            .iter()
            .filter(|e| e.stream.slot_counts().2 > 0)
            .map(|e| format!("stream {}: {}", e.stream.name, e.stream.describe_holders()))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn drained(&self) -> bool {
        // Publishes from GPU memory still copying to host count as published.
        !self.copies_pending()
            && self.streams.iter().all(|s| {
                s.stream.slot_counts().2 == 0
                    || s.stream.groups.iter().all(|g| g.members.is_empty())
                        && s.stream
                            .groups
                            .iter()
                            .all(|g| g.parts.iter().all(|p| p.inflight.is_empty()))
            })
    }

    fn shutdown(&mut self) {
        notify_systemd("STOPPING=1");
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.close_session(id, true);
        }
        let _ = std::fs::remove_file(&self.socket_path);
        let _ = std::fs::remove_file(&self.admin_path);
        info!("ferryd stopped");
    }

    fn start_drain(&mut self, signo: i32) {
        if self.draining.is_some() {
            return;
        }
        info!(
            signal = signo,
            "draining: no new sessions; delivering what was published"
        );
        notify_systemd("STOPPING=1");
        self.draining = Some(Instant::now());
        if let Some(l) = self.listener.take() {
            self.epoll.delete(l.as_raw_fd());
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }

    fn poll_events(&mut self, timeout_ms: i32) -> anyhow::Result<()> {
        let mut events = std::mem::take(&mut self.events);
        self.epoll.wait(&mut events, timeout_ms)?;
        for &(token, _ev) in &events {
            match token {
                TOK_LISTENER => self.accept_all(),
                TOK_ADMIN => {}
                TOK_SIGNAL => {
                    while let Some(sig) = sys::signalfd_read(&self.signals) {
                        self.start_drain(sig);
                    }
                }
                // Our own eventfd: nobody else holds it, so this never blocks.
                TOK_DOORBELL => sys::eventfd_drain(self.doorbell.as_raw_fd()),
                t if t >= TOK_SESSION => self.session_readable(t - TOK_SESSION),
                _ => {}
            }
        }
        self.events = events;
        while let Ok(req) = self.admin_rx.try_recv() {
            let reply = match req.cmd {
                AdminCmd::Status { stream: None } => {
                    AdminReply::Status(Box::new(self.status_view(None)))
                }
                AdminCmd::Status { stream: Some(name) } => {
                    if self.by_name.contains_key(&name) {
                        AdminReply::Status(Box::new(self.status_view(Some(&name))))
                    } else {
                        AdminReply::Json(
                            serde_json::json!({ "error": format!("no stream named {name:?}") })
                                .to_string(),
                        )
                    }
                }
                AdminCmd::DeleteGroup { stream, group, uid } => {
                    AdminReply::Json(self.delete_group(&stream, &group, uid).to_string())
                }
                AdminCmd::DeleteStream { stream, force, uid } => {
                    AdminReply::Json(self.delete_stream(&stream, force, uid).to_string())
                }
            };
            let _ = req.reply.send(reply);
        }
        Ok(())
    }

    fn delete_group(&mut self, stream: &str, group: &str, uid: u32) -> serde_json::Value {
        let Some(&idx) = self.by_name.get(stream) else {
            return serde_json::json!({ "error": format!("no stream named {stream:?}") });
        };
        if let Err(e) = self.may_use_group(idx, group, uid, "delete") {
            return serde_json::json!({ "error": e });
        }
        let entry = &mut self.streams[idx];
        match entry.stream.delete_group(group) {
            Ok(held) => {
                entry.dirty = true;
                limited!(INFO, stream, group, held, "consumer group deleted");
                serde_json::json!({ "ok": format!("deleted group {group} of stream {stream} ({held} batches it held)") })
            }
            Err(e) => serde_json::json!({ "error": e }),
        }
    }

    /// Timeouts: connections without Hello, connections that opened
    /// nothing, a listener paused for want of descriptors, idle groups and
    /// streams. At most every HOUSEKEEPING_EVERY: the loop calls it each
    /// time it goes to sleep (up to thousands of times a second under a
    /// trickle of batches), and the timeouts are tens of milliseconds at
    /// the least.
    fn housekeeping(&mut self) {
        if self.last_housekeeping.elapsed() < HOUSEKEEPING_EVERY {
            return;
        }
        self.last_housekeeping = Instant::now();
        let hello = Duration::from_millis(self.cfg.daemon.handshake_timeout_ms);
        let idle = Duration::from_millis(self.cfg.daemon.idle_timeout_ms);
        let late: Vec<(SessionId, String)> = self
            .sessions
            .values()
            .filter_map(|s| match s.role {
                Role::Fresh if s.since.elapsed() > hello => {
                    Some((s.id, format!("no Hello within {} ms", hello.as_millis())))
                }
                Role::Control if s.since.elapsed() > idle => Some((
                    s.id,
                    format!(
                        "opened no producer or consumer within idle_timeout_ms = {}",
                        idle.as_millis()
                    ),
                )),
                _ => None,
            })
            .collect();
        for (id, why) in late {
            self.fail_session(id, &why);
        }
        if self
            .listener_paused
            .is_some_and(|t| t.elapsed() >= ACCEPT_PAUSE)
        {
            self.resume_listener();
        }
        self.expire_groups();
        self.expire_streams();
        self.report_waiting_producers();
    }

    /// Logs, once per wait, a producer that has waited `slot_wait_log_ms`
    /// for a free slot, naming the groups that hold the slots: a stalled
    /// producer is never silent.
    fn report_waiting_producers(&mut self) {
        let after = self.cfg.daemon.slot_wait_log_ms;
        if after == 0 {
            return;
        }
        let after = Duration::from_millis(after);
        for e in self.streams.iter() {
            for pid in &e.producers {
                let Some(Session {
                    role: Role::Producer(p),
                    cred,
                    ..
                }) = self.sessions.get_mut(pid)
                else {
                    continue;
                };
                let Some(since) = p.starved_since else {
                    continue;
                };
                if p.starved_logged || since.elapsed() < after || !e.stream.free.is_empty() {
                    continue;
                }
                p.starved_logged = true;
                warn!(
                    stream = %e.stream.name,
                    session = *pid,
                    pid = cred.pid,
                    waited_ms = since.elapsed().as_millis() as u64,
                    "producer waits for a free slot: all {} slots are held, by {}",
                    e.stream.spec.slot_count,
                    e.stream.describe_holders()
                );
            }
        }
    }

    /// Accepting again after running out of file descriptors.
    fn resume_listener(&mut self) {
        if self.listener_paused.take().is_none() {
            return;
        }
        if let Some(l) = &self.listener {
            if let Err(e) = self.epoll.add(l.as_raw_fd(), TOK_LISTENER) {
                limited!(WARN, "resuming the listener: {e}");
            }
        }
    }

    /// Why a new connection of `uid` would pass a connection limit.
    fn over_connection_limit(&self, uid: u32) -> Option<String> {
        let d = &self.cfg.daemon;
        if self.sessions.len() >= d.max_connections as usize {
            return Some(format!(
                "ferryd has {} connections open, daemon.max_connections = {}",
                self.sessions.len(),
                d.max_connections
            ));
        }
        let mine = self.sessions.values().filter(|s| s.cred.uid == uid).count();
        if mine >= d.max_connections_per_uid as usize {
            return Some(format!(
                "uid {uid} has {mine} connections open, daemon.max_connections_per_uid = {}",
                d.max_connections_per_uid
            ));
        }
        None
    }

    fn accept_all(&mut self) {
        loop {
            let Some(l) = self.listener.as_ref() else {
                return;
            };
            match sys::accept(l) {
                Ok(Some(sock)) => {
                    let cred = match sys::peer_cred(&sock) {
                        Ok(c) => c,
                        Err(e) => {
                            limited!(WARN, "SO_PEERCRED failed: {e}");
                            continue;
                        }
                    };
                    if let Some(why) = self.over_connection_limit(cred.uid) {
                        limited!(
                            WARN,
                            pid = cred.pid,
                            uid = cred.uid,
                            "connection refused: {why}"
                        );
                        let refusal = Response::Error {
                            code: ErrorCode::Limit,
                            message: format!("connection refused: {why}"),
                        };
                        if let Ok(b) = proto::encode(&refusal) {
                            let _ = sys::send_dontwait(&sock, &b);
                        }
                        // Read what it sent already (its Hello), so that
                        // closing does not reset the connection before the
                        // client reads the refusal (libferry copes either way).
                        let mut junk = [0u8; 256];
                        for _ in 0..4 {
                            if !matches!(sys::recv_with_fds(&sock, &mut junk, true), Ok(Some(_))) {
                                break;
                            }
                        }
                        continue;
                    }
                    let id = self.next_session;
                    self.next_session += 1;
                    if let Err(e) = self.epoll.add(sock.as_raw_fd(), TOK_SESSION + id) {
                        limited!(WARN, "epoll add: {e}");
                        continue;
                    }
                    limited!(
                        DEBUG,
                        session = id,
                        pid = cred.pid,
                        uid = cred.uid,
                        "connection"
                    );
                    self.sessions.insert(
                        id,
                        Session {
                            id,
                            sock,
                            cred,
                            role: Role::Fresh,
                            since: Instant::now(),
                        },
                    );
                }
                Ok(None) => return,
                Err(e) => {
                    let out_of_fds = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if out_of_fds {
                        // Waiting connections stay queued; retrying now
                        // would spin. Resume when a session closes or
                        // after ACCEPT_PAUSE.
                        self.epoll.delete(l.as_raw_fd());
                        self.listener_paused = Some(Instant::now());
                        limited!(
                            WARN,
                            sessions = self.sessions.len(),
                            "accept: {e}: not accepting connections until a descriptor is free"
                        );
                    } else {
                        limited!(WARN, "accept: {e}");
                    }
                    return;
                }
            }
        }
    }

    fn session_readable(&mut self, id: SessionId) {
        let mut buf = vec![0u8; proto::MAX_MESSAGE];
        // Level-triggered: what is left is reported again next turn.
        for _ in 0..MAX_MESSAGES_PER_EVENT {
            let Some(s) = self.sessions.get(&id) else {
                return;
            };
            match sys::recv_with_fds(&s.sock, &mut buf, true) {
                Ok(None) => {
                    limited!(DEBUG, session = id, "peer closed");
                    self.close_session(id, false);
                    return;
                }
                Ok(Some((n, _fds))) => {
                    let req = match proto::decode::<Request>(&buf[..n]) {
                        Ok(r) => r,
                        Err(e) => {
                            self.fail_session(id, &format!("undecodable request: {e}"));
                            return;
                        }
                    };
                    self.handle_request(id, req);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.fail_session(id, &format!("socket error: {e}"));
                    return;
                }
            }
        }
    }

    fn reply(&mut self, id: SessionId, resp: &Response, fds: &[i32]) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let bytes = match proto::encode(resp) {
            Ok(b) => b,
            Err(e) => {
                limited!(WARN, "encoding a reply: {e}");
                return;
            }
        };
        if let Err(e) = sys::send_with_fds(&s.sock, &bytes, fds) {
            limited!(DEBUG, session = id, "reply failed: {e}");
            self.close_session(id, false);
        }
    }

    fn refuse(&mut self, id: SessionId, code: ErrorCode, message: String) {
        limited!(DEBUG, session = id, ?code, %message, "request refused");
        self.reply(id, &Response::Error { code, message }, &[]);
    }

    fn handle_request(&mut self, id: SessionId, req: Request) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let fresh = matches!(s.role, Role::Fresh);
        let cred = s.cred;
        match req {
            Request::Wake => {} // the loop is awake now; the rings say the rest
            Request::Hello { protocol, client } => {
                if !fresh {
                    return self.fail_session(id, "second Hello");
                }
                if !self.policy.allows(&s.sock, &cred) {
                    limited!(
                        WARN,
                        pid = cred.pid,
                        uid = cred.uid,
                        gid = cred.gid,
                        "connection refused by policy"
                    );
                    self.refuse(
                        id,
                        ErrorCode::PermissionDenied,
                        format!(
                            "uid {} gid {} is not allowed to use this ferryd (see daemon.allowed_uids / allowed_gids)",
                            cred.uid, cred.gid
                        ),
                    );
                    return self.close_session(id, true);
                }
                if protocol != proto::PROTOCOL_VERSION {
                    self.refuse(
                        id,
                        ErrorCode::Protocol,
                        format!(
                            "client speaks protocol {protocol}, this ferryd speaks {}",
                            proto::PROTOCOL_VERSION
                        ),
                    );
                    return self.close_session(id, true);
                }
                limited!(DEBUG, session = id, client, "hello");
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.role = Role::Control;
                    s.since = Instant::now();
                }
                self.reply(
                    id,
                    &Response::Welcome {
                        protocol: proto::PROTOCOL_VERSION,
                        daemon: format!("ferryd {}", env!("CARGO_PKG_VERSION")),
                    },
                    &[],
                );
            }
            _ if fresh => self.fail_session(id, "request before Hello"),
            Request::OpenProducer {
                stream,
                spec,
                device,
                device_bus,
            } => self.open_producer(id, stream, spec, (device, device_bus)),
            Request::OpenConsumer {
                stream,
                group,
                prefetch,
                device,
                device_bus,
                start,
            } => self.open_consumer(id, stream, group, prefetch, (device, device_bus), start),
            Request::Seek { partition, offset } => self.seek(id, partition, offset),
        }
    }

    fn new_rings(&self, id: SessionId) -> Result<(Rings, Arc<Region>), (ErrorCode, String)> {
        let cap = self.cfg.daemon.ring_capacity;
        let layout = SessionLayout::new(cap);
        let region = Arc::new(
            Region::create(&format!("ferry-session-{id}"), layout.total)
                .map_err(|e| (ErrorCode::Limit, format!("creating session rings: {e}")))?,
        );
        let sub = init_ring(&region, layout.sub_offset, layout.ring_len, cap)
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        let comp = init_ring(&region, layout.comp_offset, layout.ring_len, cap)
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        Ok((
            Rings {
                _region: region.clone(),
                sub: RingConsumer::new(sub),
                comp: RingProducer::new(comp),
            },
            region,
        ))
    }

    fn check_open(&self, id: SessionId) -> Result<(), (ErrorCode, String)> {
        if self.draining.is_some() {
            return Err((ErrorCode::ShuttingDown, "ferryd is shutting down".into()));
        }
        match self.sessions.get(&id).map(|s| &s.role) {
            Some(Role::Control) => Ok(()),
            _ => Err((
                ErrorCode::InvalidArgument,
                "this connection already is a producer or consumer".into(),
            )),
        }
    }

    fn open_producer(
        &mut self,
        id: SessionId,
        name: String,
        spec: Option<StreamSpec>,
        device: (Option<u32>, Option<String>),
    ) {
        let uid = self.sessions.get(&id).map_or(u32::MAX, |s| s.cred.uid);
        let res = (|| {
            self.check_open(id)?;
            let ordinal = match &device {
                (None, None) => None,
                (n, bus) => Some(self.gpus.resolve(*n, bus.as_deref())?),
            };
            let idx = match (self.by_name.get(&name).copied(), spec) {
                (Some(idx), None) => {
                    self.may_use(idx, uid, true)
                        .map_err(|m| (ErrorCode::PermissionDenied, m))?;
                    idx
                }
                (Some(idx), Some(want)) => {
                    self.may_use(idx, uid, true)
                        .map_err(|m| (ErrorCode::PermissionDenied, m))?;
                    let e = &self.streams[idx];
                    let have = &e.stream.spec;
                    if *have != want {
                        let whose = match e.owner {
                            None => "is declared in the config, which alone defines it,".to_string(),
                            Some(o) => format!(
                                "was created by uid {o} (only that uid or root may delete it: `ferry stream delete {name}`), and exists"
                            ),
                        };
                        return Err((
                            ErrorCode::StreamMismatch,
                            format!(
                                "stream {name} {whose} with partitions={} slot_size={} slot_count={}, not partitions={} slot_size={} slot_count={}",
                                have.partitions, have.slot_size, have.slot_count, want.partitions, want.slot_size, want.slot_count
                            ),
                        ));
                    }
                    idx
                }
                (None, Some(want)) => self.create_stream(&name, want, Some(uid))?,
                (None, None) => {
                    return Err((
                        ErrorCode::UnknownStream,
                        format!("no stream named {name:?} (declare it in the config, or open the producer with a stream config to create it)"),
                    ))
                }
            };
            let gpu = match ordinal {
                None => None,
                Some(n) => {
                    let entry = &self.streams[idx];
                    Some(self.gpus.publisher(
                        n,
                        idx,
                        &entry.pool,
                        entry.stream.spec.slot_size,
                        entry.stream.spec.slot_count,
                    )?)
                }
            };
            let (rings, region) = self.new_rings(id)?;
            Ok((idx, rings, region, gpu))
        })();
        let (idx, rings, region, gpu) = match res {
            Ok(v) => v,
            Err((code, msg)) => return self.refuse(id, code, msg),
        };
        if gpu.is_some() {
            self.gpu_sessions += 1;
        }
        let entry = &mut self.streams[idx];
        let spec = entry.stream.spec.clone();
        let credits = (spec.slot_count / 4)
            .clamp(1, 64)
            .min(self.cfg.daemon.ring_capacity);
        entry.producers.push(id);
        entry.dirty = true;
        let info = SessionInfo {
            session: id,
            stream_id: idx as u32,
            partitions: spec.partitions,
            slot_size: spec.slot_size,
            slot_count: spec.slot_count,
            ring_capacity: self.cfg.daemon.ring_capacity,
            credits,
            gpu: gpu.as_ref().map(|g| g.info.clone()),
        };
        entry.idle_since = None;
        let fds = [region.fd(), entry.pool.fd()];
        if let Some(s) = self.sessions.get_mut(&id) {
            limited!(
                INFO,
                session = id,
                pid = s.cred.pid,
                stream = %name,
                device = gpu.as_ref().map(|g| format!("cuda:{}", g.info.ordinal)).unwrap_or_else(|| "host".into()),
                "producer opened"
            );
            s.role = Role::Producer(ProducerState {
                stream: idx,
                rings,
                granted: IdSet::default(),
                credits,
                published: 0,
                ended: false,
                starved_since: None,
                starved_logged: false,
                gpu,
            });
        }
        self.reply(id, &Response::Opened(info), &fds);
    }

    fn open_consumer(
        &mut self,
        id: SessionId,
        name: String,
        group: String,
        prefetch: u32,
        device: (Option<u32>, Option<String>),
        start: proto::GroupStart,
    ) {
        let cap = self.cfg.daemon.ring_capacity;
        let prefetch = if prefetch == 0 {
            8.min(cap)
        } else {
            prefetch.min(cap)
        };
        let uid = self.sessions.get(&id).map_or(u32::MAX, |s| s.cred.uid);
        let res = (|| {
            self.check_open(id)?;
            let ordinal = match &device {
                (None, None) => None,
                (n, bus) => Some(self.gpus.resolve(*n, bus.as_deref())?),
            };
            if !proto::valid_name(&group) {
                return Err((
                    ErrorCode::InvalidArgument,
                    format!("group name {group:?} must be 1-128 characters of A-Z a-z 0-9 . _ -"),
                ));
            }
            let idx = self.by_name.get(&name).copied().ok_or_else(|| {
                (
                    ErrorCode::UnknownStream,
                    format!("no stream named {name:?} (a producer creates it, or declare it in the config)"),
                )
            })?;
            self.may_use_group(idx, &group, uid, "join")
                .map_err(|m| (ErrorCode::PermissionDenied, m))?;
            let s = &self.streams[idx].stream;
            let max = self.cfg.daemon.max_groups_per_stream;
            if s.group_index(&group).is_none() && s.live_groups() >= max as usize {
                return Err((
                    ErrorCode::Limit,
                    format!("stream {name} has {} consumer groups, daemon.max_groups_per_stream = {max} (`ferry group delete` removes an unused one)", s.live_groups()),
                ));
            }
            let gpu = match ordinal {
                None => None,
                Some(n) => {
                    let entry = &self.streams[idx];
                    Some(self.gpus.delivery(
                        n,
                        idx,
                        &entry.pool,
                        entry.stream.spec.slot_size,
                        prefetch,
                    )?)
                }
            };
            let (rings, region) = self.new_rings(id)?;
            Ok((idx, rings, region, gpu))
        })();
        let (idx, rings, region, gpu) = match res {
            Ok(v) => v,
            Err((code, msg)) => return self.refuse(id, code, msg),
        };
        let entry = &mut self.streams[idx];
        let new_group = entry.stream.group_index(&group).is_none();
        let g = match entry.stream.join(&group, id, &start) {
            Ok(g) => g,
            Err(e) => {
                let code = match e {
                    crate::stream::SeekError::Gone { .. } => ErrorCode::OffsetGone,
                    _ => ErrorCode::InvalidArgument,
                };
                return self.refuse(id, code, format!("start of new group {group}: {e}"));
            }
        };
        let epoch_seen = entry.stream.groups[g].epoch;
        if new_group {
            entry.stream.groups[g].owner = uid;
        }
        entry.dirty = true;
        let spec = entry.stream.spec.clone();
        let info = SessionInfo {
            session: id,
            stream_id: idx as u32,
            partitions: spec.partitions,
            slot_size: spec.slot_size,
            slot_count: spec.slot_count,
            ring_capacity: cap,
            credits: prefetch,
            gpu: gpu.as_ref().map(|g| g.info.clone()),
        };
        entry.idle_since = None;
        // Consumers read the pool and nothing more: a read-only file
        // description cannot be mapped writable or punched.
        let fds = [region.fd(), entry.pool_ro.as_raw_fd()];
        if gpu.is_some() {
            self.gpu_sessions += 1;
        }
        if let Some(s) = self.sessions.get_mut(&id) {
            limited!(
                INFO,
                session = id,
                pid = s.cred.pid,
                stream = %name,
                group = %group,
                device = gpu.as_ref().map(|g| format!("cuda:{}", g.info.ordinal)).unwrap_or_else(|| "host".into()),
                "consumer joined"
            );
            s.role = Role::Consumer(ConsumerState {
                stream: idx,
                group: g,
                rings,
                prefetch,
                inflight: 0,
                delivered: 0,
                epoch_seen,
                gpu,
            });
        }
        self.reply(id, &Response::Opened(info), &fds);
    }

    fn seek(&mut self, id: SessionId, partition: u32, offset: u64) {
        // Releases already queued come first.
        self.drain_session(id);
        let Some(Role::Consumer(c)) = self.sessions.get(&id).map(|s| &s.role) else {
            return self.refuse(
                id,
                ErrorCode::InvalidArgument,
                "seek on a connection that is not a consumer".into(),
            );
        };
        let (idx, g) = (c.stream, c.group);
        let entry = &mut self.streams[idx];
        match entry.stream.seek(g, partition, offset) {
            Ok(()) => {
                entry.dirty = true;
                self.reply(id, &Response::Done, &[]);
            }
            Err(e) => self.refuse(id, ErrorCode::OffsetGone, e.to_string()),
        }
    }

    /// Processes every submission ring. Returns descriptors handled.
    fn poll_rings(&mut self) -> usize {
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        ids.extend(
            self.sessions
                .iter()
                .filter(|(_, s)| rings_of(&s.role).is_some())
                .map(|(id, _)| *id),
        );
        let n = ids.iter().map(|&id| self.drain_session(id)).sum();
        self.scratch = ids;
        n
    }

    fn drain_session(&mut self, id: SessionId) -> usize {
        match self.drain_session_inner(id) {
            Ok(n) => n,
            Err(v) => {
                self.fail_session(id, &v.0);
                0
            }
        }
    }

    fn drain_session_inner(&mut self, id: SessionId) -> Result<usize, Violation> {
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(0);
        };
        let mut n = 0;
        let mut end_check = None;
        match &mut s.role {
            Role::Producer(p) => {
                let entry = &mut self.streams[p.stream];
                while let Some(d) = p.rings.sub.pop().map_err(|e| Violation(e.to_string()))? {
                    if d.op == desc::OP_END {
                        n += 1;
                        if let Some(g) = &mut p.gpu {
                            // In order: the publishes before it go in first
                            // (a short wait for their copies, once an epoch).
                            let (granted, published) = (&mut p.granted, &mut p.published);
                            let dev = g.info.ordinal;
                            g.finish(|d| publish_copied(entry, id, d, dev, granted, published))
                                .map_err(Violation)?;
                        }
                        p.ended = true;
                        end_check = Some(p.stream);
                        // The epoch may end here: what this producer
                        // publishes next waits for that, so that it lands
                        // after the markers.
                        break;
                    }
                    if d.op != desc::OP_PUBLISH {
                        return Err(Violation(format!("producer sent op {}", d.op)));
                    }
                    p.ended = false;
                    let key = (d.flags & desc::FLAG_HAS_KEY != 0).then_some(d.key);
                    if let Some(g) = &mut p.gpu {
                        // Takes effect once its copy to the host slot is
                        // done (progress_gpu), in order.
                        entry.stream.check_publish(id, d.slot, d.len, d.meta_len)?;
                        let off = entry.layout.slot_offset(d.slot).ok_or_else(|| {
                            Violation(format!("publish of slot {} out of range", d.slot))
                        })?;
                        g.queue(d, off).map_err(Violation)?;
                        n += 1;
                        continue;
                    }
                    if d.flags & desc::FLAG_DEVICE != 0 {
                        return Err(Violation(
                            "publish from GPU memory by a producer opened for host memory".into(),
                        ));
                    }
                    entry.stream.publish(
                        id,
                        d.slot,
                        d.len,
                        d.meta_len,
                        key,
                        None,
                        entry_flags(&d),
                    )?;
                    p.granted.remove(&d.slot);
                    p.published += 1;
                    entry.dirty = true;
                    n += 1;
                }
            }
            Role::Consumer(c) => {
                let entry = &mut self.streams[c.stream];
                // "Commit everything I own" costs a pass over the member's
                // partitions: a ring full of them is applied once.
                let mut commit_all = false;
                while let Some(d) = c.rings.sub.pop().map_err(|e| Violation(e.to_string()))? {
                    match d.op {
                        desc::OP_RELEASE => {
                            if let Some(g) = &mut c.gpu {
                                g.release(d.partition, d.offset, d.dslot)?;
                            }
                            entry
                                .stream
                                .release(c.group, id, d.partition, d.offset, d.slot)?;
                            c.inflight = c.inflight.saturating_sub(1);
                            if d.flags & desc::FLAG_COMMIT != 0 {
                                commit_all = true;
                            }
                        }
                        desc::OP_COMMIT if d.partition == desc::COMMIT_ALL => commit_all = true,
                        desc::OP_COMMIT => {
                            if commit_all {
                                // Keep the order: the earlier commit-all first.
                                entry.stream.commit(c.group, id, None, 0)?;
                                commit_all = false;
                            }
                            entry
                                .stream
                                .commit(c.group, id, Some(d.partition), d.offset)?;
                        }
                        op => return Err(Violation(format!("consumer sent op {op}"))),
                    }
                    entry.dirty = true;
                    n += 1;
                }
                if commit_all {
                    // Later than the member asked: releases since then only
                    // raise the low watermark, which stays true.
                    entry.stream.commit(c.group, id, None, 0)?;
                }
            }
            _ => {}
        }
        if let Some(idx) = end_check {
            self.maybe_end_epoch(idx, false);
        }
        Ok(n)
    }

    /// Ends the epoch of stream `idx` when every producer attached to it
    /// has said it is done (`OP_END`) and at least one has: end markers go
    /// into every partition, and the producers start the next epoch.
    fn maybe_end_epoch(&mut self, idx: usize, leaving_ended: bool) {
        let entry = &mut self.streams[idx];
        entry.end_pending |= leaving_ended;
        let mut any = entry.end_pending;
        for pid in &entry.producers {
            if let Some(Session {
                role: Role::Producer(p),
                ..
            }) = self.sessions.get(pid)
            {
                if !p.ended {
                    return;
                }
                any = true;
            }
        }
        if !any {
            return;
        }
        entry.end_pending = false;
        for pid in &entry.producers {
            if let Some(Session {
                role: Role::Producer(p),
                ..
            }) = self.sessions.get_mut(pid)
            {
                p.ended = false;
            }
        }
        if !entry.stream.end_epoch() {
            return; // nothing published since the last end
        }
        entry.dirty = true;
        limited!(
            INFO,
            stream = %entry.stream.name,
            producers = entry.producers.len(),
            "end of epoch: every producer said it is done"
        );
    }

    /// Grants free slots to producers and delivers batches to consumers of
    /// every stream whose state changed. Returns descriptors pushed.
    fn pump(&mut self) -> usize {
        let mut pushed = 0;
        let mut to_wake = std::mem::take(&mut self.wake_scratch);
        to_wake.clear();
        let mut failed: Vec<(SessionId, String)> = Vec::new();
        let draining = self.draining.is_some();
        let gpus = &self.gpus;
        for (idx, entry) in self.streams.iter_mut() {
            if !entry.dirty {
                continue;
            }
            entry.dirty = false;
            // Grants, round-robin over producers.
            if !draining && !entry.producers.is_empty() {
                let n = entry.producers.len();
                let mut progress = true;
                while progress && !entry.stream.free.is_empty() {
                    progress = false;
                    for i in 0..n {
                        let pid = entry.producers[i];
                        let Some(Session {
                            role: Role::Producer(p),
                            ..
                        }) = self.sessions.get_mut(&pid)
                        else {
                            continue;
                        };
                        if p.granted.len() as u32 >= p.credits {
                            continue;
                        }
                        let Some(slot) = entry.stream.grant(pid) else {
                            break;
                        };
                        p.starved_since = None;
                        p.starved_logged = false;
                        let d = Desc {
                            op: desc::OP_GRANT,
                            stream: entry.stream.id,
                            slot,
                            ..Desc::default()
                        };
                        match p.rings.comp.push(&d) {
                            Ok(()) => {
                                p.granted.insert(slot);
                                pushed += 1;
                                progress = true;
                                to_wake.push(pid);
                            }
                            Err(e) => {
                                entry.stream.return_grant(pid, slot);
                                if !matches!(e, ferry_shm::RingError::Full) {
                                    failed.push((pid, e.to_string()));
                                }
                            }
                        }
                    }
                }
            }
            if entry.stream.free.is_empty() {
                for pid in &entry.producers {
                    if let Some(Session {
                        role: Role::Producer(p),
                        ..
                    }) = self.sessions.get_mut(pid)
                    {
                        if p.granted.is_empty() && p.starved_since.is_none() {
                            p.starved_since = Some(Instant::now());
                        }
                    }
                }
            }
            // Deliveries.
            let sessions = &mut self.sessions;
            let ends_untold = std::mem::take(&mut entry.ends_untold);
            for g in 0..entry.stream.groups.len() {
                let sid = entry.stream.id;
                let pool_layout = entry.layout;
                let epoch = entry.stream.groups[g].epoch;
                let n = entry.stream.deliver(g, |m, dv| {
                    let Some(Session {
                        role: Role::Consumer(c),
                        ..
                    }) = sessions.get_mut(&m)
                    else {
                        return false;
                    };
                    if c.inflight >= c.prefetch {
                        return false; // no credit: prefetch batches unreleased
                    }
                    if c.epoch_seen < epoch {
                        return false; // the next epoch, after its end of epoch
                    }
                    let d = Desc {
                        op: desc::OP_DELIVER,
                        flags: if dv.entry.flags & crate::stream::ENTRY_RECORD != 0 {
                            desc::FLAG_RECORD
                        } else {
                            0
                        },
                        stream: sid,
                        partition: dv.part,
                        slot: dv.entry.slot,
                        len: dv.entry.len,
                        meta_len: dv.entry.meta_len.min(META_MAX),
                        offset: dv.offset,
                        ..Desc::default()
                    };
                    if let Some(g) = &mut c.gpu {
                        // The descriptor goes out when the copy is done
                        // (progress_gpu).
                        let Some(src) = pool_layout.slot_offset(dv.entry.slot) else {
                            return false;
                        };
                        let from = gpus.source(idx, dv.entry.device, dv.entry.slot);
                        return match g.start(d, src, from) {
                            Ok(true) => {
                                c.inflight += 1;
                                c.delivered += 1;
                                true
                            }
                            Ok(false) => false,
                            Err(e) => {
                                failed.push((m, e));
                                false
                            }
                        };
                    }
                    debug_assert!(pool_layout.slot_offset(dv.entry.slot).is_some());
                    match c.rings.comp.push(&d) {
                        Ok(()) => {
                            c.inflight += 1;
                            c.delivered += 1;
                            to_wake.push(m);
                            true
                        }
                        Err(e) => {
                            if !matches!(e, ferry_shm::RingError::Full) {
                                failed.push((m, e.to_string()));
                            }
                            false
                        }
                    }
                });
                pushed += n;
                // Members not yet told of an epoch the group finished (after
                // every batch of it that they were given, GPU copies
                // included).
                let group = &entry.stream.groups[g];
                if group.epoch > epoch {
                    // Delivery stopped at the end of the epoch: go on once
                    // the members were told.
                    entry.dirty = true;
                } else if !ends_untold {
                    continue;
                }
                for &m in &group.members {
                    let Some(Session {
                        role: Role::Consumer(c),
                        ..
                    }) = sessions.get_mut(&m)
                    else {
                        continue;
                    };
                    while c.epoch_seen < group.epoch
                        && c.gpu.as_ref().is_none_or(|g| g.pending() == 0)
                    {
                        let d = Desc {
                            op: desc::OP_END_OF_EPOCH,
                            stream: sid,
                            offset: c.epoch_seen + 1,
                            ..Desc::default()
                        };
                        match c.rings.comp.push(&d) {
                            Ok(()) => {
                                c.epoch_seen += 1;
                                pushed += 1;
                                to_wake.push(m);
                            }
                            Err(ferry_shm::RingError::Full) => break,
                            Err(e) => {
                                failed.push((m, e.to_string()));
                                break;
                            }
                        }
                    }
                    if c.epoch_seen < group.epoch {
                        // Ring full or GPU copies in flight: again later.
                        entry.ends_untold = true;
                        entry.dirty = true;
                    }
                }
            }
        }
        to_wake.sort_unstable();
        to_wake.dedup();
        for id in to_wake.iter() {
            if let Some(r) = self.sessions.get(id).and_then(|s| rings_of(&s.role)) {
                if r.comp.wake_needed() {
                    sys::futex_wake(r.comp.ring().sleep_word());
                }
            }
        }
        self.wake_scratch = to_wake;
        for (id, why) in failed {
            self.fail_session(id, &why);
        }
        pushed
    }

    /// Puts the descriptors of finished GPU copies on their consumers'
    /// rings. Returns descriptors pushed.
    fn progress_gpu(&mut self) -> usize {
        if self.gpu_sessions == 0 {
            return 0;
        }
        let mut pushed = 0;
        let mut failed: Vec<(SessionId, String)> = Vec::new();
        let streams = &mut self.streams;
        for (&id, s) in self.sessions.iter_mut() {
            if let Role::Producer(p) = &mut s.role {
                if let Some(g) = &mut p.gpu {
                    if g.pending() > 0 {
                        let entry = &mut streams[p.stream];
                        let (granted, published) = (&mut p.granted, &mut p.published);
                        let dev = g.info.ordinal;
                        match g.complete(|d| publish_copied(entry, id, d, dev, granted, published))
                        {
                            Ok(n) => pushed += n,
                            Err(e) => failed.push((id, e)),
                        }
                    }
                }
                continue;
            }
            let Role::Consumer(c) = &mut s.role else {
                continue;
            };
            let Some(g) = &mut c.gpu else {
                continue;
            };
            if g.pending() == 0 {
                continue;
            }
            let comp = &mut c.rings.comp;
            let mut ring_err = None;
            let res = g.complete(|d| match comp.push(d) {
                Ok(()) => true,
                Err(ferry_shm::RingError::Full) => false,
                Err(e) => {
                    ring_err = Some(e.to_string());
                    false
                }
            });
            match (res, ring_err) {
                (Err(e), _) | (_, Some(e)) => failed.push((id, e)),
                (Ok(0), None) => {}
                (Ok(n), None) => {
                    pushed += n;
                    if comp.wake_needed() {
                        sys::futex_wake(comp.ring().sleep_word());
                    }
                    // An end of epoch may wait for these copies.
                    streams[c.stream].dirty = true;
                }
            }
        }
        for (id, why) in failed {
            self.fail_session(id, &why);
        }
        pushed
    }

    /// GPU copies in flight anywhere (the loop keeps polling for them).
    fn copies_pending(&self) -> bool {
        self.gpu_sessions > 0
            && self.sessions.values().any(|s| match &s.role {
                Role::Consumer(ConsumerState { gpu: Some(g), .. }) => g.pending() > 0,
                Role::Producer(ProducerState { gpu: Some(g), .. }) => g.pending() > 0,
                _ => false,
            })
    }

    /// A client broke the protocol: close its session, keep serving others.
    fn fail_session(&mut self, id: SessionId, why: &str) {
        if let Some(s) = self.sessions.get(&id) {
            limited!(
                WARN,
                session = id,
                pid = s.cred.pid,
                uid = s.cred.uid,
                "closing session: {why}"
            );
        }
        self.close_session(id, true);
    }

    /// Closes a session. Unless it misbehaved, whatever it queued on its
    /// submission ring (publishes, releases) is processed first: nothing a
    /// client handed over before it went away is lost.
    fn close_session(&mut self, id: SessionId, skip_drain: bool) {
        if !skip_drain {
            // Until the ring is empty: a producer's drain stops after an
            // end of epoch (bounded: a client writing on after its death
            // cannot keep us here).
            for _ in 0..=self.cfg.daemon.ring_capacity {
                match self.drain_session_inner(id) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(v) => {
                        limited!(WARN, session = id, "while closing: {}", v.0);
                        break;
                    }
                }
            }
        }
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        self.epoll.delete(s.sock.as_raw_fd());
        // A descriptor is free again.
        self.resume_listener();
        match s.role {
            Role::Producer(mut p) => {
                let entry = &mut self.streams[p.stream];
                if let Some(g) = &mut p.gpu {
                    // Everything it published is kept: wait for the copies
                    // and put those batches into the stream.
                    let (granted, published) = (&mut p.granted, &mut p.published);
                    let dev = g.info.ordinal;
                    if let Err(e) =
                        g.finish(|d| publish_copied(entry, id, d, dev, granted, published))
                    {
                        limited!(WARN, session = id, "while closing: {e}");
                    }
                    self.gpu_sessions -= 1;
                }
                drop(p.gpu.take());
                for slot in p.granted {
                    entry.stream.return_grant(id, slot);
                }
                entry.producers.retain(|&x| x != id);
                entry.dirty = true;
                // The others may all have ended already (or this one was
                // the last, and ended).
                let (idx, ended) = (p.stream, p.ended);
                self.maybe_end_epoch(idx, ended);
                limited!(
                    INFO,
                    session = id,
                    pid = s.cred.pid,
                    published = p.published,
                    "producer closed"
                );
            }
            Role::Consumer(mut c) => {
                if let Some(g) = &mut c.gpu {
                    // Copies still reading host slots finish before those
                    // slots can go to anybody else.
                    g.quiesce();
                    self.gpu_sessions -= 1;
                }
                drop(c.gpu.take());
                let entry = &mut self.streams[c.stream];
                entry.stream.leave(c.group, id);
                entry.dirty = true;
                limited!(
                    INFO,
                    session = id,
                    pid = s.cred.pid,
                    delivered = c.delivered,
                    unreleased = c.inflight,
                    "consumer left; its unreleased batches go to the rest of its group"
                );
            }
            _ => {}
        }
    }

    /// A status snapshot: every stream with at most MAX_STATUS_ROWS
    /// partition rows in all, or stream `only` in full.
    fn status_view(&self, only: Option<&str>) -> Status {
        let mut rows_left = if only.is_some() {
            usize::MAX
        } else {
            MAX_STATUS_ROWS
        };
        let streams = self
            .streams
            .iter()
            .filter(|e| only.is_none_or(|n| n == e.stream.name))
            .map(|e| {
                let s = &e.stream;
                let (free, granted, held) = s.slot_counts();
                let ends: Vec<u64> = s.parts.iter().map(|p| p.end).collect();
                StreamStatus {
                    name: s.name.clone(),
                    declared: e.owner.is_none(),
                    owner_uid: e.owner,
                    pool_bytes: e.layout.total,
                    partitions: s.spec.partitions,
                    slot_size: s.spec.slot_size,
                    slot_count: s.spec.slot_count,
                    slots_free: free,
                    slots_granted: granted,
                    slots_held: held,
                    published: s.published,
                    end_offsets: ends.clone(),
                    slots_held_for_first_group: s.orphans(),
                    groups_expired: e.groups_expired,
                    producers: e
                        .producers
                        .iter()
                        .filter_map(|id| {
                            let sess = self.sessions.get(id)?;
                            let Role::Producer(p) = &sess.role else {
                                return None;
                            };
                            Some(ProducerStatus {
                                session: *id,
                                pid: sess.cred.pid,
                                granted: p.granted.len() as u32,
                                published: p.published,
                                waiting_for_slot_ms: p
                                    .starved_since
                                    .filter(|_| s.free.is_empty())
                                    .map(|t| t.elapsed().as_millis() as u64),
                                device: p.gpu.as_ref().map(|g| format!("cuda:{}", g.info.ordinal)),
                                gpu_copies_in_flight: p
                                    .gpu
                                    .as_ref()
                                    .map_or(0, |g| g.pending() as u32),
                                gpu_bytes_copied: p.gpu.as_ref().map_or(0, |g| g.copied_bytes),
                            })
                        })
                        .collect(),
                    groups: s
                        .groups
                        .iter()
                        .enumerate()
                        .filter(|(_, g)| !g.deleted)
                        .map(|(gi, g)| {
                            let shown = g.parts.len().min(rows_left);
                            rows_left -= shown;
                            let lag = g
                                .parts
                                .iter()
                                .enumerate()
                                .map(|(p, gp)| ends[p].saturating_sub(gp.committed))
                                .sum();
                            let parts: Vec<GroupPartStatus> = g
                                .parts
                                .iter()
                                .enumerate()
                                .take(shown)
                                .map(|(p, gp)| GroupPartStatus {
                                    partition: p as u32,
                                    owner: g.assign[p],
                                    next: gp.position(),
                                    committed: gp.committed,
                                    end: ends[p],
                                    lag: ends[p].saturating_sub(gp.committed),
                                    inflight: gp.inflight.len() as u32,
                                    redeliver: gp.pending.len() as u32,
                                })
                                .collect();
                            GroupStatus {
                                name: g.name.clone(),
                                lag,
                                slots_held: s.held_by(gi),
                                epochs: g.epoch,
                                owner_uid: g.owner,
                                partitions_omitted: (g.parts.len() - shown) as u32,
                                members: g
                                    .members
                                    .iter()
                                    .filter_map(|id| {
                                        let sess = self.sessions.get(id)?;
                                        let Role::Consumer(c) = &sess.role else {
                                            return None;
                                        };
                                        Some(MemberStatus {
                                            session: *id,
                                            pid: sess.cred.pid,
                                            partitions: g.partitions_of(*id),
                                            prefetch: c.prefetch,
                                            inflight: c.inflight,
                                            delivered: c.delivered,
                                            ring_occupancy: c.rings.comp.ring().occupancy(),
                                            device: c
                                                .gpu
                                                .as_ref()
                                                .map(|g| format!("cuda:{}", g.info.ordinal)),
                                            gpu_copies_in_flight: c
                                                .gpu
                                                .as_ref()
                                                .map_or(0, |g| g.pending() as u32),
                                            gpu_bytes_copied: c
                                                .gpu
                                                .as_ref()
                                                .map_or(0, |g| g.copied_bytes),
                                            gpu_bytes_from_gpu: c
                                                .gpu
                                                .as_ref()
                                                .map_or(0, |g| g.d2d_bytes),
                                        })
                                    })
                                    .collect(),
                                partitions: parts,
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        Status {
            daemon: format!("ferryd {}", env!("CARGO_PKG_VERSION")),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            socket: self.socket_path.display().to_string(),
            draining: self.draining.is_some(),
            fabric: self.fabric.clone(),
            placement: self.placement.clone(),
            gpus: match &self.gpus.probe {
                Ok(p) => p.gpus.clone(),
                Err(_) => Vec::new(),
            },
            gpu_note: match &self.gpus.probe {
                Ok(p) => format!("CUDA driver {}", p.driver_version),
                Err(e) => e.to_string(),
            },
            sessions: self.sessions.len(),
            memory: {
                let (total, per_uid) = self.usage();
                MemoryStatus {
                    pool_bytes: total.pool_bytes,
                    max_total_pool_bytes: self.cfg.max_total_pool_bytes(),
                    max_pool_bytes_per_uid: self.cfg.max_pool_bytes_per_uid(),
                    streams: total.streams,
                    max_streams: self.cfg.daemon.max_streams,
                    per_uid: per_uid.into_values().collect(),
                }
            },
            streams,
        }
    }
}

/// Serves the admin socket: each client on a thread of its own (at most
/// [`MAX_ADMIN_CLIENTS`] at once), its request limited to
/// [`MAX_ADMIN_REQUEST`] bytes arriving within `timeout`, so that no client
/// delays another, and none ever reaches the data-plane loop except
/// through the channel (the doorbell wakes the loop).
fn spawn_admin(
    listener: UnixListener,
    policy: Policy,
    timeout: Duration,
    doorbell: OwnedFd,
) -> anyhow::Result<std::sync::mpsc::Receiver<AdminRequest>> {
    let (tx, rx) = std::sync::mpsc::channel();
    listener.set_nonblocking(false)?;
    let doorbell = Arc::new(doorbell);
    // Admin clients being served, per uid.
    let active: Arc<std::sync::Mutex<HashMap<u32, usize>>> = Arc::default();
    std::thread::Builder::new()
        .name("ferryd-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let mut conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors: the connection stays queued
                        // and accept would fail again at once; wait instead.
                        limited!(WARN, "admin accept: {e}");
                        std::thread::sleep(ACCEPT_PAUSE);
                        continue;
                    }
                };
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                let cred = sys::peer_cred(&conn).ok();
                let uid = cred.map_or(u32::MAX, |c| c.uid);
                let busy = {
                    let mut a = active.lock().unwrap_or_else(|p| p.into_inner());
                    let total: usize = a.values().sum();
                    let mine = a.get(&uid).copied().unwrap_or(0);
                    if total >= MAX_ADMIN_CLIENTS {
                        Some("ferryd is busy with other admin clients; try again")
                    } else if mine >= MAX_ADMIN_CLIENTS_PER_UID {
                        Some("this uid already has the most admin requests in progress; try again")
                    } else {
                        *a.entry(uid).or_default() += 1;
                        None
                    }
                };
                if let Some(why) = busy {
                    let _ = conn
                        .write_all(format!("{}\n", serde_json::json!({ "error": why })).as_bytes());
                    continue;
                }
                let (tx, policy, doorbell, done) =
                    (tx.clone(), policy.clone(), doorbell.clone(), active.clone());
                let finished = move |a: &std::sync::Mutex<HashMap<u32, usize>>| {
                    let mut a = a.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(n) = a.get_mut(&uid) {
                        *n -= 1;
                        if *n == 0 {
                            a.remove(&uid);
                        }
                    }
                };
                let spawned = std::thread::Builder::new()
                    .name("ferryd-admin-client".into())
                    .spawn(move || {
                        serve_admin(conn, cred, &policy, timeout, &tx, &doorbell);
                        finished(&done);
                    });
                if spawned.is_err() {
                    finished(&active);
                }
            }
        })?;
    Ok(rx)
}

/// Reads one request line: at most [`MAX_ADMIN_REQUEST`] bytes, all of it
/// before `deadline`.
fn read_admin_line(
    conn: &mut std::os::unix::net::UnixStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<String, String> {
    let mut line = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the request did not arrive whole within {} ms",
                timeout.as_millis()
            ));
        }
        let _ = conn.set_read_timeout(Some(left));
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                if let Some(end) = line.iter().position(|&b| b == b'\n') {
                    line.truncate(end);
                    break;
                }
                if line.len() > MAX_ADMIN_REQUEST {
                    return Err(format!("request longer than {MAX_ADMIN_REQUEST} bytes"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue; // the deadline check above answers
            }
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
    if line.len() > MAX_ADMIN_REQUEST {
        return Err(format!("request longer than {MAX_ADMIN_REQUEST} bytes"));
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

/// An admin request line as a command of the client `uid`.
fn parse_admin(line: &str, uid: u32) -> Result<AdminCmd, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let stream = |s: &&str| s.to_string();
    match words.as_slice() {
        ["status"] => Ok(AdminCmd::Status { stream: None }),
        ["status", s] => Ok(AdminCmd::Status {
            stream: Some(stream(s)),
        }),
        ["delete-group", s, group] => Ok(AdminCmd::DeleteGroup {
            stream: stream(s),
            group: group.to_string(),
            uid,
        }),
        ["delete-stream", s] | ["delete-stream", s, "force"] => Ok(AdminCmd::DeleteStream {
            stream: stream(s),
            force: words.len() == 3,
            uid,
        }),
        _ => Err(format!(
            "unknown admin command {:?} (status [STREAM], delete-group STREAM GROUP, delete-stream STREAM [force])",
            line.chars().take(64).collect::<String>()
        )),
    }
}

/// Hands `cmd` to the loop (waking it) and returns its answer as JSON;
/// None when the loop is gone.
fn ask_loop(
    cmd: AdminCmd,
    tx: &std::sync::mpsc::Sender<AdminRequest>,
    doorbell: &OwnedFd,
) -> Option<Result<String, String>> {
    let (rtx, rrx) = std::sync::mpsc::channel();
    tx.send(AdminRequest { cmd, reply: rtx }).ok()?;
    sys::eventfd_signal(doorbell.as_raw_fd());
    Some(match rrx.recv_timeout(Duration::from_secs(5)) {
        Ok(AdminReply::Json(j)) => Ok(j),
        Ok(AdminReply::Status(st)) => {
            serde_json::to_string(&st).map_err(|e| format!("encoding the status: {e}"))
        }
        Err(_) => Err("ferryd did not answer".into()),
    })
}

/// Serves one admin client (`cred`, read at accept): the policy first,
/// then one request line, then the loop's answer.
fn serve_admin(
    mut conn: std::os::unix::net::UnixStream,
    cred: Option<PeerCred>,
    policy: &Policy,
    timeout: Duration,
    tx: &std::sync::mpsc::Sender<AdminRequest>,
    doorbell: &OwnedFd,
) {
    let deadline = Instant::now() + timeout;
    let answer = match cred {
        Some(c) if policy.allows(&conn, &c) => {
            let cmd = read_admin_line(&mut conn, deadline, timeout)
                .and_then(|line| parse_admin(&line, c.uid));
            match cmd {
                Err(e) => Err(e),
                Ok(cmd) => match ask_loop(cmd, tx, doorbell) {
                    Some(a) => a,
                    None => return, // the loop is gone
                },
            }
        }
        Some(c) => {
            limited!(
                WARN,
                pid = c.pid,
                uid = c.uid,
                "admin connection refused by policy"
            );
            Err(format!(
                "permission denied: uid {} gid {} may not use this ferryd",
                c.uid, c.gid
            ))
        }
        None => Err("permission denied: no peer credentials".into()),
    };
    let reply = answer.unwrap_or_else(|m| serde_json::json!({ "error": m }).to_string());
    let _ = conn.write_all(reply.as_bytes());
    let _ = conn.write_all(b"\n");
}

/// The stream entry flags a publish descriptor asks for.
fn entry_flags(d: &Desc) -> u16 {
    if d.flags & desc::FLAG_RECORD != 0 {
        crate::stream::ENTRY_RECORD
    } else {
        0
    }
}

/// Puts a batch a producer published from GPU `dev` into its stream, now
/// that its copy to the host slot is done (batches published from host
/// memory by the same producer wait in the same queue, keeping its order).
fn publish_copied(
    entry: &mut StreamEntry,
    id: SessionId,
    d: &Desc,
    dev: u32,
    granted: &mut IdSet<u32>,
    published: &mut u64,
) -> Result<(), Violation> {
    let key = (d.flags & desc::FLAG_HAS_KEY != 0).then_some(d.key);
    let device = (d.flags & desc::FLAG_DEVICE != 0).then_some(dev);
    entry
        .stream
        .publish(id, d.slot, d.len, d.meta_len, key, device, entry_flags(d))?;
    granted.remove(&d.slot);
    *published += 1;
    entry.dirty = true;
    Ok(())
}

fn rings_of(role: &Role) -> Option<&Rings> {
    match role {
        Role::Producer(p) => Some(&p.rings),
        Role::Consumer(c) => Some(&c.rings),
        _ => None,
    }
}

fn rings_of_mut(role: &mut Role) -> Option<&mut Rings> {
    match role {
        Role::Producer(p) => Some(&mut p.rings),
        Role::Consumer(c) => Some(&mut c.rings),
        _ => None,
    }
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub daemon: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub socket: String,
    pub draining: bool,
    /// The fabric backend and why it was chosen.
    #[serde(default)]
    pub fabric: String,
    /// Where the data-plane thread runs, and why.
    #[serde(default)]
    pub placement: crate::placement::Placement,
    /// GPUs found at start-up.
    #[serde(default)]
    pub gpus: Vec<ferry_cuda::GpuInfo>,
    /// The CUDA driver version, or why there are no GPUs.
    #[serde(default)]
    pub gpu_note: String,
    pub sessions: usize,
    /// Pool memory and streams against their limits.
    #[serde(default)]
    pub memory: MemoryStatus,
    pub streams: Vec<StreamStatus>,
}

#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct MemoryStatus {
    /// Data pool bytes of all streams.
    pub pool_bytes: u64,
    pub max_total_pool_bytes: u64,
    pub max_pool_bytes_per_uid: u64,
    pub streams: u32,
    pub max_streams: u32,
    /// What the streams each uid created take.
    pub per_uid: Vec<UidUsage>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StreamStatus {
    pub name: String,
    pub declared: bool,
    /// The uid that created it (None: declared in the config).
    #[serde(default)]
    pub owner_uid: Option<u32>,
    /// Bytes of its data pool.
    #[serde(default)]
    pub pool_bytes: u64,
    pub partitions: u32,
    pub slot_size: u64,
    pub slot_count: u32,
    pub slots_free: u32,
    pub slots_granted: u32,
    pub slots_held: u32,
    pub published: u64,
    pub end_offsets: Vec<u64>,
    /// Slots holding batches published while the stream had no group,
    /// kept for the first group to form.
    #[serde(default)]
    pub slots_held_for_first_group: u32,
    /// Groups deleted for having had no member for group_idle_timeout_ms.
    #[serde(default)]
    pub groups_expired: u64,
    pub producers: Vec<ProducerStatus>,
    pub groups: Vec<GroupStatus>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ProducerStatus {
    pub session: u64,
    pub pid: i32,
    pub granted: u32,
    pub published: u64,
    /// How long it has waited for a free slot (none granted, none free);
    /// absent when it is not waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_slot_ms: Option<u64>,
    /// "cuda:N" when publishing from GPU memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default)]
    pub gpu_copies_in_flight: u32,
    #[serde(default)]
    pub gpu_bytes_copied: u64,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub lag: u64,
    /// Slots whose batch this group has not released (or not received).
    #[serde(default)]
    pub slots_held: u64,
    /// Epochs it finished (passed the end markers of every partition).
    #[serde(default)]
    pub epochs: u64,
    /// The uid that created the group.
    #[serde(default)]
    pub owner_uid: u32,
    /// Partition rows left out of a full status (see `ferry status
    /// STREAM`).
    #[serde(default)]
    pub partitions_omitted: u32,
    pub members: Vec<MemberStatus>,
    pub partitions: Vec<GroupPartStatus>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct MemberStatus {
    pub session: u64,
    pub pid: i32,
    pub partitions: Vec<u32>,
    pub prefetch: u32,
    pub inflight: u32,
    pub delivered: u64,
    pub ring_occupancy: u32,
    /// "cuda:N" for GPU delivery (ferryd's numbering); absent for host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default)]
    pub gpu_copies_in_flight: u32,
    #[serde(default)]
    pub gpu_bytes_copied: u64,
    /// Of those, copied from GPU memory (batches published from a GPU).
    #[serde(default)]
    pub gpu_bytes_from_gpu: u64,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct GroupPartStatus {
    pub partition: u32,
    pub owner: Option<u64>,
    pub next: u64,
    pub committed: u64,
    pub end: u64,
    pub lag: u64,
    pub inflight: u32,
    pub redeliver: u32,
}

/// Sends one command line to a running daemon's admin socket and returns
/// its JSON answer; an `{"error": ...}` answer is an error.
pub fn admin_command(admin: &Path, line: &str) -> anyhow::Result<serde_json::Value> {
    let mut conn = std::os::unix::net::UnixStream::connect(admin).map_err(|e| {
        anyhow::anyhow!(
            "connecting to ferryd's admin socket {}: {e}{}",
            admin.display(),
            proto::connect_hint(e.kind())
        )
    })?;
    // Like libferry: say nothing to a process we do not trust as ferryd.
    let cred = sys::peer_cred(&conn).context("reading the admin socket's peer credentials")?;
    proto::check_daemon_uid(cred.uid, sys::geteuid()).map_err(|why| {
        anyhow::anyhow!(
            "the process listening at {} (pid {}): {why}",
            admin.display(),
            cred.pid
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    // ferryd may answer (a refusal) and close before reading our line: a
    // failed write or a reset after the answer still leaves the answer.
    let sent = conn
        .write_all(line.as_bytes())
        .and_then(|()| conn.write_all(b"\n"));
    let mut text = Vec::new();
    let mut buf = [0u8; 8192];
    let read_err = loop {
        match conn.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    if text.is_empty() {
        if let Err(e) = sent {
            return Err(e).context("sending the request to ferryd");
        }
        if let Some(e) = read_err {
            return Err(e).context("reading ferryd's answer");
        }
    }
    let text = String::from_utf8_lossy(&text);
    let v: serde_json::Value = serde_json::from_str(&text).context("decoding ferryd's answer")?;
    if let Some(e) = v.get("error") {
        anyhow::bail!(
            "ferryd: {}",
            e.as_str()
                .map(String::from)
                .unwrap_or_else(|| e.to_string())
        );
    }
    Ok(v)
}

/// Asks a running daemon for its status over the admin socket.
pub fn query_status(admin: &Path) -> anyhow::Result<Status> {
    query_status_of(admin, None)
}

/// The status of every stream (partition rows capped), or of `stream`
/// in full.
pub fn query_status_of(admin: &Path, stream: Option<&str>) -> anyhow::Result<Status> {
    let line = match stream {
        Some(s) => format!("status {s}"),
        None => "status".to_string(),
    };
    let v = admin_command(admin, &line)?;
    serde_json::from_value(v).context("decoding ferryd's status")
}
