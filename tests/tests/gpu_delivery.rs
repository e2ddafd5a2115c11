//! GPU delivery end to end: real ferryd, real client sessions. The tests
//! that move data need a CUDA driver, so they are ignored by default; they
//! run on a GPU machine (scripts/gpu-tests.sh) and, in scripts/test.sh,
//! against the fake driver in tests/fakecuda (host memory standing in for
//! GPU memory, asynchronous copies on worker threads), which checks
//! ferryd's and libferry's logic but not the real driver.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry::{ConsumerOptions, StreamSpec};
use ferry_shm::proto::{self, ErrorCode, Request, Response};
use ferry_shm::sys;
use ferry_tests::{bin, eventually, Daemon};

const T: Option<Duration> = Some(Duration::from_secs(10));

fn spec(partitions: u32, slot_size: u64, slot_count: u32) -> Option<StreamSpec> {
    Some(StreamSpec {
        durability: Default::default(),
        partitions,
        slot_size,
        slot_count,
    })
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i as usize * 131 + j * 7 + 1) as u8)
        .collect()
}

fn gpu0(prefetch: u32) -> ConsumerOptions {
    ConsumerOptions {
        prefetch,
        device: Some(0),
        ..Default::default()
    }
}

/// The daemon's own check: a GPU named by a PCI bus id it does not have
/// is refused with NoDevice (asked by hand, as a client with a GPU the
/// daemon cannot see would), and the session stays usable.
#[test]
fn daemon_refuses_a_gpu_it_does_not_have() {
    let d = Daemon::start("", "");
    d.client().producer("s", spec(1, 64, 4)).unwrap();
    let sock = sys::seqpacket_connect(&d.socket).unwrap();
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    let mut ask = |r: &Request| {
        sys::send_with_fds(&sock, &proto::encode(r).unwrap(), &[]).unwrap();
        let (n, _) = sys::recv_with_fds(&sock, &mut buf, false).unwrap().unwrap();
        proto::decode::<Response>(&buf[..n]).unwrap()
    };
    ask(&Request::Hello {
        protocol: proto::PROTOCOL_VERSION,
        client: "test".into(),
    });
    let r = ask(&Request::OpenConsumer {
        stream: "s".into(),
        group: "g".into(),
        prefetch: 4,
        device: Some(0),
        device_bus: Some("0000:99:00.0".into()),
        start: proto::GroupStart::Default,
    });
    let Response::Error { code, message } = r else {
        panic!("{r:?}")
    };
    assert_eq!(code, ErrorCode::NoDevice, "{message}");
    assert!(
        message.contains("0000:99:00.0") || message.contains("no usable CUDA GPU"),
        "{message}"
    );
    // Still a control session: a host consumer opens on it.
    let r = ask(&Request::OpenConsumer {
        stream: "s".into(),
        group: "g".into(),
        prefetch: 4,
        device: None,
        device_bus: None,
        start: proto::GroupStart::Default,
    });
    assert!(
        matches!(r, Response::Opened(ref i) if i.gpu.is_none()),
        "{r:?}"
    );
}

