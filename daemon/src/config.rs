//! ferryd's configuration: a versioned TOML file, validated as a whole,
//! with command-line flags layered on top.

use std::path::{Path, PathBuf};

use ferry_shm::layout::PoolLayout;
use ferry_shm::proto::{valid_name, StreamSpec};
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/ferry/ferryd.toml";
pub const CONFIG_VERSION: u32 = 1;
/// Largest slot: 1 GiB.
pub const MAX_SLOT_SIZE: u64 = 1 << 30;
pub const MAX_SLOT_COUNT: u32 = 65536;
pub const MAX_PARTITIONS: u32 = 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format version of this file; only 1 exists.
    #[serde(default = "default_version")]
    pub version: u32,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub fabric: FabricConfig,
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FabricConfig {
    /// "auto" (ibv when a device has an active port, else soft), "ibv" or
    /// "soft". The FERRY_FABRIC environment variable overrides it.
    pub provider: String,
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            provider: "auto".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Session socket; default /run/ferry/ferryd.sock as root, else
    /// $XDG_RUNTIME_DIR/ferry/ferryd.sock.
    pub socket: Option<PathBuf>,
    /// Admin socket (`ferry status`); default `ferryd-admin.sock` beside
    /// the session socket.
    pub admin_socket: Option<PathBuf>,
    /// Permission bits of both sockets, as an octal string.
    pub socket_mode: String,
    /// Users allowed to connect (SO_PEERCRED); default root and the
    /// daemon's own user.
    pub allowed_uids: Option<Vec<u32>>,
    /// Groups allowed to connect (the peer's primary gid).
    pub allowed_gids: Vec<u32>,
    /// How long the data-plane loop spins after its last work before it
    /// sleeps, in microseconds.
    pub spin_us: u64,
    /// Entries per session ring (power of two, 2..=65536).
    pub ring_capacity: u32,
    /// How long SIGTERM waits for in-flight batches to be delivered and
    /// released before exiting anyway.
    pub drain_timeout_ms: u64,
    /// Largest data pool one stream may have, in bytes.
    pub max_pool_bytes: u64,
    /// Largest GPU pool ferryd allocates for one consumer (prefetch slots)
    /// or as one stream's mirror on a GPU (for GPU producers), in bytes.
    pub max_gpu_pool_bytes: u64,
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG overrides it.
    pub log: String,
    /// A connection that has not said Hello within this many milliseconds
    /// is closed.
    pub handshake_timeout_ms: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: None,
            admin_socket: None,
            socket_mode: "0660".into(),
            allowed_uids: None,
            allowed_gids: Vec::new(),
            spin_us: 100,
            ring_capacity: 256,
            drain_timeout_ms: 10_000,
            max_pool_bytes: 16 << 30,
            max_gpu_pool_bytes: 16 << 30,
            log: "info".into(),
            handshake_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    pub slot_size: u64,
    pub slot_count: u32,
}

fn default_version() -> u32 {
    CONFIG_VERSION
}
fn default_partitions() -> u32 {
    1
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: CONFIG_VERSION,
            daemon: DaemonConfig::default(),
            fabric: FabricConfig::default(),
            streams: Vec::new(),
        }
    }
}

pub use ferry_shm::proto::default_socket_path;

/// The admin socket that belongs to session socket `socket`.
pub fn admin_path_for(socket: &Path) -> PathBuf {
    socket.with_file_name("ferryd-admin.sock")
}

/// Checks a stream's numbers against the limits; the error says which one.
pub fn check_stream_spec(name: &str, spec: &StreamSpec, max_pool_bytes: u64) -> Result<(), String> {
    if !valid_name(name) {
        return Err(format!(
            "stream name {name:?} must be 1-128 characters of A-Z a-z 0-9 . _ -"
        ));
    }
    if spec.partitions == 0 || spec.partitions > MAX_PARTITIONS {
        return Err(format!(
            "stream {name}: partitions must be 1..={MAX_PARTITIONS}, got {}",
            spec.partitions
        ));
    }
    if spec.slot_size == 0 || spec.slot_size > MAX_SLOT_SIZE {
        return Err(format!(
            "stream {name}: slot_size must be 1..={MAX_SLOT_SIZE} bytes, got {}",
            spec.slot_size
        ));
    }
    if spec.slot_count < 2 || spec.slot_count > MAX_SLOT_COUNT {
        return Err(format!(
            "stream {name}: slot_count must be 2..={MAX_SLOT_COUNT}, got {}",
            spec.slot_count
        ));
    }
    let layout = PoolLayout::new(spec.slot_size, spec.slot_count)
        .ok_or_else(|| format!("stream {name}: pool size overflows"))?;
    if layout.total > max_pool_bytes {
        return Err(format!(
            "stream {name}: pool of {} bytes exceeds max_pool_bytes {max_pool_bytes}",
            layout.total
        ));
    }
    Ok(())
}

