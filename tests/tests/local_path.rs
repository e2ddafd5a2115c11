//! The local zero-copy batch path end to end: real ferryd processes, real
//! client sessions, and misbehaving clients.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry::{ConsumerOptions, Status, StreamSpec};
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
    (0..len).map(|j| (i as usize * 131 + j * 7) as u8).collect()
}

#[test]
fn producer_to_consumer_in_place_with_metadata() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 4096, 8)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    for i in 0..20u64 {
        let data = payload(i, 1000 + i as usize);
        p.send(&data, &i.to_le_bytes(), None, T).unwrap();
        let b = c.next(T).unwrap();
        assert_eq!((b.partition, b.offset), (0, i));
        // SAFETY (test): the batch is held until the release below.
        unsafe {
            assert_eq!(b.data(), &data[..]);
            assert_eq!(b.meta(), &i.to_le_bytes());
        }
        c.release(b.token).unwrap();
    }
    // Zero copy: the producer's slot and the consumer's batch are the same
    // physical bytes (a write through the slot shows in the batch).
    let slot = p.reserve(T).unwrap();
    // SAFETY (test): the reserved slot is ours for `capacity` bytes.
    unsafe { std::ptr::write_bytes(slot.ptr, 0x5A, 64) };
    p.publish(slot.slot, 64, b"", None).unwrap();
    let b = c.next(T).unwrap();
    // SAFETY (test): held until released.
    assert!(unsafe { b.data() }.iter().all(|&x| x == 0x5A));
    c.release(b.token).unwrap();
}

#[test]
fn groups_split_partitions_and_every_group_sees_everything() {
    let d = Daemon::start(
        "",
        "[[streams]]\nname = \"img\"\npartitions = 4\nslot_size = 256\nslot_count = 128\n",
    );
    let client = d.client();
    let opts = ConsumerOptions {
        prefetch: 64,
        ..Default::default()
    };
    let mut a1 = client.consumer("img", "train", opts.clone()).unwrap();
    let mut a2 = client.consumer("img", "train", opts.clone()).unwrap();
    let mut b = client.consumer("img", "eval", opts).unwrap();
    let mut p = client.producer("img", None).unwrap();
    let n = 40u64;
    for i in 0..n {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
    }
    let take = |c: &mut ferry::Consumer, want: usize| {
        let mut got = Vec::new();
        while got.len() < want {
            match c.next(Some(Duration::from_millis(500))) {
                Ok(bt) => {
                    // SAFETY (test): held until released.
                    let v = u64::from_le_bytes(unsafe { bt.data() }.try_into().unwrap());
                    got.push((bt.partition, bt.offset, v));
                    c.release(bt.token).unwrap();
                }
                Err(e) if e.status == Status::Timeout => break,
                Err(e) => panic!("{e}"),
            }
        }
        got
    };
    let g1 = take(&mut a1, n as usize);
    let g2 = take(&mut a2, n as usize);
    let e = take(&mut b, n as usize);
    assert!(
        !g1.is_empty() && !g2.is_empty(),
        "both members get work: {} {}",
        g1.len(),
        g2.len()
    );
    let p1: BTreeSet<u32> = g1.iter().map(|x| x.0).collect();
    let p2: BTreeSet<u32> = g2.iter().map(|x| x.0).collect();
    assert!(
        p1.is_disjoint(&p2),
        "a partition has one owner: {p1:?} {p2:?}"
    );
    let mut train: Vec<u64> = g1.iter().chain(&g2).map(|x| x.2).collect();
    train.sort();
    assert_eq!(
        train,
        (0..n).collect::<Vec<_>>(),
        "each batch to exactly one member"
    );
    let mut eval: Vec<u64> = e.iter().map(|x| x.2).collect();
    eval.sort();
    assert_eq!(
        eval,
        (0..n).collect::<Vec<_>>(),
        "the second group sees every batch"
    );
    let st = d.status();
    let s = &st.streams[0];
    assert_eq!(s.published, n);
    assert_eq!(s.groups.len(), 2);
    // Releases are asynchronous; the slots come back shortly.
    assert!(eventually(Duration::from_secs(5), || d.status().streams[0]
        .slots_held
        == 0));
}