#[test]
#[ignore = "requires a CUDA GPU (scripts/gpu-tests.sh) or the fake driver (scripts/test.sh)"]
fn every_byte_arrives_in_gpu_memory_in_order_with_copies_in_flight() {
    let port = ferry_tests::free_port();
    let d = Daemon::start("", &format!("[admin]\nhttp = \"127.0.0.1:{port}\"\n"));
    let client = d.client();
    let slot = 1 << 20;
    let mut p = client.producer("s", spec(2, slot as u64, 16)).unwrap();
    let mut c = client.consumer("s", "g", gpu0(4)).unwrap();
    assert_eq!(c.device(), Some(0));
    let n = 40u64;
    let lens: Vec<usize> = (0..n)
        .map(|i| match i % 5 {
            0 => 0,
            1 => 1,
            2 => slot,
            _ => (i as usize * 7919) % slot,
        })
        .collect();
    let mut seen = std::collections::BTreeMap::new();
    let mut next = 0u64;
    let mut last = [None::<u64>; 2];
    while (seen.len() as u64) < n {
        // Keep several batches (and copies) in flight before reading.
        while next < n && next < seen.len() as u64 + 6 {
            let data = payload(next, lens[next as usize]);
            p.send(&data, &next.to_le_bytes(), Some(next), T).unwrap();
            next += 1;
        }
        let b = c.next(T).unwrap();
        assert!(b.data.is_null() && b.device == 0 && b.device_data != 0);
        // SAFETY (test): held until released.
        let i = u64::from_le_bytes(unsafe { b.meta() }.try_into().unwrap());
        assert_eq!(b.len as usize, lens[i as usize], "batch {i}");
        let mut back = vec![0u8; b.len as usize];
        c.copy_from_device(&b, &mut back).unwrap();
        assert!(back == payload(i, lens[i as usize]), "bytes of batch {i}");
        assert!(
            seen.insert(i, (b.partition, b.offset)).is_none(),
            "{i} twice"
        );
        // Within a partition, in offset order without gaps.
        let want = last[b.partition as usize].map_or(0, |o| o + 1);
        assert_eq!(b.offset, want, "partition {}", b.partition);
        last[b.partition as usize] = Some(b.offset);
        c.release(b.token).unwrap();
    }
    let st = d.status();
    let m = &st.streams[0].groups[0].members[0];
    assert_eq!(m.device.as_deref(), Some("cuda:0"));
    assert_eq!(m.gpu_bytes_copied, lens.iter().sum::<usize>() as u64);
    assert_eq!(m.gpu_copies_in_flight, 0);
    assert!(d.log().contains("stream pool registered with the GPU"));
    // The metrics count the same bytes, and keep them once the consumer
    // is gone.
    let total = lens.iter().sum::<usize>() as f64;
    let gpu_metric = |name: &str| -> Option<f64> {
        let (_, text) = ferry_tests::http_get(&format!("127.0.0.1:{port}"), "/metrics").ok()?;
        let series = format!("{name}{{stream=\"s\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
    };
    assert_eq!(gpu_metric("ferry_gpu_copy_bytes_total"), Some(total));
    assert_eq!(gpu_metric("ferry_gpu_copies_in_flight"), Some(0.0));
    drop(c);
    assert!(ferry_tests::eventually(T.unwrap(), || d.status().streams
        [0]
    .groups[0]
        .members
        .is_empty()));
    assert_eq!(gpu_metric("ferry_gpu_copy_bytes_total"), Some(total));
}

#[test]
#[ignore = "requires a CUDA GPU (scripts/gpu-tests.sh) or the fake driver (scripts/test.sh)"]
fn gpu_and_host_consumers_share_a_group_and_a_killed_gpu_consumer_is_redelivered() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(2, 4096, 16)).unwrap();
    let mut host = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    // A GPU consumer in another process takes its partition's batches and
    // is killed without releasing them.
    let mut child = Command::new(bin("ferry-test-consumer"))
        .args([d.socket.to_str().unwrap(), "s", "g", "3", "cuda:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || d.status().streams[0]
        .groups[0]
        .members
        .len()
        == 2));
    for i in 0..12u64 {
        p.send(&payload(i, 3000), &i.to_le_bytes(), None, T)
            .unwrap();
    }
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut held = Vec::new();
    loop {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if line.trim() == "ready" || line.is_empty() {
            break;
        }
        held.push(line.trim().to_string());
    }
    assert_eq!(held.len(), 3, "{held:?}");
    let st = d.status();
    let gpu_member = st.streams[0].groups[0]
        .members
        .iter()
        .find(|m| m.device.is_some())
        .expect("a GPU member in status");
    assert_eq!(gpu_member.device.as_deref(), Some("cuda:0"));
    child.kill().unwrap();
    child.wait().unwrap();
    // Every batch reaches the host consumer intact: its own partition's,
    // and the dead GPU consumer's, redelivered.
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 12 {
        let b = host.next(T).unwrap();
        // SAFETY (test): held until released.
        let i = u64::from_le_bytes(unsafe { b.meta() }.try_into().unwrap());
        assert_eq!(unsafe { b.data() }, &payload(i, 3000)[..]);
        got.insert(i);
        host.release(b.token).unwrap();
    }
    let log = d.log();
    assert!(log.contains("consumer left"), "{log}");
}

