use super::*;

#[test]
fn a_histogram_puts_each_duration_in_the_first_bucket_that_holds_it() {
    let mut h = Hist::default();
    for us in [0, 1, 2, 3, 4, 10_000_000, 10_000_001, u64::MAX] {
        h.observe(us);
    }
    assert_eq!(h.counts[0], 2, "0 and 1 us are at most 1 us");
    assert_eq!(h.counts[1], 2, "2 and 3 us are at most 3 us");
    assert_eq!(h.counts[2], 1, "4 us is at most 5 us");
    assert_eq!(
        h.counts[LATENCY_BOUNDS_US.len() - 1],
        1,
        "10 s is the last bound"
    );
    assert_eq!(h.counts[LATENCY_BOUNDS_US.len()], 2, "above every bound");
    assert_eq!(h.count, 8);
    assert_eq!(h.sum_us, u64::MAX, "the sum saturates");
}

fn stream(name: &str, published: u64) -> ferry_admin::StreamStatus {
    ferry_admin::StreamStatus {
        name: name.into(),
        declared: true,
        owner_uid: None,
        pool_bytes: 0,
        partitions: 2,
        slot_size: 64,
        slot_count: 8,
        slots_free: 5,
        slots_granted: 2,
        slots_held: 1,
        published,
        published_bytes: 0,
        delivered: 0,
        delivered_bytes: 0,
        end_offsets: vec![3, 4],
        slots_held_for_first_group: 0,
        groups_expired: 0,
        producers: vec![],
        groups: vec![ferry_admin::GroupStatus {
            name: "train".into(),
            lag: 7,
            slots_held: 1,
            epochs: 0,
            owner_uid: 0,
            partitions_omitted: 0,
            members: vec![],
            partitions: (0..2)
                .map(|p| ferry_admin::GroupPartStatus {
                    partition: p,
                    owner: None,
                    next: 0,
                    committed: 0,
                    end: 3 + p as u64,
                    lag: 3 + p as u64,
                    inflight: 0,
                    redeliver: 0,
                })
                .collect(),
        }],
        disk: Some(ferry_admin::DiskStatus {
            dir: "/x".into(),
            bytes: 4096,
            start_offsets: vec![0, 0],
            unsynced: 2,
            error: None,
            settings: "fsync=every".into(),
        }),
    }
}

fn status(streams: Vec<ferry_admin::StreamStatus>) -> ferry_admin::Status {
    ferry_admin::Status {
        daemon: "ferryd 9.9.9".into(),
        pid: 1,
        uptime_s: 5,
        socket: "/s".into(),
        draining: false,
        fabric: String::new(),
        placement: Default::default(),
        gpus: vec![],
        gpu_note: String::new(),
        sessions: 3,
        node_id: Some("a".into()),
        cluster_listen: None,
        peers: vec![ferry_admin::PeerStatus {
            node_id: "b".into(),
            state: "up".into(),
            rtt_us: Some(250),
            ..Default::default()
        }],
        remote_consumers: vec![],
        remote_producers: vec![],
        peer_connections_refused: 0,
        cluster: vec![],
        cluster_missing: vec![],
        membership: Some(ferry_admin::MembershipStatus {
            etcd_up: true,
            ..Default::default()
        }),
        memory: Default::default(),
        streams,
    }
}

/// The value of the sample `name{labels}` in a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn an_atomic_histogram_reads_as_the_plain_one() {
    let (a, mut h) = (AtomicHist::default(), Hist::default());
    for us in [0, 7, 7, 900, 20_000_000] {
        a.observe(us);
        h.observe(us);
    }
    assert_eq!(a.snapshot(), h);
}

