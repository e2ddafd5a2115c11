//! Opening a producer or a consumer on a session, and seek.

use std::os::fd::AsRawFd;

use ferry_shm::proto::{self, ErrorCode, Response, SessionInfo, StreamSpec};

use crate::idhash::IdSet;
use crate::limited;
use crate::stream::SessionId;

use super::sessions::{Member, Rings};
use super::*;
use crate::error::Refusal;
use crate::sink::{GpuPool, HostRing, Sink};

impl Server {
    pub(super) fn open_producer(
        &mut self,
        id: SessionId,
        name: String,
        spec: Option<StreamSpec>,
        device: (Option<u32>, Option<String>),
    ) {
        if self.is_remote_stream(&name) {
            return self.open_remote_producer(id, name, spec, device);
        }
        let uid = self.sessions.get(&id).map_or(u32::MAX, |s| s.cred.uid);
        let res = (|| {
            self.check_open(id)?;
            let ordinal = self.gpus.resolve_device(&device)?;
            let idx = match (self.by_name.get(&name).copied(), spec) {
                (Some(idx), None) => {
                    self.may_use(idx, uid, true)
                        .map_err(|m| Refusal::new(ErrorCode::PermissionDenied, m))?;
                    idx
                }
                (Some(idx), Some(want)) => {
                    self.may_use(idx, uid, true)
                        .map_err(|m| Refusal::new(ErrorCode::PermissionDenied, m))?;
                    let e = &self.streams[idx];
                    let have = e.stream.spec();
                    if *have != want {
                        let whose = match e.owner {
                            None => "is declared in the config, which alone defines it,".to_string(),
                            Some(o) => format!(
                                "was created by uid {o} (only that uid or root may delete it: `ferry stream delete {name}`), and exists"
                            ),
                        };
                        return Err(Refusal::new(
                            ErrorCode::StreamMismatch,
                            format!(
                                "stream {name} {whose} with {}, not {}",
                                have.describe(),
                                want.describe()
                            ),
                        ));
                    }
                    idx
                }
                (None, Some(want)) => self.create_stream(&name, want, Some(uid))?,
                (None, None) => {
                    return Err(Refusal::new(
                        ErrorCode::UnknownStream,
                        format!("no stream named {name:?} (declare it in the config, or open the producer with a stream config to create it)"),
                    ))
                }
            };
            let gpu = match ordinal {
                None => None,
                Some(n) => {
                    let entry = &self.streams[idx];
                    Some(self.gpus.publisher(
                        n,
                        idx,
                        &entry.pool,
                        entry.stream.spec().slot_size,
                        entry.stream.spec().slot_count,
                    )?)
                }
            };
            let (rings, region) = self.new_rings(id)?;
            Ok((idx, rings, region, gpu))
        })();
        let (idx, rings, region, gpu) = match res {
            Ok(v) => v,
            Err(r) => return self.refuse(id, r),
        };
        if gpu.is_some() {
            self.gpu_sessions += 1;
        }
        let entry = &mut self.streams[idx];
        let spec = entry.stream.spec().clone();
        let credits = (spec.slot_count / 4)
            .clamp(1, 64)
            .min(self.cfg.daemon.ring_capacity);
        entry.producers.push(id);
        entry.dirty = true;
        let info = SessionInfo {
            session: id,
            stream_id: idx as u32,
            partitions: spec.partitions,
            slot_size: spec.slot_size,
            slot_count: spec.slot_count,
            ring_capacity: self.cfg.daemon.ring_capacity,
            credits,
            gpu: gpu.as_ref().map(|g| g.info.clone()),
            acks: entry.stream.tiered(),
        };
        entry.idle_since = None;
        let fds = [region.fd(), entry.pool.fd()];
        if let Some(s) = self.sessions.get_mut(&id) {
            limited!(
                INFO,
                session = id,
                pid = s.cred.pid,
                stream = %name,
                device = gpu.as_ref().map(|g| format!("cuda:{}", g.info.ordinal)).unwrap_or_else(|| "host".into()),
                "producer opened"
            );
            s.role = Role::Producer(ProducerState {
                stream: idx,
                rings,
                granted: IdSet::default(),
                credits,
                published: 0,
                ended: false,
                ends_taken: 0,
                ends_untold: false,
                starved_since: None,
                starved_logged: false,
                gpu,
                acks: Default::default(),
            });
        }
        self.reply(id, &Response::Opened(info), &fds);
    }

