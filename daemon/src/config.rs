//! ferryd's configuration: a versioned TOML file, validated as a whole,
//! with command-line flags layered on top.

use std::path::{Path, PathBuf};

use ferry_shm::layout::PoolLayout;
use ferry_shm::proto::{valid_name, Durability, Fsync, StreamSpec};
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/ferry/ferryd.toml";
pub const CONFIG_VERSION: u32 = 1;
/// Largest slot: 1 GiB.
pub const MAX_SLOT_SIZE: u64 = 1 << 30;
pub const MAX_SLOT_COUNT: u32 = 65536;
pub const MAX_PARTITIONS: u32 = 1024;
/// `daemon.spin_while_waited_us` unless configured.
pub const DEFAULT_SPIN_WHILE_WAITED_US: u64 = 1000;
/// Largest configuration file read (a bigger one, or /dev/zero, is refused).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Longest socket path: `sun_path` holds 108 bytes with the NUL.
pub const MAX_SOCKET_PATH: usize = 107;

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
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub admin: AdminConfig,
}

/// `[admin]`: the HTTP endpoint for monitoring (`/metrics`, `/live`,
/// `/ready`), off unless `http` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// "address:port" to serve on, e.g. "127.0.0.1:9464". It has no
    /// authentication: bind it where only the monitoring can reach it.
    pub http: Option<String>,
    /// Whether `/ready` also needs every peer in `cluster.peers` up.
    pub ready_needs_peers: bool,
    /// For tests of the watchdog: lets root and ferryd's own uid wedge the
    /// data-plane loop for a while through the admin socket
    /// (`{"cmd":"debug-stall","ms":N}`). Never set it in production.
    pub debug_requests: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            http: None,
            ready_needs_peers: true,
            debug_requests: false,
        }
    }
}

impl AdminConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(a) = &self.http {
            a.parse::<std::net::SocketAddr>().map_err(|_| {
                format!("admin.http = {a:?} must be an IP address and port such as \"127.0.0.1:9464\" (not a host name)")
            })?;
        }
        Ok(())
    }
}

/// `[cluster]`: this daemon and the others it works with. Without a
/// `node_id` ferryd serves its own host only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This daemon's name in the cluster: 1-64 characters of A-Z a-z 0-9
    /// . _ -, unique among its peers.
    pub node_id: Option<String>,
    /// Where the control plane listens, "address:port" (TCP).
    pub listen: Option<String>,
    /// The other daemons (a static list; both sides list each other).
    pub peers: Vec<PeerConfig>,
    /// The cluster secret: a file of at least 16 bytes that only its owner
    /// may read (mode 0600 or 0400), the same on every daemon.
    pub secret_file: Option<PathBuf>,
    /// How often a heartbeat goes to each peer.
    pub heartbeat_ms: u64,
    /// A peer that sends nothing for this long is declared down.
    pub peer_timeout_ms: u64,
    /// The longest wait between attempts to reach a peer that is down (the
    /// wait doubles from 100 ms up to this).
    pub reconnect_max_ms: u64,
    /// "static": the peers are `peers`; "etcd": each daemon registers
    /// itself in etcd under a lease and finds the others there.
    pub membership: String,
    /// etcd's client URLs (membership = "etcd").
    pub etcd_endpoints: Vec<String>,
    /// The key prefix this cluster's daemons share in etcd.
    pub etcd_prefix: String,
    /// TTL of this daemon's lease: a daemon whose lease expires (it died,
    /// or lost etcd for longer) is removed from the others' views.
    pub etcd_ttl_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: None,
            listen: None,
            peers: Vec::new(),
            secret_file: None,
            heartbeat_ms: 500,
            peer_timeout_ms: 3_000,
            reconnect_max_ms: 5_000,
            membership: "static".into(),
            etcd_endpoints: Vec::new(),
            etcd_prefix: "/ferry".into(),
            etcd_ttl_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub node_id: String,
    /// Its control plane's address, "address:port".
    pub addr: String,
}

/// Shortest cluster secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest cluster secret file read.
pub const MAX_SECRET_BYTES: u64 = 4096;

/// Whether `id` can name a node.
pub fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Reads the cluster secret from `path`, refusing a file that others may
/// read, that is not a regular file, or that is too short. Surrounding
/// whitespace (a trailing newline) is not part of the secret.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let f = std::fs::File::open(path).map_err(|e| format!("cluster.secret_file {shown}: {e}"))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("cluster.secret_file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("cluster.secret_file {shown} is not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "cluster.secret_file {shown} has mode {:04o}: its group or others may access it; make it 0600 or 0400 (chmod 600 {shown})",
            meta.mode() & 0o7777
        ));
    }
    let me = ferry_shm::sys::geteuid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "cluster.secret_file {shown} belongs to uid {}, not to ferryd's uid {me} or root",
            meta.uid()
        ));
    }
    let mut bytes = Vec::new();
    f.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cluster.secret_file {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(format!(
            "cluster.secret_file {shown} is over {MAX_SECRET_BYTES} bytes"
        ));
    }
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "cluster.secret_file {shown} holds {} bytes of secret, at least {MIN_SECRET_BYTES} are needed (for instance: head -c 32 /dev/urandom | base64 > {shown})",
            secret.len()
        ));
    }
    Ok(secret)
}