#[test]
fn the_exposition_has_each_family_once_with_its_labels_and_cumulative_buckets() {
    let mut c = StreamCounters {
        published_bytes: 640,
        delivered: 9,
        delivered_bytes: 576,
        recovery_cuts: 1,
        ..Default::default()
    };
    c.latency_local.observe(2);
    c.latency_local.observe(700);
    let text = encode(Snapshot {
        status: status(vec![stream("batches", 10)]),
        streams: vec![c],
        links: vec![LinkCounters {
            write_latency: {
                let mut h = Hist::default();
                h.observe(40);
                h
            },
            writes: 4,
            write_bytes: 4096,
            credit_stalls: 2,
            credits_outstanding: 6,
            ..Default::default()
        }],
        loop_turns: 99,
        ready: true,
        data_dir: Some(std::env::temp_dir()),
        snapshots: 3,
        snapshot_ns: 1_500,
    });
    let s =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(s(r#"ferry_daemon_info{version="9.9.9",node="a"}"#), 1.0);
    assert_eq!(s("ferry_daemon_loop_turns_total"), 99.0);
    assert_eq!(s("ferry_daemon_ready"), 1.0);
    assert_eq!(s("ferry_daemon_snapshots_total"), 3.0);
    assert_eq!(s("ferry_daemon_snapshot_seconds_total"), 1.5e-6);
    let tmp = std::env::temp_dir().display().to_string();
    let free = s(&format!(r#"ferry_disk_free_bytes{{path="{tmp}"}}"#));
    assert!(free <= s(&format!(r#"ferry_disk_capacity_bytes{{path="{tmp}"}}"#)));
    assert_eq!(
        s(r#"ferry_stream_published_batches_total{stream="batches"}"#),
        10.0
    );
    assert_eq!(
        s(r#"ferry_stream_published_bytes_total{stream="batches"}"#),
        640.0
    );
    assert_eq!(
        s(r#"ferry_stream_delivered_batches_total{stream="batches"}"#),
        9.0
    );
    assert_eq!(
        s(r#"ferry_stream_slots{stream="batches",state="granted"}"#),
        2.0
    );
    assert_eq!(
        s(r#"ferry_group_lag_batches{stream="batches",group="train",partition="1"}"#),
        4.0
    );
    assert_eq!(
        s(r#"ferry_group_lag_total_batches{stream="batches",group="train"}"#),
        7.0
    );
    assert_eq!(s(r#"ferry_disk_log_bytes{stream="batches"}"#), 4096.0);
    assert_eq!(
        s(r#"ferry_disk_recovery_events_total{stream="batches",kind="tail_cut"}"#),
        1.0
    );
    assert_eq!(s(r#"ferry_peer_up{peer="b"}"#), 1.0);
    assert_eq!(s(r#"ferry_peer_rtt_seconds{peer="b"}"#), 0.00025);
    assert_eq!(s(r#"ferry_peer_credit_stalls_total{peer="b"}"#), 2.0);
    assert_eq!(
        s(r#"ferry_fabric_operations_total{peer="b",op="write"}"#),
        4.0
    );
    // Buckets are cumulative, end at +Inf, and agree with _count.
    let h = |le: &str| {
        format!(
            r#"ferry_stream_delivery_latency_seconds_bucket{{le="{le}",stream="batches",path="local"}}"#
        )
    };
    assert_eq!(s(&h("0.000003")), 1.0);
    assert_eq!(s(&h("0.001")), 2.0);
    assert_eq!(s(&h("+Inf")), 2.0);
    assert!(
        !text.contains("{}"),
        "unlabelled samples have no braces:\n{text}"
    );
    assert_eq!(
        s(r#"ferry_stream_delivery_latency_seconds_count{stream="batches",path="local"}"#),
        2.0
    );
    // No remote path without samples; every family is declared once.
    assert!(!text.contains(r#"path="remote""#), "{text}");
    let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let n = types.len();
    types.sort();
    types.dedup();
    assert_eq!(types.len(), n, "a family declared twice:\n{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    // Every name follows ferry_<subsystem>_<name>_<unit>.
    for t in &types {
        let name = t.split(' ').nth(2).unwrap();
        assert!(
            name.starts_with("ferry_") && name.matches('_').count() >= 2,
            "{name}"
        );
    }
}

/// Every `ferry_*` name in `text` (a dashboard, a rules file).
fn names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ferry_") {
        let start = i + at;
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        let before_ok = start == 0
            || !(b[start - 1].is_ascii_alphanumeric()
                || b[start - 1] == b'_'
                || b[start - 1] == b'-');
        if before_ok {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[test]
fn the_dashboard_and_the_alert_rules_use_only_metrics_ferryd_exposes() {
    let mut st = status(vec![stream("batches", 10)]);
    st.gpus = vec![ferry_admin::GpuStatus {
        ordinal: 0,
        name: "fake".into(),
        pci_bus_id: "0".into(),
        total_memory: 1,
        dma_buf: false,
        gpudirect_rdma: false,
    }];
    let mut c = StreamCounters::default();
    c.latency_remote.observe(5);
    let mut link = LinkCounters::default();
    link.write_latency.observe(5);
    let text = encode(Snapshot {
        status: st,
        streams: vec![c],
        links: vec![link],
        loop_turns: 1,
        ready: false,
        data_dir: Some(std::env::temp_dir()),
        snapshots: 1,
        snapshot_ns: 1,
    });
    let exposed: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "deploy/grafana/ferry.json",
        "deploy/prometheus/ferry-rules.yml",
        "deploy/prometheus/ferry-rules.test.yml",
    ] {
        let body = std::fs::read_to_string(root.join(file)).unwrap();
        let names = names_in(&body);
        assert!(names.len() >= 3, "{file}: {names:?}");
        for n in names {
            assert!(
                exposed.contains(n.as_str()),
                "{file} uses {n}, which ferryd does not expose; it has {exposed:?}"
            );
        }
    }
}
