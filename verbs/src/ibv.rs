//! `ibv`: rdma-core through sideway. libibverbs is loaded at run time, so
//! one binary runs on hosts without it (they simply have no devices).
//!
//! RC queue pairs; RoCE v2 with the IPv4-mapped GID where the port is
//! Ethernet (GID index 0 on InfiniBand); path MTU = min(local active, peer);
//! timeout, retry and RNR settings derived from [`EndpointConfig`].

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdma_mummy_sys::{ibv_sge, ibv_wc};
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue as SwCompletionQueue,
    GenericCompletionQueue,
};
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer as SwLinkLayer, Mtu, PortState};
use sideway::ibverbs::memory_region::MemoryRegion as SwMr;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairAttribute, QueuePairState};
use sideway::ibverbs::AccessFlags;

use crate::api::*;

/// The rdma-core backend.
#[derive(Debug, Default, Clone)]
pub struct IbvProvider;

fn mtu_bytes(m: Mtu) -> u32 {
    match m {
        Mtu::Mtu256 => 256,
        Mtu::Mtu512 => 512,
        Mtu::Mtu1024 => 1024,
        Mtu::Mtu2048 => 2048,
        Mtu::Mtu4096 => 4096,
    }
}

fn mtu_of(bytes: u32) -> Mtu {
    match bytes {
        b if b >= 4096 => Mtu::Mtu4096,
        b if b >= 2048 => Mtu::Mtu2048,
        b if b >= 1024 => Mtu::Mtu1024,
        b if b >= 512 => Mtu::Mtu512,
        _ => Mtu::Mtu256,
    }
}

fn sysfs(name: &str, rel: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/sys/class/infiniband").join(name).join(rel))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The GID index to use: the IPv4-mapped RoCE v2 GID on Ethernet ports,
/// else index 0.
fn pick_gid_index(ctx: &Arc<DeviceContext>, name: &str, port: u8, tbl_len: i32) -> u32 {
    for idx in 0..tbl_len.clamp(0, 128) as u32 {
        let Ok(gid) = ctx.query_gid(port, idx) else {
            continue;
        };
        let raw: std::net::Ipv6Addr = gid.into();
        let is_v4_mapped = raw.to_ipv4_mapped().is_some();
        let ty = sysfs(name, &format!("ports/{port}/gid_attrs/types/{idx}")).unwrap_or_default();
        if is_v4_mapped && (ty.is_empty() || ty.contains("v2")) {
            return idx;
        }
    }
    0
}

impl Provider for IbvProvider {
    type Domain = IbvDomain;

    fn name(&self) -> &'static str {
        "ibv"
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>> {
        // ENOSYS (no kernel support), EOPNOTSUPP, a missing libibverbs: no
        // devices, not an error.
        let Ok(list) = DeviceList::new() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for dev in list.iter() {
            let name = dev.name();
            let Ok(ctx) = dev.open() else { continue };
            let Ok(attr) = ctx.query_device() else {
                continue;
            };
            let mut ports = Vec::new();
            for port in 1..=attr.phys_port_cnt() {
                let Ok(pa) = ctx.query_port(port) else {
                    continue;
                };
                let mut gids = Vec::new();
                for idx in 0..pa.gid_tbl_len().clamp(0, 16) as u32 {
                    if let Ok(g) = ctx.query_gid(port, idx) {
                        let ip: std::net::Ipv6Addr = g.into();
                        if !ip.is_unspecified() {
                            gids.push(ip.octets());
                        }
                    }
                }
                ports.push(PortInfo {
                    port,
                    active: pa.port_state() == PortState::Active,
                    link_layer: match pa.link_layer() {
                        SwLinkLayer::Ethernet => LinkLayer::Ethernet,
                        _ => LinkLayer::InfiniBand,
                    },
                    active_mtu: mtu_bytes(pa.active_mtu()),
                    gids,
                });
            }
            let pci_address = std::fs::read_link(
                Path::new("/sys/class/infiniband")
                    .join(&name)
                    .join("device"),
            )
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().to_string()))
            .filter(|f| f.contains(':'));
            let numa_node = sysfs(&name, "device/numa_node")
                .and_then(|s| s.parse().ok())
                .filter(|n: &i32| *n >= 0);
            out.push(DeviceInfo {
                name,
                backend: "ibv".into(),
                ports,
                pci_address,
                numa_node,
            });
        }
        Ok(out)
    }

    fn open(&self, device: &str) -> Result<IbvDomain> {
        let list = DeviceList::new().map_err(|_| VerbsError::NoDevice(device.to_string()))?;
        let dev = list
            .iter()
            .find(|d| d.name() == device)
            .ok_or_else(|| VerbsError::NoDevice(device.to_string()))?;
        let ctx = dev
            .open()
            .map_err(|e| VerbsError::Connect(format!("opening {device}: {e}")))?;
        let port = 1u8;
        let pa = ctx
            .query_port(port)
            .map_err(|e| VerbsError::Connect(format!("querying {device} port {port}: {e}")))?;
        let gid_index = pick_gid_index(&ctx, device, port, pa.gid_tbl_len());
        let gid = ctx
            .query_gid(port, gid_index)
            .map_err(|e| VerbsError::Connect(format!("querying GID {gid_index}: {e}")))?;
        let pd = ctx
            .alloc_pd()
            .map_err(|e| VerbsError::Connect(format!("allocating a protection domain: {e}")))?;
        Ok(IbvDomain {
            regions: Regions::default(),
            ctx,
            pd,
            port,
            gid_index,
            gid,
            active_mtu: mtu_bytes(pa.active_mtu()),
        })
    }
}

