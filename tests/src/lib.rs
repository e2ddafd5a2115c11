//! Helpers for the workspace integration tests: run a real ferryd in a
//! private directory and find the workspace's binaries.

pub mod raw;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Directory holding the workspace's built binaries (target/debug or
/// target/release), or FERRY_BIN_DIR.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A ferryd running in its own temporary directory. Killed on drop.
pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub admin: PathBuf,
    pub child: Option<Child>,
    /// The network namespace it runs in (`ip netns exec`).
    pub netns: Option<String>,
    /// Environment variables it gets. With `WATCHDOG_USEC` among them it
    /// also gets `WATCHDOG_PID` set to its own pid, as systemd does.
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts ferryd with `extra` appended to a config that sets the
    /// socket paths (so `extra` may hold [[streams]] tables and
    /// `daemon` keys other than the sockets, given as `key = value` lines
    /// under the implicit [daemon] table).
    pub fn start(daemon_keys: &str, streams: &str) -> Daemon {
        let mut d = Daemon::start_stopped(daemon_keys, streams);
        d.spawn();
        d
    }

    /// The daemon's directory and config, not started yet.
    fn start_stopped(daemon_keys: &str, streams: &str) -> Daemon {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-it-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("ferryd.sock");
        let admin = dir.join("ferryd-admin.sock");
        let cfg = format!(
            "version = 1\n[daemon]\nsocket = \"{}\"\nlog = \"ferry_daemon=debug\"\n{daemon_keys}\n{streams}\n",
            socket.display()
        );
        std::fs::write(dir.join("ferryd.toml"), cfg).unwrap();
        Daemon {
            dir,
            socket,
            admin,
            child: None,
            netns: None,
            env: Vec::new(),
        }
    }

    /// Like [`Daemon::start`], with environment variables `env`.
    pub fn start_with_env(daemon_keys: &str, streams: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon::start_stopped(daemon_keys, streams);
        d.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        d.spawn();
        d
    }

    /// Starts ferryd (again) from its config; the log is appended to.
    fn spawn(&mut self) {
        // Counted before the child starts: it may be ready before we look.
        let ready_before = self.log().matches("ferryd ready").count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("ferryd.log"))
            .unwrap();
        let mut cmd = match &self.netns {
            // `ip netns exec` execs ferryd: the child's pid is ferryd's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("ferryd"));
                c
            }
            None if self.env.iter().any(|(k, _)| k == "WATCHDOG_USEC") => {
                // The shell execs ferryd: its pid is the shell's.
                let mut c = Command::new("sh");
                c.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
                    .arg(bin("ferryd"));
                c
            }
            None => Command::new(bin("ferryd")),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = cmd
            .arg("--config")
            .arg(self.dir.join("ferryd.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferryd");
        self.child = Some(child);
        self.wait_ready_after(ready_before);
    }

    /// Like [`Daemon::start`], with ferryd in network namespace `netns`
    /// (its Unix sockets are files, which every namespace reaches).
    pub fn start_in_netns(netns: &str, daemon_keys: &str, streams: &str) -> Daemon {
        let mut d = Daemon::start_stopped(daemon_keys, streams);
        d.netns = Some(netns.to_string());
        d.spawn();
        d
    }

    /// SIGKILLs ferryd (if it runs) and starts it again with the same
    /// config, as after a crash.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// SIGKILLs ferryd and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait_ready_after(&mut self, ready_before: usize) {
        // Generous: a ferryd that exits is caught at once below, and one
        // that comes up returns at once; only a slow start waits. Under the
        // rxe VM's emulated CPU (TCG, no KVM) loading the debug binary over
        // the VM's shared folder alone has taken most of 10 s.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if self.admin.exists()
                && self.socket.exists()
                && self.log().matches("ferryd ready").count() > ready_before
            {
                return;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "ferryd exited ({st}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("ferryd did not come up; log:\n{}", self.log());
    }

    pub fn client(&self) -> ferry::Client {
        ferry::Client::connect(Some(&self.socket)).expect("connect")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ferryd.log")).unwrap_or_default()
    }

    pub fn status(&self) -> ferry_admin::Status {
        ferry_admin::Client::new(&self.admin)
            .status(None)
            .expect("status")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends a signal to ferryd.
    pub fn signal(&self, sig: i32) {
        // SAFETY (test helper): kill on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for ferryd to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        while start.elapsed() < timeout {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("ferryd log kept in {}:\n{}", self.dir.display(), self.log());
        }
    }
}

