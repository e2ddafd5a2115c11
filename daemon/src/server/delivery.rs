//! The pump: grants of free slots to producers, and deliveries of
//! batches to consumers.

use std::time::Instant;

use ferry_shm::desc::{self, Desc};
use ferry_shm::layout::META_MAX;
use ferry_shm::sys::{self};

use crate::idhash::IdSet;
use crate::stream::{SessionId, Violation};

use super::remote::RemoteMember;
use super::sessions::Member;
use super::*;
use crate::peers::PeerMsg;
use crate::sink::Batch;
use std::collections::BTreeMap;

/// The stream entry flags a publish descriptor asks for.
pub(super) fn entry_flags(d: &Desc) -> u16 {
    if d.flags & desc::FLAG_RECORD != 0 {
        crate::stream::ENTRY_RECORD
    } else {
        0
    }
}

/// Puts a batch a producer published from GPU `dev` into its stream, now
/// that its copy to the host slot is done (batches published from host
/// memory by the same producer wait in the same queue, keeping its order).
pub(super) fn publish_copied(
    entry: &mut StreamEntry,
    id: SessionId,
    d: &Desc,
    dev: u32,
    granted: &mut IdSet<u32>,
    published: &mut u64,
    acks: &mut super::durable::Acks,
) -> Result<(), Violation> {
    let key = (d.flags & desc::FLAG_HAS_KEY != 0).then_some(d.key);
    let device = (d.flags & desc::FLAG_DEVICE != 0).then_some(dev);
    let at = entry
        .stream
        .publish(id, d.slot, d.len, d.meta_len, key, device, entry_flags(d))?;
    acks.published(&entry.stream, at);
    granted.remove(&d.slot);
    *published += 1;
    entry.dirty = true;
    Ok(())
}

/// Member `id` of a group: a consumer session here, or a member on
/// another host.
pub(super) fn member_mut<'a>(
    sessions: &'a mut BTreeMap<SessionId, Session>,
    remotes: &'a mut BTreeMap<SessionId, RemoteMember>,
    id: SessionId,
) -> Option<&'a mut Member> {
    match sessions.get_mut(&id) {
        Some(Session {
            role: Role::Consumer(c),
            ..
        }) => Some(&mut c.m),
        Some(_) => None,
        None => remotes.get_mut(&id).map(|r| &mut r.m),
    }
}

