//! Model-based property test of the stream state machine: random
//! interleavings of grant, publish, producer death, join, leave, deliver,
//! release (honest and forged), commit, seek and group delete over several
//! groups, each step checked against a small reference model:
//!
//! - every published batch a group owes (not yet released, or replayed by
//!   its own seek) sits in a held slot whose bytes are still that batch's;
//! - a slot is held by exactly as many groups as owe its batch, and free
//!   or granted only when nobody does;
//! - no operation by one group changes what another group owes;
//! - after draining, every group received every batch it owed.
//!
//! "Bytes" are modelled by the slot's content: the (partition, offset) the
//! last publish wrote there, erased when the slot is granted again or the
//! stream says it left the replay window (which must never hold more than
//! its size, nor ever drop a batch somebody owes).
//!
//! The same model runs over a disk stream (its pool a cache over the log),
//! with the daemon's side played by more operations: the log writer takes
//! a partition's next batches from their slots (which must still hold
//! them), the syncer makes them durable, read-back serves what groups need
//! from the log into granted slots, and ferryd restarts from the log and
//! the groups' commits. There a batch owed may be on disk only (never one
//! not yet written), a delivered batch is always durable, and after a
//! restart every group owes exactly what the log holds from its commit on.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;

const PRODUCERS: u8 = 2;
const GROUPS: u8 = 3;
const MEMBERS: u8 = 3;
const PARTS: u32 = 2;
const SLOTS: u32 = 8;

#[derive(Debug, Clone)]
enum Op {
    Grant(u8),
    Publish {
        producer: u8,
        pick: u8,
        key: Option<u8>,
    },
    ProducerDies(u8),
    Join {
        group: u8,
        member: u8,
        /// 0: default, 1: earliest, 2: latest (for a group this creates).
        start: u8,
    },
    Leave {
        group: u8,
        member: u8,
    },
    Deliver {
        group: u8,
        credit: u8,
    },
    Release {
        group: u8,
        pick: u8,
    },
    ForgedRelease {
        group: u8,
        pick: u8,
        twice: bool,
    },
    CommitAll {
        group: u8,
        member: u8,
    },
    Commit {
        group: u8,
        member: u8,
        part: u8,
        offset: u8,
    },
    Seek {
        group: u8,
        member: u8,
        part: u8,
        offset: u8,
    },
    DeleteGroup(u8),
    /// Every producer said the epoch is over: an end marker in every
    /// partition (unless each already ends with one).
    EndEpoch,
    /// Disk streams: the log writer takes up to `n` more batches of `part`.
    Write {
        part: u8,
        n: u8,
    },
    /// Disk streams: what is written of `part` is synced (durable).
    Sync {
        part: u8,
    },
    /// Disk streams: batches groups need that are in no slot are read back.
    Load,
    /// Disk streams: ferryd restarts from its log and the stored commits.
    Restart,
    /// Disk streams: strict retention deletes `part`'s log below `upto`
    /// (at most what is written); groups behind skip to it.
    Retain {
        part: u8,
        upto: u8,
    },
}

fn op(tiered: bool) -> BoxedStrategy<Op> {
    if !tiered {
        return memory_op().boxed();
    }
    prop_oneof![
        14 => memory_op(),
        3 => (0..PARTS as u8, 0u8..4).prop_map(|(part, n)| Op::Write { part, n }),
        2 => (0..PARTS as u8).prop_map(|part| Op::Sync { part }),
        2 => Just(Op::Load),
        1 => Just(Op::Restart),
        1 => (0..PARTS as u8, any::<u8>()).prop_map(|(part, upto)| Op::Retain { part, upto }),
    ]
    .boxed()
}

fn memory_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PRODUCERS).prop_map(Op::Grant),
        3 => (0..PRODUCERS, any::<u8>(), proptest::option::of(0u8..4))
            .prop_map(|(producer, pick, key)| Op::Publish { producer, pick, key }),
        1 => (0..PRODUCERS).prop_map(Op::ProducerDies),
        2 => (0..GROUPS, 0..MEMBERS, 0u8..3)
            .prop_map(|(group, member, start)| Op::Join { group, member, start }),
        1 => (0..GROUPS, 0..MEMBERS).prop_map(|(group, member)| Op::Leave { group, member }),
        3 => (0..GROUPS, 0u8..4).prop_map(|(group, credit)| Op::Deliver { group, credit }),
        3 => (0..GROUPS, any::<u8>()).prop_map(|(group, pick)| Op::Release { group, pick }),
        1 => (0..GROUPS, any::<u8>(), any::<bool>())
            .prop_map(|(group, pick, twice)| Op::ForgedRelease { group, pick, twice }),
        1 => (0..GROUPS, 0..MEMBERS).prop_map(|(group, member)| Op::CommitAll { group, member }),
        1 => (0..GROUPS, 0..MEMBERS, 0u8..3, any::<u8>())
            .prop_map(|(group, member, part, offset)| Op::Commit { group, member, part, offset }),
        2 => (0..GROUPS, 0..MEMBERS, 0u8..3, any::<u8>())
            .prop_map(|(group, member, part, offset)| Op::Seek { group, member, part, offset }),
        1 => (0..GROUPS).prop_map(Op::DeleteGroup),
        2 => Just(Op::EndEpoch),
    ]
}

