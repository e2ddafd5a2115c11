//! The status snapshot the admin socket answers with.

use ferry_admin::{
    GpuStatus, GroupPartStatus, GroupStatus, MemberStatus, MemoryStatus, ProducerStatus, Status,
    StreamStatus,
};

use super::sessions::Role;
use super::Server;

/// A GPU as the status shows it.
fn gpu_status(g: &ferry_cuda::GpuInfo) -> GpuStatus {
    GpuStatus {
        ordinal: g.ordinal,
        name: g.name.clone(),
        pci_bus_id: g.pci_bus_id.clone(),
        total_memory: g.total_memory,
        dma_buf: g.dma_buf,
        gpudirect_rdma: g.gpudirect_rdma,
    }
}

impl Server {
    /// This daemon as `ferry status --cluster` shows it (to peers too).
    pub(super) fn node_summary(&self) -> ferry_admin::NodeSummary {
        ferry_admin::NodeSummary {
            node: self
                .cluster
                .as_ref()
                .map_or_else(String::new, |c| c.node.clone()),
            uptime_s: self.started.elapsed().as_secs(),
            sessions: self.sessions.len() as u32,
            draining: self.draining.is_some(),
            peers_up: self
                .cluster
                .as_ref()
                .map_or(0, |c| c.table.values().filter(|v| v.is_up()).count() as u32),
            streams: self
                .streams
                .iter()
                .map(|e| {
                    let s = &e.stream;
                    let ends = s.end_offsets();
                    ferry_admin::StreamSummary {
                        name: s.name().to_string(),
                        partitions: s.spec().partitions,
                        published: s.published(),
                        published_bytes: s.published_bytes(),
                        delivered: e.counters.delivered,
                        slots_held: s.slot_counts().2,
                        slot_count: s.spec().slot_count,
                        disk: e.log.is_some(),
                        groups: s
                            .groups()
                            .iter()
                            .filter(|g| !g.deleted)
                            .map(|g| {
                                let mut remote: Vec<String> = g
                                    .members
                                    .iter()
                                    .filter_map(|id| self.remotes.get(id).map(|r| r.node.clone()))
                                    .collect();
                                remote.sort();
                                remote.dedup();
                                ferry_admin::GroupSummary {
                                    name: g.name.clone(),
                                    members: g.members.len() as u32,
                                    remote_members: remote,
                                    lag: g
                                        .parts
                                        .iter()
                                        .enumerate()
                                        .map(|(p, gp)| ends[p].saturating_sub(gp.committed))
                                        .sum(),
                                }
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    /// A status snapshot: every stream with at most ferry_admin::MAX_STATUS_ROWS
    /// partition rows in all, or stream `only` in full.
    pub(super) fn status_view(&self, only: Option<&str>) -> Status {
        let mut rows_left = if only.is_some() {
            usize::MAX
        } else {
            ferry_admin::MAX_STATUS_ROWS
        };
        let streams = self
            .streams
            .iter()
            .filter(|e| only.is_none_or(|n| n == e.stream.name()))
            .map(|e| {
                let s = &e.stream;
                let (free, granted, held) = s.slot_counts();
                let ends = s.end_offsets();
                StreamStatus {
                    name: s.name().to_string(),
                    declared: e.owner.is_none(),
                    owner_uid: e.owner,
                    pool_bytes: e.layout.total,
                    partitions: s.spec().partitions,
                    slot_size: s.spec().slot_size,
                    slot_count: s.spec().slot_count,
                    slots_free: free,
                    slots_granted: granted,
                    slots_held: held,
                    published: s.published(),
                    published_bytes: s.published_bytes(),
                    delivered: e.counters.delivered,
                    delivered_bytes: e.counters.delivered_bytes,
                    end_offsets: ends.clone(),
                    slots_held_for_first_group: s.orphans(),
                    groups_expired: e.groups_expired,
                    disk: e.log.as_ref().map(|l| ferry_admin::DiskStatus {
                        dir: l.dir().display().to_string(),
                        bytes: l.bytes(),
                        start_offsets: (0..e.stream.spec().partitions as usize)
                            .map(|p| e.stream.floor(p))
                            .collect(),
                        unsynced: l.unsynced(),
                        error: l.error.clone(),
                        settings: e.stream.spec().durability.describe(),
                    }),
                    producers: e
                        .producers
                        .iter()
                        .filter_map(|id| {
                            let Some(sess) = self.sessions.get(id) else {
                                let r = self.remote_producers.get(id)?;
                                return Some(ProducerStatus {
                                    session: *id,
                                    pid: 0,
                                    host: Some(r.node.clone()),
                                    granted: r.granted.len() as u32,
                                    published: r.published,
                                    waiting_for_slot_ms: None,
                                    device: None,
                                    gpu_copies_in_flight: 0,
                                    gpu_bytes_copied: 0,
                                });
                            };
                            let Role::Producer(p) = &sess.role else {
                                return None;
                            };
                            Some(ProducerStatus {
                                session: *id,
                                pid: sess.cred.pid,
                                host: None,
                                granted: p.granted.len() as u32,
                                published: p.published,
                                waiting_for_slot_ms: p
                                    .starved_since
                                    .filter(|_| !s.has_free_slot())
                                    .map(|t| t.elapsed().as_millis() as u64),
                                device: p.gpu.as_ref().map(|g| format!("cuda:{}", g.info.ordinal)),
                                gpu_copies_in_flight: p
                                    .gpu
                                    .as_ref()
                                    .map_or(0, |g| g.pending() as u32),
                                gpu_bytes_copied: p.gpu.as_ref().map_or(0, |g| g.copied_bytes),
                            })
                        })
                        .collect(),
                    groups: s
                        .groups()
                        .iter()
                        .enumerate()
                        .filter(|(_, g)| !g.deleted)
                        .map(|(gi, g)| {
                            let shown = g.parts.len().min(rows_left);
                            rows_left -= shown;
                            let lag = g
                                .parts
                                .iter()
                                .enumerate()
                                .map(|(p, gp)| ends[p].saturating_sub(gp.committed))
                                .sum();
                            let parts: Vec<GroupPartStatus> = g
                                .parts
                                .iter()
                                .enumerate()
                                .take(shown)
                                .map(|(p, gp)| GroupPartStatus {
                                    partition: p as u32,
                                    owner: g.assign[p],
                                    next: gp.position(),
                                    committed: gp.committed,
                                    end: ends[p],
                                    lag: ends[p].saturating_sub(gp.committed),
                                    inflight: gp.inflight.len() as u32,
                                    redeliver: gp.pending.len() as u32,
                                })
                                .collect();
                            GroupStatus {
                                name: g.name.clone(),
                                lag,
                                slots_held: s.held_by(gi),
                                epochs: g.epoch,
                                owner_uid: g.owner,
                                partitions_omitted: (g.parts.len() - shown) as u32,
                                members: g
                                    .members
                                    .iter()
                                    .filter_map(|id| {
                                        let (m, pid, host) = match self.sessions.get(id) {
                                            Some(sess) => match &sess.role {
                                                Role::Consumer(c) => (&c.m, sess.cred.pid, None),
                                                _ => return None,
                                            },
                                            None => {
                                                let r = self.remotes.get(id)?;
                                                (&r.m, 0, Some(r.node.clone()))
                                            }
                                        };
                                        let sink = m.sink.status();
                                        Some(MemberStatus {
                                            session: *id,
                                            pid,
                                            host,
                                            landing_credits: sink.credits,
                                            partitions: g.partitions_of(*id),
                                            prefetch: m.prefetch,
                                            inflight: m.inflight,
                                            delivered: m.delivered,
                                            ring_occupancy: sink.ring_occupancy,
                                            device: sink.device,
                                            gpu_copies_in_flight: sink.copies_in_flight,
                                            gpu_bytes_copied: sink.bytes_copied,
                                            gpu_bytes_from_gpu: sink.bytes_from_gpu,
                                        })
                                    })
                                    .collect(),
                                partitions: parts,
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        Status {
            daemon: format!("ferryd {}", env!("CARGO_PKG_VERSION")),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            socket: self.socket_path.display().to_string(),
            draining: self.draining.is_some(),
            fabric: self.fabric.clone(),
            placement: self.placement.clone(),
            gpus: match &self.gpus.probe {
                Ok(p) => p.gpus.iter().map(gpu_status).collect(),
                Err(_) => Vec::new(),
            },
            gpu_note: match &self.gpus.probe {
                Ok(p) => format!("CUDA driver {}", p.driver_version),
                Err(e) => e.to_string(),
            },
            sessions: self.sessions.len(),
            node_id: self.cluster.as_ref().map(|c| c.node.clone()),
            cluster_listen: self.cluster.as_ref().map(|c| c.peers.listen.to_string()),
            peers: self.cluster.as_ref().map_or_else(Vec::new, |c| c.status()),
            peer_connections_refused: self.cluster.as_ref().map_or(0, |c| c.refused),
            cluster: Vec::new(),
            cluster_missing: Vec::new(),
            membership: self
                .cluster
                .as_ref()
                .and_then(|c| c.etcd.as_ref())
                .map(|e| ferry_admin::MembershipStatus {
                    endpoints: e.endpoints.clone(),
                    prefix: e.prefix.clone(),
                    etcd_up: e.up,
                    state_ms: e.since.elapsed().as_millis() as u64,
                    last_error: e.last_error.clone(),
                }),
            remote_consumers: self
                .sessions
                .iter()
                .filter_map(|(id, sess)| match &sess.role {
                    Role::Remote(p) => Some(p.status(*id, sess.cred.pid)),
                    _ => None,
                })
                .filter(|c| only.is_none_or(|n| n == c.stream))
                .collect(),
            remote_producers: self
                .sessions
                .iter()
                .filter_map(|(id, sess)| match &sess.role {
                    Role::Outbox(o) => Some(o.status(*id, sess.cred.pid)),
                    _ => None,
                })
                .filter(|p| only.is_none_or(|n| n == p.stream))
                .collect(),
            memory: {
                let (total, per_uid) = self.usage();
                MemoryStatus {
                    pool_bytes: total.pool_bytes,
                    max_total_pool_bytes: self.cfg.max_total_pool_bytes(),
                    max_pool_bytes_per_uid: self.cfg.max_pool_bytes_per_uid(),
                    streams: total.streams,
                    max_streams: self.cfg.daemon.max_streams,
                    per_uid: per_uid.into_values().collect(),
                }
            },
            streams,
        }
    }
}