/// Checks an "address:port" of the cluster section (resolving a host
/// name); the error names `key`.
fn check_addr(key: &str, addr: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("{key} = {addr:?} is not an address:port: {e}"))?
        .next()
        .ok_or_else(|| format!("{key} = {addr:?} resolves to no address"))
}

impl ClusterConfig {
    /// Whether this daemon is part of a cluster.
    pub fn enabled(&self) -> bool {
        self.node_id.is_some()
    }

    /// Whether peers are found in etcd.
    pub fn uses_etcd(&self) -> bool {
        self.membership == "etcd"
    }

    fn validate_membership(&self) -> Result<(), String> {
        match self.membership.as_str() {
            "static" => {
                if !self.etcd_endpoints.is_empty() {
                    return Err("cluster.etcd_endpoints is set, but cluster.membership is \"static\" (set membership = \"etcd\" to use them)".into());
                }
                Ok(())
            }
            "etcd" => {
                if self.etcd_endpoints.is_empty() {
                    return Err("cluster.membership = \"etcd\" needs cluster.etcd_endpoints, e.g. [\"http://10.0.0.1:2379\"]".into());
                }
                if !self.peers.is_empty() {
                    return Err("cluster.peers is for membership = \"static\"; with \"etcd\" the peers are found in etcd".into());
                }
                for e in &self.etcd_endpoints {
                    let rest = e.strip_prefix("http://").ok_or_else(|| {
                        format!("cluster.etcd_endpoints: {e:?} must be an http:// URL (TLS to etcd is not supported yet)")
                    })?;
                    if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                        return Err(format!(
                            "cluster.etcd_endpoints: {e:?} must be http://host:port"
                        ));
                    }
                }
                if !self.etcd_prefix.starts_with('/')
                    || self.etcd_prefix.len() < 2
                    || self.etcd_prefix.ends_with('/')
                {
                    return Err(format!(
                        "cluster.etcd_prefix {:?} must start with / and not end with one, e.g. \"/ferry\" or \"/jobs/llm-7/ferry\"",
                        self.etcd_prefix
                    ));
                }
                if !(2_000..=600_000).contains(&self.etcd_ttl_ms)
                    || !self.etcd_ttl_ms.is_multiple_of(1000)
                {
                    return Err(format!(
                        "cluster.etcd_ttl_ms must be whole seconds from 2000 to 600000 (etcd's leases count seconds), got {}",
                        self.etcd_ttl_ms
                    ));
                }
                Ok(())
            }
            other => Err(format!(
                "cluster.membership {other:?} must be \"static\" or \"etcd\""
            )),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let Some(me) = &self.node_id else {
            if self.listen.is_some()
                || !self.peers.is_empty()
                || self.secret_file.is_some()
                || self.uses_etcd()
            {
                return Err(
                    "cluster.listen, cluster.peers and cluster.secret_file need cluster.node_id"
                        .into(),
                );
            }
            return Ok(());
        };
        if !valid_node_id(me) {
            return Err(format!(
                "cluster.node_id {me:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
            ));
        }
        let Some(listen) = &self.listen else {
            return Err(
                "cluster.listen (the control plane's address:port) is needed with cluster.node_id"
                    .into(),
            );
        };
        let addr = check_addr("cluster.listen", listen)?;
        self.validate_membership()?;
        if self.uses_etcd() && addr.ip().is_unspecified() {
            return Err(format!(
                "cluster.listen = {listen:?}: with membership = \"etcd\" it is the address this daemon registers for its peers to dial, so name this host's address, not {}",
                addr.ip()
            ));
        }
        if self.secret_file.is_none() {
            return Err("cluster.secret_file is needed with cluster.node_id: peers prove to each other that they hold the cluster secret".into());
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.peers {
            if !valid_node_id(&p.node_id) {
                return Err(format!(
                    "cluster.peers: node_id {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                    p.node_id
                ));
            }
            if p.node_id == *me {
                return Err(format!(
                    "cluster.peers lists this daemon's own node_id {me:?}"
                ));
            }
            if !seen.insert(p.node_id.as_str()) {
                return Err(format!("cluster.peers lists {:?} twice", p.node_id));
            }
            check_addr(&format!("cluster.peers {}: addr", p.node_id), &p.addr)?;
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms > 60_000 {
            return Err(format!(
                "cluster.heartbeat_ms must be in 1..=60000, got {}",
                self.heartbeat_ms
            ));
        }
        if self.peer_timeout_ms < 2 * self.heartbeat_ms {
            return Err(format!(
                "cluster.peer_timeout_ms ({}) must be at least twice cluster.heartbeat_ms ({})",
                self.peer_timeout_ms, self.heartbeat_ms
            ));
        }
        if self.reconnect_max_ms < 100 {
            return Err(format!(
                "cluster.reconnect_max_ms must be at least 100, got {}",
                self.reconnect_max_ms
            ));
        }
        Ok(())
    }
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
    /// Group (name from /etc/group, or a number) given to both sockets;
    /// its members may connect, like `allowed_gids`.
    pub socket_group: Option<String>,
    /// Connections open at once, all users together.
    pub max_connections: u32,
    /// Connections open at once from one uid.
    pub max_connections_per_uid: u32,
    /// A connection that said Hello but opened no producer or consumer is
    /// closed after this many milliseconds.
    pub idle_timeout_ms: u64,
    /// Streams, all together (declared ones included).
    pub max_streams: u32,
    /// Streams created by producers of one uid.
    pub max_streams_per_uid: u32,
    /// Partitions of all streams together.
    pub max_total_partitions: u64,
    /// Partitions of the streams one uid created.
    pub max_partitions_per_uid: u64,
    /// Slots of all streams together.
    pub max_total_slots: u64,
    /// Slots of the streams one uid created.
    pub max_slots_per_uid: u64,
    /// Data pool bytes of all streams together; default half the host's
    /// memory.
    pub max_total_pool_bytes: Option<u64>,
    /// Data pool bytes of the streams one uid created; default
    /// `max_total_pool_bytes`.
    pub max_pool_bytes_per_uid: Option<u64>,
    /// A stream created by a producer that has had no session for this
    /// many milliseconds is deleted, with any batches it still held
    /// (0: never). Declared streams are never deleted.
    pub stream_idle_timeout_ms: u64,
    /// An admin request must arrive whole within this many milliseconds.
    pub admin_timeout_ms: u64,
    /// Who may use a stream a producer created: "owner" (its uid only;
    /// root may delete it) or "shared" (every allowed user).
    pub stream_access: String,
    /// Consumer groups one stream may have.
    pub max_groups_per_stream: u32,
    /// A consumer group that has had no member for this many milliseconds
    /// is deleted, so that an abandoned group (which holds every batch
    /// published after it) cannot stall the stream's producers for good
    /// (0: never).
    pub group_idle_timeout_ms: u64,
    /// A producer that has waited this long for a free slot is logged,
    /// with the groups holding the slots (0: never).
    pub slot_wait_log_ms: u64,
    /// How many released batches of each stream stay readable for a seek
    /// (the replay window). Free slots outside it are reused most recently
    /// freed first; slots inside it, oldest release first, only when no
    /// other slot is free. Absent: the whole pool (every free slot keeps
    /// its batch until reused), the default because `ferry-bench shm`
    /// measured it faster than a window of 0 (see the README).
    pub replay_window: Option<u32>,
    /// While a consumer sleeps waiting for a batch (it has credit left and
    /// its stream has a producer), ferryd keeps polling for up to this long
    /// after its last work instead of sleeping after `spin_us`: a publish
    /// then costs the sleeping consumer one wake-up (its own), not ferryd's
    /// and then its own. The price is a polling core while trainers wait
    /// (0, or anything below `spin_us`: sleep after `spin_us` as always).
    pub spin_while_waited_us: u64,
    /// Where the data-plane thread runs: "auto" (a core on the NUMA node
    /// of the RDMA NIC; unpinned with the soft fabric), "none", or a CPU
    /// list such as "3" or "2-3,6".
    pub data_plane_cpus: String,
    /// Where disk streams keep their logs and committed offsets:
    /// /var/lib/ferry as root, else $XDG_STATE_HOME/ferry
    /// (~/.local/state/ferry). Created when the first disk stream opens.
    pub data_dir: Option<PathBuf>,
    /// A disk stream's segment files are closed at this size (bytes)...
    pub segment_bytes: u64,
    /// ...or at this age (ms), and only whole segments are deleted.
    pub segment_ms: u64,
    /// How often committed offsets of disk streams are written out (ms;
    /// at most this much of a group's progress is redone after a crash).
    pub offsets_flush_ms: u64,
}

impl DaemonConfig {
    /// `data_dir`, or its default for the effective uid.
    /// daemon.data_dir; else, under systemd, the unit's `StateDirectory=`
    /// ($STATE_DIRECTORY); else /var/lib/ferry for root, the user's
    /// state directory for others.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        if let Some(d) = systemd_dir("STATE_DIRECTORY") {
            return d;
        }
        if ferry_shm::sys::geteuid() == 0 {
            return PathBuf::from("/var/lib/ferry");
        }
        match std::env::var_os("XDG_STATE_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("ferry"),
            _ => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".local/state/ferry"),
                None => std::env::temp_dir().join("ferry-state"),
            },
        }
    }
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
            socket_group: None,
            max_connections: 4096,
            max_connections_per_uid: 512,
            idle_timeout_ms: 10_000,
            max_streams: 256,
            max_streams_per_uid: 64,
            max_total_partitions: 16_384,
            max_partitions_per_uid: 4_096,
            max_total_slots: 1 << 20,
            max_slots_per_uid: 1 << 18,
            max_total_pool_bytes: None,
            max_pool_bytes_per_uid: None,
            stream_idle_timeout_ms: 3_600_000,
            admin_timeout_ms: 2_000,
            stream_access: "owner".into(),
            max_groups_per_stream: 64,
            group_idle_timeout_ms: 600_000,
            slot_wait_log_ms: 5_000,
            replay_window: None,
            spin_while_waited_us: DEFAULT_SPIN_WHILE_WAITED_US,
            data_plane_cpus: "auto".into(),
            data_dir: None,
            segment_bytes: 128 << 20,
            segment_ms: 3_600_000,
            offsets_flush_ms: 100,
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
    /// Uids that may produce into it (besides root); absent: every
    /// allowed user.
    pub producers: Option<Vec<u32>>,
    /// Uids that may consume it (join its groups, seek, delete a group);
    /// absent: every allowed user.
    pub consumers: Option<Vec<u32>>,
    /// This stream's `daemon.group_idle_timeout_ms` (0: never).
    pub group_idle_timeout_ms: Option<u64>,
    /// This stream's `daemon.replay_window`.
    pub replay_window: Option<u32>,
    /// "memory" (the default: the pool only, lost with ferryd) or "disk":
    /// each partition is also a log of segment files in `daemon.data_dir`,
    /// which survives restarts and serves replays past the pool.
    pub durability: Option<String>,
    /// A disk stream's acknowledgements: "every" (the default: after the
    /// record is on stable storage), "interval" (one fdatasync every
    /// `fsync_interval_ms`), "never" (after the write; the OS decides).
    pub fsync: Option<String>,
    /// With `fsync = "interval"` (default 50).
    pub fsync_interval_ms: Option<u32>,
    /// A disk stream keeps whole segments at most this old (absent: no
    /// limit by age).
    pub retention_ms: Option<u64>,
    /// A disk stream keeps at most this many bytes per partition, whole
    /// segments at a time (absent: no limit by size).
    pub retention_bytes: Option<u64>,
    /// "keep" (the default: retention never deletes what a live group has
    /// not committed) or "strict" (the limits win; the group skips ahead
    /// and a warning says how far).
    pub retention: Option<String>,
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
            cluster: ClusterConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

