//! Daemons together: the peer control plane between real ferryd processes
//! on loopback. Authentication with the cluster secret, refusal of
//! strangers and garbage, heartbeats, failure detection and reconnection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_admin::{PeerStatus, Status};
use ferry_daemon::peers::wire::{self, Frame};
use ferry_tests::{bin, cluster_table, eventually, free_port, secret_file, Daemon};

const SECRET: &str = "correct horse battery staple 42";

fn stream(name: &str) -> String {
    format!("[[streams]]\nname = \"{name}\"\nslot_size = 4096\nslot_count = 8\n")
}

/// A directory of its own for each call (tests run in parallel).
fn secret_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("ferry-cluster-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `n` daemons n0.. on loopback, all peers of each other, each declaring
/// stream s<i>; `extra` goes into every [cluster] table.
fn start_cluster(n: usize, daemon_keys: &str, extra: &str) -> (Vec<Daemon>, Vec<u16>) {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let secret = secret_file(&secret_dir(), "secret", SECRET);
    let daemons = (0..n)
        .map(|i| {
            Daemon::start(
                daemon_keys,
                &format!(
                    "{}{}",
                    stream(&format!("s{i}")),
                    cluster_table(i, &ports, &secret, extra)
                ),
            )
        })
        .collect();
    (daemons, ports)
}

fn peer(st: &Status, node: &str) -> PeerStatus {
    st.peers
        .iter()
        .find(|p| p.node_id == node)
        .cloned()
        .unwrap_or_else(|| panic!("no peer {node} in {:?}", st.peers))
}

/// Waits until `d` knows `stream` as homed on `home`.
fn wait_announced(d: &Daemon, home: &str, stream: &str) {
    assert!(
        eventually(Duration::from_secs(30), || peer(&d.status(), home)
            .streams
            .iter()
            .any(|s| s == stream)),
        "{home} did not announce {stream}: {:?}",
        peer(&d.status(), home)
    );
}

fn state_of(d: &Daemon, node: &str) -> String {
    peer(&d.status(), node).state
}

fn wait_state(d: &Daemon, node: &str, want: &str, within: Duration) {
    assert!(
        eventually(within, || state_of(d, node) == want),
        "peer {node} never became {want}: {:?}\n{}",
        peer(&d.status(), node),
        d.log()
    );
}

#[test]
fn peers_authenticate_agree_on_soft_and_announce_their_streams() {
    let (d, _) = start_cluster(3, "", "heartbeat_ms = 100\npeer_timeout_ms = 1000");
    for (i, di) in d.iter().enumerate() {
        for j in 0..3 {
            if i != j {
                wait_state(di, &format!("n{j}"), "up", Duration::from_secs(10));
            }
        }
    }
    // Heartbeats answered: a round-trip time, bytes both ways; the
    // other's streams as it announced them.
    assert!(eventually(Duration::from_secs(5), || {
        let p = peer(&d[0].status(), "n2");
        p.rtt_us.is_some() && p.bytes_in > 0 && p.bytes_out > 0
    }));
    let st = d[0].status();
    assert_eq!(st.node_id.as_deref(), Some("n0"));
    let p1 = peer(&st, "n1");
    assert!(p1.fabric.starts_with("soft"), "{p1:?}");
    assert_eq!(p1.streams, ["s1"]);
    assert_eq!(peer(&st, "n2").streams, ["s2"]);
    // A stream created later is announced too, and its deletion.
    {
        let c = d[1].client();
        let _p = c
            .producer(
                "made",
                Some(ferry_shm::proto::StreamSpec {
                    durability: Default::default(),
                    partitions: 1,
                    slot_size: 64,
                    slot_count: 4,
                }),
            )
            .unwrap();
        assert!(
            eventually(Duration::from_secs(5), || peer(&d[0].status(), "n1")
                .streams
                == ["made", "s1"]
                || peer(&d[0].status(), "n1").streams == ["s1", "made"]),
            "{:?}",
            peer(&d[0].status(), "n1")
        );
    }
    ferry_admin::Client::new(&d[1].admin)
        .delete_stream("made", false)
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || peer(
        &d[0].status(),
        "n1"
    )
    .streams
        == ["s1"]));
    // The CLI shows them.
    let out = Command::new(bin("ferry"))
        .arg("--admin-socket")
        .arg(&d[0].admin)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cluster: node n0"), "{text}");
    assert!(text.contains("peer n1") && text.contains("up"), "{text}");
}

/// Reads frames from a raw connection until it closes (or 3 s pass).
fn frames_until_closed(s: &mut TcpStream) -> (Vec<Frame>, bool) {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return (got, true),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        if s.read_exact(&mut body).is_err() {
            return (got, true);
        }
        got.push(wire::decode(&body).expect("ferryd sends well-formed frames"));
    }
}

