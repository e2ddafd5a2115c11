//! GPU memory: device buffers (cuMemAlloc, SYNC_MEMOPS set so the NIC can
//! register them), CUDA IPC handles for trainer processes, dma-buf export,
//! pinned host memory for staging, and asynchronous copies on streams with
//! events. Every driver call is checked; ranges are bounds-checked before
//! any copy. Written without a GPU at hand: `tests/gpu.rs` (ignored unless
//! run with `--ignored` on a GPU machine) exercises all of it.

use std::ffi::{c_int, c_uint, c_void};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::{result, sys};

use crate::CudaError;

fn driver(what: &str) -> impl Fn(result::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver(format!("{what}: {e:?}"))
}

fn range(len: usize, offset: usize, n: usize) -> Result<(), CudaError> {
    match offset.checked_add(n) {
        Some(end) if end <= len => Ok(()),
        _ => Err(CudaError::Driver(format!(
            "range {offset}+{n} outside a {len}-byte buffer"
        ))),
    }
}

/// One GPU, through its primary context.
pub struct Gpu {
    pub ordinal: u32,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a primary context may be made current on any thread; all use of
// `ctx` goes through cuCtxSetCurrent first.
unsafe impl Send for Gpu {}
// SAFETY: as for Send; the handle is never mutated.
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Opens GPU `ordinal`. `NotPresent` without a driver or that GPU.
    pub fn open(ordinal: u32) -> Result<Arc<Gpu>, CudaError> {
        let probe = crate::probe()?;
        if ordinal as usize >= probe.gpus.len() {
            return Err(CudaError::NotPresent(format!(
                "there is no cuda:{ordinal} (this host has {} GPU(s))",
                probe.gpus.len()
            )));
        }
        let dev = result::device::get(ordinal as c_int).map_err(driver("cuDeviceGet"))?;
        // SAFETY: dev is a valid device (from cuDeviceGet); the retained
        // context is released in Drop.
        let ctx = unsafe { result::primary_ctx::retain(dev) }
            .map_err(driver("cuDevicePrimaryCtxRetain"))?;
        let gpu = Arc::new(Gpu { ordinal, dev, ctx });
        gpu.bind()?;
        Ok(gpu)
    }