pub use ferry_admin::{admin_path_for, default_socket_path};

/// The first directory systemd put in `var` (RUNTIME_DIRECTORY,
/// STATE_DIRECTORY: colon-separated absolute paths).
fn systemd_dir(var: &str) -> Option<PathBuf> {
    let v = std::env::var_os(var)?;
    let first = v.to_str()?.split(':').next()?;
    first.starts_with('/').then(|| PathBuf::from(first))
}

/// Checks a stream's numbers against the limits; the error says which one.
pub fn check_stream_spec(name: &str, spec: &StreamSpec, max_pool_bytes: u64) -> Result<(), String> {
    if !valid_name(name) {
        return Err(format!(
            "stream name {name:?} must be 1-128 characters of A-Z a-z 0-9 . _ -"
        ));
    }
    let d = &spec.durability;
    if d.disk {
        if name.starts_with('.') {
            return Err(format!(
                "stream {name:?}: a disk stream's name is its directory's and must not start with '.'"
            ));
        }
        if let Fsync::IntervalMs(ms) = d.fsync {
            if !(1..=60_000).contains(&ms) {
                return Err(format!(
                    "stream {name}: fsync interval must be 1..=60000 ms, got {ms}"
                ));
            }
        }
    } else if *d != Durability::MEMORY {
        return Err(format!(
            "stream {name}: fsync and retention apply to disk streams only (durability is memory)"
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
            "stream {name}: a pool of {} bytes (slots rounded up to 4 KiB, or to 64 B under 4 KiB, and 256 bytes of metadata per slot) is over daemon.max_pool_bytes = {max_pool_bytes}",
            layout.total
        ));
    }
    Ok(())
}