#[test]
fn a_stranger_without_the_secret_learns_nothing_and_is_logged() {
    let (d, ports) = start_cluster(2, "", "");
    wait_state(&d[0], "n1", "up", Duration::from_secs(10));
    // Claims to be n0 (a listed peer, which dials n1) but cannot prove
    // the secret.
    let mut s = TcpStream::connect(("127.0.0.1", ports[1])).unwrap();
    let hello = Frame::Hello {
        magic: wire::MAGIC,
        version: wire::VERSION,
        node: "n0".into(),
        nonce: [9; 32],
    };
    s.write_all(&wire::encode(&hello)).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    let Frame::Challenge { node, .. } = wire::decode(&body).unwrap() else {
        panic!("expected a challenge");
    };
    assert_eq!(node, "n1");
    s.write_all(&wire::encode(&Frame::Proof { proof: [0; 32] }))
        .unwrap();
    let (frames, closed) = frames_until_closed(&mut s);
    assert!(closed, "the connection is closed");
    assert_eq!(
        frames,
        [Frame::Refused {
            reason: "authentication failed".into()
        }],
        "nothing but the refusal"
    );
    assert!(eventually(Duration::from_secs(3), || d[1]
        .status()
        .peer_connections_refused
        >= 1));
    assert!(
        d[1].log().contains("does not hold the cluster secret"),
        "{}",
        d[1].log()
    );
    // The real n0 is still up.
    assert_eq!(state_of(&d[1], "n0"), "up");

    // A daemon that n0 does not list: refused, and told only that.
    let m_port = free_port();
    let m = Daemon::start(
        "",
        &format!(
            "[cluster]\nnode_id = \"m\"\nlisten = \"127.0.0.1:{m_port}\"\nsecret_file = \"{}\"\npeers = [{{ node_id = \"n0\", addr = \"127.0.0.1:{}\" }}]\n",
            secret_file(&secret_dir(), "secret", SECRET).display(),
            ports[0]
        ),
    );
    assert!(
        eventually(Duration::from_secs(5), || peer(&m.status(), "n0")
            .last_error
            .is_some_and(|e| e.contains("refused: not a peer of this daemon"))),
        "{:?}",
        peer(&m.status(), "n0")
    );
    assert!(d[0].log().contains("which is not in cluster.peers"));
    drop(m);

    // Two daemons that list each other with different secrets: never
    // up, and each side says why.
    let (pp, qp) = (free_port(), free_port());
    let good = secret_file(&secret_dir(), "secret", SECRET);
    let other = secret_file(&secret_dir(), "other", "a different secret entirely");
    let table = |me: &str, port: u16, secret: &Path, them: &str, their_port: u16| {
        format!(
            "[cluster]\nnode_id = \"{me}\"\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\npeers = [{{ node_id = \"{them}\", addr = \"127.0.0.1:{their_port}\" }}]\nreconnect_max_ms = 200\n",
            secret.display()
        )
    };
    let p = Daemon::start("", &table("p", pp, &good, "q", qp));
    let q = Daemon::start("", &table("q", qp, &other, "p", pp));
    assert!(
        eventually(Duration::from_secs(5), || peer(&p.status(), "q")
            .last_error
            .is_some_and(|e| e.contains("could not prove"))),
        "{:?}",
        peer(&p.status(), "q")
    );
    assert!(eventually(Duration::from_secs(5), || q
        .status()
        .peer_connections_refused
        >= 1));
    assert_eq!(state_of(&p, "q"), "connecting");
    assert_eq!(state_of(&q, "p"), "connecting");
    assert!(peer(&q.status(), "p").streams.is_empty());
}

#[test]
fn garbage_on_the_control_port_is_dropped_and_everyone_else_is_served() {
    let (d, ports) = start_cluster(2, "handshake_timeout_ms = 1000", "");
    wait_state(&d[0], "n1", "up", Duration::from_secs(10));
    let addr = ("127.0.0.1", ports[0]);
    let send = |bytes: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(bytes);
        frames_until_closed(&mut s)
    };
    // Not a frame at all; an HTTP request; a length over the limit.
    let (f, closed) = send(b"\x13\x37garbage garbage garbage");
    assert!(closed && f.is_empty(), "{f:?}");
    let (f, closed) = send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(closed && f.is_empty(), "{f:?}");
    let (f, closed) = send(&(64u32 << 20).to_le_bytes());
    assert!(closed && f.is_empty(), "{f:?}");
    // A Hello cut short, then silence until the handshake timeout.
    let hello = wire::encode(&Frame::Hello {
        magic: wire::MAGIC,
        version: wire::VERSION,
        node: "n1".into(),
        nonce: [1; 32],
    });
    let (f, closed) = send(&hello[..hello.len() / 2]);
    assert!(closed && f.is_empty(), "{f:?}");
    // A frame out of turn: a Welcome first.
    let (f, closed) = send(&wire::encode(&Frame::Welcome));
    assert!(closed && f.is_empty(), "{f:?}");
    // Another protocol version, and a node that is not a peer: told, and
    // nothing more.
    let (f, closed) = send(&wire::encode(&Frame::Hello {
        magic: wire::MAGIC,
        version: wire::VERSION + 1,
        node: "n1".into(),
        nonce: [1; 32],
    }));
    assert!(closed, "{f:?}");
    assert!(
        matches!(&f[..], [Frame::Refused { reason }] if reason.contains("protocol")),
        "{f:?}"
    );
    let (f, closed) = send(&wire::encode(&Frame::Hello {
        magic: wire::MAGIC,
        version: wire::VERSION,
        node: "nobody".into(),
        nonce: [1; 32],
    }));
    assert!(closed, "{f:?}");
    assert!(matches!(&f[..], [Frame::Refused { .. }]), "{f:?}");
    assert!(eventually(Duration::from_secs(8), || d[0]
        .status()
        .peer_connections_refused
        >= 7));
    // The peer and local clients are served on.
    assert_eq!(state_of(&d[0], "n1"), "up");
    assert_eq!(state_of(&d[1], "n0"), "up");
    let c = d[0].client();
    let mut p = c.producer("s0", None).unwrap();
    let mut cons = c.consumer("s0", "g", Default::default()).unwrap();
    p.send(b"still here", b"", None, Some(Duration::from_secs(5)))
        .unwrap();
    let b = cons.next(Some(Duration::from_secs(5))).unwrap();
    // SAFETY (test): the batch's bytes stay mapped until it is released.
    let got = unsafe { std::slice::from_raw_parts(b.data, b.len as usize) };
    assert_eq!(got, b"still here");
}

#[test]
fn a_silent_peer_is_declared_down_and_a_restarted_one_comes_back() {
    let (mut d, _) = start_cluster(
        2,
        "",
        "heartbeat_ms = 100\npeer_timeout_ms = 600\nreconnect_max_ms = 400",
    );
    wait_state(&d[0], "n1", "up", Duration::from_secs(10));
    // Stopped, not dead: the connection stays open, only the heartbeats
    // stop.
    d[1].signal(libc::SIGSTOP);
    wait_state(&d[0], "n1", "down", Duration::from_secs(3));
    let p = peer(&d[0].status(), "n1");
    assert!(
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("nothing heard")),
        "{p:?}"
    );
    d[1].signal(libc::SIGCONT);
    wait_state(&d[0], "n1", "up", Duration::from_secs(5));
    wait_state(&d[1], "n0", "up", Duration::from_secs(5));
    // Killed and started again: down at once (the connection resets), up
    // again once it is back.
    d[1].kill();
    wait_state(&d[0], "n1", "down", Duration::from_secs(3));
    d[1].restart();
    wait_state(&d[0], "n1", "up", Duration::from_secs(5));
    wait_state(&d[1], "n0", "up", Duration::from_secs(5));
    assert!(peer(&d[0].status(), "n1").errors >= 2);
}

