//! The daemon's streams: creation within the limits and quotas, who may
//! use them, deletion and idle expiry.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_shm::layout::PoolLayout;
use ferry_shm::proto::{ErrorCode, StreamSpec};
use ferry_shm::Region;

use crate::config::check_stream_spec;
use crate::limited;
use crate::stream::{SessionId, Stream};

use super::*;
use crate::error::Refusal;
use ferry_admin::{Response, UidUsage};

pub(super) struct StreamEntry {
    pub(super) stream: Stream,
    pub(super) pool: Arc<Region>,
    /// A read-only open file description of the pool, for consumers.
    pub(super) pool_ro: OwnedFd,
    pub(super) layout: PoolLayout,
    /// The pool registered with the fabric, once a member on another host
    /// joined.
    pub(super) registered: Option<Arc<crate::fabric::Registered>>,
    pub(super) producers: Vec<SessionId>,
    /// The uid of the producer that created it; None: declared in the
    /// config.
    pub(super) owner: Option<u32>,
    /// Since when no session uses it (idle expiry of created streams).
    pub(super) idle_since: Option<Instant>,
    /// A declared stream's `producers` and `consumers` lists.
    pub(super) acl: (Option<Vec<u32>>, Option<Vec<u32>>),
    /// A declared stream's own group_idle_timeout_ms.
    pub(super) group_idle_timeout_ms: Option<u64>,
    /// Groups deleted for having no member too long.
    pub(super) groups_expired: u64,
    /// A producer ended the current epoch and left before the others
    /// ended it: its end still counts.
    pub(super) end_pending: bool,
    /// Some member of some group was not told yet of an epoch its group
    /// finished (the pump looks at the members only then).
    pub(super) ends_untold: bool,
    /// Some producer was not told yet that its end of epoch was taken
    /// (its completion ring was full; the pump tries again only then).
    pub(super) producer_ends_untold: bool,
    pub(super) dirty: bool,
    /// A disk stream's logs.
    pub(super) log: Option<Box<super::durable::DiskLog>>,
    /// What `/metrics` shows beyond the status.
    pub(super) counters: crate::metrics::StreamCounters,
}

impl StreamEntry {
    pub(super) fn in_use(&self) -> bool {
        !self.producers.is_empty() || self.stream.groups().iter().any(|g| !g.members.is_empty())
    }
}

/// The streams by index; a deleted stream's index is reused once no
/// session refers to it (all of them were closed with it).
#[derive(Default)]
pub(super) struct Streams {
    pub(super) slots: Vec<Option<StreamEntry>>,
}

impl Streams {
    pub(super) fn iter(&self) -> impl Iterator<Item = &StreamEntry> {
        self.slots.iter().flatten()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut StreamEntry)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, e)| e.as_mut().map(|e| (i, e)))
    }

    pub(super) fn len(&self) -> usize {
        self.iter().count()
    }

    pub(super) fn free_index(&self) -> usize {
        self.slots
            .iter()
            .position(|e| e.is_none())
            .unwrap_or(self.slots.len())
    }

    pub(super) fn insert(&mut self, idx: usize, e: StreamEntry) {
        if idx == self.slots.len() {
            self.slots.push(Some(e));
        } else {
            self.slots[idx] = Some(e);
        }
    }

    pub(super) fn remove(&mut self, idx: usize) -> Option<StreamEntry> {
        self.slots.get_mut(idx).and_then(Option::take)
    }
}

impl std::ops::Index<usize> for Streams {
    type Output = StreamEntry;
    fn index(&self, i: usize) -> &StreamEntry {
        self.slots[i]
            .as_ref()
            .expect("sessions refer to live streams")
    }
}

impl std::ops::IndexMut<usize> for Streams {
    fn index_mut(&mut self, i: usize) -> &mut StreamEntry {
        self.slots[i]
            .as_mut()
            .expect("sessions refer to live streams")
    }
}

/// Counts stream `e` into `u`.
fn add_usage(u: &mut UidUsage, e: &StreamEntry) {
    u.streams += 1;
    u.partitions += e.stream.spec().partitions;
    u.slots += e.stream.spec().slot_count as u64;
    u.pool_bytes += e.layout.total;
}

