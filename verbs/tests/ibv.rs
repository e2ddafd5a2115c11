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
        let port = &devs[0].ports[0];
        assert!(
            port.active && port.link_layer == LinkLayer::Ethernet && port.active_mtu == 1024,
            "{port:?}"
        );
        // With a usable device, automatic selection takes ibv.
        let sel = ferry_verbs::select::choose(ferry_verbs::select::Preference::Auto, "test", &devs)
            .unwrap();
        assert_eq!(
            sel.choice,
            ferry_verbs::select::Choice::Ibv {
                device: "rxe0".into()
            }
        );
    } else if !std::path::Path::new("/sys/class/infiniband").exists() {
        assert!(devs.is_empty(), "{devs:?}");
    }
    assert!(matches!(
        ferry_verbs::ibv::IbvProvider.open("no-such-device"),
        Err(VerbsError::NoDevice(_))
    ));
}
