//! Disk streams: writing their logs as batches are published, syncing
//! them (on a thread of their own), acknowledging publishes once they are
//! as durable as the stream promises, reading back what groups need and is
//! no longer in a slot, retention, and the groups' committed offsets.
//!
//! The data-plane loop writes each record with one `pwritev` from the
//! pool slot into the active segment (the page cache); fdatasync runs on
//! the syncer thread, which answers through the inbox. A batch of a disk
//! stream becomes visible to consumers, and its publish acknowledged,
//! when it is durable: written (`fsync = "never"`) or synced (`"every"`,
//! `"interval"`).

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_shm::proto::{Durability, Fsync, StreamSpec};

use crate::log::{self, LogOptions, PartitionLog, Payload, StoredGroup, StoredStream};
use crate::stream::{Entry, Stream, ENTRY_LOST, ENTRY_RECORD};

use super::*;

/// The session id of the daemon itself, holding a slot it reads a batch
/// back into.
const DAEMON: SessionId = SessionId::MAX;
/// Batches read back at once after the one a group asked for.
const READAHEAD: u64 = 16;
/// The most bytes of a partition's log asked of the kernel ahead of a
/// replay (`PartitionLog::read_ahead`).
const READ_AHEAD_MAX: u64 = 64 << 20;
const RETENTION_EVERY: Duration = Duration::from_secs(1);

/// Work for the syncer thread.
pub(crate) enum SyncJob {
    /// fdatasync `files`; then, when `then` names one, offsets below
    /// `upto` of partition `part` of stream `idx` (named `name`) are on
    /// stable storage.
    Sync {
        files: Vec<File>,
        then: Option<Synced>,
    },
    /// Write a state file (committed offsets) atomically.
    State { path: PathBuf, bytes: Vec<u8> },
    /// Delete files (segments retention took out of a log), or a directory
    /// with everything in it (a deleted stream's, renamed out of the way).
    Remove(Vec<PathBuf>),
}

/// What the syncer thread answers.
#[derive(Debug)]
pub struct Synced {
    idx: usize,
    name: String,
    part: usize,
    upto: u64,
    result: Result<(), String>,
    /// After a failure: the files to sync again (closed segments among
    /// them, which the next `sync_files` would not name otherwise).
    retry: Vec<std::fs::File>,
    /// After success: where recovery may start its scan of the active
    /// segment, to store (its file, the encoded checkpoint).
    checkpoint: Option<(PathBuf, Vec<u8>)>,
}

/// How often a partition's checkpoint is stored (after a sync), at most.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Starts the syncer thread; it ends when the sender is dropped.
pub(crate) fn spawn_syncer(inbox: inbox::Sender) -> std::io::Result<mpsc::Sender<SyncJob>> {
    let (tx, rx) = mpsc::channel::<SyncJob>();
    std::thread::Builder::new()
        .name("ferry-sync".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                match job {
                    SyncJob::Sync { files, then } => {
                        let t = Instant::now();
                        let result = files
                            .iter()
                            .try_for_each(|f| f.sync_data())
                            .map_err(|e| e.to_string());
                        crate::metrics::FSYNC.observe(t.elapsed().as_micros() as u64);
                        match then {
                            Some(mut s) => {
                                let ok = result.is_ok();
                                let retry = if ok { Vec::new() } else { files };
                                let checkpoint = s.checkpoint.take();
                                inbox.send(inbox::Message::Synced(Synced {
                                    result,
                                    retry,
                                    ..s
                                }));
                                // After the answer: acknowledgements do not
                                // wait for it.
                                if let Some((path, bytes)) = checkpoint.filter(|_| ok) {
                                    if let Err(e) = log::write_atomic_unsynced(&path, &bytes) {
                                        tracing::warn!(path = %path.display(), "writing a log checkpoint failed (recovery scans more): {e}");
                                    }
                                }
                            }
                            None => {
                                if let Err(e) = result {
                                    tracing::warn!("syncing closed log segments: {e}");
                                }
                            }
                        }
                    }
                    SyncJob::Remove(paths) => {
                        for p in paths {
                            let r = if p.is_dir() {
                                std::fs::remove_dir_all(&p)
                            } else {
                                std::fs::remove_file(&p)
                            };
                            if let Err(e) = r.or_else(|e| match e.kind() {
                                std::io::ErrorKind::NotFound => Ok(()),
                                _ => Err(e),
                            }) {
                                tracing::warn!(path = %p.display(), "deleting: {e}");
                            }
                        }
                    }
                    SyncJob::State { path, bytes } => {
                        if let Err(e) = log::write_atomic(&path, &bytes) {
                            tracing::warn!(path = %path.display(), "writing committed offsets failed: {e}");
                        }
                    }
                }
            }
        })?;
    Ok(tx)
}