impl Server {
    /// Creates a stream: declared in the config (`owner` None) or by a
    /// producer of uid `owner`, within the daemon's and that uid's limits.
    pub(super) fn create_stream(
        &mut self,
        name: &str,
        spec: StreamSpec,
        owner: Option<u32>,
    ) -> Result<usize, Refusal> {
        check_stream_spec(name, &spec, u64::MAX)
            .map_err(|m| Refusal::new(ErrorCode::InvalidArgument, m))?;
        let layout = PoolLayout::new(spec.slot_size, spec.slot_count).ok_or(Refusal::new(
            ErrorCode::InvalidArgument,
            "pool size overflows".to_string(),
        ))?;
        let max = self.cfg.daemon.max_pool_bytes;
        if layout.total > max {
            return Err(Refusal::new(
                ErrorCode::Limit,
                format!(
                    "stream {name}: a pool of {} bytes ({} slots of {} bytes, each rounded up to 4 KiB, or to 64 B under 4 KiB, and 256 bytes of metadata per slot) is over daemon.max_pool_bytes = {max}",
                    layout.total, spec.slot_count, spec.slot_size
                ),
            ));
        }
        if let Some(uid) = owner {
            self.check_quota(uid, &spec, layout.total)
                .map_err(|m| Refusal::new(ErrorCode::Limit, m))?;
        }
        let pool = Region::create(&format!("ferry-pool-{name}"), layout.total).map_err(|e| {
            Refusal::new(
                ErrorCode::Limit,
                format!("creating the data pool of stream {name}: {e}"),
            )
        })?;
        let pool_ro = pool.open_readonly().map_err(|e| {
            Refusal::new(
                ErrorCode::Limit,
                format!("opening the data pool of stream {name} read-only: {e}"),
            )
        })?;
        let idx = self.streams.free_index();
        crate::limited!(
            INFO,
            stream = name,
            partitions = spec.partitions,
            slot_size = spec.slot_size,
            slot_count = spec.slot_count,
            owner = owner.map_or_else(|| "config".to_string(), |u| format!("uid {u}")),
            "stream created"
        );
        let mut stream = Stream::new(idx as u32, name.to_string(), spec.clone());
        if let Some(w) = self.cfg.daemon.replay_window {
            stream.set_replay_window(w);
        }
        let log = if spec.durability.disk {
            let (log, line) =
                super::durable::open_disk(&self.cfg.daemon, name, &spec, owner, &mut stream)
                    .map_err(|m| Refusal::new(ErrorCode::Internal, m))?;
            crate::limited!(INFO, stream = name, dir = %log.dir().display(), "disk stream opened: {line}");
            Some(Box::new(log))
        } else {
            None
        };
        self.streams.insert(
            idx,
            StreamEntry {
                stream,
                pool: Arc::new(pool),
                pool_ro,
                layout,
                producers: Vec::new(),
                owner,
                idle_since: None,
                acl: (None, None),
                group_idle_timeout_ms: None,
                groups_expired: 0,
                end_pending: false,
                ends_untold: false,
                producer_ends_untold: false,
                dirty: true,
                registered: None,
                log,
                counters: Default::default(),
            },
        );
        self.by_name.insert(name.to_string(), idx);
        self.announce_streams();
        Ok(idx)
    }