#[test]
fn rebalance_when_a_member_joins_and_leaves() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(2, 64, 64)).unwrap();
    let mut a = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    let owned = |d: &Daemon| -> Vec<Vec<u32>> {
        d.status().streams[0].groups[0]
            .members
            .iter()
            .map(|m| m.partitions.clone())
            .collect()
    };
    assert_eq!(owned(&d), vec![vec![0, 1]]);
    let b = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    assert_eq!(owned(&d), vec![vec![0], vec![1]]);
    drop(b);
    assert!(eventually(Duration::from_secs(5), || owned(&d) == vec![vec![0, 1]]));
    for i in 0..4u64 {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
    }
    for _ in 0..4 {
        let bt = a.next(T).unwrap();
        a.release(bt.token).unwrap();
    }
}

#[test]
fn killed_consumer_process_batches_are_redelivered() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(2, 64, 32)).unwrap();
    let mut survivor = client
        .consumer(
            "s",
            "g",
            ConsumerOptions {
                prefetch: 32,
                ..Default::default()
            },
        )
        .unwrap();
    let mut child = Command::new(bin("ferry-test-consumer"))
        .args([d.socket.to_str().unwrap(), "s", "g", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The child owns one of the two partitions once it joins.
    assert!(eventually(Duration::from_secs(5), || d.status().streams[0]
        .groups[0]
        .members
        .len()
        == 2));
    for i in 0..12u64 {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
    }
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut held = BTreeSet::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        let (pp, o) = line.strip_prefix("held ").unwrap().split_once(':').unwrap();
        held.insert((pp.parse::<u32>().unwrap(), o.parse::<u64>().unwrap()));
    }
    assert_eq!(held.len(), 3);
    // SIGKILL: no goodbye, the daemon only sees the socket close.
    child.kill().unwrap();
    child.wait().unwrap();
    let mut seen: HashMap<(u32, u64), u32> = HashMap::new();
    while seen.len() < 12 {
        let b = survivor
            .next(T)
            .unwrap_or_else(|e| panic!("{e}; seen {seen:?}\n{}", d.log()));
        *seen.entry((b.partition, b.offset)).or_default() += 1;
        survivor.release(b.token).unwrap();
    }
    for h in &held {
        assert!(
            seen.contains_key(h),
            "batch {h:?} held by the dead consumer was redelivered"
        );
    }
    assert!(seen.values().all(|&n| n == 1));
    assert!(eventually(Duration::from_secs(5), || d.status().streams[0]
        .slots_held
        == 0));
}

#[test]
fn backpressure_makes_producers_wait_and_drops_nothing() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 64, 4)).unwrap();
    let mut c = client
        .consumer(
            "s",
            "g",
            ConsumerOptions {
                prefetch: 4,
                ..Default::default()
            },
        )
        .unwrap();
    for i in 0..4u64 {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
    }
    // Every slot is delivered and unreleased: the producer must wait.
    let e = p.reserve(Some(Duration::from_millis(200))).unwrap_err();
    assert_eq!(e.status, Status::Timeout);
    let first = c.next(T).unwrap();
    assert_eq!(first.offset, 0);
    c.release(first.token).unwrap();
    p.send(&4u64.to_le_bytes(), b"", None, T).unwrap();
    let mut got = vec![0u64];
    while got.len() < 5 {
        let b = c.next(T).unwrap();
        got.push(b.offset);
        c.release(b.token).unwrap();
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
}

#[test]
fn batches_published_before_any_consumer_wait_for_one() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 64, 4)).unwrap();
    for i in 0..4u64 {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
    }
    assert_eq!(
        p.reserve(Some(Duration::from_millis(100)))
            .unwrap_err()
            .status,
        Status::Timeout
    );
    let mut c = client
        .consumer("s", "late", ConsumerOptions::default())
        .unwrap();
    for i in 0..4u64 {
        let b = c.next(T).unwrap();
        assert_eq!(b.offset, i);
        c.release(b.token).unwrap();
    }
}