impl Server {
    /// Grants free slots to producers and delivers batches to consumers of
    /// every stream whose state changed. Returns descriptors pushed.
    pub(super) fn pump(&mut self) -> usize {
        let mut pushed = 0;
        let mut to_wake = std::mem::take(&mut self.wake_scratch);
        to_wake.clear();
        let mut failed: Vec<(SessionId, String)> = Vec::new();
        let mut remote_grants: Vec<(String, u64, u32)> = Vec::new();
        let mut remote_published: Vec<(String, u64, u32)> = Vec::new();
        let draining = self.draining.is_some();
        let gpus = &self.gpus;
        for (idx, entry) in self.streams.iter_mut() {
            if !entry.dirty {
                continue;
            }
            entry.dirty = false;
            // Stalled: the last write to the disk log failed (write_log,
            // below, tries again).
            let stalled = entry.log.as_ref().is_some_and(|l| l.error.is_some());
            // Grants, round-robin over producers. A disk stream's first,
            // so that producers fill slots while what they published is
            // written to the log; a memory stream's after its deliveries,
            // which are then on the consumers' rings sooner.
            let grant_now = !draining && !stalled && !entry.producers.is_empty();
            macro_rules! grant {
                () => {
                    if grant_now {
                        pushed += grant_producers(
                            entry,
                            &mut self.sessions,
                            &mut self.remote_producers,
                            &mut remote_grants,
                            &mut to_wake,
                            &mut failed,
                        );
                    }
                };
            }
            if entry.stream.tiered() {
                grant!();
            }
            entry.write_log(idx, &self.syncer);
            let stalled = entry.log.as_ref().is_some_and(|l| l.error.is_some());
            // A disk stream's acknowledgements: how many of each
            // producer's publishes are as durable as the stream promises
            // (a memory stream's producers see their ring drained instead).
            for pid in entry.producers.iter().filter(|_| entry.stream.tiered()) {
                if let Some(rp) = self.remote_producers.get_mut(pid) {
                    // On another host: its outbox slots go back as its
                    // batches become durable, and its host acknowledges
                    // them to it.
                    let before = rp.acks.sent.0;
                    let acked = rp.acks.advance(&entry.stream);
                    for _ in before..acked {
                        if let Some(slot) = rp.unacked_slots.pop_front() {
                            remote_published.push((rp.node.clone(), rp.producer, slot));
                        }
                    }
                    rp.acks.sent.0 = acked;
                    continue;
                }
                let Some(Session {
                    role: Role::Producer(p),
                    ..
                }) = self.sessions.get_mut(pid)
                else {
                    continue;
                };
                let acked = p.acks.advance(&entry.stream);
                if (acked, stalled) == p.acks.sent {
                    continue;
                }
                let d = Desc {
                    op: desc::OP_ACK,
                    flags: if stalled { desc::FLAG_STALLED } else { 0 },
                    stream: entry.stream.id(),
                    offset: acked,
                    ..Desc::default()
                };
                match p.rings.comp.push(&d) {
                    Ok(()) => {
                        p.acks.sent = (acked, stalled);
                        to_wake.push(*pid);
                    }
                    // Told on a later pump.
                    Err(_) => entry.dirty = true,
                }
            }
            // Ends of epoch taken that a full ring kept from its producer.
            if std::mem::take(&mut entry.producer_ends_untold) {
                for pid in &entry.producers {
                    if let Some(Session {
                        role: Role::Producer(p),
                        ..
                    }) = self.sessions.get_mut(pid)
                    {
                        if p.ends_untold && !p.tell_ends_taken() {
                            entry.producer_ends_untold = true;
                            entry.dirty = true;
                        }
                    }
                }
            }
            if !entry.stream.has_free_slot() {
                for pid in &entry.producers {
                    if let Some(Session {
                        role: Role::Producer(p),
                        ..
                    }) = self.sessions.get_mut(pid)
                    {
                        if p.granted.is_empty() && p.starved_since.is_none() {
                            p.starved_since = Some(Instant::now());
                        }
                    }
                }
            }
            // Deliveries.
            let sessions = &mut self.sessions;
            let remotes = &mut self.remotes;
            let ends_untold = std::mem::take(&mut entry.ends_untold);
            let counters = &mut entry.counters;
            for g in 0..entry.stream.groups().len() {
                let sid = entry.stream.id();
                let pool_layout = entry.layout;
                let epoch = entry.stream.groups()[g].epoch;
                let n = entry.stream.deliver(g, |m, dv| {
                    let remote = dv.entry.stamp != 0 && remotes.contains_key(&m);
                    let Some(c) = member_mut(sessions, remotes, m) else {
                        return false;
                    };
                    if c.inflight >= c.prefetch {
                        return false; // no credit: prefetch batches unreleased
                    }
                    if c.epoch_seen < epoch {
                        return false; // the next epoch, after its end of epoch
                    }
                    let d = Desc {
                        op: desc::OP_DELIVER,
                        flags: if dv.entry.flags & crate::stream::ENTRY_RECORD != 0 {
                            desc::FLAG_RECORD
                        } else {
                            0
                        },
                        stream: sid,
                        partition: dv.part,
                        slot: dv.entry.slot,
                        len: dv.entry.len,
                        meta_len: dv.entry.meta_len.min(META_MAX),
                        offset: dv.offset,
                        ..Desc::default()
                    };
                    let Some(pool_offset) = pool_layout.slot_offset(dv.entry.slot) else {
                        return false;
                    };
                    let batch = Batch {
                        desc: d,
                        pool_offset,
                        meta_offset: pool_layout.meta_offset(dv.entry.slot).unwrap_or(0),
                        from_gpu: dv
                            .entry
                            .device
                            .and_then(|_| gpus.source(idx, dv.entry.device, dv.entry.slot)),
                        stamp: dv.entry.stamp,
                    };
                    match c.sink.offer(batch) {
                        Ok(true) => {
                            c.inflight += 1;
                            c.delivered += 1;
                            to_wake.push(m);
                            counters.delivered += 1;
                            counters.delivered_bytes += dv.entry.len;
                            if dv.entry.stamp != 0 {
                                let us = crate::metrics::since_us(dv.entry.stamp);
                                if remote {
                                    counters.latency_remote.observe(us);
                                } else {
                                    counters.latency_local.observe(us);
                                }
                            }
                            true
                        }
                        Ok(false) => false,
                        Err(e) => {
                            failed.push((m, e));
                            false
                        }
                    }
                });
                pushed += n;
                // Members not yet told of an epoch the group finished (after
                // every batch of it that they were given, GPU copies
                // included).
                let group = &entry.stream.groups()[g];
                if group.epoch > epoch {
                    // Delivery stopped at the end of the epoch: go on once
                    // the members were told.
                    entry.dirty = true;
                } else if !ends_untold {
                    continue;
                }
                for &m in &group.members {
                    let Some(c) = member_mut(sessions, remotes, m) else {
                        continue;
                    };
                    while c.epoch_seen < group.epoch {
                        let d = Desc {
                            op: desc::OP_END_OF_EPOCH,
                            stream: sid,
                            offset: c.epoch_seen + 1,
                            ..Desc::default()
                        };
                        match c.sink.end_of_epoch(&d) {
                            Ok(true) => {
                                c.epoch_seen += 1;
                                pushed += 1;
                                to_wake.push(m);
                            }
                            Ok(false) => break,
                            Err(e) => {
                                failed.push((m, e));
                                break;
                            }
                        }
                    }
                    if c.epoch_seen < group.epoch {
                        // No room, or deliveries still in flight: again later.
                        entry.ends_untold = true;
                        entry.dirty = true;
                    }
                }
            }
            if !entry.stream.tiered() {
                grant!();
            }
        }
        to_wake.sort_unstable();
        to_wake.dedup();
        for id in to_wake.iter() {
            match self.sessions.get_mut(id).map(|s| &mut s.role) {
                Some(Role::Producer(p)) if p.rings.comp.wake_needed() => {
                    sys::futex_wake(p.rings.comp.ring().sleep_word());
                }
                Some(Role::Consumer(c)) => c.m.sink.wake(),
                _ => {}
            }
        }
        self.wake_scratch = to_wake;
        // Disk streams: what groups reached that is in no slot is read back
        // now and delivered on the next pump; after the wake-ups, so that
        // consumers work on what they were just given while the disk reads.
        for (_, entry) in self.streams.iter_mut() {
            pushed += entry.serve_loads();
        }
        // Grants to producers on other hosts, one message per producer.
        remote_grants.sort_unstable();
        for chunk in remote_grants.chunk_by(|a, b| (&a.0, a.1) == (&b.0, b.1)) {
            let slots = chunk.iter().map(|g| g.2).collect();
            self.send_to(
                &chunk[0].0,
                PeerMsg::Grant {
                    producer: chunk[0].1,
                    slots,
                },
            );
        }
        for (node, producer, outbox_slot) in remote_published {
            self.send_to(
                &node,
                PeerMsg::Published {
                    producer,
                    outbox_slot,
                },
            );
        }
        for (id, why) in failed {
            self.fail_session(id, &why);
        }
        pushed
    }