    /// Whether `uid` may produce into (or consume) stream `idx`: a
    /// created stream its owner only (every allowed user with
    /// `stream_access = "shared"`): root too, so that root never silently
    /// feeds or reads a stream another user set up under the name root
    /// expected; a declared stream root and those its `producers` /
    /// `consumers` list names (everyone without a list).
    pub(super) fn may_use(&self, idx: usize, uid: u32, produce: bool) -> Result<(), String> {
        let e = &self.streams[idx];
        let verb = if produce { "produce into" } else { "consume" };
        let name = &e.stream.name();
        match e.owner {
            Some(o) if o == uid || self.cfg.daemon.stream_access == "shared" => Ok(()),
            Some(o) => Err(format!(
                "uid {uid} may not {verb} stream {name}: uid {o} created it, and daemon.stream_access = \"owner\" keeps a created stream to its owner{} (declare the stream in the config with producers/consumers lists to share it)",
                if uid == 0 {
                    "; as root you may delete it: `ferry stream delete` (it may have been made to catch your data)"
                } else {
                    ""
                }
            )),
            None if uid == 0 => Ok(()),
            None => {
                let list = if produce { &e.acl.0 } else { &e.acl.1 };
                match list {
                    Some(l) if !l.contains(&uid) => Err(format!(
                        "uid {uid} may not {verb} stream {name}: it is not in the stream's {} list in the config",
                        if produce { "producers" } else { "consumers" }
                    )),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Whether `uid` may `verb` (join, delete) group `group` of stream
    /// `idx`: it must be allowed to consume the stream, and an existing
    /// group belongs to the uid that created it (and root).
    pub(super) fn may_use_group(
        &self,
        idx: usize,
        group: &str,
        uid: u32,
        verb: &str,
    ) -> Result<(), String> {
        self.may_use(idx, uid, false)?;
        let s = &self.streams[idx].stream;
        match s.group_index(group).map(|g| s.groups()[g].owner) {
            Some(owner) if uid != owner && uid != 0 => Err(format!(
                "uid {uid} may not {verb} group {group} of stream {}: uid {owner} created it (only its creator and root may; pick another group name)",
                s.name()
            )),
            _ => Ok(()),
        }
    }

    /// What all streams, and those of each uid, take.
    pub(super) fn usage(&self) -> (UidUsage, BTreeMap<u32, UidUsage>) {
        let mut total = UidUsage::default();
        let mut per_uid: BTreeMap<u32, UidUsage> = BTreeMap::new();
        for e in self.streams.iter() {
            add_usage(&mut total, e);
            if let Some(uid) = e.owner {
                let u = per_uid.entry(uid).or_default();
                u.uid = uid;
                add_usage(u, e);
            }
        }
        (total, per_uid)
    }

    /// Refuses a new stream of `uid` that would pass a limit, naming it.
    pub(super) fn check_quota(
        &self,
        uid: u32,
        spec: &StreamSpec,
        bytes: u64,
    ) -> Result<(), String> {
        let d = &self.cfg.daemon;
        let (total, per_uid) = self.usage();
        let mine = per_uid.get(&uid).cloned().unwrap_or_default();
        let checks = [
            (
                "max_streams",
                "streams",
                total.streams as u64 + 1,
                d.max_streams as u64,
                false,
            ),
            (
                "max_streams_per_uid",
                "streams",
                mine.streams as u64 + 1,
                d.max_streams_per_uid as u64,
                true,
            ),
            (
                "max_total_partitions",
                "partitions",
                (total.partitions + spec.partitions) as u64,
                d.max_total_partitions,
                false,
            ),
            (
                "max_partitions_per_uid",
                "partitions",
                (mine.partitions + spec.partitions) as u64,
                d.max_partitions_per_uid,
                true,
            ),
            (
                "max_total_slots",
                "slots",
                total.slots + spec.slot_count as u64,
                d.max_total_slots,
                false,
            ),
            (
                "max_slots_per_uid",
                "slots",
                mine.slots + spec.slot_count as u64,
                d.max_slots_per_uid,
                true,
            ),
            (
                "max_total_pool_bytes",
                "pool bytes",
                total.pool_bytes + bytes,
                self.cfg.max_total_pool_bytes(),
                false,
            ),
            (
                "max_pool_bytes_per_uid",
                "pool bytes",
                mine.pool_bytes + bytes,
                self.cfg.max_pool_bytes_per_uid(),
                true,
            ),
        ];
        for (key, what, need, limit, per) in checks {
            if need > limit {
                let whose = if per {
                    format!("uid {uid}'s streams")
                } else {
                    "all streams together".to_string()
                };
                return Err(format!(
                    "creating this stream would take {whose} to {need} {what}, over daemon.{key} = {limit} (see `ferry status` for what is used; `ferry stream delete` frees a stream)"
                ));
            }
        }
        Ok(())
    }

    /// Deletes stream `name` for admin client `uid`: only its owner or
    /// root, never a declared one; refused while sessions use it unless
    /// `force`, which closes them.
    pub(super) fn delete_stream(&mut self, name: &str, force: bool, uid: u32) -> Response {
        let err = Response::Error;
        let Some(&idx) = self.by_name.get(name) else {
            return err(format!("no stream named {name:?}"));
        };
        let e = &self.streams[idx];
        let Some(owner) = e.owner else {
            return err(format!(
                "stream {name} is declared in the config; remove it there and restart ferryd"
            ));
        };
        if uid != 0 && uid != owner {
            return err(format!(
                "uid {uid} may not delete stream {name}: it was created by uid {owner} (only its owner or root may)"
            ));
        }
        let users: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| match &s.role {
                Role::Producer(p) => p.stream == idx,
                Role::Consumer(c) => c.m.stream == idx,
                _ => false,
            })
            .map(|s| s.id)
            .collect();
        if !users.is_empty() && !force {
            return err(format!(
                "stream {name} is in use by {} session(s); stop them first, or delete with --force to close them",
                users.len()
            ));
        }
        for id in &users {
            self.fail_session(*id, &format!("stream {name} deleted by uid {uid}"));
        }
        let dir = self.streams[idx]
            .log
            .as_ref()
            .map(|l| l.dir().to_path_buf());
        let (held, bytes) = self.remove_stream(idx);
        if let Some(dir) = dir {
            // Deleting a disk stream deletes its log: renamed out of the
            // way at once (a new stream of that name starts afresh), its
            // files deleted on the disk thread (freeing their page cache
            // takes a while). Disk streams' names never start with '.'.
            let gone = dir.with_file_name(format!(".deleted-{name}-{}", crate::log::now_ms()));
            match std::fs::rename(&dir, &gone) {
                Ok(()) => {
                    let _ = self
                        .syncer
                        .send(super::durable::SyncJob::Remove(vec![gone]));
                }
                Err(e) => {
                    tracing::warn!(stream = name, dir = %dir.display(), "removing the deleted stream's log: {e}")
                }
            }
        }
        limited!(
            INFO,
            stream = name,
            uid,
            held,
            closed = users.len(),
            "stream deleted"
        );
        Response::Ok(format!("deleted stream {name} ({held} batches it held, {bytes} pool bytes freed, {} sessions closed)", users.len()))
    }

    /// Frees a stream no session refers to any more. Returns (batches
    /// it held, pool bytes).
    pub(super) fn remove_stream(&mut self, idx: usize) -> (u32, u64) {
        self.gpus.forget_stream(idx);
        // Members on other hosts are told, and go.
        for id in super::ids_where(&self.remotes, |r| r.m.stream == idx) {
            self.remote_evict(id, "the stream was deleted at its home");
        }
        for id in super::ids_where(&self.remote_producers, |p| p.stream == idx) {
            self.remote_producer_evict(
                id,
                ferry_shm::proto::ErrorCode::UnknownStream,
                "the stream was deleted at its home",
            );
        }
        let Some(e) = self.streams.remove(idx) else {
            return (0, 0);
        };
        self.by_name.remove(e.stream.name());
        self.announce_streams();
        (e.stream.slot_counts().2, e.layout.total)
    }

    /// Deletes consumer groups that have had no member for
    /// `group_idle_timeout_ms`.
    pub(super) fn expire_groups(&mut self) {
        for (_, e) in self.streams.iter_mut() {
            // A disk stream's groups (their committed offsets) stay unless
            // the stream sets its own timeout: an idle group there holds up
            // no producer (the pool is a cache).
            let fallback = if e.log.is_some() {
                0
            } else {
                self.cfg.daemon.group_idle_timeout_ms
            };
            let group_timeout = e.group_idle_timeout_ms.unwrap_or(fallback);
            if group_timeout == 0 {
                continue;
            }
            let t = Duration::from_millis(group_timeout);
            for g in e.stream.idle_groups(t) {
                if let Ok(held) = e.stream.delete_group(&g) {
                    e.dirty = true;
                    e.groups_expired += 1;
                    crate::limited!(
                        INFO,
                        stream = %e.stream.name(),
                        group = %g,
                        held,
                        "consumer group deleted: no member for group_idle_timeout_ms = {group_timeout}"
                    );
                }
            }
        }
    }

    /// Deletes streams created by producers that no session has used for
    /// `stream_idle_timeout_ms`.
    pub(super) fn expire_streams(&mut self) {
        let timeout = self.cfg.daemon.stream_idle_timeout_ms;
        let now = Instant::now();
        let mut expired = Vec::new();
        for (idx, e) in self.streams.iter_mut() {
            // A disk stream is kept: its log is the point of it.
            if e.owner.is_none() || e.in_use() || e.log.is_some() {
                e.idle_since = None;
                continue;
            }
            let since = *e.idle_since.get_or_insert(now);
            if timeout > 0 && now.duration_since(since) >= Duration::from_millis(timeout) {
                expired.push(idx);
            }
        }
        for idx in expired {
            let name = self.streams[idx].stream.name().to_string();
            let (held, bytes) = self.remove_stream(idx);
            crate::limited!(
                INFO,
                stream = %name,
                held,
                pool_bytes = bytes,
                "stream deleted: no session used it for stream_idle_timeout_ms = {timeout}"
            );
        }
    }

    pub(super) fn delete_group(&mut self, stream: &str, group: &str, uid: u32) -> Response {
        let Some(&idx) = self.by_name.get(stream) else {
            return Response::Error(format!("no stream named {stream:?}"));
        };
        if let Err(e) = self.may_use_group(idx, group, uid, "delete") {
            return Response::Error(e);
        }
        let entry = &mut self.streams[idx];
        match entry.stream.delete_group(group) {
            Ok(held) => {
                entry.dirty = true;
                limited!(INFO, stream, group, held, "consumer group deleted");
                Response::Ok(format!(
                    "deleted group {group} of stream {stream} ({held} batches it held)"
                ))
            }
            Err(e) => Response::Error(e),
        }
    }
}
