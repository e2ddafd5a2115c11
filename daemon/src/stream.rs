//! Streams, partitions, consumer groups and slot ownership: the daemon's
//! bookkeeping, free of sockets and shared memory so it can be tested alone.
//!
//! A slot is in one of three states: `Free` (maybe still holding a released
//! batch that a seek can replay, until the slot is granted again), `Granted`
//! to one producer session, or `Held`: it carries a published batch that at
//! least one consumer group has not released yet (`holders` counts those
//! groups). A batch published while a stream has no group at all is held
//! for the first group that forms ("orphan" hold), so nothing published is
//! lost for want of a consumer; producers then wait for slots instead.
//!
//! For each (group, partition) the group keeps `next` (every offset from
//! there to the end is still to be delivered), `pending` (offsets below
//! `next` to deliver again: their consumer left, or a seek back asked for
//! them) and `inflight` (delivered, not yet released, to whom, and whether
//! a seek asked for it again). The three are disjoint, and the group holds
//! offset `o` (one count in its slot's `holders`) exactly when `o` is in one
//! of them. Every operation keeps them disjoint, so no operation of one
//! group can drop another group's hold (`model_tests` checks this against a
//! reference model over random interleavings).

use std::collections::{BTreeSet, VecDeque};

use crate::idhash::IdMap;

use ferry_shm::proto::{GroupStart, StreamSpec};

pub type SessionId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Free {
        retained: Option<(u32, u64)>,
    },
    Granted {
        session: SessionId,
    },
    Held {
        part: u32,
        offset: u64,
        holders: u32,
        orphan: bool,
    },
}

/// A disk stream reads back batches this far ahead of where a busy group
/// is (see `want_ahead`).
const LOAD_AHEAD: u64 = 16;

/// `Entry::slot` of an end marker: it carries no batch.
pub const NO_SLOT: u32 = u32::MAX;

/// `Entry::flags`: the payload is a typed record (passed on to consumers).
pub const ENTRY_RECORD: u16 = 1;
/// `Entry::flags`: an end marker (the producers ended the epoch here).
pub const ENTRY_END: u16 = 2;
/// `Entry::flags`, with ENTRY_END: put in while the stream had no group;
/// the first group to form starts no later than it (as it does for batches
/// published then).
pub const ENTRY_ORPHAN: u16 = 4;
/// `Entry::flags`: a disk stream's batch that could not be read back (its
/// record is damaged): skipped by every group, never delivered.
pub const ENTRY_LOST: u16 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The slot holding the batch; [`NO_SLOT`] for an end marker.
    pub slot: u32,
    /// The payload's length; an end marker's epoch number.
    pub len: u64,
    pub meta_len: u32,
    /// Published from GPU memory: the stream's mirror on this GPU holds the
    /// payload too (the host slot has a copy).
    pub device: Option<u32>,
    /// `ENTRY_*` bits.
    pub flags: u16,
    /// When it was published ([`crate::metrics::now_us`]), for one batch in
    /// [`crate::metrics::LATENCY_SAMPLE_EVERY`]; 0 for the others.
    pub stamp: u32,
}

impl Entry {
    /// The end marker of epoch `number` (the stream's count of ends of
    /// epoch, from 1; 0: read back from a log written before markers were
    /// numbered). `flags` adds to [`ENTRY_END`].
    pub fn end(number: u64, flags: u16) -> Entry {
        Entry {
            len: number,
            ..Entry::marker(ENTRY_END | flags)
        }
    }

    /// The epoch an end marker ends (see [`Entry::end`]).
    pub fn end_number(&self) -> u64 {
        self.len
    }

    /// An entry that takes no slot (a lost batch; see [`Entry::end`] for
    /// end markers).
    pub fn marker(flags: u16) -> Entry {
        Entry {
            slot: NO_SLOT,
            len: 0,
            meta_len: 0,
            device: None,
            flags,
            stamp: 0,
        }
    }

    pub fn is_end(&self) -> bool {
        self.flags & ENTRY_END != 0
    }
}

#[derive(Debug, Default)]
pub struct Partition {
    /// Offset the next published batch gets.
    pub end: u64,
    /// Offsets whose batch is still in a slot (held or retained).
    pub index: OffsetIndex,
    /// The last offset put in is an end marker.
    pub ended: bool,
    /// Offsets below this may be delivered: `end` for a memory stream; for
    /// a disk stream, what its log made as durable as the stream promises.
    pub visible: u64,
    /// A disk stream: offsets below this are in its log file (maybe not
    /// synced yet): their slots may be reused, and they are read back.
    pub written: u64,
    /// A disk stream: the lowest offset its log still holds (what is not
    /// in a slot is read back from there).
    pub floor: u64,
    /// A disk stream: the first offset put in while it had no group (the
    /// first group to form starts there by default).
    pub orphan_from: Option<u64>,
    /// Its end markers a group may still be put before (by a start, seek
    /// or restart), as (offset, epoch number), oldest first: how many
    /// epochs a group at any offset has passed here.
    pub marks: VecDeque<(u64, u64)>,
    /// The number of the last marker taken off the front of `marks`, and
    /// its offset (0 when the log's retention took it).
    pub marks_base: u64,
    pub marks_base_at: u64,
}

impl Partition {
    /// The epoch number of the last end marker before offset `o` (0:
    /// none), the epochs a group at `o` has passed in this partition, and
    /// that marker's offset.
    pub fn reached_at(&self, o: u64) -> (u64, u64) {
        match self.marks.partition_point(|&(mo, _)| mo < o) {
            0 => (self.marks_base, self.marks_base_at),
            i => (self.marks[i - 1].1, self.marks[i - 1].0),
        }
    }

    /// Forgets the markers below offset `o` (no group can be put before
    /// them any more).
    fn trim_marks(&mut self, o: u64) {
        while let Some(&(mo, n)) = self.marks.front() {
            if mo >= o {
                break;
            }
            (self.marks_base, self.marks_base_at) = (n, mo);
            self.marks.pop_front();
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct GroupPart {
    /// Offsets from here to the partition's end are still to be delivered.
    pub next: u64,
    /// Offsets below `next` to deliver (again), lowest first.
    pub pending: BTreeSet<u64>,
    /// Delivered and not yet released.
    pub inflight: IdMap<u64, Inflight>,
    pub committed: u64,
    /// The epoch number of the last end marker before the group's position
    /// here (what it passed or stopped at). At or above the group's `current`
    /// epoch, the partition has reached the end of it and delivers nothing
    /// after that marker until every partition has (see
    /// [`Stream::deliver`]).
    pub reached: u64,
    /// The offset of that marker.
    pub stop: u64,
}

impl GroupPart {
    /// The group is at (`reached`, `stop`) from `reached_at`.
    fn set_reached(&mut self, (number, offset): (u64, u64)) {
        (self.reached, self.stop) = (number, offset);
    }
}

/// A batch a member holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflight {
    pub session: SessionId,
    /// A seek asked for this offset again: on release it goes back to
    /// `pending` (the group keeps holding it) instead of being done.
    pub replay: bool,
}

impl GroupPart {
    /// The next offset this group will deliver in the partition.
    pub fn position(&self) -> u64 {
        self.pending
            .first()
            .map_or(self.next, |&o| o.min(self.next))
    }
}

#[derive(Debug)]
pub struct Group {
    pub name: String,
    /// In join order.
    pub members: Vec<SessionId>,
    /// Owner of each partition.
    pub assign: Vec<Option<SessionId>>,
    pub parts: Vec<GroupPart>,
    /// Deleted (a tombstone until a new group takes its index: sessions
    /// refer to groups by index, and a deleted group has no members).
    pub deleted: bool,
    /// Since when the group has had no member (idle expiry).
    pub empty_since: Option<std::time::Instant>,
    /// The uid that created it (set by the daemon; only it and root may
    /// join or delete it).
    pub owner: u32,
    /// Epochs this group has finished (passed the end marker of every
    /// partition); members are told of each.
    pub epoch: u64,
    /// The stream's epoch this group is in: the lowest epoch any of its
    /// partitions is in (a partition that reached the end of this one
    /// waits for the others).
    pub current: u64,
    /// The partition `deliver` starts at next: the one after the first it
    /// delivered from last time, so that a member owning several
    /// partitions gets each in turn rather than the lowest one drained
    /// first.
    next_part: u32,
    /// (member, partition): the member released a batch of a partition it
    /// no longer owns (delivered before a rebalance). Its next commit of
    /// all it owns covers that partition too: the owner's last commit may
    /// have come before the release.
    released_elsewhere: Vec<(SessionId, u32)>,
}

impl Group {
    fn rebalance(&mut self) {
        let n = self.members.len();
        for (p, a) in self.assign.iter_mut().enumerate() {
            *a = (n > 0).then(|| self.members[p % n]);
        }
    }

    /// Lowest offset of `p` this group has not released.
    pub fn low_watermark(&self, p: usize) -> u64 {
        let gp = &self.parts[p];
        let mut low = gp.next;
        if let Some(&r) = gp.pending.first() {
            low = low.min(r);
        }
        if let Some(&i) = gp.inflight.keys().min() {
            low = low.min(i);
        }
        low
    }

    /// Sets the epoch from where the partitions are (a new or restored
    /// group): the lowest epoch any of them is in; those already past its
    /// end wait for the others there.
    fn set_current(&mut self) {
        self.current = self.parts.iter().map(|gp| gp.reached).min().unwrap_or(0) + 1;
    }

    pub fn partitions_of(&self, session: SessionId) -> Vec<u32> {
        self.assign
            .iter()
            .enumerate()
            .filter(|(_, a)| **a == Some(session))
            .map(|(p, _)| p as u32)
            .collect()
    }
}

/// A descriptor the daemon must put on a consumer's completion ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub part: u32,
    pub offset: u64,
    pub entry: Entry,
}

/// A client broke the protocol; its session is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Violation(pub String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SeekError {
    #[error("partition {part} does not exist (the stream has {parts})")]
    NoPartition { part: u32, parts: u32 },
    #[error("{given} start offsets given for a stream of {parts} partitions (one per partition)")]
    StartOffsets { given: u32, parts: u32 },
    #[error("offset {offset} is past the end {end} of partition {part}")]
    PastEnd { part: u32, offset: u64, end: u64 },
    #[error("offset {offset} of partition {part} is no longer retained ({}; {})", match earliest { Some(e) => format!("the earliest retained is {e}"), None => "nothing is retained".to_string() }, if *disk { "the stream's retention_ms / retention_bytes set how much of its disk log is kept" } else { "daemon.replay_window sets how many released batches stay readable" })]
    Gone {
        part: u32,
        offset: u64,
        earliest: Option<u64>,
        /// A disk stream: its retention deleted the offset from the log.
        disk: bool,
    },
}

