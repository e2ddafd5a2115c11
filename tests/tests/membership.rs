//! Membership in etcd, against a real etcd server (Debian `etcd-server`,
//! started here on loopback): daemons with no peer list find each other;
//! a killed one's lease expires and its group rebalances; it rejoins when
//! restarted; an etcd outage shorter than the TTL changes nothing; a
//! longer one leaves the daemons serving local work and saying so, and
//! they converge once etcd is back.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_admin::Status;
use ferry_tests::{eventually, free_port, secret_file, Daemon};

/// A real etcd on loopback, with a data directory that outlives restarts.
struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client: u16,
    peer: u16,
}

impl Etcd {
    fn start() -> Etcd {
        let dir =
            std::env::temp_dir().join(format!("ferry-etcd-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut e = Etcd {
            child: None,
            dir,
            client: free_port(),
            peer: free_port(),
        };
        e.spawn();
        e
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    fn spawn(&mut self) {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect(
                "etcd is not installed (Debian package etcd-server; scripts/setup.sh installs it)",
            );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap();
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new(bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let health = format!("127.0.0.1:{}", self.client);
        assert!(
            eventually(Duration::from_secs(20), || {
                ferry_tests::http_get(&health, "/health")
                    .is_ok_and(|(c, b)| c == 200 && b.contains("true"))
            }),
            "etcd did not become healthy:\n{}",
            self.log()
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn b64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let vals: Vec<u32> = s
        .bytes()
        .filter(|&b| b != b'=')
        .map(|b| A.iter().position(|&a| a == b).unwrap() as u32)
        .collect();
    let mut out = Vec::new();
    for c in vals.chunks(4) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, v)| n | v << (18 - 6 * i));
        for i in 0..c.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// The value of `key` in etcd, read through its HTTP gateway.
fn etcd_get(etcd: &Etcd, key: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let body = format!(r#"{{"key":"{}"}}"#, b64(key.as_bytes()));
    let mut c = std::net::TcpStream::connect(("127.0.0.1", etcd.client)).ok()?;
    write!(
        c,
        "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    let json: serde_json::Value = serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()?;
    let v = json["kvs"][0]["value"].as_str()?;
    serde_json::from_slice(&unb64(v)).ok()
}

const SECRET: &str = "the etcd tests' cluster secret";

/// Daemon `i` of a cluster found through `etcd`, with stream `s` homed on
/// n0 (4 partitions).
fn member(i: usize, port: u16, etcd: &Etcd, prefix: &str, ttl_ms: u64) -> Daemon {
    let dir = std::env::temp_dir().join(format!("ferry-etcd-secret-{}", std::process::id()));
    let secret = secret_file(&dir, "secret", SECRET);
    let stream = if i == 0 {
        "[[streams]]\nname = \"s\"\npartitions = 4\nslot_size = 4096\nslot_count = 16\n"
    } else {
        ""
    };
    Daemon::start(
        "",
        &format!(
            "{stream}[cluster]\nnode_id = \"n{i}\"\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\nmembership = \"etcd\"\netcd_endpoints = [\"{}\"]\netcd_prefix = \"{prefix}\"\netcd_ttl_ms = {ttl_ms}\nheartbeat_ms = 200\npeer_timeout_ms = 1500\nreconnect_max_ms = 500\n",
            secret.display(),
            etcd.url()
        ),
    )
}

fn state(st: &Status, node: &str) -> Option<String> {
    st.peers
        .iter()
        .find(|p| p.node_id == node)
        .map(|p| p.state.clone())
}

fn wait_peer(d: &Daemon, node: &str, want: &str, within: Duration) {
    assert!(
        eventually(within, || state(&d.status(), node).as_deref() == Some(want)),
        "peer {node} never {want}: {:?}\n{}",
        d.status().peers,
        d.log()
    );
}

/// Partitions each member of group `g` of stream `s` owns, at the home.
fn assignment(home: &Daemon) -> Vec<(Option<String>, usize)> {
    let st = home.status();
    let s = st.streams.iter().find(|s| s.name == "s").unwrap();
    s.groups
        .iter()
        .find(|g| g.name == "g")
        .map(|g| {
            g.members
                .iter()
                .map(|m| (m.host.clone(), m.partitions.len()))
                .collect()
        })
        .unwrap_or_default()
}

fn one_batch(c: &mut ferry::Consumer) -> Vec<u8> {
    let b = c.next(Some(Duration::from_secs(10))).expect("a batch");
    // SAFETY (test): the batch's bytes stay mapped until it is released.
    let got = unsafe { std::slice::from_raw_parts(b.data, b.len as usize) }.to_vec();
    c.release(b.token).unwrap();
    got
}

fn prefix() -> String {
    format!("/ferry-test-{}-{}", std::process::id(), free_port())
}

#[test]
fn daemons_find_each_other_in_etcd_a_dead_ones_lease_expires_and_it_rejoins() {
    let etcd = Etcd::start();
    let prefix = prefix();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut d: Vec<Daemon> = (0..3)
        .map(|i| member(i, ports[i], &etcd, &prefix, 2000))
        .collect();
    for (i, di) in d.iter().enumerate() {
        for j in 0..3 {
            if i != j {
                wait_peer(di, &format!("n{j}"), "up", Duration::from_secs(15));
            }
        }
        let m = di.status().membership.expect("membership in the status");
        assert!(m.etcd_up, "{m:?}");
    }
    // What is registered: each daemon, and the streams with their homes
    // (where their groups are coordinated).
    let m = etcd_get(&etcd, &format!("{prefix}/members/n1")).expect("n1 registered");
    assert_eq!(m["addr"], format!("127.0.0.1:{}", ports[1]), "{m}");
    assert_eq!(m["fabric"], "soft", "{m}");
    let s = etcd_get(&etcd, &format!("{prefix}/streams/s")).expect("stream s registered");
    assert_eq!(s["home"], "n0", "{s}");
    assert_eq!(s["partitions"], 4, "{s}");
    // A group spanning n1 and n2, of a stream homed on n0 that neither has
    // in its config: found through the peers etcd named.
    let c1 = d[1].client();
    let c2 = d[2].client();
    assert!(eventually(Duration::from_secs(10), || d[1]
        .status()
        .peers
        .iter()
        .any(
            |p| p.node_id == "n0" && p.streams.iter().any(|s| s == "s")
        )));
    let mut k1 = c1.consumer("s", "g", Default::default()).unwrap();
    let k2 = c2.consumer("s", "g", Default::default()).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            let a = assignment(&d[0]);
            a.len() == 2 && a.iter().all(|(_, n)| *n == 2)
        }),
        "{:?}",
        assignment(&d[0])
    );
    // The cluster view, gathered over the control plane from n1: every
    // daemon, n0's stream with its group spanning n1 and n2.
    let out = Command::new(ferry_tests::bin("ferry"))
        .arg("--admin-socket")
        .arg(&d[1].admin)
        .args(["status", "--cluster", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Status = serde_json::from_slice(&out.stdout).unwrap();
    let nodes: Vec<&str> = st.cluster.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(nodes, ["n0", "n1", "n2"], "{:?}", st.cluster_missing);
    let s0 = &st.cluster[0].streams;
    let g = &s0
        .iter()
        .find(|s| s.name == "s")
        .expect("n0 homes s")
        .groups[0];
    assert_eq!((g.name.as_str(), g.members), ("g", 2), "{g:?}");
    assert_eq!(g.remote_members, ["n1", "n2"]);
    let text = Command::new(ferry_tests::bin("ferry"))
        .arg("--admin-socket")
        .arg(&d[1].admin)
        .args(["status", "--cluster"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("cluster: 3 daemon(s) answered"), "{text}");
    assert!(
        text.contains("group g: 2 members (some on n1, n2)"),
        "{text}"
    );
    // n2 dies: its connection drops at once, its lease expires after the
    // TTL, and the others forget it (it is not redialed).
    drop(k2);
    drop(c2);
    d[2].kill();
    assert!(
        eventually(Duration::from_secs(15), || etcd_get(
            &etcd,
            &format!("{prefix}/members/n2")
        )
        .is_none()),
        "n2's registration outlived its lease"
    );
    for di in &d[..2] {
        wait_peer(di, "n2", "left", Duration::from_secs(15));
        assert!(
            di.log().contains("peer left: its etcd lease expired"),
            "{}",
            di.log()
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || assignment(&d[0])
            == vec![(Some("n1".to_string()), 4)]),
        "the group did not move to n1: {:?}",
        assignment(&d[0])
    );
    let c0 = d[0].client();
    let mut p = c0.producer("s", None).unwrap();
    for i in 0..8u8 {
        p.send(&[i; 16], b"", None, Some(Duration::from_secs(5)))
            .unwrap();
    }
    // `ferry top` on the home sees the stream's rates.
    let top = Command::new(ferry_tests::bin("ferry"))
        .arg("--admin-socket")
        .arg(&d[0].admin)
        .args(["top", "--interval", "0.2", "--count", "1"])
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.contains("STREAM") && top.lines().any(|l| l.starts_with("s ")),
        "{top}"
    );
    let mut got: Vec<u8> = (0..8).map(|_| one_batch(&mut k1)[0]).collect();
    got.sort();
    assert_eq!(
        got,
        (0..8).collect::<Vec<u8>>(),
        "every partition's batches reach n1"
    );
    // n2 comes back and registers again: both see it up.
    d[2] = member(2, ports[2], &etcd, &prefix, 2000);
    for di in &d[..2] {
        wait_peer(di, "n2", "up", Duration::from_secs(15));
    }
    wait_peer(&d[2], "n0", "up", Duration::from_secs(15));
    wait_peer(&d[2], "n1", "up", Duration::from_secs(15));
}

#[test]
fn an_etcd_outage_keeps_the_peers_and_local_work_and_the_cluster_converges_after() {
    let mut etcd = Etcd::start();
    let prefix = prefix();
    let ttl = 3000;
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let d: Vec<Daemon> = (0..2)
        .map(|i| member(i, ports[i], &etcd, &prefix, ttl))
        .collect();
    wait_peer(&d[0], "n1", "up", Duration::from_secs(15));
    wait_peer(&d[1], "n0", "up", Duration::from_secs(15));

    // Shorter than the TTL: etcd restarts; nobody notices a peer go.
    etcd.stop();
    std::thread::sleep(Duration::from_millis(800));
    etcd.spawn();
    let until = Instant::now() + Duration::from_millis(2 * ttl);
    while Instant::now() < until {
        for (i, di) in d.iter().enumerate() {
            let other = format!("n{}", 1 - i);
            assert_eq!(
                state(&di.status(), &other).as_deref(),
                Some("up"),
                "a short etcd outage took {other} away from n{i}:\n{}",
                di.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for di in &d {
        assert!(
            eventually(Duration::from_secs(10), || di
                .status()
                .membership
                .is_some_and(|m| m.etcd_up)),
            "{}",
            di.log()
        );
    }

    // Longer than the TTL: the daemons say etcd is gone, keep their peers,
    // and serve local work.
    etcd.stop();
    for di in &d {
        assert!(
            eventually(Duration::from_secs(10), || di
                .status()
                .membership
                .is_some_and(|m| !m.etcd_up && m.last_error.is_some())),
            "the outage is not reported: {:?}",
            di.status().membership
        );
    }
    std::thread::sleep(Duration::from_millis(2 * ttl));
    for di in &d {
        assert!(
            di.log().contains("keeping the current peers"),
            "{}",
            di.log()
        );
    }
    assert_eq!(state(&d[0].status(), "n1").as_deref(), Some("up"));
    assert_eq!(state(&d[1].status(), "n0").as_deref(), Some("up"));
    let c = d[0].client();
    let mut p = c
        .producer(
            "local",
            Some(ferry::StreamSpec {
                durability: ferry_shm::proto::Durability::MEMORY,
                partitions: 1,
                slot_size: 64,
                slot_count: 4,
            }),
        )
        .unwrap();
    let mut k = c.consumer("local", "g", Default::default()).unwrap();
    p.send(b"no etcd needed", b"", None, Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(one_batch(&mut k), b"no etcd needed");
    // And with etcd back, all is as before: registered, peers up.
    etcd.spawn();
    for di in &d {
        assert!(
            eventually(Duration::from_secs(15), || di
                .status()
                .membership
                .is_some_and(|m| m.etcd_up)),
            "{}",
            di.log()
        );
    }
    std::thread::sleep(Duration::from_millis(ttl + 500));
    assert_eq!(
        state(&d[0].status(), "n1").as_deref(),
        Some("up"),
        "{}",
        d[0].log()
    );
    assert_eq!(
        state(&d[1].status(), "n0").as_deref(),
        Some("up"),
        "{}",
        d[1].log()
    );
}
