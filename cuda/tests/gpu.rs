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
    if std::path::Path::new("/dev/nvidiactl").exists() {
        return; // a GPU host: covered by the ignored test above
    }
    match ferry_cuda::probe() {
        Err(ferry_cuda::CudaError::NotPresent(why)) => {
            assert!(why.contains("libcuda") || why.contains("cuInit"), "{why}")
        }
        other => panic!("expected NotPresent on a host without a GPU, got {other:?}"),
    }
}
