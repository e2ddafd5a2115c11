//! What `/metrics` shows, and how: histograms the loop keeps without
//! locks or atomics (it owns them; a scrape copies them through the
//! inbox), the snapshot the loop hands out, and its encoding in the
//! Prometheus text format with `prometheus-client` (on the admin endpoint's
//! thread, never on the loop).
//!
//! Names follow `ferry_<subsystem>_<name>_<unit>`. Labels are streams,
//! groups, partitions and peers, all bounded by the configuration; never a
//! batch, a session or an offset.

use std::sync::OnceLock;
use std::time::Instant;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

/// Upper bounds of the latency buckets, in microseconds (1 us to 10 s).
pub const LATENCY_BOUNDS_US: [u64; 22] = [
    1, 3, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
    250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A histogram of microsecond durations with [`LATENCY_BOUNDS_US`] buckets
/// (and one above them). Plain integers: only its owner writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hist {
    /// Per bucket, not cumulative; the last is above every bound.
    pub counts: [u64; LATENCY_BOUNDS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

/// The bucket a duration of `us` goes in: the first bound that holds it.
fn bucket_of(us: u64) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&b| b < us)
}

impl Hist {
    pub fn observe(&mut self, us: u64) {
        self.counts[bucket_of(us)] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.count += 1;
    }

    /// The buckets as the encoder takes them: (upper bound in seconds,
    /// count in that bucket alone), the last bound `f64::MAX` for +Inf.
    fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BOUNDS_US
            .iter()
            .map(|&b| b as f64 / 1e6)
            .chain([f64::MAX])
            .zip(self.counts.iter().copied())
            .collect()
    }
}

