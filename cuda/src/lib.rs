//! Ferry's GPU side, through cudarc with run-time loading: on a host
//! without the CUDA driver every entry point reports "not present" cleanly
//! (no panic, no link error). Knows nothing of verbs.
//!
//! What exists: the probe (devices, PCI bus ids, memory, dma-buf export and
//! GPUDirect RDMA support, driver version) and the memory primitives in
//! [`gpu`]: device buffers, IPC handles, dma-buf export, pinned and
//! registered host memory, asynchronous copies with events that keep both
//! sides of a copy alive. ferryd uses them for GPU delivery, libferry to
//! open a consumer's GPU pool. `tests/gpu.rs` (ignored) runs them on a GPU
//! machine; `scripts/test.sh` also runs them against the fake driver in
//! `tests/fakecuda` (host memory standing in for device memory), which
//! checks Ferry's logic but not the real driver.

pub mod gpu;
mod raw;

pub use gpu::{
    DeviceBuffer, Event, Gpu, HostMemory, HostRange, IpcHandle, IpcMapping, Mem, PinnedBuffer,
    Stream,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No CUDA driver library on this host (or it would not initialise).
    #[error("CUDA not present: {0}")]
    NotPresent(String),
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
}

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub ordinal: u32,
    pub name: String,
    /// PCI address like "0000:17:00.0" (lower case, as sysfs writes it).
    pub pci_bus_id: String,
    pub total_memory: u64,
    /// The device can export its memory as a dma-buf
    /// (cuMemGetHandleForAddressRange), which NICs can register.
    pub dma_buf: bool,
    pub gpudirect_rdma: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// e.g. 12080 for CUDA 12.8.
    pub driver_version: i32,
    pub gpus: Vec<GpuInfo>,
}

/// Looks for the CUDA driver and its devices. `Err(NotPresent)` on a host
/// without it, never a panic.
pub fn probe() -> Result<Probe, CudaError> {
    raw::probe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics() {
        match probe() {
            Ok(p) => assert!(p.driver_version > 0),
            Err(CudaError::NotPresent(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}