/// Regions registered through a domain, by lkey: (address, length). Used
/// to decide whether a request may be inlined (devices do not check lkeys
/// of inline data, so only requests inside known regions are inlined and
/// anything else goes to the device, which reports the error).
type Regions = Arc<std::sync::RwLock<std::collections::HashMap<u32, (u64, u64)>>>;

/// An opened rdma-core device with its protection domain.
pub struct IbvDomain {
    regions: Regions,
    ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    port: u8,
    gid_index: u32,
    gid: Gid,
    active_mtu: u32,
}

pub struct IbvMr {
    mr: Arc<SwMr>,
    addr: u64,
    len: usize,
    regions: Regions,
}

impl Drop for IbvMr {
    fn drop(&mut self) {
        self.regions
            .write()
            .expect("regions")
            .remove(&self.mr.lkey());
    }
}

impl MemoryRegion for IbvMr {
    fn addr(&self) -> u64 {
        self.addr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn lkey(&self) -> u32 {
        self.mr.lkey()
    }
    fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}

/// A completion queue with a completion channel (its fd works with epoll).
///
/// Polled with the classic `ibv_poll_cq`: on rxe (rdma-core 44) the
/// extended `ibv_start_poll`/`ibv_next_poll`/`ibv_end_poll` API advanced
/// the consumer index once too often after an empty `ibv_next_poll`,
/// producing zeroed completions and never freeing send-queue slots.
pub struct IbvCq {
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    /// Completions taken off the device but not yet handed out (`wait`
    /// must look, and looking with `ibv_start_poll` takes a completion).
    /// The lock also keeps start_poll/end_poll from running concurrently.
    pending: Mutex<std::collections::VecDeque<Completion>>,
}

fn status_of(code: u32) -> WcStatus {
    match code {
        0 => WcStatus::Success,
        1 => WcStatus::LocalLength,
        2 => WcStatus::LocalQpOperation,
        4 => WcStatus::LocalProtection,
        5 => WcStatus::WrFlush,
        9 => WcStatus::RemoteInvalidRequest,
        10 => WcStatus::RemoteAccess,
        11 => WcStatus::RemoteOperation,
        12 => WcStatus::RetryExceeded,
        13 => WcStatus::RnrRetryExceeded,
        other => WcStatus::Other(other),
    }
}

impl IbvCq {
    /// Moves up to `max` completions from the device into `out`. The
    /// caller holds the `pending` lock. Completions beyond `max` stay on
    /// the device.
    fn poll_device(&self, out: &mut impl Extend<Completion>, max: usize) -> usize {
        const BATCH: usize = 32;
        let mut total = 0;
        while total < max {
            let want = (max - total).min(BATCH);
            let mut wcs = [std::mem::MaybeUninit::<ibv_wc>::uninit(); BATCH];
            // SAFETY: the CQ is live (held by self.cq); `wcs` has room for
            // `want` entries, of which the call initialises the first `got`.
            let got = unsafe {
                rdma_mummy_sys::ibv_poll_cq(
                    self.cq.cq().as_ptr(),
                    want as i32,
                    wcs.as_mut_ptr().cast(),
                )
            };
            if got <= 0 {
                break;
            }
            for wc in &wcs[..got as usize] {
                // SAFETY: initialised by ibv_poll_cq (see above).
                let wc = unsafe { wc.assume_init() };
                out.extend(std::iter::once(completion_of(&wc)));
            }
            total += got as usize;
            if (got as usize) < want {
                break;
            }
        }
        total
    }
}

fn completion_of(wc: &ibv_wc) -> Completion {
    let status = status_of(wc.status);
    let opcode = if status != WcStatus::Success {
        WcOpcode::Unknown
    } else {
        match wc.opcode {
            0 => WcOpcode::Send,
            1 => WcOpcode::Write,
            2 => WcOpcode::Read,
            128 => WcOpcode::Recv,
            129 => WcOpcode::RecvWriteImm,
            _ => WcOpcode::Unknown,
        }
    };
    let with_imm = wc.wc_flags & rdma_mummy_sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
    // SAFETY: both union members are plain u32s, so reading either is
    // defined; wc_flags (checked here) says whether it holds an immediate.
    let raw_imm = unsafe { wc.imm_data_invalidated_rkey_union.imm_data };
    let imm =
        (with_imm && matches!(opcode, WcOpcode::Recv | WcOpcode::RecvWriteImm)).then_some(raw_imm);
    Completion {
        wr_id: wc.wr_id,
        status,
        opcode,
        byte_len: if status == WcStatus::Success {
            wc.byte_len
        } else {
            0
        },
        imm,
    }
}

impl CompletionQueue for IbvCq {
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        let mut pending = self.pending.lock().expect("cq");
        let from_pending = pending.len().min(max);
        out.extend(pending.drain(..from_pending));
        from_pending + self.poll_device(out, max - from_pending)
    }