fn check(cfg: &str, dir: &Path) -> (bool, String) {
    std::fs::write(dir.join("check.toml"), cfg).unwrap();
    let out = Command::new(bin("ferryd"))
        .arg("--config")
        .arg(dir.join("check.toml"))
        .arg("--check")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn cluster_config_is_checked_with_clear_errors() {
    use std::os::unix::fs::PermissionsExt;
    let dir = secret_dir().join("check");
    std::fs::create_dir_all(&dir).unwrap();
    let good = secret_file(&dir, "good", SECRET);
    let head = format!(
        "[daemon]\nsocket = \"{}/ferryd.sock\"\n[cluster]\n",
        dir.display()
    );
    let (ok, out) = check(
        &format!(
            "{head}node_id = \"a\"\nlisten = \"127.0.0.1:0\"\nsecret_file = \"{}\"\npeers = [{{ node_id = \"b\", addr = \"127.0.0.1:9\" }}]\n",
            good.display()
        ),
        &dir,
    );
    assert!(ok, "{out}");
    assert!(out.contains("cluster: node a"), "{out}");
    let open = secret_file(&dir, "open", SECRET);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let short = secret_file(&dir, "short", "tiny");
    for (body, want) in [
        (
            format!("node_id = \"a\"\nlisten = \"127.0.0.1:0\"\nsecret_file = \"{}\"\n", open.display()),
            "chmod 600",
        ),
        (
            format!("node_id = \"a\"\nlisten = \"127.0.0.1:0\"\nsecret_file = \"{}\"\n", short.display()),
            "at least 16",
        ),
        (
            "node_id = \"a\"\nlisten = \"127.0.0.1:0\"\n".to_string(),
            "cluster.secret_file is needed",
        ),
        (
            format!("node_id = \"a\"\nsecret_file = \"{}\"\n", good.display()),
            "cluster.listen",
        ),
        (
            format!("node_id = \"a\"\nlisten = \"127.0.0.1:0\"\nsecret_file = \"{}\"\npeers = [{{ node_id = \"a\", addr = \"127.0.0.1:9\" }}]\n", good.display()),
            "own node_id",
        ),
        (
            format!("node_id = \"a\"\nlisten = \"127.0.0.1:0\"\nsecret_file = \"{}\"\npeers = [{{ node_id = \"b\", addr = \"nowhere\" }}]\n", good.display()),
            "not an address:port",
        ),
        (
            format!("node_id = \"a b\"\nlisten = \"127.0.0.1:0\"\nsecret_file = \"{}\"\n", good.display()),
            "cluster.node_id",
        ),
        (
            format!("node_id = \"a\"\nlisten = \"127.0.0.1:0\"\nsecret_file = \"{}\"\nheartbeat_ms = 1000\npeer_timeout_ms = 1000\n", good.display()),
            "at least twice",
        ),
        ("peers = []\nlisten = \"127.0.0.1:0\"\n".to_string(), "need cluster.node_id"),
    ] {
        let (ok, out) = check(&format!("{head}{body}"), &dir);
        assert!(!ok, "accepted:\n{body}");
        assert!(out.contains(want), "{body}\nsays:\n{out}");
    }
    // And a daemon started with it refuses to start.
    let out = Command::new(bin("ferryd"))
        .arg("--config")
        .arg(dir.join("check.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("need cluster.node_id"));
}

/// The bytes of batch `i`: its number, then a pattern of it.
fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len)
        .map(|j| (i as usize).wrapping_mul(31).wrapping_add(j * 7) as u8)
        .collect();
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

#[test]
fn a_trainer_on_another_host_reads_every_batch_in_place() {
    let (d, _) = start_cluster(2, "", "");
    wait_state(&d[1], "n0", "up", Duration::from_secs(10));
    wait_announced(&d[1], "n0", "s0");
    let home = d[0].client();
    let remote = d[1].client();
    let mut cons = remote
        .consumer(
            "s0",
            "g",
            ferry::ConsumerOptions {
                prefetch: 4,
                ..Default::default()
            },
        )
        .expect("a consumer on n1 of a stream homed on n0");
    let mut prod = home.producer("s0", None).unwrap();
    const N: u64 = 200;
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            let len = 8 + (i as usize * 37) % 4000;
            let meta = format!("meta {i}");
            prod.send(
                &payload(i, len),
                meta.as_bytes(),
                None,
                Some(Duration::from_secs(10)),
            )
            .unwrap_or_else(|e| panic!("send {i}: {e}"));
        }
        prod
    });
    for i in 0..N {
        let b = cons
            .next(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("batch {i}: {e}\n{}\n{}", d[0].log(), d[1].log()));
        assert_eq!((b.partition, b.offset), (0, i), "in order, none lost");
        let len = 8 + (i as usize * 37) % 4000;
        // SAFETY (test): the batch stays mapped until released.
        let got = unsafe { std::slice::from_raw_parts(b.data, b.len as usize) };
        assert_eq!(got, &payload(i, len)[..], "batch {i}");
        let meta = unsafe { std::slice::from_raw_parts(b.meta, b.meta_len as usize) };
        assert_eq!(meta, format!("meta {i}").as_bytes());
        cons.release(b.token).unwrap();
    }
    drop(sender.join().unwrap());
    // The home shows the member and where it is.
    let st = d[0].status();
    let g = &st.streams.iter().find(|s| s.name == "s0").unwrap().groups[0];
    assert_eq!(g.members.len(), 1, "{g:?}");
    assert_eq!(g.members[0].host.as_deref(), Some("n1"));
    assert!(eventually(Duration::from_secs(5), || {
        let st = d[0].status();
        let s = st.streams.iter().find(|s| s.name == "s0").unwrap();
        s.slots_held == 0 || s.groups[0].lag == 0
    }));
}

const T: Option<Duration> = Some(Duration::from_secs(10));

fn spec(partitions: u32, slot_size: u64, slot_count: u32) -> Option<ferry_shm::proto::StreamSpec> {
    Some(ferry_shm::proto::StreamSpec {
        durability: Default::default(),
        partitions,
        slot_size,
        slot_count,
    })
}

/// A stream `name` created on `home` and announced to `other`.
fn created_stream(home: &Daemon, other: &Daemon, name: &str, partitions: u32) -> ferry::Producer {
    let p = home
        .client()
        .producer(name, spec(partitions, 4096, 64))
        .unwrap();
    wait_announced(other, "n0", name);
    p
}

