//! The disk tier of durable streams: one append-only log per partition,
//! made of segment files, and the small files beside it (the stream's
//! spec, its groups' committed offsets).
//!
//! A partition's directory holds `<base offset, 20 digits>.log` segments
//! and, for each, a `.idx` sparse index. A record is a 40-byte header,
//! the metadata, then the payload:
//!
//! ```text
//! magic u32 | flags u16 | meta_len u16 | offset u64 | time_ms u64 | len u64 | xxh3 u64
//! ```
//!
//! all little-endian. The checksum (xxh3-64) covers the first 32 header
//! bytes, the metadata and the payload. A payload of 64 KiB or more is
//! read from the pool slot (shared memory) 256 KiB at a time into a
//! scratch buffer, hashed there and written to the file from there, while
//! the chunk is in cache; the header with the checksum follows. So the
//! bytes checked are the bytes written, even if a misbehaving producer
//! goes on writing its slot after publishing it. A smaller payload is
//! hashed through the scratch buffer and written with its header in one
//! `pwritev` from the slot. A record cut short by a crash fails its check,
//! as does one damaged on disk since: recovery tells such a damaged record
//! in the middle from a torn tail by the sound record after it, keeps it
//! (it is skipped when read back, never served) and goes on.
//!
//! The index has one 16-byte entry (offset, file position) at the first
//! record of the segment and then every `index_every` bytes, and one
//! (offset with its top bit set, epoch number) for each end-of-epoch
//! marker (whose record carries that number, 8 bytes, as its metadata), so
//! that recovery knows where every retained epoch ends without reading
//! the records; closed
//! segments have theirs synced at roll. Recovery trusts closed segments
//! with a sound index and scans the last (active) segment record by record,
//! truncating at the first record that is cut short or fails its checksum
//! with no sound record after it (a torn tail: only records never
//! acknowledged can be there, since an acknowledgement waits for its
//! record's write, and with `fsync = "every"` or `"interval"` for its
//! sync).
//!
//! The scan of the active segment starts at its last checkpoint: the
//! `checkpoint` file names a position in it up to which a sync completed
//! (written after that sync, at most once a second, as a state file with a
//! checksum). Records before it are trusted as closed segments are (a
//! record damaged there is still never served: read-back checks every
//! record); its index is taken from the segment's `.idx` where sound. A
//! checkpoint that names another segment, a position past the file's end,
//! or fails its checksum is ignored: the whole segment is scanned.
//!
//! The offsets file and the spec file are written whole to a temporary
//! file, synced, and renamed over the old one, so a crash leaves either the
//! old or the new version, never a mix.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_shm::Region;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

pub const HEADER: usize = 40;
const MAGIC: u32 = u32::from_le_bytes(*b"FRY1");
/// Record flag: a typed record (as `stream::ENTRY_RECORD`).
pub const REC_RECORD: u16 = 1;
/// Record flag: an end-of-epoch marker, no payload (as `stream::ENTRY_END`).
pub const REC_END: u16 = 2;
const META_MAX: usize = ferry_shm::layout::META_MAX as usize;
const IDX_ENTRY: usize = 16;
/// Payloads from the pool at least this large are hashed and written
/// through the scratch buffer, `WRITE_CHUNK` bytes at a time.
const CHUNKED_FROM: u64 = 64 << 10;
const WRITE_CHUNK: usize = 256 << 10;
/// An index entry's offset with this bit set names an end marker: (offset,
/// epoch number) instead of (offset, position).
const IDX_MARK: u64 = 1 << 63;

/// The epoch number an end marker's record carries as its metadata (0: a
/// marker written before markers were numbered).
pub fn mark_number(meta: &[u8]) -> u64 {
    meta.try_into().map_or(0, u64::from_le_bytes)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// A segment is closed and a new one started once it holds this many
    /// bytes...
    pub segment_bytes: u64,
    /// ...or once its first record is this old.
    pub segment_ms: u64,
    /// Bytes between two sparse index entries.
    pub index_every: u64,
    /// The largest payload a record may have (the stream's slot size):
    /// recovery treats a header claiming more as garbage.
    pub max_payload: u64,
}

/// One record's header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub flags: u16,
    pub meta_len: u16,
    pub offset: u64,
    pub time_ms: u64,
    pub len: u64,
    pub hash: u64,
}

impl RecordHeader {
    fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[6..8].copy_from_slice(&self.meta_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.time_ms.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.hash.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER]) -> Option<RecordHeader> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != MAGIC {
            return None;
        }
        let h = RecordHeader {
            flags: u16_at(4),
            meta_len: u16_at(6),
            offset: u64_at(8),
            time_ms: u64_at(16),
            len: u64_at(24),
            hash: u64_at(32),
        };
        (h.meta_len as usize <= META_MAX).then_some(h)
    }

    /// Bytes the whole record takes in the file.
    pub fn size(&self) -> u64 {
        HEADER as u64 + self.meta_len as u64 + self.len
    }
}

/// Where a record's payload comes from.
pub enum Payload<'a> {
    /// `len` bytes of a memory region (a slot of the stream's pool).
    Region(&'a Region, u64, u64),
    Bytes(&'a [u8]),
}

impl Payload<'_> {
    fn len(&self) -> u64 {
        match self {
            Payload::Region(_, _, len) => *len,
            Payload::Bytes(b) => b.len() as u64,
        }
    }
}