impl Config {
    /// Loads `path`. A missing file at the default path means built-in
    /// defaults; a missing file named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match read_limited(path) {
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
        if let Err(m) = crate::placement::parse(&d.data_plane_cpus) {
            return bad(format!("daemon.{m}"));
        }
        if d.segment_bytes < 4096 {
            return bad(format!(
                "daemon.segment_bytes must be at least 4096 (a disk log's segments roll at this size; default 128 MiB), got {}",
                d.segment_bytes
            ));
        }
        if d.segment_ms < 100 {
            return bad(format!(
                "daemon.segment_ms must be at least 100 (a disk log's segments roll at this age; default one hour), got {}",
                d.segment_ms
            ));
        }
        if d.offsets_flush_ms == 0 {
            return bad(
                "daemon.offsets_flush_ms must be at least 1 (how often disk streams' commits are stored; default 100)"
                    .to_string(),
            );
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
        for (key, p) in [
            ("daemon.socket", self.socket_path()),
            ("daemon.admin_socket", self.admin_socket_path()),
        ] {
            check_socket_path(key, &p).map_err(ConfigError::Invalid)?;
        }
        if self.socket_path() == self.admin_socket_path() {
            return bad("daemon.socket and daemon.admin_socket are the same path".into());
        }
        if !matches!(d.stream_access.as_str(), "owner" | "shared") {
            return bad(format!(
                "daemon.stream_access must be \"owner\" or \"shared\", got {:?}",
                d.stream_access
            ));
        }
        if d.allowed_uids.as_ref().is_some_and(|u| u.is_empty())
            && d.allowed_gids.is_empty()
            && d.socket_group.is_none()
        {
            return bad("daemon.allowed_uids is empty and no allowed_gids or socket_group is set: nobody could connect".into());
        }
        if let Some(g) = &d.socket_group {
            resolve_group(g).map_err(ConfigError::Invalid)?;
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&d.log) {
            return bad(format!(
                "daemon.log (or --log) {:?} is not a valid filter: {e}",
                d.log
            ));
        }
        for (key, v) in [
            ("max_connections", d.max_connections as u64),
            ("max_connections_per_uid", d.max_connections_per_uid as u64),
            ("max_streams", d.max_streams as u64),
            ("max_streams_per_uid", d.max_streams_per_uid as u64),
            ("max_total_partitions", d.max_total_partitions),
            ("max_partitions_per_uid", d.max_partitions_per_uid),
            ("max_total_slots", d.max_total_slots),
            ("max_slots_per_uid", d.max_slots_per_uid),
            ("handshake_timeout_ms", d.handshake_timeout_ms),
            ("idle_timeout_ms", d.idle_timeout_ms),
            ("admin_timeout_ms", d.admin_timeout_ms),
            ("max_groups_per_stream", d.max_groups_per_stream as u64),
        ] {
            if v == 0 {
                return bad(format!("daemon.{key} must be positive"));
            }
        }
        for (key, v) in [
            ("spin_us", d.spin_us),
            ("spin_while_waited_us", d.spin_while_waited_us),
        ] {
            if v > 1_000_000 {
                return bad(format!("daemon.{key} must be at most 1000000, got {v}"));
            }
        }
        self.fabric_preference()?;
        self.cluster.validate().map_err(ConfigError::Invalid)?;
        self.admin.validate().map_err(ConfigError::Invalid)?;
        let mut seen = std::collections::HashSet::new();
        let (mut parts, mut slots, mut bytes) = (0u64, 0u64, 0u64);
        for s in &self.streams {
            if !seen.insert(s.name.as_str()) {
                return bad(format!("stream {} is declared twice", s.name));
            }
            s.durability().map_err(ConfigError::Invalid)?;
            check_stream_spec(&s.name, &s.spec(), d.max_pool_bytes)
                .map_err(ConfigError::Invalid)?;
            parts += s.partitions as u64;
            slots += s.slot_count as u64;
            bytes += PoolLayout::new(s.slot_size, s.slot_count).map_or(u64::MAX, |l| l.total);
        }
        let declared = [
            (
                "max_streams",
                self.streams.len() as u64,
                d.max_streams as u64,
            ),
            ("max_total_partitions", parts, d.max_total_partitions),
            ("max_total_slots", slots, d.max_total_slots),
            ("max_total_pool_bytes", bytes, self.max_total_pool_bytes()),
        ];
        for (key, have, limit) in declared {
            if have > limit {
                return bad(format!(
                    "the declared streams need {have} against daemon.{key} = {limit}"
                ));
            }
        }
        Ok(())
    }

