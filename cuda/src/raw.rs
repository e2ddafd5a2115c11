//! The CUDA driver calls, all unsafe, all here.

use std::ffi::{c_char, c_int, CStr};

use cudarc::driver::{result, sys};

use crate::{CudaError, GpuInfo, Probe};

fn driver(e: impl std::fmt::Debug) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

pub(crate) fn probe() -> Result<Probe, CudaError> {
    // SAFETY: only tries to load the library; calls nothing in it.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::NotPresent(
            "libcuda.so could not be loaded".into(),
        ));
    }
    result::init().map_err(|e| CudaError::NotPresent(format!("cuInit failed: {e:?}")))?;
    let mut version: c_int = 0;
    // SAFETY: a live out-pointer; the library is loaded and initialised.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(driver)?;
    let count = result::device::get_count().map_err(driver)?;
    let mut gpus = Vec::new();
    for ordinal in 0..count {
        let dev = result::device::get(ordinal).map_err(driver)?;
        let name = result::device::get_name(dev).map_err(driver)?;
        let mut bus = [0 as c_char; 32];
        // SAFETY: `bus` has room for 32 bytes including the NUL the driver
        // writes; dev is a valid device handle.
        unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as c_int, dev) }
            .result()
            .map_err(driver)?;
        // SAFETY: NUL-terminated by the driver within the buffer.
        let pci_bus_id = unsafe { CStr::from_ptr(bus.as_ptr()) }
            .to_string_lossy()
            .to_lowercase();
        // SAFETY: dev is valid (from cuDeviceGet).
        let total_memory = unsafe { result::device::total_mem(dev) }.map_err(driver)? as u64;
        let attr = |a: sys::CUdevice_attribute| -> bool {
            // SAFETY: dev is valid; an unsupported attribute is an error,
            // read as "no".
            unsafe { result::device::get_attribute(dev, a) }
                .map(|v| v != 0)
                .unwrap_or(false)
        };
        gpus.push(GpuInfo {
            ordinal: ordinal as u32,
            name,
            pci_bus_id,
            total_memory,
            dma_buf: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED),
            gpudirect_rdma: attr(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED,
            ),
        });
    }
    Ok(Probe {
        driver_version: version,
        gpus,
    })
}