    /// Puts the descriptors of finished GPU copies on their consumers'
    /// rings. Returns descriptors pushed.
    pub(super) fn progress_gpu(&mut self) -> usize {
        if self.gpu_sessions == 0 {
            return 0;
        }
        let mut pushed = 0;
        let mut failed: Vec<(SessionId, String)> = Vec::new();
        // Outboxes with publishes to send now.
        let mut outboxes = Vec::new();
        let streams = &mut self.streams;
        for (&id, s) in self.sessions.iter_mut() {
            if let Role::Producer(p) = &mut s.role {
                if let Some(g) = &mut p.gpu {
                    if g.pending() > 0 {
                        let entry = &mut streams[p.stream];
                        let (granted, published, acks) =
                            (&mut p.granted, &mut p.published, &mut p.acks);
                        let dev = g.info.ordinal;
                        match g.complete(|d| {
                            publish_copied(entry, id, d, dev, granted, published, acks)
                        }) {
                            Ok(n) => pushed += n,
                            Err(e) => failed.push((id, e)),
                        }
                    }
                }
                continue;
            }
            if let Role::Remote(p) = &mut s.role {
                if p.gpu.as_ref().is_some_and(|g| g.pending() > 0) {
                    match p.complete_copies() {
                        Ok(n) => pushed += n,
                        Err(e) => failed.push((id, e)),
                    }
                }
                continue;
            }
            if let Role::Outbox(o) = &mut s.role {
                if o.gpu.as_ref().is_some_and(|g| g.pending() > 0) {
                    match o.complete_copies() {
                        Ok(0) => {}
                        Ok(n) => {
                            pushed += n;
                            outboxes.push(id);
                        }
                        Err(e) => failed.push((id, e)),
                    }
                }
                continue;
            }
            let Role::Consumer(ConsumerState { m: c, .. }) = &mut s.role else {
                continue;
            };
            if c.sink.pending() == 0 {
                continue;
            }
            match c.sink.complete() {
                Err(e) => failed.push((id, e)),
                Ok(0) => {}
                Ok(n) => {
                    pushed += n;
                    c.sink.wake();
                    // An end of epoch may wait for these deliveries.
                    streams[c.stream].dirty = true;
                }
            }
        }
        for id in outboxes {
            self.pump_outbox(id);
        }
        for (id, why) in failed {
            self.fail_session(id, &why);
        }
        pushed
    }