struct PartState {
    log: PartitionLog,
    /// Offsets below this are written to the log.
    written: u64,
    /// Offsets below this are synced.
    synced: u64,
    syncing: bool,
    last_sync: Instant,
    /// When a checkpoint was last sent to be stored.
    last_checkpoint: Option<Instant>,
}

/// A disk stream's logs.
pub(super) struct DiskLog {
    dir: PathBuf,
    parts: Vec<PartState>,
    /// The stream's fsync and retention settings.
    d: Durability,
    /// Why writes fail now (a full disk); None while they succeed.
    pub(super) error: Option<String>,
    /// What opening it found: tails cut, damaged records kept.
    pub(super) recovered: (u64, u64),
    stored_groups: Vec<StoredGroup>,
    offsets_at: Instant,
    retention_at: Instant,
}

impl DiskLog {
    /// Bytes on disk, over all partitions.
    pub(super) fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.log.bytes()).sum()
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the groups' committed offsets changed since last written.
    pub(super) fn offsets_pending(&self, stream: &Stream) -> bool {
        stored_differ(stream, &self.stored_groups, false)
    }

    /// Whether groups were created or deleted since the last store.
    fn groups_changed(&self, stream: &Stream) -> bool {
        stored_differ(stream, &self.stored_groups, true)
    }

    /// Publishes written to the log but not yet durable.
    pub(super) fn unsynced(&self) -> u64 {
        self.parts
            .iter()
            .map(|p| p.written - p.synced.min(p.written))
            .sum()
    }
}

/// The directory of disk stream `name`.
pub(super) fn stream_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("streams").join(name)
}

/// Opens (recovering) the logs of disk stream `name` into `stream`, and
/// restores its groups. Returns the logs and a line on what was found.
pub(super) fn open_disk(
    cfg: &crate::config::DaemonConfig,
    name: &str,
    spec: &StreamSpec,
    owner: Option<u32>,
    stream: &mut Stream,
) -> Result<(DiskLog, String), String> {
    let dir = stream_dir(&cfg.data_dir(), name);
    let ctx = |e: std::io::Error| format!("disk stream {name} in {}: {e}", dir.display());
    std::fs::create_dir_all(&dir).map_err(ctx)?;
    let meta_path = dir.join("stream.meta");
    let stored = log::stored_stream(&dir).map_err(ctx)?;
    if let Some(s) = &stored {
        log::spec_fits(name, &dir, &s.spec, spec)?;
    }
    let want = StoredStream {
        name: name.to_string(),
        spec: spec.clone(),
        owner,
    };
    if stored.as_ref() != Some(&want) {
        log::write_atomic(&meta_path, &log::encode(&want)).map_err(ctx)?;
    }
    let opts = LogOptions {
        segment_bytes: cfg.segment_bytes.max(4096),
        segment_ms: cfg.segment_ms.max(1),
        index_every: 64 << 10,
        max_payload: spec.slot_size,
    };
    let mut parts = Vec::new();
    let (mut records, mut dropped, mut damaged, mut cuts) = (0u64, 0u64, 0u64, 0u64);
    for p in 0..spec.partitions as usize {
        let (mut plog, cut) = PartitionLog::open(&dir.join(format!("p{p}")), opts).map_err(ctx)?;
        for t in &cut {
            if t.kept {
                damaged += 1;
            } else {
                dropped += t.bytes;
                cuts += 1;
            }
        }
        let (floor, end) = (plog.start_offset(), plog.next_offset());
        let ended = plog.ends_with_marker().map_err(ctx)?;
        stream.recover_partition(p, floor, end, ended, (plog.marks_base(), plog.marks()));
        records += end - floor;
        parts.push(PartState {
            log: plog,
            written: end,
            synced: end,
            syncing: false,
            last_sync: Instant::now(),
            last_checkpoint: None,
        });
    }
    for p in stream.finish_recovery() {
        tracing::warn!(
            stream = name,
            partition = p,
            "log recovery: the marker of the last end of epoch was missing from this partition (lost with its unsynced tail) and is put back at its end"
        );
    }
    let offsets_path = dir.join("offsets");
    let groups: Vec<StoredGroup> = match log::read_atomic(&offsets_path) {
        Ok(Some(b)) => log::decode(&offsets_path, &b).map_err(ctx)?,
        Ok(None) => Vec::new(),
        Err(e) => {
            // Without it groups start over where `start` says: say so.
            tracing::warn!(
                stream = name,
                "committed offsets unreadable, groups start afresh: {e}"
            );
            Vec::new()
        }
    };
    for g in &groups {
        if g.name.is_empty() {
            stream.restore_orphans_from(&g.committed);
        } else {
            stream.restore_group(&g.name, g.owner, &g.committed);
        }
    }
    let restored = groups.iter().filter(|g| !g.name.is_empty()).count();
    let d = &spec.durability;
    let line = format!(
        "{records} records on disk in {} partition(s), {} group(s) restored{}{}",
        spec.partitions,
        restored,
        if dropped > 0 {
            format!(", {dropped} bytes of torn or corrupt tails dropped")
        } else {
            String::new()
        },
        if damaged > 0 {
            format!(", {damaged} damaged record(s) kept and skipped")
        } else {
            String::new()
        }
    );
    Ok((
        DiskLog {
            dir,
            parts,
            d: *d,
            error: None,
            recovered: (cuts, damaged),
            stored_groups: groups,
            offsets_at: Instant::now(),
            retention_at: Instant::now(),
        },
        line,
    ))
}