/// A GPU consumer speaking the protocol by hand releases a batch naming
/// the wrong GPU slot: ferryd closes that session, and the batch goes to
/// the next member, intact.
#[test]
#[ignore = "requires a CUDA GPU (scripts/gpu-tests.sh) or the fake driver (scripts/test.sh)"]
fn a_release_naming_the_wrong_gpu_slot_closes_that_session_only() {
    use ferry_shm::desc::{self, Desc};
    use ferry_shm::layout::SessionLayout;
    use ferry_shm::{attach_ring, Region, RingConsumer, RingProducer};
    use std::sync::Arc;

    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 4096, 8)).unwrap();
    let bus = ferry_cuda::probe().unwrap().gpus[0].pci_bus_id.clone();
    let sock = sys::seqpacket_connect(&d.socket).unwrap();
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    let mut ask = |r: &Request| {
        sys::send_with_fds(&sock, &proto::encode(r).unwrap(), &[]).unwrap();
        let (n, fds) = sys::recv_with_fds(&sock, &mut buf, false).unwrap().unwrap();
        (proto::decode::<Response>(&buf[..n]).unwrap(), fds)
    };
    ask(&Request::Hello {
        protocol: proto::PROTOCOL_VERSION,
        client: "forger".into(),
    });
    let (r, fds) = ask(&Request::OpenConsumer {
        stream: "s".into(),
        group: "g".into(),
        prefetch: 2,
        device: Some(0),
        device_bus: Some(bus),
        start: proto::GroupStart::Default,
    });
    let Response::Opened(info) = r else {
        panic!("{r:?}")
    };
    let pool = info.gpu.expect("a GPU pool");
    assert_eq!((pool.slots, pool.ipc_handle.len()), (2, 64));
    assert!(pool.stride >= 4096 && pool.stride % 4096 == 0);
    let mut fds = fds.into_iter();
    let layout = SessionLayout::new(info.ring_capacity);
    let region = Arc::new(Region::attach(fds.next().unwrap(), layout.total, true).unwrap());
    let _pool = fds.next().unwrap();
    let ring = |off| attach_ring(&region, off, layout.ring_len, info.ring_capacity).unwrap();
    let mut sub = RingProducer::new(ring(layout.sub_offset));
    let mut comp = RingConsumer::new(ring(layout.comp_offset));

    p.send(b"precious", b"", None, T).unwrap();
    let mut got = None;
    assert!(eventually(Duration::from_secs(5), || {
        got = comp.pop().unwrap();
        got.is_some()
    }));
    let dv = got.unwrap();
    assert_eq!(dv.op, desc::OP_DELIVER);
    assert!(dv.flags & desc::FLAG_DEVICE != 0 && dv.dslot < 2, "{dv:?}");
    sub.push(&Desc {
        op: desc::OP_RELEASE,
        stream: dv.stream,
        partition: dv.partition,
        slot: dv.slot,
        dslot: dv.dslot ^ 1,
        offset: dv.offset,
        ..Desc::default()
    })
    .unwrap();
    sys::send_dontwait(&sock, proto::WAKE).unwrap();
    assert!(eventually(Duration::from_secs(5), || sys::peer_hung_up(
        &sock
    )));
    assert!(d.log().contains("GPU slot"), "{}", d.log());
    // The batch was never released: the next member gets it.
    let mut c = client.consumer("s", "g", gpu0(2)).unwrap();
    let b = c.next(T).unwrap();
    let mut back = vec![0u8; b.len as usize];
    c.copy_from_device(&b, &mut back).unwrap();
    assert_eq!(back, b"precious");
    c.release(b.token).unwrap();
}