#[test]
fn bad_input_gets_a_clear_status() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 16, 4)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();

    let e = p.send(&[0u8; 17], b"", None, T).unwrap_err();
    assert_eq!(e.status, Status::TooLarge);
    assert!(
        e.message.contains("17") && e.message.contains("16"),
        "{}",
        e.message
    );
    let e = p.send(b"x", &[0u8; 300], None, T).unwrap_err();
    assert_eq!(e.status, Status::TooLarge);
    assert_eq!(
        p.publish(3, 1, b"", None).unwrap_err().status,
        Status::NotHeld
    );

    p.send(b"abc", b"", None, T).unwrap();
    let b = c.next(T).unwrap();
    c.release(b.token).unwrap();
    let e = c.release(b.token).unwrap_err();
    assert_eq!(e.status, Status::NotHeld, "{}", e.message);

    let e = client
        .consumer("nope", "g", ConsumerOptions::default())
        .err()
        .unwrap();
    assert_eq!(e.status, Status::UnknownStream);
    assert!(e.message.contains("nope"), "{}", e.message);
    let e = client.producer("nope", None).err().unwrap();
    assert_eq!(e.status, Status::UnknownStream);
    let e = client.producer("s", spec(2, 16, 4)).err().unwrap();
    assert_eq!(e.status, Status::StreamMismatch);
    assert!(e.message.contains("partitions=1"), "{}", e.message);
    let e = client.producer("bad name", None).err().unwrap();
    assert_eq!(e.status, Status::InvalidArgument);
    let e = client.producer("huge", spec(1, 1 << 40, 4)).err().unwrap();
    assert_eq!(e.status, Status::InvalidArgument);
    assert!(e.message.contains("slot_size"), "{}", e.message);
    assert_eq!(c.seek(9, 0).unwrap_err().status, Status::InvalidArgument);
    assert_eq!(c.seek(0, 99).unwrap_err().status, Status::OffsetGone);

    // The daemon is still fine after all that.
    p.send(b"ok", b"", None, T).unwrap();
    let b = c.next(T).unwrap();
    // SAFETY (test): held until released.
    assert_eq!(unsafe { b.data() }, b"ok");
    c.release(b.token).unwrap();
}

#[test]
fn fabric_choice_is_logged_and_an_impossible_one_refused() {
    let d = Daemon::start("", "");
    assert!(d.log().contains("fabric chosen"), "{}", d.log());
    assert!(!d.status().fabric.is_empty());
    if !std::path::Path::new("/sys/class/infiniband").exists() {
        // No RDMA here: asking for ibv explicitly must fail clearly.
        let out = Command::new(bin("ferryd"))
            .args(["--socket", "/tmp/ferry-ibv-refused/f.sock"])
            .env("FERRY_FABRIC", "ibv")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ibv requested by FERRY_FABRIC"), "{err}");
    }
}

