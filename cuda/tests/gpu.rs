//! GPU-gated: run with `--ignored` on a machine with a CUDA GPU.

#[test]
#[ignore = "requires a CUDA GPU (run with --ignored on a GPU machine)"]
fn probe_finds_gpus_with_pci_ids_and_memory() {
    let p = ferry_cuda::probe().expect("a CUDA driver");
    assert!(p.driver_version >= 12000, "{p:?}");
    assert!(!p.gpus.is_empty(), "{p:?}");
    for g in &p.gpus {
        assert!(
            g.pci_bus_id.contains(':') && g.total_memory > (1 << 30),
            "{g:?}"
        );
    }
    println!("{p:#?}");
}

#[test]
fn without_a_driver_probe_says_not_present() {
    if std::path::Path::new("/dev/nvidiactl").exists()
        || std::env::var_os("FERRY_FAKE_CUDA").is_some()
    {
        return; // a driver is present: covered by the ignored test above
    }
    match ferry_cuda::probe() {
        Err(ferry_cuda::CudaError::NotPresent(why)) => {
            assert!(why.contains("libcuda") || why.contains("cuInit"), "{why}")
        }
        other => panic!("expected NotPresent on a host without a GPU, got {other:?}"),
    }
}

#[test]
fn opening_a_gpu_without_one_is_not_present() {
    if std::path::Path::new("/dev/nvidiactl").exists()
        || std::env::var_os("FERRY_FAKE_CUDA").is_some()
    {
        return; // a driver is present: covered by the ignored tests
    }
    assert!(matches!(
        ferry_cuda::Gpu::open(0),
        Err(ferry_cuda::CudaError::NotPresent(_))
    ));
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

#[test]
#[ignore = "requires a CUDA GPU (run with --ignored on a GPU machine)"]
fn device_buffer_round_trip_and_bounds() {
    let gpu = ferry_cuda::Gpu::open(0).unwrap();
    let buf = gpu.alloc(1 << 20).unwrap();
    let data = pattern(1 << 20, 3);
    buf.write(0, &data).unwrap();
    let mut back = vec![0u8; 1 << 20];
    buf.read(0, &mut back).unwrap();
    assert!(back == data, "every byte back from the GPU");
    assert!(
        buf.write((1 << 20) - 4, &[0; 8]).is_err(),
        "writes past the end are refused"
    );
    assert!(buf.read(usize::MAX, &mut [0; 1]).is_err());
}

/// The child half of the IPC test: opens the parent's buffer, checks it,
/// writes an answer. Does nothing unless the parent started it.
#[test]
#[ignore = "requires a CUDA GPU; started by ipc_hand_off_to_another_process"]
fn ipc_child() {
    let Ok(hex) = std::env::var("FERRY_TEST_IPC_HANDLE") else {
        return;
    };
    let len: usize = std::env::var("FERRY_TEST_IPC_LEN")
        .unwrap()
        .parse()
        .unwrap();
    let bytes: Vec<u8> = (0..64)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let offset: u64 = std::env::var("FERRY_TEST_IPC_OFFSET")
        .unwrap()
        .parse()
        .unwrap();
    let handle = ferry_cuda::IpcHandle {
        handle: bytes.try_into().unwrap(),
        offset,
    };
    let gpu = ferry_cuda::Gpu::open(0).unwrap();
    let map = ferry_cuda::IpcMapping::open(&gpu, &handle, len).unwrap();
    let mut seen = vec![0u8; len];
    map.read(0, &mut seen).unwrap();
    assert!(seen == pattern(len, 7), "the child sees the parent's bytes");
    map.write(0, &pattern(len, 9)).unwrap();
}

#[test]
#[ignore = "requires a CUDA GPU (run with --ignored on a GPU machine)"]
fn ipc_hand_off_to_another_process() {
    let gpu = ferry_cuda::Gpu::open(0).unwrap();
    let len = 4 << 20;
    let buf = gpu.alloc(len).unwrap();
    buf.write(0, &pattern(len, 7)).unwrap();
    let h = buf.ipc_handle().unwrap();
    let hex: String = h.handle.iter().map(|b| format!("{b:02x}")).collect();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "ipc_child", "--ignored", "--nocapture"])
        .env("FERRY_TEST_IPC_HANDLE", hex)
        .env("FERRY_TEST_IPC_LEN", len.to_string())
        .env("FERRY_TEST_IPC_OFFSET", h.offset.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "child failed");
    let mut back = vec![0u8; len];
    buf.read(0, &mut back).unwrap();
    assert!(
        back == pattern(len, 9),
        "the parent sees the child's answer"
    );
}

