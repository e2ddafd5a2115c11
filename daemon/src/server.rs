//! The daemon's event loop: one thread owns all state. It accepts sessions
//! on a SOCK_SEQPACKET socket, answers the admin socket, and moves
//! descriptors between session rings: publish -> deliver, release -> free,
//! free -> grant. While there is work it polls the rings without system
//! calls; after `spin_us` of idleness it announces sleep on every
//! submission ring and blocks in epoll, where clients ring the doorbell
//! eventfd only if they see that announcement.

use std::collections::{BTreeMap, HashMap, HashSet};
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

use crate::config::{check_stream_spec, Config};
use crate::gpu::{GpuDelivery, GpuPublish, Gpus};
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
    granted: HashSet<u32>,
    credits: u32,
    published: u64,
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
    since: Instant,
}

/// What the admin socket can ask.
enum AdminCmd {
    Status,
    DeleteGroup { stream: String, group: String },
}

/// A request from the admin thread; the loop answers with JSON.
struct AdminRequest {
    cmd: AdminCmd,
    reply: std::sync::mpsc::Sender<String>,
}

struct StreamEntry {
    stream: Stream,
    pool: Arc<Region>,
    layout: PoolLayout,
    producers: Vec<SessionId>,
    declared: bool,
    dirty: bool,
}