/// What the offsets file stores: each live group's commits; with no
/// group, one entry with an empty name (no group has one) holding where
/// the batches kept for the first group to form start in each partition,
/// so that after a restart a new group does not take what groups deleted
/// before it had (their old batches are not an unrelated group's).
fn stored_groups(stream: &Stream) -> Vec<StoredGroup> {
    let groups: Vec<StoredGroup> = stream
        .groups()
        .iter()
        .filter(|g| !g.deleted)
        .map(|g| StoredGroup {
            name: g.name.clone(),
            owner: g.owner,
            committed: g.parts.iter().map(|gp| gp.committed).collect(),
        })
        .collect();
    if !groups.is_empty() {
        return groups;
    }
    vec![StoredGroup {
        name: String::new(),
        owner: 0,
        committed: stream.orphans_from().collect(),
    }]
}

/// Whether `stored_groups(stream)` differs from `stored` (in the groups'
/// names alone with `names_only`), without building it: this runs with
/// every disk tick.
fn stored_differ(stream: &Stream, stored: &[StoredGroup], names_only: bool) -> bool {
    let live = stream.groups().iter().filter(|g| !g.deleted);
    if live.clone().next().is_none() {
        return match stored {
            [s] if s.name.is_empty() => {
                !names_only && s.committed.iter().copied().ne(stream.orphans_from())
            }
            _ => true,
        };
    }
    live.clone().count() != stored.len()
        || live.zip(stored).any(|(g, s)| {
            g.name != s.name
                || (!names_only
                    && g.parts
                        .iter()
                        .map(|gp| gp.committed)
                        .ne(s.committed.iter().copied()))
        })
}

fn request_sync(
    syncer: &mpsc::Sender<SyncJob>,
    idx: usize,
    name: &str,
    p: usize,
    st: &mut PartState,
) {
    // Taken before the files: everything up to it is in them.
    let ckpt = st.log.checkpoint();
    match st.log.sync_files() {
        Ok(files) => {
            st.syncing = true;
            st.last_sync = Instant::now();
            let checkpoint = if st
                .last_checkpoint
                .is_none_or(|t| t.elapsed() >= CHECKPOINT_EVERY)
            {
                st.last_checkpoint = Some(st.last_sync);
                Some((log::checkpoint_path(st.log.dir()), log::encode(&ckpt)))
            } else {
                None
            };
            let _ = syncer.send(SyncJob::Sync {
                files,
                then: Some(Synced {
                    idx,
                    name: name.to_string(),
                    part: p,
                    upto: st.written,
                    result: Ok(()),
                    retry: Vec::new(),
                    checkpoint,
                }),
            });
        }
        Err(e) => tracing::warn!(stream = name, partition = p, "cannot sync the log: {e}"),
    }
}