/// Polls `f` until it returns true or `timeout` passes.
/// Two network namespaces joined by a veth pair, as two hosts: `a` at
/// `ip_a`, `b` at `ip_b`. Removed on drop.
pub struct TwoHosts {
    pub a: String,
    pub b: String,
    pub ip_a: String,
    pub ip_b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?} (iproute2 is needed): {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {} (network namespaces need root)",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TwoHosts {
    pub fn new() -> TwoHosts {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let (a, b) = (format!("fa{tag}"), format!("fb{tag}"));
        let net = 10 + (std::process::id() as usize + n as usize) % 200;
        let (ip_a, ip_b) = (format!("10.77.{net}.1"), format!("10.77.{net}.2"));
        for ns in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (va, vb) = (format!("v{a}"), format!("v{b}"));
        ip(&[
            "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ]);
        ip(&["-n", &a, "addr", "add", &format!("{ip_a}/24"), "dev", &va]);
        ip(&["-n", &b, "addr", "add", &format!("{ip_b}/24"), "dev", &vb]);
        ip(&["-n", &a, "link", "set", &va, "up"]);
        ip(&["-n", &b, "link", "set", &vb, "up"]);
        TwoHosts { a, b, ip_a, ip_b }
    }

    /// Cuts (false) or restores (true) the link, on `a`'s side.
    pub fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.a,
            "link",
            "set",
            &format!("v{}", self.a),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Default for TwoHosts {
    fn default() -> Self {
        TwoHosts::new()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A plain HTTP/1.1 GET of `path` from `addr`: (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {head:?}")))?;
    Ok((code, body.to_string()))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a cluster secret file (mode 0600) and returns its path.
pub fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&p)
        .unwrap();
    writeln!(f, "{secret}").unwrap();
    p
}

/// The `[cluster]` table of node `me` (index into `ports`), every other
/// node its peer, named n0, n1, ...; `extra` adds keys to it.
pub fn cluster_table(me: usize, ports: &[u16], secret: &Path, extra: &str) -> String {
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != me)
        .map(|(i, p)| format!("{{ node_id = \"n{i}\", addr = \"127.0.0.1:{p}\" }}"))
        .collect();
    format!(
        "[cluster]\nnode_id = \"n{me}\"\nlisten = \"127.0.0.1:{}\"\nsecret_file = \"{}\"\npeers = [{}]\n{extra}\n",
        ports[me],
        secret.display(),
        peers.join(", ")
    )
}

pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// Sequence of what a consumer gets until `n` ends of epoch: the first
/// payload byte of each batch (the epoch it was sent in), `E` for an end.
/// Panics on any other error (a timeout included: 10 s without a batch).
pub fn epochs_seen(c: &mut ferry::Consumer, n: usize) -> Vec<char> {
    let mut seen = Vec::new();
    while seen.iter().filter(|&&x| x == 'E').count() < n {
        match c.next(Some(Duration::from_secs(10))) {
            Ok(b) => {
                // SAFETY (test): held until released below.
                seen.push((b'0' + unsafe { b.data() }[0]) as char);
                c.release(b.token).unwrap();
            }
            Err(e) if e.status == ferry::Status::EndOfEpoch => seen.push('E'),
            Err(e) => panic!("{e} after {seen:?}"),
        }
    }
    seen
}

/// Deletes a group that has no members, retrying while ferryd is still
/// noticing that its members left.
pub fn delete_group(d: &Daemon, stream: &str, group: &str) {
    let mut last = String::new();
    let ok = eventually(Duration::from_secs(5), || {
        match ferry_admin::Client::new(&d.admin).delete_group(stream, group) {
            Ok(_) => true,
            Err(e) => {
                last = format!("{e:#}");
                false
            }
        }
    });
    assert!(ok, "delete-group {stream} {group}: {last}\n{}", d.log());
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// The payload of honest batch `i`: 512 + i % 2000 bytes, byte j being
/// `(i * 131 + j * 7) as u8`.
pub fn honest_payload(i: u64) -> Vec<u8> {
    let len = 512 + (i % 2000) as usize;
    (0..len)
        .map(|j| (i.wrapping_mul(131) as usize).wrapping_add(j * 7) as u8)
        .collect()
}

/// What an [`HonestPair`] saw, from [`HonestPair::finish`].
#[derive(Debug, Clone, Default)]
pub struct HonestStats {
    /// Batches the producer published.
    pub published: u64,
    /// Deliveries the consumer got (duplicates included).
    pub received: u64,
    /// Deliveries whose bytes or metadata were not those of their batch.
    pub corrupt: u64,
    /// Deliveries of an offset (or batch number) delivered before.
    pub duplicates: u64,
    /// Times a partition's offsets skipped ahead.
    pub gaps: u64,
    /// Longest pause between two deliveries, in milliseconds.
    pub max_gap_ms: u64,
    /// Why the producer stopped early, if it did.
    pub producer_error: Option<String>,
    /// Why the consumer stopped early, if it did (or "timed out" when it
    /// did not get every published batch within 20 s of `finish`).
    pub consumer_error: Option<String>,
}

impl HonestStats {
    /// Every published batch arrived exactly once, intact, in order per
    /// partition, and neither side failed.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(
            self.published > 0,
            "the honest producer published nothing: {self:?}"
        );
        assert!(
            self.producer_error.is_none() && self.consumer_error.is_none(),
            "the honest pair failed: {self:?}"
        );
        assert_eq!(
            (self.received, self.corrupt, self.duplicates, self.gaps),
            (self.published, 0, 0, 0),
            "the honest pair must get every batch exactly once, intact and without gaps \
             (received, corrupt, duplicates, gaps): {self:?}"
        );
    }
}

#[derive(Default)]
struct HonestShared {
    stop: std::sync::atomic::AtomicBool,
    /// The consumer takes nothing while set (a backlog builds up).
    paused: std::sync::atomic::AtomicBool,
    abort: std::sync::atomic::AtomicBool,
    producer_done: std::sync::atomic::AtomicBool,
    published: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
}

struct ConsumerTally {
    received: u64,
    corrupt: u64,
    duplicates: u64,
    gaps: u64,
    max_gap_ms: u64,
    error: Option<String>,
}

/// A well-behaved producer and consumer (each its own client, on its own
/// thread) that check that ferryd serves them correctly while something
/// else attacks it. The producer creates `stream` (2 partitions, 16 slots
/// of 4096 bytes) and publishes batch i = 0, 1, 2, ... (payload
/// [`honest_payload`], metadata i as 8 little-endian bytes) about once a
/// millisecond; the consumer, in `group`, checks every delivery and
/// releases it.
pub struct HonestPair {
    shared: std::sync::Arc<HonestShared>,
    producer: Option<std::thread::JoinHandle<(u64, Option<String>)>>,
    consumer: Option<std::thread::JoinHandle<ConsumerTally>>,
}

/// The honest stream's configuration.
pub const HONEST_SPEC: ferry::StreamSpec = ferry::StreamSpec {
    durability: ferry_shm::proto::Durability::MEMORY,
    partitions: 2,
    slot_size: 4096,
    slot_count: 16,
};

impl HonestPair {
    /// Starts both sides; returns once the stream exists and the consumer
    /// has joined (panics when either cannot open its session).
    pub fn start(daemon: &Daemon, stream: &str, group: &str) -> HonestPair {
        use std::sync::atomic::Ordering::SeqCst;
        use std::sync::mpsc;
        let shared = std::sync::Arc::new(HonestShared::default());
        let (opened_tx, opened_rx) = mpsc::channel::<Result<(), String>>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let producer = {
            let socket = daemon.socket.clone();
            let stream = stream.to_string();
            let shared = shared.clone();
            std::thread::spawn(move || {
                let opened = ferry::Client::connect(Some(&socket)).and_then(|c| {
                    let p = c.producer(&stream, Some(HONEST_SPEC))?;
                    Ok((c, p))
                });
                let (_client, mut p) = match opened {
                    Ok(x) => x,
                    Err(e) => {
                        let _ =
                            opened_tx.send(Err(format!("honest producer: {e} ({:?})", e.status)));
                        return (0, Some(e.to_string()));
                    }
                };
                let _ = opened_tx.send(Ok(()));
                // Publish only once the consumer has joined, so that every
                // partition's offsets start at 0 for it.
                if go_rx.recv().is_err() {
                    return (0, None);
                }
                let mut i = 0u64;
                let mut error = None;
                while !shared.stop.load(SeqCst) {
                    let data = honest_payload(i);
                    match p.send(&data, &i.to_le_bytes(), None, Some(Duration::from_secs(10))) {
                        Ok(()) => {
                            i += 1;
                            shared.published.store(i, SeqCst);
                        }
                        Err(e) => {
                            error = Some(format!("publishing batch {i}: {e} ({:?})", e.status));
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                (i, error)
            })
        };
        match opened_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}\nferryd log:\n{}", daemon.log()),
            Err(_) => panic!(
                "the honest producer did not open within 15 s\n{}",
                daemon.log()
            ),
        }
        let (joined_tx, joined_rx) = mpsc::channel::<Result<(), String>>();
        let consumer = {
            let socket = daemon.socket.clone();
            let stream = stream.to_string();
            let group = group.to_string();
            let shared = shared.clone();
            std::thread::spawn(move || honest_consume(&socket, &stream, &group, &shared, joined_tx))
        };
        match joined_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.stop.store(true, SeqCst);
                drop(go_tx);
                let _ = producer.join();
                panic!("{e}\nferryd log:\n{}", daemon.log())
            }
            Err(_) => panic!(
                "the honest consumer did not join within 15 s\n{}",
                daemon.log()
            ),
        }
        let _ = go_tx.send(());
        HonestPair {
            shared,
            producer: Some(producer),
            consumer: Some(consumer),
        }
    }

    /// Pauses (or resumes) the consumer: while paused it takes nothing,
    /// so the producer fills the pool and stalls, and every batch in it is
    /// one the honest group still owes.
    pub fn pause(&self, on: bool) {
        self.shared
            .paused
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Batches published so far.
    pub fn published(&self) -> u64 {
        self.shared
            .published
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Deliveries the consumer got so far.
    pub fn received(&self) -> u64 {
        self.shared
            .received
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the consumer got at least `n` more deliveries than now.
    pub fn wait_progress(&self, n: u64, timeout: Duration) -> bool {
        let start = self.received();
        eventually(timeout, || self.received() >= start + n)
    }

    /// Stops the producer, waits (at most 20 s) until the consumer got
    /// every published batch or stopped, and says what they saw.
    pub fn finish(mut self) -> HonestStats {
        use std::sync::atomic::Ordering::SeqCst;
        self.shared.stop.store(true, SeqCst);
        let (published, producer_error) = self
            .producer
            .take()
            .expect("producer thread")
            .join()
            .expect("the honest producer thread panicked");
        self.shared.published.store(published, SeqCst);
        self.shared.producer_done.store(true, SeqCst);
        let consumer = self.consumer.take().expect("consumer thread");
        let start = Instant::now();
        while !consumer.is_finished() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let timed_out = !consumer.is_finished();
        self.shared.abort.store(true, SeqCst);
        let t = consumer
            .join()
            .expect("the honest consumer thread panicked");
        HonestStats {
            published,
            received: t.received,
            corrupt: t.corrupt,
            duplicates: t.duplicates,
            gaps: t.gaps,
            max_gap_ms: t.max_gap_ms,
            producer_error,
            consumer_error: t.error.or_else(|| {
                timed_out.then(|| "timed out waiting for the last batches (20 s)".to_string())
            }),
        }
    }
}

impl Drop for HonestPair {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.shared.stop.store(true, SeqCst);
        self.shared.abort.store(true, SeqCst);
        if let Some(p) = self.producer.take() {
            let _ = p.join();
        }
        if let Some(c) = self.consumer.take() {
            let _ = c.join();
        }
    }
}

fn honest_consume(
    socket: &Path,
    stream: &str,
    group: &str,
    shared: &HonestShared,
    joined: std::sync::mpsc::Sender<Result<(), String>>,
) -> ConsumerTally {
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::Ordering::SeqCst;
    let mut t = ConsumerTally {
        received: 0,
        corrupt: 0,
        duplicates: 0,
        gaps: 0,
        max_gap_ms: 0,
        error: None,
    };
    let opened = ferry::Client::connect(Some(socket)).and_then(|c| {
        let cons = c.consumer(stream, group, ferry::ConsumerOptions::default())?;
        Ok((c, cons))
    });
    let (_client, mut c) = match opened {
        Ok(x) => x,
        Err(e) => {
            let msg = format!("honest consumer: {e} ({:?})", e.status);
            let _ = joined.send(Err(msg.clone()));
            t.error = Some(msg);
            return t;
        }
    };
    let _ = joined.send(Ok(()));
    let mut next_offset: HashMap<u32, u64> = HashMap::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut last: Option<Instant> = None;
    loop {
        if shared.abort.load(SeqCst) {
            break;
        }
        if shared.paused.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
            last = None; // a pause asked for is not a gap
            continue;
        }
        if shared.producer_done.load(SeqCst) && seen.len() as u64 >= shared.published.load(SeqCst) {
            break;
        }
        let b = match c.next(Some(Duration::from_millis(100))) {
            Ok(b) => b,
            Err(e) if e.status == ferry::Status::Timeout => continue,
            Err(e) => {
                t.error = Some(format!("next: {e} ({:?})", e.status));
                break;
            }
        };
        let now = Instant::now();
        if let Some(prev) = last {
            t.max_gap_ms = t
                .max_gap_ms
                .max(now.duration_since(prev).as_millis() as u64);
        }
        last = Some(now);
        t.received += 1;
        shared.received.fetch_add(1, SeqCst);
        // SAFETY: the batch is held by `c` until the release below.
        let (meta, data) = unsafe { (b.meta(), b.data()) };
        let i = <[u8; 8]>::try_from(meta).map(u64::from_le_bytes).ok();
        let repeated_batch = match i {
            Some(i) if data == honest_payload(i).as_slice() => !seen.insert(i),
            _ => {
                t.corrupt += 1;
                false
            }
        };
        let expected = next_offset.entry(b.partition).or_insert(0);
        let repeated_offset = b.offset < *expected;
        if b.offset > *expected {
            t.gaps += 1;
        }
        if !repeated_offset {
            *expected = b.offset + 1;
        }
        if repeated_batch || repeated_offset {
            t.duplicates += 1;
        }
        if let Err(e) = c.release(b.token) {
            t.error = Some(format!("release: {e} ({:?})", e.status));
            break;
        }
    }
    t
}