    /// Makes this GPU's context current on the calling thread.
    pub fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: ctx is a live primary context (retained until Drop).
        unsafe { result::ctx::set_current(self.ctx) }.map_err(driver("cuCtxSetCurrent"))
    }

    /// Device memory from cuMemAlloc with SYNC_MEMOPS set.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DeviceBuffer, CudaError> {
        if len == 0 {
            return Err(CudaError::Driver("zero-byte allocation".into()));
        }
        self.bind()?;
        // SAFETY: the context is current; the pointer is freed in Drop.
        let ptr = unsafe { result::malloc_sync(len) }.map_err(driver("cuMemAlloc"))?;
        let buf = DeviceBuffer {
            gpu: self.clone(),
            ptr,
            len,
        };
        let one: c_uint = 1;
        // SAFETY: ptr is a live allocation; the attribute value is a live
        // unsigned int, as cuPointerSetAttribute(SYNC_MEMOPS) expects.
        unsafe {
            sys::cuPointerSetAttribute(
                (&one as *const c_uint).cast::<c_void>(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_SYNC_MEMOPS,
                ptr,
            )
        }
        .result()
        .map_err(driver("cuPointerSetAttribute(SYNC_MEMOPS)"))?;
        Ok(buf)
    }

    /// Page-locked host memory for staging copies.
    pub fn alloc_pinned(self: &Arc<Self>, len: usize) -> Result<PinnedBuffer, CudaError> {
        if len == 0 {
            return Err(CudaError::Driver("zero-byte allocation".into()));
        }
        self.bind()?;
        // SAFETY: the context is current; the memory is freed in Drop.
        let ptr = unsafe { result::malloc_host(len, 0) }.map_err(driver("cuMemHostAlloc"))?;
        Ok(PinnedBuffer {
            gpu: self.clone(),
            ptr: ptr.cast(),
            len,
        })
    }

    /// Page-locks `mem` (cuMemHostRegister) so copies from and to it run
    /// as asynchronous DMA. Where the driver refuses (some kernels will not
    /// pin shared mappings), the range still works for copies, which then
    /// go through the driver's own staging: `HostRange::pinned` says which.
    pub fn register_host(
        self: &Arc<Self>,
        mem: Arc<dyn HostMemory>,
    ) -> Result<Arc<HostRange>, CudaError> {
        let (ptr, len) = mem.host_range();
        if len == 0 {
            return Err(CudaError::Driver("registering an empty host range".into()));
        }
        self.bind()?;
        // SAFETY: [ptr, ptr+len) is mapped for as long as `mem` lives (the
        // HostMemory contract), and the HostRange keeps `mem` alive until
        // after it unregisters.
        let r =
            unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE) };
        // Registered before (portable: for every GPU) counts as pinned,
        // but the registration is not ours to undo.
        let already = r == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
        Ok(Arc::new(HostRange {
            gpu: self.clone(),
            _mem: mem,
            ptr,
            len,
            pinned: r == sys::CUresult::CUDA_SUCCESS || already,
            registered: r == sys::CUresult::CUDA_SUCCESS,
        }))
    }

    pub fn stream(self: &Arc<Self>) -> Result<Stream, CudaError> {
        self.bind()?;
        let s = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(driver("cuStreamCreate"))?;
        Ok(Stream {
            gpu: self.clone(),
            s,
        })
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: releases the retain taken in `open`.
        unsafe {
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

/// Copies between host bytes and device memory at `ptr` (bounds-checked).
fn write_device(
    gpu: &Gpu,
    ptr: sys::CUdeviceptr,
    len: usize,
    offset: usize,
    data: &[u8],
) -> Result<(), CudaError> {
    range(len, offset, data.len())?;
    gpu.bind()?;
    // SAFETY: [ptr+offset, +data.len()) lies inside the allocation (checked).
    unsafe { result::memcpy_htod_sync(ptr + offset as u64, data) }.map_err(driver("cuMemcpyHtoD"))
}

fn read_device(
    gpu: &Gpu,
    ptr: sys::CUdeviceptr,
    len: usize,
    offset: usize,
    out: &mut [u8],
) -> Result<(), CudaError> {
    range(len, offset, out.len())?;
    gpu.bind()?;
    // SAFETY: as in write_device.
    unsafe { result::memcpy_dtoh_sync(out, ptr + offset as u64) }.map_err(driver("cuMemcpyDtoH"))
}

/// GPU memory owned by this process.
pub struct DeviceBuffer {
    gpu: Arc<Gpu>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

/// A CUDA IPC memory handle (opaque bytes another process opens with
/// [`IpcMapping::open`]) and where the buffer starts in the allocation the
/// handle names: the driver may place small buffers inside a larger
/// allocation, and a handle always maps the whole allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcHandle {
    pub handle: [u8; 64],
    pub offset: u64,
}

impl DeviceBuffer {
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    pub fn ordinal(&self) -> u32 {
        self.gpu.ordinal
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), CudaError> {
        write_device(&self.gpu, self.ptr, self.len, offset, data)
    }

    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), CudaError> {
        read_device(&self.gpu, self.ptr, self.len, offset, out)
    }

    /// The handle a trainer process opens to see this memory.
    pub fn ipc_handle(&self) -> Result<IpcHandle, CudaError> {
        self.gpu.bind()?;
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: live out-parameters; ptr is a live allocation.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, self.ptr) }
            .result()
            .map_err(driver("cuMemGetAddressRange"))?;
        if base > self.ptr || (self.ptr - base) as usize + self.len > size {
            return Err(CudaError::Driver(format!(
                "cuMemGetAddressRange: {base:#x}+{size} does not contain the buffer"
            )));
        }
        // SAFETY: CUipcMemHandle is plain bytes; zero is a valid value.
        let mut h: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
        // SAFETY: h is a live out-parameter; ptr is a live allocation.
        unsafe { sys::cuIpcGetMemHandle(&mut h, self.ptr) }
            .result()
            .map_err(driver("cuIpcGetMemHandle"))?;
        Ok(IpcHandle {
            handle: h.reserved.map(|c| c as u8),
            offset: self.ptr - base,
        })
    }

    /// Exports the whole buffer as a dma-buf fd (for NIC registration).
    /// Devices without dma-buf support answer `NotPresent`.
    pub fn export_dmabuf(&self) -> Result<OwnedFd, CudaError> {
        self.gpu.bind()?;
        let mut fd: c_int = -1;
        // SAFETY: fd is a live out-parameter of the size the driver writes
        // for CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD (an int); the range is the
        // whole live allocation.
        let r = unsafe {
            sys::cuMemGetHandleForAddressRange(
                (&mut fd as *mut c_int).cast::<c_void>(),
                self.ptr,
                self.len,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        };
        match r.result() {
            // SAFETY: the driver returned a fresh fd that we now own.
            Ok(()) if fd >= 0 => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Ok(()) => Err(CudaError::Driver(
                "cuMemGetHandleForAddressRange returned no fd".into(),
            )),
            Err(e) if r == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED => Err(CudaError::NotPresent(
                format!("dma-buf export on cuda:{}: {e:?}", self.gpu.ordinal),
            )),
            Err(e) => Err(CudaError::Driver(format!(
                "cuMemGetHandleForAddressRange: {e:?}"
            ))),
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        // SAFETY: frees the allocation made in Gpu::alloc, once.
        unsafe {
            let _ = result::free_sync(self.ptr);
        }
    }
}

/// Another process's GPU memory, opened through its IPC handle.
pub struct IpcMapping {
    gpu: Arc<Gpu>,
    /// What cuIpcOpenMemHandle returned (closed on drop).
    base: sys::CUdeviceptr,
    /// The buffer: base + the handle's offset.
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl IpcMapping {
    /// Opens `handle` (of a buffer of `len` bytes) on `gpu`.
    pub fn open(gpu: &Arc<Gpu>, handle: &IpcHandle, len: usize) -> Result<IpcMapping, CudaError> {
        gpu.bind()?;
        // SAFETY: CUipcMemHandle is plain bytes.
        let mut h: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
        for (d, s) in h.reserved.iter_mut().zip(handle.handle) {
            *d = s as _;
        }
        let mut base: sys::CUdeviceptr = 0;
        // SAFETY: ptr is a live out-parameter; the handle bytes came from
        // cuIpcGetMemHandle in the exporting process (the driver validates).
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut base,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as c_uint,
            )
        }
        .result()
        .map_err(driver("cuIpcOpenMemHandle"))?;
        let m = IpcMapping {
            gpu: gpu.clone(),
            base,
            ptr: base + handle.offset,
            len,
        };
        // The mapping must hold offset + len bytes.
        let (mut b, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: live out-parameters; base is the live mapping.
        unsafe { sys::cuMemGetAddressRange_v2(&mut b, &mut size, base) }
            .result()
            .map_err(driver("cuMemGetAddressRange"))?;
        match (handle.offset as usize).checked_add(len) {
            Some(end) if b == base && end <= size => Ok(m),
            _ => Err(CudaError::Driver(format!(
                "IPC mapping of {size} bytes cannot hold {len} bytes at offset {}",
                handle.offset
            ))),
        }
    }

    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), CudaError> {
        write_device(&self.gpu, self.ptr, self.len, offset, data)
    }

    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), CudaError> {
        read_device(&self.gpu, self.ptr, self.len, offset, out)
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        // SAFETY: closes the mapping opened in `open`, once.
        unsafe {
            sys::cuIpcCloseMemHandle(self.base);
        }
    }
}