    fn wait(&self, timeout: Duration) -> bool {
        // Arm the notification, then look once more so that a completion
        // that arrived before arming is not missed.
        // SAFETY: the CQ handle is live (held by self.cq).
        unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        {
            let mut pending = self.pending.lock().expect("cq");
            if !pending.is_empty() {
                return true;
            }
            // Looking takes completions off the device; keep them.
            if self.poll_device(&mut *pending, 64) > 0 {
                return true;
            }
        }
        let mut pfd = libc::pollfd {
            fd: self.channel.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a live pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return false;
        }
        let mut cq = std::ptr::null_mut();
        let mut ctx = std::ptr::null_mut();
        // SAFETY: the channel is live and readable (non-blocking fd); the
        // event is acknowledged at once, as ibv_destroy_cq requires.
        unsafe {
            if rdma_mummy_sys::ibv_get_cq_event(
                self.channel.comp_channel().as_ptr(),
                &mut cq,
                &mut ctx,
            ) == 0
            {
                rdma_mummy_sys::ibv_ack_cq_events(cq, 1);
            }
        }
        true
    }

    fn fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }
}

fn access_flags(bits: u32) -> AccessFlags {
    let mut f = AccessFlags::LocalWrite;
    if bits & access::LOCAL_WRITE == 0 {
        f = AccessFlags::none();
    }
    if bits & access::REMOTE_WRITE != 0 {
        f |= AccessFlags::RemoteWrite;
    }
    if bits & access::REMOTE_READ != 0 {
        f |= AccessFlags::RemoteRead;
    }
    f
}

/// IB local ACK timeout exponent: 4.096 us * 2^t per try; `tries` tries in
/// `total`.
fn ack_timeout_exp(total: Duration, tries: u32) -> u8 {
    let per_try_us = (total.as_micros() as f64 / tries as f64).max(4.096);
    ((per_try_us / 4.096).log2().floor() as i32).clamp(1, 31) as u8
}

/// IB RNR timer codes and their milliseconds.
const RNR_TIMER_MS: [(u8, f64); 31] = [
    (1, 0.01),
    (2, 0.02),
    (3, 0.03),
    (4, 0.04),
    (5, 0.06),
    (6, 0.08),
    (7, 0.12),
    (8, 0.16),
    (9, 0.24),
    (10, 0.32),
    (11, 0.48),
    (12, 0.64),
    (13, 0.96),
    (14, 1.28),
    (15, 1.92),
    (16, 2.56),
    (17, 3.84),
    (18, 5.12),
    (19, 7.68),
    (20, 10.24),
    (21, 15.36),
    (22, 20.48),
    (23, 30.72),
    (24, 40.96),
    (25, 61.44),
    (26, 81.92),
    (27, 122.88),
    (28, 163.84),
    (29, 245.76),
    (30, 327.68),
    (31, 491.52),
];