/// A consumer process on `d` that takes `count` batches without
/// releasing them; returns it and the (partition, offset)s it holds.
fn holding_consumer(
    d: &Daemon,
    stream: &str,
    group: &str,
    count: usize,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    use std::io::BufRead;
    let mut child = Command::new(bin("ferry-test-consumer"))
        .args([
            d.socket.to_str().unwrap(),
            stream,
            group,
            &count.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

fn read_held(
    lines: &mut std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) -> std::collections::BTreeSet<(u32, u64)> {
    let mut held = std::collections::BTreeSet::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        let (p, o) = line.strip_prefix("held ").unwrap().split_once(':').unwrap();
        held.insert((p.parse().unwrap(), o.parse().unwrap()));
    }
    held
}

fn members_of(d: &Daemon, stream: &str) -> Vec<ferry_admin::MemberStatus> {
    d.status()
        .streams
        .into_iter()
        .find(|s| s.name == stream)
        .map(|s| s.groups.into_iter().flat_map(|g| g.members).collect())
        .unwrap_or_default()
}

/// Takes batches from `c` (releasing each) until every (partition,
/// offset) of `want` was seen; returns how often each came.
fn take_all(
    c: &mut ferry::Consumer,
    want: usize,
    logs: &[&Daemon],
) -> std::collections::HashMap<(u32, u64), u32> {
    let mut seen = std::collections::HashMap::new();
    while seen.len() < want {
        let b = c.next(T).unwrap_or_else(|e| {
            panic!(
                "{e}; seen {} of {want}: {seen:?}\n{}",
                seen.len(),
                logs.iter().map(|d| d.log()).collect::<Vec<_>>().join("\n")
            )
        });
        let i = unsafe { std::slice::from_raw_parts(b.data, 8) };
        let i = u64::from_le_bytes(i.try_into().unwrap());
        assert_eq!(
            unsafe { std::slice::from_raw_parts(b.data, b.len as usize) },
            &payload(i, b.len as usize)[..],
            "bytes of batch {i}"
        );
        *seen.entry((b.partition, b.offset)).or_insert(0) += 1;
        c.release(b.token).unwrap();
    }
    seen
}

/// A consumer process on n1 holds three batches of a group whose other
/// member is on n0; `kill` ends it (the process, or its whole daemon);
/// every batch then reaches the member on n0, those three included.
fn holder_dies(extra: &str, kill: impl FnOnce(&mut [Daemon], &mut std::process::Child)) {
    let (mut d, _) = start_cluster(2, "", extra);
    wait_state(&d[1], "n0", "up", Duration::from_secs(10));
    let mut prod = created_stream(&d[0], &d[1], "multi", 2);
    let mut local = d[0]
        .client()
        .consumer(
            "multi",
            "g",
            ferry::ConsumerOptions {
                prefetch: 32,
                ..Default::default()
            },
        )
        .unwrap();
    let (mut child, mut lines) = holding_consumer(&d[1], "multi", "g", 3);
    assert!(
        eventually(Duration::from_secs(5), || members_of(&d[0], "multi").len()
            == 2),
        "{:?}",
        members_of(&d[0], "multi")
    );
    assert!(members_of(&d[0], "multi")
        .iter()
        .any(|m| m.host.as_deref() == Some("n1")));
    const N: u64 = 24;
    for i in 0..N {
        prod.send(&payload(i, 64), b"", Some(i), T).unwrap();
    }
    let held = read_held(&mut lines);
    assert_eq!(held.len(), 3);
    kill(&mut d, &mut child);
    // None lost: the three it held were redelivered.
    let seen = take_all(&mut local, N as usize, &[&d[0], &d[1]]);
    for h in &held {
        assert!(seen.contains_key(h), "{h:?} redelivered");
    }
    assert!(eventually(Duration::from_secs(5), || members_of(
        &d[0], "multi"
    )
    .len()
        == 1));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_killed_consumer_on_another_host_leaves_its_batches_to_its_group() {
    // SIGKILL: no goodbye; its daemon sees the socket close.
    holder_dies("", |_, child| {
        child.kill().unwrap();
        child.wait().unwrap();
    });
}

#[test]
fn a_consumer_host_that_dies_leaves_its_batches_to_its_group() {
    // The consumer's whole daemon dies: the home rebalances within the
    // heartbeat timeout.
    holder_dies("heartbeat_ms = 100\npeer_timeout_ms = 600", |d, _| {
        d[1].kill()
    });
}

#[test]
fn consumers_wait_while_their_stream_s_home_is_gone_and_go_on_when_it_is_back() {
    let (mut d, _) = start_cluster(
        2,
        "",
        "heartbeat_ms = 100\npeer_timeout_ms = 600\nreconnect_max_ms = 200",
    );
    wait_state(&d[1], "n0", "up", Duration::from_secs(10));
    wait_announced(&d[1], "n0", "s0");
    let mut cons = d[1]
        .client()
        .consumer("s0", "g", Default::default())
        .unwrap();
    {
        let mut prod = d[0].client().producer("s0", None).unwrap();
        for i in 0..5 {
            prod.send(&payload(i, 100), b"", None, T).unwrap();
        }
    }
    let seen = take_all(&mut cons, 5, &[&d[0], &d[1]]);
    assert_eq!(seen.len(), 5);
    // The home dies: the consumer's session stays, and says so.
    d[0].kill();
    assert!(eventually(Duration::from_secs(3), || d[1]
        .status()
        .remote_consumers
        .first()
        .is_some_and(|r| r.state == "waiting")));
    let e = cons.next(Some(Duration::from_millis(300))).unwrap_err();
    assert!(
        e.to_string().contains("timed out") || e.to_string().contains("timeout"),
        "{e}"
    );
    // Back (empty: streams are in memory only): the consumer joins again
    // and gets what is published now.
    d[0].restart();
    assert!(
        eventually(Duration::from_secs(5), || d[1]
            .status()
            .remote_consumers
            .first()
            .is_some_and(|r| r.state == "active")),
        "{:?}\n{}",
        d[1].status().remote_consumers,
        d[1].log()
    );
    let mut prod = d[0].client().producer("s0", None).unwrap();
    for i in 100..105 {
        prod.send(&payload(i, 100), b"", None, T).unwrap();
    }
    let seen = take_all(&mut cons, 5, &[&d[0], &d[1]]);
    assert_eq!(seen.len(), 5);
}

#[test]
fn a_disk_stream_s_home_restarts_and_its_group_on_another_host_goes_on_from_its_commit() {
    let ports = [free_port(), free_port()];
    let dir = secret_dir();
    let secret = secret_file(&dir, "secret", SECRET);
    let timing = "heartbeat_ms = 100\npeer_timeout_ms = 600\nreconnect_max_ms = 200";
    let mut home = Daemon::start(
        &format!(
            "data_dir = \"{}\"\noffsets_flush_ms = 20",
            dir.join("data").display()
        ),
        &format!(
            "{}durability = \"disk\"\n{}",
            stream("s0"),
            cluster_table(0, &ports, &secret, timing)
        ),
    );
    let other = Daemon::start("", &cluster_table(1, &ports, &secret, timing));
    wait_state(&other, "n0", "up", Duration::from_secs(10));
    wait_announced(&other, "n0", "s0");
    let mut cons = other
        .client()
        .consumer(
            "s0",
            "g",
            ferry::ConsumerOptions {
                prefetch: 2,
                ..Default::default()
            },
        )
        .unwrap();
    let mut prod = home.client().producer("s0", None).unwrap();
    for i in 0..20 {
        prod.send(&payload(i, 100), b"", None, T).unwrap();
    }
    prod.flush(T).unwrap();
    drop(prod);
    let seen = take_all(&mut cons, 10, &[&home, &other]);
    assert_eq!(seen.keys().map(|k| k.1).max(), Some(9));
    // Its releases commit (at the home); then the home dies and comes back.
    std::thread::sleep(Duration::from_millis(300));
    home.kill();
    home.restart();
    assert!(home.log().contains("1 group(s) restored"), "{}", home.log());
    // The member joins again and gets the rest, from the commit: nothing
    // acknowledged is lost, nothing released comes again (what was on its
    // ring unreleased when the home died, at most its prefetch of 2, may:
    // at least once).
    let rest = take_all(&mut cons, 10, &[&home, &other]);
    let mut offsets: Vec<u64> = rest.keys().map(|k| k.1).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (10..20).collect::<Vec<u64>>());
    assert!(
        rest.iter().all(|(k, &n)| n == 1 || (n == 2 && k.1 < 12)),
        "{rest:?}"
    );
}

#[test]
fn a_producer_on_another_host_is_acknowledged_only_what_its_disk_stream_s_home_made_durable() {
    let ports = [free_port(), free_port()];
    let dir = secret_dir();
    let secret = secret_file(&dir, "secret", SECRET);
    let timing = "heartbeat_ms = 100\npeer_timeout_ms = 600\nreconnect_max_ms = 200";
    // fsync once a second: a flush waits for it.
    let mut home = Daemon::start(
        &format!("data_dir = \"{}\"", dir.join("data").display()),
        &format!(
            "{}durability = \"disk\"\nfsync = \"interval\"\nfsync_interval_ms = 1000\n{}",
            stream("s0"),
            cluster_table(0, &ports, &secret, timing)
        ),
    );
    // Its closing outbox waits for the dead home at the end: not for long.
    let other = Daemon::start(
        "drain_timeout_ms = 1000",
        &cluster_table(1, &ports, &secret, timing),
    );
    wait_state(&other, "n0", "up", Duration::from_secs(10));
    wait_announced(&other, "n0", "s0");
    let c = other.client();
    let mut prod = c.producer("s0", None).unwrap();
    for i in 0..30 {
        prod.send(&payload(i, 100), b"", None, T).unwrap();
    }
    prod.flush(T).unwrap();
    assert_eq!(
        prod.acked(),
        (30, 30),
        "every publish acknowledged by the flush"
    );
    // Acknowledged means synced at the home (not only taken by it).
    let st = home.status();
    let d = st.streams[0].disk.as_ref().unwrap();
    assert_eq!(d.unsynced, 0, "acknowledged before the home synced: {d:?}");
    assert_eq!(st.streams[0].published, 30);
    // The home dies at once, with no chance to sync more: every
    // acknowledged batch is on its disk.
    home.kill();
    drop(prod);
    home.restart();
    let mut cons = home
        .client()
        .consumer(
            "s0",
            "g",
            ferry::ConsumerOptions {
                start: ferry::GroupStart::Earliest,
                ..Default::default()
            },
        )
        .unwrap();
    let seen = take_all(&mut cons, 30, &[&home, &other]);
    let mut offsets: Vec<u64> = seen.keys().map(|k| k.1).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..30).collect::<Vec<u64>>());
}

