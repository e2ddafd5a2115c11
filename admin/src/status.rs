//! The status document: what `ferry status` shows and `--json` prints.

use serde::{Deserialize, Serialize};

/// Most per-partition rows a full status carries (the rest are counted in
/// `partitions_omitted`; `ferry status STREAM` shows one stream in full):
/// a status of every partition of every group of many wide streams would
/// take the loop long enough to stall deliveries.
pub const MAX_STATUS_ROWS: usize = 4096;

/// One GPU as ferryd found it at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStatus {
    pub ordinal: u32,
    pub name: String,
    /// PCI address like "0000:17:00.0".
    pub pci_bus_id: String,
    pub total_memory: u64,
    /// The device can export its memory as a dma-buf, which NICs can
    /// register.
    pub dma_buf: bool,
    pub gpudirect_rdma: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub daemon: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub socket: String,
    pub draining: bool,
    /// The fabric backend and why it was chosen.
    #[serde(default)]
    pub fabric: String,
    /// Where the data-plane thread runs, and why.
    #[serde(default)]
    pub placement: Placement,
    /// GPUs found at start-up.
    #[serde(default)]
    pub gpus: Vec<GpuStatus>,
    /// The CUDA driver version, or why there are no GPUs.
    #[serde(default)]
    pub gpu_note: String,
    pub sessions: usize,
    /// This daemon's node id in its cluster (none: single host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Where its peer control plane listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_listen: Option<String>,
    /// The other daemons of the cluster.
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    /// Consumers here of streams homed on other daemons.
    #[serde(default)]
    pub remote_consumers: Vec<RemoteConsumerStatus>,
    /// Producers here of streams homed on other daemons.
    #[serde(default)]
    pub remote_producers: Vec<RemoteProducerStatus>,
    /// Connections to the control plane refused before they were a
    /// peer's (wrong secret, unknown node, not a ferry peer).
    #[serde(default)]
    pub peer_connections_refused: u64,
    /// With `cluster`: this daemon's summary and every peer's that
    /// answered, by node; `cluster_missing`: peers up that did not answer
    /// in time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<NodeSummary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_missing: Vec<String>,
    /// How peers are found, when in etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<MembershipStatus>,
    /// Pool memory and streams against their limits.
    #[serde(default)]
    pub memory: MemoryStatus,
    pub streams: Vec<StreamStatus>,
}

/// A consumer here of a stream homed on another daemon.
/// One daemon of the cluster, as `ferry status --cluster` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub node: String,
    pub uptime_s: u64,
    pub sessions: u32,
    pub draining: bool,
    pub peers_up: u32,
    /// The streams homed there.
    pub streams: Vec<StreamSummary>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSummary {
    pub name: String,
    pub partitions: u32,
    pub published: u64,
    pub published_bytes: u64,
    pub delivered: u64,
    pub slots_held: u32,
    pub slot_count: u32,
    pub disk: bool,
    pub groups: Vec<GroupSummary>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub name: String,
    pub members: u32,
    /// Members on other hosts, by host.
    pub remote_members: Vec<String>,
    pub lag: u64,
}

/// Membership in etcd.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MembershipStatus {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub etcd_up: bool,
    /// Since when etcd answers (or does not).
    pub state_ms: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoteConsumerStatus {
    pub session: u64,
    pub pid: i32,
    pub stream: String,
    pub group: String,
    /// The stream's home (node id).
    pub home: String,
    /// "joining", "active", or "waiting" (for its home to come back).
    pub state: String,
    pub prefetch: u32,
    /// Landing slots holding batches it has not released.
    pub held: u32,
    pub delivered: u64,
    pub open_ms: u64,
    /// "cuda:N" when batches are copied into its GPU pool.
    #[serde(default)]
    pub device: Option<String>,
    /// Copies from the landing area into that pool not yet complete.
    #[serde(default)]
    pub copies_in_flight: u32,
}

/// A producer here of a stream homed on another daemon (its batches go
/// there through an outbox).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoteProducerStatus {
    pub session: u64,
    pub pid: i32,
    pub stream: String,
    /// The stream's home (node id).
    pub home: String,
    /// "opening" (until the home answered) or "active".
    pub state: String,
    pub published: u64,
    /// Of those, acknowledged by the home.
    pub acked: u64,
    /// "cuda:N" when it publishes from GPU memory.
    #[serde(default)]
    pub device: Option<String>,
}