/// The largest RNR timer code whose wait times `retries` fits `total`.
fn rnr_timer_code(total: Duration, retries: u32) -> u8 {
    let per_ms = total.as_secs_f64() * 1000.0 / retries as f64;
    RNR_TIMER_MS
        .iter()
        .rev()
        .find(|(_, ms)| *ms <= per_ms)
        .map(|(c, _)| *c)
        .unwrap_or(1)
}

const RETRY_CNT: u8 = 6;
const RNR_RETRY: u8 = 6; // 7 would mean "forever"

impl Domain for IbvDomain {
    type Mr = IbvMr;
    type Cq = IbvCq;
    type Pending = IbvPending;
    type Ep = IbvEndpoint;

    unsafe fn register(&self, addr: *mut u8, len: usize, access_bits: u32) -> Result<IbvMr> {
        if addr.is_null() || len == 0 {
            return Err(VerbsError::InvalidArgument(
                "registering a null or empty range".into(),
            ));
        }
        // SAFETY: the caller guarantees the range stays valid for the
        // region's lifetime (this function's contract).
        let mr = unsafe {
            self.pd
                .reg_mr(addr as usize, len, access_flags(access_bits))
        }
        .map_err(|e| VerbsError::InvalidArgument(format!("registering {len} bytes: {e}")))?;
        self.regions
            .write()
            .expect("regions")
            .insert(mr.lkey(), (addr as u64, len as u64));
        Ok(IbvMr {
            mr,
            addr: addr as u64,
            len,
            regions: self.regions.clone(),
        })
    }

    unsafe fn register_dmabuf(
        &self,
        fd: RawFd,
        offset: u64,
        len: usize,
        iova: u64,
        access_bits: u32,
    ) -> Result<IbvMr> {
        if len == 0 || fd < 0 {
            return Err(VerbsError::InvalidArgument(format!(
                "registering dma-buf fd {fd}: empty range or bad fd"
            )));
        }
        // SAFETY: the caller keeps the dma-buf alive for the region's
        // lifetime (this function's contract).
        let mr = unsafe {
            self.pd
                .reg_dmabuf_mr(offset, len, iova, fd, access_flags(access_bits))
        }
        .map_err(|e| {
            let text = e.to_string();
            let os = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(|io| io.raw_os_error());
            match os {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    VerbsError::Unsupported("dma-buf memory regions on this device")
                }
                _ => VerbsError::InvalidArgument(format!("registering dma-buf fd {fd}: {text}")),
            }
        })?;
        self.regions
            .write()
            .expect("regions")
            .insert(mr.lkey(), (iova, len as u64));
        Ok(IbvMr {
            mr,
            addr: iova,
            len,
            regions: self.regions.clone(),
        })
    }

    fn create_cq(&self, depth: u32) -> Result<Arc<IbvCq>> {
        let channel = self
            .ctx
            .create_comp_channel()
            .map_err(|e| VerbsError::InvalidArgument(format!("completion channel: {e}")))?;
        channel.set_nonblocking(true)?;
        let cq = self
            .ctx
            .create_cq_builder()
            .setup_cqe(depth)
            .setup_comp_channel(&channel, 0)
            .build()
            .map_err(|e| {
                VerbsError::InvalidArgument(format!("completion queue of {depth}: {e}"))
            })?;
        Ok(Arc::new(IbvCq {
            cq,
            channel,
            pending: Mutex::new(std::collections::VecDeque::new()),
        }))
    }

    fn endpoint(
        &self,
        cfg: &EndpointConfig,
        send_cq: &Arc<IbvCq>,
        recv_cq: &Arc<IbvCq>,
    ) -> Result<IbvPending> {
        let build = |max_inline: u32| {
            self.pd
                .create_qp_builder()
                .setup_max_send_wr(cfg.max_send_wr)
                .setup_max_recv_wr(cfg.max_recv_wr)
                .setup_max_send_sge(MAX_SGE as u32)
                .setup_max_recv_sge(MAX_SGE as u32)
                .setup_max_inline_data(max_inline)
                .setup_send_cq(GenericCompletionQueue::from(Arc::clone(&send_cq.cq)))
                .setup_recv_cq(GenericCompletionQueue::from(Arc::clone(&recv_cq.cq)))
                // The classic ibv_post_send path: rxe's extended work-request
                // path (ibv_wr_set_sge_list) dropped the third of three SGEs
                // in the conformance suite.
                .build()
        };
        // Inline data where the device allows it; a device that refuses the
        // size gets a queue pair without.
        let (mut qp, max_inline) = match build(cfg.max_inline) {
            Ok(qp) => (qp, cfg.max_inline),
            Err(_) if cfg.max_inline > 0 => (
                build(0).map_err(|e| {
                    VerbsError::InvalidArgument(format!("creating a queue pair: {e}"))
                })?,
                0,
            ),
            Err(e) => {
                return Err(VerbsError::InvalidArgument(format!(
                    "creating a queue pair: {e}"
                )))
            }
        };
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            .setup_access_flags(
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            );
        qp.modify(&attr)
            .map_err(|e| VerbsError::Connect(format!("queue pair to INIT: {e}")))?;
        let psn = (std::process::id().wrapping_mul(2_654_435_761) ^ qp.qp_number()) & 0xFF_FFFF;
        Ok(IbvPending {
            qp,
            psn,
            port: self.port,
            gid_index: self.gid_index,
            gid: self.gid,
            mtu: cfg.mtu.min(self.active_mtu),
            max_inline,
            regions: self.regions.clone(),
            cfg: cfg.clone(),
            _keep: (
                Arc::clone(send_cq),
                Arc::clone(recv_cq),
                Arc::clone(&self.pd),
            ),
        })
    }
}

