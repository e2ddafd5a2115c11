//! The Rust client: connect to ferryd, open producer and consumer sessions,
//! move batches through the session rings. The C ABI (`ffi`) and the Python
//! package are thin layers over this.
//!
//! Producers and consumers are single-threaded objects (`&mut self`): each
//! owns one end of two single-producer single-consumer rings.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_shm::desc::{self, Desc};
use ferry_shm::layout::{PoolLayout, SessionLayout, META_MAX};
use ferry_shm::proto::{self, ErrorCode, GroupStart, Request, Response, SessionInfo, StreamSpec};
use ferry_shm::sys::PageMap;

use crate::record::{self, Field, Writer};
use ferry_shm::wait::{futex_sleep, remaining, Spinner};
use ferry_shm::{attach_ring, sys, Region, RingConsumer, RingError, RingProducer};

/// Stable status codes, shared with the C ABI (`FERRY_E_*`).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    Ok = 0,
    Timeout = 1,
    InvalidArgument = 2,
    NotRunning = 3,
    Disconnected = 4,
    UnknownStream = 5,
    StreamMismatch = 6,
    TooLarge = 7,
    NotHeld = 8,
    PermissionDenied = 9,
    Protocol = 10,
    OffsetGone = 11,
    Limit = 12,
    ShuttingDown = 13,
    Internal = 14,
    NoDevice = 15,
    Unsupported = 16,
    EndOfEpoch = 17,
}

impl Status {
    /// A short description for people. The same text as the C ABI's
    /// `ferry_status_str`.
    pub fn describe(self) -> &'static str {
        let text = STATUS_TEXT[self as usize];
        &text[..text.len() - 1]
    }

    pub fn from_code(code: ErrorCode) -> Status {
        match code {
            ErrorCode::InvalidArgument => Status::InvalidArgument,
            ErrorCode::UnknownStream => Status::UnknownStream,
            ErrorCode::StreamMismatch => Status::StreamMismatch,
            ErrorCode::PermissionDenied => Status::PermissionDenied,
            ErrorCode::Protocol => Status::Protocol,
            ErrorCode::OffsetGone => Status::OffsetGone,
            ErrorCode::Limit => Status::Limit,
            ErrorCode::ShuttingDown => Status::ShuttingDown,
            ErrorCode::NoDevice => Status::NoDevice,
            ErrorCode::Unsupported => Status::Unsupported,
            _ => Status::Internal,
        }
    }
}

/// Descriptions of the status codes, indexed by code, NUL-terminated so
/// that the C ABI can hand them out as they are.
pub(crate) const STATUS_TEXT: [&str; 18] = [
    "ok\0",
    "timed out\0",
    "invalid argument\0",
    "ferryd is not running (cannot connect to its socket)\0",
    "ferryd closed the session\0",
    "no such stream\0",
    "stream exists with a different configuration\0",
    "payload or metadata larger than the slot allows\0",
    "batch or slot not held (released twice, or never delivered to this handle)\0",
    "permission denied by ferryd's peer policy\0",
    "protocol error between client and ferryd\0",
    "offset out of range or no longer retained\0",
    "resource limit reached\0",
    "ferryd is shutting down\0",
    "internal error\0",
    "no such device (e.g. GPU delivery on a host without that GPU)\0",
    "not supported by this ferryd\0",
    "end of epoch: every producer of the stream ended it\0",
];

/// A failed call: a status code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn err<T>(status: Status, message: impl Into<String>) -> Result<T> {
    Err(Error {
        status,
        message: message.into(),
    })
}

/// Default client-side spin before sleeping, in microseconds.
pub const DEFAULT_SPIN_US: u32 = 50;
/// How often a sleeping waiter checks that ferryd is still there.
const LIVENESS_CHECK: Duration = Duration::from_millis(50);
/// How long a push into a full submission ring waits for ferryd.
const SUBMIT_PATIENCE: Duration = Duration::from_secs(10);