#[test]
#[ignore = "requires a CUDA GPU (run with --ignored on a GPU machine)"]
fn dmabuf_export_where_supported() {
    let probe = ferry_cuda::probe().unwrap();
    let gpu = ferry_cuda::Gpu::open(0).unwrap();
    let buf = gpu.alloc(2 << 20).unwrap();
    match buf.export_dmabuf() {
        Ok(fd) => {
            assert!(
                probe.gpus[0].dma_buf,
                "export worked though the attribute says no"
            );
            use std::os::fd::AsRawFd;
            assert!(fd.as_raw_fd() >= 0);
        }
        Err(ferry_cuda::CudaError::NotPresent(why)) => assert!(!probe.gpus[0].dma_buf, "{why}"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
#[ignore = "requires a CUDA GPU (run with --ignored on a GPU machine)"]
fn pinned_staging_with_several_copies_in_flight() {
    use ferry_cuda::Mem;
    use std::sync::Arc;
    let gpu = ferry_cuda::Gpu::open(0).unwrap();
    let chunk = 16 << 20;
    let n = 4;
    let mut staging = gpu.alloc_pinned(chunk * n).unwrap();
    for (i, c) in staging.as_mut_slice().chunks_mut(chunk).enumerate() {
        c.copy_from_slice(&pattern(chunk, i as u8));
    }
    let staging = Mem::Pinned(Arc::new(staging));
    let dst = Arc::new(gpu.alloc(chunk * n).unwrap());
    let dmem = Mem::Device(dst.clone());
    let stream = gpu.stream().unwrap();
    let events: Vec<_> = (0..n)
        .map(|i| {
            stream
                .copy(&dmem, i * chunk, &staging, i * chunk, chunk)
                .unwrap()
        })
        .collect();
    for e in &events {
        e.wait().unwrap();
        assert!(e.is_done().unwrap());
    }
    for i in 0..n {
        let mut back = vec![0u8; chunk];
        dst.read(i * chunk, &mut back).unwrap();
        assert!(back == pattern(chunk, i as u8), "chunk {i}");
    }
    assert!(
        stream.copy(&dmem, chunk * n - 1, &staging, 0, 2).is_err(),
        "out of range"
    );
    // Device to device, and back to registered host memory.
    let other = Mem::Device(Arc::new(gpu.alloc(chunk).unwrap()));
    stream
        .copy(&other, 0, &dmem, chunk, chunk)
        .unwrap()
        .wait()
        .unwrap();
    let region = Arc::new(ferry_shm::Region::create("gpu-test", chunk as u64).unwrap());
    let host = gpu.register_host(region.clone()).unwrap();
    println!("shared-memory region page-locked: {}", host.pinned);
    let hmem = Mem::Host(host);
    // Dropping the event before it completed waits for it.
    drop(stream.copy(&hmem, 0, &other, 0, chunk).unwrap());
    let mut back = vec![0u8; chunk];
    back.copy_from_slice(region_bytes(&region, chunk));
    assert!(back == pattern(chunk, 1), "device -> device -> host");
    assert!(stream.copy(&hmem, 0, &hmem, 0, 1).is_err(), "host to host");
}

/// Reads a region's bytes (the test owns it; nothing writes it now).
fn region_bytes(region: &ferry_shm::Region, len: usize) -> &[u8] {
    let p = region.range_ptr(0, len as u64).unwrap();
    // SAFETY: the range was bounds-checked; no copy is in flight any more.
    unsafe { std::slice::from_raw_parts(p, len) }
}