#[derive(Debug)]
pub struct Stream {
    id: u32,
    name: String,
    spec: StreamSpec,
    slots: Vec<Slot>,
    /// Free slots: the replay window (released batches a seek can still
    /// read) and the spare slots, which grants take first.
    free: FreeSlots,
    /// At most this many released batches stay readable for a seek (the
    /// oldest release leaves the window first). A grant takes a spare
    /// slot, most recently freed first, and only when there is none the
    /// oldest slot of the window: producers never wait for the window.
    replay_window: u32,
    parts: Vec<Partition>,
    groups: Vec<Group>,
    published: u64,
    published_bytes: u64,
    rr: u32,
    /// The pool is a cache over a log on disk (`durability.disk`): a slot
    /// holding a batch that is on disk and in no member's hands can be
    /// taken for a newer one, and is read back when a group gets to it.
    tiered: bool,
    /// A disk stream: (partition, offset) a group needs that is not in a
    /// slot (`take_loads` hands them to the daemon to read back).
    loads: Vec<(u32, u64)>,
    /// A disk stream: slots whose batches every group let go of before
    /// the log writer took them. They stay held (by no group: `holders`
    /// 0) until it has, or its bytes would be lost to the log.
    unwritten: Vec<u32>,
    /// The number of the last end of epoch (its markers carry it).
    epochs: u64,
}

/// A list of free slots: a doubly linked list threaded through
/// per-slot arrays, so that taking a given slot out (a replay holding a
/// retained batch again) costs O(1), not a scan of the list, and nothing
/// allocates after creation.
#[derive(Debug)]
pub struct FreeList {
    next: Vec<u32>,
    prev: Vec<u32>,
    linked: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

const NIL: u32 = u32::MAX;

impl FreeList {
    /// An empty list for slots `0..n`.
    pub fn empty(n: u32) -> FreeList {
        FreeList {
            next: vec![NIL; n as usize],
            prev: vec![NIL; n as usize],
            linked: vec![false; n as usize],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    /// Every slot of `n` free, in index order.
    pub fn full(n: u32) -> FreeList {
        let mut f = FreeList::empty(n);
        for s in 0..n {
            f.push_back(s);
        }
        f
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, slot: u32) -> bool {
        self.linked.get(slot as usize).copied().unwrap_or(false)
    }

    pub fn push_back(&mut self, slot: u32) {
        if self.contains(slot) {
            return;
        }
        let i = slot as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        match self.tail {
            NIL => self.head = slot,
            t => self.next[t as usize] = slot,
        }
        self.tail = slot;
        self.linked[i] = true;
        self.len += 1;
    }

    pub fn push_front(&mut self, slot: u32) {
        if self.contains(slot) {
            return;
        }
        let i = slot as usize;
        self.next[i] = self.head;
        self.prev[i] = NIL;
        match self.head {
            NIL => self.tail = slot,
            h => self.prev[h as usize] = slot,
        }
        self.head = slot;
        self.linked[i] = true;
        self.len += 1;
    }

    pub fn pop_front(&mut self) -> Option<u32> {
        let h = self.head;
        (h != NIL).then(|| {
            self.remove(h);
            h
        })
    }

    /// Takes `slot` out wherever it is (no-op when not free).
    pub fn remove(&mut self, slot: u32) {
        if !self.contains(slot) {
            return;
        }
        let i = slot as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.linked[i] = false;
        self.len -= 1;
    }

    /// The free slots, front first.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors((self.head != NIL).then_some(self.head), |&s| {
            let n = self.next[s as usize];
            (n != NIL).then_some(n)
        })
    }
}

/// The free slots of a pool, in two lists. `window`: released slots whose
/// batch is still readable for a seek (the replay window), oldest release
/// first. `spare`: free slots holding nothing anyone can ask for, most
/// recently freed first, so that a grant hands out the slot whose bytes
/// are most likely still in the caches (as a memory allocator does).
#[derive(Debug)]
pub struct FreeSlots {
    pub(crate) window: FreeList,
    pub(crate) spare: FreeList,
}

impl FreeSlots {
    fn full(n: u32) -> FreeSlots {
        FreeSlots {
            window: FreeList::empty(n),
            spare: FreeList::full(n),
        }
    }

    pub fn len(&self) -> usize {
        self.window.len() + self.spare.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, slot: u32) -> bool {
        self.window.contains(slot) || self.spare.contains(slot)
    }

    /// Released slots whose batch a seek can still read.
    pub fn retained(&self) -> usize {
        self.window.len()
    }

    fn remove(&mut self, slot: u32) {
        self.window.remove(slot);
        self.spare.remove(slot);
    }
}

