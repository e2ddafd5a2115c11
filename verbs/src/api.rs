//! The backend-independent verbs API.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Memory access rights of a registration (bit set).
pub mod access {
    pub const LOCAL_WRITE: u32 = 1;
    pub const REMOTE_WRITE: u32 = 2;
    pub const REMOTE_READ: u32 = 4;
    pub const ALL: u32 = LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ;
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerbsError {
    #[error("no such device {0:?}")]
    NoDevice(String),
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("queue full: {0}")]
    QueueFull(&'static str),
    #[error("connecting the endpoint: {0}")]
    Connect(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, VerbsError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkLayer {
    Ethernet,
    InfiniBand,
    /// The soft backend's TCP transport.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    pub port: u8,
    pub active: bool,
    pub link_layer: LinkLayer,
    /// Active MTU in bytes.
    pub active_mtu: u32,
    pub gids: Vec<[u8; 16]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    pub backend: String,
    pub ports: Vec<PortInfo>,
    /// PCI address like "0000:17:00.0", where known.
    pub pci_address: Option<String>,
    pub numa_node: Option<i32>,
}

/// What the peer needs to connect to an endpoint. Exchanged out of band
/// (over ferryd's control connection), encoded with postcard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub gid: [u8; 16],
    pub qpn: u32,
    pub psn: u32,
    pub mtu: u32,
    /// The soft backend's listening address.
    pub addr: Option<SocketAddr>,
}

impl EndpointInfo {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("EndpointInfo serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<EndpointInfo> {
        postcard::from_bytes(bytes)
            .map_err(|e| VerbsError::InvalidArgument(format!("endpoint info: {e}")))
    }
}

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    /// How long an operation may wait for the peer's acknowledgement before
    /// it fails with `RetryExceeded` (a NIC's timeout x retry count).
    pub timeout: Duration,
    /// How long a send or write-with-immediate may wait for the peer to post
    /// a receive before it fails with `RnrRetryExceeded`.
    pub rnr_timeout: Duration,
    /// Largest MTU this side offers.
    pub mtu: u32,
    /// Sends and writes up to this many bytes are posted inline (copied into
    /// the work request, so the buffer is free at once) where the device
    /// allows it; 0 disables.
    pub max_inline: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            max_send_wr: 1024,
            max_recv_wr: 1024,
            timeout: Duration::from_secs(4),
            rnr_timeout: Duration::from_secs(2),
            mtu: 4096,
            max_inline: 64,
        }
    }
}

/// Most scatter-gather entries one work request may carry, on every
/// backend (the ibv queue pairs are created with this many).
pub const MAX_SGE: usize = 8;

/// `InvalidArgument` for a work request with more than [`MAX_SGE`] entries.
pub fn check_sge_count(sges: &[Sge]) -> Result<()> {
    if sges.len() > MAX_SGE {
        return Err(VerbsError::InvalidArgument(format!(
            "{} scatter-gather entries, at most {MAX_SGE}",
            sges.len()
        )));
    }
    Ok(())
}