/// Page-locked host memory.
pub struct PinnedBuffer {
    gpu: Arc<Gpu>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access only reads (as_slice); writing needs &mut.
unsafe impl Sync for PinnedBuffer {}

// SAFETY: PinnedBuffer's memory stays mapped until it is dropped.
unsafe impl HostMemory for PinnedBuffer {
    fn host_range(&self) -> (*mut u8, usize) {
        (self.ptr, self.len)
    }
}

impl PinnedBuffer {
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is our allocation, alive until Drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        // SAFETY: frees the allocation made in alloc_pinned, once.
        unsafe {
            let _ = result::free_host(self.ptr.cast());
        }
    }
}

/// Host memory that stays mapped at one address for as long as the value
/// lives: what [`Gpu::register_host`] may page-lock and copies may read.
///
/// # Safety
/// `host_range` must return the same mapped, readable and writable range
/// on every call, valid until the value is dropped.
pub unsafe trait HostMemory: Send + Sync + 'static {
    fn host_range(&self) -> (*mut u8, usize);
}

// SAFETY: a Region's mapping is made once at creation, read-write for the
// daemon's regions, and unmapped only in its Drop.
unsafe impl HostMemory for ferry_shm::Region {
    fn host_range(&self) -> (*mut u8, usize) {
        (self.as_ptr(), self.len())
    }
}