type Batch = (u32, u64);

#[derive(Debug, Default)]
struct ModelGroup {
    /// Index in `Stream::groups`.
    index: usize,
    members: Vec<SessionId>,
    /// Batches this group must still deliver or has not released.
    owed: BTreeSet<Batch>,
    /// Delivered, unreleased: to whom, and whether a seek asked for it
    /// again (then it stays owed after its release).
    inflight: HashMap<Batch, (SessionId, bool)>,
}

#[derive(Debug)]
struct Model {
    s: Stream,
    /// A disk stream: `written` of each partition are in the log file,
    /// `durable` synced.
    tiered: bool,
    written: Vec<u64>,
    durable: Vec<u64>,
    /// The lowest offset of each partition the log still holds.
    floor: Vec<u64>,
    /// What each slot's bytes are: the batch last published into it, or
    /// None once it was granted again (the producer overwrites it).
    content: Vec<Option<Batch>>,
    slot_of: HashMap<Batch, u32>,
    end: Vec<u64>,
    granted: Vec<Vec<u32>>,
    /// Live groups by model name.
    groups: HashMap<u8, ModelGroup>,
    /// Published while no group existed: held for the first group.
    orphans: BTreeSet<Batch>,
    /// End markers (offsets that are no batch), with their epoch number.
    markers: BTreeMap<Batch, u64>,
    epochs: u64,
}

fn producer_sid(p: u8) -> SessionId {
    100 + p as SessionId
}
fn member_sid(g: u8, m: u8) -> SessionId {
    1000 + 10 * g as SessionId + m as SessionId
}

/// The session the daemon reads batches back from the log as.
const DAEMON: SessionId = SessionId::MAX;

impl Model {
    fn new(window: u32) -> Model {
        Model::with(window, false)
    }

    fn with(window: u32, tiered: bool) -> Model {
        let spec = StreamSpec {
            durability: ferry_shm::proto::Durability {
                disk: tiered,
                ..Default::default()
            },
            partitions: PARTS,
            slot_size: 64,
            slot_count: SLOTS,
        };
        let mut s = Stream::new(0, "m".into(), spec);
        s.set_replay_window(window);
        Model {
            s,
            tiered,
            written: vec![0; PARTS as usize],
            durable: vec![0; PARTS as usize],
            floor: vec![0; PARTS as usize],
            content: vec![None; SLOTS as usize],
            slot_of: HashMap::new(),
            end: vec![0; PARTS as usize],
            granted: vec![Vec::new(); PRODUCERS as usize],
            groups: HashMap::new(),
            orphans: BTreeSet::new(),
            markers: BTreeMap::new(),
            epochs: 0,
        }
    }

    fn is_marker(&self, p: u32, o: u64) -> bool {
        self.markers.contains_key(&(p, o))
    }

    /// Offset `o` of `p` counts for a start or seek that needs everything
    /// from it on in memory: its batch is readable, or it is a marker the
    /// stream still has.
    fn in_memory(&self, p: u32, o: u64) -> bool {
        self.readable((p, o)) || (self.is_marker(p, o) && self.s.entry(p as usize, o).is_some())
    }

    /// Group `group` and the session of its `member`, when that member
    /// has joined it (operations by non-members are skipped).
    fn member(&self, group: u8, member: u8) -> Option<(usize, SessionId)> {
        let sid = member_sid(group, member);
        let g = self.groups.get(&group)?;
        g.members.contains(&sid).then_some((g.index, sid))
    }

    fn readable(&self, b: Batch) -> bool {
        self.slot_of
            .get(&b)
            .is_some_and(|&s| self.content[s as usize] == Some(b))
    }

    /// Groups (and the orphan pool) owing `b`.
    fn owers(&self, b: Batch) -> usize {
        self.groups.values().filter(|g| g.owed.contains(&b)).count()
    }

    fn owed_at_all(&self, b: Batch) -> bool {
        self.owers(b) > 0 || self.orphans.contains(&b)
    }

