//! The local session protocol: small postcard-encoded messages over a
//! SOCK_SEQPACKET Unix socket (one message per packet, file descriptors
//! attached with SCM_RIGHTS). Bulk data never crosses the socket: it moves
//! through the rings and the data pool.
//!
//! A connection starts with `Hello`/`Welcome`. It then either stays a
//! control connection, or becomes one producer or consumer session with
//! `OpenProducer`/`OpenConsumer`, answered by `Opened` with two fds
//! attached: the session region (both rings) and the stream's data pool
//! (read-only for consumers). A client wakes a sleeping daemon by sending
//! `Wake` on its session socket: the daemon never shares a file
//! description that it reads with a client, so no client can block it or
//! consume another client's wake-ups.

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to these messages or the shared layouts.
pub const PROTOCOL_VERSION: u32 = 8;
/// Largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Longest stream or group name.
pub const MAX_NAME: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSpec {
    pub partitions: u32,
    pub slot_size: u64,
    pub slot_count: u32,
    /// Memory only (the default), or a log on disk under the pool.
    pub durability: Durability,
}

/// When a publish to a disk stream is acknowledged (and visible to
/// consumers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Fsync {
    /// After its record is on stable storage (fdatasync; publishes that
    /// arrive together share one).
    #[default]
    Every,
    /// Group commit: one fdatasync per this many milliseconds,
    /// acknowledgements after it.
    IntervalMs(u32),
    /// After its record is written to the file (the OS decides when it
    /// reaches the disk: a host crash may lose the tail, a crash of ferryd
    /// alone loses nothing).
    Never,
}

/// A stream's disk tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Durability {
    /// Each partition is also an append-only log in the daemon's data
    /// directory; the pool is a cache over it.
    pub disk: bool,
    pub fsync: Fsync,
    /// Whole segments older than this go (0: no limit by age).
    pub retention_ms: u64,
    /// Per partition: the oldest whole segments go while the log is over
    /// this (0: no limit by size).
    pub retention_bytes: u64,
    /// Retention deletes segments a live group has not committed yet (the
    /// group skips ahead and is told); otherwise such segments stay.
    pub strict: bool,
}

impl StreamSpec {
    /// For messages: "partitions=4 slot_size=4096 slot_count=8
    /// durability=disk fsync=every".
    pub fn describe(&self) -> String {
        let d = &self.durability;
        let mut s = format!(
            "partitions={} slot_size={} slot_count={} durability={}",
            self.partitions,
            self.slot_size,
            self.slot_count,
            if d.disk { "disk" } else { "memory" }
        );
        if d.disk {
            s.push(' ');
            s.push_str(&d.describe());
        }
        s
    }
}

impl Durability {
    /// A disk stream's settings, as `ferry status` and refusals show them
    /// ("fsync=every retention_bytes=... retention=strict").
    pub fn describe(&self) -> String {
        let mut s = match self.fsync {
            Fsync::Every => "fsync=every".to_string(),
            Fsync::IntervalMs(ms) => format!("fsync=interval({ms} ms)"),
            Fsync::Never => "fsync=never".to_string(),
        };
        if self.retention_ms > 0 {
            s.push_str(&format!(" retention_ms={}", self.retention_ms));
        }
        if self.retention_bytes > 0 {
            s.push_str(&format!(" retention_bytes={}", self.retention_bytes));
        }
        if self.strict {
            s.push_str(" retention=strict");
        }
        s
    }