    /// Everything `validate` checks, and what only this host can say: the
    /// fabric provider can be had, the socket directories are safe to
    /// use. `ferryd --check` and start-up run exactly this.
    ///
    /// A daemon listening on the socket path now is not an error here
    /// (`--check` before a restart): it comes back in `live`, and start-up
    /// refuses it.
    pub fn preflight(&self) -> Result<Preflight, ConfigError> {
        self.validate()?;
        let mut live = Vec::new();
        for p in [self.socket_path(), self.admin_socket_path()] {
            if let Some(dir) = p.parent() {
                if dir.exists() {
                    check_socket_dir(dir).map_err(ConfigError::Invalid)?;
                } else {
                    check_creatable(dir).map_err(ConfigError::Invalid)?;
                }
            }
            if check_socket_file(&p).map_err(ConfigError::Invalid)? == SocketFile::Live {
                live.push(p);
            }
        }
        self.check_data_dir().map_err(ConfigError::Invalid)?;
        let fabric = ferry_verbs::select::select(self.fabric_preference()?).map_err(|e| {
            ConfigError::Invalid(format!("fabric.provider = {:?}: {e}", self.fabric.provider))
        })?;
        let want = crate::placement::parse(&self.daemon.data_plane_cpus)
            .map_err(|m| ConfigError::Invalid(format!("daemon.{m}")))?;
        let placement =
            crate::placement::for_fabric(&want, &fabric).map_err(ConfigError::Invalid)?;
        let secret = match &self.cluster.secret_file {
            Some(p) => Some(read_secret(p).map_err(ConfigError::Invalid)?),
            None => None,
        };
        Ok(Preflight {
            fabric,
            live,
            placement,
            secret,
        })
    }

