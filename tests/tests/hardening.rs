//! ferryd against hostile local clients: every test runs a real ferryd and
//! attacks it the way a local process could (raw protocol sessions, the
//! file descriptors ferryd hands out, floods of connections or requests,
//! slow admin clients, squatted stream names and socket paths), mostly while
//! an honest producer and consumer (`HonestPair`) check that they are still
//! served exactly.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry::{ConsumerOptions, Status, StreamSpec};
use ferry_admin::{AdminError, Client as Admin};
use ferry_shm::desc::{self, Desc};
use ferry_shm::layout::PoolLayout;
use ferry_shm::proto::{self, ErrorCode, GroupStart, Request, Response};
use ferry_shm::sys;
use ferry_tests::raw::{
    closed_by_daemon, encode, hello, raw_consumer, raw_consumer_from, raw_producer, recv_reply,
    say_hello,
};
use ferry_tests::{bin, bin_dir, delete_group, eventually, Daemon, HonestPair, HONEST_SPEC};

const T: Option<Duration> = Some(Duration::from_secs(10));
/// uid and gid of `nobody` / `nogroup`.
const NOBODY: u32 = 65534;

fn spec(partitions: u32, slot_size: u64, slot_count: u32) -> Option<StreamSpec> {
    Some(StreamSpec {
        durability: Default::default(),
        partitions,
        slot_size,
        slot_count,
    })
}

/// Size of the data pool of a stream with these slots.
fn pool_size(slot_size: u64, slot_count: u32) -> u64 {
    PoolLayout::new(slot_size, slot_count).unwrap().total
}