/// A queue pair in INIT, waiting for the peer's info.
pub struct IbvPending {
    qp: BasicQueuePair,
    max_inline: u32,
    regions: Regions,
    psn: u32,
    port: u8,
    gid_index: u32,
    gid: Gid,
    mtu: u32,
    cfg: EndpointConfig,
    _keep: (Arc<IbvCq>, Arc<IbvCq>, Arc<ProtectionDomain>),
}

// SAFETY: the queue pair is used by one thread at a time (moved, or behind
// the endpoint's mutex); rdma-core's QP calls are thread-safe.
unsafe impl Send for IbvPending {}

impl PendingEndpoint for IbvPending {
    type Ep = IbvEndpoint;

    fn info(&self) -> EndpointInfo {
        let ip: std::net::Ipv6Addr = self.gid.into();
        EndpointInfo {
            gid: ip.octets(),
            qpn: self.qp.qp_number(),
            psn: self.psn,
            mtu: self.mtu,
            addr: None,
        }
    }

    fn connect(mut self, remote: &EndpointInfo) -> Result<IbvEndpoint> {
        let mtu = self.mtu.min(remote.mtu);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu_of(mtu))
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(16)
            .setup_min_rnr_timer(rnr_timer_code(self.cfg.rnr_timeout, RNR_RETRY as u32 + 1));
        let mut ah = AddressHandleAttribute::new();
        let rgid: Gid = std::net::Ipv6Addr::from(remote.gid).into();
        ah.setup_dest_lid(0)
            .setup_port(self.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(self.gid_index as u8)
            .setup_grh_dest_gid(&rgid)
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&ah);
        self.qp
            .modify(&attr)
            .map_err(|e| VerbsError::Connect(format!("queue pair to RTR: {e}")))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(ack_timeout_exp(self.cfg.timeout, RETRY_CNT as u32 + 1))
            .setup_retry_cnt(RETRY_CNT)
            .setup_rnr_retry(RNR_RETRY)
            .setup_max_read_atomic(16);
        self.qp
            .modify(&attr)
            .map_err(|e| VerbsError::Connect(format!("queue pair to RTS: {e}")))?;
        Ok(IbvEndpoint {
            qp: Mutex::new(self.qp),
            max_inline: self.max_inline,
            regions: self.regions,
            mtu,
            _keep: self._keep,
        })
    }
}

/// A connected RC queue pair.
pub struct IbvEndpoint {
    qp: Mutex<BasicQueuePair>,
    max_inline: u32,
    regions: Regions,
    mtu: u32,
    _keep: (Arc<IbvCq>, Arc<IbvCq>, Arc<ProtectionDomain>),
}

// SAFETY: all use of the queue pair goes through the mutex.
unsafe impl Send for IbvEndpoint {}
// SAFETY: as for Send.
unsafe impl Sync for IbvEndpoint {}

