//! GPU delivery. A consumer that asks for `cuda:N` gets a pool of
//! `prefetch` slots in that GPU's memory (cuMemAlloc, SYNC_MEMOPS), which
//! it opens once through a CUDA IPC handle. For each batch the group hands
//! it, the daemon queues an asynchronous copy from the batch's slot in the
//! stream's host pool (page-locked once per GPU and stream) into a free GPU
//! slot on the consumer's own CUDA stream, so the copies of successive
//! batches are in flight together. The descriptor goes onto the consumer's
//! ring only once its copy's event completed, in delivery order. Releasing
//! the batch frees the GPU slot (and, as for every consumer, the host
//! slot). The host slot is held by the group until that release, so a copy
//! never reads a slot a producer is refilling.
//!
//! A producer may publish from GPU memory: it then writes into the
//! stream's mirror on its GPU (one GPU slot per host slot, the same index,
//! shared by that GPU's producers of the stream) and publishes as usual.
//! ferryd copies the payload to the host slot (for host consumers, replay
//! and redelivery) on the producer's CUDA stream and puts the batch into
//! the stream once that copy completed, in publish order. GPU consumers of
//! such a batch get it by a device-to-device copy from the mirror (a peer
//! copy when their GPU is another one), not from host memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use ferry_cuda::{CudaError, Event, Gpu, Mem, Probe};
use ferry_shm::desc::{self, Desc};
use ferry_shm::proto::{ErrorCode, GpuPoolInfo};
use ferry_shm::Region;

use crate::error::Refusal;
use crate::stream::Violation;

/// GPU slots start on this boundary, so that any dtype a trainer views
/// them as is aligned.
const STRIDE_ALIGN: u64 = 4096;

/// The GPUs ferryd found, opened lazily when a consumer first asks.
pub struct Gpus {
    pub probe: Result<Probe, CudaError>,
    /// daemon.max_gpu_pool_bytes
    max_pool: u64,
    open: HashMap<u32, Arc<Gpu>>,
    /// Each stream's host pool, registered with each GPU that reads it.
    hosts: HashMap<(u32, usize), Mem>,
    /// Each stream's mirror on each GPU its producers publish from.
    mirrors: HashMap<(usize, u32), (Mem, GpuPoolInfo)>,
}

impl Gpus {
    pub fn new(probe: Result<Probe, CudaError>, max_pool: u64) -> Gpus {
        Gpus {
            probe,
            max_pool,
            open: HashMap::new(),
            hosts: HashMap::new(),
            mirrors: HashMap::new(),
        }
    }

    /// Drops what was kept for stream `stream` (its pool's registrations
    /// with GPUs, its mirrors): the stream is deleted and no session of
    /// it is left.
    pub fn forget_stream(&mut self, stream: usize) {
        self.hosts.retain(|&(_, s), _| s != stream);
        self.mirrors.retain(|&(s, _), _| s != stream);
    }

    /// ferryd's ordinal of the GPU a session asked for (an ordinal as its
    /// process numbers GPUs, and that GPU's PCI bus id), or None for host
    /// memory.
    pub fn resolve_device(
        &self,
        device: &(Option<u32>, Option<String>),
    ) -> Result<Option<u32>, Refusal> {
        match device {
            (None, None) => Ok(None),
            (n, bus) => self.resolve(*n, bus.as_deref()).map(Some),
        }
    }

