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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use ferry_cuda::{CudaError, Event, Gpu, Mem, Probe};
use ferry_shm::desc::{self, Desc};
use ferry_shm::proto::{ErrorCode, GpuPoolInfo};
use ferry_shm::Region;
use tracing::info;

use crate::stream::Violation;

/// GPU slots start on this boundary, so that any dtype a trainer views
/// them as is aligned.
const STRIDE_ALIGN: u64 = 4096;

/// The GPUs ferryd found, opened lazily when a consumer first asks.
pub struct Gpus {
    pub probe: Result<Probe, CudaError>,
    open: HashMap<u32, Arc<Gpu>>,
    /// Each stream's host pool, registered with each GPU that reads it.
    hosts: HashMap<(u32, usize), Mem>,
}

impl Gpus {
    pub fn new(probe: Result<Probe, CudaError>) -> Gpus {
        Gpus {
            probe,
            open: HashMap::new(),
            hosts: HashMap::new(),
        }
    }

    /// ferryd's ordinal of the GPU a consumer asked for: by PCI bus id when
    /// given (ordinals differ between processes), else by ordinal.
    pub fn resolve(
        &self,
        ordinal: Option<u32>,
        bus: Option<&str>,
    ) -> Result<u32, (ErrorCode, String)> {
        let what = match (bus, ordinal) {
            (Some(b), _) => format!("the GPU at PCI {b}"),
            (None, Some(n)) => format!("cuda:{n}"),
            (None, None) => "a GPU".to_string(),
        };
        let p = match &self.probe {
            Ok(p) => p,
            Err(e) => {
                return Err((
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
            (
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

    /// Sets up GPU delivery of stream `stream` (host pool `host`) to one
    /// consumer: `slots` GPU slots of at least `slot_size` bytes.
    pub fn delivery(
        &mut self,
        ordinal: u32,
        stream: usize,
        host: &Arc<Region>,
        slot_size: u64,
        slots: u32,
    ) -> Result<GpuDelivery, (ErrorCode, String)> {
        let internal = |e: CudaError| (ErrorCode::Internal, format!("cuda:{ordinal}: {e}"));
        let gpu = self.gpu(ordinal).map_err(internal)?;
        let host = match self.hosts.get(&(ordinal, stream)) {
            Some(m) => m.clone(),
            None => {
                let r = gpu.register_host(host.clone()).map_err(internal)?;
                info!(
                    gpu = ordinal,
                    bytes = r.len(),
                    pinned = r.pinned,
                    "stream pool registered with the GPU"
                );
                let m = Mem::Host(r);
                self.hosts.insert((ordinal, stream), m.clone());
                m
            }
        };
        let stride = slot_size.max(1).div_ceil(STRIDE_ALIGN) * STRIDE_ALIGN;
        let len = stride
            .checked_mul(slots as u64)
            .filter(|&l| l <= usize::MAX as u64)
            .ok_or((
                ErrorCode::InvalidArgument,
                "GPU pool size overflows".to_string(),
            ))?;
        let pool = gpu.alloc(len as usize).map_err(|e| {
            (
                ErrorCode::Limit,
                format!("allocating a {len}-byte GPU pool on cuda:{ordinal}: {e}"),
            )
        })?;
        let handle = pool.ipc_handle().map_err(internal)?;
        let stream = gpu.stream().map_err(internal)?;
        let pci_bus_id = match &self.probe {
            Ok(p) => p
                .gpus
                .iter()
                .find(|g| g.ordinal == ordinal)
                .map(|g| g.pci_bus_id.clone())
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        Ok(GpuDelivery {
            info: GpuPoolInfo {
                ordinal,
                pci_bus_id,
                ipc_handle: handle.0.to_vec(),
                len,
                stride,
                slots,
            },
            pool: Mem::Device(Arc::new(pool)),
            host,
            free: (0..slots).rev().collect(),
            stream,
            pending: VecDeque::with_capacity(slots as usize),
            held: HashMap::with_capacity(slots as usize),
            copied_bytes: 0,
        })
    }
}

struct Pending {
    desc: Desc,
    event: Option<Event>,
}

/// One consumer's GPU pool and the copies into it.
pub struct GpuDelivery {
    pub info: GpuPoolInfo,
    pool: Mem,
    host: Mem,
    free: Vec<u32>,
    stream: ferry_cuda::Stream,
    pending: VecDeque<Pending>,
    /// Delivered and not released: (partition, offset) -> GPU slot.
    held: HashMap<(u32, u64), u32>,
    pub copied_bytes: u64,
}

impl GpuDelivery {
    /// Copies in flight.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Queues the copy of a batch (`d` is its descriptor, host slot
    /// payload at `src_off` in the host pool). False when no GPU slot is
    /// free; an error when the driver refused the copy.
    pub fn start(&mut self, mut d: Desc, src_off: u64) -> Result<bool, String> {
        let Some(dslot) = self.free.pop() else {
            return Ok(false);
        };
        let dst_off = dslot as u64 * self.info.stride;
        let event = if d.len == 0 {
            None
        } else {
            match self.stream.copy(
                &self.pool,
                dst_off as usize,
                &self.host,
                src_off as usize,
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
        self.pending.push_back(Pending { desc: d, event });
        Ok(true)
    }

    /// Hands the descriptors of finished copies, in delivery order, to
    /// `push` (which returns false when the ring cannot take one now).
    pub fn complete(&mut self, mut push: impl FnMut(&Desc) -> bool) -> Result<usize, String> {
        let mut n = 0;
        while let Some(front) = self.pending.front() {
            if let Some(e) = &front.event {
                match e.is_done() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => return Err(format!("copy to cuda:{}: {e}", self.info.ordinal)),
                }
            }
            if !push(&front.desc) {
                break;
            }
            let p = self.pending.pop_front().expect("front exists");
            self.held
                .insert((p.desc.partition, p.desc.offset), p.desc.dslot);
            n += 1;
        }
        Ok(n)
    }

    /// The consumer released (`part`, `offset`) from GPU slot `dslot`:
    /// checked before the group's own bookkeeping sees the release.
    pub fn release(&mut self, part: u32, offset: u64, dslot: u32) -> Result<(), Violation> {
        match self.held.get(&(part, offset)) {
            Some(&s) if s == dslot => {
                self.held.remove(&(part, offset));
                self.free.push(dslot);
                Ok(())
            }
            Some(&s) => Err(Violation(format!(
                "release of partition {part} offset {offset} names GPU slot {dslot}; it was delivered in GPU slot {s}"
            ))),
            None => Err(Violation(format!(
                "release of partition {part} offset {offset}, which was not delivered to this GPU consumer"
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