    /// GPU copies in flight anywhere (the loop keeps polling for them).
    pub(super) fn copies_pending(&self) -> bool {
        self.gpu_sessions > 0
            && self.sessions.values().any(|s| match &s.role {
                Role::Consumer(c) => c.m.sink.pending() > 0,
                Role::Producer(ProducerState { gpu: Some(g), .. }) => g.pending() > 0,
                Role::Remote(p) => p.gpu.as_ref().is_some_and(|g| g.pending() > 0),
                Role::Outbox(o) => o.gpu.as_ref().is_some_and(|g| g.pending() > 0),
                _ => false,
            })
    }
}

/// Grants free slots of `entry`'s stream to its producers, round-robin, up
/// to each one's credits (producers on other hosts through
/// `remote_grants`). Returns the grants pushed.
fn grant_producers(
    entry: &mut super::catalog::StreamEntry,
    sessions: &mut BTreeMap<SessionId, Session>,
    remote_producers: &mut BTreeMap<SessionId, super::inbound::RemoteProducer>,
    remote_grants: &mut Vec<(String, u64, u32)>,
    to_wake: &mut Vec<SessionId>,
    failed: &mut Vec<(SessionId, String)>,
) -> usize {
    let mut pushed = 0;
    let n = entry.producers.len();
    let mut progress = true;
    while progress && entry.stream.has_free_slot() {
        progress = false;
        for i in 0..n {
            let pid = entry.producers[i];
            if let Some(rp) = remote_producers.get_mut(&pid) {
                progress |= Server::grant_remote(entry, rp, pid, remote_grants);
                continue;
            }
            let Some(Session {
                role: Role::Producer(p),
                ..
            }) = sessions.get_mut(&pid)
            else {
                continue;
            };
            if p.granted.len() as u32 >= p.credits {
                continue;
            }
            let Some(slot) = entry.stream.grant(pid) else {
                break;
            };
            p.starved_since = None;
            p.starved_logged = false;
            let d = Desc {
                op: desc::OP_GRANT,
                stream: entry.stream.id(),
                slot,
                ..Desc::default()
            };
            match p.rings.comp.push(&d) {
                Ok(()) => {
                    p.granted.insert(slot);
                    pushed += 1;
                    progress = true;
                    to_wake.push(pid);
                }
                Err(e) => {
                    entry.stream.return_grant(pid, slot);
                    if !matches!(e, ferry_shm::RingError::Full) {
                        failed.push((pid, e.to_string()));
                    }
                }
            }
        }
    }
    pushed
}