    /// The data directory is one (or can be made), and every declared
    /// disk stream that has a log there can open it: what start-up would
    /// refuse, found before.
    fn check_data_dir(&self) -> Result<(), String> {
        if let Some(d) = self.daemon.data_dir.as_ref().filter(|d| d.is_relative()) {
            return Err(format!(
                "daemon.data_dir {} must be an absolute path",
                d.display()
            ));
        }
        let data = self.daemon.data_dir();
        if data.exists() && !data.is_dir() {
            return Err(format!(
                "daemon.data_dir {} is not a directory",
                data.display()
            ));
        }
        for s in &self.streams {
            if !s.durability().is_ok_and(|d| d.disk) {
                continue;
            }
            let dir = data.join("streams").join(&s.name);
            let stored = crate::log::stored_stream(&dir)
                .map_err(|e| format!("disk stream {} in {}: {e}", s.name, dir.display()))?;
            if let Some(stored) = stored {
                crate::log::spec_fits(&s.name, &dir, &stored.spec, &s.spec())?;
            }
        }
        Ok(())
    }

    fn fabric_preference(&self) -> Result<ferry_verbs::select::Preference, ConfigError> {
        self.fabric
            .provider
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("fabric.provider: {e}")))
    }

    /// The limit on all pools together.
    pub fn max_total_pool_bytes(&self) -> u64 {
        self.daemon
            .max_total_pool_bytes
            .unwrap_or_else(|| physical_memory() / 2)
    }

    /// The limit on one uid's pools.
    pub fn max_pool_bytes_per_uid(&self) -> u64 {
        self.daemon
            .max_pool_bytes_per_uid
            .unwrap_or_else(|| self.max_total_pool_bytes())
    }

    /// The gid of `daemon.socket_group`, if set (validated).
    pub fn socket_gid(&self) -> Option<u32> {
        self.daemon
            .socket_group
            .as_deref()
            .and_then(|g| resolve_group(g).ok())
    }

    /// daemon.socket; else, under systemd, in the unit's
    /// `RuntimeDirectory=` ($RUNTIME_DIRECTORY); else
    /// [`ferry_shm::proto::own_socket_path`].
    pub fn socket_path(&self) -> PathBuf {
        if let Some(s) = &self.daemon.socket {
            return s.clone();
        }
        if let Some(d) = systemd_dir("RUNTIME_DIRECTORY") {
            return d.join("ferryd.sock");
        }
        ferry_shm::proto::own_socket_path(ferry_shm::sys::geteuid())
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
    /// The stream's durability, or why the config's words for it are wrong.
    pub fn durability(&self) -> Result<Durability, String> {
        let name = &self.name;
        let disk = match self.durability.as_deref() {
            None | Some("memory") => false,
            Some("disk") => true,
            Some(o) => {
                return Err(format!(
                    "stream {name}: durability must be \"memory\" or \"disk\", not {o:?}"
                ))
            }
        };
        let disk_only = [
            ("fsync", self.fsync.is_some()),
            ("fsync_interval_ms", self.fsync_interval_ms.is_some()),
            ("retention_ms", self.retention_ms.is_some()),
            ("retention_bytes", self.retention_bytes.is_some()),
            ("retention", self.retention.is_some()),
        ];
        if !disk {
            if let Some((k, _)) = disk_only.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "stream {name}: {k} applies to durability = \"disk\" only"
                ));
            }
            return Ok(Durability::MEMORY);
        }
        let fsync = match (self.fsync.as_deref(), self.fsync_interval_ms) {
            (None | Some("every"), None) => Fsync::Every,
            (Some("interval"), ms) => {
                let ms = ms.unwrap_or(50);
                if !(1..=60_000).contains(&ms) {
                    return Err(format!(
                        "stream {name}: fsync_interval_ms must be 1..=60000, got {ms}"
                    ));
                }
                Fsync::IntervalMs(ms)
            }
            (Some("never"), None) => Fsync::Never,
            (_, Some(_)) => {
                return Err(format!(
                    "stream {name}: fsync_interval_ms goes with fsync = \"interval\""
                ))
            }
            (Some(o), _) => {
                return Err(format!(
                    "stream {name}: fsync must be \"every\", \"interval\" or \"never\", not {o:?}"
                ))
            }
        };
        let strict = match self.retention.as_deref() {
            None | Some("keep") => false,
            Some("strict") => true,
            Some(o) => {
                return Err(format!(
                    "stream {name}: retention must be \"keep\" or \"strict\", not {o:?}"
                ))
            }
        };
        Ok(Durability {
            disk,
            fsync,
            retention_ms: self.retention_ms.unwrap_or(0),
            retention_bytes: self.retention_bytes.unwrap_or(0),
            strict,
        })
    }

    /// The stream's spec (its durability checked by `Config::validate`).
    pub fn spec(&self) -> StreamSpec {
        StreamSpec {
            durability: self.durability().unwrap_or(Durability::MEMORY),
            partitions: self.partitions,
            slot_size: self.slot_size,
            slot_count: self.slot_count,
        }
    }
}