/// What recovery found wrong in a partition's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// A damaged record with a sound record after it, kept in place (it is
    /// skipped when read back); otherwise a tail cut off the file.
    pub kept: bool,
    pub segment: PathBuf,
    /// Where the dropped bytes started in the segment, and how many.
    pub position: u64,
    pub bytes: u64,
    /// The offset the first dropped record would have had.
    pub offset: u64,
    pub reason: String,
}

#[derive(Debug)]
struct Segment {
    base: u64,
    /// The offset after its last record.
    next: u64,
    bytes: u64,
    /// When it was last written (file mtime for closed segments).
    modified: SystemTime,
    /// (offset, position), ascending.
    index: Vec<(u64, u64)>,
    /// Its end markers: (offset, epoch number), ascending.
    marks: Vec<(u64, u64)>,
    file: File,
}

/// What a scan of a segment found.
struct Scan {
    /// The offset after its last record, and where that record ends.
    next: u64,
    good: u64,
    index: Vec<(u64, u64)>,
    marks: Vec<(u64, u64)>,
    /// Why the scan stopped before the end of the file (a torn tail).
    cut: Option<String>,
    /// Damaged records with sound ones after them: (offset, position,
    /// bytes, why).
    damaged: Vec<(u64, u64, u64, String)>,
}

/// A partition's log.
#[derive(Debug)]
pub struct PartitionLog {
    dir: PathBuf,
    opts: LogOptions,
    /// By base offset; the last is the active one, written to.
    segments: BTreeMap<u64, Segment>,
    active_idx: File,
    /// When the active segment got its first record.
    active_since: Option<std::time::Instant>,
    /// Bytes of the active segment since its last index entry.
    since_index: u64,
    /// Where the record after the last one read starts: (offset, base,
    /// position), so that a sequential replay does not search the index.
    cursor: Option<(u64, u64, u64)>,
    scratch: Vec<u8>,
    /// The epoch number of the last end marker in segments retention
    /// deleted (kept in the `marks_base` file).
    marks_base: u64,
    /// (segment base, position): how far `read_ahead` asked the kernel to
    /// read.
    advised: (u64, u64),
    /// Written but not yet synced, besides the active segment: segments
    /// closed since the last `sync_files` and their indexes, and the
    /// directory (new segments in it).
    unsynced: Vec<File>,
}

fn seg_name(base: u64, ext: &str) -> String {
    format!("{base:020}.{ext}")
}

fn invalid(m: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m)
}

/// Syncs a directory (a new or renamed file in it is then durable).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A record's checksum: its header's first 32 bytes, its metadata, and
/// its `len` payload bytes, which `fill(buf, at)` copies into `scratch`
/// chunk by chunk (payload bytes `at..at + buf.len()`).
fn record_hash(
    head: &[u8; HEADER],
    meta: &[u8],
    len: u64,
    scratch: &mut Vec<u8>,
    fill: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<u64> {
    record_hash_in(head, meta, len, scratch, 32 << 10, fill)
}

/// [`record_hash`] through a scratch buffer of `chunk` bytes.
fn record_hash_in(
    head: &[u8; HEADER],
    meta: &[u8],
    len: u64,
    scratch: &mut Vec<u8>,
    chunk: usize,
    mut fill: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<u64> {
    let mut h = Xxh3::new();
    h.update(&head[..32]);
    h.update(meta);
    scratch.resize(chunk, 0);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(scratch.len() as u64) as usize;
        fill(&mut scratch[..n], done)?;
        h.update(&scratch[..n]);
        done += n as u64;
    }
    Ok(h.digest())
}

/// A record's header and metadata as they go to the file, and their length.
fn head_of(h: &RecordHeader, meta: &[u8]) -> ([u8; HEADER + META_MAX], usize) {
    let mut head = [0u8; HEADER + META_MAX];
    head[..HEADER].copy_from_slice(&h.encode());
    head[HEADER..HEADER + meta.len()].copy_from_slice(meta);
    (head, HEADER + meta.len())
}

/// A record's checksum over its payload as `file` holds it at `pos`.
fn hash_from_file(
    file: &File,
    head: &[u8; HEADER],
    meta: &[u8],
    pos: u64,
    len: u64,
    scratch: &mut Vec<u8>,
) -> io::Result<u64> {
    record_hash(head, meta, len, scratch, |buf, at| {
        file.read_exact_at(buf, pos + at)
    })
}

/// Reads and checks the record at `pos` of `file` (`size`: the file's
/// length). `Ok(None)`: there is no sound record there (cut short, bad
/// header, wrong offset, wrong checksum), with the reason.
fn check_record(
    file: &File,
    pos: u64,
    size: u64,
    expect: u64,
    max_payload: u64,
    scratch: &mut Vec<u8>,
) -> io::Result<Result<RecordHeader, (String, Option<RecordHeader>)>> {
    let bad = |m: String| Ok(Err((m, None)));
    if size - pos < HEADER as u64 {
        return bad(format!("{} bytes, less than a record header", size - pos));
    }
    let mut hb = [0u8; HEADER];
    file.read_exact_at(&mut hb, pos)?;
    let Some(h) = RecordHeader::decode(&hb) else {
        return bad("not a record header".into());
    };
    if h.offset != expect {
        return bad(format!(
            "header says offset {}, expected {expect}",
            h.offset
        ));
    }
    if h.len > max_payload {
        return bad(format!(
            "header says {} payload bytes, over the slot size {max_payload}",
            h.len
        ));
    }
    if h.size() > size - pos {
        return bad(format!(
            "cut short: {} of its {} bytes are in the file",
            size - pos,
            h.size()
        ));
    }
    let mut meta = [0u8; META_MAX];
    let ml = h.meta_len as usize;
    file.read_exact_at(&mut meta[..ml], pos + HEADER as u64)?;
    let got = hash_from_file(
        file,
        &hb,
        &meta[..ml],
        pos + HEADER as u64 + ml as u64,
        h.len,
        scratch,
    )?;
    if got != h.hash {
        // Its lengths may still be right: the caller looks past it.
        return Ok(Err(("checksum mismatch".into(), Some(h))));
    }
    Ok(Ok(h))
}

/// A position in a partition's active segment up to which a sync
/// completed: `next` is the offset of the record that starts there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub base: u64,
    pub position: u64,
    pub next: u64,
}