/// The socket a client uses when none is given: FERRY_SOCKET, else the
/// daemon's default for this user.
pub fn resolve_socket(path: Option<&Path>) -> PathBuf {
    if let Some(p) = path {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("FERRY_SOCKET") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    proto::default_socket_path(sys::geteuid())
}

fn recv_response(sock: &OwnedFd, path: &Path) -> Result<(Response, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    let mut got = sys::recv_with_fds(sock, &mut buf, false);
    if matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset) {
        // ferryd answered and closed before reading what we sent (a
        // refusal): the kernel reports the reset first, once; the answer
        // may still be queued behind it.
        if let Ok(Some(m)) = sys::recv_with_fds(sock, &mut buf, true) {
            got = Ok(Some(m));
        }
    }
    match got {
        Ok(Some((n, fds))) => match proto::decode::<Response>(&buf[..n]) {
            Ok(Response::Error { code, message }) => {
                err(Status::from_code(code), format!("ferryd: {message}"))
            }
            Ok(r) => Ok((r, fds)),
            Err(e) => err(
                Status::Protocol,
                format!("undecodable reply from ferryd: {e}"),
            ),
        },
        Ok(None) => err(
            Status::Disconnected,
            format!("ferryd at {} closed the connection", path.display()),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => err(
            Status::Timeout,
            format!("ferryd at {} did not answer in time", path.display()),
        ),
        Err(e) => err(
            Status::Disconnected,
            format!("reading from ferryd at {}: {e}", path.display()),
        ),
    }
}

fn send_request(sock: &OwnedFd, req: &Request, path: &Path) -> Result<()> {
    let bytes = proto::encode(req).map_err(|e| Error {
        status: Status::InvalidArgument,
        message: e.to_string(),
    })?;
    // A refusal may already be queued for us even if the send fails
    // (ferryd closes after refusing), so a send error is reported only when
    // no reply explains it.
    if let Err(e) = sys::send_with_fds(sock, &bytes, &[]) {
        return match recv_response(sock, path) {
            Err(reply) if reply.status != Status::Disconnected => Err(reply),
            _ => err(
                Status::Disconnected,
                format!("writing to ferryd at {}: {e}", path.display()),
            ),
        };
    }
    Ok(())
}

/// Checks, before anything is sent, that the process listening at `path`
/// is a ferryd we trust: root, our own user, or `FERRY_DAEMON_UID`.
/// Otherwise another user who got to the socket path first (a shared
/// /tmp, say) would receive our batches.
fn check_daemon_identity(sock: &OwnedFd, path: &Path) -> Result<()> {
    let cred = sys::peer_cred(sock).map_err(|e| Error {
        status: Status::Disconnected,
        message: format!(
            "reading the credentials of ferryd at {}: {e}",
            path.display()
        ),
    })?;
    proto::check_daemon_uid(cred.uid, sys::geteuid(), path).map_err(|why| Error {
        status: Status::PermissionDenied,
        message: format!(
            "the process listening at {} (pid {}): {why}",
            path.display(),
            cred.pid
        ),
    })
}

/// Connects and says Hello. Errors name the socket path.
fn handshake(path: &Path) -> Result<OwnedFd> {
    let sock = sys::seqpacket_connect(path).map_err(|e| {
        let status = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                Status::NotRunning
            }
            std::io::ErrorKind::PermissionDenied => Status::PermissionDenied,
            std::io::ErrorKind::InvalidInput => Status::InvalidArgument,
            _ => Status::NotRunning,
        };
        Error {
            status,
            message: format!(
                "cannot connect to ferryd at {}: {e}{}",
                path.display(),
                proto::connect_hint(e.kind())
            ),
        }
    })?;
    check_daemon_identity(&sock, path)?;
    let _ = sys::set_recv_timeout(&sock, Duration::from_secs(10));
    send_request(
        &sock,
        &Request::Hello {
            protocol: proto::PROTOCOL_VERSION,
            client: format!(
                "libferry {} pid {}",
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            ),
        },
        path,
    )?;
    match recv_response(&sock, path)? {
        (Response::Welcome { .. }, _) => Ok(sock),
        (other, _) => err(
            Status::Protocol,
            format!("unexpected reply to Hello: {other:?}"),
        ),
    }
}