/// What `Config::preflight` found besides errors.
#[derive(Debug)]
pub struct Preflight {
    pub fabric: ferry_verbs::select::Selection,
    /// Socket paths a daemon answers on now (start-up would refuse them).
    pub live: Vec<PathBuf>,
    /// Where the data-plane thread will run.
    pub placement: crate::placement::Placement,
    /// The cluster secret, when in a cluster.
    pub secret: Option<Vec<u8>>,
}

/// Reads a configuration file, refusing one over [`MAX_CONFIG_BYTES`].
fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut text = String::new();
    let n = f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if n as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_CONFIG_BYTES} bytes; not a configuration file"),
        ));
    }
    Ok(text)
}

/// A socket path the kernel can bind: not empty, no NUL, at most
/// [`MAX_SOCKET_PATH`] bytes, with a file name.
pub fn check_socket_path(key: &str, p: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = p.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(format!("{key} is empty"));
    }
    if bytes.contains(&0) {
        return Err(format!("{key} {:?} contains a NUL byte", p));
    }
    if bytes.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "{key} {} is {} bytes long; a Unix socket path has at most {MAX_SOCKET_PATH}",
            p.display(),
            bytes.len()
        ));
    }
    if p.file_name().is_none() {
        return Err(format!("{key} {} names no file", p.display()));
    }
    Ok(())
}

/// A directory that may hold ferryd's sockets: a real directory (not a
/// symlink), owned by ferryd's user or root, and writable by nobody else
/// (as systemd's RuntimeDirectory and XDG_RUNTIME_DIR are): otherwise
/// another user could replace the socket with one of their own.
pub fn check_socket_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("socket directory {}: {e}", dir.display()))?;
    if !md.file_type().is_dir() {
        return Err(format!(
            "socket directory {} is not a directory (a symlink?)",
            dir.display()
        ));
    }
    let me = ferry_shm::sys::geteuid();
    if md.uid() != me && md.uid() != 0 {
        return Err(format!(
            "socket directory {} is owned by uid {}, not by ferryd's uid {me} or root; refusing to use it",
            dir.display(),
            md.uid()
        ));
    }
    if me != 0 && (md.uid() != me || md.mode() & 0o200 == 0) {
        return Err(format!(
            "socket directory {} is not writable by ferryd's uid {me} (owner uid {}, mode {:04o}); use a directory of its own (systemd: RuntimeDirectory=)",
            dir.display(),
            md.uid(),
            md.mode() & 0o7777
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Err(format!(
            "socket directory {} is writable by group or others (mode {:04o}); refusing to use it (another user could replace the socket)",
            dir.display(),
            md.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Whether ferryd can create the missing directory `dir`: its nearest
/// existing ancestor must be a directory ferryd's uid may write (root may
/// write anywhere).
fn check_creatable(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = ferry_shm::sys::geteuid();
    let mut up = dir.parent();
    while let Some(a) = up {
        if let Ok(md) = std::fs::metadata(a) {
            if !md.is_dir() {
                return Err(format!(
                    "cannot create socket directory {}: {} is not a directory",
                    dir.display(),
                    a.display()
                ));
            }
            let writable =
                me == 0 || (md.uid() == me && md.mode() & 0o200 != 0) || md.mode() & 0o002 != 0;
            if !writable {
                return Err(format!(
                    "cannot create socket directory {}: {} is not writable by ferryd's uid {me}",
                    dir.display(),
                    a.display()
                ));
            }
            return Ok(());
        }
        up = a.parent();
    }
    Ok(())
}

/// What is at a socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketFile {
    Absent,
    /// A socket nothing answers on: start-up removes it.
    Stale,
    /// A daemon answers on it: start-up refuses.
    Live,
}

/// What is at a socket path; an error for anything that is not a socket
/// (which ferryd never removes).
pub fn check_socket_file(path: &Path) -> Result<SocketFile, String> {
    use std::os::unix::fs::FileTypeExt;
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SocketFile::Absent),
        Err(e) => return Err(format!("checking {}: {e}", path.display())),
    };
    if !md.file_type().is_socket() {
        return Err(format!(
            "{} exists and is not a socket ({}); refusing to remove it",
            path.display(),
            if md.file_type().is_symlink() {
                "a symlink"
            } else if md.is_dir() {
                "a directory"
            } else {
                "a file"
            }
        ));
    }
    let live = ferry_shm::sys::seqpacket_connect(path).is_ok()
        || std::os::unix::net::UnixStream::connect(path).is_ok();
    Ok(if live {
        SocketFile::Live
    } else {
        SocketFile::Stale
    })
}

/// A group name (from /etc/group) or number.
pub fn resolve_group(g: &str) -> Result<u32, String> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == g).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("daemon.socket_group {g:?} is not a group in /etc/group"))
}