/// Picks a partition from a key: a 64-bit mix, then modulo.
pub fn partition_for_key(key: u64, partitions: u32) -> u32 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % partitions as u64) as u32
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn spec(&self) -> &StreamSpec {
        &self.spec
    }

    /// Batches published into it since it was created.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// Payload bytes of those batches.
    pub fn published_bytes(&self) -> u64 {
        self.published_bytes
    }

    /// Whether a slot is free for a grant.
    pub fn has_free_slot(&self) -> bool {
        !self.free.is_empty()
            || (self.tiered && (0..self.slots.len()).any(|i| self.eviction_distance(i).is_some()))
    }

    /// Its groups by index, deleted ones included (`Group::deleted`).
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The next offset of each partition.
    pub fn end_offsets(&self) -> Vec<u64> {
        self.parts.iter().map(|p| p.end).collect()
    }

    pub fn new(id: u32, name: String, spec: StreamSpec) -> Stream {
        Stream {
            id,
            name,
            slots: vec![Slot::Free { retained: None }; spec.slot_count as usize],
            free: FreeSlots::full(spec.slot_count),
            replay_window: spec.slot_count,
            parts: (0..spec.partitions)
                .map(|_| Partition {
                    // The ring spans what the pool can hold, twice.
                    index: OffsetIndex::new(2 * spec.slot_count as usize + 64),
                    ..Partition::default()
                })
                .collect(),
            groups: Vec::new(),
            published: 0,
            published_bytes: 0,
            rr: 0,
            tiered: spec.durability.disk,
            loads: Vec::new(),
            unwritten: Vec::new(),
            epochs: 0,
            spec,
        }
    }

    /// Whether the pool is a cache over a disk log.
    pub fn tiered(&self) -> bool {
        self.tiered
    }

    /// The offset the next batch of partition `p` gets.
    pub fn partition_end(&self, p: usize) -> u64 {
        self.parts[p].end
    }

    /// Offsets of `p` below this may be delivered.
    pub fn visible(&self, p: usize) -> u64 {
        self.parts[p].visible
    }

    /// A disk stream: the lowest offset of `p` its log holds.
    pub fn floor(&self, p: usize) -> u64 {
        self.parts[p].floor
    }

    /// What offset `o` of `p` is, while it is in the index.
    pub fn entry(&self, p: usize, o: u64) -> Option<Entry> {
        self.parts[p].index.get(&o).copied()
    }

    /// A disk stream recovered from its log: partition `p` holds offsets
    /// `floor..end` on disk (none in a slot), `ended`: its last record is
    /// an end marker; `marks`: its numbered end markers, (offset, epoch
    /// number), oldest first, and `base` the number of the last one
    /// before `floor`. Before [`Stream::finish_recovery`].
    pub fn recover_partition(
        &mut self,
        p: usize,
        floor: u64,
        end: u64,
        ended: bool,
        (base, marks): (u64, Vec<(u64, u64)>),
    ) {
        let part = &mut self.parts[p];
        part.marks = marks
            .into_iter()
            .filter(|&(o, n)| o >= floor && o < end && n > base)
            .collect();
        part.marks_base = base;
        let last = part.marks.back().map_or(base, |m| m.1);
        self.epochs = self.epochs.max(last);
        let part = &mut self.parts[p];
        part.end = end;
        part.visible = end;
        part.written = end;
        part.floor = floor;
        part.ended = ended;
        part.orphan_from = (floor < end).then_some(floor);
    }

    /// With no group: where the batches kept for the first group to form
    /// start in each partition (the end where none are kept).
    pub fn orphans_from(&self) -> impl Iterator<Item = u64> + '_ {
        self.parts.iter().map(|p| p.orphan_from.unwrap_or(p.end))
    }

    /// A disk stream recovered with no group: the first group to form
    /// starts at `from` (stored by [`Stream::orphans_from`]), not at the
    /// start of the log.
    pub fn restore_orphans_from(&mut self, from: &[u64]) {
        for (part, &o) in self.parts.iter_mut().zip(from) {
            let o = o.max(part.floor);
            part.orphan_from = (o < part.end).then_some(o);
        }
    }

    /// After every partition is recovered, before groups are restored: a
    /// partition whose log lacks the marker of the last epoch that ended
    /// (a host crash took its unsynced tail, marker included, while
    /// another partition's marker was synced) gets it back at its end, so
    /// that groups do not wait at the other partitions' markers for one
    /// that will never come. Its batches before it were all of that
    /// epoch. Returns those partitions; the log writer writes the markers.
    pub fn finish_recovery(&mut self) -> Vec<u32> {
        let mut fixed = Vec::new();
        let number = self.epochs;
        for (p, part) in self.parts.iter_mut().enumerate() {
            if part.marks.back().map_or(part.marks_base, |m| m.1) >= number {
                continue;
            }
            let offset = part.end;
            part.end += 1;
            part.ended = true;
            part.index.insert(offset, Entry::end(number, 0));
            part.marks.push_back((offset, number));
            fixed.push(p as u32);
        }
        fixed
    }

    /// Restores group `name` (no members) at the committed offsets stored
    /// for it, each kept within what the log holds.
    pub fn restore_group(&mut self, name: &str, owner: u32, committed: &[u64]) {
        if self.group_index(name).is_some() || committed.len() != self.parts.len() {
            return;
        }
        let parts = committed
            .iter()
            .zip(&self.parts)
            .map(|(&c, part)| {
                let c = c.clamp(part.floor, part.end);
                let mut gp = GroupPart {
                    next: c,
                    committed: c,
                    ..GroupPart::default()
                };
                gp.set_reached(part.reached_at(c));
                gp
            })
            .collect();
        let mut group = Group {
            name: name.to_string(),
            members: Vec::new(),
            assign: vec![None; self.parts.len()],
            parts,
            deleted: false,
            empty_since: Some(std::time::Instant::now()),
            owner,
            epoch: 0,
            current: 0,
            next_part: 0,
            released_elsewhere: Vec::new(),
        };
        group.set_current();
        self.groups.push(group);
        for part in &mut self.parts {
            part.orphan_from = None;
        }
    }

    /// Partition `p`'s offsets below `upto` are durable: deliverable.
    pub fn make_visible(&mut self, p: usize, upto: u64) {
        let part = &mut self.parts[p];
        part.visible = part.visible.max(upto.min(part.written));
    }

    /// A disk stream: partition `p`'s offsets below `upto` are in the log
    /// file (their slots may be reused before they are durable). Returns
    /// whether slots came free (held only until the log had them).
    pub fn set_written(&mut self, p: usize, upto: u64) -> bool {
        let part = &mut self.parts[p];
        part.written = part.written.max(upto.min(part.end));
        let written = part.written;
        let mut freed = Vec::new();
        self.unwritten
            .retain(|&slot| match self.slots[slot as usize] {
                Slot::Held {
                    part,
                    offset,
                    holders: 0,
                    ..
                } => {
                    if part as usize == p && offset < written {
                        freed.push((slot, part, offset));
                        false
                    } else {
                        true
                    }
                }
                // Held again by a group (a seek back, a new group): its
                // release comes back here if the log still lacks it.
                _ => false,
            });
        let any = !freed.is_empty();
        for (slot, part, offset) in freed {
            self.free_released(slot, part, offset);
        }
        any
    }

    /// A disk stream's log no longer holds offsets below `floor` in
    /// partition `p` (retention). Groups behind it skip to it (what they
    /// hold in slots below it stays theirs until released). Returns how
    /// many offsets each group skipped, by group name.
    pub fn raise_floor(&mut self, p: usize, floor: u64) -> Vec<(String, u64)> {
        let mut skipped = Vec::new();
        if floor <= self.parts[p].floor {
            return skipped;
        }
        self.parts[p].floor = floor;
        self.parts[p].trim_marks(floor);
        if let Some(o) = self.parts[p].orphan_from {
            self.parts[p].orphan_from = Some(o.max(floor)).filter(|&o| o < self.parts[p].end);
        }
        self.loads
            .retain(|&(lp, lo)| lp as usize != p || lo >= floor);
        // Batches kept for a first group that will now start after them.
        self.free_orphans(|part, offset| part as usize == p && offset < floor);
        for g in 0..self.groups.len() {
            if self.groups[g].deleted {
                continue;
            }
            let gp = &self.groups[g].parts[p];
            let pending: Vec<u64> = gp.pending.range(..floor).copied().collect();
            let next = gp.next;
            let mut n = pending.len() as u64;
            for o in pending {
                self.groups[g].parts[p].pending.remove(&o);
                self.unhold(p as u32, o);
            }
            // What a member holds below it stays its own until released,
            // and does not go again (a seek back asked for it): the log
            // no longer has it. Its hold is that member's.
            let gp = &mut self.groups[g].parts[p];
            for (_, i) in gp.inflight.iter_mut().filter(|(&o, _)| o < floor) {
                i.replay = false;
            }
            if next < floor {
                n += floor - next;
                let gp = &self.groups[g].parts[p];
                let held: Vec<u64> = self.parts[p]
                    .index
                    .range(next..floor)
                    .map(|(o, _)| o)
                    .filter(|o| !gp.inflight.contains_key(o))
                    .collect();
                for o in held {
                    self.unhold(p as u32, o);
                }
                self.groups[g].parts[p].next = floor;
                let at = self.parts[p].reached_at(floor);
                self.groups[g].parts[p].set_reached(at);
            }
            let gp = &mut self.groups[g].parts[p];
            gp.committed = gp.committed.max(floor);
            if n > 0 {
                skipped.push((self.groups[g].name.clone(), n));
            }
        }
        skipped
    }

    /// Frees the slots of orphans (batches kept for the first group to
    /// form) for which `which(partition, offset)` says so.
    fn free_orphans(&mut self, which: impl Fn(u32, u64) -> bool) {
        for slot in 0..self.slots.len() {
            if let Slot::Held {
                part,
                offset,
                orphan: true,
                ..
            } = self.slots[slot]
            {
                if which(part, offset) {
                    self.free_released(slot as u32, part, offset);
                }
            }
        }
    }

    /// The offsets groups need that are not in a slot (disk streams).
    pub fn take_loads(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.loads)
    }

    /// A disk stream: asks for the first batch of `p` in
    /// `from..from + LOAD_AHEAD` (and below what is visible) that is in no
    /// slot to be read back, so that it is there when a group gets to it.
    fn want_ahead(&mut self, p: usize, from: u64) {
        let part = &self.parts[p];
        let to = (from + LOAD_AHEAD).min(part.visible);
        let missing = (from.max(part.floor)..to).find(|o| !part.index.contains_key(o));
        if let Some(o) = missing {
            if !self.loads.contains(&(p as u32, o)) {
                self.loads.push((p as u32, o));
            }
        }
    }

    /// How many live groups need offset `o` of `p` delivered (it is at or
    /// past their position, or to be redelivered).
    fn needers(&self, p: usize, o: u64) -> u32 {
        self.groups
            .iter()
            .filter(|g| !g.deleted)
            .filter(|g| {
                let gp = &g.parts[p];
                (o >= gp.next && o < self.parts[p].end) || gp.pending.contains(&o)
            })
            .count() as u32
    }

    /// Whether offset `o` of `p` is wanted but in no slot (a disk stream's
    /// batch read back from the log goes in with `restore`).
    pub fn wants(&self, p: u32, o: u64) -> bool {
        let Some(part) = self.parts.get(p as usize) else {
            return false;
        };
        o >= part.floor
            && o < part.visible
            && !part.index.contains_key(&o)
            && self.needers(p as usize, o) > 0
    }

    /// Puts a batch read back from the log into the stream: `entry.slot`
    /// (granted to the daemon) now holds offset `o` of `p`, or is
    /// [`NO_SLOT`] for a marker. Held by every group that needs it.
    pub fn restore(&mut self, p: u32, o: u64, entry: Entry) {
        let slot = entry.slot;
        self.parts[p as usize].index.insert(o, entry);
        if slot == NO_SLOT {
            return;
        }
        let holders = self.needers(p as usize, o);
        if holders == 0 {
            self.free_released(slot, p, o);
        } else {
            self.slots[slot as usize] = Slot::Held {
                part: p,
                offset: o,
                holders,
                orphan: false,
            };
        }
    }

    /// A disk stream: how soon a group will want the batch in slot `i`
    /// (how many offsets it is still to read before it), or None when the
    /// slot cannot be taken: it holds no batch, or one not yet in the log
    /// file, or one a member holds. `u64::MAX`: no live group needs it.
    fn eviction_distance(&self, i: usize) -> Option<u64> {
        let Slot::Held { part, offset, .. } = self.slots[i] else {
            return None;
        };
        let p = part as usize;
        if offset >= self.parts[p].written {
            return None;
        }
        let mut nearest = u64::MAX;
        for g in self.groups.iter().filter(|g| !g.deleted) {
            let gp = &g.parts[p];
            if gp.inflight.contains_key(&offset) {
                return None;
            }
            if gp.pending.contains(&offset) {
                nearest = 0;
            } else if offset >= gp.next {
                nearest = nearest.min(offset - gp.next);
            }
        }
        Some(nearest)
    }

    /// A disk stream with no free slot: takes out of the cache (their
    /// batches stay on disk) the batches its groups will want last, an
    /// eighth of the pool at once (at least one), so that the scan is paid
    /// once per that many grants. Returns whether any slot came free.
    fn make_room(&mut self) -> bool {
        let mut far: Vec<(u64, u32)> = (0..self.slots.len())
            .filter_map(|i| self.eviction_distance(i).map(|d| (d, i as u32)))
            .collect();
        let n = (self.slots.len() / 8).max(1).min(far.len());
        if n == 0 {
            return false;
        }
        far.select_nth_unstable_by(n - 1, |a, b| b.cmp(a));
        for &(_, slot) in &far[..n] {
            if let Slot::Held { part, offset, .. } = self.slots[slot as usize] {
                self.parts[part as usize].index.remove(&offset);
                self.slots[slot as usize] = Slot::Free { retained: None };
                self.free.spare.push_back(slot);
            }
        }
        true
    }

    /// Sets how many released batches stay readable for a seek; slots
    /// over the new window leave it at once, oldest release first.
    pub fn set_replay_window(&mut self, window: u32) {
        self.replay_window = window;
        self.trim_window();
    }

    /// Grants a free slot to `session`: the most recently freed spare
    /// slot, or, when there is none, the oldest slot of the replay window
    /// (whose batch can then no longer be replayed).
    pub fn grant(&mut self, session: SessionId) -> Option<u32> {
        let slot = match self.free.spare.pop_front() {
            Some(s) => s,
            None => match self.free.window.pop_front() {
                Some(s) => {
                    self.forget(s);
                    s
                }
                None if self.tiered && self.make_room() => self.free.spare.pop_front()?,
                None => return None,
            },
        };
        self.slots[slot as usize] = Slot::Granted { session };
        Some(slot)
    }

    /// A free slot's batch is no longer readable: out of the index.
    fn forget(&mut self, slot: u32) {
        if let Slot::Free {
            retained: Some((p, o)),
        } = self.slots[slot as usize]
        {
            self.parts[p as usize].index.remove(&o);
            self.drop_old_end_markers(p as usize);
            self.slots[slot as usize] = Slot::Free { retained: None };
        }
    }

    /// Frees `slot`, which holds batch `o` of partition `p`: into the
    /// replay window, whose oldest slots move to the spare list once it is
    /// over its size. A disk stream's batch the log writer has not taken
    /// yet stays in its slot, held by no group, until it has
    /// (`set_written`).
    fn free_released(&mut self, slot: u32, p: u32, o: u64) {
        if self.tiered && o >= self.parts[p as usize].written {
            self.slots[slot as usize] = Slot::Held {
                part: p,
                offset: o,
                holders: 0,
                orphan: false,
            };
            if !self.unwritten.contains(&slot) {
                self.unwritten.push(slot);
            }
            return;
        }
        self.slots[slot as usize] = Slot::Free {
            retained: Some((p, o)),
        };
        self.free.window.push_back(slot);
        self.trim_window();
    }

    fn trim_window(&mut self) {
        while self.free.window.len() > self.replay_window as usize {
            let Some(old) = self.free.window.pop_front() else {
                break;
            };
            self.forget(old);
            self.free.spare.push_front(old);
        }
    }

    /// End markers at the front of partition `p`'s index that no group
    /// can still reach (every group is past them): dropped, so that epochs
    /// do not grow the index.
    fn drop_old_end_markers(&mut self, p: usize) {
        // Runs with every grant: the common case (no marker in front)
        // costs one look at the index.
        while let Some((o, e)) = self.parts[p].index.first_key_value() {
            if !e.is_end()
                || o >= self.parts[p].visible
                || self
                    .groups
                    .iter()
                    .any(|g| !g.deleted && g.parts[p].position() <= o)
            {
                break;
            }
            self.parts[p].index.remove(&o);
            if !self.tiered {
                // A memory stream's seek cannot go below what its index
                // holds (a disk stream's can, down to its log's floor).
                self.parts[p].trim_marks(o + 1);
            }
        }
    }

    /// Ends the epoch: an end marker at the end of every partition. A
    /// group that reaches one waits until it has reached all of them (and
    /// delivered everything before them), then tells its members the epoch
    /// is over and goes on with what follows.
    /// An epoch with no batch in it is not marked: when every partition
    /// ends with a marker already (or is empty), this does nothing and
    /// returns false, so that ending again and again (a buggy or hostile
    /// producer) cannot grow the index, whose markers take no slot.
    pub fn end_epoch(&mut self) -> bool {
        let empty = self.parts.iter().all(|part| part.end == 0 || part.ended);
        if empty {
            return false;
        }
        let alone = self.live_groups() == 0;
        let orphan = if alone { ENTRY_ORPHAN } else { 0 };
        let tiered = self.tiered;
        self.epochs += 1;
        let number = self.epochs;
        for part in &mut self.parts {
            let offset = part.end;
            part.end += 1;
            part.ended = true;
            if !tiered {
                part.visible = part.end;
            } else if alone && part.orphan_from.is_none() {
                part.orphan_from = Some(offset);
            }
            part.index.insert(offset, Entry::end(number, orphan));
            part.marks.push_back((offset, number));
        }
        true
    }

    /// Gives back slots granted to a producer that went away unpublished.
    pub fn return_grant(&mut self, session: SessionId, slot: u32) {
        if self.slots.get(slot as usize) == Some(&Slot::Granted { session }) {
            self.slots[slot as usize] = Slot::Free { retained: None };
            self.free.spare.push_front(slot);
        }
    }

    /// Checks a publish without doing it: the slot is granted to
    /// `session`, the sizes fit.
    pub fn check_publish(
        &self,
        session: SessionId,
        slot: u32,
        len: u64,
        meta_len: u32,
    ) -> Result<(), Violation> {
        match self.slots.get(slot as usize) {
            Some(Slot::Granted { session: s }) if *s == session => {}
            Some(_) => {
                return Err(Violation(format!(
                    "publish of slot {slot}, which is not granted to it"
                )))
            }
            None => {
                return Err(Violation(format!(
                    "publish of slot {slot}, out of range (pool has {})",
                    self.spec.slot_count
                )))
            }
        }
        if len > self.spec.slot_size {
            return Err(Violation(format!(
                "publish of {len} bytes into a {}-byte slot",
                self.spec.slot_size
            )));
        }
        if meta_len > ferry_shm::layout::META_MAX {
            return Err(Violation(format!("metadata of {meta_len} bytes")));
        }
        Ok(())
    }

    /// Puts a filled slot into the stream (`device`: published from GPU
    /// memory, whose copy stays in that GPU's mirror of the pool).
    /// Everything here comes from the client's ring and is checked.
    // Each argument is one checked field of the publish descriptor.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &mut self,
        session: SessionId,
        slot: u32,
        len: u64,
        meta_len: u32,
        key: Option<u64>,
        device: Option<u32>,
        flags: u16,
    ) -> Result<(u32, u64), Violation> {
        self.check_publish(session, slot, len, meta_len)?;
        let part = match key {
            Some(k) => partition_for_key(k, self.spec.partitions),
            None => {
                let p = self.rr % self.spec.partitions;
                self.rr = self.rr.wrapping_add(1);
                p
            }
        };
        let live = self.live_groups();
        let partition = &mut self.parts[part as usize];
        let offset = partition.end;
        partition.end += 1;
        partition.ended = false;
        if !self.tiered {
            partition.visible = partition.end;
        } else if live == 0 && partition.orphan_from.is_none() {
            partition.orphan_from = Some(offset);
        }
        partition.index.insert(
            offset,
            Entry {
                slot,
                len,
                meta_len,
                device,
                flags: flags & ENTRY_RECORD,
                stamp: if offset.is_multiple_of(crate::metrics::LATENCY_SAMPLE_EVERY) {
                    crate::metrics::now_us()
                } else {
                    0
                },
            },
        );
        let orphan = live == 0;
        self.slots[slot as usize] = Slot::Held {
            part,
            offset,
            holders: if orphan { 1 } else { live as u32 },
            orphan,
        };
        self.published += 1;
        self.published_bytes += len;
        Ok((part, offset))
    }

    /// One more group holds `o` of `p` (seek back, or a new group).
    fn hold(&mut self, p: u32, o: u64) {
        let Some(e) = self.parts[p as usize].index.get(&o).copied() else {
            return;
        };
        if e.slot == NO_SLOT {
            return;
        }
        match &mut self.slots[e.slot as usize] {
            Slot::Held {
                holders, orphan, ..
            } => {
                if *orphan {
                    *orphan = false;
                } else {
                    *holders += 1;
                }
            }
            Slot::Free { .. } => {
                self.free.remove(e.slot);
                self.slots[e.slot as usize] = Slot::Held {
                    part: p,
                    offset: o,
                    holders: 1,
                    orphan: false,
                };
            }
            Slot::Granted { .. } => {}
        }
    }

    /// One group no longer holds `o` of `p`; frees the slot when none does.
    fn unhold(&mut self, p: u32, o: u64) {
        let Some(e) = self.parts[p as usize].index.get(&o).copied() else {
            return;
        };
        if e.slot == NO_SLOT {
            return;
        }
        if let Slot::Held { holders, .. } = &mut self.slots[e.slot as usize] {
            *holders -= 1;
            if *holders == 0 {
                self.free_released(e.slot, p, o);
            }
        }
    }

    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.groups
            .iter()
            .position(|g| !g.deleted && g.name == name)
    }

    /// Groups without members for at least `timeout`.
    pub fn idle_groups(&self, timeout: std::time::Duration) -> Vec<String> {
        self.groups
            .iter()
            .filter(|g| !g.deleted && g.members.is_empty())
            .filter(|g| g.empty_since.is_some_and(|t| t.elapsed() >= timeout))
            .map(|g| g.name.clone())
            .collect()
    }

    /// Groups not deleted.
    pub fn live_groups(&self) -> usize {
        self.groups.iter().filter(|g| !g.deleted).count()
    }

    /// Deletes group `name`, which must have no members. Its holds are
    /// released (freeing slots held only for it), also when it was the
    /// last group: its old batches are not handed to some unrelated group
    /// formed later (such a group can still ask for them with a start of
    /// `Earliest` while they are retained). Returns how many batches it
    /// held.
    pub fn delete_group(&mut self, name: &str) -> Result<u64, String> {
        let g = self
            .group_index(name)
            .ok_or_else(|| format!("stream {} has no group {name:?}", self.name))?;
        let members = self.groups[g].members.len();
        if members > 0 {
            return Err(format!(
                "group {name} still has {members} member(s); stop them first"
            ));
        }
        let mut held = 0u64;
        for p in 0..self.parts.len() {
            let gp = std::mem::take(&mut self.groups[g].parts[p]);
            let mut offsets: BTreeSet<u64> = gp.pending;
            offsets.extend(gp.inflight.keys().copied());
            offsets.extend(self.parts[p].index.range(gp.next..).map(|(o, _)| o));
            for o in offsets {
                if self.parts[p]
                    .index
                    .get(&o)
                    .is_some_and(|e| e.slot != NO_SLOT)
                {
                    held += 1;
                }
                self.unhold(p as u32, o);
            }
        }
        self.groups[g].deleted = true;
        Ok(held)
    }

    /// `Gone` unless every offset of `[from, to)` of partition `p` is still
    /// in the pool (a seek back, or a start, can deliver exactly those).
    fn check_retained(&self, p: usize, from: u64, to: u64) -> Result<(), SeekError> {
        if self.tiered {
            let part = &self.parts[p];
            if from >= part.floor {
                return Ok(());
            }
            return Err(SeekError::Gone {
                part: p as u32,
                offset: from,
                earliest: (part.floor < part.end).then_some(part.floor),
                disk: true,
            });
        }
        let index = &self.parts[p].index;
        if (from..to).all(|o| index.contains_key(&o)) {
            return Ok(());
        }
        Err(SeekError::Gone {
            part: p as u32,
            offset: from,
            earliest: index.keys().next(),
            disk: false,
        })
    }

    /// Where a group created now would start in partition `p`, or why it
    /// cannot start there.
    fn start_of(&self, p: usize, start: &GroupStart) -> Result<u64, SeekError> {
        let partition = &self.parts[p];
        // Batches and end markers put in while there was no group.
        let orphan = |e: &Entry| {
            if e.slot == NO_SLOT {
                e.flags & ENTRY_ORPHAN != 0
            } else {
                matches!(self.slots[e.slot as usize], Slot::Held { .. })
            }
        };
        if self.tiered {
            match start {
                GroupStart::Default if self.live_groups() == 0 => {
                    return Ok(partition
                        .orphan_from
                        .unwrap_or(partition.end)
                        .max(partition.floor))
                }
                GroupStart::Earliest => return Ok(partition.floor),
                _ => {}
            }
        }
        Ok(match start {
            // Batches published while no group existed are orphans, held
            // for the first group; with other groups present there are
            // none, and a new group starts at the end.
            GroupStart::Default if self.live_groups() == 0 => partition
                .index
                .iter()
                .find(|(_, e)| orphan(e))
                .map(|(o, _)| o)
                .unwrap_or(partition.end),
            GroupStart::Default | GroupStart::Latest => partition.end,
            GroupStart::Earliest => {
                // The lowest offset from which everything up to the end is
                // still in the pool.
                let mut s = partition.end;
                for (o, _) in partition.index.range(..partition.end).rev() {
                    if o + 1 != s {
                        break;
                    }
                    s = o;
                }
                s
            }
            GroupStart::Offsets(offsets) => {
                let parts = self.spec.partitions;
                if offsets.len() != parts as usize {
                    return Err(SeekError::StartOffsets {
                        given: offsets.len() as u32,
                        parts,
                    });
                }
                let (offset, end) = (offsets[p], partition.end);
                if offset > end {
                    return Err(SeekError::PastEnd {
                        part: p as u32,
                        offset,
                        end,
                    });
                }
                self.check_retained(p, offset, end)?;
                offset
            }
        })
    }

    /// Adds `session` to group `name` (creating the group, starting where
    /// `start` says) and rebalances. `start` is ignored when the group
    /// exists; a start that is not retained is an error and joins nothing.
    /// A new group belongs to `uid`.
    pub fn join(
        &mut self,
        name: &str,
        session: SessionId,
        uid: u32,
        start: &GroupStart,
    ) -> Result<usize, SeekError> {
        let g = match self.group_index(name) {
            Some(g) => g,
            None => {
                let nparts = self.spec.partitions as usize;
                let starts = (0..nparts)
                    .map(|p| self.start_of(p, start))
                    .collect::<Result<Vec<u64>, SeekError>>()?;
                let parts = starts
                    .iter()
                    .zip(&self.parts)
                    .map(|(&s, part)| {
                        let mut gp = GroupPart {
                            next: s,
                            committed: s,
                            ..GroupPart::default()
                        };
                        gp.set_reached(part.reached_at(s));
                        gp
                    })
                    .collect();
                let mut group = Group {
                    name: name.to_string(),
                    members: Vec::new(),
                    assign: vec![None; nparts],
                    parts,
                    deleted: false,
                    empty_since: None,
                    owner: uid,
                    epoch: 0,
                    current: 0,
                    next_part: 0,
                    released_elsewhere: Vec::new(),
                };
                group.set_current();
                // Reuse a deleted group's index, so that creating and
                // deleting groups does not grow the stream.
                let g = match self.groups.iter().position(|g| g.deleted) {
                    Some(g) => {
                        self.groups[g] = group;
                        g
                    }
                    None => {
                        self.groups.push(group);
                        self.groups.len() - 1
                    }
                };
                let first = self.live_groups() == 1;
                for (p, start) in starts.into_iter().enumerate() {
                    let offsets: Vec<u64> =
                        self.parts[p].index.range(start..).map(|(o, _)| o).collect();
                    for o in offsets {
                        self.hold(p as u32, o);
                    }
                }
                if first {
                    // Markers put in while there was no group are this
                    // group's now (or skipped by it): no later group
                    // starts at them.
                    for part in &mut self.parts {
                        part.orphan_from = None;
                        for e in part.index.values_mut() {
                            e.flags &= !ENTRY_ORPHAN;
                        }
                    }
                    // Orphans this first group did not take (it started
                    // later) were kept for it alone: free them.
                    self.free_orphans(|_, _| true);
                }
                g
            }
        };
        let group = &mut self.groups[g];
        group.members.push(session);
        group.empty_since = None;
        group.rebalance();
        Ok(g)
    }

    /// Removes `session` from group `g`: its unreleased batches are
    /// redelivered to whoever owns their partition next.
    pub fn leave(&mut self, g: usize, session: SessionId) {
        let group = &mut self.groups[g];
        for gp in &mut group.parts {
            let mine: Vec<u64> = gp
                .inflight
                .iter()
                .filter(|(_, i)| i.session == session)
                .map(|(o, _)| *o)
                .collect();
            for o in mine {
                gp.inflight.remove(&o);
                // At or past `next` (a disk stream's seek back): held
                // through `next` already.
                if o < gp.next {
                    gp.pending.insert(o);
                }
            }
        }
        group.members.retain(|&m| m != session);
        group.released_elsewhere.retain(|&(m, _)| m != session);
        if group.members.is_empty() {
            group.empty_since = Some(std::time::Instant::now());
        }
        group.rebalance();
    }

    /// Delivers to the members of group `g`: `sink(member, batch)` hands
    /// one batch over and returns false when that member cannot take more
    /// now (no credit, ring full); the batch is then kept for later. End
    /// markers are not handed over: a partition stops at one until every
    /// partition has reached its own and has nothing left to redeliver;
    /// then the group's `epoch` goes up and this returns: the caller tells
    /// the members, and delivers past the markers (the next epoch) on a
    /// later call, to members told of the end. Allocation-free: this runs
    /// on every publish and release.
    pub fn deliver(
        &mut self,
        g: usize,
        mut sink: impl FnMut(SessionId, Delivery) -> bool,
    ) -> usize {
        let mut count = 0;
        let n = self.parts.len();
        let start = self.groups[g].next_part as usize % n.max(1);
        let mut first = None;
        let current = self.groups[g].current;
        for p in (start..n).chain(0..start) {
            let Some(owner) = self.groups[g].assign[p] else {
                continue;
            };
            loop {
                let gp = &mut self.groups[g].parts[p];
                let stopped = gp.reached >= current;
                // Redeliveries before the marker it stopped at still go.
                let redeliver = gp
                    .pending
                    .first()
                    .copied()
                    .filter(|&o| !stopped || o < gp.stop);
                let (o, from_pending) = if let Some(o) = redeliver {
                    gp.pending.remove(&o);
                    (o, true)
                } else if !stopped && gp.next < self.parts[p].visible {
                    let o = gp.next;
                    if gp.inflight.contains_key(&o) {
                        // A disk stream's seek back reached a batch a
                        // member still holds: it goes again once released.
                        break;
                    }
                    gp.next += 1;
                    (o, false)
                } else {
                    break;
                };
                let Some(entry) = self.parts[p].index.get(&o).copied() else {
                    if self.tiered && o >= self.parts[p].floor {
                        // On disk, in no slot: wait for it to be read back.
                        let gp = &mut self.groups[g].parts[p];
                        if from_pending {
                            gp.pending.insert(o);
                        } else {
                            gp.next -= 1;
                        }
                        if !self.loads.contains(&(p as u32, o)) {
                            self.loads.push((p as u32, o));
                        }
                        break;
                    }
                    // A memory stream: cannot happen while the group holds
                    // `o`. Skip rather than wedge the partition.
                    continue;
                };
                if entry.is_end() {
                    // The partition stops at it: every partition is at
                    // least in the group's epoch, so the marker ends that
                    // epoch or a later one. One without a number (an old
                    // log's) ends the group's.
                    let m = match entry.end_number() {
                        0 => current,
                        m => m,
                    };
                    let gp = &mut self.groups[g].parts[p];
                    if m >= gp.reached {
                        gp.set_reached((m, o));
                    }
                    // Committed up to the marker, nothing below it out:
                    // the commit includes it (it needs no release). Else a
                    // group that read everything stays committed before it
                    // and gets the end again after a restart.
                    if !from_pending
                        && gp.committed == o
                        && gp.pending.first().is_none_or(|&x| x > o)
                        && !gp.inflight.keys().any(|&x| x < o)
                    {
                        gp.committed = o + 1;
                    }
                    continue;
                }
                if entry.flags & ENTRY_LOST != 0 {
                    continue;
                }
                if !sink(
                    owner,
                    Delivery {
                        part: p as u32,
                        offset: o,
                        entry,
                    },
                ) {
                    let gp = &mut self.groups[g].parts[p];
                    if from_pending {
                        gp.pending.insert(o);
                    } else {
                        gp.next -= 1;
                    }
                    if self.tiered && !from_pending {
                        // The member is busy with what it has: read what
                        // it gets next back from disk meanwhile.
                        self.want_ahead(p, o + 1);
                    }
                    break;
                }
                self.groups[g].parts[p].inflight.insert(
                    o,
                    Inflight {
                        session: owner,
                        replay: false,
                    },
                );
                count += 1;
                first.get_or_insert(p);
            }
        }
        // The next call starts after the partition this one served first:
        // each partition is first in turn. (Not one further per call:
        // calls that deliver nothing would skip partitions; nor after the
        // last served: a call serving two would skip every other one.)
        if let Some(f) = first {
            self.groups[g].next_part = ((f + 1) % n) as u32;
        }
        let group = &mut self.groups[g];
        let epoch_over = !group.members.is_empty()
            && group.parts.iter().all(|gp| {
                // Reached the end, and nothing before it is to go
                // again: pending, or held and asked for again by a
                // seek (it goes again once released).
                gp.reached >= current
                    && gp.pending.first().is_none_or(|&o| o > gp.stop)
                    && !gp.inflight.iter().any(|(&o, i)| i.replay && o < gp.stop)
            });
        if !epoch_over {
            return count;
        }
        // The epoch ends; partitions a seek put further on stay stopped at
        // theirs until the others get there too.
        group.epoch += 1;
        group.set_current();
        count
    }

    /// A consumer is done with (`part`, `offset`) in `slot`.
    pub fn release(
        &mut self,
        g: usize,
        session: SessionId,
        part: u32,
        offset: u64,
        slot: u32,
    ) -> Result<(), Violation> {
        let gp = self
            .groups
            .get_mut(g)
            .and_then(|grp| grp.parts.get_mut(part as usize))
            .ok_or_else(|| {
                Violation(format!("release of partition {part}, which does not exist"))
            })?;
        let Some(held) = gp
            .inflight
            .get(&offset)
            .copied()
            .filter(|i| i.session == session)
        else {
            return Err(Violation(format!(
                "release of partition {part} offset {offset}, which it does not hold (released twice?)"
            )));
        };
        let e = self.parts[part as usize].index.get(&offset).copied();
        if e.map(|e| e.slot) != Some(slot) {
            return Err(Violation(format!(
                "release of partition {part} offset {offset} names slot {slot}, which does not hold it"
            )));
        }
        gp.inflight.remove(&offset);
        let group = &mut self.groups[g];
        if group.assign[part as usize] != Some(session)
            && !group.released_elsewhere.contains(&(session, part))
        {
            group.released_elsewhere.push((session, part));
        }
        let gp = &mut group.parts[part as usize];
        if held.replay {
            // A seek asked for it again: the group keeps its hold (through
            // `next` when a disk stream's seek moved that back past it).
            if offset < gp.next {
                gp.pending.insert(offset);
            }
        } else {
            self.unhold(part, offset);
        }
        Ok(())
    }

    /// Records a committed offset. `part == None`: every partition this
    /// member owns, and every one it released a batch of since it lost it
    /// to a rebalance, at the group's low watermark.
    pub fn commit(
        &mut self,
        g: usize,
        session: SessionId,
        part: Option<u32>,
        offset: u64,
    ) -> Result<(), Violation> {
        match part {
            None => {
                // Allocation-free: automatic commits run with releases.
                let group = &mut self.groups[g];
                for p in 0..group.assign.len() {
                    if group.assign[p] == Some(session) {
                        let low = group.low_watermark(p);
                        group.parts[p].committed = low;
                    }
                }
                // Partitions it released batches of after a rebalance.
                let mut i = 0;
                while i < group.released_elsewhere.len() {
                    let (m, p) = group.released_elsewhere[i];
                    if m != session {
                        i += 1;
                        continue;
                    }
                    let low = group.low_watermark(p as usize);
                    let gp = &mut group.parts[p as usize];
                    gp.committed = gp.committed.max(low);
                    group.released_elsewhere.swap_remove(i);
                }
                Ok(())
            }
            Some(p) => {
                let end = self.parts.get(p as usize).map(|x| x.end).ok_or_else(|| {
                    Violation(format!("commit of partition {p}, which does not exist"))
                })?;
                if offset > end {
                    return Err(Violation(format!(
                        "commit of offset {offset} past the end {end} of partition {p}"
                    )));
                }
                self.groups[g].parts[p as usize].committed = offset;
                Ok(())
            }
        }
    }

    /// Moves group `g`'s position in `part` to `offset`: every offset from
    /// there on is delivered (again), everything before it is skipped.
    /// Back (replay) only while those batches are still in their slots.
    /// Batches the group's members hold stay theirs until released; those
    /// at or past `offset` are then delivered again.
    pub fn seek(&mut self, g: usize, part: u32, offset: u64) -> Result<(), SeekError> {
        let parts = self.spec.partitions;
        let end = self
            .parts
            .get(part as usize)
            .map(|p| p.end)
            .ok_or(SeekError::NoPartition { part, parts })?;
        if offset > end {
            return Err(SeekError::PastEnd { part, offset, end });
        }
        let p = part as usize;
        let next = self.groups[g].parts[p].next;
        self.check_retained(p, offset, next)?;
        // Skipped: pending offsets before `offset`.
        let skipped: Vec<u64> = self.groups[g].parts[p]
            .pending
            .range(..offset)
            .copied()
            .collect();
        for o in skipped {
            self.groups[g].parts[p].pending.remove(&o);
            self.unhold(part, o);
        }
        for (o, i) in self.groups[g].parts[p].inflight.iter_mut() {
            i.replay = *o >= offset;
        }
        // The partition is in the epoch of its new position. Sought past
        // the end of the group's epoch, it waits there for the others, as
        // if it had got there by itself. Sought back into an earlier epoch,
        // the group is in that epoch again: the others wait for it to get
        // to that epoch's end, which ends the epoch again (a replay
        // replays its ends of epoch).
        let at = self.parts[p].reached_at(offset);
        let group = &mut self.groups[g];
        group.parts[p].set_reached(at);
        group.current = group.current.min(at.0 + 1);
        if offset < next && self.tiered {
            // Replay from disk, however long: `next` moves back. What is
            // pending in [offset, next) is held through `next` now; what
            // a member holds goes again once released (`deliver` waits).
            let gp = &mut self.groups[g].parts[p];
            let back: Vec<u64> = gp.pending.range(offset..).copied().collect();
            for o in &back {
                gp.pending.remove(o);
            }
            let rehold: Vec<u64> = self.parts[p]
                .index
                .range(offset..next)
                .map(|(o, _)| o)
                .filter(|o| {
                    let gp = &self.groups[g].parts[p];
                    !gp.inflight.contains_key(o) && !back.contains(o)
                })
                .collect();
            for o in rehold {
                self.hold(part, o);
            }
            self.groups[g].parts[p].next = offset;
        } else if offset < next {
            // Replay: what the group no longer holds in [offset, next) is
            // held again and pending; `next` stays, keeping the sets disjoint.
            for o in offset..next {
                let gp = &self.groups[g].parts[p];
                if gp.pending.contains(&o) || gp.inflight.contains_key(&o) {
                    continue;
                }
                self.hold(part, o);
                self.groups[g].parts[p].pending.insert(o);
            }
        } else {
            // Skip: [next, offset) was held only through `next` (only
            // what is in a slot counts a hold).
            let held: Vec<u64> = self.parts[p]
                .index
                .range(next..offset)
                .map(|(o, _)| o)
                .collect();
            for o in held {
                self.unhold(part, o);
            }
            self.groups[g].parts[p].next = offset;
        }
        Ok(())
    }

    /// How many batches in slots group `g` still holds (to deliver, in
    /// flight, or to redeliver).
    pub fn held_by(&self, g: usize) -> u64 {
        let group = &self.groups[g];
        let mut n = 0u64;
        for (p, gp) in group.parts.iter().enumerate() {
            let index = &self.parts[p].index;
            let has_slot = |o: &u64| index.get(o).is_some_and(|e| e.slot != NO_SLOT);
            n += gp.inflight.keys().filter(|o| has_slot(o)).count() as u64;
            n += gp.pending.iter().filter(|o| has_slot(o)).count() as u64;
            n += index
                .range(gp.next..)
                .filter(|(_, e)| e.slot != NO_SLOT)
                .count() as u64;
        }
        n
    }

    /// Slots held for the first group to form (published with no group).
    pub fn orphans(&self) -> u32 {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Held { orphan: true, .. }))
            .count() as u32
    }

    /// Who holds the pool's slots, for people: "group a (30, no member),
    /// 2 for the first group to form".
    pub fn describe_holders(&self) -> String {
        let mut parts: Vec<String> = self
            .groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.deleted)
            .map(|(i, g)| {
                let members = match g.members.len() {
                    0 => "no member".to_string(),
                    1 => "1 member".to_string(),
                    n => format!("{n} members"),
                };
                format!("group {} ({}, {members})", g.name, self.held_by(i))
            })
            .collect();
        let orphans = self.orphans();
        if orphans > 0 {
            parts.push(format!("{orphans} kept for the first group to form"));
        }
        if parts.is_empty() {
            "nobody".into()
        } else {
            parts.join(", ")
        }
    }

    /// Slots by state: (free, granted, held).
    pub fn slot_counts(&self) -> (u32, u32, u32) {
        let mut c = (0, 0, 0);
        for s in &self.slots {
            match s {
                Slot::Free { .. } => c.0 += 1,
                Slot::Granted { .. } => c.1 += 1,
                Slot::Held { .. } => c.2 += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(parts: u32, slots: u32) -> Stream {
        Stream::new(
            0,
            "s".into(),
            StreamSpec {
                durability: Default::default(),
                partitions: parts,
                slot_size: 100,
                slot_count: slots,
            },
        )
    }

    fn publish(s: &mut Stream, n: usize) -> Vec<(u32, u64)> {
        (0..n)
            .map(|_| {
                let slot = s.grant(1).expect("free slot");
                s.publish(1, slot, 10, 0, None, None, 0).unwrap()
            })
            .collect()
    }

    fn take_all(s: &mut Stream, g: usize) -> Vec<(SessionId, Delivery)> {
        let mut out = Vec::new();
        s.deliver(g, |m, d| {
            out.push((m, d));
            true
        });
        out
    }

    /// A member owning several partitions with one credit at a time (it
    /// releases each batch before the next is delivered) gets them in
    /// turn, not the lowest partition drained first (a user trial saw a
    /// partition starve behind a busy one).
    #[test]
    fn a_member_with_several_partitions_gets_each_in_turn() {
        let mut s = stream(4, 64);
        let g = s.join("g", 10, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 32); // round-robin: 8 per partition
        let mut order = Vec::new();
        for _ in 0..16 {
            // Calls with no credit in between (the daemon makes them, on
            // other events) must not skip partitions.
            for _ in 0..3 {
                s.deliver(g, |_, _| false);
            }
            let mut got = None;
            s.deliver(g, |_, d| {
                if got.is_some() {
                    return false;
                }
                got = Some((d.part, d.offset, d.entry.slot));
                true
            });
            let (p, o, slot) = got.expect("a batch");
            s.release(g, 10, p, o, slot).unwrap();
            order.push(p);
        }
        for w in order.chunks(4) {
            let mut w = w.to_vec();
            w.sort_unstable();
            assert_eq!(w, [0, 1, 2, 3], "each partition once in every 4: {order:?}");
        }
        // Two credits a call: each call serves two partitions, and none is
        // skipped over the calls.
        let mut per = [0u32; 4];
        for _ in 0..8 {
            let mut got = Vec::new();
            s.deliver(g, |_, d| {
                if got.len() == 2 {
                    return false;
                }
                got.push((d.part, d.offset, d.entry.slot));
                true
            });
            for (p, o, slot) in got {
                s.release(g, 10, p, o, slot).unwrap();
                per[p as usize] += 1;
            }
        }
        assert_eq!(per, [4, 4, 4, 4], "two credits a call");
        check(&s);
    }

    /// Slot accounting: every slot is exactly free, granted or held, and
    /// holders never exceed the number of groups.
    fn check(s: &Stream) {
        let (f, gr, h) = s.slot_counts();
        assert_eq!(f + gr + h, s.spec.slot_count);
        assert_eq!(f as usize, s.free.len());
        for (i, slot) in s.slots.iter().enumerate() {
            if let Slot::Held { holders, .. } = slot {
                // 0: a disk stream's batch kept for its log writer.
                let kept = *holders == 0 && s.unwritten.contains(&(i as u32));
                assert!((*holders >= 1 || kept) && *holders as usize <= s.groups.len().max(1));
            }
        }
    }

    #[test]
    fn each_batch_goes_to_one_member_and_every_group() {
        let mut s = stream(4, 64);
        let a = s.join("g1", 10, 0, &GroupStart::Default).unwrap();
        s.join("g1", 11, 0, &GroupStart::Default).unwrap();
        let b = s.join("g2", 20, 0, &GroupStart::Default).unwrap();
        let published = publish(&mut s, 40);
        let got1 = take_all(&mut s, a);
        let got2 = take_all(&mut s, b);
        let mut o1: Vec<_> = got1.iter().map(|(_, d)| (d.part, d.offset)).collect();
        let mut o2: Vec<_> = got2.iter().map(|(_, d)| (d.part, d.offset)).collect();
        o1.sort();
        o2.sort();
        let mut all = published.clone();
        all.sort();
        assert_eq!(o1, all, "group 1 sees every batch once");
        assert_eq!(o2, all, "group 2 sees every batch once");
        assert!(got1.iter().any(|(m, _)| *m == 10) && got1.iter().any(|(m, _)| *m == 11));
        // Slots stay held until both groups release.
        for (m, d) in &got1 {
            s.release(a, *m, d.part, d.offset, d.entry.slot).unwrap();
        }
        assert_eq!(s.slot_counts().2, 40);
        for (m, d) in &got2 {
            s.release(b, *m, d.part, d.offset, d.entry.slot).unwrap();
        }
        assert_eq!(s.slot_counts(), (64, 0, 0));
        check(&s);
    }

    #[test]
    fn double_release_and_foreign_release_are_violations() {
        let mut s = stream(1, 8);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 1);
        let d = take_all(&mut s, g)[0].1;
        assert!(
            s.release(g, 2, d.part, d.offset, d.entry.slot).is_err(),
            "not its batch"
        );
        assert!(
            s.release(g, 1, d.part, d.offset, d.entry.slot + 1).is_err(),
            "wrong slot"
        );
        s.release(g, 1, d.part, d.offset, d.entry.slot).unwrap();
        assert!(
            s.release(g, 1, d.part, d.offset, d.entry.slot).is_err(),
            "twice"
        );
        assert!(s.release(g, 1, 7, 0, 0).is_err(), "no such partition");
        check(&s);
    }

    #[test]
    fn publish_checks_slot_ownership_and_size() {
        let mut s = stream(1, 4);
        let slot = s.grant(1).unwrap();
        assert!(s.publish(2, slot, 1, 0, None, None, 0).is_err());
        assert!(s.publish(1, 99, 1, 0, None, None, 0).is_err());
        assert!(s.publish(1, slot, 101, 0, None, None, 0).is_err());
        assert!(s.publish(1, slot, 1, 257, None, None, 0).is_err());
        assert!(s.publish(1, slot, 100, 256, None, None, 0).is_ok());
        assert!(
            s.publish(1, slot, 1, 0, None, None, 0).is_err(),
            "already published"
        );
    }

    #[test]
    fn leaving_member_batches_are_redelivered_to_the_rest() {
        let mut s = stream(2, 16);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        s.join("g", 2, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 8);
        let first = take_all(&mut s, g);
        let of1: Vec<_> = first
            .iter()
            .filter(|(m, _)| *m == 1)
            .map(|(_, d)| *d)
            .collect();
        assert!(!of1.is_empty());
        s.leave(g, 1);
        let again = take_all(&mut s, g);
        assert!(again.iter().all(|(m, _)| *m == 2));
        let mut re: Vec<_> = again.iter().map(|(_, d)| (d.part, d.offset)).collect();
        let mut want: Vec<_> = of1.iter().map(|d| (d.part, d.offset)).collect();
        re.sort();
        want.sort();
        assert_eq!(re, want);
        check(&s);
    }

    #[test]
    fn batches_without_any_group_wait_for_the_first_group() {
        let mut s = stream(1, 4);
        publish(&mut s, 4);
        assert!(s.grant(1).is_none(), "pool full: producers must wait");
        let g = s.join("late", 5, 0, &GroupStart::Default).unwrap();
        let got = take_all(&mut s, g);
        assert_eq!(got.len(), 4);
        for (m, d) in got {
            s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
        }
        assert_eq!(s.slot_counts(), (4, 0, 0));
    }

    #[test]
    fn credit_limits_delivery_and_full_sink_puts_back() {
        let mut s = stream(1, 16);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 10);
        let mut n = 0;
        s.deliver(g, |_, _| {
            if n == 3 {
                return false; // no credit left
            }
            n += 1;
            true
        });
        assert_eq!(n, 3);
        let mut seen = Vec::new();
        s.deliver(g, |_, d| {
            if seen.len() == 2 {
                return false;
            }
            seen.push(d.offset);
            true
        });
        assert_eq!(seen, vec![3, 4]);
        let rest = take_all(&mut s, g);
        assert_eq!(
            rest.first().unwrap().1.offset,
            5,
            "refused batch is delivered next"
        );
    }

    #[test]
    fn grants_reuse_the_most_recently_freed_slot_outside_the_replay_window() {
        // Window 0: a release goes back on top, and the next grant takes it.
        let mut s = stream(1, 8);
        s.set_replay_window(0);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 3);
        let got = take_all(&mut s, g);
        for (m, d) in &got {
            s.release(g, *m, d.part, d.offset, d.entry.slot).unwrap();
        }
        let last = got.last().unwrap().1.entry.slot;
        assert_eq!(s.grant(1), Some(last), "the slot released last comes first");
        assert!(
            matches!(s.seek(g, 0, 2), Err(SeekError::Gone { .. })),
            "nothing is kept for replay with a window of 0"
        );
        check(&s);

        // Window 2: the two latest releases stay readable; grants take
        // spare slots first (the release that left the window first among
        // them), and the window's oldest slot only when nothing else is free.
        let mut s = stream(1, 4);
        s.set_replay_window(2);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 4);
        let got = take_all(&mut s, g);
        for (m, d) in &got {
            s.release(g, *m, d.part, d.offset, d.entry.slot).unwrap();
        }
        let slot_of = |o: usize| got[o].1.entry.slot;
        assert_eq!(s.free.retained(), 2);
        assert!(s.seek(g, 0, 1).is_err(), "offset 1 left the window");
        // Offsets 0 and 1 left the window, 1 last: it is reused first.
        assert_eq!(s.grant(1), Some(slot_of(1)));
        assert_eq!(s.grant(1), Some(slot_of(0)));
        s.seek(g, 0, 2).unwrap();
        let again: Vec<u64> = take_all(&mut s, g).iter().map(|(_, d)| d.offset).collect();
        assert_eq!(again, vec![2, 3], "the window replays exactly");
        for (m, d) in take_all(&mut s, g) {
            s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
        }
        check(&s);
        // Shrinking the window lets its oldest batches go at once.
        let mut s = stream(1, 4);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 3);
        for (m, d) in take_all(&mut s, g) {
            s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
        }
        s.seek(g, 0, 0).unwrap();
        take_all(&mut s, g)
            .into_iter()
            .for_each(|(m, d)| s.release(g, m, d.part, d.offset, d.entry.slot).unwrap());
        s.set_replay_window(1);
        assert!(s.seek(g, 0, 1).is_err());
        s.seek(g, 0, 2).unwrap();
        check(&s);
    }

    #[test]
    fn seek_back_replays_retained_batches_exactly() {
        let mut s = stream(1, 8);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 4);
        for (m, d) in take_all(&mut s, g) {
            s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
        }
        s.seek(g, 0, 1).unwrap();
        let replay: Vec<u64> = take_all(&mut s, g).iter().map(|(_, d)| d.offset).collect();
        assert_eq!(replay, vec![1, 2, 3]);
        assert_eq!(s.slot_counts().2, 3, "replayed batches are held again");
        check(&s);
        // Too far back once the slots are reused.
        let mut s = stream(1, 2);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        for _ in 0..3 {
            publish(&mut s, 1);
            for (m, d) in take_all(&mut s, g) {
                s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
            }
        }
        assert!(matches!(
            s.seek(g, 0, 0),
            Err(SeekError::Gone {
                earliest: Some(1),
                ..
            })
        ));
        assert!(matches!(s.seek(g, 0, 9), Err(SeekError::PastEnd { .. })));
        assert!(matches!(
            s.seek(g, 3, 0),
            Err(SeekError::NoPartition { .. })
        ));
    }

    #[test]
    fn seek_forward_skips_and_frees() {
        let mut s = stream(1, 8);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 5);
        s.seek(g, 0, 3).unwrap();
        let got: Vec<u64> = take_all(&mut s, g).iter().map(|(_, d)| d.offset).collect();
        assert_eq!(got, vec![3, 4]);
        assert_eq!(s.slot_counts().2, 2);
        check(&s);
    }

    /// A member releases a batch of a partition a rebalance gave to
    /// another member after that one's last commit: its own commit covers
    /// the partition (a CI run of the DataLoader test saw a lag of 2 left
    /// behind by a worker that lost its partitions as others joined).
    #[test]
    fn a_release_after_a_rebalance_is_committed_by_its_member() {
        let mut s = stream(2, 8);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 2); // one per partition, both to member 1
        let held = take_all(&mut s, g);
        assert_eq!(held.len(), 2);
        s.join("g", 2, 0, &GroupStart::Default).unwrap(); // partition 1 to member 2
        assert_eq!(s.groups[g].assign[1], Some(2));
        s.commit(g, 2, None, 0).unwrap();
        assert_eq!(s.groups[g].parts[1].committed, 0, "member 1 still holds it");
        for (m, d) in held {
            s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
        }
        s.commit(g, 1, None, 0).unwrap();
        assert_eq!(s.groups[g].parts[0].committed, 1);
        assert_eq!(s.groups[g].parts[1].committed, 1, "its release, its commit");
        assert!(s.groups[g].released_elsewhere.is_empty());
    }

    #[test]
    fn commit_all_records_low_watermark() {
        let mut s = stream(1, 8);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 4);
        let got = take_all(&mut s, g);
        let d1 = got[1].1;
        let d0 = got[0].1;
        s.release(g, 1, d1.part, d1.offset, d1.entry.slot).unwrap();
        s.commit(g, 1, None, 0).unwrap();
        assert_eq!(s.groups[g].parts[0].committed, 0, "offset 0 still out");
        s.release(g, 1, d0.part, d0.offset, d0.entry.slot).unwrap();
        s.commit(g, 1, None, 0).unwrap();
        assert_eq!(s.groups[g].parts[0].committed, 2);
        assert!(s.commit(g, 1, Some(0), 99).is_err());
    }

    #[test]
    fn deleting_an_abandoned_group_frees_its_slots_or_keeps_them_for_the_next() {
        let mut s = stream(1, 4);
        let a = s.join("a", 1, 0, &GroupStart::Default).unwrap();
        let b = s.join("b", 2, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 4);
        for (m, d) in take_all(&mut s, a) {
            s.release(a, m, d.part, d.offset, d.entry.slot).unwrap();
        }
        let _ = take_all(&mut s, b);
        assert!(s.delete_group("b").unwrap_err().contains("member"));
        s.leave(b, 2);
        assert!(s.grant(9).is_none(), "b holds every slot");
        assert_eq!(s.delete_group("b").unwrap(), 4);
        assert_eq!(s.slot_counts().0, 4, "slots held only for b are free");
        assert!(s.delete_group("b").is_err(), "gone");
        check(&s);
        // The last group: its unreleased batches are not handed to an
        // unrelated later group, unless it asks for them (earliest).
        publish(&mut s, 2);
        s.leave(a, 1);
        assert_eq!(s.delete_group("a").unwrap(), 2);
        assert_eq!(s.slot_counts().2, 0, "freed (retained for replay)");
        let c = s.join("c", 3, 0, &GroupStart::Default).unwrap();
        assert_eq!(take_all(&mut s, c).len(), 0);
        let d = s.join("d", 4, 0, &GroupStart::Earliest).unwrap();
        let got: Vec<u64> = take_all(&mut s, d).iter().map(|(_, d)| d.offset).collect();
        assert_eq!(
            got,
            vec![2, 3, 4, 5],
            "every batch still in the (4-slot) pool"
        );
        check(&s);
    }

    #[test]
    fn start_positions() {
        let mut s = stream(2, 8);
        publish(&mut s, 4); // orphans: 2 per partition
                            // Latest as the first group: the orphans are freed, not kept.
        let l = s.join("latest", 1, 0, &GroupStart::Latest).unwrap();
        assert_eq!(s.slot_counts().2, 0);
        publish(&mut s, 2);
        assert_eq!(take_all(&mut s, l).len(), 2);
        // Default with a group present: from now on only.
        let d = s.join("default", 2, 0, &GroupStart::Default).unwrap();
        assert!(take_all(&mut s, d).is_empty());
        // Offsets: one per partition, retained or at the end.
        let o = s
            .join("offsets", 3, 0, &GroupStart::Offsets(vec![1, 3]))
            .unwrap();
        let mut got: Vec<(u32, u64)> = take_all(&mut s, o)
            .iter()
            .map(|(_, d)| (d.part, d.offset))
            .collect();
        got.sort();
        assert_eq!(got, vec![(0, 1), (0, 2)]);
        assert!(matches!(
            s.join("x", 4, 0, &GroupStart::Offsets(vec![0])),
            Err(SeekError::StartOffsets { given: 1, parts: 2 })
        ));
        assert!(matches!(
            s.join("x", 4, 0, &GroupStart::Offsets(vec![0, 9])),
            Err(SeekError::PastEnd { .. })
        ));
        assert!(
            s.group_index("x").is_none(),
            "a refused start creates nothing"
        );
        check(&s);
        // Default as the first group: takes the orphans.
        let mut s = stream(1, 8);
        publish(&mut s, 3);
        let f = s.join("first", 1, 0, &GroupStart::Default).unwrap();
        assert_eq!(take_all(&mut s, f).len(), 3);
    }

    fn publish_to(s: &mut Stream, p: u32) -> u64 {
        let parts = s.spec.partitions;
        let key = (0u64..)
            .find(|&k| partition_for_key(k, parts) == p)
            .unwrap();
        let slot = s.grant(1).expect("free slot");
        s.publish(1, slot, 10, 0, Some(key), None, 0).unwrap().1
    }

    /// Delivers and releases until nothing more comes: what came, in
    /// order, and the group's count of ends of epoch after each batch.
    fn drain_group(s: &mut Stream, g: usize) -> Vec<(u32, u64, u64)> {
        let mut got = Vec::new();
        for _ in 0..16 {
            for (m, d) in take_all(s, g) {
                s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
                got.push((d.part, d.offset, s.groups[g].epoch));
            }
        }
        got
    }

    /// The design problem stop 19 left: a seek past end markers in one
    /// partition. The markers were not numbered, so the group waited at
    /// the other partition's first marker for one the sought partition
    /// would never meet again, and once the producers stopped ending
    /// epochs the other partition's last batch was never delivered.
    #[test]
    fn a_seek_past_end_markers_does_not_hold_the_other_partitions_back() {
        let mut s = stream(2, 16);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish_to(&mut s, 0);
        assert!(s.end_epoch()); // marker 1: p0 offset 1, p1 offset 0
        publish_to(&mut s, 0);
        assert!(s.end_epoch()); // marker 2: p0 offset 3, p1 offset 1
        let last = publish_to(&mut s, 0);
        s.seek(g, 0, last).unwrap();
        let p1 = publish_to(&mut s, 1);
        let got: Vec<(u32, u64)> = drain_group(&mut s, g)
            .iter()
            .map(|&(p, o, _)| (p, o))
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got.contains(&(1, p1)) && got.contains(&(0, last)),
            "{got:?}"
        );
        assert_eq!(s.groups[g].epoch, 2, "both ends of epoch, once each");
    }

    /// A partition sought past the end of the group's epoch waits there
    /// until the others get there too: its next epoch's batches do not
    /// come before this epoch's end.
    #[test]
    fn a_partition_sought_into_the_next_epoch_waits_for_the_others() {
        let mut s = stream(2, 16);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        let a = publish_to(&mut s, 1);
        assert!(s.end_epoch()); // p0 offset 0, p1 offset 1
        let b = publish_to(&mut s, 0);
        s.seek(g, 0, b).unwrap();
        let first: Vec<(u32, u64)> = take_all(&mut s, g)
            .iter()
            .map(|(_, d)| (d.part, d.offset))
            .collect();
        assert_eq!(first, vec![(1, a)], "epoch 1 first, alone");
        assert_eq!(s.groups[g].epoch, 1);
        let second: Vec<(u32, u64)> = take_all(&mut s, g)
            .iter()
            .map(|(_, d)| (d.part, d.offset))
            .collect();
        assert_eq!(second, vec![(0, b)]);
    }

    /// A seek back over batches a member still holds, then the end of the
    /// epoch: the end waits until they went again (a user trial saw the
    /// end come first and the replayed batches after it, in the next
    /// epoch).
    #[test]
    fn the_end_of_an_epoch_waits_for_batches_a_seek_asked_for_again() {
        let mut s = stream(1, 8);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 2);
        let held = take_all(&mut s, g);
        assert_eq!(held.len(), 2);
        s.seek(g, 0, 0).unwrap();
        assert!(s.end_epoch());
        assert!(take_all(&mut s, g).is_empty());
        assert_eq!(s.groups[g].epoch, 0, "not before the replay");
        for (m, d) in held {
            s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
        }
        let again: Vec<u64> = take_all(&mut s, g).iter().map(|(_, d)| d.offset).collect();
        assert_eq!(again, vec![0, 1]);
        assert_eq!(s.groups[g].epoch, 1, "then the end");
    }

    /// A group that released everything before an end marker and passed it
    /// is committed past it: after a restart it does not get that end
    /// again (a user trial saw an empty epoch then), and its lag is 0.
    #[test]
    fn passing_an_end_marker_commits_it_when_everything_before_was() {
        let mut s = stream(1, 8);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 2);
        for (m, d) in take_all(&mut s, g) {
            s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
        }
        s.commit(g, 1, None, 0).unwrap();
        assert_eq!(s.groups[g].parts[0].committed, 2);
        assert!(s.end_epoch());
        take_all(&mut s, g);
        assert_eq!(s.groups[g].epoch, 1);
        assert_eq!(s.groups[g].parts[0].committed, 3, "past the marker");
        // With a batch still out, the marker is not committed past.
        publish(&mut s, 1);
        let out = take_all(&mut s, g);
        assert!(s.end_epoch());
        take_all(&mut s, g);
        assert_eq!(s.groups[g].parts[0].committed, 3);
        let (m, d) = out[0];
        s.release(g, m, d.part, d.offset, d.entry.slot).unwrap();
        s.commit(g, 1, None, 0).unwrap();
        assert_eq!(
            s.groups[g].parts[0].committed, 5,
            "the release commits both"
        );
    }

    /// Seeking every partition back to the start replays the batches and
    /// the ends of epoch between them, in the same order.
    #[test]
    fn a_replay_replays_the_ends_of_epoch_too() {
        let mut s = stream(2, 32);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 4);
        assert!(s.end_epoch());
        publish(&mut s, 4);
        assert!(s.end_epoch());
        publish(&mut s, 2);
        let first = drain_group(&mut s, g);
        assert_eq!(first.len(), 10);
        assert_eq!(s.groups[g].epoch, 2);
        // One partition first: the other waits for it at the end of the
        // epoch it was sought back into.
        s.seek(g, 0, 0).unwrap();
        assert_eq!(s.groups[g].current, 1);
        s.seek(g, 1, 0).unwrap();
        let again = drain_group(&mut s, g);
        let strip = |v: &[(u32, u64, u64)]| -> Vec<(u32, u64, u64)> {
            let mut v: Vec<_> = v.to_vec();
            // Within an epoch the partitions interleave as credit allows:
            // compare each epoch's set.
            v.sort_by_key(|&(p, o, e)| (e, p, o));
            v
        };
        let shifted: Vec<(u32, u64, u64)> = again.iter().map(|&(p, o, e)| (p, o, e - 2)).collect();
        assert_eq!(
            strip(&shifted),
            strip(&first),
            "same batches in the same epochs"
        );
        assert_eq!(s.groups[g].epoch, 4, "each replayed end told again");
    }

    /// Recovery: a partition whose log lost the last epoch's marker (a host
    /// crash took its unsynced tail) gets it back at its end, numbered as
    /// the other partitions' marker.
    #[test]
    fn recovery_puts_back_a_marker_a_crash_took_from_one_partition() {
        let mut s = Stream::new(
            0,
            "d".into(),
            StreamSpec {
                durability: ferry_shm::proto::Durability {
                    disk: true,
                    ..Default::default()
                },
                partitions: 2,
                slot_size: 100,
                slot_count: 8,
            },
        );
        // p0: batches 0..3, marker 1 at 3, one batch after it; p1 lost
        // its marker 1 with its tail (it has batches 0..2 only).
        s.recover_partition(0, 0, 5, false, (0, vec![(3, 1)]));
        s.recover_partition(1, 0, 2, false, (0, vec![]));
        assert_eq!(s.finish_recovery(), vec![1]);
        assert_eq!(s.partition_end(1), 3);
        let e = s.entry(1, 2).unwrap();
        assert!(e.is_end() && e.end_number() == 1);
        assert!(s.finish_recovery().is_empty(), "once");
        // A partition whose markers retention deleted counts them.
        let mut t = Stream::new(1, "e".into(), s.spec().clone());
        t.recover_partition(0, 0, 5, false, (0, vec![(3, 1)]));
        t.recover_partition(1, 4, 6, false, (1, vec![]));
        assert!(t.finish_recovery().is_empty());
    }

    #[test]
    fn end_markers_end_the_epoch_for_the_whole_group() {
        let mut s = stream(2, 16);
        let g = s.join("g", 1, 0, &GroupStart::Default).unwrap();
        s.join("g", 2, 0, &GroupStart::Default).unwrap();
        publish(&mut s, 4);
        s.end_epoch();
        publish(&mut s, 2); // the next epoch
                            // Partition 1's member has no credit: partition 0 waits at its
                            // marker, the epoch is not over, epoch-2 batches are not given.
        let mut got = Vec::new();
        s.deliver(g, |m, d| {
            if d.part == 1 {
                return false;
            }
            got.push((m, d));
            true
        });
        assert_eq!(got.len(), 2, "partition 0's epoch-1 batches only");
        assert_eq!(s.groups[g].epoch, 0);
        let mut rest = take_all(&mut s, g);
        assert_eq!(s.groups[g].epoch, 1, "every partition reached its marker");
        assert_eq!(
            rest.len(),
            2,
            "partition 1's epoch 1; it stops at the end of the epoch"
        );
        let epoch2 = take_all(&mut s, g);
        assert_eq!(s.groups[g].epoch, 1);
        let offsets: Vec<u64> = epoch2.iter().map(|(_, d)| d.offset).collect();
        assert_eq!(offsets, vec![3, 3], "after the markers at offset 2");
        rest.extend(epoch2);
        assert!(
            rest.iter().all(|(_, d)| !d.entry.is_end()),
            "markers are never handed out"
        );
        // Released and reused: the markers leave the index.
        for (m, d) in got.iter().chain(rest.iter()) {
            s.release(g, *m, d.part, d.offset, d.entry.slot).unwrap();
        }
        publish(&mut s, 16);
        assert!(s
            .parts
            .iter()
            .all(|p| p.index.values().all(|e| !e.is_end())));
        check(&s);
        // Markers put in while there was no group: the first group starts
        // no later than them, also in a partition that got no batch.
        let mut s = stream(4, 8);
        publish(&mut s, 3);
        s.end_epoch();
        let f = s.join("first", 1, 0, &GroupStart::Default).unwrap();
        assert_eq!(take_all(&mut s, f).len(), 3);
        assert_eq!(s.groups[f].epoch, 1, "the first group reaches every marker");
        publish(&mut s, 1);
        assert!(s.end_epoch());
        s.leave(f, 1);
        s.delete_group("first").unwrap();
        let later = s.join("later", 2, 0, &GroupStart::Default).unwrap();
        assert!(take_all(&mut s, later).is_empty());
        assert_eq!(
            s.groups[later].epoch, 0,
            "markers from a group's time are not a later group's"
        );
        // An epoch without a batch is not marked: ending again and again
        // does not grow the index (markers take no slot).
        let mut s = stream(2, 4);
        assert!(!s.end_epoch(), "nothing published yet");
        publish(&mut s, 1);
        assert!(s.end_epoch());
        for _ in 0..1000 {
            assert!(!s.end_epoch());
        }
        assert_eq!(s.parts.iter().map(|p| p.index.len()).sum::<usize>(), 3);
        let h = s.join("h", 1, 0, &GroupStart::Earliest).unwrap();
        assert_eq!(take_all(&mut s, h).len(), 1);
        assert_eq!(s.groups[h].epoch, 1, "the retained markers end an epoch");
    }

    #[test]
    fn free_list_keeps_order_and_removes_anywhere() {
        let mut f = FreeList::full(5);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        f.remove(2);
        f.remove(0);
        f.remove(4);
        f.remove(4); // not free: no-op
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![1, 3]);
        f.push_back(4);
        f.push_front(0);
        f.push_back(3); // already free: no-op
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![0, 1, 3, 4]);
        assert_eq!(
            (f.len(), f.pop_front(), f.pop_front()),
            (4, Some(0), Some(1))
        );
        f.remove(4);
        f.remove(3);
        assert!(f.is_empty() && f.pop_front().is_none());
        f.push_front(2);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn keys_pick_partitions_stably() {
        let mut s = stream(8, 64);
        s.join("g", 1, 0, &GroupStart::Default).unwrap();
        let a = s.grant(1).unwrap();
        let (pa, _) = s.publish(1, a, 1, 0, Some(42), None, 0).unwrap();
        let b = s.grant(1).unwrap();
        let (pb, _) = s.publish(1, b, 1, 0, Some(42), None, 0).unwrap();
        assert_eq!(pa, pb);
        let spread: std::collections::HashSet<u32> =
            (0..64).map(|k| partition_for_key(k, 8)).collect();
        assert!(spread.len() >= 6);
    }
}

#[cfg(test)]
mod model_tests;

mod index;
pub use index::OffsetIndex;