    /// ferryd's ordinal of the GPU a consumer asked for: by PCI bus id when
    /// given (ordinals differ between processes), else by ordinal.
    pub fn resolve(&self, ordinal: Option<u32>, bus: Option<&str>) -> Result<u32, Refusal> {
        let what = match (bus, ordinal) {
            (Some(b), _) => format!("the GPU at PCI {b}"),
            (None, Some(n)) => format!("cuda:{n}"),
            (None, None) => "a GPU".to_string(),
        };
        let p = match &self.probe {
            Ok(p) => p,
            Err(e) => {
                return Err(Refusal::new(
                    ErrorCode::NoDevice,
                    format!("GPU delivery to {what} was requested, but ferryd's host has no usable CUDA GPU ({e})"),
                ))
            }
        };
        let found = match (bus, ordinal) {
            (Some(b), _) => p
                .gpus
                .iter()
                .find(|g| g.pci_bus_id.eq_ignore_ascii_case(b))
                .map(|g| g.ordinal),
            (None, Some(n)) => p.gpus.iter().find(|g| g.ordinal == n).map(|g| g.ordinal),
            (None, None) => None,
        };
        found.ok_or_else(|| {
            let have: Vec<String> = p
                .gpus
                .iter()
                .map(|g| format!("cuda:{} at {}", g.ordinal, g.pci_bus_id))
                .collect();
            Refusal::new(
                ErrorCode::NoDevice,
                format!(
                    "ferryd sees no {what}; it has {} GPU(s): {}",
                    p.gpus.len(),
                    have.join(", ")
                ),
            )
        })
    }

    fn gpu(&mut self, ordinal: u32) -> Result<Arc<Gpu>, CudaError> {
        if let Some(g) = self.open.get(&ordinal) {
            return Ok(g.clone());
        }
        let g = Gpu::open(ordinal)?;
        self.open.insert(ordinal, g.clone());
        Ok(g)
    }

    /// Stream `stream`'s host pool as GPU `ordinal` sees it (registered
    /// once).
    fn host(
        &mut self,
        gpu: &Arc<Gpu>,
        stream: usize,
        host: &Arc<Region>,
    ) -> Result<Mem, CudaError> {
        if let Some(m) = self.hosts.get(&(gpu.ordinal, stream)) {
            return Ok(m.clone());
        }
        let r = gpu.register_host(host.clone())?;
        crate::limited!(
            INFO,
            gpu = gpu.ordinal,
            bytes = r.len(),
            pinned = r.pinned,
            "stream pool registered with the GPU"
        );
        let m = Mem::Host(r);
        self.hosts.insert((gpu.ordinal, stream), m.clone());
        Ok(m)
    }