    /// Memory only: today's streams.
    pub const MEMORY: Durability = Durability {
        disk: false,
        fsync: Fsync::Every,
        retention_ms: 0,
        retention_bytes: 0,
        strict: false,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Hello {
        protocol: u32,
        client: String,
    },
    /// Become a producer of `stream`; create it with `spec` when it does not
    /// exist (without a spec an unknown stream is an error). `device` /
    /// `device_bus`: publish from this GPU's memory (as for consumers).
    OpenProducer {
        stream: String,
        spec: Option<StreamSpec>,
        device: Option<u32>,
        device_bus: Option<String>,
    },
    /// Become a member of consumer group `group` of `stream`. At most
    /// `prefetch` batches are delivered and unreleased at a time. `device`:
    /// deliver into this GPU's memory (`None`: host memory), named by its
    /// PCI bus id when the client knows it (`device_bus`, which wins: GPU
    /// ordinals differ between processes under CUDA_VISIBLE_DEVICES).
    OpenConsumer {
        stream: String,
        group: String,
        prefetch: u32,
        device: Option<u32>,
        device_bus: Option<String>,
        /// Where a group this join creates starts (ignored when the group
        /// exists).
        start: GroupStart,
    },
    /// Consumer: redeliver `partition` from `offset` (or skip to it).
    Seek {
        partition: u32,
        offset: u64,
    },
    /// "Look at my submission ring": sent (without waiting) after a push
    /// when the daemon announced that it sleeps. Never answered.
    Wake,
}

/// `Request::Wake` encoded, ready to send on the hot path.
pub const WAKE: &[u8] = &[4];

/// Where a new consumer group starts reading each partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum GroupStart {
    /// Batches published from now on, plus those published while the
    /// stream had no group at all (kept for the first group to form, so
    /// that starting producers first loses nothing).
    #[default]
    Default,
    /// The oldest batch still in the pool, released ones included (a
    /// replay of everything retained).
    Earliest,
    /// Only batches published from now on.
    Latest,
    /// One offset per partition (each still retained, or the partition's
    /// end).
    Offsets(Vec<u64>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session: u64,
    pub stream_id: u32,
    pub partitions: u32,
    pub slot_size: u64,
    pub slot_count: u32,
    pub ring_capacity: u32,
    /// Producer: slots the daemon keeps granted ahead. Consumer: prefetch.
    pub credits: u32,
    /// Consumer with GPU delivery: its GPU pool. Producer publishing from
    /// a GPU: the stream's mirror there (slot i of the pool <-> slot i).
    pub gpu: Option<GpuPoolInfo>,
    /// Producer: its publishes are acknowledged with `OP_ACK` once durable
    /// (a disk stream at this host). Otherwise a publish counts as taken
    /// once ferryd has read it off the submission ring.
    pub acks: bool,
}

/// A consumer's pool in GPU memory: `slots` slots of `stride` bytes, which
/// the consumer opens once through the CUDA IPC handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuPoolInfo {
    /// ferryd's ordinal of the GPU (informational: ordinals differ between
    /// processes).
    pub ordinal: u32,
    /// PCI bus id of the GPU, lower case ("0000:17:00.0").
    pub pci_bus_id: String,
    /// The CUDA IPC memory handle (64 bytes).
    pub ipc_handle: Vec<u8>,
    /// Where the pool starts in the allocation the handle maps.
    pub ipc_offset: u64,
    /// Bytes in the allocation.
    pub len: u64,
    pub stride: u64,
    pub slots: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Welcome {
        protocol: u32,
        daemon: String,
    },
    /// Fds attached: session region, data pool (read-only for consumers).
    Opened(SessionInfo),
    Done,
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Why the daemon refused a request. Stable: the C ABI maps these to
/// `FERRY_E_*` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    InvalidArgument,
    UnknownStream,
    StreamMismatch,
    PermissionDenied,
    Protocol,
    OffsetGone,
    Limit,
    ShuttingDown,
    Internal,
    /// The requested device (a GPU) does not exist on this host.
    NoDevice,
    /// The request is valid but this ferryd cannot do it.
    Unsupported,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("message is {0} bytes, more than the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = postcard::to_stdvec(msg)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    Ok(postcard::from_bytes(bytes)?)
}

/// Where a system ferryd (the systemd unit's `RuntimeDirectory=ferry`)
/// listens.
pub const SYSTEM_SOCKET: &str = "/run/ferry/ferryd.sock";

/// The session socket a process with effective uid `euid` uses when none
/// is configured: [`SYSTEM_SOCKET`] for root; else
/// $XDG_RUNTIME_DIR/ferry/ferryd.sock (or /tmp/ferry-UID/ without one),
/// unless only the system socket exists: then that one, so that users of
/// the host's ferryd need no setting.
pub fn default_socket_path(euid: u32) -> std::path::PathBuf {
    use std::path::PathBuf;
    let own = own_socket_path(euid);
    if euid != 0 && !own.exists() && std::path::Path::new(SYSTEM_SOCKET).exists() {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    own
}

/// The socket of a ferryd that `euid` runs itself: [`SYSTEM_SOCKET`] for
/// root, else $XDG_RUNTIME_DIR/ferry/ferryd.sock (or /tmp/ferry-UID/).
pub fn own_socket_path(euid: u32) -> std::path::PathBuf {
    use std::path::PathBuf;
    if euid == 0 {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("ferry/ferryd.sock"),
        _ => std::env::temp_dir().join(format!("ferry-{euid}/ferryd.sock")),
    }
}

/// The uid that root gave the system socket's directory (/run/ferry, made
/// by systemd for the unit's `User=`): only root can make a directory in
/// /run, so its owner is the ferryd root chose.
fn system_daemon_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::path::Path::new(SYSTEM_SOCKET).parent()?;
    let run = std::fs::symlink_metadata(dir.parent()?).ok()?;
    if run.uid() != 0 || run.mode() & 0o022 != 0 {
        return None;
    }
    let d = std::fs::symlink_metadata(dir).ok()?;
    d.is_dir().then_some(d.uid())
}

/// Whether a process running as `uid`, listening at `socket`, may be
/// trusted as ferryd by a client running as `me`: root, `me`, the uid in
/// `FERRY_DAEMON_UID`, or, at [`SYSTEM_SOCKET`], the owner of its
/// directory. The error says why not, and how to allow it.
pub fn check_daemon_uid(uid: u32, me: u32, socket: &std::path::Path) -> Result<(), String> {
    let expected = match std::env::var("FERRY_DAEMON_UID") {
        Ok(v) => Some(
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("FERRY_DAEMON_UID={v:?} is not a numeric uid"))?,
        ),
        Err(_) => None,
    };
    if uid == 0 || uid == me || Some(uid) == expected {
        return Ok(());
    }
    let system = socket.parent() == std::path::Path::new(SYSTEM_SOCKET).parent();
    if system && system_daemon_uid() == Some(uid) {
        return Ok(());
    }
    Err(format!(
        "it runs as uid {uid}, not root or uid {me}{}{}; refusing to talk to it (set FERRY_DAEMON_UID={uid} if that is your ferryd)",
        expected
            .map(|u| format!(" or FERRY_DAEMON_UID {u}"))
            .unwrap_or_default(),
        if system {
            " or the owner of /run/ferry"
        } else {
            ""
        }
    ))
}