impl StreamEntry {
    /// Writes what was put into the stream since the last call to its
    /// log, and makes it visible as its fsync policy says. On a write
    /// error (a full disk) the rest waits for the next call.
    pub(super) fn write_log(&mut self, idx: usize, syncer: &mpsc::Sender<SyncJob>) {
        let Some(dl) = self.log.as_mut() else {
            return;
        };
        let now = log::now_ms();
        let mut failed = None;
        for p in 0..dl.parts.len() {
            let end = self.stream.partition_end(p);
            let st = &mut dl.parts[p];
            let before = st.written;
            while st.written < end {
                let o = st.written;
                let Some(e) = self.stream.entry(p, o) else {
                    // Cannot happen (nothing leaves the index before it is
                    // written): stop rather than write a hole.
                    failed = Some(format!(
                        "offset {o} of partition {p} is missing before its write"
                    ));
                    break;
                };
                let r = if e.is_end() {
                    let number = e.end_number().to_le_bytes();
                    st.log
                        .append(o, log::REC_END, now, &number, Payload::Bytes(&[]))
                } else {
                    let mut meta = [0u8; ferry_shm::layout::META_MAX as usize];
                    let ml = (e.meta_len as usize).min(meta.len());
                    let (Some(moff), Some(soff)) = (
                        self.layout.meta_offset(e.slot),
                        self.layout.slot_offset(e.slot),
                    ) else {
                        failed = Some(format!("slot {} out of the pool", e.slot));
                        break;
                    };
                    self.pool.read_shared(moff, &mut meta[..ml]);
                    let flags = if e.flags & ENTRY_RECORD != 0 {
                        log::REC_RECORD
                    } else {
                        0
                    };
                    st.log.append(
                        o,
                        flags,
                        now,
                        &meta[..ml],
                        Payload::Region(&self.pool, soff, e.len),
                    )
                };
                match r {
                    Ok(_) => st.written += 1,
                    Err(e) => {
                        failed = Some(format!(
                            "writing offset {o} of partition {p} to {}: {e}",
                            dl.dir.display()
                        ));
                        break;
                    }
                }
            }
            if st.written > before {
                if self.stream.set_written(p, st.written) {
                    // Slots kept for the writer are free: grants to make.
                    self.dirty = true;
                }
                match dl.d.fsync {
                    Fsync::Never => {
                        st.synced = st.written;
                        self.stream.make_visible(p, st.written);
                        // Closed segments still reach the disk soon.
                        if st.log.rolled() {
                            if let Ok(files) = st.log.sync_files() {
                                let _ = syncer.send(SyncJob::Sync { files, then: None });
                            }
                        }
                    }
                    Fsync::Every if !st.syncing => {
                        request_sync(syncer, idx, self.stream.name(), p, st)
                    }
                    _ => {}
                }
            }
            if failed.is_some() {
                break;
            }
        }
        match (failed, &dl.error) {
            (Some(why), None) => {
                tracing::warn!(
                    stream = %self.stream.name(),
                    "disk log write failed; producers of this stream wait (no new slots) until it succeeds, and are told: {why}"
                );
                dl.error = Some(why);
            }
            (Some(why), Some(_)) => dl.error = Some(why),
            (None, Some(_)) => {
                tracing::info!(stream = %self.stream.name(), "disk log writes succeed again");
                dl.error = None;
            }
            (None, None) => {}
        }
    }