#[test]
#[ignore = "requires a CUDA GPU (scripts/gpu-tests.sh) or the fake driver (scripts/test.sh)"]
fn a_gpu_producer_reaches_host_and_gpu_consumers_and_gpu_ones_copy_from_gpu_memory() {
    let d = Daemon::start("", "");
    let client = d.client();
    let slot = 256 << 10;
    let mut p = client
        .producer_on("s", spec(2, slot as u64, 8), Some(0))
        .unwrap();
    assert_eq!(p.device(), Some(0));
    let r = p.reserve(T).unwrap();
    assert!(r.ptr.is_null() && r.device_ptr != 0);
    p.publish(r.slot, 0, b"empty", None).unwrap();
    let mut gpu = client.consumer("s", "on-gpu", gpu0(3)).unwrap();
    // Formed after the GPU group: it asks for the batches already there.
    let mut host = client
        .consumer(
            "s",
            "on-host",
            ConsumerOptions {
                start: ferry::GroupStart::Earliest,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    let n = 24u64;
    let len = |i: u64| (i as usize * 10007) % slot + 1;
    let (mut got_gpu, mut got_host) = (0, 0);
    let mut sent = 0u64;
    let mut total = 0u64;
    while got_gpu < n + 1 || got_host < n + 1 {
        if sent < n {
            // A short wait: when no slot is free, read first.
            let data = payload(sent, len(sent));
            if p.send(
                &data,
                &sent.to_le_bytes(),
                None,
                Some(Duration::from_millis(10)),
            )
            .is_ok()
            {
                total += data.len() as u64;
                sent += 1;
            }
        }
        while let Ok(b) = gpu.next(Some(Duration::from_millis(1))) {
            // SAFETY (test): held until released.
            let meta = unsafe { b.meta() }.to_vec();
            let mut back = vec![0u8; b.len as usize];
            gpu.copy_from_device(&b, &mut back).unwrap();
            if meta != b"empty" {
                let i = u64::from_le_bytes(meta.try_into().unwrap());
                assert!(back == payload(i, len(i)), "GPU consumer, batch {i}");
            } else {
                assert!(back.is_empty());
            }
            gpu.release(b.token).unwrap();
            got_gpu += 1;
        }
        while let Ok(b) = host.next(Some(Duration::from_millis(1))) {
            // SAFETY (test): held until released.
            let (meta, data) = unsafe { (b.meta().to_vec(), b.data().to_vec()) };
            if meta != b"empty" {
                let i = u64::from_le_bytes(meta.try_into().unwrap());
                assert!(data == payload(i, len(i)), "host consumer, batch {i}");
            }
            host.release(b.token).unwrap();
            got_host += 1;
        }
    }
    let st = d.status();
    let s = &st.streams[0];
    assert_eq!(s.producers[0].device.as_deref(), Some("cuda:0"));
    assert_eq!(s.producers[0].gpu_bytes_copied, total);
    let g = s.groups.iter().find(|g| g.name == "on-gpu").unwrap();
    assert_eq!(
        g.members[0].gpu_bytes_from_gpu, total,
        "every GPU delivery came from GPU memory"
    );
    assert!(d.log().contains("stream mirror allocated"), "{}", d.log());
    let out = std::process::Command::new(bin("ferry"))
        .args(["status", "--admin-socket", d.admin.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("from cuda:0") && text.contains("into cuda:0"),
        "{text}"
    );
}

#[test]
#[ignore = "requires a CUDA GPU (scripts/gpu-tests.sh) or the fake driver (scripts/test.sh)"]
fn a_gpu_producer_closing_with_copies_in_flight_loses_nothing() {
    // Under the fake driver: slow copies, so that the producer is gone
    // while most are in flight (the real driver ignores this).
    std::env::set_var("FAKECUDA_COPY_DELAY_US", "20000");
    let d = Daemon::start("", "");
    std::env::remove_var("FAKECUDA_COPY_DELAY_US");
    let client = d.client();
    let mut p = client
        .producer_on("s", spec(1, 1 << 20, 32), Some(0))
        .unwrap();
    let batches: Vec<Vec<u8>> = (0..20).map(|i| payload(i, 1 << 20)).collect();
    for (i, b) in batches.iter().enumerate() {
        p.send(b, &(i as u64).to_le_bytes(), None, T).unwrap();
    }
    drop(p); // straight after publishing: the copies to host are in flight
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    for i in 0..20u64 {
        let b = c.next(T).unwrap();
        // SAFETY (test): held until released.
        unsafe {
            assert_eq!(b.meta(), &i.to_le_bytes(), "in publish order");
            assert!(b.data() == &batches[i as usize][..], "batch {i}");
        }
        c.release(b.token).unwrap();
    }
}

#[test]
#[ignore = "requires two CUDA GPUs (scripts/gpu-tests.sh where there are two) or the fake driver with FAKECUDA_DEVICES=2 (scripts/test.sh)"]
fn two_gpus_a_producer_on_one_feeds_a_consumer_on_the_other_by_peer_copies() {
    assert!(
        ferry_cuda::probe().map(|p| p.gpus.len()).unwrap_or(0) >= 2,
        "needs two GPUs"
    );
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client
        .producer_on("s", spec(1, 64 << 10, 8), Some(0))
        .unwrap();
    let mut c = client
        .consumer(
            "s",
            "g",
            ConsumerOptions {
                prefetch: 2,
                device: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(c.device(), Some(1));
    let mut total = 0;
    for i in 0..10u64 {
        let data = payload(i, 1000 * (i as usize + 1));
        p.send(&data, &i.to_le_bytes(), None, T).unwrap();
        let b = c.next(T).unwrap();
        assert_eq!(b.device, 1);
        let mut back = vec![0u8; b.len as usize];
        c.copy_from_device(&b, &mut back).unwrap();
        assert!(back == data, "batch {i}");
        c.release(b.token).unwrap();
        total += data.len() as u64;
    }
    let st = d.status();
    let m = &st.streams[0].groups[0].members[0];
    assert_eq!(m.device.as_deref(), Some("cuda:1"));
    assert_eq!(m.gpu_bytes_from_gpu, total, "copied from GPU 0's memory");
    let log = d.log();
    assert_eq!(
        log.matches("stream pool registered with the GPU").count(),
        2,
        "{log}"
    );
    assert!(!log.contains("pinned=false"), "{log}");
}

#[test]
#[ignore = "requires a CUDA GPU (scripts/gpu-tests.sh) or the fake driver (scripts/test.sh)"]
fn gpu_pools_beyond_the_configured_limit_are_refused_clearly() {
    let d = Daemon::start("max_gpu_pool_bytes = 100000", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 64 << 10, 8)).unwrap();
    let e = client
        .consumer("s", "g", gpu0(8))
        .err()
        .expect("8 x 64 KiB is too much");
    assert_eq!(e.status, ferry::Status::Limit, "{}", e.message);
    assert!(e.message.contains("max_gpu_pool_bytes"), "{}", e.message);
    let e = client
        .producer_on("s", None, Some(0))
        .err()
        .expect("a 512 KiB mirror is too much");
    assert_eq!(e.status, ferry::Status::Limit, "{}", e.message);
    // One slot fits, and works.
    let mut c = client.consumer("s", "g", gpu0(1)).unwrap();
    p.send(b"fits", b"", None, T).unwrap();
    let b = c.next(T).unwrap();
    let mut back = [0u8; 4];
    c.copy_from_device(&b, &mut back).unwrap();
    assert_eq!(&back, b"fits");
    c.release(b.token).unwrap();
}

/// Two daemons on loopback as two hosts, n0 (with `home_keys` and
/// `streams`) and n1, peers of each other; returned once n1 knows stream
/// `name` as homed on n0.
fn two_hosts(
    home_keys: &str,
    streams: &str,
    name: &str,
    dir: &std::path::Path,
) -> (Daemon, Daemon) {
    two_hosts_with_env(home_keys, streams, name, dir, &[])
}

/// [`two_hosts`], with environment variables `env` for n1.
fn two_hosts_with_env(
    home_keys: &str,
    streams: &str,
    name: &str,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Daemon, Daemon) {
    let ports = [ferry_tests::free_port(), ferry_tests::free_port()];
    let secret = ferry_tests::secret_file(dir, "secret", "a cluster secret for the GPU tests");
    let timing = "heartbeat_ms = 100\npeer_timeout_ms = 600\nreconnect_max_ms = 200";
    let table = |i| ferry_tests::cluster_table(i, &ports, &secret, timing);
    let home = Daemon::start(home_keys, &format!("{streams}{}", table(0)));
    let other = Daemon::start_with_env("", &table(1), env);
    wait_homed(&other, name);
    (home, other)
}

/// Waits until `d` knows stream `name` as homed on n0, and n0 as up.
fn wait_homed(d: &Daemon, name: &str) {
    assert!(
        eventually(Duration::from_secs(30), || d.status().peers.iter().any(
            |p| { p.node_id == "n0" && p.state == "up" && p.streams.iter().any(|s| s == name) }
        )),
        "{:?}\n{}",
        d.status().peers,
        d.log()
    );
}

fn test_dir(what: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-gpu-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A stream `s` of 2 partitions of `slot`-byte slots, 16 of them.
fn two_partitions(slot: usize) -> String {
    format!("[[streams]]\nname = \"s\"\npartitions = 2\nslot_size = {slot}\nslot_count = 16\n")
}

/// Reads batches until the end of the epoch: `check` checks one and names
/// its index. Each partition's offsets come in order without gaps, and
/// its indexes rise (publish order); no index twice.
fn read_epoch(
    c: &mut ferry::Consumer,
    daemons: [&Daemon; 2],
    mut check: impl FnMut(&ferry::Consumer, &ferry::Batch) -> u64,
) -> std::collections::BTreeSet<u64> {
    let mut seen = std::collections::BTreeSet::new();
    let mut last = [None::<(u64, u64)>; 2];
    loop {
        let b = match c.next(T) {
            Ok(b) => b,
            Err(e) if e.status == ferry::Status::EndOfEpoch => return seen,
            Err(e) => panic!(
                "{e}; {} seen\n{}\n{}",
                seen.len(),
                daemons[0].log(),
                daemons[1].log()
            ),
        };
        let i = check(c, &b);
        assert!(seen.insert(i), "{i} twice");
        let p = b.partition as usize;
        let (want, after) = last[p].map_or((0, None), |(o, i)| (o + 1, Some(i)));
        assert_eq!(b.offset, want, "partition {p}: in order, none lost");
        assert!(
            after.is_none_or(|a| a < i),
            "{i} after {after:?} in partition {p}"
        );
        last[p] = Some((b.offset, i));
        c.release(b.token).unwrap();
    }
}

/// Its index, from the batch's metadata, after checking every byte of it
/// in GPU memory.
fn check_gpu_batch(c: &ferry::Consumer, b: &ferry::Batch, len_of: impl Fn(u64) -> usize) -> u64 {
    assert!(b.data.is_null() && b.device == 0 && b.device_data != 0);
    // SAFETY (test): held until released.
    let i = u64::from_le_bytes(unsafe { b.meta() }.try_into().unwrap());
    assert_eq!(b.len as usize, len_of(i), "length of batch {i}");
    let mut back = vec![0u8; b.len as usize];
    c.copy_from_device(b, &mut back).unwrap();
    assert!(back == payload(i, len_of(i)), "bytes of batch {i}");
    i
}

#[test]
#[ignore = "requires a CUDA GPU (scripts/gpu-tests.sh) or the fake driver (scripts/test.sh)"]
fn a_gpu_trainer_on_another_host_gets_every_batch_in_its_gpu_memory() {
    let dir = test_dir("remote");
    let slot = 64usize << 10;
    let (home, other) = two_hosts("", &two_partitions(slot), "s", &dir);
    let mut c = other
        .client()
        .consumer("s", "g", gpu0(4))
        .expect("a GPU consumer on n1 of a stream homed on n0");
    assert_eq!(c.device(), Some(0));
    let n = 48u64;
    let len_of = move |i: u64| match i % 5 {
        0 => 0,
        1 => 1,
        2 => slot,
        _ => (i as usize * 7919) % slot,
    };
    let mut p = home.client().producer("s", None).unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            p.send(&payload(i, len_of(i)), &i.to_le_bytes(), Some(i), T)
                .unwrap_or_else(|e| panic!("send {i}: {e}"));
        }
        p.end().unwrap();
        p
    });
    let seen = read_epoch(&mut c, [&home, &other], |c, b| {
        check_gpu_batch(c, b, len_of)
    });
    assert_eq!(
        seen.len() as u64,
        n,
        "every batch, then the end of the epoch after them"
    );
    drop(sender.join().unwrap());
    let st = other.status();
    let r = &st.remote_consumers[0];
    assert_eq!(r.device.as_deref(), Some("cuda:0"), "{r:?}");
    assert_eq!(
        (r.copies_in_flight, r.held, r.delivered),
        (0, 0, n),
        "{r:?}"
    );
    assert!(
        other.log().contains("device=\"cuda:0\""),
        "the join names the device:\n{}",
        other.log()
    );
    drop(c);
    assert!(eventually(Duration::from_secs(10), || other
        .status()
        .remote_consumers
        .is_empty()));
    // The home's group has no member left on n1.
    assert!(eventually(Duration::from_secs(10), || home
        .status()
        .streams[0]
        .groups[0]
        .members
        .is_empty()));
}

/// A GPU trainer on n1 holds two batches when the disk stream's home
/// dies; the home comes back and, resuming the group at its commit,
/// delivers those two again while the first copies are still held: the
/// trainer gets them in other GPU slots, and releasing all four is fine.
#[test]
#[ignore = "requires a CUDA GPU (scripts/gpu-tests.sh) or the fake driver (scripts/test.sh)"]
fn a_gpu_trainer_elsewhere_holding_batches_through_its_home_s_restart_gets_them_again_in_other_slots(
) {
    let dir = test_dir("restart");
    let (mut home, other) = two_hosts(
        &format!(
            "data_dir = \"{}\"\noffsets_flush_ms = 20",
            dir.join("data").display()
        ),
        "[[streams]]\nname = \"s\"\nslot_size = 4096\nslot_count = 8\ndurability = \"disk\"\n",
        "s",
        &dir,
    );
    let mut c = other.client().consumer("s", "g", gpu0(4)).unwrap();
    let len_of = |i: u64| 100 + i as usize * 37;
    let publish = |home: &Daemon, range: std::ops::Range<u64>| {
        let mut p = home.client().producer("s", None).unwrap();
        for i in range {
            p.send(&payload(i, len_of(i)), &i.to_le_bytes(), None, T)
                .unwrap();
        }
        p.flush(T).unwrap();
    };
    // Only two batches, so that nothing else is on the trainer's ring.
    publish(&home, 0..2);
    let first: Vec<ferry::Batch> = (0..2).map(|_| c.next(T).unwrap()).collect();
    for (k, b) in first.iter().enumerate() {
        assert_eq!(check_gpu_batch(&c, b, len_of), k as u64);
    }
    // The group is on disk (its offsets file), with nothing committed.
    std::thread::sleep(Duration::from_millis(300));
    home.kill();
    home.restart();
    assert!(home.log().contains("1 group(s) restored"), "{}", home.log());
    wait_homed(&other, "s");
    // The two held batches come again, into the two GPU slots left.
    let again: Vec<ferry::Batch> = (0..2)
        .map(|_| {
            c.next(T)
                .unwrap_or_else(|e| panic!("{e}\n{}\n{}", home.log(), other.log()))
        })
        .collect();
    for (k, b) in again.iter().enumerate() {
        assert_eq!(
            check_gpu_batch(&c, b, len_of),
            k as u64,
            "redelivered from the commit"
        );
        assert_eq!(b.offset, first[k].offset);
        assert!(
            first.iter().all(|f| f.device_data != b.device_data),
            "another GPU slot"
        );
    }
    for b in first.into_iter().chain(again) {
        c.release(b.token)
            .unwrap_or_else(|e| panic!("{e}\n{}", other.log()));
    }
    publish(&home, 2..10);
    let mut rest = std::collections::BTreeSet::new();
    while rest.len() < 8 {
        let b = c
            .next(T)
            .unwrap_or_else(|e| panic!("{e}; {rest:?}\n{}\n{}", home.log(), other.log()));
        let i = check_gpu_batch(&c, &b, len_of);
        assert!(rest.insert(i), "{i} again");
        c.release(b.token).unwrap();
    }
    assert_eq!(rest, (2..10).collect(), "the rest, once each");
    assert!(!other.log().contains("GPU slot"), "{}", other.log());
}

/// A producer on n1 publishes from GPU memory into a stream homed on n0,
/// with slow copies (under the fake driver) so that many are in flight,
/// ends the epoch and closes at once: every batch reaches the home's
/// consumer, in order per partition, then the end of the epoch.
#[test]
#[ignore = "requires a CUDA GPU (scripts/gpu-tests.sh) or the fake driver (scripts/test.sh)"]
fn a_gpu_producer_on_another_host_publishes_in_order_and_closing_loses_nothing() {
    let dir = test_dir("remote-producer");
    let slot = 256usize << 10;
    let (home, other) = two_hosts_with_env(
        "",
        &two_partitions(slot),
        "s",
        &dir,
        // The real driver ignores this.
        &[("FAKECUDA_COPY_DELAY_US", "20000")],
    );
    let mut c = home
        .client()
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    let mut p = other
        .client()
        .producer_on("s", None, Some(0))
        .expect("a GPU producer on n1 of a stream homed on n0");
    assert_eq!(p.device(), Some(0));
    let n = 20u64;
    let len_of = move |i: u64| {
        if i == 7 {
            0
        } else {
            (i as usize * 10007) % slot + 1
        }
    };
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            p.send(&payload(i, len_of(i)), &i.to_le_bytes(), Some(i), T)
                .unwrap_or_else(|e| panic!("send {i}: {e}"));
        }
        p.end().unwrap();
        // Straight after: copies out of GPU memory are still in flight.
        drop(p);
    });
    let seen = read_epoch(&mut c, [&home, &other], |_, b| {
        // SAFETY (test): held until released.
        let (meta, data) = unsafe { (b.meta().to_vec(), b.data().to_vec()) };
        let i = u64::from_le_bytes(meta.try_into().unwrap());
        assert!(data == payload(i, len_of(i)), "bytes of batch {i}");
        i
    });
    sender.join().unwrap();
    assert_eq!(
        seen.len() as u64,
        n,
        "every batch, then the end of the epoch"
    );
    assert!(
        other.log().contains("device=\"cuda:0\""),
        "the producer's opening names the device:\n{}",
        other.log()
    );
}