#[test]
fn gpu_delivery_without_that_gpu_is_refused_and_host_consumers_keep_working() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 64, 8)).unwrap();
    let gpu = ConsumerOptions {
        device: Some(0),
        ..Default::default()
    };
    if d.status().gpus.is_empty() {
        // Refused in this process already (no libcuda to open a GPU
        // pool with); the daemon's own refusal is tested in gpu_delivery.
        let e = client.consumer("s", "g", gpu).err().unwrap();
        assert_eq!(e.status, Status::NoDevice, "{}", e.message);
        assert!(
            e.message.contains("cuda:0") && e.message.contains("CUDA"),
            "{}",
            e.message
        );
    }
    let e = client
        .consumer(
            "s",
            "g",
            ConsumerOptions {
                device: Some(99),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(e.status, Status::NoDevice);
    assert!(ferry::client::parse_device("gpu0").is_err());
    assert_eq!(ferry::client::parse_device("cuda:2").unwrap(), Some(2));
    // The daemon still serves host-memory consumers.
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    p.send(b"host", b"", None, T).unwrap();
    let b = c.next(T).unwrap();
    // SAFETY (test): held until released.
    assert_eq!(unsafe { b.data() }, b"host");
    c.release(b.token).unwrap();
    let out = Command::new(bin("ferry"))
        .args(["status", "--admin-socket", d.admin.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("gpu"),
        "status shows GPUs or why there are none"
    );
}

#[test]
fn silent_connections_are_closed_and_silent_admin_clients_stall_nothing() {
    let d = Daemon::start("handshake_timeout_ms = 300", "");
    // A session-socket connection that never says Hello.
    let silent = ferry_shm::sys::seqpacket_connect(&d.socket).unwrap();
    // An admin connection that never sends its command.
    let _admin_silent = std::os::unix::net::UnixStream::connect(&d.admin).unwrap();
    // Data still flows and status still answers meanwhile.
    let client = d.client();
    let mut p = client.producer("s", spec(1, 16, 4)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    p.send(b"x", b"", None, T).unwrap();
    let b = c.next(T).unwrap();
    c.release(b.token).unwrap();
    assert!(!d.status().streams.is_empty());
    assert!(
        eventually(Duration::from_secs(5), || ferry_shm::sys::peer_hung_up(
            &silent
        )),
        "a connection without Hello is closed\n{}",
        d.log()
    );
    assert!(d.log().contains("no Hello within 300 ms"), "{}", d.log());
}

#[test]
fn deleting_an_abandoned_group_unblocks_producers() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 16, 4)).unwrap();
    let mut active = client
        .consumer("s", "active", ConsumerOptions::default())
        .unwrap();
    let abandoned = client
        .consumer("s", "old-job", ConsumerOptions::default())
        .unwrap();
    drop(abandoned); // the job ended; its group stays and holds batches
    for i in 0..4u64 {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
        let b = active.next(T).unwrap();
        active.release(b.token).unwrap();
    }
    assert_eq!(
        p.reserve(Some(Duration::from_millis(200)))
            .unwrap_err()
            .status,
        Status::Timeout
    );
    let ferry = |args: &[&str]| {
        Command::new(bin("ferry"))
            .args(args)
            .args(["--admin-socket", d.admin.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let busy = ferry(&["group", "delete", "s", "active"]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("member"),
        "{busy:?}"
    );
    let unknown = ferry(&["group", "delete", "s", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no group"),
        "{unknown:?}"
    );
    let ok = ferry(&["group", "delete", "s", "old-job"]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("4 batches"),
        "{ok:?}"
    );
    // The producer goes on; the deleted group is gone from status.
    p.send(b"more", b"", None, T).unwrap();
    let st = d.status();
    assert_eq!(st.streams[0].groups.len(), 1);
    assert_eq!(st.streams[0].groups[0].name, "active");
}

#[test]
fn daemon_not_running_names_the_socket() {
    let path = std::path::Path::new("/tmp/ferry-no-such-daemon/ferryd.sock");
    let e = ferry::Client::connect(Some(path)).err().unwrap();
    assert_eq!(e.status, Status::NotRunning);
    assert!(
        e.message.contains("/tmp/ferry-no-such-daemon/ferryd.sock"),
        "{}",
        e.message
    );
}

#[test]
fn consumer_sees_daemon_death_as_disconnected() {
    let mut d = Daemon::start("", "");
    let client = d.client();
    let _p = client.producer("s", spec(1, 16, 4)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    let e = c.next(Some(Duration::from_secs(5))).unwrap_err();
    assert_eq!(e.status, Status::Disconnected, "{}", e.message);
}

#[test]
fn peers_outside_the_allowed_list_are_refused() {
    let d = Daemon::start("allowed_uids = [4242]", "");
    let e = ferry::Client::connect(Some(&d.socket)).err().unwrap();
    assert_eq!(e.status, Status::PermissionDenied, "{}", e.message);
    assert!(e.message.contains("uid"), "{}", e.message);
    let mode = std::fs::metadata(&d.socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o660);
}

#[test]
fn seek_replays_and_commit_shows_in_status() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 16, 16)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    for i in 0..6u64 {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
    }
    for _ in 0..6 {
        let b = c.next(T).unwrap();
        c.release(b.token).unwrap();
    }
    c.commit().unwrap();
    assert!(eventually(Duration::from_secs(5), || d.status().streams[0]
        .groups[0]
        .partitions[0]
        .committed
        == 6));
    c.seek(0, 2).unwrap();
    for want in 2..6u64 {
        let b = c.next(T).unwrap();
        assert_eq!(b.offset, want);
        // SAFETY (test): held until released.
        assert_eq!(unsafe { b.data() }, &want.to_le_bytes(), "replay is exact");
        c.release(b.token).unwrap();
    }
    let lag = d.status().streams[0].groups[0].lag;
    assert_eq!(lag, 0);
}

#[test]
fn keyed_batches_keep_their_partition() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(8, 16, 64)).unwrap();
    let mut c = client
        .consumer(
            "s",
            "g",
            ConsumerOptions {
                prefetch: 64,
                ..Default::default()
            },
        )
        .unwrap();
    for i in 0..30u64 {
        p.send(&i.to_le_bytes(), b"", Some(i % 3), T).unwrap();
    }
    let mut by_key: HashMap<u64, BTreeSet<u32>> = HashMap::new();
    for _ in 0..30 {
        let b = c.next(T).unwrap();
        // SAFETY (test): held until released.
        let v = u64::from_le_bytes(unsafe { b.data() }.try_into().unwrap());
        by_key.entry(v % 3).or_default().insert(b.partition);
        c.release(b.token).unwrap();
    }
    assert!(by_key.values().all(|parts| parts.len() == 1), "{by_key:?}");
}

#[test]
fn sigterm_drains_in_flight_batches_then_exits_zero() {
    let mut d = Daemon::start("drain_timeout_ms = 10000", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 16, 16)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    for i in 0..10u64 {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
    }
    d.signal(libc::SIGTERM);
    // New sessions are refused while draining...
    assert!(eventually(Duration::from_secs(5), || !d.socket.exists()));
    // ...but everything already published still reaches the consumer.
    for i in 0..10u64 {
        let b = c.next(T).unwrap();
        assert_eq!(b.offset, i);
        c.release(b.token).unwrap();
    }
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0), "{}", d.log());
    assert!(d.log().contains("drained"), "{}", d.log());
}