/// A connection to ferryd. Cheap; producers and consumers opened from it
/// have sessions of their own.
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// Connects to ferryd at `path` (None: FERRY_SOCKET or the default).
    pub fn connect(path: Option<&Path>) -> Result<Client> {
        let path = resolve_socket(path);
        // Proves the daemon is there, speaks our protocol and lets us in;
        // each producer and consumer then has a connection of its own, so
        // this one is not kept (ferryd closes idle ones anyway).
        drop(handshake(&path)?);
        Ok(Client { path })
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Opens a producer on `stream`. With `create`, a missing stream is
    /// created with that configuration (an existing one must match it).
    pub fn producer(&self, stream: &str, create: Option<StreamSpec>) -> Result<Producer> {
        self.producer_on(stream, create, None)
    }

    /// Opens a producer that publishes from GPU `device` (this process's
    /// ordinal; None: host memory, as `producer`). Its slots are in the
    /// stream's mirror on that GPU: write the batch at
    /// `SlotBuf::device_ptr`, and publish once those writes completed.
    pub fn producer_on(
        &self,
        stream: &str,
        create: Option<StreamSpec>,
        device: Option<u32>,
    ) -> Result<Producer> {
        check_name("stream", stream)?;
        let device_bus = device_bus(device)?;
        let mut s = Session::open(
            &self.path,
            Request::OpenProducer {
                stream: stream.to_string(),
                spec: create,
                device,
                device_bus,
            },
            Pool::Writable,
        )?;
        // A producer's GPU slots mirror the stream's slots one to one.
        let slots = s.info.slot_count;
        let gpu = GpuPool::of_session(device, &mut s, slots)?;
        Ok(Producer {
            gpu,
            s,
            granted: HashSet::new(),
            spare: Vec::new(),
            published: 0,
            acked: 0,
            stalled: false,
            ends: 0,
            ends_taken: 0,
        })
    }

    /// Joins consumer group `group` of `stream`. With `opts.device`, the
    /// batches arrive in that GPU's memory (this loads libcuda).
    pub fn consumer(&self, stream: &str, group: &str, opts: ConsumerOptions) -> Result<Consumer> {
        check_name("stream", stream)?;
        check_name("group", group)?;
        let device_bus = device_bus(opts.device)?;
        let mut s = Session::open(
            &self.path,
            Request::OpenConsumer {
                stream: stream.to_string(),
                group: group.to_string(),
                prefetch: opts.prefetch,
                device: opts.device,
                device_bus,
                start: opts.start.clone(),
            },
            if opts.copy_on_write {
                Pool::CopyOnWrite
            } else {
                Pool::ReadOnly
            },
        )?;
        s.spin = Duration::from_micros(opts.spin_us as u64);
        // A consumer has one GPU slot per batch it may hold.
        let slots = s.info.credits;
        let gpu = GpuPool::of_session(opts.device, &mut s, slots)?;
        let pagemap = if opts.copy_on_write {
            PageMap::open().ok()
        } else {
            None
        };
        Ok(Consumer {
            gpu,
            s,
            inflight: HashMap::new(),
            next_token: 1,
            pagemap,
            scratch: Vec::new(),
            auto_commit: opts.auto_commit,
            commit_interval: opts.commit_interval,
            last_commit: Instant::now(),
            commit_due: false,
        })
    }
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if proto::valid_name(name) {
        Ok(())
    } else {
        err(
            Status::InvalidArgument,
            format!("{what} name {name:?} must be 1-128 characters of A-Z a-z 0-9 . _ -"),
        )
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Most batches delivered and not yet released (0: ferryd's default, 8).
    pub prefetch: u32,
    /// Microseconds `next` spins before sleeping.
    pub spin_us: u32,
    /// Deliver into this GPU (`cuda:N`); `None`: host memory.
    pub device: Option<u32>,
    /// Map the pool copy-on-write: a batch's bytes may then be written in
    /// place (an in-place normalisation); the writes stay in this process,
    /// cost only the pages they touch, and are dropped when the slot comes
    /// back with another batch. Without it the pool is mapped read-only.
    pub copy_on_write: bool,
    /// Commit automatically: a release commits this member's partitions at
    /// their low watermark (at most every `commit_interval`; the last
    /// releases are committed by the next call once it is due, or when the
    /// consumer closes).
    pub auto_commit: bool,
    /// Zero: every release commits.
    pub commit_interval: Duration,
    /// Where the group starts when this join creates it.
    pub start: GroupStart,
}

/// GPU `n` as this process sees it, or NoDevice.
fn local_gpu(n: u32) -> Result<ferry_cuda::GpuInfo> {
    let probe = ferry_cuda::probe().map_err(|e| Error {
        status: Status::NoDevice,
        message: format!("GPU delivery to cuda:{n} needs the CUDA driver in this process: {e}"),
    })?;
    let count = probe.gpus.len();
    probe.gpus.into_iter().nth(n as usize).ok_or_else(|| Error {
        status: Status::NoDevice,
        message: format!("there is no cuda:{n}: this process sees {count} GPU(s)"),
    })
}

/// GPU ordinals are this process's (CUDA_VISIBLE_DEVICES); ferryd finds
/// the same GPU by the PCI bus id this returns.
fn device_bus(device: Option<u32>) -> Result<Option<String>> {
    device
        .map(|n| local_gpu(n).map(|g| g.pci_bus_id))
        .transpose()
}

/// A consumer's GPU pool, opened through its CUDA IPC handle.
struct GpuPool {
    device: u32,
    map: ferry_cuda::IpcMapping,
    stride: u64,
    slots: u32,
}

impl GpuPool {
    /// The GPU pool ferryd described for a session opened for `device`
    /// (it must have `slots` slots), opened; None for host sessions.
    fn of_session(device: Option<u32>, s: &mut Session, slots: u32) -> Result<Option<GpuPool>> {
        match (device, s.info.gpu.take()) {
            (None, None) => Ok(None),
            (Some(n), Some(pool)) if pool.slots == slots => {
                Ok(Some(GpuPool::open(n, &pool, &s.info)?))
            }
            (want, got) => err(
                Status::Protocol,
                format!("asked for device {want:?} with {slots} slots, ferryd answered with GPU pool {got:?}"),
            ),
        }
    }

    fn open(device: u32, pool: &proto::GpuPoolInfo, info: &SessionInfo) -> Result<GpuPool> {
        let handle: [u8; 64] = pool.ipc_handle.as_slice().try_into().map_err(|_| Error {
            status: Status::Protocol,
            message: format!(
                "ferryd sent a {}-byte CUDA IPC handle",
                pool.ipc_handle.len()
            ),
        })?;
        if pool.stride < info.slot_size
            || pool.slots == 0
            || pool.stride.checked_mul(pool.slots as u64) != Some(pool.len)
            || pool.len > usize::MAX as u64
        {
            return err(
                Status::Protocol,
                format!(
                    "ferryd sent an unusable GPU pool ({} slots of {} bytes in {}, for {}-byte batches)",
                    pool.slots, pool.stride, pool.len, info.slot_size
                ),
            );
        }
        let cuda = |e: ferry_cuda::CudaError| Error {
            status: Status::NoDevice,
            message: format!("opening the GPU pool on cuda:{device}: {e}"),
        };
        let gpu = ferry_cuda::Gpu::open(device).map_err(cuda)?;
        let map = ferry_cuda::IpcMapping::open(
            &gpu,
            &ferry_cuda::IpcHandle {
                handle,
                offset: pool.ipc_offset,
            },
            pool.len as usize,
        )
        .map_err(cuda)?;
        Ok(GpuPool {
            device,
            map,
            stride: pool.stride,
            slots: pool.slots,
        })
    }
}

/// Parses a device name: "cpu" (or empty) for host memory, "cuda:N".
pub fn parse_device(s: &str) -> Result<Option<u32>> {
    proto::parse_device(s).map_err(|message| Error {
        status: Status::InvalidArgument,
        message,
    })
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            prefetch: 0,
            spin_us: DEFAULT_SPIN_US,
            device: None,
            copy_on_write: false,
            auto_commit: true,
            commit_interval: Duration::ZERO,
            start: GroupStart::Default,
        }
    }
}

/// How a session maps the stream's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// A producer fills its slots.
    Writable,
    ReadOnly,
    /// A consumer that may write its private copy (see
    /// `ConsumerOptions::copy_on_write`).
    CopyOnWrite,
}

/// One open session: its socket, both rings, the stream's pool.
struct Session {
    path: PathBuf,
    /// The stream's name, for messages.
    stream: String,
    sock: OwnedFd,
    info: SessionInfo,
    _region: Arc<Region>,
    pool: Arc<Region>,
    layout: PoolLayout,
    sub: RingProducer,
    comp: RingConsumer,
    spin: Duration,
}