#[test]
fn a_cut_link_between_two_hosts_heals_by_itself_and_loses_nothing() {
    let hosts = ferry_tests::TwoHosts::new();
    let secret = secret_file(&secret_dir(), "secret", SECRET);
    let port = 7600;
    let table = |me: &str, my_ip: &str, them: &str, their_ip: &str| {
        format!(
            "[cluster]\nnode_id = \"{me}\"\nlisten = \"{my_ip}:{port}\"\nsecret_file = \"{}\"\npeers = [{{ node_id = \"{them}\", addr = \"{their_ip}:{port}\" }}]\nheartbeat_ms = 100\npeer_timeout_ms = 600\nreconnect_max_ms = 200\n",
            secret.display()
        )
    };
    let a = Daemon::start_in_netns(
        &hosts.a,
        "",
        &format!(
            "[[streams]]\nname = \"s\"\npartitions = 2\nslot_size = 4096\nslot_count = 64\n{}",
            table("n0", &hosts.ip_a, "n1", &hosts.ip_b)
        ),
    );
    let b = Daemon::start_in_netns(&hosts.b, "", &table("n1", &hosts.ip_b, "n0", &hosts.ip_a));
    wait_state(&b, "n0", "up", Duration::from_secs(10));
    wait_announced(&b, "n0", "s");
    const PREFETCH: u32 = 8;
    let mut cons = b
        .client()
        .consumer(
            "s",
            "g",
            ferry::ConsumerOptions {
                prefetch: PREFETCH,
                ..Default::default()
            },
        )
        .unwrap();
    const N: u64 = 400;
    let mut prod = a.client().producer("s", None).unwrap();
    let producer = std::thread::spawn(move || {
        for i in 0..N {
            prod.send(
                &payload(i, 1000),
                b"",
                Some(i),
                Some(Duration::from_secs(30)),
            )
            .unwrap_or_else(|e| panic!("send {i}: {e}"));
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let mut seen: std::collections::HashMap<(u32, u64), u32> = Default::default();
    let mut cut_done = false;
    while seen.len() < N as usize {
        if !cut_done && seen.len() >= 100 {
            // The cable is pulled for longer than the peer timeout, then
            // put back.
            hosts.link(false);
            assert!(
                eventually(Duration::from_secs(3), || state_of(&b, "n0") == "down"),
                "{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(500));
            hosts.link(true);
            cut_done = true;
        }
        let batch = cons
            .next(Some(Duration::from_secs(15)))
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: {} of {N} seen\nhome: {}\nconsumer host: {}\n{}\n{}",
                    seen.len(),
                    serde_json::to_string(&a.status()).unwrap(),
                    serde_json::to_string(&b.status()).unwrap(),
                    a.log(),
                    b.log()
                )
            });
        let i = u64::from_le_bytes(
            unsafe { std::slice::from_raw_parts(batch.data, 8) }
                .try_into()
                .unwrap(),
        );
        assert_eq!(
            unsafe { std::slice::from_raw_parts(batch.data, batch.len as usize) },
            &payload(i, 1000)[..]
        );
        *seen.entry((batch.partition, batch.offset)).or_insert(0) += 1;
        cons.release(batch.token).unwrap();
    }
    producer.join().unwrap();
    let dups: u32 = seen.values().map(|&n| n - 1).sum();
    eprintln!("link cut: {N} batches, {dups} delivered twice");
    assert!(
        dups <= 2 * PREFETCH,
        "{dups} duplicates, more than the in-flight window allows"
    );
    assert_eq!(state_of(&b, "n0"), "up");
    assert!(b.log().contains("peer down"));
}

#[test]
fn a_group_spans_three_hosts_and_gets_every_batch_exactly_once() {
    let (d, _) = start_cluster(3, "", "");
    for di in &d[1..] {
        wait_state(di, "n0", "up", Duration::from_secs(10));
    }
    let mut prod = d[0].client().producer("wide", spec(6, 4096, 64)).unwrap();
    for di in &d[1..] {
        wait_announced(di, "n0", "wide");
    }
    const N: u64 = 600;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let consumers: Vec<_> = d
        .iter()
        .map(|di| {
            let c = di
                .client()
                .consumer(
                    "wide",
                    "g",
                    ferry::ConsumerOptions {
                        prefetch: 4,
                        ..Default::default()
                    },
                )
                .unwrap();
            (c, done.clone())
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || members_of(&d[0], "wide").len()
            == 3),
        "{:?}",
        members_of(&d[0], "wide")
    );
    let threads: Vec<_> = consumers
        .into_iter()
        .map(|(mut c, done)| {
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while done.load(std::sync::atomic::Ordering::Relaxed) < N {
                    let Ok(b) = c.next(Some(Duration::from_millis(200))) else {
                        continue;
                    };
                    let data = unsafe { std::slice::from_raw_parts(b.data, b.len as usize) };
                    let i = u64::from_le_bytes(data[..8].try_into().unwrap());
                    assert_eq!(data, &payload(i, b.len as usize)[..], "bytes of batch {i}");
                    got.push((b.partition, b.offset, i));
                    c.release(b.token).unwrap();
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                got
            })
        })
        .collect();
    for i in 0..N {
        prod.send(&payload(i, 100 + (i as usize % 900)), b"", Some(i), T)
            .unwrap();
    }
    let per_host: Vec<Vec<(u32, u64, u64)>> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut all: Vec<u64> = per_host.iter().flatten().map(|&(_, _, i)| i).collect();
    all.sort_unstable();
    let dups = all.windows(2).filter(|w| w[0] == w[1]).count();
    all.dedup();
    eprintln!(
        "three hosts: {} batches, per host {:?}, {dups} duplicates",
        all.len(),
        per_host.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(all.len() as u64, N, "none lost");
    assert_eq!(dups, 0, "none twice");
    for (h, got) in per_host.iter().enumerate() {
        assert!(!got.is_empty(), "host n{h} got its share");
    }
}

#[test]
fn seek_and_commit_from_another_host_replay_the_same_bytes() {
    let (d, _) = start_cluster(2, "", "");
    wait_state(&d[1], "n0", "up", Duration::from_secs(10));
    wait_announced(&d[1], "n0", "s0");
    let mut cons = d[1]
        .client()
        .consumer("s0", "g", Default::default())
        .unwrap();
    let mut prod = d[0].client().producer("s0", None).unwrap();
    for i in 0..6 {
        prod.send(&payload(i, 300), b"", None, T).unwrap();
    }
    let mut first = Vec::new();
    for _ in 0..6 {
        let b = cons.next(T).unwrap();
        first.push((
            b.offset,
            unsafe { std::slice::from_raw_parts(b.data, b.len as usize) }.to_vec(),
        ));
        cons.release(b.token).unwrap();
    }
    cons.commit().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let st = d[0].status();
            st.streams.iter().find(|s| s.name == "s0").unwrap().groups[0].partitions[0].committed
                == 6
        }),
        "the commit reached the home"
    );
    // Back to offset 2: the same bytes again, in order.
    cons.seek(0, 2).unwrap();
    for (off, bytes) in &first[2..] {
        let b = cons.next(T).unwrap();
        assert_eq!(b.offset, *off);
        assert_eq!(
            unsafe { std::slice::from_raw_parts(b.data, b.len as usize) },
            &bytes[..]
        );
        cons.release(b.token).unwrap();
    }
    // A seek the home cannot serve says why.
    let e = cons.seek(0, 1000).unwrap_err();
    assert!(
        e.to_string().contains("1000") || e.to_string().to_lowercase().contains("offset"),
        "{e}"
    );
}