/// What to tell a person whose connect to a ferryd socket failed so.
pub fn connect_hint(kind: std::io::ErrorKind) -> &'static str {
    match kind {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            " (is ferryd running?)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (the socket's mode or group does not let this user in: see daemon.socket_mode and socket_group)"
        }
        _ => "",
    }
}

/// Parses where a consumer wants its batches: "cpu" (or "host", or empty)
/// for host memory, "cuda:N" (or "cuda" for 0) for GPU N.
pub fn parse_device(s: &str) -> Result<Option<u32>, String> {
    match s.trim() {
        "" | "cpu" | "host" => Ok(None),
        "cuda" => Ok(Some(0)),
        t => t
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<u32>().ok())
            .map(Some)
            .ok_or_else(|| format!("device {s:?}: expected \"cpu\" or \"cuda:N\"")),
    }
}

/// Stream and group names: 1 to 128 of `[A-Za-z0-9._-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_constant_is_the_encoded_request() {
        assert_eq!(encode(&Request::Wake).unwrap(), WAKE);
    }

    #[test]
    fn round_trip() {
        let r = Request::OpenConsumer {
            stream: "s".into(),
            group: "g".into(),
            prefetch: 4,
            device: Some(1),
            device_bus: Some("0000:17:00.0".into()),
            start: GroupStart::Offsets(vec![3, 0]),
        };
        let b = encode(&r).unwrap();
        assert_eq!(decode::<Request>(&b).unwrap(), r);
        let info = Response::Opened(SessionInfo {
            session: 1,
            stream_id: 0,
            partitions: 2,
            slot_size: 4096,
            slot_count: 8,
            ring_capacity: 256,
            credits: 4,
            gpu: Some(GpuPoolInfo {
                ordinal: 0,
                pci_bus_id: "0000:17:00.0".into(),
                ipc_handle: vec![7; 64],
                ipc_offset: 0,
                len: 16384,
                stride: 4096,
                slots: 4,
            }),
            acks: true,
        });
        let b = encode(&info).unwrap();
        assert_eq!(decode::<Response>(&b).unwrap(), info);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..64usize {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode::<Request>(&junk);
            let _ = decode::<Response>(&junk);
        }
        assert!(decode::<Request>(&[0xff; 8]).is_err());
        assert!(matches!(
            decode::<Request>(&vec![0u8; MAX_MESSAGE + 1]),
            Err(CodecError::TooLarge(_))
        ));
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu"), Ok(None));
        assert_eq!(parse_device(""), Ok(None));
        assert_eq!(parse_device("cuda"), Ok(Some(0)));
        assert_eq!(parse_device("cuda:3"), Ok(Some(3)));
        for bad in ["gpu0", "cuda:", "cuda:-1", "cuda:x", "cuda:1:2"] {
            let e = parse_device(bad).unwrap_err();
            assert!(e.contains("cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn names() {
        assert!(valid_name("train.images-v2_0"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(129)));
    }
}