    /// A disk stream: `b` is in the log and the stream no longer counts on
    /// `slot` for it (it was taken out of the cache).
    fn only_on_disk(&self, b: Batch, slot: u32) -> bool {
        self.tiered
            && b.1 < self.written[b.0 as usize]
            && self
                .s
                .entry(b.0 as usize, b.1)
                .is_none_or(|e| e.slot != slot)
    }

    /// `slot` was just granted: nothing in it may still be needed from it.
    fn check_granted(&self, slot: u32) -> Result<(), TestCaseError> {
        if let Some(b) = self.content[slot as usize] {
            prop_assert!(
                !self.owed_at_all(b) || self.only_on_disk(b, slot),
                "slot {slot} granted while batch {b:?} in it is still owed"
            );
            if self.tiered {
                prop_assert!(
                    b.1 < self.written[b.0 as usize],
                    "slot {slot} granted before the log got its batch {b:?}"
                );
            }
        }
        prop_assert!(!self.granted.iter().any(|g| g.contains(&slot)));
        Ok(())
    }

    /// A batch somebody owes: where the stream's index says it is (a slot
    /// still holding it), or on disk.
    fn check_present(&self, b: Batch, who: &str) -> Result<(), TestCaseError> {
        if !self.tiered {
            prop_assert!(
                self.readable(b),
                "{who} owes {b:?} but its slot holds other bytes"
            );
            return Ok(());
        }
        match self.s.entry(b.0 as usize, b.1) {
            Some(e) => prop_assert_eq!(
                self.content.get(e.slot as usize).copied().flatten(),
                Some(b),
                "{} owes {:?}, whose slot {} holds other bytes",
                who,
                b,
                e.slot
            ),
            None => prop_assert!(
                b.1 < self.written[b.0 as usize] && b.1 >= self.floor[b.0 as usize],
                "{who} owes {b:?}, which is neither in a slot nor in the log"
            ),
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.apply(op)?;
        // Batches the stream let go of (out of the replay window) are no
        // longer readable; only unowed ones may go.
        let mut retained = 0;
        for slot in 0..SLOTS as usize {
            match self.s.slots[slot] {
                Slot::Free { retained: None } => {
                    if let Some(b) = self.content[slot].take() {
                        prop_assert!(
                            !self.owed_at_all(b) || self.only_on_disk(b, slot as u32),
                            "batch {b:?} left the replay window while owed"
                        );
                    }
                }
                Slot::Free { retained: Some(_) } => retained += 1,
                _ => {}
            }
        }
        prop_assert!(
            retained <= self.s.replay_window,
            "{retained} batches retained, window {}",
            self.s.replay_window
        );
        prop_assert_eq!(retained as usize, self.s.free.retained());
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Grant(p) => {
                let sid = producer_sid(p);
                let free_in_model = (0..SLOTS).any(|slot| {
                    let held = self.content[slot as usize].is_some_and(|b| {
                        self.owed_at_all(b)
                            // Not yet in the log: the writer reads it there.
                            || (self.tiered && b.1 >= self.written[b.0 as usize])
                    });
                    !held && !self.granted.iter().any(|g| g.contains(&slot))
                });
                match self.s.grant(sid) {
                    Some(slot) => {
                        self.check_granted(slot)?;
                        self.content[slot as usize] = None;
                        self.granted[p as usize].push(slot);
                    }
                    None => prop_assert!(!free_in_model, "no grant although a slot is free"),
                }
            }
            Op::Publish {
                producer,
                pick,
                key,
            } => {
                let g = &mut self.granted[producer as usize];
                if g.is_empty() {
                    return Ok(());
                }
                let slot = g.remove(pick as usize % g.len());
                let (part, offset) = self
                    .s
                    .publish(
                        producer_sid(producer),
                        slot,
                        10,
                        0,
                        key.map(u64::from),
                        None,
                        0,
                    )
                    .map_err(|v| TestCaseError::fail(v.0))?;
                if let Some(k) = key {
                    prop_assert_eq!(part, partition_for_key(k as u64, PARTS));
                }
                prop_assert_eq!(offset, self.end[part as usize], "offsets count up");
                self.end[part as usize] += 1;
                let b = (part, offset);
                self.content[slot as usize] = Some(b);
                self.slot_of.insert(b, slot);
                if self.groups.is_empty() {
                    self.orphans.insert(b);
                } else {
                    for g in self.groups.values_mut() {
                        g.owed.insert(b);
                    }
                }
            }
            Op::ProducerDies(p) => {
                for slot in std::mem::take(&mut self.granted[p as usize]) {
                    self.s.return_grant(producer_sid(p), slot);
                }
            }
            Op::Join {
                group,
                member,
                start,
            } => {
                let sid = member_sid(group, member);
                if self
                    .groups
                    .get(&group)
                    .is_some_and(|g| g.members.contains(&sid))
                {
                    return Ok(());
                }
                let new = !self.groups.contains_key(&group);
                let owed = if !new {
                    BTreeSet::new()
                } else if start == 1 {
                    // Earliest: from the lowest offset from which every
                    // batch up to the end is still readable (a disk
                    // stream: all of it, from its log).
                    let mut owed = BTreeSet::new();
                    for p in 0..PARTS {
                        let mut o = self.end[p as usize];
                        let low = self.floor[p as usize];
                        while o > low && (self.tiered || self.in_memory(p, o - 1)) {
                            o -= 1;
                        }
                        owed.extend(
                            (o..self.end[p as usize])
                                .filter(|&o| !self.is_marker(p, o))
                                .map(|o| (p, o)),
                        );
                    }
                    if self.groups.is_empty() {
                        self.orphans.clear();
                    }
                    owed
                } else if start == 0 && self.groups.is_empty() {
                    // Default, first group: the orphans (batches published
                    // while there was no group).
                    std::mem::take(&mut self.orphans)
                } else {
                    // Latest, or default with other groups: nothing yet.
                    // Orphans (only when no group exists) stay unowned
                    // then: a latest group does not take them.
                    if self.groups.is_empty() {
                        self.orphans.clear();
                    }
                    BTreeSet::new()
                };
                let how = [
                    GroupStart::Default,
                    GroupStart::Earliest,
                    GroupStart::Latest,
                ];
                let index = self
                    .s
                    .join(&format!("g{group}"), sid, 0, &how[start as usize % 3])
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let g = self.groups.entry(group).or_insert_with(|| ModelGroup {
                    index,
                    owed,
                    ..ModelGroup::default()
                });
                prop_assert_eq!(g.index, index);
                g.members.push(sid);
            }
            Op::Leave { group, member } => {
                let Some((_, sid)) = self.member(group, member) else {
                    return Ok(());
                };
                let g = self.groups.get_mut(&group).unwrap();
                self.s.leave(g.index, sid);
                g.members.retain(|&m| m != sid);
                g.inflight.retain(|_, (m, _)| *m != sid);
            }
            Op::Deliver { group, credit } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return Ok(());
                };
                let mut got = Vec::new();
                self.s.deliver(g.index, |m, d| {
                    if got.len() >= credit as usize {
                        return false;
                    }
                    got.push((m, d));
                    true
                });
                for (m, d) in got {
                    let b = (d.part, d.offset);
                    prop_assert!(g.members.contains(&m), "delivered to non-member {m}");
                    prop_assert!(
                        g.owed.contains(&b),
                        "delivered {b:?}, which it does not owe"
                    );
                    prop_assert!(
                        !g.inflight.contains_key(&b),
                        "{b:?} delivered while still in flight"
                    );
                    prop_assert!(
                        !self.tiered || b.1 < self.durable[b.0 as usize],
                        "{b:?} delivered before it was durable"
                    );
                    prop_assert_eq!(
                        self.content[d.entry.slot as usize],
                        Some(b),
                        "delivered {:?} from slot {} holding other bytes",
                        b,
                        d.entry.slot
                    );
                    g.inflight.insert(b, (m, false));
                }
            }
            Op::Release { group, pick } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return Ok(());
                };
                if g.inflight.is_empty() {
                    return Ok(());
                }
                let mut keys: Vec<Batch> = g.inflight.keys().copied().collect();
                keys.sort();
                let b = keys[pick as usize % keys.len()];
                let (m, again) = g.inflight.remove(&b).unwrap();
                let slot = self.slot_of[&b];
                self.s
                    .release(g.index, m, b.0, b.1, slot)
                    .map_err(|v| TestCaseError::fail(format!("honest release refused: {}", v.0)))?;
                if !again {
                    g.owed.remove(&b);
                }
            }
            Op::ForgedRelease { group, pick, twice } => {
                let Some(g) = self.groups.get(&group) else {
                    return Ok(());
                };
                let Some(&m) = g.members.first() else {
                    return Ok(());
                };
                let published: Vec<Batch> = self.slot_of.keys().copied().collect();
                if published.is_empty() {
                    return Ok(());
                }
                let mut published = published;
                published.sort();
                let b = published[pick as usize % published.len()];
                let slot = self.slot_of[&b];
                let res = if twice {
                    // Not in flight with this member: released already, or never delivered.
                    if g.inflight.get(&b).is_some_and(|(x, _)| *x == m) {
                        return Ok(());
                    }
                    self.s.release(g.index, m, b.0, b.1, slot)
                } else {
                    self.s.release(g.index, m, b.0, b.1, (slot + 1) % SLOTS)
                };
                prop_assert!(res.is_err(), "forged release of {b:?} accepted");
            }
            Op::CommitAll { group, member } => {
                let Some((gi, sid)) = self.member(group, member) else {
                    return Ok(());
                };
                self.s
                    .commit(gi, sid, None, 0)
                    .map_err(|v| TestCaseError::fail(v.0))?;
                let g = &self.groups[&group];
                for p in self.s.groups[gi].partitions_of(sid) {
                    let low = g
                        .owed
                        .iter()
                        .filter(|b| b.0 == p)
                        .map(|b| b.1)
                        .min()
                        .unwrap_or(self.end[p as usize]);
                    // It may stay before end markers the group has not
                    // got to yet (they are owed no delivery).
                    let c = self.s.groups[gi].parts[p as usize].committed;
                    prop_assert!(
                        c <= low && (c..low).all(|o| self.is_marker(p, o)),
                        "commit {} of partition {} is not its low watermark {}",
                        c,
                        p,
                        low
                    );
                }
            }
            Op::Commit {
                group,
                member,
                part,
                offset,
            } => {
                let Some((gi, sid)) = self.member(group, member) else {
                    return Ok(());
                };
                let end = self.end.get(part as usize).copied();
                let offset = offset as u64 % (end.unwrap_or(0) + 2);
                let res = self.s.commit(gi, sid, Some(part as u32), offset);
                prop_assert_eq!(res.is_ok(), end.is_some_and(|e| offset <= e));
            }
            Op::Seek {
                group,
                member,
                part,
                offset,
            } => {
                let Some((gi, _)) = self.member(group, member) else {
                    return Ok(());
                };
                let Some(&end) = self.end.get(part as usize) else {
                    prop_assert!(self.s.seek(gi, part as u32, 0).is_err());
                    return Ok(());
                };
                let p = part as u32;
                let x = offset as u64 % (end + 2);
                let readable = if self.tiered {
                    x >= self.floor[p as usize]
                } else {
                    (x..end).all(|o| self.in_memory(p, o))
                };
                let res = self.s.seek(gi, p, x);
                let g = self.groups.get_mut(&group).unwrap();
                if x > end || !readable {
                    prop_assert!(res.is_err(), "seek to {x} of {end} accepted");
                    return Ok(());
                }
                res.map_err(|e| TestCaseError::fail(format!("seek refused: {e}")))?;
                // Before `x`: skipped, except what is in flight (owed until
                // released, then done). From `x` on: owed again.
                let inflight = &g.inflight;
                g.owed
                    .retain(|b| b.0 != p || b.1 >= x || inflight.contains_key(b));
                let markers = &self.markers;
                for o in (x..end).filter(|&o| !markers.contains_key(&(p, o))) {
                    g.owed.insert((p, o));
                }
                for (b, (_, again)) in g.inflight.iter_mut() {
                    if b.0 == p {
                        *again = b.1 >= x;
                    }
                }
            }
            Op::DeleteGroup(group) => {
                let Some(g) = self.groups.get(&group) else {
                    let name = format!("g{group}");
                    prop_assert!(self.s.delete_group(&name).is_err());
                    return Ok(());
                };
                let res = self.s.delete_group(&format!("g{group}"));
                if !g.members.is_empty() {
                    prop_assert!(res.is_err(), "deleted a group with members");
                    return Ok(());
                }
                res.map_err(TestCaseError::fail)?;
                // Its holds go, also when it was the last group: a later
                // group does not inherit them.
                self.groups.remove(&group);
            }
            Op::Write { part, n } => {
                if !self.tiered {
                    return Ok(());
                }
                let p = part as usize % PARTS as usize;
                let upto = (self.written[p] + n as u64).min(self.end[p]);
                for o in self.written[p]..upto {
                    let b = (p as u32, o);
                    let e = self.s.entry(p, o);
                    prop_assert!(
                        e.is_some(),
                        "{b:?} left the index before the log writer got to it"
                    );
                    let e = e.unwrap();
                    if let Some(&n) = self.markers.get(&b) {
                        prop_assert!(
                            e.is_end() && e.end_number() == n,
                            "{:?} is marker {} in the model, {:?} in the stream",
                            b,
                            n,
                            e
                        );
                        continue;
                    }
                    let slot = e.slot;
                    prop_assert_eq!(
                        self.content.get(slot as usize).copied().flatten(),
                        Some(b),
                        "the log would get other bytes for {:?} (slot {})",
                        b,
                        slot
                    );
                }
                self.written[p] = upto;
                self.s.set_written(p, upto);
            }
            Op::Sync { part } => {
                if !self.tiered {
                    return Ok(());
                }
                let p = part as usize % PARTS as usize;
                self.durable[p] = self.written[p];
                self.s.make_visible(p, self.written[p]);
            }
            Op::Load => {
                if !self.tiered {
                    return Ok(());
                }
                for (p, first) in self.s.take_loads() {
                    // The wanted batch and the one after it, as the daemon
                    // reads ahead.
                    for o in first..first + 2 {
                        if !self.s.wants(p, o) {
                            if o == first {
                                continue;
                            }
                            break;
                        }
                        prop_assert!(
                            o < self.written[p as usize] && o >= self.floor[p as usize],
                            "read-back of {:?}, which the log does not hold",
                            (p, o)
                        );
                        let Some(slot) = self.s.grant(DAEMON) else {
                            break;
                        };
                        if let Some(&n) = self.markers.get(&(p, o)) {
                            // As the daemon does: a slot to read into,
                            // given back when the record is a marker.
                            self.s.return_grant(DAEMON, slot);
                            self.s.restore(p, o, Entry::end(n, 0));
                            continue;
                        }
                        self.check_granted(slot)?;
                        self.content[slot as usize] = Some((p, o));
                        self.slot_of.insert((p, o), slot);
                        let e = Entry {
                            slot,
                            len: 10,
                            meta_len: 0,
                            device: None,
                            flags: 0,
                            stamp: 0,
                        };
                        self.s.restore(p, o, e);
                    }
                }
            }
            Op::EndEpoch => {
                let empty = (0..PARTS).all(|p| {
                    self.end[p as usize] == 0 || self.is_marker(p, self.end[p as usize] - 1)
                });
                let ended = self.s.end_epoch();
                prop_assert_eq!(
                    ended,
                    !empty,
                    "end_epoch with every partition ended or empty: {}",
                    empty
                );
                if ended {
                    self.epochs += 1;
                    for p in 0..PARTS {
                        self.markers.insert((p, self.end[p as usize]), self.epochs);
                        self.end[p as usize] += 1;
                    }
                }
            }
            Op::Restart => {
                if !self.tiered {
                    return Ok(());
                }
                self.restart();
            }
            Op::Retain { part, upto } => {
                if !self.tiered {
                    return Ok(());
                }
                let p = part as usize % PARTS as usize;
                let floor = upto as u64 % (self.written[p] + 1);
                self.s.raise_floor(p, floor);
                if floor <= self.floor[p] {
                    return self.check(); // the log is already shorter
                }
                self.floor[p] = floor;
                // Behind it: skipped, except what a member holds (its own
                // until released).
                let gone = |b: &Batch| b.0 as usize == p && b.1 < floor;
                for g in self.groups.values_mut() {
                    let inflight = &g.inflight;
                    g.owed.retain(|b| !gone(b) || inflight.contains_key(b));
                    for (b, (_, again)) in g.inflight.iter_mut() {
                        if gone(b) {
                            *again = false;
                        }
                    }
                }
                self.orphans.retain(|b| !gone(b));
            }
        }
        self.check()
    }

    /// ferryd restarts (killed: what was not written is gone) from its
    /// log and the commits stored for each group.
    fn restart(&mut self) {
        let mut s = Stream::new(0, "m".into(), self.s.spec().clone());
        s.set_replay_window(self.s.replay_window);
        // A crash loses what was not written, markers included.
        let (written, floor) = (self.written.clone(), self.floor.clone());
        // What the log keeps of the markers retention deleted: the last
        // one's number.
        let bases: Vec<u64> = (0..PARTS)
            .map(|p| {
                self.markers
                    .range((p, 0)..(p, floor[p as usize]))
                    .next_back()
                    .map_or(0, |(_, &n)| n)
            })
            .collect();
        self.markers
            .retain(|&(p, o), _| o < written[p as usize] && o >= floor[p as usize]);
        for (p, &base) in bases.iter().enumerate() {
            let (floor, w) = (self.floor[p], self.written[p]);
            let marks: Vec<(u64, u64)> = self
                .markers
                .range((p as u32, floor)..(p as u32, w))
                .map(|(&(_, o), &n)| (o, n))
                .collect();
            let ended = w > 0 && self.is_marker(p as u32, w - 1);
            s.recover_partition(p, floor, w, ended, (base, marks));
        }
        // New ends of epoch are numbered on from the last one retained.
        self.epochs = bases
            .iter()
            .chain(self.markers.values())
            .copied()
            .max()
            .unwrap_or(0);
        // Partitions that lost the last epoch's marker get it back at
        // their end (unwritten yet).
        let mut end = self.written.clone();
        for p in s.finish_recovery() {
            self.markers.insert((p, end[p as usize]), self.epochs);
            end[p as usize] += 1;
        }
        let mut groups = HashMap::new();
        for (&name, g) in &self.groups {
            let committed: Vec<u64> = self.s.groups[g.index]
                .parts
                .iter()
                .map(|gp| gp.committed)
                .collect();
            s.restore_group(&format!("g{name}"), 0, &committed);
            let index = s.group_index(&format!("g{name}")).unwrap();
            // From its commit, everything the log holds.
            let floor = &self.floor;
            let owed = (0..PARTS)
                .flat_map(|p| {
                    let w = self.written[p as usize];
                    let from = committed[p as usize].clamp(floor[p as usize], w);
                    (from..w).map(move |o| (p, o))
                })
                .filter(|b| !self.markers.contains_key(b))
                .collect();
            groups.insert(
                name,
                ModelGroup {
                    index,
                    owed,
                    ..ModelGroup::default()
                },
            );
        }
        // With no group, the whole log waits for the first one.
        self.orphans = if groups.is_empty() {
            let floor = &self.floor;
            (0..PARTS)
                .flat_map(|p| (floor[p as usize]..self.written[p as usize]).map(move |o| (p, o)))
                .filter(|b| !self.markers.contains_key(b))
                .collect()
        } else {
            BTreeSet::new()
        };
        self.s = s;
        self.groups = groups;
        self.end = end;
        self.durable = self.written.clone();
        self.content = vec![None; SLOTS as usize];
        self.slot_of.clear();
        for g in &mut self.granted {
            g.clear();
        }
    }

    /// The invariants that must hold after every step.
    fn check(&self) -> Result<(), TestCaseError> {
        for (name, g) in &self.groups {
            for &b in &g.owed {
                self.check_present(b, &format!("group g{name}"))?;
            }
        }
        for &b in &self.orphans {
            self.check_present(b, "the orphan pool")?;
        }
        let mut free = 0;
        for slot in 0..SLOTS {
            let state = self.s.slots[slot as usize];
            // A disk stream's slot may still hold a batch the stream took
            // out of the cache (it is on disk): no longer its holders'.
            let content = self.content[slot as usize].filter(|&b| !self.only_on_disk(b, slot));
            if let Slot::Held { part, offset, .. } = state {
                prop_assert_eq!(
                    content,
                    Some((part, offset)),
                    "slot {} held for {:?} holds other bytes",
                    slot,
                    (part, offset)
                );
            }
            let owing = content.map_or(0, |b| self.owers(b));
            let orphan = content.is_some_and(|b| self.orphans.contains(&b));
            prop_assert_eq!(
                self.s.free.contains(slot),
                matches!(state, Slot::Free { .. }),
                "slot {} on the free list and in state {:?}",
                slot,
                state
            );
            match state {
                Slot::Held {
                    holders, orphan: o, ..
                } => {
                    if orphan {
                        prop_assert!(o && holders == 1 && owing == 0);
                    } else {
                        prop_assert!(!o, "slot {slot} orphan without orphan batch");
                        prop_assert_eq!(
                            holders as usize,
                            owing,
                            "slot {} has {} holders, {} groups owe its batch",
                            slot,
                            holders,
                            owing
                        );
                    }
                }
                Slot::Free { .. } => {
                    free += 1;
                    prop_assert!(
                        owing == 0 && !orphan,
                        "slot {slot} free while {owing} groups owe its batch"
                    );
                }
                Slot::Granted { .. } => {
                    prop_assert!(owing == 0 && !orphan, "slot {slot} granted while owed");
                }
            }
        }
        prop_assert_eq!(
            free,
            self.s.free.len(),
            "free list and slot states disagree"
        );
        Ok(())
    }

    /// Delivers and releases everything every group owes; afterwards no
    /// group owes anything and every slot is free.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        if self.tiered {
            // The producers are done: read-back needs free slots (memory
            // streams need none, what is owed is in its slot).
            for p in 0..PRODUCERS {
                self.step(&Op::ProducerDies(p))?;
            }
            // The log writer catches up (what no group wants included).
            for part in 0..PARTS as u8 {
                self.step(&Op::Write { part, n: u8::MAX })?;
            }
        }
        if self.groups.is_empty() && !self.orphans.is_empty() {
            self.step(&Op::Join {
                group: 0,
                member: 0,
                start: 0,
            })?;
        }
        let names: Vec<u8> = self.groups.keys().copied().collect();
        for group in names {
            if self.groups[&group].members.is_empty() {
                self.step(&Op::Join {
                    group,
                    member: 0,
                    start: 0,
                })?;
            }
            for _ in 0..1000 {
                if self.groups[&group].owed.is_empty() {
                    break;
                }
                if self.tiered {
                    for part in 0..PARTS as u8 {
                        self.step(&Op::Write { part, n: u8::MAX })?;
                        self.step(&Op::Sync { part })?;
                    }
                    self.step(&Op::Load)?;
                }
                self.step(&Op::Deliver {
                    group,
                    credit: u8::MAX,
                })?;
                while !self.groups[&group].inflight.is_empty() {
                    self.step(&Op::Release { group, pick: 0 })?;
                }
            }
            let left = &self.groups[&group].owed;
            prop_assert!(left.is_empty(), "group g{group} never got {left:?}");
        }
        let held = self.s.slot_counts().2;
        prop_assert_eq!(held, 0, "slots still held after every group drained");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        max_shrink_iters: 20000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_group_changes_what_another_receives(
        ops in proptest::collection::vec(op(false), 1..80),
        window in prop_oneof![Just(0u32), Just(1), Just(3), Just(SLOTS)],
    ) {
        let mut m = Model::new(window);
        for op in &ops {
            m.step(op)?;
        }
        m.drain()?;
    }

    #[test]
    fn a_disk_stream_never_serves_other_bytes_nor_loses_what_it_wrote(
        ops in proptest::collection::vec(op(true), 1..100),
        window in prop_oneof![Just(0u32), Just(1), Just(3), Just(SLOTS)],
    ) {
        let mut m = Model::with(window, true);
        for op in &ops {
            m.step(op)?;
        }
        m.drain()?;
    }
}

