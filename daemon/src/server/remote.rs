//! The home side of cross-host delivery: trainers on other hosts that
//! joined a group of a stream homed here. Each is a member of its group
//! like a local consumer (a session id of this daemon), with a
//! [`RemoteSink`] that writes its batches into its host's landing area.
//! What it does (releases, commits, seeks, leaving) arrives as messages
//! from its host.

use std::sync::Arc;

use ferry_shm::layout::PoolLayout;
use ferry_shm::proto::ErrorCode;

use super::sessions::Member;
use super::Server;
use crate::error::Refusal;
use crate::landing::{HEADER_BYTES, MAX_LANDING_SLOTS};
use crate::limited;
use crate::peers::{Join, Joined, PeerMsg, WireRefusal};
use crate::sink::RemoteSink;
use crate::stream::SessionId;

/// A member on another host.
pub(super) struct RemoteMember {
    pub(super) m: Member,
    /// Its host.
    pub(super) node: String,
    /// Its host's id for it.
    pub(super) member: u64,
}

fn wire(r: Refusal) -> WireRefusal {
    WireRefusal {
        code: r.code,
        message: r.message,
    }
}

impl Server {
    /// A trainer on `node` joins a group of a stream homed here.
    pub(super) fn remote_join(&mut self, node: &str, j: Join) {
        let member = j.member;
        // Its earlier membership (a join after its host lost us) ends.
        if let Some(old) = self.remote_ids.get(&(node.to_string(), member)).copied() {
            self.remote_leave(old, "it joined again");
        }
        let result = self.remote_join_inner(node, j).map_err(wire);
        if let Some(c) = &self.cluster {
            c.peers.send(node, PeerMsg::Joined { member, result });
        }
    }

    fn remote_join_inner(&mut self, node: &str, j: Join) -> Result<Joined, Refusal> {
        let link = self
            .cluster
            .as_ref()
            .and_then(|c| c.link(node))
            .ok_or_else(|| Refusal::new(ErrorCode::Internal, "no data link to your host yet"))?;
        let Some(&idx) = self.by_name.get(&j.stream) else {
            return Err(Refusal::new(
                ErrorCode::UnknownStream,
                format!("no stream named {:?} has its home here", j.stream),
            ));
        };
        if !ferry_shm::proto::valid_name(&j.group) {
            return Err(Refusal::invalid(format!(
                "group name {:?} must be 1-128 characters of A-Z a-z 0-9 . _ -",
                j.group
            )));
        }
        self.may_use_group(idx, &j.group, j.uid, "join")
            .map_err(|m| Refusal::new(ErrorCode::PermissionDenied, m))?;
        let l = &j.landing;
        if l.slots == 0 || l.slots > MAX_LANDING_SLOTS {
            return Err(Refusal::invalid(format!(
                "a landing area of {} slots",
                l.slots
            )));
        }
        let spec = self.streams[idx].stream.spec().clone();
        let layout = PoolLayout::new(spec.slot_size, l.slots)
            .ok_or_else(|| Refusal::invalid("the landing area's size overflows"))?;
        let max = self.cfg.daemon.max_groups_per_stream;
        let s = &self.streams[idx].stream;
        if s.group_index(&j.group).is_none() && s.live_groups() >= max as usize {
            return Err(Refusal::limit(format!(
                "stream {} has {} consumer groups, daemon.max_groups_per_stream = {max}",
                j.stream,
                s.live_groups()
            )));
        }
        let pool = self.registered_pool(idx)?;
        let staging = self.registered_region(
            &format!("ferry-staging-{node}-{}", j.member),
            l.slots as u64 * HEADER_BYTES,
            false,
            "a header staging area",
        )?;
        let id = self.next_session;
        self.next_session += 1;
        let entry = &mut self.streams[idx];
        let g = entry
            .stream
            .join(&j.group, id, j.uid, &j.start)
            .map_err(|e| {
                let code = match e {
                    crate::stream::SeekError::Gone { .. } => ErrorCode::OffsetGone,
                    _ => ErrorCode::InvalidArgument,
                };
                Refusal::new(code, format!("start of new group {}: {e}", j.group))
            })?;
        let epoch_seen = entry.stream.groups()[g].epoch;
        entry.dirty = true;
        entry.idle_since = None;
        let prefetch = j.prefetch.clamp(1, l.slots);
        let sink = RemoteSink::new(
            link,
            pool,
            staging,
            j.landing.clone(),
            layout,
            j.member,
            &j.busy,
        );
        limited!(
            INFO,
            session = id,
            peer = node,
            member = j.member,
            stream = %j.stream,
            group = %j.group,
            prefetch,
            "consumer on another host joined"
        );
        self.remote_ids.insert((node.to_string(), j.member), id);
        self.remotes.insert(
            id,
            RemoteMember {
                m: Member {
                    stream: idx,
                    group: g,
                    prefetch,
                    // Landing slots still busy from an earlier membership
                    // are not credited: they hold back deliveries as
                    // batches in flight would.
                    inflight: 0,
                    delivered: 0,
                    epoch_seen,
                    sink: Box::new(sink),
                },
                node: node.to_string(),
                member: j.member,
            },
        );
        Ok(Joined {
            partitions: spec.partitions,
            slot_size: spec.slot_size,
        })
    }

