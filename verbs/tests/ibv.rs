//! The fabric conformance suite on real kernel verbs (rdma-core through
//! sideway). It needs an RDMA device, so on ordinary hosts it is ignored;
//! `scripts/test.sh` runs it with `--ignored` inside `scripts/rxe-vm.sh`,
//! a VM with kernel soft-RoCE (rxe).

mod conformance;

conformance_suite!(
    ferry_verbs::ibv::IbvProvider,
    #[ignore = "requires an RDMA device: scripts/rxe-vm.sh runs it on kernel soft-RoCE"]
);

/// Runs everywhere: a kernel without RDMA support (ENOSYS here) or a host
/// without libibverbs has no devices, which is not an error.
#[test]
fn discovery_never_fails_for_want_of_rdma() {
    let devs = ferry_verbs::ibv::IbvProvider
        .devices()
        .expect("devices() is not an error");
    if std::env::var_os("FERRY_RXE_VM").is_some() {
        assert!(devs.iter().any(|d| d.name == "rxe0"), "{devs:?}");
    } else if !std::path::Path::new("/sys/class/infiniband").exists() {
        assert!(devs.is_empty(), "{devs:?}");
    }
    assert!(matches!(
        ferry_verbs::ibv::IbvProvider.open("no-such-device"),
        Err(VerbsError::NoDevice(_))
    ));
}