/// The checkpoint file of the partition log in `dir`.
pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint")
}

/// The checkpoint stored in `dir`, when there is a sound one.
fn read_checkpoint(dir: &Path) -> Option<Checkpoint> {
    let path = checkpoint_path(dir);
    match read_atomic(&path) {
        Ok(Some(b)) => decode(&path, &b).ok(),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), "log recovery: the checkpoint is ignored (the whole active segment is scanned): {e}");
            None
        }
    }
}

/// A segment's sparse index and its end markers, read from its `.idx`
/// file, when that is sound.
type Index = (Vec<(u64, u64)>, Vec<(u64, u64)>);

fn load_index(path: &Path, base: u64, file_len: u64) -> Option<Index> {
    let b = fs::read(path).ok()?;
    if b.len() % IDX_ENTRY != 0 || b.is_empty() {
        return None;
    }
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(b.len() / IDX_ENTRY);
    let mut marks: Vec<(u64, u64)> = Vec::new();
    for c in b.chunks_exact(IDX_ENTRY) {
        let o = u64::from_le_bytes(c[..8].try_into().ok()?);
        let p = u64::from_le_bytes(c[8..].try_into().ok()?);
        if o & IDX_MARK != 0 {
            let o = o & !IDX_MARK;
            let sorted = marks.last().is_none_or(|&(lo, ln)| o > lo && p > ln);
            if o < base || !sorted {
                return None;
            }
            marks.push((o, p));
            continue;
        }
        let sorted = out.last().is_none_or(|&(lo, lp)| o > lo && p > lp);
        if o < base || p >= file_len || !sorted {
            return None;
        }
        out.push((o, p));
    }
    (out.first() == Some(&(base, 0))).then_some((out, marks))
}