    /// Stream `idx`'s pool registered with the fabric (once).
    pub(super) fn registered_pool(
        &mut self,
        idx: usize,
    ) -> Result<Arc<crate::fabric::Registered>, Refusal> {
        if let Some(r) = &self.streams[idx].registered {
            return Ok(r.clone());
        }
        // Producers on other hosts write into it.
        let r = self.register(self.streams[idx].pool.clone(), true, "the pool")?;
        self.streams[idx].registered = Some(r.clone());
        Ok(r)
    }

    /// The member on another host that `node` calls `member`.
    fn remote_of(&self, node: &str, member: u64) -> Option<SessionId> {
        self.remote_ids.get(&(node.to_string(), member)).copied()
    }

    /// Member `id` on another host is gone: its batches go to the rest of
    /// its group.
    pub(super) fn remote_leave(&mut self, id: SessionId, why: &str) {
        let Some(r) = self.remotes.remove(&id) else {
            return;
        };
        self.remote_ids.remove(&(r.node.clone(), r.member));
        if let Some(e) = self
            .streams
            .slots
            .get_mut(r.m.stream)
            .and_then(Option::as_mut)
        {
            e.stream.leave(r.m.group, id);
            e.dirty = true;
        }
        limited!(
            INFO,
            session = id,
            peer = %r.node,
            member = r.member,
            delivered = r.m.delivered,
            unreleased = r.m.inflight,
            "consumer on another host left ({why}); its unreleased batches go to the rest of its group"
        );
    }

    /// Ends member `id` on another host and tells its host why.
    pub(super) fn remote_evict(&mut self, id: SessionId, why: &str) {
        if let (Some(r), Some(c)) = (self.remotes.get(&id), &self.cluster) {
            c.peers.send(
                &r.node,
                PeerMsg::Evicted {
                    member: r.member,
                    why: why.to_string(),
                },
            );
        }
        self.remote_leave(id, why);
    }

    /// Every member on `node` leaves (it went down).
    pub(super) fn remote_node_gone(&mut self, node: &str, why: &str) {
        for id in super::ids_where(&self.remotes, |r| r.node == node) {
            self.remote_leave(id, why);
        }
    }

    /// What a consumer host says of one of its members here.
    pub(super) fn remote_message(&mut self, node: &str, msg: PeerMsg) {
        let member = match &msg {
            PeerMsg::Leave { member }
            | PeerMsg::Release { member, .. }
            | PeerMsg::Credit { member, .. }
            | PeerMsg::Commit { member, .. }
            | PeerMsg::Seek { member, .. } => *member,
            _ => return,
        };
        let Some(id) = self.remote_of(node, member) else {
            if let PeerMsg::Seek { .. } = msg {
                self.send_to(
                    node,
                    PeerMsg::SeekDone {
                        member,
                        result: Err(WireRefusal {
                            code: ErrorCode::InvalidArgument,
                            message: "not a member here".into(),
                        }),
                    },
                );
            }
            return; // gone already (a late message)
        };
        if let PeerMsg::Leave { .. } = msg {
            return self.remote_leave(id, "its trainer left");
        }
        let r = self.remotes.get_mut(&id).expect("looked up");
        let entry = &mut self.streams[r.m.stream];
        let g = r.m.group;
        let res: Result<(), String> = match msg {
            PeerMsg::Release {
                partition,
                offset,
                home_slot,
                landing_slot,
                commit,
                ..
            } => entry
                .stream
                .release(g, id, partition, offset, home_slot)
                .map_err(|v| v.0)
                .and_then(|()| {
                    r.m.inflight = r.m.inflight.saturating_sub(1);
                    r.m.sink.returned(landing_slot)
                })
                .and_then(|()| {
                    if commit {
                        entry.stream.commit(g, id, None, 0).map_err(|v| v.0)
                    } else {
                        Ok(())
                    }
                }),
            PeerMsg::Credit { landing_slot, .. } => r.m.sink.returned(landing_slot),
            PeerMsg::Commit {
                partition, offset, ..
            } => entry
                .stream
                .commit(g, id, partition, offset)
                .map_err(|v| v.0),
            PeerMsg::Seek {
                partition, offset, ..
            } => {
                let result = entry
                    .stream
                    .seek(g, partition, offset)
                    .map_err(|e| WireRefusal {
                        code: ErrorCode::OffsetGone,
                        message: e.to_string(),
                    });
                entry.dirty = true;
                self.send_to(node, PeerMsg::SeekDone { member, result });
                return;
            }
            _ => Ok(()),
        };
        entry.dirty = true;
        if let Err(why) = res {
            limited!(
                WARN,
                session = id,
                peer = node,
                member,
                "consumer on another host broke the protocol: {why}"
            );
            self.remote_evict(id, &why);
        }
    }

    /// Queues `msg` for peer `node`.
    pub(super) fn send_to(&self, node: &str, msg: PeerMsg) {
        if let Some(c) = &self.cluster {
            c.peers.send(node, msg);
        }
    }
}