/// The sequence the hostile-client report found by reading `Stream::seek`
/// (seek back past batches in flight, the member leaves, a second member
/// seeks forward), kept as a plain regression test.
#[test]
fn seek_back_leave_seek_forward_does_not_free_another_groups_slots() {
    let mut m = Model::new(SLOTS);
    let ops = [
        Op::Join {
            group: 0,
            member: 0,
            start: 0,
        },
        Op::Join {
            group: 1,
            member: 0,
            start: 0,
        },
        Op::Grant(0),
        Op::Grant(0),
        Op::Grant(0),
        Op::Publish {
            producer: 0,
            pick: 0,
            key: Some(0),
        },
        Op::Publish {
            producer: 0,
            pick: 0,
            key: Some(0),
        },
        Op::Publish {
            producer: 0,
            pick: 0,
            key: Some(0),
        },
        Op::Deliver {
            group: 1,
            credit: 3,
        },
        Op::Seek {
            group: 1,
            member: 0,
            part: partition_for_key(0, PARTS) as u8,
            offset: 0,
        },
        Op::Join {
            group: 1,
            member: 1,
            start: 0,
        },
        Op::Leave {
            group: 1,
            member: 0,
        },
        Op::Seek {
            group: 1,
            member: 1,
            part: partition_for_key(0, PARTS) as u8,
            offset: 3,
        },
    ];
    for op in &ops {
        m.step(op).unwrap();
    }
    m.drain().unwrap();
}