/// Host memory known to the driver (page-locked where it allowed).
pub struct HostRange {
    gpu: Arc<Gpu>,
    _mem: Arc<dyn HostMemory>,
    ptr: *mut u8,
    len: usize,
    /// Page-locked: copies are true asynchronous DMA.
    pub pinned: bool,
    /// This value registered the range (and unregisters it on drop).
    registered: bool,
}

// SAFETY: the range is plain memory kept alive by `_mem` (Send + Sync);
// this value only passes its address to the driver.
unsafe impl Send for HostRange {}
// SAFETY: as for Send.
unsafe impl Sync for HostRange {}

impl HostRange {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostRange {
    fn drop(&mut self) {
        if self.registered {
            let _ = self.gpu.bind();
            // SAFETY: undoes the registration made in register_host, once,
            // before `_mem` (which keeps the mapping) is dropped.
            unsafe {
                sys::cuMemHostUnregister(self.ptr.cast());
            }
        }
    }
}

/// One side of a copy: memory kept alive by the [`Event`] of every copy
/// that touches it.
#[derive(Clone)]
pub enum Mem {
    Host(Arc<HostRange>),
    Pinned(Arc<PinnedBuffer>),
    Device(Arc<DeviceBuffer>),
    Mapped(Arc<IpcMapping>),
}

enum Addr {
    Host(*mut u8),
    Device(sys::CUdeviceptr, sys::CUcontext, u32),
}

impl Mem {
    pub fn len(&self) -> usize {
        match self {
            Mem::Host(h) => h.len,
            Mem::Pinned(p) => p.len,
            Mem::Device(d) => d.len,
            Mem::Mapped(m) => m.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn addr(&self, offset: usize) -> Addr {
        match self {
            Mem::Host(h) => Addr::Host(h.ptr.wrapping_add(offset)),
            Mem::Pinned(p) => Addr::Host(p.ptr.wrapping_add(offset)),
            Mem::Device(d) => Addr::Device(d.ptr + offset as u64, d.gpu.ctx, d.gpu.ordinal),
            Mem::Mapped(m) => Addr::Device(m.ptr + offset as u64, m.gpu.ctx, m.gpu.ordinal),
        }
    }
}

/// A CUDA stream for asynchronous copies.
pub struct Stream {
    gpu: Arc<Gpu>,
    s: sys::CUstream,
}

/// Marks the completion of the copy queued before it on a stream, and
/// keeps both sides of that copy alive until it completed: dropping an
/// unfinished event waits for it.
pub struct Event {
    gpu: Arc<Gpu>,
    e: sys::CUevent,
    _keep: [Mem; 2],
}

impl Stream {
    /// Queues a copy of `len` bytes from `src[src_off..]` to
    /// `dst[dst_off..]` (host to device, device to host, or device to
    /// device, also across GPUs) and returns the event that completes with
    /// it. Both ranges are bounds-checked; the event keeps both memories
    /// alive. The bytes of `src` should not change until the event is done
    /// (they are shared memory: a change is a torn copy, never a fault).
    pub fn copy(
        &self,
        dst: &Mem,
        dst_off: usize,
        src: &Mem,
        src_off: usize,
        len: usize,
    ) -> Result<Event, CudaError> {
        range(dst.len(), dst_off, len)?;
        range(src.len(), src_off, len)?;
        self.gpu.bind()?;
        let r = match (dst.addr(dst_off), src.addr(src_off)) {
            // SAFETY (all arms): both ranges were checked against live
            // allocations, which the returned event keeps alive (and waits
            // for on drop) until the copy finished.
            (Addr::Device(d, _, _), Addr::Host(h)) => unsafe {
                sys::cuMemcpyHtoDAsync_v2(d, h.cast_const().cast(), len, self.s)
            },
            (Addr::Host(h), Addr::Device(d, _, _)) => unsafe {
                sys::cuMemcpyDtoHAsync_v2(h.cast(), d, len, self.s)
            },
            (Addr::Device(d, _, dg), Addr::Device(s, _, sg)) if dg == sg => unsafe {
                sys::cuMemcpyDtoDAsync_v2(d, s, len, self.s)
            },
            (Addr::Device(d, dctx, _), Addr::Device(s, sctx, _)) => unsafe {
                sys::cuMemcpyPeerAsync(d, dctx, s, sctx, len, self.s)
            },
            (Addr::Host(_), Addr::Host(_)) => {
                return Err(CudaError::Driver(
                    "host-to-host copies do not go through CUDA".into(),
                ))
            }
        };
        r.result().map_err(driver("cuMemcpyAsync"))?;
        let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(driver("cuEventCreate"))?;
        let ev = Event {
            gpu: self.gpu.clone(),
            e,
            _keep: [dst.clone(), src.clone()],
        };
        // SAFETY: event and stream are live.
        unsafe { result::event::record(ev.e, self.s) }.map_err(driver("cuEventRecord"))?;
        Ok(ev)
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.gpu.bind()?;
        // SAFETY: the stream is live.
        unsafe { result::stream::synchronize(self.s) }.map_err(driver("cuStreamSynchronize"))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        // SAFETY: waits for queued work, then destroys the stream once.
        unsafe {
            let _ = result::stream::synchronize(self.s);
            let _ = result::stream::destroy(self.s);
        }
    }
}

impl Event {
    /// True once the work before the event finished.
    pub fn is_done(&self) -> Result<bool, CudaError> {
        let _ = self.gpu.bind();
        // SAFETY: the event is live.
        match unsafe { sys::cuEventQuery(self.e) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => Err(CudaError::Driver(format!("cuEventQuery: {other:?}"))),
        }
    }

    /// Waits for the event.
    pub fn wait(&self) -> Result<(), CudaError> {
        self.gpu.bind()?;
        // SAFETY: the event is live.
        unsafe { result::event::synchronize(self.e) }.map_err(driver("cuEventSynchronize"))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        // SAFETY: waits until the copy no longer touches the memories kept
        // in `_keep` (dropped after this), then destroys the event once.
        unsafe {
            let _ = result::event::synchronize(self.e);
            let _ = result::event::destroy(self.e);
        }
    }
}