/// The sges on the stack, in verbs' layout.
fn sge_array(sges: &[Sge]) -> Result<([ibv_sge; MAX_SGE], usize)> {
    check_sge_count(sges)?;
    let mut out = [ibv_sge {
        addr: 0,
        length: 0,
        lkey: 0,
    }; MAX_SGE];
    for (d, s) in out.iter_mut().zip(sges) {
        *d = ibv_sge {
            addr: s.addr,
            length: s.len,
            lkey: s.lkey,
        };
    }
    Ok((out, sges.len()))
}

fn post_result(rc: i32, what: &str) -> Result<()> {
    match rc {
        0 => Ok(()),
        libc::ENOMEM => Err(VerbsError::QueueFull(if what == "send" {
            "send queue"
        } else {
            "receive queue"
        })),
        e => Err(VerbsError::InvalidArgument(format!(
            "posting a {what}: {}",
            std::io::Error::from_raw_os_error(e)
        ))),
    }
}

impl Endpoint for IbvEndpoint {
    fn mtu(&self) -> u32 {
        self.mtu
    }

    unsafe fn post_send(&self, wr: &SendWr<'_>) -> Result<()> {
        use rdma_mummy_sys::{ibv_send_flags, ibv_send_wr, ibv_wr_opcode};
        let (sges, n) = sge_array(wr.sges)?;
        let total: u64 = wr.sges.iter().map(|g| g.len as u64).sum();
        let inline = self.max_inline > 0
            && total > 0
            && total <= self.max_inline as u64
            && !matches!(wr.op, SendOp::Read { .. })
            && {
                let regions = self.regions.read().expect("regions");
                wr.sges.iter().all(|g| {
                    regions
                        .get(&g.lkey)
                        .is_some_and(|&(a, l)| g.addr >= a && g.addr + g.len as u64 <= a + l)
                })
            };
        // SAFETY: ibv_send_wr is plain C data; all-zero is its neutral value.
        let mut w: ibv_send_wr = unsafe { std::mem::MaybeUninit::zeroed().assume_init() };
        let mut sges = sges;
        w.wr_id = wr.wr_id;
        w.sg_list = sges.as_mut_ptr();
        w.num_sge = n as i32;
        w.send_flags = 0;
        if wr.signaled {
            w.send_flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        if inline {
            // The provider copies the bytes during the post; every sge lies
            // in a region registered through this domain (checked above).
            w.send_flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        let (opcode, rdma, imm) = match wr.op {
            SendOp::Send { imm: None } => (ibv_wr_opcode::IBV_WR_SEND, None, None),
            SendOp::Send { imm: Some(i) } => (ibv_wr_opcode::IBV_WR_SEND_WITH_IMM, None, Some(i)),
            SendOp::Write {
                remote_addr,
                rkey,
                imm: None,
            } => (
                ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                Some((remote_addr, rkey)),
                None,
            ),
            SendOp::Write {
                remote_addr,
                rkey,
                imm: Some(i),
            } => (
                ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
                Some((remote_addr, rkey)),
                Some(i),
            ),
            SendOp::Read { remote_addr, rkey } => (
                ibv_wr_opcode::IBV_WR_RDMA_READ,
                Some((remote_addr, rkey)),
                None,
            ),
        };
        w.opcode = opcode;
        if let Some((remote_addr, rkey)) = rdma {
            w.wr.rdma.remote_addr = remote_addr;
            w.wr.rdma.rkey = rkey;
        }
        if let Some(i) = imm {
            // Opaque 32 bits, carried as given (both ends are ours).
            w.imm_data_invalidated_rkey_union.imm_data = i;
        }
        let qp = self.qp.lock().expect("qp");
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live (held by `qp`); `w` and `sges` live on this
        // stack frame for the duration of the call, which copies them (and,
        // inline, the data); the caller keeps the memory the sges name valid
        // until completion (this function's contract).
        let rc = unsafe { rdma_mummy_sys::ibv_post_send(qp.qp().as_ptr(), &mut w, &mut bad) };
        post_result(rc, "send")
    }

    unsafe fn post_recv(&self, wr_id: u64, sges: &[Sge]) -> Result<()> {
        let (mut list, n) = sge_array(sges)?;
        let mut w = rdma_mummy_sys::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: list.as_mut_ptr(),
            num_sge: n as i32,
        };
        let qp = self.qp.lock().expect("qp");
        let mut bad = std::ptr::null_mut();
        // SAFETY: as in post_send; the caller keeps the receive memory valid
        // and unaliased until completion.
        let rc = unsafe { rdma_mummy_sys::ibv_post_recv(qp.qp().as_ptr(), &mut w, &mut bad) };
        post_result(rc, "receive")
    }
}
