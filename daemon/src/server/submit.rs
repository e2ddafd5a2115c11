//! What clients put on their submission rings: publishes and ends of
//! epoch from producers, releases and commits from consumers.

use ferry_shm::desc::{self};

use crate::limited;
use crate::stream::{SessionId, Violation};

use super::*;

impl Server {
    /// Processes every submission ring. Returns descriptors handled.
    pub(super) fn poll_rings(&mut self) -> usize {
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        ids.extend(
            self.sessions
                .iter()
                .filter(|(_, s)| sub_of(&s.role).is_some())
                .map(|(id, _)| *id),
        );
        let n = ids.iter().map(|&id| self.drain_session(id)).sum();
        self.scratch = ids;
        n
    }

    pub(super) fn drain_session(&mut self, id: SessionId) -> usize {
        match self.drain_session_inner(id) {
            Ok(n) => n,
            Err(v) => {
                self.fail_session(id, &v.0);
                0
            }
        }
    }

    pub(super) fn drain_session_inner(&mut self, id: SessionId) -> Result<usize, Violation> {
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(0);
        };
        match s.role {
            Role::Remote(_) => return self.drain_proxy(id),
            Role::Outbox(_) => return self.drain_outbox(id),
            _ => {}
        }
        let mut n = 0;
        let mut end_check = None;
        match &mut s.role {
            Role::Producer(p) => {
                let entry = &mut self.streams[p.stream];
                while let Some(d) = p.rings.sub.pop().map_err(|e| Violation(e.to_string()))? {
                    if d.op == desc::OP_END {
                        n += 1;
                        if let Some(g) = &mut p.gpu {
                            // In order: the publishes before it go in first
                            // (a short wait for their copies, once an epoch).
                            let (granted, published, acks) =
                                (&mut p.granted, &mut p.published, &mut p.acks);
                            let dev = g.info.ordinal;
                            g.finish(|d| {
                                publish_copied(entry, id, d, dev, granted, published, acks)
                            })
                            .map_err(Violation)?;
                        }
                        p.ended = true;
                        p.ends_taken += 1;
                        if !p.tell_ends_taken() {
                            // Told on a later pump.
                            entry.producer_ends_untold = true;
                            entry.dirty = true;
                        }
                        end_check = Some(p.stream);
                        // The epoch may end here: what this producer
                        // publishes next waits for that, so that it lands
                        // after the markers.
                        break;
                    }
                    if d.op != desc::OP_PUBLISH {
                        return Err(Violation(format!("producer sent op {}", d.op)));
                    }
                    p.ended = false;
                    let key = (d.flags & desc::FLAG_HAS_KEY != 0).then_some(d.key);
                    if let Some(g) = &mut p.gpu {
                        // Takes effect once its copy to the host slot is
                        // done (progress_gpu), in order.
                        entry.stream.check_publish(id, d.slot, d.len, d.meta_len)?;
                        let off = entry.layout.slot_offset(d.slot).ok_or_else(|| {
                            Violation(format!("publish of slot {} out of range", d.slot))
                        })?;
                        g.queue(d, off).map_err(Violation)?;
                        n += 1;
                        continue;
                    }
                    if d.flags & desc::FLAG_DEVICE != 0 {
                        return Err(Violation(
                            "publish from GPU memory by a producer opened for host memory".into(),
                        ));
                    }
                    let at = entry.stream.publish(
                        id,
                        d.slot,
                        d.len,
                        d.meta_len,
                        key,
                        None,
                        entry_flags(&d),
                    )?;
                    p.acks.published(&entry.stream, at);
                    p.granted.remove(&d.slot);
                    p.published += 1;
                    entry.dirty = true;
                    n += 1;
                }
            }
            Role::Consumer(c) => {
                let entry = &mut self.streams[c.m.stream];
                // "Commit everything I own" costs a pass over the member's
                // partitions: a ring full of them is applied once.
                let mut commit_all = false;
                while let Some(d) = c.sub.pop().map_err(|e| Violation(e.to_string()))? {
                    match d.op {
                        desc::OP_RELEASE => {
                            c.m.sink.release(&d)?;
                            entry
                                .stream
                                .release(c.m.group, id, d.partition, d.offset, d.slot)?;
                            c.m.inflight = c.m.inflight.saturating_sub(1);
                            if d.flags & desc::FLAG_COMMIT != 0 {
                                commit_all = true;
                            }
                        }
                        desc::OP_COMMIT if d.partition == desc::COMMIT_ALL => commit_all = true,
                        desc::OP_COMMIT => {
                            if commit_all {
                                // Keep the order: the earlier commit-all first.
                                entry.stream.commit(c.m.group, id, None, 0)?;
                                commit_all = false;
                            }
                            entry
                                .stream
                                .commit(c.m.group, id, Some(d.partition), d.offset)?;
                        }
                        op => return Err(Violation(format!("consumer sent op {op}"))),
                    }
                    entry.dirty = true;
                    n += 1;
                }
                if commit_all {
                    // Later than the member asked: releases since then only
                    // raise the low watermark, which stays true.
                    entry.stream.commit(c.m.group, id, None, 0)?;
                }
            }
            _ => {}
        }
        if let Some(idx) = end_check {
            self.maybe_end_epoch(idx, false);
        }
        Ok(n)
    }

    /// Ends the epoch of stream `idx` when every producer attached to it
    /// has said it is done (`OP_END`) and at least one has: end markers go
    /// into every partition, and the producers start the next epoch.
    pub(super) fn maybe_end_epoch(&mut self, idx: usize, leaving_ended: bool) {
        let entry = &mut self.streams[idx];
        entry.end_pending |= leaving_ended;
        let mut any = entry.end_pending;
        for pid in &entry.producers {
            let ended = match self.sessions.get(pid) {
                Some(Session {
                    role: Role::Producer(p),
                    ..
                }) => p.ended,
                Some(_) => continue,
                None => match self.remote_producers.get(pid) {
                    Some(p) => p.ended,
                    None => continue,
                },
            };
            if !ended {
                return;
            }
            any = true;
        }
        if !any {
            return;
        }
        entry.end_pending = false;
        for pid in &entry.producers {
            if let Some(Session {
                role: Role::Producer(p),
                ..
            }) = self.sessions.get_mut(pid)
            {
                p.ended = false;
            } else if let Some(p) = self.remote_producers.get_mut(pid) {
                p.ended = false;
            }
        }
        if !entry.stream.end_epoch() {
            return; // nothing published since the last end
        }
        entry.dirty = true;
        limited!(
            INFO,
            stream = %entry.stream.name(),
            producers = entry.producers.len(),
            "end of epoch: every producer said it is done"
        );
    }
}