    /// Reads back from the log what groups need and is in no slot (and a
    /// few batches after each), into free slots.
    /// Returns how many batches it read back (work for the loop: they are
    /// delivered on its next turn, which must not sleep first).
    pub(super) fn serve_loads(&mut self) -> usize {
        let mut loads = self.stream.take_loads();
        if loads.is_empty() {
            return 0;
        }
        let Some(dl) = self.log.as_mut() else {
            return 0;
        };
        let mut served = 0;
        loads.sort_unstable();
        let ahead = READAHEAD
            .min(self.stream.spec().slot_count as u64 / 4)
            .max(1);
        for (p, first) in loads {
            let st = &mut dl.parts[p as usize];
            for o in first..first + ahead {
                if !self.stream.wants(p, o) {
                    if o == first {
                        continue;
                    }
                    break;
                }
                let Some(slot) = self.stream.grant(DAEMON) else {
                    break;
                };
                let (Some(soff), Some(moff)) =
                    (self.layout.slot_offset(slot), self.layout.meta_offset(slot))
                else {
                    self.stream.return_grant(DAEMON, slot);
                    break;
                };
                match st
                    .log
                    .read_into(o, &self.pool, soff, self.stream.spec().slot_size)
                {
                    Ok((h, meta)) if h.flags & log::REC_END != 0 => {
                        self.stream.return_grant(DAEMON, slot);
                        self.stream
                            .restore(p, o, Entry::end(log::mark_number(&meta), 0));
                        served += 1;
                    }
                    Ok((h, meta)) => {
                        self.pool.write(moff, &meta);
                        let e = Entry {
                            slot,
                            len: h.len,
                            meta_len: meta.len() as u32,
                            device: None,
                            flags: if h.flags & log::REC_RECORD != 0 {
                                ENTRY_RECORD
                            } else {
                                0
                            },
                            // Read back: not a publish to time.
                            stamp: 0,
                        };
                        self.stream.restore(p, o, e);
                        served += 1;
                    }
                    Err(e) => {
                        self.stream.return_grant(DAEMON, slot);
                        tracing::error!(
                            stream = %self.stream.name(),
                            partition = p,
                            offset = o,
                            "a batch cannot be read back from the disk log and is skipped: {e}"
                        );
                        self.stream.restore(p, o, Entry::marker(ENTRY_LOST));
                        served += 1;
                    }
                }
            }
            // The disk reads what comes next while this is delivered.
            let st = &mut dl.parts[p as usize];
            st.log
                .read_ahead((2 * ahead * self.stream.spec().slot_size).min(READ_AHEAD_MAX));
        }
        // Delivered on the next pump. (Nothing read, for want of a free
        // slot: a release makes the stream dirty again.)
        if served > 0 {
            self.dirty = true;
        }
        served
    }

    /// The syncer synced partition `s.part` up to `s.upto`.
    pub(super) fn synced(&mut self, idx: usize, s: Synced, syncer: &mpsc::Sender<SyncJob>) {
        let Some(dl) = self.log.as_mut() else {
            return;
        };
        let Some(st) = dl.parts.get_mut(s.part) else {
            return;
        };
        st.syncing = false;
        match s.result {
            Ok(()) => {
                st.synced = st.synced.max(s.upto);
                self.stream.make_visible(s.part, s.upto);
                self.dirty = true;
                if matches!(dl.d.fsync, Fsync::Every) && st.written > st.synced {
                    request_sync(syncer, idx, self.stream.name(), s.part, st);
                }
            }
            Err(e) => {
                let why = format!("fdatasync of partition {} failed: {e}", s.part);
                tracing::warn!(stream = %self.stream.name(), "{why}");
                dl.error = Some(why);
                // Everything it named is synced again with the retry, not
                // only the active segment.
                st.log.sync_again(s.retry);
            }
        }
    }