/// Found by the disk-stream model: batches published while no group
/// existed, then a first group that starts at the end (so they are
/// nobody's), then one that starts at the earliest, all before the log
/// writer's turn. The released batches' slots were free at once and (with
/// no replay window) out of the index: the writer found a hole, and the
/// second group owed batches that were nowhere.
#[test]
fn a_disk_stream_keeps_released_batches_until_its_log_has_them() {
    let mut m = Model::with(0, true);
    let ops = [
        Op::Grant(0),
        Op::Publish {
            producer: 0,
            pick: 0,
            key: None,
        },
        Op::Grant(0),
        Op::Publish {
            producer: 0,
            pick: 0,
            key: None,
        },
        Op::Join {
            group: 1,
            member: 0,
            start: 2,
        },
        Op::Join {
            group: 0,
            member: 0,
            start: 1,
        },
        Op::Grant(1),
        Op::Write { part: 0, n: 4 },
        Op::Write { part: 1, n: 4 },
    ];
    for op in &ops {
        m.step(op).unwrap();
    }
    m.drain().unwrap();
}

/// Found by the disk-stream model: a member holds a batch, its group seeks
/// back past it, and strict retention then deletes the log under it. The
/// group's skip to the new floor took the member's hold: its slot was
/// free (and reusable) while the member still read it.
#[test]
fn retention_does_not_take_a_batch_a_member_holds_after_a_seek_back() {
    let mut m = Model::with(0, true);
    let ops = [
        Op::Join {
            group: 0,
            member: 0,
            start: 0,
        },
        Op::Grant(0),
        Op::Publish {
            producer: 0,
            pick: 0,
            key: None,
        },
        Op::Write { part: 0, n: 1 },
        Op::Sync { part: 0 },
        Op::Deliver {
            group: 0,
            credit: 1,
        },
        Op::Seek {
            group: 0,
            member: 0,
            part: 0,
            offset: 0,
        },
        Op::Retain { part: 0, upto: 1 },
    ];
    for op in &ops {
        m.step(op).unwrap();
    }
    m.drain().unwrap();
}