impl Session {
    fn open(path: &Path, req: Request, pool_map: Pool) -> Result<Session> {
        let sock = handshake(path)?;
        send_request(&sock, &req, path)?;
        let (resp, fds) = recv_response(&sock, path)?;
        let Response::Opened(info) = resp else {
            return err(Status::Protocol, format!("unexpected reply: {resp:?}"));
        };
        let bad = |m: String| Error {
            status: Status::Protocol,
            message: format!("ferryd sent an unusable session: {m}"),
        };
        let [region_fd, pool_fd]: [OwnedFd; 2] = fds
            .try_into()
            .map_err(|v: Vec<OwnedFd>| bad(format!("{} file descriptors instead of 2", v.len())))?;
        if !info.ring_capacity.is_power_of_two()
            || info.ring_capacity < 2
            || info.ring_capacity > 65536
        {
            return Err(bad(format!("ring capacity {}", info.ring_capacity)));
        }
        let slayout = SessionLayout::new(info.ring_capacity);
        let layout = PoolLayout::new(info.slot_size, info.slot_count)
            .ok_or_else(|| bad(format!("pool of {} x {}", info.slot_count, info.slot_size)))?;
        let region = Arc::new(
            Region::attach(region_fd, slayout.total, true).map_err(|e| bad(e.to_string()))?,
        );
        let pool = match pool_map {
            Pool::CopyOnWrite => Region::attach_private(pool_fd, layout.total),
            p => Region::attach(pool_fd, layout.total, p == Pool::Writable),
        };
        let pool = Arc::new(pool.map_err(|e| bad(e.to_string()))?);
        let sub = attach_ring(
            &region,
            slayout.sub_offset,
            slayout.ring_len,
            info.ring_capacity,
        )
        .map_err(|e| bad(e.to_string()))?;
        let comp = attach_ring(
            &region,
            slayout.comp_offset,
            slayout.ring_len,
            info.ring_capacity,
        )
        .map_err(|e| bad(e.to_string()))?;
        let stream = match &req {
            Request::OpenProducer { stream, .. } | Request::OpenConsumer { stream, .. } => {
                stream.clone()
            }
            _ => String::new(),
        };
        Ok(Session {
            path: path.to_path_buf(),
            stream,
            sock,
            info,
            _region: region,
            pool,
            layout,
            sub: RingProducer::new(sub),
            comp: RingConsumer::new(comp),
            spin: Duration::from_micros(DEFAULT_SPIN_US as u64),
        })
    }

    fn ring_error(&self, e: RingError) -> Error {
        Error {
            status: Status::Protocol,
            message: format!(
                "session ring with ferryd at {} is corrupt: {e}",
                self.path.display()
            ),
        }
    }

    fn disconnected(&self) -> Error {
        Error {
            status: Status::Disconnected,
            message: format!("ferryd at {} closed this session", self.path.display()),
        }
    }

    /// Wakes ferryd: a `Wake` message on this session's socket, never
    /// waiting. A full socket buffer means ferryd has unread messages from
    /// us, so it is awake anyway.
    fn wake(&self) {
        let _ = sys::send_dontwait(&self.sock, proto::WAKE);
    }

    /// Puts one descriptor on the submission ring and wakes ferryd if it
    /// sleeps. Waits (bounded) while the ring is full.
    fn submit(&mut self, d: &Desc) -> Result<()> {
        // Read the clock only once the ring turns out to be full.
        let mut full_since: Option<Instant> = None;
        let mut spinner = Spinner::new();
        let mut full_spins: u32 = 0;
        loop {
            match self.sub.push(d) {
                Ok(()) => {
                    if self.sub.wake_needed() {
                        self.wake();
                    }
                    return Ok(());
                }
                Err(RingError::Full) => {
                    if full_spins.is_multiple_of(256) {
                        self.wake();
                    }
                    full_spins = full_spins.wrapping_add(1);
                    if sys::peer_hung_up(&self.sock) {
                        return Err(self.disconnected());
                    }
                    if full_since.get_or_insert_with(Instant::now).elapsed() > SUBMIT_PATIENCE {
                        return err(
                            Status::Timeout,
                            "ferryd is not draining this session's ring",
                        );
                    }
                    spinner.spin();
                }
                Err(e) => return Err(self.ring_error(e)),
            }
        }
    }

    /// Waits for the next descriptor from ferryd: spins for `spin`, then
    /// sleeps on the ring's futex, checking that ferryd is alive.
    fn wait(&mut self, timeout: Option<Duration>) -> Result<Desc> {
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        let mut spinner = Spinner::new();
        loop {
            if let Some(d) = self.comp.pop().map_err(|e| self.ring_error(e))? {
                return Ok(d);
            }
            let elapsed = start.elapsed();
            if elapsed < self.spin && deadline.is_none_or(|d| Instant::now() < d) {
                spinner.spin();
                continue;
            }
            if sys::peer_hung_up(&self.sock) {
                // Deliveries that arrived before the hang-up still count.
                if let Some(d) = self.comp.pop().map_err(|e| self.ring_error(e))? {
                    return Ok(d);
                }
                return Err(self.disconnected());
            }
            let Some(left) = remaining(deadline, LIVENESS_CHECK) else {
                return err(Status::Timeout, "timed out");
            };
            futex_sleep(&mut self.comp, left).map_err(|e| self.ring_error(e))?;
        }
    }

    fn request(&mut self, req: &Request) -> Result<Response> {
        send_request(&self.sock, req, &self.path)?;
        Ok(recv_response(&self.sock, &self.path)?.0)
    }
}

/// A reserved slot in the stream's pool, writable until published. For a
/// producer publishing from a GPU, the payload goes to `device_ptr` (GPU
/// memory) and `ptr` is null.
#[derive(Debug, Clone, Copy)]
pub struct SlotBuf {
    pub slot: u32,
    pub ptr: *mut u8,
    pub device_ptr: u64,
    pub capacity: u64,
}