impl PartitionLog {
    /// Opens (creating when empty) the log in `dir`, recovering its last
    /// segment. Returns the log and what recovery dropped.
    pub fn open(dir: &Path, opts: LogOptions) -> io::Result<(PartitionLog, Vec<Truncation>)> {
        fs::create_dir_all(dir)?;
        let mut bases: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                let stem = n.strip_suffix(".log")?;
                (stem.len() == 20)
                    .then(|| stem.parse::<u64>().ok())
                    .flatten()
            })
            .collect();
        bases.sort_unstable();
        let mut log = PartitionLog {
            dir: dir.to_path_buf(),
            opts,
            segments: BTreeMap::new(),
            active_idx: File::open("/dev/null")?,
            active_since: None,
            since_index: 0,
            cursor: None,
            scratch: Vec::new(),
            marks_base: 0,
            advised: (0, 0),
            unsynced: Vec::new(),
        };
        let base_path = dir.join("marks_base");
        log.marks_base = match read_atomic(&base_path) {
            Ok(Some(b)) => decode(&base_path, &b).unwrap_or(0),
            _ => 0,
        };
        let mut dropped = Vec::new();
        if bases.is_empty() {
            log.create_segment(0)?;
            for f in log.unsynced.drain(..) {
                f.sync_all()?;
            }
            return Ok((log, dropped));
        }
        for (i, &base) in bases.iter().enumerate() {
            let last = i + 1 == bases.len();
            let path = dir.join(seg_name(base, "log"));
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let meta = file.metadata()?;
            let len = meta.len();
            let next_base = bases.get(i + 1).copied();
            let index = if last {
                None
            } else {
                load_index(&dir.join(seg_name(base, "idx")), base, len.max(1))
            };
            let (sparse, mut marks) = index.clone().unwrap_or_default();
            if let Some(n) = next_base {
                marks.retain(|&(o, _)| o < n);
            }
            let mut seg = Segment {
                base,
                next: next_base.unwrap_or(base),
                bytes: len,
                modified: meta.modified().unwrap_or(SystemTime::now()),
                index: sparse,
                marks,
                file,
            };
            if index.is_none() {
                // Scan: the active segment always (from its checkpoint,
                // when it has a sound one), a closed one whose index is
                // missing or unsound.
                let from = if last {
                    log.resume_point(&seg, len)
                } else {
                    None
                };
                if let Some((c, _)) = &from {
                    tracing::debug!(
                        segment = %path.display(),
                        position = c.position,
                        offset = c.next,
                        bytes = len - c.position,
                        "log recovery: scanning the active segment from its checkpoint"
                    );
                }
                let Scan {
                    next,
                    good,
                    index,
                    marks,
                    cut,
                    damaged,
                } = log.scan(&seg, len, from)?;
                seg.index = index;
                seg.marks = marks;
                for (offset, position, bytes, reason) in damaged {
                    tracing::warn!(
                        segment = %path.display(),
                        position,
                        offset,
                        reason = %reason,
                        "log recovery: a damaged record with sound ones after it is kept and will be skipped, never served"
                    );
                    dropped.push(Truncation {
                        kept: true,
                        segment: path.clone(),
                        position,
                        bytes,
                        offset,
                        reason,
                    });
                }
                if let Some(reason) = cut {
                    if good < len {
                        tracing::warn!(
                            segment = %path.display(),
                            position = good,
                            bytes = len - good,
                            offset = next,
                            reason = %reason,
                            "log recovery: dropping a torn or corrupt tail (a write a crash cut short, which was never acknowledged; or damage done to the file since)"
                        );
                        seg.file.set_len(good)?;
                        seg.file.sync_all()?;
                        dropped.push(Truncation {
                            kept: false,
                            segment: path.clone(),
                            position: good,
                            bytes: len - good,
                            offset: next,
                            reason,
                        });
                    }
                }
                seg.bytes = good;
                if !last && next_base != Some(next) {
                    // A closed segment that ends short of the next one's
                    // base: the later segments cannot be trusted.
                    return Err(invalid(format!(
                        "{}: ends at offset {next} but the next segment starts at {}; move the later segments away to recover up to here",
                        path.display(),
                        next_base.unwrap_or(0)
                    )));
                }
                seg.next = next;
                if !last {
                    log.write_index(&dir.join(seg_name(base, "idx")), &seg.index, &seg.marks)?;
                }
            }
            log.segments.insert(base, seg);
        }
        let active = log
            .segments
            .values()
            .next_back()
            .expect("one segment at least");
        let (base, bytes) = (active.base, active.bytes);
        let idx_path = dir.join(seg_name(base, "idx"));
        let (idx, marks) = (active.index.clone(), active.marks.clone());
        log.write_index(&idx_path, &idx, &marks)?;
        log.active_idx = OpenOptions::new().append(true).open(&idx_path)?;
        log.since_index = idx.last().map_or(0, |&(_, p)| bytes - p);
        if bytes > 0 {
            log.active_since = Some(std::time::Instant::now());
        }
        Ok((log, dropped))
    }

    /// Where the scan of active segment `seg` (`len` bytes) may start:
    /// its checkpoint, with the index entries before it, when the
    /// checkpoint names this segment and a place in it.
    fn resume_point(&self, seg: &Segment, len: u64) -> Option<(Checkpoint, Index)> {
        let c = read_checkpoint(&self.dir)?;
        if c.base != seg.base || c.position > len || c.next < seg.base || c.position == 0 {
            return None;
        }
        // The record at the checkpoint must be the one it names (or the
        // file ends there): else the checkpoint is not this file's.
        if c.position < len {
            let mut hb = [0u8; HEADER];
            let n = (len - c.position).min(HEADER as u64) as usize;
            seg.file.read_exact_at(&mut hb[..n], c.position).ok()?;
            if n == HEADER && RecordHeader::decode(&hb).is_some_and(|h| h.offset != c.next) {
                return None;
            }
        }
        let idx = self.dir.join(seg_name(seg.base, "idx"));
        let (mut index, mut marks) = load_index(&idx, seg.base, len.max(1)).unwrap_or_default();
        index.retain(|&(o, p)| p < c.position && o < c.next);
        if index.first() != Some(&(seg.base, 0)) {
            // Without its sparse index, the markers' entries before the
            // checkpoint cannot be trusted either: scan it all.
            return None;
        }
        marks.retain(|&(o, _)| o < c.next);
        Some((c, (index, marks)))
    }

    /// Scans segment `seg` (`len` bytes), from its start or from `from`
    /// (a checkpoint and the index before it): the offset after its last
    /// sound record, where that record ends, its sparse index, and why the
    /// scan stopped early (None: at the end of the file).
    fn scan(
        &mut self,
        seg: &Segment,
        len: u64,
        from: Option<(Checkpoint, Index)>,
    ) -> io::Result<Scan> {
        let (mut pos, mut next, mut index, mut marks, mut since) = match from {
            Some((c, (index, marks))) => {
                let last = index.last().map_or(0, |&(_, p)| p);
                (c.position, c.next, index, marks, c.position - last)
            }
            None => (0u64, seg.base, Vec::new(), Vec::new(), u64::MAX),
        };
        let mut damaged = Vec::new();
        let max = self.opts.max_payload;
        let mut cut = None;
        while pos < len {
            let h = match check_record(&seg.file, pos, len, next, max, &mut self.scratch)? {
                Ok(h) => h,
                Err((reason, Some(h)))
                    if h.size() < len - pos
                        && check_record(
                            &seg.file,
                            pos + h.size(),
                            len,
                            next + 1,
                            max,
                            &mut self.scratch,
                        )?
                        .is_ok() =>
                {
                    damaged.push((next, pos, h.size(), reason));
                    h
                }
                Err((reason, _)) => {
                    cut = Some(reason);
                    break;
                }
            };
            if since >= self.opts.index_every {
                index.push((next, pos));
                since = 0;
            }
            if h.flags & REC_END != 0 && h.meta_len == 8 {
                let mut m = [0u8; 8];
                seg.file.read_exact_at(&mut m, pos + HEADER as u64)?;
                marks.push((next, mark_number(&m)));
            }
            since += h.size();
            pos += h.size();
            next += 1;
        }
        Ok(Scan {
            next,
            good: pos,
            index,
            marks,
            cut,
            damaged,
        })
    }

    fn write_index(
        &self,
        path: &Path,
        index: &[(u64, u64)],
        marks: &[(u64, u64)],
    ) -> io::Result<()> {
        let mut b = Vec::with_capacity((index.len() + marks.len()) * IDX_ENTRY);
        for (o, p) in index {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&p.to_le_bytes());
        }
        for (o, n) in marks {
            b.extend_from_slice(&(o | IDX_MARK).to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
        }
        let mut f = File::create(path)?;
        f.write_all(&b)?;
        f.sync_all()
    }

    fn create_segment(&mut self, base: u64) -> io::Result<()> {
        let path = self.dir.join(seg_name(base, "log"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let idx_path = self.dir.join(seg_name(base, "idx"));
        self.active_idx = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&idx_path)?;
        // The new file's name reaches the disk with the next sync.
        self.unsynced.push(File::open(&self.dir)?);
        self.segments.insert(
            base,
            Segment {
                base,
                next: base,
                bytes: 0,
                modified: SystemTime::now(),
                index: Vec::new(),
                marks: Vec::new(),
                file,
            },
        );
        self.active_since = None;
        self.since_index = u64::MAX;
        Ok(())
    }

    fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("one segment at least")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("one segment at least")
    }

    /// The offset the next record gets.
    pub fn next_offset(&self) -> u64 {
        self.active().next
    }

    /// The lowest offset still in the log.
    pub fn start_offset(&self) -> u64 {
        self.segments
            .values()
            .next()
            .expect("one segment at least")
            .base
    }

    /// Bytes of all its segments.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Whether the last record in the log is an end marker (read from
    /// disk; for recovery).
    pub fn ends_with_marker(&mut self) -> io::Result<bool> {
        let next = self.next_offset();
        if next == self.start_offset() {
            return Ok(false);
        }
        Ok(self.header(next - 1)?.1.flags & REC_END != 0)
    }

    /// The epoch number of the last end marker before the log's start
    /// (in segments retention deleted; 0: none).
    pub fn marks_base(&self) -> u64 {
        self.marks_base
    }

    /// The numbered end markers in the log, (offset, epoch number), oldest
    /// first.
    pub fn marks(&self) -> Vec<(u64, u64)> {
        self.segments
            .values()
            .flat_map(|s| s.marks.iter().copied())
            .collect()
    }

    /// Where the active segment ends now: once a sync of the files
    /// [`PartitionLog::sync_files`] names now completed, a checkpoint
    /// (written with [`write_atomic_unsynced`] to [`checkpoint_path`]) for
    /// recovery to start its scan at.
    pub fn checkpoint(&self) -> Checkpoint {
        let a = self.active();
        Checkpoint {
            base: a.base,
            position: a.bytes,
            next: a.next,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Handles on everything written and not yet synced (the active
    /// segment, segments closed since the last call, their indexes, the
    /// directory), for syncing them from another thread: once all are,
    /// every record appended before this call is on stable storage.
    pub fn sync_files(&mut self) -> io::Result<Vec<File>> {
        let mut files = std::mem::take(&mut self.unsynced);
        files.push(self.active().file.try_clone()?);
        Ok(files)
    }

    /// Files a sync of [`PartitionLog::sync_files`] failed on: the next
    /// `sync_files` names them again.
    pub fn sync_again(&mut self, files: Vec<File>) {
        self.unsynced.extend(files);
    }

    /// Whether a segment was closed (or created) since the last
    /// `sync_files`.
    pub fn rolled(&self) -> bool {
        !self.unsynced.is_empty()
    }

    /// Closes the active segment when it is full or old enough and starts
    /// the next (the closed one and its index are synced with the next
    /// `sync_files`).
    fn maybe_roll(&mut self) -> io::Result<()> {
        let a = self.active();
        let old = self
            .active_since
            .is_some_and(|t| t.elapsed() >= Duration::from_millis(self.opts.segment_ms));
        if a.bytes == 0 || (a.bytes < self.opts.segment_bytes && !old) {
            return Ok(());
        }
        let (base, next) = (a.base, a.next);
        // Synced with the next sync, off this thread.
        let closed = a.file.try_clone()?;
        self.unsynced.push(closed);
        self.unsynced.push(self.active_idx.try_clone()?);
        self.active_mut().modified = SystemTime::now();
        self.create_segment(next)?;
        tracing::debug!(dir = %self.dir.display(), closed = base, next, "log segment rolled");
        Ok(())
    }

    /// Appends the record for `offset` (which must be `next_offset()`).
    /// On an error nothing of it stays in the file (it is truncated back),
    /// so the call can be repeated later (a full disk).
    pub fn append(
        &mut self,
        offset: u64,
        flags: u16,
        time_ms: u64,
        meta: &[u8],
        payload: Payload<'_>,
    ) -> io::Result<u64> {
        if offset != self.next_offset() {
            return Err(io::Error::other(format!(
                "append of offset {offset}, the log is at {}",
                self.next_offset()
            )));
        }
        if meta.len() > META_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "metadata too long",
            ));
        }
        self.maybe_roll()?;
        let len = payload.len();
        let mut h = RecordHeader {
            flags,
            meta_len: meta.len() as u16,
            offset,
            time_ms,
            len,
            hash: 0,
        };
        let pos = self.active().bytes;
        if let Payload::Region(r, off, _) = payload {
            if len >= CHUNKED_FROM {
                return self.append_chunked(h, pos, meta, r, off);
            }
        }
        // The checksum over the source (read through a small scratch
        // buffer: a slot of the pool is shared memory), then header and
        // payload in one write.
        h.hash = record_hash(
            &h.encode(),
            meta,
            len,
            &mut self.scratch,
            |buf, at| match &payload {
                Payload::Region(r, off, _) => {
                    r.read_shared(off + at, buf).then_some(()).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "range outside the region")
                    })
                }
                Payload::Bytes(b) => {
                    buf.copy_from_slice(&b[at as usize..at as usize + buf.len()]);
                    Ok(())
                }
            },
        )?;
        let (head, n) = head_of(&h, meta);
        if let Err(e) = self.write_record(pos, &head[..n], &payload) {
            // Leave no part of it: the next try starts at the same place.
            let _ = self.active().file.set_len(pos);
            return Err(e);
        }
        self.appended(h, pos, meta)
    }

    /// A large payload from the pool: read in chunks into the scratch
    /// buffer (it is shared memory), each chunk hashed and written from
    /// there, then the header with the checksum. The bytes checked are the
    /// bytes written (a producer writing its slot after the publish cannot
    /// damage the record), and each chunk is written while in cache.
    fn append_chunked(
        &mut self,
        mut h: RecordHeader,
        pos: u64,
        meta: &[u8],
        r: &Region,
        off: u64,
    ) -> io::Result<u64> {
        let data_at = pos + HEADER as u64 + meta.len() as u64;
        let mut scratch = std::mem::take(&mut self.scratch);
        let file = &self.active().file;
        let hashed = record_hash_in(
            &h.encode(),
            meta,
            h.len,
            &mut scratch,
            WRITE_CHUNK,
            |buf, at| {
                if !r.read_shared(off + at, buf) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "range outside the region",
                    ));
                }
                file.write_all_at(buf, data_at + at)
            },
        );
        let written = hashed.and_then(|hash| {
            h.hash = hash;
            let (head, n) = head_of(&h, meta);
            file.write_all_at(&head[..n], pos)
        });
        if let Err(e) = written {
            // Leave no part of it: the next try starts at the same place.
            let _ = file.set_len(pos);
            self.scratch = scratch;
            return Err(e);
        }
        self.scratch = scratch;
        self.appended(h, pos, meta)
    }

    /// Bookkeeping after the record `h` was written at `pos`.
    fn appended(&mut self, h: RecordHeader, pos: u64, meta: &[u8]) -> io::Result<u64> {
        let (offset, flags) = (h.offset, h.flags);
        let size = h.size();
        if self.since_index >= self.opts.index_every {
            let mut e = [0u8; IDX_ENTRY];
            e[..8].copy_from_slice(&offset.to_le_bytes());
            e[8..].copy_from_slice(&pos.to_le_bytes());
            // The index is a hint (recovery rebuilds the active one): a
            // failed write of it only costs a longer search.
            if self.active_idx.write_all(&e).is_ok() {
                self.active_mut().index.push((offset, pos));
                self.since_index = 0;
            }
        }
        self.since_index = self.since_index.saturating_add(size);
        if flags & REC_END != 0 && meta.len() == 8 {
            let number = mark_number(meta);
            let mut e = [0u8; IDX_ENTRY];
            e[..8].copy_from_slice(&(offset | IDX_MARK).to_le_bytes());
            e[8..].copy_from_slice(&number.to_le_bytes());
            // Also a hint: recovery rebuilds the active segment's from its
            // records; a closed segment's is rewritten at its roll.
            // A failed write empties the file, which recovery then finds
            // unsound and replaces by a scan, rather than miss a marker.
            if self.active_idx.write_all(&e).is_err() {
                let _ = self.active_idx.set_len(0);
            }
            self.active_mut().marks.push((offset, number));
        }
        if self.active_since.is_none() {
            self.active_since = Some(std::time::Instant::now());
        }
        let seg = self.active_mut();
        seg.bytes += size;
        seg.next += 1;
        seg.modified = SystemTime::now();
        Ok(size)
    }

    fn write_record(&self, pos: u64, head: &[u8], payload: &Payload<'_>) -> io::Result<()> {
        let file = &self.active().file;
        let (r, off, len) = match payload {
            Payload::Bytes(b) => {
                file.write_all_at(head, pos)?;
                return file.write_all_at(b, pos + head.len() as u64);
            }
            Payload::Region(r, off, len) => (r, *off, *len),
        };
        // One pwritev for header and payload; a short write goes on from
        // where it stopped.
        let total = head.len() as u64 + len;
        let mut done = 0u64;
        while done < total {
            let n = match head.get(done as usize..) {
                Some(rest) if !rest.is_empty() => {
                    r.pwritev_to(file.as_fd(), pos + done, rest, &[(off, len)])
                }
                _ => {
                    let p = done - head.len() as u64;
                    r.pwritev_to(file.as_fd(), pos + done, &[], &[(off + p, len - p)])
                }
            };
            match n {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The segment and file position of `offset`'s record, and its header.
    fn header(&mut self, offset: u64) -> io::Result<(u64, RecordHeader, u64)> {
        let (&base, seg) = self
            .segments
            .range(..=offset)
            .next_back()
            .filter(|(_, s)| offset < s.next)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "offset {offset} is not in the log (it holds {}..{})",
                        self.start_offset(),
                        self.next_offset()
                    ),
                )
            })?;
        let (mut o, mut pos) = match self.cursor {
            Some((co, cb, cp)) if cb == base && co <= offset => (co, cp),
            _ => {
                let i = seg.index.partition_point(|&(io, _)| io <= offset);
                if i == 0 {
                    (base, 0)
                } else {
                    seg.index[i - 1]
                }
            }
        };
        loop {
            let mut hb = [0u8; HEADER];
            seg.file.read_exact_at(&mut hb, pos)?;
            let h = RecordHeader::decode(&hb)
                .filter(|h| h.offset == o)
                .ok_or_else(|| {
                    invalid(format!(
                        "no sound record header for offset {o} in segment {base}"
                    ))
                })?;
            if o == offset {
                return Ok((base, h, pos));
            }
            pos += h.size();
            o += 1;
        }
    }

    /// Reads `offset`'s record: its payload into `len` bytes of `region`
    /// at `at`, checked against its checksum. Returns its header and its
    /// metadata. A record that fails its check is an error (never served).
    pub fn read_into(
        &mut self,
        offset: u64,
        region: &Region,
        at: u64,
        room: u64,
    ) -> io::Result<(RecordHeader, Vec<u8>)> {
        let (base, h, pos) = self.header(offset)?;
        if h.len > room {
            return Err(invalid(format!(
                "record {offset} has {} bytes, more than a slot",
                h.len
            )));
        }
        let seg = &self.segments[&base];
        let mut meta = vec![0u8; h.meta_len as usize];
        seg.file.read_exact_at(&mut meta, pos + HEADER as u64)?;
        let data = pos + HEADER as u64 + h.meta_len as u64;
        region.pread_from(seg.file.as_fd(), data, at, h.len)?;
        // Check what landed in the slot, not a second read of the file.
        let got = record_hash(&h.encode(), &meta, h.len, &mut self.scratch, |buf, off| {
            region
                .read_shared(at + off, buf)
                .then_some(())
                .ok_or_else(|| invalid("slot out of the pool".into()))
        })?;
        if got != h.hash {
            return Err(invalid(format!(
                "record {offset} in segment {} fails its checksum (the file is damaged); it is not served",
                self.dir.join(seg_name(base, "log")).display()
            )));
        }
        self.cursor = Some((offset + 1, base, pos + h.size()));
        Ok((h, meta))
    }

    /// After reads: asks the kernel to read the next `bytes` of the log
    /// after the last record read into the page cache in the background,
    /// so that the next reads (a replay going on) find them there instead
    /// of waiting for the disk, while the data-plane thread does other
    /// work. Only what was not asked for before.
    pub fn read_ahead(&mut self, bytes: u64) {
        let Some((_, base, pos)) = self.cursor else {
            return;
        };
        let mut left = bytes;
        for (&b, seg) in self.segments.range(base..) {
            if left == 0 {
                break;
            }
            let start = if b == base { pos } else { 0 };
            let end = seg.bytes.min(start + left).max(start);
            left -= end - start;
            // Only what was not asked for before (asks go forward).
            let from = match self.advised {
                (ab, _) if ab > b => continue,
                (ab, ap) if ab == b => start.max(ap),
                _ => start,
            };
            if end > from {
                let _ = ferry_shm::sys::advise_willneed(&seg.file, from, end - from);
                self.advised = (b, end);
            }
        }
    }

    /// Reads `offset`'s record into memory (tests, tools).
    pub fn read(&mut self, offset: u64) -> io::Result<(RecordHeader, Vec<u8>, Vec<u8>)> {
        let (base, h, pos) = self.header(offset)?;
        let seg = &self.segments[&base];
        let mut buf = vec![0u8; h.meta_len as usize + h.len as usize];
        seg.file.read_exact_at(&mut buf, pos + HEADER as u64)?;
        let (meta, payload) = buf.split_at(h.meta_len as usize);
        let got = record_hash(
            &h.encode(),
            meta,
            payload.len() as u64,
            &mut Vec::new(),
            |b, at| {
                b.copy_from_slice(&payload[at as usize..at as usize + b.len()]);
                Ok(())
            },
        )?;
        if got != h.hash {
            return Err(invalid(format!("record {offset} fails its checksum")));
        }
        self.cursor = Some((offset + 1, base, pos + h.size()));
        let payload = buf.split_off(h.meta_len as usize);
        Ok((h, buf, payload))
    }

    /// The closed segments, oldest first: (base, next offset, bytes, last
    /// written).
    pub fn closed_segments(&self) -> Vec<(u64, u64, u64, SystemTime)> {
        let n = self.segments.len();
        self.segments
            .values()
            .take(n - 1)
            .map(|s| (s.base, s.next, s.bytes, s.modified))
            .collect()
    }

    /// Takes the oldest segment (never the active one) out of the log.
    /// Returns the new start offset and the segment's files, for the caller
    /// to delete (unlinking a large file frees its page cache, which takes
    /// a while: not on the data-plane thread). A crash before they are
    /// deleted leaves them to be found, and deleted, again.
    pub fn detach_oldest(&mut self) -> Option<(u64, [PathBuf; 2])> {
        if self.segments.len() < 2 {
            return None;
        }
        let (base, seg) = self.segments.pop_first().expect("two segments");
        if self.cursor.is_some_and(|(_, b, _)| b == base) {
            self.cursor = None;
        }
        if let Some(&(_, n)) = seg.marks.last() {
            // Written before the caller deletes the segment: a crash in
            // between finds both, and the next deletion writes it again.
            // Not synced (the data-plane thread calls this): a host crash
            // may lose it, and the epochs ended there are not counted.
            self.marks_base = n;
            let path = self.dir.join("marks_base");
            if let Err(e) = write_atomic_unsynced(&path, &encode(&n)) {
                tracing::warn!(path = %path.display(), "the count of epochs ended in deleted segments was not stored: {e}");
            }
        }
        let files = [
            self.dir.join(seg_name(base, "log")),
            self.dir.join(seg_name(base, "idx")),
        ];
        Some((self.start_offset(), files))
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new
/// contents: a temporary file, synced, renamed over it, the directory
/// synced. A checksum travels with the bytes.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_state(path, bytes, true)
}