/// The host's memory in bytes (MemTotal), or 16 GiB when unknown. Read
/// once: quota checks and status ask for it on the data-plane loop.
pub fn physical_memory() -> u64 {
    static MEM: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MEM.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .map_or(16 << 30, |kib| kib * 1024)
    })
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
    fn membership_in_etcd_is_checked() {
        let base = "[cluster]\nnode_id = \"a\"\nsecret_file = \"/x\"\n";
        let ok = format!("{base}listen = \"127.0.0.1:7000\"\nmembership = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n");
        let c = parse(&ok).unwrap();
        assert!(c.cluster.uses_etcd());
        assert_eq!(c.cluster.etcd_prefix, "/ferry");
        assert_eq!(c.cluster.etcd_ttl_ms, 10_000);
        for (extra, want) in [
            ("membership = \"gossip\"", "\"static\" or \"etcd\""),
            ("membership = \"etcd\"", "needs cluster.etcd_endpoints"),
            ("etcd_endpoints = [\"http://e:2379\"]", "membership is \"static\""),
            ("membership = \"etcd\"\netcd_endpoints = [\"https://e:2379\"]", "http://"),
            ("membership = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]\netcd_prefix = \"ferry\"", "must start with /"),
            ("membership = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]\netcd_prefix = \"/ferry/\"", "not end with one"),
            ("membership = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]\netcd_ttl_ms = 10", "etcd_ttl_ms"),
            ("membership = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]\npeers = [{ node_id = \"b\", addr = \"127.0.0.1:1\" }]", "cluster.peers is for"),
        ] {
            let text = format!("{base}listen = \"127.0.0.1:7000\"\n{extra}\n");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let any = format!("{base}listen = \"0.0.0.0:7000\"\nmembership = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]\n");
        let e = parse(&any).unwrap_err().to_string();
        assert!(e.contains("name this host's address"), "{e}");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            ("version = 2", "version 2"),
            ("[daemon]\nring_capacity = 100", "power of two"),
            ("[daemon]\nsocket_mode = \"rw\"", "octal"),
            ("[daemon]\nbogus = 1", "unknown field"),
            ("[daemon]\nsegment_bytes = 0", "segment_bytes must be at least 4096"),
            ("[daemon]\nsegment_ms = 0", "segment_ms must be at least 100"),
            ("[daemon]\noffsets_flush_ms = 0", "offsets_flush_ms must be at least 1"),
            ("[daemon]\ndata_plane_cpus = \"fast\"", "data_plane_cpus"),
            ("[daemon]\nspin_while_waited_us = 5000000", "spin_while_waited_us"),
            ("[daemon]\nreplay_window = -1", "replay_window"),
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
            ("[daemon]\nlog = \"ferry=[[[\"", "not a valid filter"),
            ("[daemon]\nsocket = \"\"", "daemon.socket is empty"),
            ("[daemon]\nsocket = \"/tmp/a\\u0000b\"", "NUL"),
            ("[daemon]\nadmin_socket = \"/tmp/x/ferryd.sock\"\nsocket = \"/tmp/x/ferryd.sock\"", "same path"),
            ("[daemon]\nsocket_group = \"no-such-group-here\"", "not a group"),
            ("[daemon]\nmax_connections_per_uid = 0", "positive"),
            (
                "[daemon]\nmax_streams = 1\n[[streams]]\nname = \"a\"\nslot_size = 10\nslot_count = 4\n[[streams]]\nname = \"b\"\nslot_size = 10\nslot_count = 4",
                "daemon.max_streams",
            ),
            (
                "[daemon]\nmax_total_pool_bytes = 100\n[[streams]]\nname = \"a\"\nslot_size = 1000\nslot_count = 4",
                "daemon.max_total_pool_bytes",
            ),
        ];
        let long = format!("[daemon]\nsocket = \"/tmp/{}/s.sock\"", "x".repeat(120));
        let err = parse(&long).unwrap_err().to_string();
        assert!(err.contains("at most 107"), "{err}");
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn socket_directories_others_can_write_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ferry-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_socket_dir(&dir).is_ok());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_socket_dir(&dir).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(check_socket_dir(&dir).is_err(), "group-writable too");
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn config_files_over_the_limit_are_refused() {
        let e = Config::load(Path::new("/dev/zero"), true).unwrap_err();
        assert!(format!("{e:#}").contains("reading /dev/zero"), "{e}");
        let e = std::error::Error::source(&e).unwrap().to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_explicit_file_is_an_error() {
        let p = Path::new("/nonexistent/ferryd.toml");
        assert!(Config::load(p, false).is_ok());
        let e = Config::load(p, true).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ferryd.toml"), "{e}");
    }
}