/// Reads one frame off a raw connection.
fn read_frame(s: &mut TcpStream) -> Frame {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    wire::decode(&body).unwrap()
}

#[test]
fn an_authenticated_peer_that_sends_garbage_is_dropped_and_the_rest_served() {
    use ferry_daemon::peers::auth::{self, Role};
    // n2 lists n0 and n1; n0 never starts: this test speaks for it, with
    // the secret, then misbehaves.
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let secret_path = secret_file(&secret_dir(), "secret", SECRET);
    let mk = |i: usize| {
        Daemon::start(
            "",
            &format!(
                "{}{}",
                stream(&format!("s{i}")),
                cluster_table(i, &ports, &secret_path, "")
            ),
        )
    };
    let (n1, n2) = (mk(1), mk(2));
    wait_state(&n2, "n1", "up", Duration::from_secs(10));
    let secret = auth::Secret::new(SECRET.as_bytes().to_vec());
    let handshake = || {
        let mut s = TcpStream::connect(("127.0.0.1", ports[2])).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let nd = [5u8; 32];
        s.write_all(&wire::encode(&Frame::Hello {
            magic: wire::MAGIC,
            version: wire::VERSION,
            node: "n0".into(),
            nonce: nd,
        }))
        .unwrap();
        let Frame::Challenge {
            node,
            nonce: na,
            proof,
        } = read_frame(&mut s)
        else {
            panic!("a challenge");
        };
        assert!(auth::check(
            &secret,
            Role::Acceptor,
            "n0",
            &node,
            &nd,
            &na,
            &proof
        ));
        let mine = auth::prove(&secret, Role::Dialer, "n0", &node, &nd, &na);
        s.write_all(&wire::encode(&Frame::Proof { proof: mine }))
            .unwrap();
        assert_eq!(read_frame(&mut s), Frame::Welcome);
        s.write_all(&wire::encode(&Frame::Msg(wire::PeerMsg::Fabric(
            wire::FabricOffer { ibv: None },
        ))))
        .unwrap();
        assert!(matches!(
            read_frame(&mut s),
            Frame::Msg(wire::PeerMsg::Fabric(_))
        ));
        s
    };
    // Garbage after the handshake; a handshake frame out of turn; a frame
    // cut short; a data-plane message about a member that does not exist.
    let mut s = handshake();
    wait_state(&n2, "n0", "up", Duration::from_secs(5));
    s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    let (_, closed) = frames_until_closed(&mut s);
    assert!(closed);
    wait_state(&n2, "n0", "down", Duration::from_secs(5));
    assert!(n2.log().contains("undecodable frame"), "{}", n2.log());

    let mut s = handshake();
    wait_state(&n2, "n0", "up", Duration::from_secs(5));
    s.write_all(&wire::encode(&Frame::Welcome)).unwrap();
    assert!(frames_until_closed(&mut s).1);
    wait_state(&n2, "n0", "down", Duration::from_secs(5));
    assert!(
        n2.log().contains("a Welcome after the handshake"),
        "{}",
        n2.log()
    );

    let mut s = handshake();
    wait_state(&n2, "n0", "up", Duration::from_secs(5));
    s.write_all(&wire::encode(&Frame::Msg(wire::PeerMsg::Release {
        member: 77,
        partition: 0,
        offset: 0,
        home_slot: 0,
        landing_slot: 0,
        commit: false,
    })))
    .unwrap();
    let mut cut = wire::encode(&Frame::Msg(wire::PeerMsg::Ping { seq: 1, t_us: 1 }));
    cut.truncate(cut.len() - 2);
    s.write_all(&cut).unwrap();
    // A FIN, not a reset (closing with unread data would reset).
    s.shutdown(std::net::Shutdown::Write).unwrap();
    wait_state(&n2, "n0", "down", Duration::from_secs(5));
    drop(s);
    assert!(n2.log().contains("inside a frame"), "{}", n2.log());

    // n2 serves n1 and its own clients on.
    assert_eq!(state_of(&n2, "n1"), "up");
    assert_eq!(state_of(&n1, "n2"), "up");
    let c = n2.client();
    let mut p = c.producer("s2", None).unwrap();
    let mut cons = c.consumer("s2", "g", Default::default()).unwrap();
    p.send(b"fine", b"", None, T).unwrap();
    assert_eq!(cons.next(T).unwrap().len, 4);
}