    /// A pool of `slots` GPU slots of at least `slot_size` bytes.
    fn pool(
        &self,
        gpu: &Arc<Gpu>,
        slot_size: u64,
        slots: u32,
    ) -> Result<(Mem, GpuPoolInfo), Refusal> {
        let ordinal = gpu.ordinal;
        let stride = slot_size.max(1).div_ceil(STRIDE_ALIGN) * STRIDE_ALIGN;
        let len = stride
            .checked_mul(slots as u64)
            .filter(|&l| l <= usize::MAX as u64)
            .ok_or(Refusal::new(
                ErrorCode::InvalidArgument,
                "GPU pool size overflows".to_string(),
            ))?;
        if len > self.max_pool {
            return Err(Refusal::new(
                ErrorCode::Limit,
                format!(
                    "a GPU pool of {slots} x {stride} bytes exceeds daemon.max_gpu_pool_bytes = {} (ask for fewer prefetch slots)",
                    self.max_pool
                ),
            ));
        }
        let pool = gpu.alloc(len as usize).map_err(|e| {
            Refusal::new(
                ErrorCode::Limit,
                format!("allocating a {len}-byte GPU pool on cuda:{ordinal}: {e}"),
            )
        })?;
        let handle = pool
            .ipc_handle()
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cuda:{ordinal}: {e}")))?;
        let pci_bus_id = match &self.probe {
            Ok(p) => p
                .gpus
                .iter()
                .find(|g| g.ordinal == ordinal)
                .map(|g| g.pci_bus_id.clone())
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        let info = GpuPoolInfo {
            ordinal,
            pci_bus_id,
            ipc_handle: handle.handle.to_vec(),
            ipc_offset: handle.offset,
            len,
            stride,
            slots,
        };
        Ok((Mem::Device(Arc::new(pool)), info))
    }

    /// GPU `ordinal`, stream `stream`'s host pool as that GPU sees it, and
    /// a new CUDA stream for one session's copies.
    fn attach(
        &mut self,
        ordinal: u32,
        stream: usize,
        host: &Arc<Region>,
    ) -> Result<(Arc<Gpu>, Mem, ferry_cuda::Stream), Refusal> {
        let internal =
            |e: CudaError| Refusal::new(ErrorCode::Internal, format!("cuda:{ordinal}: {e}"));
        let gpu = self.gpu(ordinal).map_err(internal)?;
        let host = self.host(&gpu, stream, host).map_err(internal)?;
        let cuda_stream = gpu.stream().map_err(internal)?;
        Ok((gpu, host, cuda_stream))
    }

    /// Sets up GPU delivery of stream `stream` (host pool `host`) to one
    /// consumer: `slots` GPU slots of at least `slot_size` bytes.
    pub fn delivery(
        &mut self,
        ordinal: u32,
        stream: usize,
        host: &Arc<Region>,
        slot_size: u64,
        slots: u32,
    ) -> Result<GpuDelivery, Refusal> {
        let (gpu, host, cuda_stream) = self.attach(ordinal, stream, host)?;
        let (pool, info) = self.pool(&gpu, slot_size, slots)?;
        Ok(GpuDelivery::new(info, pool, host, cuda_stream))
    }

    /// Sets up GPU delivery to one consumer from host memory of its own:
    /// the landing area a stream's home on another host writes its
    /// batches into. Registered with the GPU for this consumer alone, and
    /// unregistered when its delivery is dropped.
    pub fn delivery_from_landing(
        &mut self,
        ordinal: u32,
        landing: &Arc<Region>,
        slot_size: u64,
        slots: u32,
    ) -> Result<GpuDelivery, Refusal> {
        let (gpu, host, cuda_stream) = self.attach_own(ordinal, landing)?;
        let (pool, info) = self.pool(&gpu, slot_size, slots)?;
        Ok(GpuDelivery::new(info, pool, host, cuda_stream))
    }

    /// GPU `ordinal`, host memory `host` of one session's own (a landing
    /// area, an outbox) registered with it for that session alone, and a
    /// new CUDA stream for the session's copies.
    fn attach_own(
        &mut self,
        ordinal: u32,
        host: &Arc<Region>,
    ) -> Result<(Arc<Gpu>, Mem, ferry_cuda::Stream), Refusal> {
        let internal =
            |e: CudaError| Refusal::new(ErrorCode::Internal, format!("cuda:{ordinal}: {e}"));
        let gpu = self.gpu(ordinal).map_err(internal)?;
        let host = Mem::Host(gpu.register_host(host.clone()).map_err(internal)?);
        let cuda_stream = gpu.stream().map_err(internal)?;
        Ok((gpu, host, cuda_stream))
    }

    /// Sets up publishing from GPU `ordinal` into stream `stream`: the
    /// stream's mirror on that GPU (made by the first such producer).
    pub fn publisher(
        &mut self,
        ordinal: u32,
        stream: usize,
        host: &Arc<Region>,
        slot_size: u64,
        slot_count: u32,
    ) -> Result<GpuPublish, Refusal> {
        let (gpu, host, cuda_stream) = self.attach(ordinal, stream, host)?;
        let (mirror, info) = match self.mirrors.get(&(stream, ordinal)) {
            Some(m) => m.clone(),
            None => {
                let m = self.pool(&gpu, slot_size, slot_count)?;
                crate::limited!(
                    INFO,
                    gpu = ordinal,
                    bytes = m.1.len,
                    "stream mirror allocated on the GPU"
                );
                self.mirrors.insert((stream, ordinal), m.clone());
                m
            }
        };
        Ok(GpuPublish::new(info, mirror, host, cuda_stream))
    }

    /// Sets up publishing from GPU `ordinal` into a stream homed on
    /// another host, through one producer's outbox `outbox` (`slots` slots
    /// of `slot_size` bytes): a mirror of the outbox on that GPU, of its
    /// own, and the outbox registered with the GPU for this producer alone.
    pub fn publisher_for_outbox(
        &mut self,
        ordinal: u32,
        outbox: &Arc<Region>,
        slot_size: u64,
        slots: u32,
    ) -> Result<GpuPublish, Refusal> {
        let (gpu, host, cuda_stream) = self.attach_own(ordinal, outbox)?;
        let (mirror, info) = self.pool(&gpu, slot_size, slots)?;
        Ok(GpuPublish::new(info, mirror, host, cuda_stream))
    }

    /// Where a GPU consumer copies a batch from: the mirror on `device`
    /// when the batch was published from there, else the host pool.
    pub fn source(&self, stream: usize, device: Option<u32>, slot: u32) -> Option<(Mem, u64)> {
        let (m, info) = self.mirrors.get(&(stream, device?))?;
        Some((m.clone(), slot as u64 * info.stride))
    }
}

/// Copies queued on one CUDA stream, in order, each with the descriptor
/// that may take effect once it (and so every copy before it) completed.
/// `None`: nothing to copy (an empty batch), but still in order.
struct Copies(VecDeque<(Desc, Option<Event>)>);

impl Copies {
    fn with_capacity(n: usize) -> Copies {
        Copies(VecDeque::with_capacity(n))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn push(&mut self, d: Desc, event: Option<Event>) {
        self.0.push_back((d, event));
    }

    /// The front descriptor, if its copy has completed.
    fn ready(&self) -> Result<Option<Desc>, CudaError> {
        match self.0.front() {
            Some((d, Some(e))) => Ok(e.is_done()?.then_some(*d)),
            Some((d, None)) => Ok(Some(*d)),
            None => Ok(None),
        }
    }

    fn pop(&mut self) {
        self.0.pop_front();
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// One consumer's GPU pool and the copies into it.
pub struct GpuDelivery {
    pub info: GpuPoolInfo,
    pool: Mem,
    host: Mem,
    free: Vec<u32>,
    stream: ferry_cuda::Stream,
    pending: Copies,
    /// Delivered and not released: GPU slot -> (partition, offset). Keyed
    /// by slot: a consumer of a stream homed elsewhere may hold the same
    /// batch twice (the home redelivered it after a reconnection), in two
    /// GPU slots.
    held: HashMap<u32, (u32, u64)>,
    pub copied_bytes: u64,
    /// Of those, copied from GPU memory (a producer's mirror).
    pub d2d_bytes: u64,
}

impl GpuDelivery {
    fn new(info: GpuPoolInfo, pool: Mem, host: Mem, stream: ferry_cuda::Stream) -> GpuDelivery {
        let slots = info.slots;
        GpuDelivery {
            info,
            pool,
            host,
            free: (0..slots).rev().collect(),
            stream,
            pending: Copies::with_capacity(slots as usize),
            held: HashMap::with_capacity(slots as usize),
            copied_bytes: 0,
            d2d_bytes: 0,
        }
    }

    /// Queues `d` (a descriptor with nothing to copy, such as an end of
    /// epoch) to be handed on after every copy queued before it.
    pub fn after_copies(&mut self, d: Desc) {
        self.pending.push(d, None);
    }
    /// Copies in flight.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Queues the copy of a batch (`d` is its descriptor; the payload is at
    /// `src_off` in the host pool, or at `from` when a producer published
    /// it from GPU memory). False when no GPU slot is free; an error when
    /// the driver refused the copy.
    pub fn start(
        &mut self,
        mut d: Desc,
        src_off: u64,
        from: Option<(Mem, u64)>,
    ) -> Result<bool, String> {
        let Some(dslot) = self.free.pop() else {
            return Ok(false);
        };
        let dst_off = dslot as u64 * self.info.stride;
        let event = if d.len == 0 {
            None
        } else {
            let (src, off) = match &from {
                Some((m, off)) => {
                    self.d2d_bytes += d.len;
                    (m, *off)
                }
                None => (&self.host, src_off),
            };
            match self.stream.copy(
                &self.pool,
                dst_off as usize,
                src,
                off as usize,
                d.len as usize,
            ) {
                Ok(e) => Some(e),
                Err(e) => {
                    self.free.push(dslot);
                    return Err(format!("copy to cuda:{}: {e}", self.info.ordinal));
                }
            }
        };
        d.flags |= desc::FLAG_DEVICE;
        d.dslot = dslot;
        self.copied_bytes += d.len;
        self.pending.push(d, event);
        Ok(true)
    }

    /// Hands the descriptors of finished copies, in delivery order, to
    /// `push` (which returns false when the ring cannot take one now).
    pub fn complete(&mut self, mut push: impl FnMut(&Desc) -> bool) -> Result<usize, String> {
        let mut n = 0;
        while let Some(d) = self
            .pending
            .ready()
            .map_err(|e| format!("copy to cuda:{}: {e}", self.info.ordinal))?
        {
            if !push(&d) {
                break;
            }
            self.pending.pop();
            if d.op == desc::OP_DELIVER {
                self.held.insert(d.dslot, (d.partition, d.offset));
            }
            n += 1;
        }
        Ok(n)
    }

    /// The consumer released (`part`, `offset`) from GPU slot `dslot`:
    /// checked before the group's own bookkeeping sees the release.
    pub fn release(&mut self, part: u32, offset: u64, dslot: u32) -> Result<(), Violation> {
        match self.held.get(&dslot) {
            Some(&held) if held == (part, offset) => {
                self.held.remove(&dslot);
                self.free.push(dslot);
                Ok(())
            }
            Some(&(p, o)) => Err(Violation(format!(
                "release of partition {part} offset {offset} names GPU slot {dslot}, which holds partition {p} offset {o}"
            ))),
            None => Err(Violation(format!(
                "release of partition {part} offset {offset} names GPU slot {dslot}, which holds no batch delivered to this GPU consumer"
            ))),
        }
    }

    /// Waits for every copy in flight (before the host slots they read can
    /// go to anybody else).
    pub fn quiesce(&mut self) {
        let _ = self.stream.synchronize();
        self.pending.clear();
    }
}

/// A producer publishing from GPU memory: the stream's mirror on its GPU,
/// and the copies of its batches to the host pool, in publish order.
pub struct GpuPublish {
    pub info: GpuPoolInfo,
    mirror: Mem,
    host: Mem,
    stream: ferry_cuda::Stream,
    pending: Copies,
    pub copied_bytes: u64,
}

impl GpuPublish {
    fn new(info: GpuPoolInfo, mirror: Mem, host: Mem, stream: ferry_cuda::Stream) -> GpuPublish {
        GpuPublish {
            pending: Copies::with_capacity(info.slots as usize),
            info,
            mirror,
            host,
            stream,
            copied_bytes: 0,
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Queues a publish. With `FLAG_DEVICE` the payload is copied from the
    /// mirror slot to the host slot at `host_off` first; the publish takes
    /// effect (`complete`) after that copy, and after every publish queued
    /// before it.
    pub fn queue(&mut self, d: Desc, host_off: u64) -> Result<(), String> {
        let event = if d.flags & desc::FLAG_DEVICE != 0 && d.len > 0 {
            let src = d.slot as u64 * self.info.stride;
            let e = self
                .stream
                .copy(
                    &self.host,
                    host_off as usize,
                    &self.mirror,
                    src as usize,
                    d.len as usize,
                )
                .map_err(|e| format!("copy from cuda:{}: {e}", self.info.ordinal))?;
            self.copied_bytes += d.len;
            Some(e)
        } else {
            None
        };
        self.pending.push(d, event);
        Ok(())
    }

    /// Hands the publishes whose copies finished, in order, to `publish`.
    pub fn complete(
        &mut self,
        mut publish: impl FnMut(&Desc) -> Result<(), Violation>,
    ) -> Result<usize, String> {
        let mut n = 0;
        while let Some(d) = self
            .pending
            .ready()
            .map_err(|e| format!("copy from cuda:{}: {e}", self.info.ordinal))?
        {
            self.pending.pop();
            publish(&d).map_err(|v| v.0)?;
            n += 1;
        }
        Ok(n)
    }

    /// Waits for every copy in flight, then completes every publish.
    pub fn finish(
        &mut self,
        publish: impl FnMut(&Desc) -> Result<(), Violation>,
    ) -> Result<usize, String> {
        self.stream
            .synchronize()
            .map_err(|e| format!("cuda:{}: {e}", self.info.ordinal))?;
        self.complete(publish)
    }
}