/// Publishes batches into one stream.
pub struct Producer {
    /// Declared before `s`: the IPC mapping closes before the session.
    gpu: Option<GpuPool>,
    s: Session,
    granted: HashSet<u32>,
    /// Grants popped from the ring but not handed out (kept for reserve).
    spare: Vec<u32>,
    /// Publishes submitted, and those ferryd acknowledged (as durable as
    /// the stream promises: at once for a memory stream, after the write
    /// or the sync of the record for a disk stream).
    published: u64,
    acked: u64,
    /// ferryd said it cannot write the stream's disk log now.
    stalled: bool,
    /// Ends of epoch submitted, and those taken where the epoch is decided
    /// (`OP_END_TAKEN`: by ferryd, or the stream's home on another host).
    ends: u64,
    ends_taken: u64,
}

impl Producer {
    pub fn partitions(&self) -> u32 {
        self.s.info.partitions
    }

    pub fn slot_size(&self) -> u64 {
        self.s.info.slot_size
    }

    /// The GPU (this process's ordinal) this producer publishes from.
    pub fn device(&self) -> Option<u32> {
        self.gpu.as_ref().map(|g| g.device)
    }

    /// Takes a free slot, waiting up to `timeout` (None: forever) while all
    /// slots are in use downstream (backpressure).
    pub fn reserve(&mut self, timeout: Option<Duration>) -> Result<SlotBuf> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let slot = loop {
            if let Some(s) = self.spare.pop() {
                break s;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let d = self.s.wait(left).map_err(|e| match e.status {
                Status::Timeout if self.stalled => Error {
                    status: Status::Timeout,
                    message: format!(
                        "no free slot in stream {} within {} ms: ferryd cannot write the stream's disk log (is the disk full? its log says why); publishing resumes once it can",
                        self.s.stream,
                        timeout.map_or(0, |t| t.as_millis()),
                    ),
                },
                Status::Timeout => Error {
                    status: Status::Timeout,
                    message: format!(
                        "no free slot in stream {} within {} ms: every slot holds a batch some consumer group has not released (`ferry status {}` shows which)",
                        self.s.stream,
                        timeout.map_or(0, |t| t.as_millis()),
                        self.s.stream
                    ),
                },
                _ => e,
            })?;
            self.take_completion(d)?;
        };
        self.granted.insert(slot);
        if let Some(g) = &self.gpu {
            return Ok(SlotBuf {
                slot,
                ptr: std::ptr::null_mut(),
                device_ptr: g.map.device_ptr() + slot as u64 * g.stride,
                capacity: self.s.info.slot_size,
            });
        }
        let off = self.s.layout.slot_offset(slot).expect("slot checked above");
        let ptr = self
            .s
            .pool
            .range_ptr(off, self.s.info.slot_size)
            .expect("pool size checked at attach");
        Ok(SlotBuf {
            slot,
            ptr,
            device_ptr: 0,
            capacity: self.s.info.slot_size,
        })
    }

    /// Publishes a reserved slot holding `len` bytes, with `meta` (at most
    /// 256 bytes) and an optional partitioning key. When this fails the slot
    /// stays reserved, so the call can be retried with corrected arguments.
    pub fn publish(&mut self, slot: u32, len: u64, meta: &[u8], key: Option<u64>) -> Result<()> {
        self.publish_flags(slot, len, meta, key, 0)
    }

    /// Starts a typed record of `nfields` fields in a reserved slot (see
    /// `record`); publish it with `publish_record`.
    pub fn record_writer(&self, slot: &SlotBuf, nfields: u32) -> Result<Writer> {
        if !self.granted.contains(&slot.slot) {
            return err(
                Status::NotHeld,
                format!("slot {} is not reserved by this producer", slot.slot),
            );
        }
        if self.gpu.is_some() {
            return err(
                Status::Unsupported,
                "typed records are written in host memory: open the producer for the CPU",
            );
        }
        Writer::begin(slot.ptr, slot.capacity.min(self.s.info.slot_size), nfields).map_err(|m| {
            Error {
                status: Status::InvalidArgument,
                message: m,
            }
        })
    }

    /// Publishes a slot holding the typed record `w` wrote.
    pub fn publish_record(
        &mut self,
        slot: u32,
        w: &Writer,
        meta: &[u8],
        key: Option<u64>,
    ) -> Result<()> {
        let len = w.finish().map_err(|m| Error {
            status: Status::InvalidArgument,
            message: m,
        })?;
        self.publish_flags(slot, len, meta, key, desc::FLAG_RECORD)
    }

    /// Handles one descriptor from the completion ring: a grant (kept for
    /// `reserve`) or an acknowledgement.
    fn take_completion(&mut self, d: Desc) -> Result<()> {
        match d.op {
            desc::OP_GRANT if d.slot < self.s.info.slot_count => {
                self.spare.push(d.slot);
                Ok(())
            }
            desc::OP_ACK if d.offset <= self.published => {
                self.acked = self.acked.max(d.offset);
                self.stalled = d.flags & desc::FLAG_STALLED != 0;
                Ok(())
            }
            desc::OP_END_TAKEN if d.offset <= self.ends => {
                self.ends_taken = self.ends_taken.max(d.offset);
                Ok(())
            }
            _ => err(
                Status::Protocol,
                format!(
                    "ferryd sent op {} slot {} offset {} to a producer",
                    d.op, d.slot, d.offset
                ),
            ),
        }
    }

    /// Publishes submitted so far, and how many of them ferryd
    /// acknowledged (as of the last look at the ring).
    pub fn acked(&self) -> (u64, u64) {
        if !self.s.info.acks {
            let queued = self.s.sub.ring().occupancy() as u64;
            return (self.published, self.published.saturating_sub(queued));
        }
        (self.published, self.acked)
    }