#[test]
fn producers_on_two_hosts_publish_into_one_stream_and_its_epochs_end_together() {
    let (d, _) = start_cluster(2, "", "");
    wait_state(&d[1], "n0", "up", Duration::from_secs(10));
    let mut near = created_stream(&d[0], &d[1], "joint", 2);
    let mut cons = d[0]
        .client()
        .consumer(
            "joint",
            "g",
            ferry::ConsumerOptions {
                prefetch: 16,
                ..Default::default()
            },
        )
        .unwrap();
    let remote = d[1].client();
    let mut far = remote
        .producer("joint", None)
        .expect("a producer on n1 of a stream homed on n0");
    assert!(
        eventually(Duration::from_secs(5), || d[0]
            .status()
            .streams
            .iter()
            .find(|s| s.name == "joint")
            .is_some_and(|s| s
                .producers
                .iter()
                .any(|p| p.host.as_deref() == Some("n1")))),
        "the home lists the producer elsewhere"
    );
    const N: u64 = 300;
    let t = std::thread::spawn(move || {
        for i in 0..N {
            far.send(
                &payload(i, 100 + (i as usize * 13) % 3000),
                b"far",
                Some(i),
                T,
            )
            .unwrap_or_else(|e| panic!("far send {i}: {e}"));
        }
        far.end().unwrap();
        far
    });
    let t2 = std::thread::spawn(move || {
        for i in N..2 * N {
            near.send(&payload(i, 200), b"near", Some(i), T).unwrap();
        }
        near.end().unwrap();
        near
    });
    let mut seen = std::collections::BTreeSet::new();
    let mut per_partition: std::collections::HashMap<u32, u64> = Default::default();
    loop {
        match cons.next(T) {
            Ok(b) => {
                let data = unsafe { std::slice::from_raw_parts(b.data, b.len as usize) };
                let i = u64::from_le_bytes(data[..8].try_into().unwrap());
                assert_eq!(data, &payload(i, b.len as usize)[..], "bytes of {i}");
                let meta = unsafe { std::slice::from_raw_parts(b.meta, b.meta_len as usize) };
                assert_eq!(meta, if i < N { &b"far"[..] } else { &b"near"[..] });
                // In order per partition.
                let next = per_partition.entry(b.partition).or_insert(0);
                assert_eq!(b.offset, *next);
                *next += 1;
                assert!(seen.insert(i), "{i} twice");
                cons.release(b.token).unwrap();
            }
            Err(e) if e.status == ferry::Status::EndOfEpoch => break,
            Err(e) => panic!("{e}; {} seen\n{}\n{}", seen.len(), d[0].log(), d[1].log()),
        }
    }
    let far = t.join().unwrap();
    let _near = t2.join().unwrap();
    assert_eq!(
        seen.len() as u64,
        2 * N,
        "every batch of both producers, then the end of the epoch"
    );
    // The producer elsewhere leaves: the home forgets it.
    drop(far);
    assert!(eventually(Duration::from_secs(5), || d[0]
        .status()
        .streams
        .iter()
        .find(|s| s.name == "joint")
        .is_some_and(|s| s.producers.iter().all(|p| p.host.is_none()))));
}