/// One scatter-gather element: `len` bytes at `addr` in the region `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    Send {
        imm: Option<u32>,
    },
    Write {
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    },
    Read {
        remote_addr: u64,
        rkey: u32,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct SendWr<'a> {
    pub wr_id: u64,
    pub op: SendOp,
    pub sges: &'a [Sge],
    /// Report a completion on success (errors are always reported).
    pub signaled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    Success,
    /// A receive buffer was too small.
    LocalLength,
    /// An sge named memory outside its registration, or a bad lkey.
    LocalProtection,
    /// A local queue-pair operation error (what soft-RoCE reports for a bad
    /// lkey where other devices report `LocalProtection`).
    LocalQpOperation,
    /// The peer refused: bad rkey, address outside the region, or no right.
    RemoteAccess,
    /// The peer's receive buffer was too small for a send.
    RemoteInvalidRequest,
    /// The peer failed the operation (soft-RoCE's answer to a receive
    /// buffer too small, where other devices say `RemoteInvalidRequest`).
    RemoteOperation,
    /// The peer did not answer in time or vanished.
    RetryExceeded,
    /// The peer had no receive posted in time.
    RnrRetryExceeded,
    /// Flushed because the endpoint entered the error state.
    WrFlush,
    /// Another verbs status (the numeric `ibv_wc_status`).
    Other(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    Send,
    Write,
    Read,
    Recv,
    /// A receive consumed by the peer's write with immediate.
    RecvWriteImm,
    /// Verbs leaves the operation of an error completion undefined.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    /// Bytes received. Defined for receives only (as in verbs); send-side
    /// completions may report anything.
    pub byte_len: u32,
    pub imm: Option<u32>,
}

/// Discovers devices of one backend.
pub trait Provider {
    type Domain: Domain;
    fn name(&self) -> &'static str;
    /// Devices of this backend. A kernel without RDMA support (ENOSYS,
    /// EOPNOTSUPP) means none, not an error.
    fn devices(&self) -> Result<Vec<DeviceInfo>>;
    fn open(&self, device: &str) -> Result<Self::Domain>;
}

/// A completion queue: polled, or waited on (its fd works with epoll/tokio).
pub trait CompletionQueue: Send + Sync {
    /// Moves up to `max` completions into `out`; returns how many.
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize;
    /// Waits until a completion may be available or `timeout` passes.
    /// Returns true when something is ready.
    fn wait(&self, timeout: Duration) -> bool;
    /// Readable when completions may be available.
    fn fd(&self) -> RawFd;
    /// The poller stops polling for now and will wait on [`fd`](Self::fd)
    /// (epoll) instead: a backend whose endpoints make progress in the
    /// polling thread hands that back to its own threads at once, instead
    /// of after a grace period. The next `poll` takes it over again.
    fn unpolled(&self) {}
}

pub trait MemoryRegion: Send + Sync {
    fn addr(&self) -> u64;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn lkey(&self) -> u32;
    fn rkey(&self) -> u32;
    /// An sge covering `[offset, offset + len)` of this region.
    fn sge(&self, offset: usize, len: u32) -> Sge {
        Sge {
            addr: self.addr() + offset as u64,
            len,
            lkey: self.lkey(),
        }
    }
}

/// An opened device.
pub trait Domain: Send + Sync + Sized {
    type Mr: MemoryRegion;
    type Cq: CompletionQueue;
    type Pending: PendingEndpoint<Ep = Self::Ep> + Send;
    type Ep: Endpoint;

    /// Registers host memory.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be valid, writable memory that stays
    /// allocated until the returned region is dropped; the peer may read
    /// and write it (per `access`) at any time meanwhile.
    unsafe fn register(&self, addr: *mut u8, len: usize, access: u32) -> Result<Self::Mr>;

    /// Registers `len` bytes at `offset` of a dma-buf (GPU memory exported
    /// by its driver), addressed in sges from `iova`. Backends or devices
    /// that cannot do this say `Unsupported`.
    ///
    /// # Safety
    /// `fd` must be a dma-buf that stays alive until the region is dropped.
    unsafe fn register_dmabuf(
        &self,
        fd: std::os::fd::RawFd,
        offset: u64,
        len: usize,
        iova: u64,
        access: u32,
    ) -> Result<Self::Mr>;

    fn create_cq(&self, depth: u32) -> Result<std::sync::Arc<Self::Cq>>;

    /// Creates an endpoint whose completions go to `send_cq` and `recv_cq`.
    fn endpoint(
        &self,
        cfg: &EndpointConfig,
        send_cq: &std::sync::Arc<Self::Cq>,
        recv_cq: &std::sync::Arc<Self::Cq>,
    ) -> Result<Self::Pending>;
}

/// An endpoint that knows its own address but is not connected yet.
pub trait PendingEndpoint: Sized {
    type Ep: Endpoint;
    fn info(&self) -> EndpointInfo;
    /// Connects to the peer described by `remote` (which called `connect`
    /// with our info). Blocks until connected or the timeout passes.
    fn connect(self, remote: &EndpointInfo) -> Result<Self::Ep>;
}

/// A connected reliable endpoint.
pub trait Endpoint: Send + Sync {
    /// The negotiated path MTU.
    fn mtu(&self) -> u32;

    /// Posts a send, write, write with immediate, or read.
    ///
    /// # Safety
    /// The memory of every sge must stay valid until this work request's
    /// completion has been polled (or, unsignalled, until a later signalled
    /// request on this endpoint completed); for reads, nothing else may
    /// access it meanwhile.
    unsafe fn post_send(&self, wr: &SendWr<'_>) -> Result<()>;

    /// Posts a receive buffer (for sends and writes with immediate).
    ///
    /// # Safety
    /// The memory of every sge must stay valid and unaliased until the
    /// receive's completion has been polled.
    unsafe fn post_recv(&self, wr_id: u64, sges: &[Sge]) -> Result<()>;
}