    /// Waits until every publish so far is acknowledged: for a disk
    /// stream, as durable as its fsync policy promises (on stable storage
    /// with "every" and "interval", written with "never"); for a memory
    /// stream, taken by ferryd; and until every end of epoch it submitted
    /// was taken where the epoch is decided (by ferryd, or by the
    /// stream's home on another host). Grants that arrive meanwhile are
    /// kept.
    pub fn flush(&mut self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        if !self.s.info.acks {
            // A memory stream: taken once ferryd has read the ring.
            self.wait_ring_read(deadline)?;
            self.acked = self.published;
            return self.wait_ends_taken(deadline, timeout);
        }
        self.take_completions_until(
            deadline,
            timeout,
            |p| p.acked >= p.published,
            |p, ms| {
                format!(
                    "{} of {} publishes to stream {} acknowledged within {ms} ms{}",
                    p.acked,
                    p.published,
                    p.s.stream,
                    if p.stalled {
                        ": ferryd cannot write the stream's disk log (is the disk full? its log says why)"
                    } else {
                        ""
                    }
                )
            },
        )?;
        self.wait_ends_taken(deadline, timeout)
    }

    /// Waits until every end of epoch submitted was taken.
    fn wait_ends_taken(
        &mut self,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        self.take_completions_until(
            deadline,
            timeout,
            |p| p.ends_taken >= p.ends,
            |p, ms| {
                format!(
                    "{} of {} ends of epoch on stream {} taken within {ms} ms (by its home, for a stream homed on another host)",
                    p.ends_taken, p.ends, p.s.stream
                )
            },
        )
    }

    /// Takes completions (grants, acknowledgements, ends taken) until
    /// `done`; on a timeout, `late` says what is not (given `timeout` in ms).
    fn take_completions_until(
        &mut self,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
        done: impl Fn(&Self) -> bool,
        late: impl Fn(&Self, u128) -> String,
    ) -> Result<()> {
        while !done(self) {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let d = match self.s.wait(left) {
                Err(e) if e.status == Status::Timeout => {
                    return err(
                        Status::Timeout,
                        late(self, timeout.map_or(0, |t| t.as_millis())),
                    );
                }
                r => r?,
            };
            self.take_completion(d)?;
        }
        Ok(())
    }

    /// Waits until ferryd has read everything on this producer's ring.
    fn wait_ring_read(&mut self, deadline: Option<Instant>) -> Result<()> {
        let mut spinner = Spinner::new();
        let mut turns = 0u32;
        while self.s.sub.ring().occupancy() > 0 {
            // The descriptors were pushed with a wake-up where ferryd
            // slept; another now and then covers a lost one.
            if turns.is_multiple_of(4096) {
                if sys::peer_hung_up(&self.s.sock) {
                    return Err(self.s.disconnected());
                }
                self.s.wake();
            }
            turns = turns.wrapping_add(1);
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return err(
                    Status::Timeout,
                    format!(
                        "ferryd did not read this producer's ring of stream {} in time",
                        self.s.stream
                    ),
                );
            }
            if turns > 65_536 {
                std::thread::sleep(Duration::from_micros(100));
            } else {
                spinner.spin();
            }
        }
        Ok(())
    }

    /// Says this producer is done with the current epoch. Once every
    /// producer attached to the stream has said so, ferryd puts an end
    /// marker in every partition: consumers that reach them get
    /// `Status::EndOfEpoch` from `next`, then the batches published after.
    pub fn end(&mut self) -> Result<()> {
        self.s.submit(&Desc {
            op: desc::OP_END,
            stream: self.s.info.stream_id,
            ..Desc::default()
        })?;
        self.ends += 1;
        Ok(())
    }

    fn publish_flags(
        &mut self,
        slot: u32,
        len: u64,
        meta: &[u8],
        key: Option<u64>,
        flags: u16,
    ) -> Result<()> {
        if !self.granted.contains(&slot) {
            return err(
                Status::NotHeld,
                format!("slot {slot} is not reserved by this producer"),
            );
        }
        if len > self.s.info.slot_size {
            return err(
                Status::TooLarge,
                format!(
                    "payload of {len} bytes does not fit the {}-byte slot",
                    self.s.info.slot_size
                ),
            );
        }
        if meta.len() > META_MAX as usize {
            return err(
                Status::TooLarge,
                format!("metadata of {} bytes exceeds {META_MAX}", meta.len()),
            );
        }
        let moff = self
            .s
            .layout
            .meta_offset(slot)
            .expect("granted slot in range");
        // The slot is granted to us alone until published, so nobody reads
        // its metadata area now; the Release store of the ring tail in
        // `submit` publishes these bytes.
        let written = self.s.pool.write(moff, meta);
        debug_assert!(written, "pool size checked at attach");
        let mut d = Desc {
            op: desc::OP_PUBLISH,
            flags,
            stream: self.s.info.stream_id,
            slot,
            len,
            meta_len: meta.len() as u32,
            ..Desc::default()
        };
        if let Some(k) = key {
            d.key = k;
            d.flags |= desc::FLAG_HAS_KEY;
        }
        if self.gpu.is_some() {
            d.flags |= desc::FLAG_DEVICE;
        }
        self.s.submit(&d)?;
        self.granted.remove(&slot);
        self.published += 1;
        Ok(())
    }

    /// Copies `data` into a fresh slot and publishes it.
    pub fn send(
        &mut self,
        data: &[u8],
        meta: &[u8],
        key: Option<u64>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        if data.len() as u64 > self.s.info.slot_size {
            return err(
                Status::TooLarge,
                format!(
                    "payload of {} bytes does not fit the {}-byte slot",
                    data.len(),
                    self.s.info.slot_size
                ),
            );
        }
        if meta.len() > META_MAX as usize {
            return err(
                Status::TooLarge,
                format!("metadata of {} bytes exceeds {META_MAX}", meta.len()),
            );
        }
        let slot = self.reserve(timeout)?;
        if let Some(g) = &self.gpu {
            // Host bytes into the GPU slot (a synchronous copy).
            if let Err(e) = g.map.write(slot.slot as usize * g.stride as usize, data) {
                self.spare.push(slot.slot);
                self.granted.remove(&slot.slot);
                return err(Status::Internal, format!("writing GPU memory: {e}"));
            }
        } else {
            let off = self
                .s
                .layout
                .slot_offset(slot.slot)
                .expect("granted slot in range");
            let written = self.s.pool.write(off, data);
            debug_assert!(written, "size checked above");
        }
        self.publish(slot.slot, data.len() as u64, meta, key)
    }
}