#[test]
fn a_producer_elsewhere_learns_that_its_stream_s_home_went_down() {
    let (mut d, _) = start_cluster(2, "", "heartbeat_ms = 100\npeer_timeout_ms = 600");
    wait_state(&d[1], "n0", "up", Duration::from_secs(10));
    wait_announced(&d[1], "n0", "s0");
    // Producer and consumer both on n1, the stream's home on n0: every
    // batch goes there and back.
    let c = d[1].client();
    let mut far = c.producer("s0", None).unwrap();
    let mut cons = c.consumer("s0", "g", Default::default()).unwrap();
    for i in 0..20 {
        far.send(&payload(i, 500), b"", None, T).unwrap();
        let b = cons.next(T).unwrap();
        assert_eq!(b.offset, i);
        assert_eq!(
            unsafe { std::slice::from_raw_parts(b.data, b.len as usize) },
            &payload(i, 500)[..]
        );
        cons.release(b.token).unwrap();
    }
    d[0].kill();
    let mut err = None;
    for i in 20..200 {
        if let Err(e) = far.send(&payload(i, 500), b"", None, Some(Duration::from_secs(2))) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("publishing fails once the home is gone");
    assert!(
        e.to_string().contains("home") || d[1].log().contains("went down"),
        "{e}\n{}",
        d[1].log()
    );
    assert!(d[1]
        .log()
        .contains("batches published since its last acknowledgement may be lost"));
}

#[test]
#[ignore = "needs an RDMA device: scripts/test.sh runs it on kernel soft-RoCE in the rxe VM (scripts/rxe-vm.sh)"]
fn two_daemons_on_real_verbs_move_batches_both_ways() {
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let secret = secret_file(&secret_dir(), "secret", SECRET);
    let ibv = "[fabric]\nprovider = \"ibv\"\n";
    let d: Vec<Daemon> = (0..2)
        .map(|i| {
            Daemon::start(
                "",
                &format!(
                    "{}{ibv}{}",
                    stream(&format!("s{i}")),
                    cluster_table(i, &ports, &secret, "")
                ),
            )
        })
        .collect();
    wait_state(&d[1], "n0", "up", Duration::from_secs(30));
    let p = peer(&d[1].status(), "n0");
    assert!(p.fabric.starts_with("ibv"), "{p:?}");
    assert!(
        eventually(Duration::from_secs(30), || d[1]
            .log()
            .contains("data link up")),
        "{}",
        d[1].log()
    );
    wait_announced(&d[1], "n0", "s0");
    // A consumer on n1 of s0 (homed on n0), fed by a producer on n0 and
    // one on n1: the NIC writes every batch into the memory the consumer
    // reads, and the producer's into the home's pool.
    let mut cons = d[1]
        .client()
        .consumer("s0", "g", Default::default())
        .unwrap();
    let mut near = d[0].client().producer("s0", None).unwrap();
    let mut far = d[1].client().producer("s0", None).unwrap();
    let mut want = std::collections::BTreeSet::new();
    for i in 0..40u64 {
        let len = 8 + (i as usize * 997) % 4000;
        if i % 2 == 0 {
            near.send(&payload(i, len), b"near", None, T).unwrap();
        } else {
            far.send(&payload(i, len), b"far", None, T).unwrap();
        }
        want.insert(i);
        let b = cons
            .next(T)
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", d[0].log(), d[1].log()));
        let data = unsafe { std::slice::from_raw_parts(b.data, b.len as usize) };
        let got = u64::from_le_bytes(data[..8].try_into().unwrap());
        assert_eq!(data, &payload(got, b.len as usize)[..]);
        assert!(want.remove(&got));
        cons.release(b.token).unwrap();
    }
}

/// A producer on another host than its stream's home: its `flush` after
/// `end()` returns once the home took the end (not once its own ferryd
/// read it), so that producers on two hosts ending in turn never merge
/// two epochs (a user trial lost up to half of the ends that way: the
/// home read the next epoch's publishes of its own producer first).
#[test]
fn a_producer_elsewhere_flushes_once_the_home_took_its_end_of_epoch() {
    let (d, _) = start_cluster(2, "", "");
    wait_state(&d[1], "n0", "up", Duration::from_secs(10));
    let mut near = created_stream(&d[0], &d[1], "turns", 2);
    let mut cons = d[0]
        .client()
        .consumer("turns", "g", Default::default())
        .unwrap();
    let remote = d[1].client();
    let mut far = remote.producer("turns", None).unwrap();
    // The home stopped: the end cannot be taken, the flush waits.
    far.send(&[0], b"", None, T).unwrap();
    far.flush(T).unwrap();
    d[0].signal(libc::SIGSTOP);
    far.end().unwrap();
    let e = far.flush(Some(Duration::from_millis(500)));
    d[0].signal(libc::SIGCONT);
    let e = e.expect_err("flushed before the home took the end");
    assert_eq!(e.status, ferry::Status::Timeout, "{e}");
    assert!(e.message.contains("ends of epoch"), "{e}");
    far.flush(T).unwrap();
    near.send(&[0], b"", None, T).unwrap();
    near.end().unwrap();
    near.flush(T).unwrap();
    // In turns, each flushing after its end: every epoch ends apart.
    for epoch in 1..=10u8 {
        near.send(&[epoch], b"", None, T).unwrap();
        far.send(&[epoch], b"", None, T).unwrap();
        far.end().unwrap();
        far.flush(T).unwrap();
        near.end().unwrap();
        near.flush(T).unwrap();
    }
    let seen: String = ferry_tests::epochs_seen(&mut cons, 11)
        .into_iter()
        .collect();
    let want: String = (0..=10u8)
        .map(|e| format!("{0}{0}E", (b'0' + e) as char))
        .collect();
    assert_eq!(seen, want);
}

/// A host with a consumer and a producer of a stream homed elsewhere:
/// `ferry status <stream>` there shows them (it said "no stream named"),
/// producers included, and where the stream's home is.
#[test]
fn a_host_shows_its_consumers_and_producers_of_a_stream_homed_elsewhere() {
    let (d, _) = start_cluster(2, "", "");
    wait_state(&d[1], "n0", "up", Duration::from_secs(10));
    let _near = created_stream(&d[0], &d[1], "away", 2);
    let c = d[1].client();
    let mut far = c.producer("away", None).unwrap();
    far.send(b"x", b"", None, T).unwrap();
    far.flush(T).unwrap();
    let _cons = c.consumer("away", "g", Default::default()).unwrap();
    let admin = ferry_admin::Client::new(&d[1].admin);
    let mut st = admin.status(Some("away")).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        st = admin.status(Some("away")).unwrap();
        st.remote_producers.first().is_some_and(|p| p.acked == 1)
    }));
    assert!(st.streams.is_empty(), "not homed here");
    let p = &st.remote_producers[0];
    assert_eq!(
        (
            p.stream.as_str(),
            p.home.as_str(),
            p.state.as_str(),
            p.published
        ),
        ("away", "n0", "active", 1)
    );
    assert_eq!(st.remote_consumers.len(), 1);
    assert!(admin.status(Some("nowhere")).is_err());
    let out = Command::new(bin("ferry"))
        .arg("--admin-socket")
        .arg(&d[1].admin)
        .args(["status", "away"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("of stream away (home n0): active, 1 published, 1 acknowledged by the home"),
        "{text}"
    );
    assert!(text.contains("stream away: homed on n0"), "{text}");
}