/// Like [`write_atomic`] without syncing: after a host crash the file may
/// be the old one, or one that fails its checksum (`read_atomic` refuses
/// it). For hints that recovery can do without (a log's checkpoint).
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_state(path, bytes, false)
}

fn write_state(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&MAGIC.to_le_bytes())?;
    f.write_all(&xxhash_rust::xxh3::xxh3_64(bytes).to_le_bytes())?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if sync {
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// Reads what `write_atomic` wrote; `Ok(None)` when there is no file.
pub fn read_atomic(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let b = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if b.len() < 12 || b[..4] != MAGIC.to_le_bytes() {
        return Err(invalid(format!(
            "{}: not a ferry state file",
            path.display()
        )));
    }
    let body = &b[12..];
    if xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() != b[4..12] {
        return Err(invalid(format!("{}: fails its checksum", path.display())));
    }
    Ok(Some(body.to_vec()))
}

/// A group's committed offsets, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredGroup {
    pub name: String,
    pub owner: u32,
    pub committed: Vec<u64>,
}

/// What a disk stream's directory says of it (`stream.meta`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredStream {
    pub name: String,
    pub spec: ferry_shm::proto::StreamSpec,
    /// The uid of the producer that created it; None: declared.
    pub owner: Option<u32>,
}

/// Whether a disk stream whose log in `dir` was written with `stored` can
/// be opened with `spec` (the same partitions, slots at least as large).
pub fn spec_fits(
    name: &str,
    dir: &Path,
    stored: &ferry_shm::proto::StreamSpec,
    spec: &ferry_shm::proto::StreamSpec,
) -> Result<(), String> {
    if stored.partitions != spec.partitions || stored.slot_size > spec.slot_size {
        return Err(format!(
            "disk stream {name}: its log in {} was written with partitions={} slot_size={}, and cannot be opened with partitions={} slot_size={} (use those, or move the directory away to start afresh)",
            dir.display(),
            stored.partitions,
            stored.slot_size,
            spec.partitions,
            spec.slot_size
        ));
    }
    Ok(())
}

/// What `stream.meta` in `dir` says, when there is one.
pub fn stored_stream(dir: &Path) -> io::Result<Option<StoredStream>> {
    let path = dir.join("stream.meta");
    match read_atomic(&path)? {
        Some(b) => decode(&path, &b).map(Some),
        None => Ok(None),
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("in-memory encoding")
}

pub fn decode<T: for<'a> Deserialize<'a>>(path: &Path, b: &[u8]) -> io::Result<T> {
    postcard::from_bytes(b).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests;