/// A delivered batch: zero-copy views into the stream's pool, valid until
/// released. With GPU delivery the payload is in GPU memory at
/// `device_data` (a CUdeviceptr of GPU `device`, in this process's
/// numbering) and `data` is null; the metadata is always in host memory.
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    pub data: *const u8,
    pub device_data: u64,
    /// -1: host memory.
    pub device: i32,
    pub len: u64,
    pub meta: *const u8,
    pub meta_len: u32,
    pub partition: u32,
    pub offset: u64,
    pub token: u64,
    /// `BATCH_RECORD` when the payload is a typed record.
    pub flags: u32,
}

/// `Batch::flags`: the payload is a typed record (`Consumer::fields`).
pub const BATCH_RECORD: u32 = 1;

impl Batch {
    /// The payload, read in place in the stream's pool.
    ///
    /// # Safety
    /// The consumer that returned this batch must still be open and the
    /// batch not yet released: after release, ferryd reuses the slot and
    /// the bytes change under the slice.
    pub unsafe fn data(&self) -> &[u8] {
        if self.data.is_null() {
            return &[]; // delivered to a GPU
        }
        // SAFETY: `data..data+len` was bounds-checked against the mapped
        // pool in `Consumer::next`; the caller keeps the mapping alive and
        // the slot ours (not released), so nobody writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.data, self.len as usize) }
    }

    /// The metadata, read in place.
    ///
    /// # Safety
    /// As for [`Batch::data`].
    pub unsafe fn meta(&self) -> &[u8] {
        // SAFETY: as in `data`.
        unsafe { std::slice::from_raw_parts(self.meta, self.meta_len as usize) }
    }
}

/// A delivered batch not yet released.
struct Held {
    slot: u32,
    dslot: u32,
    partition: u32,
    offset: u64,
    /// A typed record's checked fields, or why it is malformed.
    record: Option<std::result::Result<Vec<Field>, String>>,
}

/// One member of a consumer group.
pub struct Consumer {
    /// Declared before `s`: the IPC mapping closes before the session.
    gpu: Option<GpuPool>,
    s: Session,
    inflight: HashMap<u64, Held>,
    next_token: u64,
    /// Copy-on-write consumers: which pages of the pool this process wrote
    /// (None: unknown, treat every page as written).
    pagemap: Option<PageMap>,
    scratch: Vec<bool>,
    auto_commit: bool,
    commit_interval: Duration,
    last_commit: Instant,
    /// Releases since the last commit that an automatic commit still owes.
    commit_due: bool,
}

impl Consumer {
    pub fn partitions(&self) -> u32 {
        self.s.info.partitions
    }

    pub fn prefetch(&self) -> u32 {
        self.s.info.credits
    }

    /// The GPU (this process's ordinal) batches are delivered into, if any.
    pub fn device(&self) -> Option<u32> {
        self.gpu.as_ref().map(|g| g.device)
    }

    /// Copies a GPU-delivered batch's payload back to host memory (for
    /// checks and tools; trainers use the device pointer in place).
    pub fn copy_from_device(&self, batch: &Batch, out: &mut [u8]) -> Result<()> {
        let Some(g) = &self.gpu else {
            return err(
                Status::InvalidArgument,
                "this consumer delivers to host memory",
            );
        };
        let off = batch.device_data.wrapping_sub(g.map.device_ptr());
        if batch.device_data < g.map.device_ptr() || out.len() as u64 > batch.len {
            return err(
                Status::InvalidArgument,
                "not a batch of this consumer, or out is larger than it",
            );
        }
        g.map.read(off as usize, out).map_err(|e| Error {
            status: Status::Internal,
            message: format!("reading GPU memory: {e}"),
        })
    }

    /// Batches delivered to this handle and not yet released.
    pub fn held(&self) -> usize {
        self.inflight.len()
    }