/// One peer daemon as this one sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node_id: String,
    /// Its control plane's configured address.
    pub addr: String,
    /// "up", "down", or "connecting" (never up since start-up).
    pub state: String,
    /// How long it has been in that state.
    pub state_ms: u64,
    /// The fabric agreed with it (while up, or when last up).
    pub fabric: String,
    /// The last heartbeat's round trip.
    pub rtt_us: Option<u64>,
    /// Control bytes over the current (or last) connection.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Failed attempts and lost connections since start-up.
    pub errors: u64,
    pub last_error: Option<String>,
    /// The streams whose home it is, as it announced them.
    #[serde(default)]
    pub streams: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// Data pool bytes of all streams.
    pub pool_bytes: u64,
    pub max_total_pool_bytes: u64,
    pub max_pool_bytes_per_uid: u64,
    pub streams: u32,
    pub max_streams: u32,
    /// What the streams each uid created take.
    pub per_uid: Vec<UidUsage>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StreamStatus {
    pub name: String,
    pub declared: bool,
    /// The uid that created it (None: declared in the config).
    #[serde(default)]
    pub owner_uid: Option<u32>,
    /// Bytes of its data pool.
    #[serde(default)]
    pub pool_bytes: u64,
    pub partitions: u32,
    pub slot_size: u64,
    pub slot_count: u32,
    pub slots_free: u32,
    pub slots_granted: u32,
    pub slots_held: u32,
    pub published: u64,
    /// Payload bytes of those batches.
    #[serde(default)]
    pub published_bytes: u64,
    /// Batches handed to consumers (every group, redeliveries included),
    /// and their bytes.
    #[serde(default)]
    pub delivered: u64,
    #[serde(default)]
    pub delivered_bytes: u64,
    pub end_offsets: Vec<u64>,
    /// Slots holding batches published while the stream had no group,
    /// kept for the first group to form.
    #[serde(default)]
    pub slots_held_for_first_group: u32,
    /// Groups deleted for having had no member for group_idle_timeout_ms.
    #[serde(default)]
    pub groups_expired: u64,
    pub producers: Vec<ProducerStatus>,
    pub groups: Vec<GroupStatus>,
    /// A disk stream's log.
    #[serde(default)]
    pub disk: Option<DiskStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DiskStatus {
    pub dir: String,
    /// Bytes of its segments, all partitions.
    pub bytes: u64,
    /// The lowest offset each partition's log still holds.
    pub start_offsets: Vec<u64>,
    /// Publishes written but not yet as durable as the stream promises.
    pub unsynced: u64,
    /// Why writes to the log fail now (producers wait meanwhile).
    pub error: Option<String>,
    /// Its fsync policy and retention ("fsync=every retention_bytes=...").
    #[serde(default)]
    pub settings: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProducerStatus {
    pub session: u64,
    pub pid: i32,
    /// The host of a producer on another daemon (its node id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub granted: u32,
    pub published: u64,
    /// How long it has waited for a free slot (none granted, none free);
    /// absent when it is not waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_slot_ms: Option<u64>,
    /// "cuda:N" when publishing from GPU memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default)]
    pub gpu_copies_in_flight: u32,
    #[serde(default)]
    pub gpu_bytes_copied: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub lag: u64,
    /// Slots whose batch this group has not released (or not received).
    #[serde(default)]
    pub slots_held: u64,
    /// Epochs it finished (passed the end markers of every partition).
    #[serde(default)]
    pub epochs: u64,
    /// The uid that created the group.
    #[serde(default)]
    pub owner_uid: u32,
    /// Partition rows left out of a full status (see `ferry status
    /// STREAM`).
    #[serde(default)]
    pub partitions_omitted: u32,
    pub members: Vec<MemberStatus>,
    pub partitions: Vec<GroupPartStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    pub session: u64,
    pub pid: i32,
    /// The host of a member on another daemon (its node id); absent for
    /// a member here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// For a member on another host: landing slots its host credited that
    /// no batch was written into yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landing_credits: Option<u32>,
    pub partitions: Vec<u32>,
    pub prefetch: u32,
    pub inflight: u32,
    pub delivered: u64,
    pub ring_occupancy: u32,
    /// "cuda:N" for GPU delivery (ferryd's numbering); absent for host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default)]
    pub gpu_copies_in_flight: u32,
    #[serde(default)]
    pub gpu_bytes_copied: u64,
    /// Of those, copied from GPU memory (batches published from a GPU).
    #[serde(default)]
    pub gpu_bytes_from_gpu: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GroupPartStatus {
    pub partition: u32,
    pub owner: Option<u64>,
    pub next: u64,
    pub committed: u64,
    pub end: u64,
    pub lag: u64,
    pub inflight: u32,
    pub redeliver: u32,
}

/// What one uid's streams (or all streams) take.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct UidUsage {
    pub uid: u32,
    pub streams: u32,
    pub partitions: u32,
    pub slots: u64,
    pub pool_bytes: u64,
}

/// Where the data-plane thread runs, for `ferry status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The CPUs it may run on; empty when not pinned.
    pub cpus: Vec<u32>,
    /// The NUMA node of those CPUs, when they lie on one.
    pub numa_node: Option<u32>,
    /// Why: what was asked for, and what it was near.
    pub reason: String,
}

impl std::fmt::Display for Placement {
    /// "CPU 3, NUMA node 0 (why)", or the reason it is not pinned.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.cpus.is_empty() {
            return f.write_str(&self.reason);
        }
        let word = if self.cpus.len() == 1 { "CPU" } else { "CPUs" };
        write!(f, "{word} {}", cpu_list(&self.cpus))?;
        if let Some(n) = self.numa_node {
            write!(f, ", NUMA node {n}")?;
        }
        write!(f, " ({})", self.reason)
    }
}

/// CPUs as a list like "0-3,8".
pub fn cpu_list(cpus: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}