    /// Timed work: interval syncs, retries after write errors, committed
    /// offsets, retention.
    pub(super) fn disk_tick(
        &mut self,
        idx: usize,
        offsets_every: Duration,
        syncer: &mpsc::Sender<SyncJob>,
    ) {
        let Some(dl) = self.log.as_mut() else {
            return;
        };
        for p in 0..dl.parts.len() {
            let st = &mut dl.parts[p];
            let due = match dl.d.fsync {
                Fsync::IntervalMs(ms) => st.last_sync.elapsed() >= Duration::from_millis(ms as u64),
                // A failed sync is tried again.
                Fsync::Every => dl.error.is_some(),
                Fsync::Never => false,
            };
            if due && !st.syncing && st.written > st.synced {
                request_sync(syncer, idx, self.stream.name(), p, st);
            }
        }
        if dl.error.is_some() {
            self.dirty = true; // write_log tries again
        }
        // A group created or deleted is stored at once: a group lost in a
        // crash would come back as a new one, which starts at the end (not
        // at its commit) when others exist.
        if dl.offsets_at.elapsed() >= offsets_every || dl.groups_changed(&self.stream) {
            dl.offsets_at = Instant::now();
            if dl.offsets_pending(&self.stream) {
                let now = stored_groups(&self.stream);
                let _ = syncer.send(SyncJob::State {
                    path: dl.dir.join("offsets"),
                    bytes: log::encode(&now),
                });
                dl.stored_groups = now;
            }
        }
        if dl.retention_at.elapsed() >= RETENTION_EVERY
            && (dl.d.retention_ms > 0 || dl.d.retention_bytes > 0)
        {
            dl.retention_at = Instant::now();
            self.apply_retention(syncer);
        }
    }

    /// Deletes whole segments past the stream's retention limits (never
    /// what a live group has not committed, unless retention is strict).
    pub(super) fn apply_retention(&mut self, syncer: &mpsc::Sender<SyncJob>) {
        let Some(dl) = self.log.as_mut() else {
            return;
        };
        let now = std::time::SystemTime::now();
        for p in 0..dl.parts.len() {
            let st = &mut dl.parts[p];
            let mut total = st.log.bytes();
            let mut deleted = 0;
            // Batches each group skipped in this pass (one warning each).
            let mut skipped: Vec<(String, u64)> = Vec::new();
            for (_base, next, bytes, modified) in st.log.closed_segments() {
                let old = dl.d.retention_ms > 0
                    && now
                        .duration_since(modified)
                        .is_ok_and(|d| d >= Duration::from_millis(dl.d.retention_ms));
                let big = dl.d.retention_bytes > 0 && total > dl.d.retention_bytes;
                if !old && !big {
                    break;
                }
                let behind = self
                    .stream
                    .groups()
                    .iter()
                    .filter(|g| !g.deleted && g.parts[p].committed < next)
                    .map(|g| g.name.clone())
                    .collect::<Vec<_>>();
                if !behind.is_empty() && !dl.d.strict {
                    crate::limited!(
                        INFO,
                        stream = %self.stream.name(),
                        partition = p,
                        "retention keeps a segment a group has not committed yet (retention = \"strict\" would delete it): {}",
                        behind.join(", ")
                    );
                    break;
                }
                match st.log.detach_oldest() {
                    Some((start, files)) => {
                        let _ = syncer.send(SyncJob::Remove(files.to_vec()));
                        total -= bytes;
                        deleted += 1;
                        for (g, n) in self.stream.raise_floor(p, start) {
                            match skipped.iter_mut().find(|(name, _)| *name == g) {
                                Some((_, total)) => *total += n,
                                None => skipped.push((g, n)),
                            }
                        }
                    }
                    None => break,
                }
            }
            let start = st.log.start_offset();
            for (g, n) in skipped {
                tracing::warn!(
                    stream = %self.stream.name(),
                    partition = p,
                    group = %g,
                    skipped = n,
                    "retention = \"strict\" deleted batches this group had not read: it goes on from offset {start}"
                );
            }
            if deleted > 0 {
                tracing::info!(
                    stream = %self.stream.name(),
                    partition = p,
                    segments = deleted,
                    start,
                    "retention deleted old segments"
                );
                self.dirty = true;
            }
        }
    }

    /// Writes the committed offsets now (shutdown).
    pub(super) fn flush_offsets(&mut self) {
        let Some(dl) = self.log.as_mut() else {
            return;
        };
        let now = stored_groups(&self.stream);
        if let Err(e) = log::write_atomic(&dl.dir.join("offsets"), &log::encode(&now)) {
            tracing::warn!(stream = %self.stream.name(), "writing committed offsets: {e}");
        }
        dl.stored_groups = now;
    }
}

/// A producer's publishes to a disk stream not yet acknowledged, in order.
#[derive(Debug, Default)]
pub(super) struct Acks {
    unacked: VecDeque<(u32, u64)>,
    acked: u64,
    /// What the producer was told: acknowledged count, stalled.
    pub(super) sent: (u64, bool),
}