fn honest_pool_size() -> u64 {
    pool_size(HONEST_SPEC.slot_size, HONEST_SPEC.slot_count)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

// ---------------------------------------------------------------------------
// Temporary directories and processes of our own.

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under /tmp (short, so socket paths stay short);
/// removed on drop unless the test failed.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!("/tmp/ferry-hard-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A subdirectory with `mode` (set explicitly: the umask does not apply).
    fn subdir(&self, name: &str, mode: u32) -> PathBuf {
        let p = self.join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a bounded run of a command ended.
#[derive(Debug)]
struct Ran {
    /// Exit code; None when killed by a signal (or by us at the timeout).
    code: Option<i32>,
    timed_out: bool,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` (stdin closed, output captured) for at most `timeout`.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Ran {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    Ran {
        code: status.code(),
        timed_out,
        elapsed,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A command that runs as nobody:nogroup with a minimal environment.
fn as_nobody(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.uid(NOBODY)
        .gid(NOBODY)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/tmp")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// python3 running `script` with the Ferry package importable.
fn python(script: &str, nobody: bool) -> Command {
    let mut c = if nobody {
        as_nobody("/usr/bin/python3")
    } else {
        let mut c = Command::new("/usr/bin/python3");
        c.env("PYTHONDONTWRITEBYTECODE", "1");
        c
    };
    let (lib, pkg) = if nobody {
        (
            public_copy().join("libferry.so"),
            public_copy().join("python"),
        )
    } else {
        (
            bin_dir().join("libferry.so"),
            repo_root().join("client-c/python"),
        )
    };
    c.arg("-c")
        .arg(script)
        .env("FERRY_LIB", lib)
        .env("FERRY_PYTHON_PATH", pkg.to_str().unwrap());
    c
}

/// A copy of ferryd, ferry, libferry.so and the Python package that user
/// nobody can read: the checkout may sit in a directory only root can
/// enter (CI's clone, /root/...). Made once per test process.
fn public_copy() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        // One fixed place, replaced by each run (the binaries are large).
        let dir = PathBuf::from("/tmp/ferry-hard-public");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("python/ferry")).unwrap();
        for name in ["ferryd", "ferry", "libferry.so"] {
            // A hard link where /tmp is the same file system (no copy of
            // large debug binaries), a copy otherwise.
            if std::fs::hard_link(bin(name), dir.join(name)).is_err() {
                std::fs::copy(bin(name), dir.join(name)).unwrap();
            }
        }
        let pkg = repo_root().join("client-c/python/ferry");
        for e in std::fs::read_dir(&pkg).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), dir.join("python/ferry").join(e.file_name())).unwrap();
            }
        }
        for d in [dir.clone(), dir.join("python"), dir.join("python/ferry")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    })
}

/// One of our binaries, from the copy nobody can run.
fn public_bin(name: &str) -> PathBuf {
    public_copy().join(name)
}

/// An honest pair on `stream` (group "honest") that has delivered `n`
/// batches already.
fn running_pair(d: &Daemon, stream: &str, n: u64) -> HonestPair {
    let pair = HonestPair::start(d, stream, "honest");
    assert!(
        pair.wait_progress(n, Duration::from_secs(10)),
        "the honest pair did not start\n{}",
        d.log()
    );
    pair
}

/// Writes a config for ferryd in `dir` (socket `dir/ferryd.sock` unless
/// `daemon_keys` names one) and returns its path.
fn write_config(dir: &Path, daemon_keys: &str, rest: &str) -> PathBuf {
    let socket = if daemon_keys.contains("socket =") {
        String::new()
    } else {
        format!("socket = \"{}\"\n", dir.join("ferryd.sock").display())
    };
    let cfg = dir.join("ferryd.toml");
    std::fs::write(
        &cfg,
        format!("version = 1\n[daemon]\n{socket}log = \"info\"\n{daemon_keys}\n{rest}\n"),
    )
    .unwrap();
    cfg
}

/// Starts ferryd on `cfg` through `sh -c "PREFIX; exec ferryd --config CFG"`,
/// stderr to `log`.
fn spawn_ferryd(cfg: &Path, log: &Path, shell_prefix: &str) -> Proc {
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{shell_prefix}\nexec \"$0\" --config \"$1\""))
        .arg(bin("ferryd"))
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Proc(child)
}

/// Waits until a ferryd spawned by `spawn_ferryd` says it is ready.
fn wait_ferryd_ready(p: &mut Proc, log: &Path, socket: &Path) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("ferryd ready") && socket.exists() {
            return;
        }
        if let Some(st) = p.0.try_wait().unwrap() {
            panic!("ferryd exited ({st}) instead of starting:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "ferryd did not come up:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// ferryd on `cfg` must refuse to start: exit 1 within 5 s.
fn ferryd_refuses(cfg: &Path) -> Ran {
    let r = run_bounded(
        Command::new(bin("ferryd")).arg("--config").arg(cfg),
        Duration::from_secs(5),
    );
    assert!(
        !r.timed_out,
        "ferryd started although it should have refused: {r:?}"
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    r
}

// ---------------------------------------------------------------------------
// Status fields read from the JSON document, so that they are found by name.

/// The status as its JSON document.
fn status_json(admin: &std::path::Path) -> Result<serde_json::Value, AdminError> {
    Admin::new(admin)
        .status(None)
        .map(|st| serde_json::to_value(st).expect("status serialises"))
}

fn status_json_u64(d: &Daemon, pointer: &str) -> u64 {
    let v = status_json(&d.admin).expect("status");
    v.pointer(pointer)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("status has no number at {pointer}: {v}"))
}

fn stream_names(d: &Daemon) -> Vec<String> {
    d.status().streams.into_iter().map(|s| s.name).collect()
}

/// A number field of stream `name` in the status document.
fn stream_u64(d: &Daemon, name: &str, field: &str) -> u64 {
    let v = status_json(&d.admin).expect("status");
    let s = v["streams"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no stream {name} in status: {v}"));
    s[field]
        .as_u64()
        .unwrap_or_else(|| panic!("stream {name} has no number {field}: {s}"))
}

/// `owner_uid` of stream `name` (which must exist and have the field).
fn stream_owner(d: &Daemon, name: &str) -> Option<u32> {
    let v = status_json(&d.admin).expect("status");
    let s = v["streams"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no stream {name} in status: {v}"));
    let o = s
        .get("owner_uid")
        .unwrap_or_else(|| panic!("stream {name} has no owner_uid: {s}"));
    if o.is_null() {
        None
    } else {
        Some(o.as_u64().unwrap_or_else(|| panic!("owner_uid {o}")) as u32)
    }
}

/// memory.per_uid's entry for `uid`: (streams, partitions, slots,
/// pool_bytes); None when the uid has no entry.
fn uid_usage(d: &Daemon, uid: u32) -> Option<(u64, u64, u64, u64)> {
    let v = status_json(&d.admin).expect("status");
    let per_uid = v
        .pointer("/memory/per_uid")
        .and_then(|p| p.as_array())
        .unwrap_or_else(|| panic!("status has no memory.per_uid: {v}"));
    let u = per_uid
        .iter()
        .find(|u| u["uid"].as_u64() == Some(uid as u64))?;
    let n = |k: &str| {
        u[k].as_u64()
            .unwrap_or_else(|| panic!("per_uid entry has no {k}: {u}"))
    };
    Some((n("streams"), n("partitions"), n("slots"), n("pool_bytes")))
}

fn status_text(d: &Daemon) -> String {
    match status_json(&d.admin) {
        Ok(v) => v.to_string(),
        Err(e) => format!("(no status: {e:#})"),
    }
}

// ---------------------------------------------------------------------------
// The session protocol spoken by hand.

// (In ferry_tests::raw.)

// ---------------------------------------------------------------------------
// Raw system calls the attacks use.

/// Where /proc/self/fd/N points ("anon_inode:[eventfd]", "/memfd:...").
fn fd_target(fd: &OwnedFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("({e})"))
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn access_mode(fd: &OwnedFd) -> i32 {
    // SAFETY: F_GETFL on a live fd.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert!(fl >= 0, "F_GETFL: errno {}", errno());
    fl & libc::O_ACCMODE
}

fn clear_nonblock(fd: RawFd) {
    // SAFETY: F_GETFL/F_SETFL on a live fd.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        assert!(fl >= 0, "F_GETFL: errno {}", errno());
        libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
}

/// mmap(MAP_SHARED) of `len` bytes of `fd` with `prot`: Ok(address) or
/// Err(errno).
fn try_mmap(fd: &OwnedFd, len: usize, prot: i32) -> Result<*mut libc::c_void, i32> {
    // SAFETY: a fresh mapping chosen by the kernel; nothing existing moves.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(errno())
    } else {
        Ok(p)
    }
}

/// A non-blocking SOCK_SEQPACKET connect (a full backlog is an error, not a
/// wait).
fn connect_nonblocking(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain syscall.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: addr is a valid sockaddr_un of the stated length.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

fn readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a live pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) > 0 }
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: plain libc query.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn ferry_cli(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(bin("ferry"))
        .args(args)
        .args(["--admin-socket", d.admin.to_str().unwrap()])
        .output()
        .unwrap()
}

fn ferry_cli_as_nobody(d: &Daemon, args: &[&str]) -> Ran {
    run_bounded(
        as_nobody(public_bin("ferry"))
            .args(args)
            .args(["--admin-socket", d.admin.to_str().unwrap()]),
        Duration::from_secs(10),
    )
}

// ---------------------------------------------------------------------------
// 1.

#[test]
fn seek_attack_cannot_touch_another_group() {
    let d = Daemon::start("", "");
    let pair = running_pair(&d, "s", 50);
    // The honest consumer stops taking batches: the pool fills with
    // batches the honest group still owes, which the evil group (starting
    // at the earliest batch in the pool) is delivered too. Freeing any of
    // their slots early lets the stalled producer overwrite them.
    pair.pause(true);
    let mut last = pair.published();
    assert!(
        eventually(Duration::from_secs(5), || {
            std::thread::sleep(Duration::from_millis(200));
            let now = pair.published();
            std::mem::replace(&mut last, now) == now
        }),
        "the honest producer never stalled"
    );

    // Member A of "evil" takes deliveries and keeps them.
    let mut a = raw_consumer_from(&d, "s", "evil", 8, GroupStart::Earliest);
    let mut took = a.take(4, Duration::from_secs(5));
    assert!(
        !took.is_empty(),
        "evil member A got no deliveries\n{}",
        d.log()
    );
    let p = took[0].partition;
    let lowest = took
        .iter()
        .filter(|t| t.partition == p)
        .map(|t| t.offset)
        .min()
        .unwrap();
    // Seek back: to 0 (long gone) and over the batches A holds (a replay).
    let back0 = a.request(&Request::Seek {
        partition: p,
        offset: 0,
    });
    let back = a.request(&Request::Seek {
        partition: p,
        offset: lowest,
    });
    assert!(
        back0.is_ok() && back.is_ok(),
        "seeks answered: {back0:?} {back:?}\n{}",
        d.log()
    );
    took.extend(a.take(8, Duration::from_millis(300)));
    // A flood of seeks whose answers A never reads.
    let mut sent = 0u32;
    let mut stopped = String::from("all sent");
    for i in 0..10_000u32 {
        let offset = match i % 4 {
            0 => 0,
            1 => lowest,
            2 => lowest + 1_000_000,
            _ => u64::MAX,
        };
        let msg = encode(&Request::Seek {
            partition: i % 2,
            offset,
        });
        // A full socket buffer: wait a little for ferryd to read (it must
        // not block on answers A never reads); give up after 200 ms stuck.
        let mut stuck = 0;
        let sent_one = loop {
            match sys::send_dontwait(&a.sock, &msg) {
                Ok(()) => break Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && stuck < 200 => {
                    stuck += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = sent_one {
            stopped = format!("stopped by {e}");
            break;
        }
        sent += 1;
    }
    assert!(sent > 0, "not a single seek could be sent");
    eprintln!(
        "evil A took {} deliveries; seek to 0: {back0:?}; seek to {lowest}: {back:?}; {sent} seeks flooded ({stopped})",
        took.len()
    );
    // Member B of "evil" seeks every partition forward to its end.
    // Prefetch 1: what A left behind stays pending, for the seek to skip.
    let mut b = raw_consumer(&d, "s", "evil", 1);
    let st = d.status();
    let s = st.streams.iter().find(|s| s.name == "s").unwrap();
    for (part, end) in s.end_offsets.iter().enumerate() {
        let r = b.request(&Request::Seek {
            partition: part as u32,
            offset: *end,
        });
        assert!(
            r.is_ok(),
            "B's seek to the end answered: {r:?}\n{}",
            d.log()
        );
    }
    // Then B releases what it gets, twice each.
    let got = b.take(8, Duration::from_millis(500));
    for t in got.iter().chain(got.iter()) {
        b.push(&Desc {
            op: desc::OP_RELEASE,
            stream: b.info.stream_id,
            partition: t.partition,
            slot: t.slot,
            dslot: t.dslot,
            offset: t.offset,
            ..Desc::default()
        });
    }
    eprintln!(
        "evil B took {} deliveries and released them twice",
        got.len()
    );
    drop(a);
    drop(b);
    delete_group(&d, "s", "evil");
    pair.pause(false);
    assert!(
        pair.wait_progress(200, Duration::from_secs(10)),
        "the honest pair stalled after the attack\n{}",
        d.log()
    );
    let stats = pair.finish();
    stats.assert_clean();
    // No slot was freed twice or leaked: with no producer and everything
    // released, every slot is free again.
    assert!(
        eventually(Duration::from_secs(5), || {
            let st = d.status();
            let s = st.streams.iter().find(|s| s.name == "s").unwrap();
            (s.slots_free, s.slots_granted, s.slots_held) == (HONEST_SPEC.slot_count, 0, 0)
        }),
        "slot accounting after the attack: {}\n{}",
        status_text(&d),
        d.log()
    );
}

// ---------------------------------------------------------------------------
// 2.

#[test]
fn client_fds_cannot_block_or_starve_daemon() {
    let mut d = Daemon::start("", "");
    let pair = running_pair(&d, "s", 20);
    let prod = raw_producer(&d, "atk", spec(1, 64, 4));
    let cons = raw_consumer(&d, "atk", "g", 0);
    let mut all = Vec::new();
    for (who, s) in [("producer", &prod), ("consumer", &cons)] {
        let kinds: Vec<String> = s.fds.iter().map(fd_target).collect();
        assert_eq!(
            s.fds.len(),
            2,
            "a {who} session gets exactly 2 fds: {kinds:?}"
        );
        for k in &kinds {
            assert_ne!(k, "anon_inode:[eventfd]", "{who} got an eventfd: {kinds:?}");
            assert!(k.starts_with("/memfd:"), "{who} got a non-memfd: {kinds:?}");
        }
        for f in &s.fds {
            clear_nonblock(f.as_raw_fd());
            all.push(f.try_clone().unwrap());
        }
    }
    // Blocking reads on every fd, on a thread, while the honest pair runs.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut reads = 0u64;
        let mut buf = vec![0u8; 4096];
        while start.elapsed() < Duration::from_millis(1500) {
            for f in &all {
                // SAFETY: reads into a live buffer of the stated size.
                let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    // SAFETY: plain lseek on a live fd.
                    unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_SET) };
                }
                reads += 1;
            }
        }
        let _ = tx.send(reads);
    });
    for _ in 0..3 {
        let t = Instant::now();
        let st = d.status();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "status took {:?}",
            t.elapsed()
        );
        assert!(st.streams.iter().any(|s| s.name == "s"));
        std::thread::sleep(Duration::from_millis(300));
    }
    let reads = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a blocking read on a session fd hung");
    assert!(reads > 0);
    let stats = pair.finish();
    stats.assert_clean();
    assert!(
        stats.max_gap_ms < 2000,
        "the honest consumer was starved: {stats:?}"
    );
    // The attacker still holds its fds, in blocking mode: shutdown is not
    // held up by them.
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(5)), Some(0), "{}", d.log());
    drop((prod, cons));
}

// ---------------------------------------------------------------------------
// 3.

#[test]
fn consumers_get_a_read_only_pool() {
    let d = Daemon::start("", "");
    let pair = running_pair(&d, "s", 20);
    let ro = raw_consumer(&d, "s", "ro", 1);
    let pool = ro.pool();
    let len = sys::file_size(pool).unwrap();
    assert_eq!(len, honest_pool_size());
    let len = len as usize;
    assert_eq!(
        access_mode(pool),
        libc::O_RDONLY,
        "a consumer's pool fd is opened read-only"
    );
    assert_eq!(
        try_mmap(pool, len, libc::PROT_READ | libc::PROT_WRITE).map(|_| ()),
        Err(libc::EACCES),
        "a writable shared mapping of a consumer's pool"
    );
    // A read-only mapping works, but cannot be made writable.
    let map = try_mmap(pool, len, libc::PROT_READ).expect("read-only mapping");
    // SAFETY: `map` is our own mapping of `len` bytes.
    let rc = unsafe { libc::mprotect(map, len, libc::PROT_READ | libc::PROT_WRITE) };
    let mprotect_errno = errno();
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(map, len) };
    assert_eq!(
        (rc, mprotect_errno),
        (-1, libc::EACCES),
        "mprotect(PROT_WRITE) of the pool"
    );
    // SAFETY: plain syscalls on a live fd.
    let punch = unsafe {
        libc::fallocate(
            pool.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
    };
    assert_eq!(
        punch,
        -1,
        "punching a hole into the pool succeeded (errno {})",
        errno()
    );
    let byte = [0u8; 1];
    // SAFETY: writes one byte from a live buffer.
    let wrote = unsafe { libc::pwrite(pool.as_raw_fd(), byte.as_ptr().cast(), 1, 0) };
    assert_eq!(wrote, -1, "pwrite into the pool succeeded");

    // Another user that inherits the fd can read through it, but can
    // neither write through it nor open the pool again read-write.
    let script = r#"
case "$(readlink /proc/self/fd/7)" in /memfd:*) ;; *) echo "fd 7 is $(readlink /proc/self/fd/7)"; exit 10;; esac
head -c 16 <&7 >/dev/null || { echo "cannot read through the inherited fd"; exit 11; }
if (printf x >&7) 2>/dev/null; then echo "wrote through the inherited fd"; exit 12; fi
if (exec 8<>/proc/self/fd/7) 2>/dev/null; then echo "reopened the pool read-write"; exit 13; fi
exit 0
"#;
    let raw = pool.as_raw_fd();
    let mut cmd = as_nobody("/bin/sh");
    cmd.arg("-c").arg(script);
    // SAFETY: dup2 is async-signal-safe; it runs in the child before exec
    // and gives it the pool as fd 7 (without close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let r = run_bounded(&mut cmd, Duration::from_secs(10));
    assert_eq!(r.code, Some(0), "{r:?}");

    drop(ro);
    delete_group(&d, "s", "ro");
    // A producer's pool is read-write.
    let prod = raw_producer(&d, "s", None);
    assert_eq!(access_mode(prod.pool()), libc::O_RDWR);
    drop(prod);
    assert!(
        pair.wait_progress(100, Duration::from_secs(10)),
        "{}",
        d.log()
    );
    pair.finish().assert_clean();
}

// ---------------------------------------------------------------------------
// 4.

fn mentions_refusal(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    l.contains("max_connections") || l.contains("refus") || l.contains("limit")
}

#[test]
fn connection_flood_is_limited_and_logs_stay_small() {
    let d = Daemon::start("max_connections_per_uid = 32", "");
    let pair = running_pair(&d, "s", 20);
    // Every connection so far is root's: the pair's sessions.
    let honest_connections = d.status().sessions;
    assert!(honest_connections >= 2, "{}", status_text(&d));
    let mut kept = Vec::new();
    let mut refused = 0usize;
    let mut odd = Vec::new();
    for i in 0..200 {
        let sock = match connect_nonblocking(&d.socket) {
            Ok(s) => s,
            Err(e) => {
                odd.push(format!("connect {i}: {e}"));
                continue;
            }
        };
        clear_nonblock(sock.as_raw_fd());
        let _ = sys::send_with_fds(&sock, &encode(&hello()), &[]);
        match recv_reply(&sock, Duration::from_secs(5)) {
            Ok((Response::Welcome { .. }, _)) => kept.push(sock),
            Ok((
                Response::Error {
                    code: ErrorCode::Limit,
                    message,
                },
                _,
            )) if message.contains("daemon.max_connections_per_uid") => refused += 1,
            other => odd.push(format!("connection {i}: {other:?}")),
        }
    }
    assert!(odd.is_empty(), "unexpected answers: {odd:?}\n{}", d.log());
    assert_eq!(
        kept.len(),
        32 - honest_connections,
        "connections welcomed beside the honest pair's {honest_connections}"
    );
    assert_eq!(refused, 200 - kept.len());
    // What a client library user sees.
    let e = ferry::Client::connect(Some(&d.socket)).err().unwrap();
    assert_eq!(e.status, Status::Limit, "{}", e.message);
    assert!(
        e.message.contains("daemon.max_connections_per_uid"),
        "{}",
        e.message
    );
    let stats = pair.finish();
    stats.assert_clean();
    let log = d.log();
    let noisy: Vec<&str> = log.lines().filter(|l| mentions_refusal(l)).collect();
    assert!(
        noisy.len() < 50,
        "{} log lines about refused connections:\n{}",
        noisy.len(),
        noisy[..10.min(noisy.len())].join("\n")
    );
    drop(kept);
    assert!(
        eventually(Duration::from_secs(5), || ferry::Client::connect(Some(
            &d.socket
        ))
        .is_ok()),
        "a new client connects once the flood is gone\n{}",
        d.log()
    );
}

// ---------------------------------------------------------------------------
// 5.

#[test]
fn fd_exhaustion_pauses_the_listener() {
    let dir = TempDir::new();
    let socket = dir.join("ferryd.sock");
    let cfg = write_config(&dir.0, "", "");
    let log = dir.join("ferryd.log");
    let mut ferryd = spawn_ferryd(&cfg, &log, "ulimit -n 64 || exit 99");
    wait_ferryd_ready(&mut ferryd, &log, &socket);
    let pid = ferryd.0.id();

    let mut conns = Vec::new();
    let mut welcomed = 0;
    let mut ended = None;
    for i in 0..300 {
        let sock = match connect_nonblocking(&socket) {
            Ok(s) => s,
            Err(e) => {
                ended = Some(format!("connect {i}: {e}"));
                break;
            }
        };
        let _ = sys::send_with_fds(&sock, &encode(&hello()), &[]);
        let mut buf = vec![0u8; proto::MAX_MESSAGE];
        let reply = if readable(&sock, Duration::from_secs(1)) {
            match sys::recv_with_fds(&sock, &mut buf, true) {
                Ok(Some((n, _))) => proto::decode::<Response>(&buf[..n]).ok(),
                _ => None,
            }
        } else {
            None
        };
        conns.push(sock);
        match reply {
            Some(Response::Welcome { .. }) => welcomed += 1,
            other => {
                ended = Some(format!("connection {i}: {other:?}"));
                break;
            }
        }
    }
    assert!(
        ended.is_some(),
        "300 connections and ferryd, with 64 fds, still welcomed them all"
    );
    assert!(
        welcomed >= 10,
        "only {welcomed} connections before {ended:?}"
    );
    eprintln!("ferryd with 64 fds welcomed {welcomed} connections, then {ended:?}");
    // Held for 2 s: ferryd must neither spin nor log in a loop.
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_seconds(pid) - cpu0;
    let text = std::fs::read_to_string(&log).unwrap();
    let about_accept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("accept") || l.contains("too many open files") || l.contains("emfile")
        })
        .collect();
    assert!(
        about_accept.len() < 50,
        "{} log lines about accept:\n{}",
        about_accept.len(),
        about_accept[..10.min(about_accept.len())].join("\n")
    );
    assert!(
        cpu < 0.5,
        "ferryd used {cpu:.2} s of CPU in 2 s while out of fds (a busy loop)"
    );
    drop(conns);
    let round_trip = || -> Result<(), ferry::Error> {
        let client = ferry::Client::connect(Some(&socket))?;
        let mut p = client.producer("after", spec(1, 64, 4))?;
        let mut c = client.consumer("after", "g", ConsumerOptions::default())?;
        p.send(b"back", b"", None, T)?;
        let b = c.next(T)?;
        c.release(b.token)
    };
    let mut last = None;
    assert!(
        eventually(Duration::from_secs(5), || match round_trip() {
            Ok(()) => true,
            Err(e) => {
                last = Some(e);
                false
            }
        }),
        "ferryd serves again once fds are free: {last:?}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

// ---------------------------------------------------------------------------
// 6.

#[test]
fn idle_connections_are_closed() {
    let d = Daemon::start("idle_timeout_ms = 300\nhandshake_timeout_ms = 300", "");
    let start = Instant::now();
    let (idle, welcome) = say_hello(&d.socket);
    assert!(
        matches!(welcome, Ok(Response::Welcome { .. })),
        "{welcome:?}"
    );
    let silent = sys::seqpacket_connect(&d.socket).unwrap();
    // Real sessions are not idle connections.
    let client = d.client();
    let mut p = client.producer("s", spec(1, 64, 4)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    assert!(
        closed_by_daemon(&idle, Duration::from_secs(2)),
        "a connection that said Hello and opened nothing is closed\n{}",
        d.log()
    );
    assert!(
        closed_by_daemon(&silent, Duration::from_secs(2)),
        "a connection that never said Hello is closed\n{}",
        d.log()
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    std::thread::sleep(Duration::from_secs(1).saturating_sub(start.elapsed()));
    p.send(b"still here", b"", None, T)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let b = c.next(T).unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    // SAFETY: held until released.
    assert_eq!(unsafe { b.data() }, b"still here");
    c.release(b.token).unwrap();
}

// ---------------------------------------------------------------------------
// 7.

#[test]
fn slow_admin_client_does_not_delay_others() {
    let d = Daemon::start("socket_mode = \"0666\"", "");
    let admin = d.admin.clone();
    // Sends "status\n" one byte every 0.4 s (2.8 s in all).
    let slow = std::thread::spawn(move || {
        let start = Instant::now();
        let mut conn = UnixStream::connect(&admin).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        for &byte in b"status\n" {
            if conn.write_all(&[byte]).is_err() {
                break;
            }
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(_) => continue,
            }
        }
        if answer.is_empty() {
            conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            if let Ok(n) = conn.read(&mut buf) {
                answer.extend_from_slice(&buf[..n]);
            }
        }
        (
            String::from_utf8_lossy(&answer).into_owned(),
            start.elapsed(),
        )
    });
    std::thread::sleep(Duration::from_millis(400));
    for i in 0..5 {
        let t = Instant::now();
        let st = d.status();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "status {i} took {:?} while a slow admin client was sending",
            t.elapsed()
        );
        assert!(!st.daemon.is_empty());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (answer, at) = slow.join().unwrap();
    assert!(
        answer.contains("\"error\""),
        "a line not finished within 2 s gets an error, got {answer:?} after {at:?}"
    );

    // A line over 4096 bytes: an error, not a wait for the rest.
    let mut conn = UnixStream::connect(&d.admin).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let _ = conn.write_all(&[b'x'; 5000]);
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(
        answer.contains("\"error\""),
        "an oversized admin line gets an error, got {answer:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "the oversized line was answered only after {:?}",
        t.elapsed()
    );

    // A uid that is not allowed gets its error at once, without having
    // to send anything.
    let script = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(3)
t = time.monotonic()
s.connect(sys.argv[1])
try:
    data = s.recv(4096)
except socket.timeout:
    data = b"(nothing within 3 s)"
print("%.3f %s" % (time.monotonic() - t, data.decode(errors="replace")))
"#;
    let r = run_bounded(
        as_nobody("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(&d.admin),
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let (secs, answer) = r.stdout.trim().split_once(' ').unwrap();
    assert!(answer.contains("\"error\""), "nobody got {answer:?}");
    assert!(
        secs.parse::<f64>().unwrap() < 1.0,
        "nobody waited {secs} s for its error"
    );
    // The CLI shows that refusal, not the connection reset behind it.
    for _ in 0..5 {
        let o = ferry_cli_as_nobody(&d, &["status"]);
        assert_ne!(o.code, Some(0), "{o:?}");
        assert!(o.stderr.contains("permission denied: uid 65534"), "{o:?}");
    }
    // One uid cannot take every admin thread: with four of its requests
    // dribbling, its fifth is turned away at once (the other twelve stay
    // for other users), until those four are done.
    let dribblers: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut c = UnixStream::connect(&d.admin).unwrap();
            c.write_all(b"sta").unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let e = status_json(&d.admin).unwrap_err().to_string();
    assert!(e.contains("most admin requests in progress"), "{e}");
    drop(dribblers);
    assert!(
        eventually(Duration::from_secs(3), || status_json(&d.admin).is_ok()),
        "admin requests are served again once the dribblers are gone"
    );
}

// ---------------------------------------------------------------------------
// 8.

#[test]
fn stream_limits_and_accounting() {
    let d = Daemon::start(
        "max_streams_per_uid = 2\nmax_total_pool_bytes = 1048576",
        "",
    );
    let client = d.client();
    let small = pool_size(4096, 16);
    let _a = client
        .producer("a", spec(1, 4096, 16))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    // Fits alone under 1 MiB, but not beside "a".
    let big = pool_size(4096, 240);
    assert!(big <= 1 << 20 && big + small > 1 << 20);
    let e = client.producer("big", spec(1, 4096, 240)).err().unwrap();
    assert_eq!(e.status, Status::Limit, "{}", e.message);
    assert!(e.message.contains("max_total_pool_bytes"), "{}", e.message);
    let _b = client
        .producer("b", spec(2, 4096, 16))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let e = client.producer("c", spec(1, 64, 2)).err().unwrap();
    assert_eq!(e.status, Status::Limit, "{}", e.message);
    assert!(e.message.contains("max_streams_per_uid"), "{}", e.message);

    let mut names = stream_names(&d);
    names.sort();
    assert_eq!(names, ["a", "b"]);
    for s in ["a", "b"] {
        assert_eq!(stream_owner(&d, s), Some(0));
        assert_eq!(stream_u64(&d, s, "pool_bytes"), small);
    }
    assert_eq!(
        uid_usage(&d, 0),
        Some((2, 3, 32, 2 * small)),
        "root's (streams, partitions, slots, pool_bytes): {}",
        status_text(&d)
    );
    assert_eq!(status_json_u64(&d, "/memory/pool_bytes"), 2 * small);
    assert_eq!(status_json_u64(&d, "/memory/max_total_pool_bytes"), 1 << 20);
}

// ---------------------------------------------------------------------------
// 9.

#[test]
fn stream_delete() {
    let d = Daemon::start(
        "socket_mode = \"0666\"\nallowed_uids = [0, 65534]",
        "[[streams]]\nname = \"declared\"\npartitions = 1\nslot_size = 64\nslot_count = 4\n",
    );
    let pair = running_pair(&d, "s", 20);

    let busy = ferry_cli(&d, &["stream", "delete", "s"]);
    assert!(!busy.status.success(), "{busy:?}");
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use"),
        "{busy:?}"
    );
    // nobody reaches the admin socket, but may not delete root's stream,
    // not even by force.
    let reach = ferry_cli_as_nobody(&d, &["status"]);
    assert_eq!(reach.code, Some(0), "{reach:?}");
    let theirs = ferry_cli_as_nobody(&d, &["stream", "delete", "s", "--force"]);
    assert_ne!(theirs.code, Some(0), "{theirs:?}");
    assert!(!theirs.timed_out, "{theirs:?}");
    for force in [false, true] {
        let mut args = vec!["stream", "delete", "declared"];
        if force {
            args.push("--force");
        }
        let declared = ferry_cli(&d, &args);
        assert!(!declared.status.success(), "{declared:?}");
        assert!(
            String::from_utf8_lossy(&declared.stderr).contains("declared in the config"),
            "{declared:?}"
        );
    }
    assert!(
        pair.wait_progress(20, Duration::from_secs(5)),
        "the refused deletions left the pair running\n{}",
        d.log()
    );
    let mut names = stream_names(&d);
    names.sort();
    assert_eq!(names, ["declared", "s"]);

    let before = status_json_u64(&d, "/memory/pool_bytes");
    let forced = ferry_cli(&d, &["stream", "delete", "s", "--force"]);
    assert!(forced.status.success(), "{forced:?}\n{}", d.log());
    let stats = pair.finish();
    assert!(
        stats
            .consumer_error
            .as_deref()
            .is_some_and(|e| !e.contains("timed out")),
        "the consumer's session was closed: {stats:?}"
    );
    assert_eq!(stats.corrupt, 0, "{stats:?}");
    assert_eq!(stream_names(&d), ["declared"]);
    assert_eq!(
        status_json_u64(&d, "/memory/pool_bytes"),
        before - honest_pool_size(),
        "{}",
        status_text(&d)
    );

    // The same over the admin socket directly.
    {
        let client = d.client();
        let _p = client.producer("s2", spec(1, 64, 4)).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || Admin::new(&d.admin)
            .delete_stream("s2", false)
            .is_ok()),
        "delete-stream s2\n{}",
        d.log()
    );
    assert_eq!(stream_names(&d), ["declared"]);
    assert!(Admin::new(&d.admin).delete_stream("nope", false).is_err());
    assert!(Admin::new(&d.admin)
        .delete_stream("declared", true)
        .is_err());
}

// ---------------------------------------------------------------------------
// 10.

#[test]
fn idle_producer_stream_is_freed() {
    let d = Daemon::start(
        "stream_idle_timeout_ms = 300",
        "[[streams]]\nname = \"declared\"\npartitions = 1\nslot_size = 64\nslot_count = 4\n",
    );
    let baseline = status_json_u64(&d, "/memory/pool_bytes");
    let start = Instant::now();
    {
        let client = d.client();
        let mut p = client.producer("tmp", spec(1, 4096, 4)).unwrap();
        for i in 0..3u64 {
            p.send(&i.to_le_bytes(), b"", None, T).unwrap();
        }
        assert_eq!(
            status_json_u64(&d, "/memory/pool_bytes"),
            baseline + pool_size(4096, 4)
        );
    }
    // A stream with a consumer session (and no producer) is kept.
    let keeper = d.client();
    let kept_producer = keeper.producer("kept", spec(1, 64, 4)).unwrap();
    let kept_consumer = keeper
        .consumer("kept", "g", ConsumerOptions::default())
        .unwrap();
    drop(kept_producer);
    assert!(
        eventually(Duration::from_secs(3), || !stream_names(&d)
            .contains(&"tmp".to_string())),
        "an abandoned stream is deleted: {:?}\n{}",
        stream_names(&d),
        d.log()
    );
    std::thread::sleep(Duration::from_secs(1).saturating_sub(start.elapsed()));
    let mut names = stream_names(&d);
    names.sort();
    assert_eq!(names, ["declared", "kept"], "a stream in use is kept");
    drop(kept_consumer);
    drop(keeper);
    assert!(
        eventually(Duration::from_secs(3), || stream_names(&d) == ["declared"]),
        "{:?}",
        stream_names(&d)
    );
    // Only the declared stream's pool is left, and root owns nothing.
    assert_eq!(
        status_json_u64(&d, "/memory/pool_bytes"),
        baseline,
        "{}",
        status_text(&d)
    );
    assert!(
        matches!(uid_usage(&d, 0), None | Some((0, 0, 0, 0))),
        "{:?}",
        uid_usage(&d, 0)
    );
    assert_eq!(stream_owner(&d, "declared"), None);
}

// ---------------------------------------------------------------------------
// 11.

#[test]
fn squatted_stream_names() {
    let d = Daemon::start(
        "socket_mode = \"0666\"\nallowed_uids = [0, 65534]",
        "[[streams]]\nname = \"declared\"\npartitions = 1\nslot_size = 64\nslot_count = 4\n",
    );
    let script = r#"
import json, os, sys
sys.path.insert(0, os.environ["FERRY_PYTHON_PATH"])
import ferry
out = {}
c = ferry.Client(sys.argv[1])
p = c.producer("images", partitions=1, slot_size=64, slot_count=2)
out["images"] = "created"
try:
    c.producer("declared", partitions=2, slot_size=128, slot_count=8)
    out["declared"] = "redefined"
except ferry.FerryError as e:
    out["declared"] = [e.status, e.message]
p.close()
c.close()
print(json.dumps(out))
"#;
    let r = run_bounded(python(script, true).arg(&d.socket), Duration::from_secs(20));
    assert_eq!(r.code, Some(0), "{r:?}\n{}", d.log());
    let out = r.stdout.trim();
    assert!(out.contains("\"images\": \"created\""), "{out}");
    assert!(
        out.contains("\"declared\": [6,") && out.contains("declared in the config"),
        "redefining a config-declared stream is a mismatch: {out}"
    );
    assert_eq!(stream_owner(&d, "images"), Some(NOBODY));

    let client = d.client();
    let real = spec(4, 1 << 20, 8);
    // Root is not fed into a stream another user made under its name:
    // refused (not a silent join), naming the owner and how to remove it.
    let e = client.producer("images", real.clone()).err().unwrap();
    assert_eq!(e.status, Status::PermissionDenied, "{}", e.message);
    assert!(e.message.contains("uid 65534"), "{}", e.message);
    assert!(e.message.contains("ferry stream delete"), "{}", e.message);
    let e = client
        .consumer("images", "g", ConsumerOptions::default())
        .err()
        .unwrap();
    assert_eq!(e.status, Status::PermissionDenied, "{}", e.message);
    let mut last = None;
    assert!(
        eventually(Duration::from_secs(3), || {
            let o = ferry_cli(&d, &["stream", "delete", "images"]);
            let ok = o.status.success();
            last = Some(o);
            ok
        }),
        "root deletes the squatted stream: {last:?}\n{}",
        d.log()
    );
    let _p = client
        .producer("images", real)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert_eq!(stream_owner(&d, "images"), Some(0));
}

// ---------------------------------------------------------------------------
// 12.

#[test]
fn socket_path_safety() {
    let dir = TempDir::new();

    // (a) A directory others may write to.
    let open = dir.subdir("open", 0o777);
    let cfg = write_config(&open, "", "");
    // The config sits in the directory too; that is fine for the test.
    let r = ferryd_refuses(&cfg);
    assert!(r.stderr.contains(open.to_str().unwrap()), "{r:?}");
    assert!(!open.join("ferryd.sock").exists());

    // (b) A directory owned by someone else.
    let theirs = dir.subdir("theirs", 0o755);
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let cfg = write_config(
        &dir.0,
        &format!("socket = \"{}\"", theirs.join("ferryd.sock").display()),
        "",
    );
    let r = ferryd_refuses(&cfg);
    assert!(r.stderr.contains(theirs.to_str().unwrap()), "{r:?}");
    assert!(!theirs.join("ferryd.sock").exists());

    // (c) A regular file at the socket path.
    let file_dir = dir.subdir("file", 0o755);
    let file = file_dir.join("ferryd.sock");
    std::fs::write(&file, b"precious").unwrap();
    let cfg = write_config(&file_dir, "", "");
    let r = ferryd_refuses(&cfg);
    assert!(r.stderr.contains(file.to_str().unwrap()), "{r:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    // (d) A symlink at the socket path.
    let link_dir = dir.subdir("link", 0o755);
    let target = dir.join("target.txt");
    std::fs::write(&target, b"keep").unwrap();
    let link = link_dir.join("ferryd.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let cfg = write_config(&link_dir, "", "");
    let r = ferryd_refuses(&cfg);
    assert!(r.stderr.contains(link.to_str().unwrap()), "{r:?}");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");

    // (e) A stale socket (nothing listening) is replaced.
    let stale_dir = dir.subdir("stale", 0o755);
    let stale = stale_dir.join("ferryd.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let cfg = write_config(&stale_dir, "", "");
    let log = stale_dir.join("ferryd.log");
    let mut ferryd = spawn_ferryd(&cfg, &log, "");
    wait_ferryd_ready(&mut ferryd, &log, &stale);
    ferry::Client::connect(Some(&stale)).unwrap_or_else(|e| panic!("{e}"));
    drop(ferryd);

    // (f) socket_group: both sockets get the group, and its members may
    // connect.
    let d = Daemon::start("socket_group = \"nogroup\"", "");
    for p in [&d.socket, &d.admin] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!(m.gid(), NOBODY, "{}", p.display());
        assert_eq!(m.permissions().mode() & 0o777, 0o660, "{}", p.display());
    }
    let script = r#"
import os, sys
sys.path.insert(0, os.environ["FERRY_PYTHON_PATH"])
import ferry
ferry.Client(sys.argv[1]).close()
print("connected")
"#;
    let r = run_bounded(python(script, true).arg(&d.socket), Duration::from_secs(20));
    assert_eq!(r.code, Some(0), "{r:?}\n{}", d.log());
    assert_eq!(r.stdout.trim(), "connected");
    let status = ferry_cli_as_nobody(&d, &["status"]);
    assert_eq!(status.code, Some(0), "{status:?}");
}

// ---------------------------------------------------------------------------
// 13.

#[test]
fn client_checks_daemon_credentials() {
    let dir = TempDir::new();
    let rogue_dir = dir.subdir("rogue", 0o755);
    std::os::unix::fs::chown(&rogue_dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let path = rogue_dir.join("ferryd.sock");
    // A listener that is not ferryd: it reports how many bytes each of two
    // connections sent it before closing or going quiet, then hangs up.
    let (_rogue, mut lines) = rogue_listener(&path, "SOCK_SEQPACKET", 2);

    let e = ferry::Client::connect(Some(&path)).err().unwrap();
    assert_eq!(e.status, Status::PermissionDenied, "{}", e.message);
    assert!(e.message.contains("65534"), "{}", e.message);
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "got 0",
        "the client sent nothing to a listener running as another user"
    );

    // Trusting that uid explicitly lets the client go on (the rogue then
    // hangs up on it).
    let script = r#"
import os, sys
sys.path.insert(0, os.environ["FERRY_PYTHON_PATH"])
import ferry
try:
    ferry.Client(sys.argv[1])
    print("connected")
except ferry.FerryError as e:
    print(e.status, e.message)
"#;
    let r = run_bounded(
        python(script, false)
            .arg(&path)
            .env("FERRY_DAEMON_UID", "65534"),
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let out = r.stdout.trim();
    assert!(
        !(out.starts_with("9 ") && out.contains("65534")),
        "FERRY_DAEMON_UID=65534 still refused: {out}"
    );
    let got = lines.next().unwrap().unwrap();
    let n: i64 = got.strip_prefix("got ").unwrap().parse().unwrap();
    assert!(n > 0, "with FERRY_DAEMON_UID the client says Hello: {got}");

    // The `ferry` CLI checks the admin socket's owner the same way.
    let admin = rogue_dir.join("ferryd-admin.sock");
    let (_rogue_admin, mut lines) = rogue_listener(&admin, "SOCK_STREAM", 1);
    let e = status_json(&admin).unwrap_err().to_string();
    assert!(e.contains("uid 65534"), "{e}");
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "got 0",
        "the CLI sent nothing"
    );
}

/// A process running as nobody listening on a Unix socket of `kind` at
/// `path`, that is not ferryd: for each of `conns` connections it prints
/// "got N", the bytes received before the client went quiet (2 s), then
/// hangs up. Returns it and its output lines, "ready" already read.
fn rogue_listener(
    path: &Path,
    kind: &str,
    conns: u32,
) -> (Proc, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let script = format!(
        r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.{kind})
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
s.listen(4)
print("ready", flush=True)
s.settimeout(15)
for _ in range({conns}):
    c, _ = s.accept()
    c.settimeout(2)
    try:
        n = len(c.recv(65536))
    except socket.timeout:
        n = -1
    c.close()
    print("got", n, flush=True)
"#
    );
    let mut rogue = Proc(
        as_nobody("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(rogue.0.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    (rogue, lines)
}

// ---------------------------------------------------------------------------
// 14.

#[test]
fn check_mode_validates_like_start_up() {
    let dir = TempDir::new();
    let long_dir = dir.join(&"d".repeat(100));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "log",
            format!(
                "socket = \"{}\"\nlog = \"ferry_daemon=[[[\"",
                dir.join("log.sock").display()
            ),
            "log",
        ),
        ("empty", "socket = \"\"".into(), "socket"),
        (
            "nul",
            "socket = \"/tmp/ferry\\u0000x.sock\"".into(),
            "socket",
        ),
        (
            "long",
            format!("socket = \"{}\"", long_dir.join("ferryd.sock").display()),
            "socket",
        ),
    ];
    let mut cases: Vec<(String, String)> = cases
        .into_iter()
        .map(|(name, keys, word)| {
            let sub = dir.subdir(name, 0o755);
            // `write_config` puts `log = "info"` first; a second `log` key
            // would be a TOML error, so the log case writes its own file.
            let cfg = sub.join("ferryd.toml");
            let keys = if name == "log" {
                keys
            } else {
                format!("log = \"info\"\n{keys}")
            };
            std::fs::write(&cfg, format!("version = 1\n[daemon]\n{keys}\n")).unwrap();
            (word.to_string(), cfg.to_str().unwrap().to_string())
        })
        .collect();
    if !Path::new("/sys/class/infiniband").exists() {
        let sub = dir.subdir("ibv", 0o755);
        let cfg = write_config(&sub, "", "[fabric]\nprovider = \"ibv\"");
        cases.push(("ibv".into(), cfg.to_str().unwrap().to_string()));
    }
    // Over 1 MiB (of comments: otherwise valid).
    let sub = dir.subdir("huge", 0o755);
    let cfg = write_config(&sub, "", &"# padding padding padding\n".repeat(60_000));
    assert!(std::fs::metadata(&cfg).unwrap().len() > 1 << 20);
    let huge = cfg.to_str().unwrap().to_string();
    cases.push((huge.clone(), huge));
    cases.push(("/dev/zero".into(), "/dev/zero".into()));
    // Something that is not a socket at the socket path.
    let sub = dir.subdir("file", 0o755);
    std::fs::write(sub.join("ferryd.sock"), b"keep").unwrap();
    let cfg = write_config(&sub, "", "");
    cases.push(("not a socket".into(), cfg.to_str().unwrap().to_string()));

    for (word, cfg) in &cases {
        for check in [true, false] {
            // ulimit -v: an unbounded read of /dev/zero must not take the
            // machine's memory with it.
            let r = run_bounded(
                Command::new("/bin/sh")
                    .arg("-c")
                    .arg("ulimit -v 2097152; exec \"$0\" \"$@\"")
                    .arg(bin("ferryd"))
                    .args(if check { &["--check"][..] } else { &[][..] })
                    .arg("--config")
                    .arg(cfg),
                Duration::from_secs(3),
            );
            let mode = if check { "--check" } else { "start-up" };
            assert!(!r.timed_out, "{mode} {cfg}: still running after 3 s: {r:?}");
            assert_eq!(r.code, Some(1), "{mode} {cfg}: {r:?}");
            assert!(
                r.stderr.contains(word.as_str()),
                "{mode} {cfg}: no {word:?} in {r:?}"
            );
            assert!(
                r.elapsed < Duration::from_secs(2),
                "{mode} {cfg}: took {:?}",
                r.elapsed
            );
        }
    }
    assert!(
        !long_dir.exists(),
        "the directory of a too-long socket path was created"
    );
    let sub = dir.subdir("ok", 0o755);
    let cfg = write_config(&sub, "", "");
    let r = ferryd_run(false, true, &cfg);
    assert_eq!(r.code, Some(0), "{r:?}");

    // A socket directory ferryd's user cannot write to (root's, for a
    // ferryd running as nobody): refused by --check as by start-up.
    let cfg = write_config(&sub, "", "");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    for check in [true, false] {
        let r = ferryd_run(true, check, &cfg);
        assert_eq!(r.code, Some(1), "check={check}: {r:?}");
        assert!(
            r.stderr.contains("not writable by ferryd's uid 65534"),
            "check={check}: {r:?}"
        );
    }
    // The same for a socket directory still to be made inside root's.
    let cfg = write_config(
        &sub,
        &format!("socket = \"{}\"", sub.join("new/ferryd.sock").display()),
        "",
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = ferryd_run(true, true, &cfg);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("cannot create socket directory"), "{r:?}");

    // A ferryd already listening: --check says so and accepts the file
    // (it is checked before a restart); start-up refuses.
    let d = Daemon::start("", "");
    let cfg = d.path("ferryd.toml");
    let r = ferryd_run(false, true, &cfg);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("is listening on"), "{r:?}");
    let r = ferryd_run(false, false, &cfg);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("already listening"), "{r:?}");
}

/// ferryd (`--check` or start-up) on `cfg`, as root or as nobody, within
/// 5 s.
fn ferryd_run(nobody: bool, check: bool, cfg: &Path) -> Ran {
    let mut c = if nobody {
        as_nobody(public_bin("ferryd"))
    } else {
        Command::new(bin("ferryd"))
    };
    if check {
        c.arg("--check");
    }
    run_bounded(c.arg("--config").arg(cfg), Duration::from_secs(5))
}

// ---------------------------------------------------------------------------
// 15.

/// A group whose members all left holds every batch published after it,
/// so a client that joins a group once and leaves would stall the stream's
/// producers for good: such a group is deleted after
/// `group_idle_timeout_ms`, and a stream has at most
/// `max_groups_per_stream` groups.
#[test]
fn abandoned_groups_cannot_stall_producers() {
    let d = Daemon::start("group_idle_timeout_ms = 500\nmax_groups_per_stream = 3", "");
    let pair = running_pair(&d, "s", 20);
    let client = d.client();
    {
        let _squat = client
            .consumer("s", "squat", ConsumerOptions::default())
            .expect("join squat");
    } // leaves at once: "squat" now holds everything published
    let groups = |d: &Daemon| -> Vec<String> {
        let st = d.status();
        let s = st.streams.iter().find(|s| s.name == "s").unwrap();
        s.groups.iter().map(|g| g.name.clone()).collect()
    };
    assert!(groups(&d).contains(&"squat".to_string()));
    // The pool fills with batches "squat" holds; then the group expires
    // and the producer goes on.
    assert!(
        eventually(Duration::from_secs(5), || !groups(&d)
            .contains(&"squat".to_string())),
        "the abandoned group was never deleted: {}\n{}",
        status_text(&d),
        d.log()
    );
    assert!(d.log().contains("group_idle_timeout_ms"), "{}", d.log());
    let before = pair.published();
    assert!(
        pair.wait_progress(before + 100, Duration::from_secs(10)),
        "the producer did not go on after the abandoned group expired\n{}",
        d.log()
    );
    // Group limit: honest + two more with members; a fourth is refused.
    let _g2 = client
        .consumer("s", "g2", ConsumerOptions::default())
        .unwrap();
    let _g3 = client
        .consumer("s", "g3", ConsumerOptions::default())
        .unwrap();
    let e = client
        .consumer("s", "g4", ConsumerOptions::default())
        .err()
        .expect("a fourth group must be refused");
    assert_eq!(e.status, Status::Limit, "{e}");
    assert!(e.to_string().contains("max_groups_per_stream"), "{e}");
    // A new member of an existing group is still welcome.
    let _g3b = client
        .consumer("s", "g3", ConsumerOptions::default())
        .unwrap();
    drop((_g2, _g3, _g3b));
    let stats = pair.finish();
    stats.assert_clean();
}

// ---------------------------------------------------------------------------
// 16.

/// Another allowed user cannot produce into, consume, or delete the groups
/// of a stream root created (daemon.stream_access = "owner", the default),
/// nor of a declared stream whose lists leave them out; with
/// `stream_access = "shared"` created streams are open to every allowed user.
#[test]
fn streams_of_one_user_are_closed_to_others() {
    let declared = "[[streams]]\nname = \"shared_in\"\npartitions = 1\nslot_size = 64\nslot_count = 4\nproducers = [0]\nconsumers = [0, 65534]\n";
    let script = r#"
import json, os, sys
sys.path.insert(0, os.environ["FERRY_PYTHON_PATH"])
import ferry
c = ferry.Client(sys.argv[1])
out = {}
for name in ["private", "shared_in"]:
    try:
        c.producer(name).close()
        out[name + "/produce"] = "ok"
    except ferry.FerryError as e:
        out[name + "/produce"] = [e.status, e.message]
    try:
        c.consumer(name, group="theirs").close()
        out[name + "/consume"] = "ok"
    except ferry.FerryError as e:
        out[name + "/consume"] = [e.status, e.message]
    try:
        c.consumer(name, group="honest").close()
        out[name + "/join-honest"] = "ok"
    except ferry.FerryError as e:
        out[name + "/join-honest"] = [e.status, e.message]
print(json.dumps(out))
"#;
    for (access, open) in [("owner", false), ("shared", true)] {
        let d = Daemon::start(
            &format!(
                "socket_mode = \"0666\"\nallowed_uids = [0, 65534]\nstream_access = \"{access}\"\n\
                 group_idle_timeout_ms = 300"
            ),
            declared,
        );
        let pair = running_pair(&d, "private", 20);
        let r = run_bounded(python(script, true).arg(&d.socket), Duration::from_secs(20));
        assert_eq!(r.code, Some(0), "{r:?}\n{}", d.log());
        let out: serde_json::Value =
            serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
        // FERRY_E_PERMISSION_DENIED is 9 in the C ABI.
        let denied =
            |k: &str| out[k][0] == 9 && out[k][1].as_str().is_some_and(|m| m.contains("may not"));
        // Where it may consume, another user still cannot join (take
        // batches from) or delete a group root created.
        assert!(denied("private/join-honest"), "{}", r.stdout);
        if open {
            assert_eq!(out["private/produce"], "ok", "{}", r.stdout);
            assert_eq!(out["private/consume"], "ok", "{}", r.stdout);
            assert!(
                out["private/join-honest"][1]
                    .as_str()
                    .unwrap()
                    .contains("may not join group honest"),
                "{}",
                r.stdout
            );
            let o = ferry_cli_as_nobody(&d, &["group", "delete", "private", "honest"]);
            assert_ne!(o.code, Some(0), "nobody deleted root's group: {o:?}");
            assert!(o.stderr.contains("may not delete group"), "{o:?}");
        } else {
            assert!(denied("private/produce"), "{}", r.stdout);
            assert!(denied("private/consume"), "{}", r.stdout);
            let o = ferry_cli_as_nobody(&d, &["group", "delete", "private", "honest"]);
            assert_ne!(o.code, Some(0), "nobody deleted root's group: {o:?}");
            assert!(o.stderr.contains("may not consume"), "{o:?}");
        }
        // The declared stream's lists hold either way.
        assert!(denied("shared_in/produce"), "{}", r.stdout);
        assert_eq!(out["shared_in/consume"], "ok", "{}", r.stdout);
        let stats = pair.finish();
        stats.assert_clean();
    }
}

// ---------------------------------------------------------------------------
// 17.

/// A full status of many wide streams would take the loop long enough to
/// stall deliveries: it carries at most 4096 partition rows (the rest are
/// counted), and `status STREAM` gives one stream in full.
#[test]
fn status_is_bounded_and_one_stream_is_shown_in_full() {
    let d = Daemon::start("", "");
    let pair = HonestPair::start(&d, "s", "honest");
    let client = d.client();
    let _p = client.producer("wide", spec(1024, 64, 4)).unwrap();
    let members: Vec<_> = (0..5)
        .map(|g| {
            client
                .consumer("wide", &format!("g{g}"), ConsumerOptions::default())
                .unwrap()
        })
        .collect();
    let rows = |st: &ferry_admin::Status| -> (usize, u64) {
        let groups = st.streams.iter().flat_map(|s| s.groups.iter());
        groups.fold((0, 0), |(r, o), g| {
            (r + g.partitions.len(), o + g.partitions_omitted as u64)
        })
    };
    let full = d.status();
    let (shown, omitted) = rows(&full);
    assert!(shown <= 4096, "{shown} partition rows in a full status");
    assert_eq!(
        shown as u64 + omitted,
        5 * 1024 + 2,
        "every row shown or counted"
    );
    let one = Admin::new(&d.admin).status(Some("wide")).unwrap();
    assert_eq!(one.streams.len(), 1);
    assert_eq!(rows(&one), (5 * 1024, 0), "one stream in full");
    let e = Admin::new(&d.admin).status(Some("nope")).unwrap_err();
    assert!(e.to_string().contains("no stream named"), "{e}");
    drop(members);
    let stats = pair.finish();
    stats.assert_clean();
}
