//! Helpers for the workspace integration tests: run a real ferryd in a
//! private directory and find the workspace's binaries.

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
}

impl Daemon {
    /// Starts ferryd with `extra` appended to a config that sets the
    /// socket paths (so `extra` may hold [[streams]] tables and
    /// `daemon` keys other than the sockets, given as `key = value` lines
    /// under the implicit [daemon] table).
    pub fn start(daemon_keys: &str, streams: &str) -> Daemon {
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
        let log = std::fs::File::create(dir.join("ferryd.log")).unwrap();
        let child = Command::new(bin("ferryd"))
            .arg("--config")
            .arg(dir.join("ferryd.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferryd");
        let d = Daemon {
            dir,
            socket,
            admin,
            child: Some(child),
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.admin.exists() && self.socket.exists() && self.log().contains("ferryd ready") {
                return;
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

    pub fn status(&self) -> ferry_daemon::server::Status {
        ferry_daemon::server::query_status(&self.admin).expect("status")
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

pub fn exists(p: &Path) -> bool {
    p.exists()
}