/// A [`Hist`] written by one thread and read by another (relaxed
/// atomics: a reader may see one observation half counted, never a wrong
/// bucket).
#[derive(Debug)]
pub struct AtomicHist {
    counts: [std::sync::atomic::AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: std::sync::atomic::AtomicU64,
}

impl Default for AtomicHist {
    fn default() -> Self {
        AtomicHist::new()
    }
}

impl AtomicHist {
    pub const fn new() -> AtomicHist {
        AtomicHist {
            counts: [const { std::sync::atomic::AtomicU64::new(0) }; LATENCY_BOUNDS_US.len() + 1],
            sum_us: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn observe(&self, us: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.counts[bucket_of(us)].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn snapshot(&self) -> Hist {
        use std::sync::atomic::Ordering::Relaxed;
        let mut h = Hist::default();
        for (c, a) in h.counts.iter_mut().zip(&self.counts) {
            *c = a.load(Relaxed);
        }
        h.sum_us = self.sum_us.load(Relaxed);
        h.count = h.counts.iter().sum();
        h
    }
}

/// Publishes whose offset is a multiple of this carry a time stamp, and
/// their deliveries feed the latency histograms: one clock read per this
/// many publishes and deliveries.
pub const LATENCY_SAMPLE_EVERY: u64 = 16;

/// Microseconds since the daemon started, never 0 (0 means "no stamp"),
/// wrapping after about 71 minutes (differences are taken wrapping, so a
/// sample older than that reads short: the lag metrics show such waits).
pub fn now_us() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    let us = START.get_or_init(Instant::now).elapsed().as_micros() as u32;
    us.max(1)
}

/// Microseconds from stamp `t` (from [`now_us`]) until now.
pub fn since_us(t: u32) -> u64 {
    now_us().wrapping_sub(t) as u64
}

/// fsync durations of disk logs, observed by the disk thread (never the
/// loop), read by scrapes.
pub static FSYNC: AtomicHist = AtomicHist::new();

/// What the loop keeps per stream for the metrics, beyond its status.
#[derive(Debug, Clone, Default)]
pub struct StreamCounters {
    pub published_bytes: u64,
    pub delivered: u64,
    pub delivered_bytes: u64,
    /// Publish to hand-off for consumers on this host (on their ring, or
    /// queued for their GPU copy).
    pub latency_local: Hist,
    /// Publish to the fabric write into a consumer's landing slot on
    /// another host.
    pub latency_remote: Hist,
    /// GPU copy bytes of sessions that closed (live ones are in the status).
    pub gpu_bytes_closed: u64,
    /// Recovery of a disk stream at start-up: torn or corrupt tails cut,
    /// damaged records kept and skipped.
    pub recovery_cuts: u64,
    pub recovery_damaged: u64,
}

/// One peer's data-link counters (they outlive its links).
#[derive(Debug, Clone, Default)]
pub struct LinkCounters {
    pub writes: u64,
    pub write_bytes: u64,
    pub receives: u64,
    pub errors: u64,
    /// Times a consumer there ran out of credit with batches waiting here.
    pub credit_stalls: u64,
    /// Credits its consumers' daemons gave here, not yet used.
    pub credits_outstanding: u64,
    /// Post to completion of the fabric writes of sampled batches.
    pub write_latency: Hist,
}

/// A scrape's copy of everything `/metrics` shows, taken on the loop.
#[derive(Debug)]
pub struct Snapshot {
    pub status: ferry_admin::Status,
    /// Per stream of `status.streams`, in the same order.
    pub streams: Vec<StreamCounters>,
    /// Per peer of `status.peers`, in the same order.
    pub links: Vec<LinkCounters>,
    /// The loop's turns so far.
    pub loop_turns: u64,
    /// What `/ready` says.
    pub ready: bool,
    /// daemon.data_dir, when it exists: its file system's space is shown.
    pub data_dir: Option<std::path::PathBuf>,
    /// Snapshots the loop took for scrapes (this one included), and the
    /// nanoseconds it spent on them: what monitoring costs the data plane.
    pub snapshots: u64,
    pub snapshot_ns: u64,
}

/// Writes one metric family, and its samples, to the encoder.
struct Family<'a, 'e> {
    enc: &'a mut DescriptorEncoder<'e>,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

impl Family<'_, '_> {
    /// Declares family `name` and writes each row with `each` (rows
    /// without labels get no braces).
    fn family<V>(
        &mut self,
        name: &str,
        help: &str,
        ty: MetricType,
        rows: &[(Labels<'_>, V)],
        each: impl Fn(&mut prometheus_client::encoding::MetricEncoder, &V) -> std::fmt::Result,
    ) -> std::fmt::Result {
        if rows.is_empty() {
            return Ok(());
        }
        let mut m = self.enc.encode_descriptor(name, help, None, ty)?;
        for (labels, v) in rows {
            if labels.is_empty() {
                each(&mut m, v)?;
            } else {
                each(&mut m.encode_family(labels)?, v)?;
            }
        }
        Ok(())
    }

    /// `name` ends in `_total`, which the encoder adds to the samples of
    /// the family it declares without it (OpenMetrics).
    fn counter<V: prometheus_client::encoding::EncodeCounterValue>(
        &mut self,
        name: &str,
        help: &str,
        rows: &[(Labels<'_>, V)],
    ) -> std::fmt::Result {
        let name = name.strip_suffix("_total").unwrap_or(name);
        self.family(name, help, MetricType::Counter, rows, |m, v| {
            m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(v, None)
        })
    }

    fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        rows: &[(Labels<'_>, V)],
    ) -> std::fmt::Result {
        self.family(name, help, MetricType::Gauge, rows, |m, v| {
            m.encode_gauge(v)
        })
    }

    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        rows: &[(Labels<'_>, &Hist)],
    ) -> std::fmt::Result {
        self.family(name, help, MetricType::Histogram, rows, |m, h| {
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum_us as f64 / 1e6,
                h.count,
                &h.buckets(),
                None,
            )
        })
    }
}

fn as_gauge(rows: Vec<(Labels<'_>, u64)>) -> Vec<(Labels<'_>, i64)> {
    rows.into_iter().map(|(l, v)| (l, v as i64)).collect()
}

/// The snapshot as a collector, for one scrape's registry.
#[derive(Debug)]
struct Collect(Snapshot, Hist);

impl prometheus_client::collector::Collector for Collect {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let (snap, fsync) = (&self.0, &self.1);
        let st = &snap.status;
        let mut f = Family { enc: &mut enc };
        let version = st.daemon.trim_start_matches("ferryd ");
        let node = st.node_id.as_deref().unwrap_or("");
        f.gauge(
            "ferry_daemon_info",
            "This ferryd: its version and cluster node id (always 1).",
            &[(vec![("version", version), ("node", node)], 1)],
        )?;
        f.gauge(
            "ferry_daemon_uptime_seconds",
            "Seconds since ferryd started.",
            &[(vec![], st.uptime_s as i64)],
        )?;
        f.gauge(
            "ferry_daemon_ready",
            "1 while /ready answers 200 (its body says why not otherwise).",
            &[(vec![], snap.ready as i64)],
        )?;
        f.gauge(
            "ferry_daemon_draining",
            "1 while ferryd drains after SIGTERM.",
            &[(vec![], st.draining as i64)],
        )?;
        f.gauge(
            "ferry_daemon_sessions",
            "Local client sessions connected.",
            &[(vec![], st.sessions as i64)],
        )?;
        f.counter(
            "ferry_daemon_loop_turns_total",
            "Turns of the data-plane loop (stops growing when it is wedged).",
            &[(vec![], snap.loop_turns)],
        )?;
        f.counter(
            "ferry_daemon_snapshots_total",
            "Snapshots the data-plane loop took for /metrics scrapes.",
            &[(vec![], snap.snapshots)],
        )?;
        f.counter(
            "ferry_daemon_snapshot_seconds_total",
            "Seconds of the data-plane loop spent taking those snapshots (what scraping costs it).",
            &[(vec![], snap.snapshot_ns as f64 / 1e9)],
        )?;
        f.gauge(
            "ferry_memory_pool_bytes",
            "Bytes of stream pools in shared memory.",
            &[(vec![], st.memory.pool_bytes as i64)],
        )?;
        f.gauge(
            "ferry_memory_pool_limit_bytes",
            "daemon.max_total_pool_bytes.",
            &[(vec![], st.memory.max_total_pool_bytes as i64)],
        )?;

        let streams: Vec<_> = st.streams.iter().zip(&snap.streams).collect();
        let by_stream = |v: &dyn Fn(&ferry_admin::StreamStatus, &StreamCounters) -> u64| {
            streams
                .iter()
                .map(|(s, c)| (vec![("stream", s.name.as_str())], v(s, c)))
                .collect::<Vec<_>>()
        };
        f.counter(
            "ferry_stream_published_batches_total",
            "Batches published into the stream on this host.",
            &by_stream(&|s, _| s.published),
        )?;
        f.counter(
            "ferry_stream_published_bytes_total",
            "Payload bytes published into the stream on this host.",
            &by_stream(&|_, c| c.published_bytes),
        )?;
        f.counter(
            "ferry_stream_delivered_batches_total",
            "Batches handed to consumers (every group, redeliveries included).",
            &by_stream(&|_, c| c.delivered),
        )?;
        f.counter(
            "ferry_stream_delivered_bytes_total",
            "Payload bytes handed to consumers.",
            &by_stream(&|_, c| c.delivered_bytes),
        )?;
        let mut slots = Vec::new();
        for (s, _) in &streams {
            for (state, n) in [
                ("free", s.slots_free),
                ("granted", s.slots_granted),
                ("held", s.slots_held),
            ] {
                slots.push((
                    vec![("stream", s.name.as_str()), ("state", state)],
                    n as i64,
                ));
            }
        }
        f.gauge(
            "ferry_stream_slots",
            "Pool slots by state: free, granted to a producer, held by a batch.",
            &slots,
        )?;
        f.gauge(
            "ferry_stream_slot_capacity",
            "Pool slots of the stream.",
            &streams
                .iter()
                .map(|(s, _)| (vec![("stream", s.name.as_str())], s.slot_count as i64))
                .collect::<Vec<_>>(),
        )?;
        let mut lat = Vec::new();
        for (s, c) in &streams {
            for (path, h) in [("local", &c.latency_local), ("remote", &c.latency_remote)] {
                if h.count > 0 || path == "local" {
                    lat.push((vec![("stream", s.name.as_str()), ("path", path)], h));
                }
            }
        }
        f.histogram(
            "ferry_stream_delivery_latency_seconds",
            "Publish to hand-off: onto a consumer's ring here (path local), or into a fabric write to a consumer's host (path remote). Sampled: one batch in 16.",
            &lat,
        )?;

        let (mut lag, mut glag, mut members, mut occ) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut part_names: Vec<String> = Vec::new();
        for (s, _) in &streams {
            for g in &s.groups {
                for p in &g.partitions {
                    part_names.push(p.partition.to_string());
                }
            }
        }
        let mut pi = 0;
        for (s, _) in &streams {
            for g in &s.groups {
                let base = vec![("stream", s.name.as_str()), ("group", g.name.as_str())];
                glag.push((base.clone(), g.lag as i64));
                members.push((base.clone(), g.members.len() as i64));
                occ.push((
                    base.clone(),
                    g.members
                        .iter()
                        .map(|m| m.ring_occupancy as i64)
                        .sum::<i64>(),
                ));
                for p in &g.partitions {
                    let mut l = base.clone();
                    l.push(("partition", part_names[pi].as_str()));
                    pi += 1;
                    lag.push((l, p.lag as i64));
                }
            }
        }
        f.gauge(
            "ferry_group_lag_batches",
            "Batches published and not yet committed by the group, per partition.",
            &lag,
        )?;
        f.gauge(
            "ferry_group_lag_total_batches",
            "Batches published and not yet committed by the group, all partitions.",
            &glag,
        )?;
        f.gauge(
            "ferry_group_members",
            "Consumers in the group (on this host and others).",
            &members,
        )?;
        f.gauge(
            "ferry_group_ring_occupancy_descriptors",
            "Descriptors waiting on the group's members' completion rings.",
            &occ,
        )?;

        let disk: Vec<_> = streams
            .iter()
            .filter_map(|(s, c)| s.disk.as_ref().map(|d| (s.name.as_str(), d, c)))
            .collect();
        f.gauge(
            "ferry_disk_log_bytes",
            "Bytes of the stream's log segments on disk.",
            &disk
                .iter()
                .map(|(n, d, _)| (vec![("stream", *n)], d.bytes as i64))
                .collect::<Vec<_>>(),
        )?;
        f.gauge(
            "ferry_disk_unsynced_batches",
            "Batches written to the log and not yet synced.",
            &disk
                .iter()
                .map(|(n, d, _)| (vec![("stream", *n)], d.unsynced as i64))
                .collect::<Vec<_>>(),
        )?;
        f.gauge(
            "ferry_disk_write_failing",
            "1 while writes to the stream's log fail (a full disk): its producers stall.",
            &disk
                .iter()
                .map(|(n, d, _)| (vec![("stream", *n)], d.error.is_some() as i64))
                .collect::<Vec<_>>(),
        )?;
        let mut rec = Vec::new();
        for (n, _, c) in &disk {
            rec.push((vec![("stream", *n), ("kind", "tail_cut")], c.recovery_cuts));
            rec.push((
                vec![("stream", *n), ("kind", "damaged_skipped")],
                c.recovery_damaged,
            ));
        }
        f.counter(
            "ferry_disk_recovery_events_total",
            "At start-up: torn or corrupt log tails cut (kind tail_cut), damaged records kept and skipped (kind damaged_skipped).",
            &rec,
        )?;
        if let Some(dir) = &snap.data_dir {
            if let Ok((free, total)) = ferry_shm::sys::fs_space(dir) {
                let shown = dir.display().to_string();
                f.gauge(
                    "ferry_disk_free_bytes",
                    "Bytes free (for unprivileged users) on the file system of daemon.data_dir.",
                    &[(vec![("path", shown.as_str())], free as i64)],
                )?;
                f.gauge(
                    "ferry_disk_capacity_bytes",
                    "Size of the file system of daemon.data_dir.",
                    &[(vec![("path", shown.as_str())], total as i64)],
                )?;
            }
        }
        if fsync.count > 0 || !disk.is_empty() {
            f.histogram(
                "ferry_disk_fsync_duration_seconds",
                "Duration of each sync of disk logs (on the disk thread).",
                &[(vec![], fsync)],
            )?;
        }

        if !st.gpus.is_empty() {
            let gpu_bytes: Vec<_> = streams
                .iter()
                .map(|(s, c)| {
                    let live: u64 = s.producers.iter().map(|p| p.gpu_bytes_copied).sum::<u64>()
                        + s.groups
                            .iter()
                            .flat_map(|g| &g.members)
                            .map(|m| m.gpu_bytes_copied)
                            .sum::<u64>();
                    (vec![("stream", s.name.as_str())], live + c.gpu_bytes_closed)
                })
                .collect();
            f.counter(
                "ferry_gpu_copy_bytes_total",
                "Bytes copied between GPU memory and pool slots for the stream.",
                &gpu_bytes,
            )?;
            f.gauge(
                "ferry_gpu_copies_in_flight",
                "GPU copies queued and not yet complete.",
                &streams
                    .iter()
                    .map(|(s, _)| {
                        let n: u32 = s
                            .producers
                            .iter()
                            .map(|p| p.gpu_copies_in_flight)
                            .sum::<u32>()
                            + s.groups
                                .iter()
                                .flat_map(|g| &g.members)
                                .map(|m| m.gpu_copies_in_flight)
                                .sum::<u32>();
                        (vec![("stream", s.name.as_str())], n as i64)
                    })
                    .collect::<Vec<_>>(),
            )?;
        }

        // Peers that left the cluster are gone from the metrics too.
        let peers: Vec<_> = st
            .peers
            .iter()
            .zip(&snap.links)
            .filter(|(p, _)| p.state != "left")
            .collect();
        if let Some(m) = &st.membership {
            f.gauge(
                "ferry_cluster_etcd_up",
                "1 while etcd answers this daemon (membership = \"etcd\"); while 0 it keeps its peers and serves on.",
                &[(vec![], m.etcd_up as i64)],
            )?;
            f.gauge(
                "ferry_cluster_members",
                "Daemons in the cluster as this one sees it (itself included).",
                &[(vec![], (peers.len() + 1) as i64)],
            )?;
        }
        let by_peer = |v: &dyn Fn(&ferry_admin::PeerStatus, &LinkCounters) -> u64| {
            peers
                .iter()
                .map(|(p, c)| (vec![("peer", p.node_id.as_str())], v(p, c)))
                .collect::<Vec<_>>()
        };
        f.gauge(
            "ferry_peer_up",
            "1 while the control connection to the peer is up.",
            &as_gauge(by_peer(&|p, _| (p.state == "up") as u64)),
        )?;
        f.gauge(
            "ferry_peer_rtt_seconds",
            "Round-trip time of the last heartbeat to the peer.",
            &peers
                .iter()
                .filter_map(|(p, _)| {
                    p.rtt_us
                        .map(|r| (vec![("peer", p.node_id.as_str())], r as f64 / 1e6))
                })
                .collect::<Vec<_>>(),
        )?;
        f.counter(
            "ferry_peer_control_bytes_total",
            "Bytes on the control connection to the peer, both ways.",
            &by_peer(&|p, _| p.bytes_in + p.bytes_out),
        )?;
        f.gauge(
            "ferry_peer_credits_outstanding",
            "Landing slots the peer's consumers credited here and this host has not yet written.",
            &as_gauge(by_peer(&|_, c| c.credits_outstanding)),
        )?;
        f.counter(
            "ferry_peer_credit_stalls_total",
            "Times a consumer on the peer ran out of credit while batches waited here.",
            &by_peer(&|_, c| c.credit_stalls),
        )?;
        f.counter(
            "ferry_fabric_write_bytes_total",
            "Bytes this host wrote to the peer over the fabric.",
            &by_peer(&|_, c| c.write_bytes),
        )?;
        let mut ops = Vec::new();
        for (p, c) in &peers {
            ops.push((
                vec![("peer", p.node_id.as_str()), ("op", "write")],
                c.writes,
            ));
            ops.push((
                vec![("peer", p.node_id.as_str()), ("op", "receive")],
                c.receives,
            ));
        }
        f.counter(
            "ferry_fabric_operations_total",
            "Fabric operations with the peer: writes posted, writes with immediate received.",
            &ops,
        )?;
        f.histogram(
            "ferry_fabric_write_latency_seconds",
            "Fabric writes of sampled batches (one in 16) to the peer, from post to completion: with a reliable connection, until they are in the peer's memory.",
            &peers
                .iter()
                .filter(|(_, c)| c.write_latency.count > 0)
                .map(|(p, c)| (vec![("peer", p.node_id.as_str())], &c.write_latency))
                .collect::<Vec<_>>(),
        )?;
        f.counter(
            "ferry_fabric_errors_total",
            "Fabric completions in error and failed posts with the peer.",
            &by_peer(&|_, c| c.errors),
        )?;
        Ok(())
    }
}

/// The snapshot in the Prometheus text format.
pub fn encode(snap: Snapshot) -> String {
    let fsync = FSYNC.snapshot();
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register_collector(Box::new(Collect(snap, fsync)));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests;