impl Acks {
    /// The producer's publish went in at (partition, offset).
    pub(super) fn published(&mut self, stream: &Stream, at: (u32, u64)) {
        if stream.tiered() {
            self.unacked.push_back(at);
        }
    }

    /// Moves past what is visible now; returns the acknowledged count.
    pub(super) fn advance(&mut self, stream: &Stream) -> u64 {
        while let Some(&(p, o)) = self.unacked.front() {
            if o >= stream.visible(p as usize) {
                break;
            }
            self.unacked.pop_front();
            self.acked += 1;
        }
        self.acked
    }
}

impl Server {
    /// Opens the disk streams producers created before a restart (those
    /// declared in the config are open already), from their directories.
    pub(super) fn reopen_disk_streams(&mut self) -> Result<(), DaemonError> {
        let root = self.cfg.daemon.data_dir().join("streams");
        let Ok(dirs) = std::fs::read_dir(&root) else {
            return Ok(()); // no disk stream yet
        };
        let mut names: Vec<PathBuf> = dirs.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        names.sort();
        for dir in names {
            if dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".deleted-"))
            {
                // A deleted stream whose files were not all gone yet.
                let _ = self.syncer.send(SyncJob::Remove(vec![dir]));
                continue;
            }
            let meta = dir.join("stream.meta");
            let stored = match log::read_atomic(&meta).and_then(|b| {
                b.map(|b| log::decode::<StoredStream>(&meta, &b))
                    .transpose()
            }) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    warn!(dir = %dir.display(), "not reopening a disk stream: {e}");
                    continue;
                }
            };
            if self.by_name.contains_key(&stored.name) {
                continue;
            }
            if stored.owner.is_none() {
                warn!(
                    stream = %stored.name,
                    dir = %dir.display(),
                    "a disk stream once declared in the config is no longer declared: its log stays on disk, unopened (declare it again, or delete the directory)"
                );
                continue;
            }
            self.create_stream(&stored.name, stored.spec.clone(), stored.owner)
                .map_err(|r| DaemonError::Other(r.message))?;
        }
        Ok(())
    }

    /// Timed work of every disk stream, at most every 10 ms.
    pub(super) fn disk_tick(&mut self) {
        if self.last_disk_tick.elapsed() < Duration::from_millis(10) {
            return;
        }
        self.last_disk_tick = Instant::now();
        let every = Duration::from_millis(self.cfg.daemon.offsets_flush_ms.max(1));
        for (idx, e) in self.streams.iter_mut() {
            e.disk_tick(idx, every, &self.syncer);
        }
    }

    /// How long the loop may sleep with interval syncs to do (None: no
    /// limit from disk streams).
    pub(super) fn disk_wait_ms(&self) -> Option<i32> {
        let busy = |e: &StreamEntry| {
            e.log.as_ref().is_some_and(|l| {
                l.unsynced() > 0 || l.error.is_some() || l.offsets_pending(&e.stream)
            })
        };
        self.streams
            .iter()
            .any(busy)
            .then_some(self.cfg.daemon.offsets_flush_ms.clamp(1, 10) as i32)
    }

    pub(super) fn on_synced(&mut self, s: Synced) {
        let idx = s.idx;
        let ok = self
            .streams
            .slots
            .get(idx)
            .and_then(|e| e.as_ref())
            .is_some_and(|e| e.stream.name() == s.name);
        if ok {
            self.streams[idx].synced(idx, s, &self.syncer);
        }
    }

    /// At shutdown: every disk log synced, committed offsets written.
    pub(super) fn close_disk_streams(&mut self) {
        for (_, e) in self.streams.iter_mut() {
            let Some(dl) = e.log.as_mut() else {
                continue;
            };
            for (p, st) in dl.parts.iter_mut().enumerate() {
                let r = st
                    .log
                    .sync_files()
                    .and_then(|fs| fs.iter().try_for_each(|f| f.sync_data()));
                if let Err(err) = r {
                    warn!(stream = %e.stream.name(), partition = p, "syncing the log at shutdown: {err}");
                }
            }
            e.flush_offsets();
        }
    }
}