#[test]
fn the_data_plane_thread_is_placed_as_configured_and_shown() {
    // Soft fabric here: "auto" leaves the thread to the scheduler, and
    // says why.
    let d = Daemon::start("", "");
    let p = d.status().placement;
    assert!(p.cpus.is_empty(), "{p:?}");
    assert!(p.reason.contains("soft fabric"), "{p:?}");
    drop(d);
    // An explicit CPU: the loop's thread (ferryd's main thread) runs
    // there, and `ferry status` says so.
    let last = *ferry_daemon::placement::cpus_here().last().unwrap();
    let d = Daemon::start(&format!("data_plane_cpus = \"{last}\""), "");
    let p = d.status().placement;
    assert_eq!(p.cpus, vec![last], "{p:?}");
    let task = std::fs::read_to_string(format!("/proc/{0}/task/{0}/status", d.pid())).unwrap();
    let allowed = task
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(allowed, last.to_string(), "{task}");
    let out = Command::new(bin("ferry"))
        .args(["status", "--admin-socket", d.admin.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("data plane: CPU {last}")), "{text}");
    drop(d);
    // A CPU this host does not have, or a malformed list: ferryd refuses
    // to start, naming the key.
    for (value, want) in [("4095", "CPU 4095"), ("two", "data_plane_cpus")] {
        let dir = std::env::temp_dir().join(format!("ferry-cpus-{}-{value}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("ferryd.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 1\n[daemon]\nsocket = \"{}\"\ndata_plane_cpus = \"{value}\"\n",
                dir.join("f.sock").display()
            ),
        )
        .unwrap();
        let out = Command::new(bin("ferryd"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{value}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn ferry_status_cli_shows_streams_groups_and_lag() {
    let d = Daemon::start(
        "",
        "[[streams]]\nname = \"images\"\npartitions = 2\nslot_size = 64\nslot_count = 8\n",
    );
    let client = d.client();
    let mut p = client.producer("images", None).unwrap();
    let _c = client
        .consumer("images", "trainers", ConsumerOptions::default())
        .unwrap();
    p.send(b"x", b"", None, T).unwrap();
    let out = Command::new(bin("ferry"))
        .args(["status", "--admin-socket", d.admin.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "stream images",
        "group trainers",
        "lag",
        "slots",
        "partition",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let json = Command::new(bin("ferry"))
        .args([
            "status",
            "--json",
            "--admin-socket",
            d.admin.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&json.stdout).contains("\"end_offsets\""));
    let missing = Command::new(bin("ferry"))
        .args(["status", "--admin-socket", "/tmp/ferry-none/admin.sock"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/tmp/ferry-none/admin.sock"));
}