impl Config {
    /// Loads `path`. A missing file at the default path means built-in
    /// defaults; a missing file named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// Checks everything that parsing cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.version != CONFIG_VERSION {
            return bad(format!(
                "config version {} is not supported (this ferryd reads version {CONFIG_VERSION})",
                self.version
            ));
        }
        let d = &self.daemon;
        if parse_mode(&d.socket_mode).is_none() {
            return bad(format!(
                "daemon.socket_mode {:?} is not an octal permission like \"0660\"",
                d.socket_mode
            ));
        }
        if !(2..=65536).contains(&d.ring_capacity) || !d.ring_capacity.is_power_of_two() {
            return bad(format!(
                "daemon.ring_capacity must be a power of two in 2..=65536, got {}",
                d.ring_capacity
            ));
        }
        if d.max_gpu_pool_bytes == 0 {
            return bad("daemon.max_gpu_pool_bytes must be positive".into());
        }
        if d.spin_us > 1_000_000 {
            return bad(format!(
                "daemon.spin_us must be at most 1000000, got {}",
                d.spin_us
            ));
        }
        if let Err(e) = self
            .fabric
            .provider
            .parse::<ferry_verbs::select::Preference>()
        {
            return bad(format!("fabric.provider: {e}"));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.streams {
            if !seen.insert(s.name.as_str()) {
                return bad(format!("stream {} is declared twice", s.name));
            }
            check_stream_spec(&s.name, &s.spec(), d.max_pool_bytes)
                .map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    pub fn socket_path(&self) -> PathBuf {
        self.daemon
            .socket
            .clone()
            .unwrap_or_else(|| default_socket_path(ferry_shm::sys::geteuid()))
    }

    pub fn admin_socket_path(&self) -> PathBuf {
        self.daemon
            .admin_socket
            .clone()
            .unwrap_or_else(|| admin_path_for(&self.socket_path()))
    }

    pub fn socket_mode(&self) -> u32 {
        parse_mode(&self.daemon.socket_mode).unwrap_or(0o660)
    }

    pub fn allowed_uids(&self) -> Vec<u32> {
        self.daemon.allowed_uids.clone().unwrap_or_else(|| {
            let me = ferry_shm::sys::geteuid();
            if me == 0 {
                vec![0]
            } else {
                vec![0, me]
            }
        })
    }
}

impl StreamConfig {
    pub fn spec(&self) -> StreamSpec {
        StreamSpec {
            partitions: self.partitions,
            slot_size: self.slot_size,
            slot_count: self.slot_count,
        }
    }
}

fn parse_mode(s: &str) -> Option<u32> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8).ok()?;
    (m <= 0o777).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        let c = Config::parse(t, Path::new("t.toml"))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"
version = 1
[daemon]
socket = "/tmp/x/ferryd.sock"
socket_mode = "0600"
allowed_uids = [1000]
allowed_gids = [2000]
spin_us = 20
ring_capacity = 64
drain_timeout_ms = 500
log = "debug"

[[streams]]
name = "images"
partitions = 4
slot_size = 9633792
slot_count = 16
"#,
        )
        .unwrap();
        assert_eq!(c.socket_path(), PathBuf::from("/tmp/x/ferryd.sock"));
        assert_eq!(
            c.admin_socket_path(),
            PathBuf::from("/tmp/x/ferryd-admin.sock")
        );
        assert_eq!(c.socket_mode(), 0o600);
        assert_eq!(c.allowed_uids(), vec![1000]);
        assert_eq!(c.streams[0].spec().partitions, 4);
    }

    #[test]
    fn empty_config_is_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.daemon.ring_capacity, 256);
        assert!(c.streams.is_empty());
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            ("version = 2", "version 2"),
            ("[daemon]\nring_capacity = 100", "power of two"),
            ("[daemon]\nsocket_mode = \"rw\"", "octal"),
            ("[daemon]\nbogus = 1", "unknown field"),
            ("[fabric]\nprovider = \"infiniband\"", "auto, ibv or soft"),
            ("[[streams]]\nname = \"a b\"\nslot_size = 10\nslot_count = 4", "stream name"),
            ("[[streams]]\nname = \"a\"\nslot_size = 0\nslot_count = 4", "slot_size"),
            ("[[streams]]\nname = \"a\"\nslot_size = 10\nslot_count = 1", "slot_count"),
            ("[[streams]]\nname = \"a\"\npartitions = 0\nslot_size = 10\nslot_count = 4", "partitions"),
            (
                "[[streams]]\nname = \"a\"\nslot_size = 10\nslot_count = 4\n[[streams]]\nname = \"a\"\nslot_size = 10\nslot_count = 4",
                "declared twice",
            ),
            (
                "[daemon]\nmax_pool_bytes = 1000\n[[streams]]\nname = \"a\"\nslot_size = 1000\nslot_count = 4",
                "max_pool_bytes",
            ),
            ("[daemon]\nmax_gpu_pool_bytes = 0", "max_gpu_pool_bytes"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_explicit_file_is_an_error() {
        let p = Path::new("/nonexistent/ferryd.toml");
        assert!(Config::load(p, false).is_ok());
        let e = Config::load(p, true).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ferryd.toml"), "{e}");
    }
}