    /// Waits for the next descriptor, committing on the way when an
    /// automatic commit falls due while waiting.
    fn wait_committing(&mut self, timeout: Option<Duration>) -> Result<Desc> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.commit_if_due()?;
            let mut slice = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if self.commit_due {
                let due = self
                    .commit_interval
                    .saturating_sub(self.last_commit.elapsed());
                slice = Some(slice.map_or(due, |s| s.min(due)));
            }
            match self.s.wait(slice) {
                Err(e) if e.status == Status::Timeout && self.commit_due => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        self.commit_if_due()?;
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    fn commit_if_due(&mut self) -> Result<()> {
        if self.commit_due && self.last_commit.elapsed() >= self.commit_interval {
            self.commit()?;
        }
        Ok(())
    }

    /// The next batch, waiting up to `timeout` (None: forever).
    /// `Status::EndOfEpoch` when the group has passed the end of the epoch
    /// (calling again goes on with the next epoch's batches).
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Batch> {
        let d = self.wait_committing(timeout)?;
        if d.op == desc::OP_END_OF_EPOCH {
            return err(
                Status::EndOfEpoch,
                format!(
                    "end of epoch {} of stream {}: every producer ended it",
                    d.offset, self.s.stream
                ),
            );
        }
        let info = &self.s.info;
        if d.op != desc::OP_DELIVER
            || d.slot >= info.slot_count
            || d.len > info.slot_size
            || d.meta_len > META_MAX
            || d.partition >= info.partitions
        {
            return err(
                Status::Protocol,
                format!(
                    "ferryd delivered a malformed descriptor (op {} slot {} len {} meta {} partition {})",
                    d.op, d.slot, d.len, d.meta_len, d.partition
                ),
            );
        }
        let on_device = d.flags & desc::FLAG_DEVICE != 0;
        let (data, device_data, device) = match (&self.gpu, on_device) {
            (None, false) => {
                let off = self.s.layout.slot_offset(d.slot).expect("slot checked");
                // A copy-on-write pool may still have this process's
                // writes into an earlier batch of the slot: show the new
                // batch's bytes.
                let refreshed = self.s.pool.refresh_private(
                    off,
                    d.len,
                    (off, off + self.s.layout.stride),
                    &mut self.pagemap,
                    &mut self.scratch,
                );
                debug_assert!(refreshed, "slot range checked");
                let data = self
                    .s
                    .pool
                    .range_ptr(off, d.len)
                    .expect("pool size checked at attach");
                (data.cast_const(), 0, -1)
            }
            (Some(g), true) if d.dslot < g.slots => (
                std::ptr::null(),
                g.map.device_ptr() + d.dslot as u64 * g.stride,
                g.device as i32,
            ),
            _ => {
                return err(
                    Status::Protocol,
                    format!(
                        "ferryd delivered a malformed descriptor (device flag {on_device}, GPU slot {}, GPU pool {})",
                        d.dslot,
                        self.gpu.is_some()
                    ),
                )
            }
        };
        let moff = self.s.layout.meta_offset(d.slot).expect("slot checked");
        // The shared view: never a private copy.
        let meta = self
            .s
            .pool
            .shared_range_ptr(moff, d.meta_len as u64)
            .expect("pool size checked at attach");
        let is_record = d.flags & desc::FLAG_RECORD != 0;
        let record = is_record.then(|| {
            // The table is read from the host slot, also for GPU delivery
            // (the host slot holds the same bytes).
            let soff = self.s.layout.slot_offset(d.slot).expect("slot checked");
            let pool = &self.s.pool;
            record::parse(d.len, &|o, out| {
                o.checked_add(out.len() as u64).is_some_and(|e| e <= d.len)
                    && pool.read_shared(soff + o, out)
            })
        });
        let token = self.next_token;
        self.next_token += 1;
        self.inflight.insert(
            token,
            Held {
                slot: d.slot,
                dslot: d.dslot,
                partition: d.partition,
                offset: d.offset,
                record,
            },
        );
        Ok(Batch {
            flags: if is_record { BATCH_RECORD } else { 0 },
            data,
            device_data,
            device,
            len: d.len,
            meta,
            meta_len: d.meta_len,
            partition: d.partition,
            offset: d.offset,
            token,
        })
    }

    /// The fields of a typed record this consumer holds.
    pub fn fields(&self, token: u64) -> Result<&[Field]> {
        let Some(h) = self.inflight.get(&token) else {
            return err(
                Status::NotHeld,
                "batch is not held by this consumer (already released, or from another consumer)",
            );
        };
        match &h.record {
            None => err(
                Status::InvalidArgument,
                "this batch is plain bytes, not a typed record",
            ),
            Some(Ok(f)) => Ok(f),
            Some(Err(why)) => err(
                Status::Protocol,
                format!(
                    "the producer sent a malformed typed record (partition {} offset {}): {why}",
                    h.partition, h.offset
                ),
            ),
        }
    }

    /// Returns a batch's slot. Releasing twice is `NotHeld`. With automatic
    /// commit, the release carries a commit when one is due.
    pub fn release(&mut self, token: u64) -> Result<()> {
        let Some(h) = self.inflight.get(&token) else {
            return err(
                Status::NotHeld,
                "batch is not held by this consumer (already released, or from another consumer)",
            );
        };
        // With no interval (the default) every release commits, without
        // reading the clock.
        let commit = self.auto_commit
            && (self.commit_interval.is_zero()
                || self.last_commit.elapsed() >= self.commit_interval);
        self.s.submit(&Desc {
            op: desc::OP_RELEASE,
            flags: if commit { desc::FLAG_COMMIT } else { 0 },
            stream: self.s.info.stream_id,
            partition: h.partition,
            slot: h.slot,
            dslot: h.dslot,
            offset: h.offset,
            ..Desc::default()
        })?;
        self.inflight.remove(&token);
        if commit {
            if !self.commit_interval.is_zero() {
                self.last_commit = Instant::now();
            }
            self.commit_due = false;
        } else if self.auto_commit {
            self.commit_due = true;
        }
        Ok(())
    }

    /// Commits every partition this member owns at its low watermark (all
    /// offsets below it are released).
    pub fn commit(&mut self) -> Result<()> {
        self.s.submit(&Desc {
            op: desc::OP_COMMIT,
            stream: self.s.info.stream_id,
            partition: desc::COMMIT_ALL,
            ..Desc::default()
        })?;
        self.last_commit = Instant::now();
        self.commit_due = false;
        Ok(())
    }

    /// Moves the group's position in `partition` to `offset`: back to replay
    /// batches still retained, or forward to skip.
    pub fn seek(&mut self, partition: u32, offset: u64) -> Result<()> {
        if partition >= self.s.info.partitions {
            return err(
                Status::InvalidArgument,
                format!(
                    "partition {partition} does not exist (the stream has {})",
                    self.s.info.partitions
                ),
            );
        }
        match self.s.request(&Request::Seek { partition, offset })? {
            Response::Done => Ok(()),
            other => err(
                Status::Protocol,
                format!("unexpected reply to seek: {other:?}"),
            ),
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Automatic commit covers the last releases too.
        if self.commit_due {
            let _ = self.commit();
        }
    }
}