pub struct Server {
    cfg: Config,
    socket_path: PathBuf,
    admin_path: PathBuf,
    epoll: Epoll,
    listener: Option<OwnedFd>,
    admin_rx: std::sync::mpsc::Receiver<AdminRequest>,
    signals: OwnedFd,
    doorbell: OwnedFd,
    sessions: BTreeMap<SessionId, Session>,
    next_session: SessionId,
    streams: Vec<StreamEntry>,
    by_name: HashMap<String, usize>,
    allowed_uids: Vec<u32>,
    started: Instant,
    draining: Option<Instant>,
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

/// Removes a stale socket file, refusing if a live daemon still answers.
fn claim_socket_path(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    if path.exists() {
        let live = sys::seqpacket_connect(path).is_ok()
            || std::os::unix::net::UnixStream::connect(path).is_ok();
        if live {
            anyhow::bail!("another ferryd is already listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
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
        cfg.validate()?;
        sys::ignore_sigpipe();
        let signals = sys::signalfd_termination().context("setting up signal handling")?;
        let socket_path = cfg.socket_path();
        let admin_path = cfg.admin_socket_path();
        let mode = cfg.socket_mode();

        claim_socket_path(&socket_path)?;
        let listener = sys::seqpacket_listen(&socket_path)
            .with_context(|| format!("listening on {}", socket_path.display()))?;
        std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(mode))?;
        claim_socket_path(&admin_path)?;
        let admin = UnixListener::bind(&admin_path)
            .with_context(|| format!("listening on {}", admin_path.display()))?;
        admin.set_nonblocking(true)?;
        std::fs::set_permissions(&admin_path, std::fs::Permissions::from_mode(mode))?;

        let epoll = Epoll::new()?;
        let doorbell = sys::eventfd()?;
        epoll.add(listener.as_raw_fd(), TOK_LISTENER)?;
        epoll.add(signals.as_raw_fd(), TOK_SIGNAL)?;
        epoll.add(doorbell.as_raw_fd(), TOK_DOORBELL)?;

        let pref: ferry_verbs::select::Preference = cfg.fabric.provider.parse()?;
        let sel = ferry_verbs::select::select(pref).context("choosing the fabric")?;
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
        let allowed_uids = cfg.allowed_uids();
        let admin_rx = spawn_admin(
            admin,
            allowed_uids.clone(),
            cfg.daemon.allowed_gids.clone(),
            doorbell.try_clone()?,
        )?;
        let mut server = Server {
            socket_path,
            admin_path,
            epoll,
            listener: Some(listener),
            admin_rx,
            signals,
            doorbell,
            sessions: BTreeMap::new(),
            next_session: 1,
            streams: Vec::new(),
            by_name: HashMap::new(),
            allowed_uids,
            started: Instant::now(),
            draining: None,
            fabric,
            gpus: Gpus::new(gpus, cfg.daemon.max_gpu_pool_bytes),
            gpu_sessions: 0,
            events: Vec::with_capacity(64),
            scratch: Vec::with_capacity(64),
            wake_scratch: Vec::with_capacity(64),
            cfg,
        };
        for s in server.cfg.streams.clone() {
            server
                .create_stream(&s.name, s.spec(), true)
                .map_err(|(_, m)| anyhow::anyhow!(m))?;
        }
        Ok(server)
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    fn create_stream(
        &mut self,
        name: &str,
        spec: StreamSpec,
        declared: bool,
    ) -> Result<usize, (ErrorCode, String)> {
        check_stream_spec(name, &spec, self.cfg.daemon.max_pool_bytes)
            .map_err(|m| (ErrorCode::InvalidArgument, m))?;
        let layout = PoolLayout::new(spec.slot_size, spec.slot_count).ok_or((
            ErrorCode::InvalidArgument,
            "pool size overflows".to_string(),
        ))?;
        let pool = Region::create(&format!("ferry-pool-{name}"), layout.total).map_err(|e| {
            (
                ErrorCode::Limit,
                format!("creating the data pool of stream {name}: {e}"),
            )
        })?;
        let idx = self.streams.len();
        info!(
            stream = name,
            partitions = spec.partitions,
            slot_size = spec.slot_size,
            slot_count = spec.slot_count,
            declared,
            "stream created"
        );
        self.streams.push(StreamEntry {
            stream: Stream::new(idx as u32, name.to_string(), spec),
            pool: Arc::new(pool),
            layout,
            producers: Vec::new(),
            declared,
            dirty: true,
        });
        self.by_name.insert(name.to_string(), idx);
        Ok(idx)
    }

    /// Runs until SIGTERM/SIGINT, then drains and returns.
    pub fn run(mut self) -> anyhow::Result<()> {
        info!(
            socket = %self.socket_path.display(),
            admin = %self.admin_path.display(),
            streams = self.streams.len(),
            "ferryd ready"
        );
        notify_systemd("READY=1");
        let spin = Duration::from_micros(self.cfg.daemon.spin_us);
        let mut last_work = Instant::now();
        let mut spinner = ferry_shm::wait::Spinner::new();
        let mut iter: u32 = 0;
        loop {
            iter = iter.wrapping_add(1);
            let work = self.poll_rings() + self.pump() + self.progress_gpu();
            if let Some(since) = self.draining {
                if self.drained() {
                    info!("drained: every published batch was delivered and released");
                    break;
                }
                if since.elapsed() >= Duration::from_millis(self.cfg.daemon.drain_timeout_ms) {
                    let held: u32 = self.streams.iter().map(|s| s.stream.slot_counts().2).sum();
                    warn!(held, "drain timeout: exiting with batches not yet released");
                    break;
                }
            }
            if work > 0 {
                last_work = Instant::now();
                if iter.is_multiple_of(64) {
                    self.poll_events(0)?;
                }
                continue;
            }
            if last_work.elapsed() < spin || self.copies_pending() {
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
            for s in self.sessions.values() {
                if let Some(r) = rings_of(&s.role) {
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
            self.expire_handshakes();
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
        }
        self.shutdown();
        Ok(())
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
                TOK_DOORBELL => sys::eventfd_drain(self.doorbell.as_raw_fd()),
                t if t >= TOK_SESSION => self.session_readable(t - TOK_SESSION),
                _ => {}
            }
        }
        self.events = events;
        while let Ok(req) = self.admin_rx.try_recv() {
            let json = match req.cmd {
                AdminCmd::Status => serde_json::to_string(&self.status())
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                AdminCmd::DeleteGroup { stream, group } => {
                    self.delete_group(&stream, &group).to_string()
                }
            };
            let _ = req.reply.send(json);
        }
        Ok(())
    }

    fn delete_group(&mut self, stream: &str, group: &str) -> serde_json::Value {
        let Some(&idx) = self.by_name.get(stream) else {
            return serde_json::json!({ "error": format!("no stream named {stream:?}") });
        };
        let entry = &mut self.streams[idx];
        match entry.stream.delete_group(group) {
            Ok(held) => {
                entry.dirty = true;
                info!(stream, group, held, "consumer group deleted");
                serde_json::json!({ "ok": format!("deleted group {group} of stream {stream} ({held} batches it held)") })
            }
            Err(e) => serde_json::json!({ "error": e }),
        }
    }

    /// Closes connections that did not say Hello in time.
    fn expire_handshakes(&mut self) {
        let limit = Duration::from_millis(self.cfg.daemon.handshake_timeout_ms);
        let late: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| matches!(s.role, Role::Fresh) && s.since.elapsed() > limit)
            .map(|s| s.id)
            .collect();
        for id in late {
            self.fail_session(id, &format!("no Hello within {} ms", limit.as_millis()));
        }
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
                            warn!("SO_PEERCRED failed: {e}");
                            continue;
                        }
                    };
                    let id = self.next_session;
                    self.next_session += 1;
                    if let Err(e) = self.epoll.add(sock.as_raw_fd(), TOK_SESSION + id) {
                        warn!("epoll add: {e}");
                        continue;
                    }
                    debug!(session = id, pid = cred.pid, uid = cred.uid, "connection");
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
                    warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn allowed(&self, cred: &PeerCred) -> bool {
        self.allowed_uids.contains(&cred.uid) || self.cfg.daemon.allowed_gids.contains(&cred.gid)
    }

    fn session_readable(&mut self, id: SessionId) {
        let mut buf = vec![0u8; proto::MAX_MESSAGE];
        loop {
            let Some(s) = self.sessions.get(&id) else {
                return;
            };
            match sys::recv_with_fds(&s.sock, &mut buf, true) {
                Ok(None) => {
                    debug!(session = id, "peer closed");
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
                warn!("encoding a reply: {e}");
                return;
            }
        };
        if let Err(e) = sys::send_with_fds(&s.sock, &bytes, fds) {
            debug!(session = id, "reply failed: {e}");
            self.close_session(id, false);
        }
    }

    fn refuse(&mut self, id: SessionId, code: ErrorCode, message: String) {
        debug!(session = id, ?code, %message, "request refused");
        self.reply(id, &Response::Error { code, message }, &[]);
    }

    fn handle_request(&mut self, id: SessionId, req: Request) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let fresh = matches!(s.role, Role::Fresh);
        let cred = s.cred;
        match req {
            Request::Hello { protocol, client } => {
                if !fresh {
                    return self.fail_session(id, "second Hello");
                }
                if !self.allowed(&cred) {
                    warn!(
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
                debug!(session = id, client, "hello");
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.role = Role::Control;
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
            } => self.open_consumer(id, stream, group, prefetch, (device, device_bus)),
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
        let res = (|| {
            self.check_open(id)?;
            let ordinal = match &device {
                (None, None) => None,
                (n, bus) => Some(self.gpus.resolve(*n, bus.as_deref())?),
            };
            let idx = match (self.by_name.get(&name).copied(), spec) {
                (Some(idx), None) => idx,
                (Some(idx), Some(want)) => {
                    let have = &self.streams[idx].stream.spec;
                    if *have != want {
                        return Err((
                            ErrorCode::StreamMismatch,
                            format!(
                                "stream {name} exists with partitions={} slot_size={} slot_count={}, not partitions={} slot_size={} slot_count={}",
                                have.partitions, have.slot_size, have.slot_count, want.partitions, want.slot_size, want.slot_count
                            ),
                        ));
                    }
                    idx
                }
                (None, Some(want)) => self.create_stream(&name, want, false)?,
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
        let fds = [region.fd(), entry.pool.fd(), self.doorbell.as_raw_fd()];
        if let Some(s) = self.sessions.get_mut(&id) {
            info!(
                session = id,
                pid = s.cred.pid,
                stream = %name,
                device = gpu.as_ref().map(|g| format!("cuda:{}", g.info.ordinal)).unwrap_or_else(|| "host".into()),
                "producer opened"
            );
            s.role = Role::Producer(ProducerState {
                stream: idx,
                rings,
                granted: HashSet::new(),
                credits,
                published: 0,
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
    ) {
        let cap = self.cfg.daemon.ring_capacity;
        let prefetch = if prefetch == 0 {
            8.min(cap)
        } else {
            prefetch.min(cap)
        };
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
        let g = entry.stream.join(&group, id);
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
        let fds = [region.fd(), entry.pool.fd(), self.doorbell.as_raw_fd()];
        if gpu.is_some() {
            self.gpu_sessions += 1;
        }
        if let Some(s) = self.sessions.get_mut(&id) {
            info!(
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
        match &mut s.role {
            Role::Producer(p) => {
                let entry = &mut self.streams[p.stream];
                while let Some(d) = p.rings.sub.pop().map_err(|e| Violation(e.to_string()))? {
                    if d.op != desc::OP_PUBLISH {
                        return Err(Violation(format!("producer sent op {}", d.op)));
                    }
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
                    entry
                        .stream
                        .publish(id, d.slot, d.len, d.meta_len, key, None)?;
                    p.granted.remove(&d.slot);
                    p.published += 1;
                    entry.dirty = true;
                    n += 1;
                }
            }
            Role::Consumer(c) => {
                let entry = &mut self.streams[c.stream];
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
                        }
                        desc::OP_COMMIT => {
                            let part = (d.partition != desc::COMMIT_ALL).then_some(d.partition);
                            entry.stream.commit(c.group, id, part, d.offset)?;
                        }
                        op => return Err(Violation(format!("consumer sent op {op}"))),
                    }
                    entry.dirty = true;
                    n += 1;
                }
            }
            _ => {}
        }
        Ok(n)
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
        for (idx, entry) in self.streams.iter_mut().enumerate() {
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
            // Deliveries.
            let sessions = &mut self.sessions;
            for g in 0..entry.stream.groups.len() {
                let sid = entry.stream.id;
                let pool_layout = entry.layout;
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
                    let d = Desc {
                        op: desc::OP_DELIVER,
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
            warn!(
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
            if let Err(v) = self.drain_session_inner(id) {
                warn!(session = id, "while closing: {}", v.0);
            }
        }
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        self.epoll.delete(s.sock.as_raw_fd());
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
                        warn!(session = id, "while closing: {e}");
                    }
                    self.gpu_sessions -= 1;
                }
                drop(p.gpu.take());
                for slot in p.granted {
                    entry.stream.return_grant(id, slot);
                }
                entry.producers.retain(|&x| x != id);
                entry.dirty = true;
                info!(
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
                info!(
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

    pub fn status(&self) -> Status {
        let streams = self
            .streams
            .iter()
            .map(|e| {
                let s = &e.stream;
                let (free, granted, held) = s.slot_counts();
                let ends: Vec<u64> = s.parts.iter().map(|p| p.end).collect();
                StreamStatus {
                    name: s.name.clone(),
                    declared: e.declared,
                    partitions: s.spec.partitions,
                    slot_size: s.spec.slot_size,
                    slot_count: s.spec.slot_count,
                    slots_free: free,
                    slots_granted: granted,
                    slots_held: held,
                    published: s.published,
                    end_offsets: ends.clone(),
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
                        .filter(|g| !g.deleted)
                        .map(|g| {
                            let parts: Vec<GroupPartStatus> = g
                                .parts
                                .iter()
                                .enumerate()
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
                                lag: parts.iter().map(|p| p.lag).sum(),
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
            gpus: match &self.gpus.probe {
                Ok(p) => p.gpus.clone(),
                Err(_) => Vec::new(),
            },
            gpu_note: match &self.gpus.probe {
                Ok(p) => format!("CUDA driver {}", p.driver_version),
                Err(e) => e.to_string(),
            },
            sessions: self.sessions.len(),
            streams,
        }
    }
}

/// Serves the admin socket on its own thread, so that a slow or silent
/// admin client never stalls the data-plane loop. Status requests go to the
/// loop over a channel; the doorbell wakes it.
fn spawn_admin(
    listener: UnixListener,
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
    doorbell: OwnedFd,
) -> anyhow::Result<std::sync::mpsc::Receiver<AdminRequest>> {
    let (tx, rx) = std::sync::mpsc::channel();
    listener.set_nonblocking(false)?;
    std::thread::Builder::new().name("ferryd-admin".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
            let allowed = sys::peer_cred(&conn)
                .map(|c| allowed_uids.contains(&c.uid) || allowed_gids.contains(&c.gid))
                .unwrap_or(false);
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while line.len() < 256 {
                match conn.read(&mut byte) {
                    Ok(1) if byte[0] != b'\n' => line.push(byte[0]),
                    _ => break,
                }
            }
            let cmd = String::from_utf8_lossy(&line).trim().to_string();
            let reply = if !allowed {
                "{\"error\":\"permission denied\"}".to_string()
            } else {
                let words: Vec<&str> = cmd.split_whitespace().collect();
                let parsed = match words.as_slice() {
                    ["status"] => Some(AdminCmd::Status),
                    ["delete-group", stream, group] => Some(AdminCmd::DeleteGroup {
                        stream: stream.to_string(),
                        group: group.to_string(),
                    }),
                    _ => None,
                };
                match parsed {
                    None => serde_json::json!({
                        "error": format!("unknown admin command {cmd:?} (status, or delete-group STREAM GROUP)")
                    })
                    .to_string(),
                    Some(cmd) => {
                        let (rtx, rrx) = std::sync::mpsc::channel();
                        if tx.send(AdminRequest { cmd, reply: rtx }).is_err() {
                            return; // the loop is gone
                        }
                        sys::eventfd_signal(doorbell.as_raw_fd());
                        rrx.recv_timeout(Duration::from_secs(5))
                            .unwrap_or_else(|_| "{\"error\":\"ferryd did not answer\"}".into())
                    }
                }
            };
            let _ = conn.write_all(reply.as_bytes());
            let _ = conn.write_all(b"\n");
        }
    })?;
    Ok(rx)
}

/// Puts a batch a producer published from GPU `dev` into its stream, now
/// that its copy to the host slot is done (batches published from host
/// memory by the same producer wait in the same queue, keeping its order).
fn publish_copied(
    entry: &mut StreamEntry,
    id: SessionId,
    d: &Desc,
    dev: u32,
    granted: &mut HashSet<u32>,
    published: &mut u64,
) -> Result<(), Violation> {
    let key = (d.flags & desc::FLAG_HAS_KEY != 0).then_some(d.key);
    let device = (d.flags & desc::FLAG_DEVICE != 0).then_some(dev);
    entry
        .stream
        .publish(id, d.slot, d.len, d.meta_len, key, device)?;
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
    /// GPUs found at start-up.
    #[serde(default)]
    pub gpus: Vec<ferry_cuda::GpuInfo>,
    /// The CUDA driver version, or why there are no GPUs.
    #[serde(default)]
    pub gpu_note: String,
    pub sessions: usize,
    pub streams: Vec<StreamStatus>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StreamStatus {
    pub name: String,
    pub declared: bool,
    pub partitions: u32,
    pub slot_size: u64,
    pub slot_count: u32,
    pub slots_free: u32,
    pub slots_granted: u32,
    pub slots_held: u32,
    pub published: u64,
    pub end_offsets: Vec<u64>,
    pub producers: Vec<ProducerStatus>,
    pub groups: Vec<GroupStatus>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ProducerStatus {
    pub session: u64,
    pub pid: i32,
    pub granted: u32,
    pub published: u64,
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
    let mut conn = std::os::unix::net::UnixStream::connect(admin).with_context(|| {
        format!(
            "connecting to ferryd's admin socket {} (is ferryd running?)",
            admin.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(line.as_bytes())?;
    conn.write_all(b"\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
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
    let v = admin_command(admin, "status")?;
    serde_json::from_value(v).context("decoding ferryd's status")
}