    pub(super) fn open_consumer(
        &mut self,
        id: SessionId,
        name: String,
        group: String,
        prefetch: u32,
        device: (Option<u32>, Option<String>),
        start: proto::GroupStart,
    ) {
        let cap = self.cfg.daemon.ring_capacity;
        let prefetch = if prefetch == 0 {
            8.min(cap)
        } else {
            prefetch.min(cap)
        };
        if self.is_remote_stream(&name) {
            return self.open_remote_consumer(id, name, group, prefetch, device, start);
        }
        let uid = self.sessions.get(&id).map_or(u32::MAX, |s| s.cred.uid);
        let res = (|| {
            self.check_open(id)?;
            let ordinal = self.gpus.resolve_device(&device)?;
            if !proto::valid_name(&group) {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    format!("group name {group:?} must be 1-128 characters of A-Z a-z 0-9 . _ -"),
                ));
            }
            let idx = self.by_name.get(&name).copied().ok_or_else(|| {
                Refusal::new(
                    ErrorCode::UnknownStream,
                    format!("no stream named {name:?} (a producer creates it, or declare it in the config)"),
                )
            })?;
            self.may_use_group(idx, &group, uid, "join")
                .map_err(|m| Refusal::new(ErrorCode::PermissionDenied, m))?;
            let s = &self.streams[idx].stream;
            let max = self.cfg.daemon.max_groups_per_stream;
            if s.group_index(&group).is_none() && s.live_groups() >= max as usize {
                return Err(Refusal::new(
                    ErrorCode::Limit,
                    format!("stream {name} has {} consumer groups, daemon.max_groups_per_stream = {max} (`ferry group delete` removes an unused one)", s.live_groups()),
                ));
            }
            let gpu = match ordinal {
                None => None,
                Some(n) => {
                    let entry = &self.streams[idx];
                    Some(self.gpus.delivery(
                        n,
                        idx,
                        &entry.pool,
                        entry.stream.spec().slot_size,
                        prefetch,
                    )?)
                }
            };
            let (rings, region) = self.new_rings(id)?;
            Ok((idx, rings, region, gpu))
        })();
        let (idx, rings, region, gpu) = match res {
            Ok(v) => v,
            Err(r) => return self.refuse(id, r),
        };
        let entry = &mut self.streams[idx];
        let g = match entry.stream.join(&group, id, uid, &start) {
            Ok(g) => g,
            Err(e) => {
                let code = match e {
                    crate::stream::SeekError::Gone { .. } => ErrorCode::OffsetGone,
                    _ => ErrorCode::InvalidArgument,
                };
                return self.refuse(
                    id,
                    Refusal::new(code, format!("start of new group {group}: {e}")),
                );
            }
        };
        let epoch_seen = entry.stream.groups()[g].epoch;
        entry.dirty = true;
        let spec = entry.stream.spec().clone();
        let info = SessionInfo {
            session: id,
            stream_id: idx as u32,
            partitions: spec.partitions,
            slot_size: spec.slot_size,
            slot_count: spec.slot_count,
            ring_capacity: cap,
            credits: prefetch,
            gpu: gpu.as_ref().map(|g| g.info.clone()),
            acks: false,
        };
        entry.idle_since = None;
        // Consumers read the pool and nothing more: a read-only file
        // description cannot be mapped writable or punched.
        let fds = [region.fd(), entry.pool_ro.as_raw_fd()];
        let device_name = gpu.as_ref().map(|g| format!("cuda:{}", g.info.ordinal));
        let Rings { _region, sub, comp } = rings;
        let sink: Box<dyn Sink> = match gpu {
            Some(g) => {
                self.gpu_sessions += 1;
                Box::new(GpuPool::new(comp, g))
            }
            None => Box::new(HostRing::new(comp)),
        };
        if let Some(s) = self.sessions.get_mut(&id) {
            limited!(
                INFO,
                session = id,
                pid = s.cred.pid,
                stream = %name,
                group = %group,
                device = device_name.as_deref().unwrap_or("host"),
                "consumer joined"
            );
            s.role = Role::Consumer(ConsumerState {
                m: Member {
                    stream: idx,
                    group: g,
                    prefetch,
                    inflight: 0,
                    delivered: 0,
                    epoch_seen,
                    sink,
                },
                _region,
                sub,
            });
        }
        self.reply(id, &Response::Opened(info), &fds);
    }

    pub(super) fn seek(&mut self, id: SessionId, partition: u32, offset: u64) {
        // Releases already queued come first.
        self.drain_session(id);
        let Some(Role::Consumer(c)) = self.sessions.get(&id).map(|s| &s.role) else {
            return self.refuse(
                id,
                Refusal::invalid("seek on a connection that is not a consumer"),
            );
        };
        let (idx, g) = (c.m.stream, c.m.group);
        let entry = &mut self.streams[idx];
        match entry.stream.seek(g, partition, offset) {
            Ok(()) => {
                entry.dirty = true;
                self.reply(id, &Response::Done, &[]);
            }
            Err(e) => self.refuse(id, Refusal::new(ErrorCode::OffsetGone, e.to_string())),
        }
    }
}
