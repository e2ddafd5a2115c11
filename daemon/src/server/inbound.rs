//! The home side of publishing from another host: a producer there is a
//! producer of the stream here (a session id of this daemon among the
//! stream's producers), granted free slots of the pool like a local one.
//! Its host writes each batch into a granted slot (header, metadata, then
//! the payload with an immediate naming this inbox and the slot); when the
//! immediate arrives the batch is published, and its host is told, so that
//! the producer's publish is acknowledged once the home holds the batch.
//! Its end of epoch and its leaving come the same way, in order behind its
//! batches.

use std::sync::Arc;

use ferry_shm::proto::ErrorCode;

use super::Server;
use crate::error::Refusal;
use crate::fabric::Registered;
use crate::idhash::IdSet;
use crate::landing::{Header, Kind, CONTROL_SLOT, HEADER_BYTES};
use crate::limited;
use crate::peers::{PeerMsg, Producing, WireRefusal};
use crate::stream::SessionId;

/// A producer on another host.
pub(super) struct RemoteProducer {
    pub(super) node: String,
    /// Its host's id for it.
    pub(super) producer: u64,
    pub(super) stream: usize,
    pub(super) granted: IdSet<u32>,
    pub(super) credits: u32,
    pub(super) published: u64,
    pub(super) ended: bool,
    /// A disk stream: its publishes not yet as durable as the stream
    /// promises, and their outbox slots, handed back (`Published`) only
    /// once they are, so that its host acknowledges durable batches.
    pub(super) acks: super::durable::Acks,
    pub(super) unacked_slots: std::collections::VecDeque<u32>,
    inbox: u16,
    /// One header entry per pool slot, then its control entry.
    headers: Arc<Registered>,
}

/// What an immediate that arrived here names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Landed {
    /// A trainer here reading a stream homed elsewhere.
    Consumer(SessionId),
    /// A producer elsewhere publishing into a stream homed here.
    Producer(SessionId),
}

impl Server {
    /// A producer on `node` publishes into a stream homed here.
    pub(super) fn remote_produce(&mut self, node: &str, producer: u64, stream: String, uid: u32) {
        if let Some(old) = self
            .remote_producer_ids
            .get(&(node.to_string(), producer))
            .copied()
        {
            self.remote_producer_gone(old, "it opened again");
        }
        let result = self
            .remote_produce_inner(node, producer, &stream, uid)
            .map_err(|r| WireRefusal {
                code: r.code,
                message: r.message,
            });
        self.send_to(node, PeerMsg::Producing { producer, result });
    }

    fn remote_produce_inner(
        &mut self,
        node: &str,
        producer: u64,
        name: &str,
        uid: u32,
    ) -> Result<Producing, Refusal> {
        let Some(&idx) = self.by_name.get(name) else {
            return Err(Refusal::new(
                ErrorCode::UnknownStream,
                format!("no stream named {name:?} has its home here"),
            ));
        };
        self.may_use(idx, uid, true)
            .map_err(|m| Refusal::new(ErrorCode::PermissionDenied, m))?;
        let spec = self.streams[idx].stream.spec().clone();
        if spec.slot_count > CONTROL_SLOT as u32 {
            return Err(Refusal::new(
                ErrorCode::Unsupported,
                format!(
                    "stream {name} has {} slots; producers on other hosts need at most {}",
                    spec.slot_count, CONTROL_SLOT
                ),
            ));
        }
        let pool = self.registered_pool(idx)?;
        let headers = self.registered_region(
            &format!("ferry-inbox-{node}-{producer}"),
            (spec.slot_count as u64 + 1) * HEADER_BYTES,
            true,
            "an inbox",
        )?;
        let inbox = self
            .free_landing_id()
            .ok_or_else(|| Refusal::limit("65536 landing areas and inboxes in use"))?;
        let id = self.next_session;
        self.next_session += 1;
        let credits = (spec.slot_count / 4).clamp(1, 64);
        let entry = &mut self.streams[idx];
        entry.producers.push(id);
        entry.dirty = true;
        entry.idle_since = None;
        self.landings.insert(inbox, Landed::Producer(id));
        self.remote_producer_ids
            .insert((node.to_string(), producer), id);
        limited!(
            INFO,
            session = id,
            peer = node,
            producer,
            stream = name,
            "producer on another host opened"
        );
        let info = Producing {
            partitions: spec.partitions,
            slot_size: spec.slot_size,
            slot_count: spec.slot_count,
            pool_addr: pool.addr(),
            pool_rkey: pool.rkey(),
            header_addr: headers.addr(),
            header_rkey: headers.rkey(),
            inbox,
        };
        self.remote_producers.insert(
            id,
            RemoteProducer {
                node: node.to_string(),
                producer,
                stream: idx,
                granted: IdSet::default(),
                credits,
                published: 0,
                ended: false,
                acks: Default::default(),
                unacked_slots: Default::default(),
                inbox,
                headers,
            },
        );
        Ok(info)
    }

    /// Producer `id` on another host is gone: its granted slots are free
    /// again, and its end of epoch (if it said one) still counts.
    pub(super) fn remote_producer_gone(&mut self, id: SessionId, why: &str) {
        let Some(p) = self.remote_producers.remove(&id) else {
            return;
        };
        self.remote_producer_ids
            .remove(&(p.node.clone(), p.producer));
        self.landings.remove(&p.inbox);
        self.retire(p.inbox, vec![p.headers]);
        if let Some(e) = self
            .streams
            .slots
            .get_mut(p.stream)
            .and_then(Option::as_mut)
        {
            for slot in p.granted {
                e.stream.return_grant(id, slot);
            }
            e.producers.retain(|&x| x != id);
            e.dirty = true;
        }
        limited!(INFO, session = id, peer = %p.node, published = p.published, "producer on another host closed ({why})");
        self.maybe_end_epoch(p.stream, p.ended);
    }

    /// Ends producer `id` on another host and tells its host why.
    pub(super) fn remote_producer_evict(&mut self, id: SessionId, code: ErrorCode, why: &str) {
        if let Some(p) = self.remote_producers.get(&id) {
            let (node, producer) = (p.node.clone(), p.producer);
            self.send_to(
                &node,
                PeerMsg::Producing {
                    producer,
                    result: Err(WireRefusal {
                        code,
                        message: why.to_string(),
                    }),
                },
            );
        }
        self.remote_producer_gone(id, why);
    }

    /// Every producer on `node` goes (it is down).
    pub(super) fn remote_producers_gone(&mut self, node: &str, why: &str) {
        for id in super::ids_where(&self.remote_producers, |p| p.node == node) {
            self.remote_producer_gone(id, why);
        }
    }

    /// A write from producer `id`'s host arrived in slot `slot` (or its
    /// control entry).
    pub(super) fn inbound(&mut self, node: &str, id: SessionId, slot: u16) {
        if let Err(why) = self.inbound_inner(node, id, slot) {
            limited!(
                WARN,
                session = id,
                peer = node,
                "a producer on another host broke the protocol: {why}"
            );
            self.remote_producer_evict(id, ErrorCode::Protocol, &why);
        }
    }

    fn inbound_inner(&mut self, node: &str, id: SessionId, slot: u16) -> Result<(), String> {
        let Some(p) = self.remote_producers.get_mut(&id) else {
            return Ok(());
        };
        if p.node != node {
            return Err(format!("a write from {node} into {}'s inbox", p.node));
        }
        let entry = &mut self.streams[p.stream];
        let slot_count = entry.stream.spec().slot_count;
        let index = if slot == CONTROL_SLOT {
            slot_count
        } else {
            slot as u32
        };
        if index > slot_count {
            return Err(format!("a write into slot {slot} of {slot_count}"));
        }
        let mut hb = [0u8; HEADER_BYTES as usize];
        if !p
            .headers
            .region()
            .read_shared(index as u64 * HEADER_BYTES, &mut hb)
        {
            return Err("reading an inbox header".into());
        }
        let h = Header::decode(&hb)?;
        if h.member != p.producer {
            return Err(format!(
                "a header of producer {} in {}'s inbox",
                h.member, p.producer
            ));
        }
        let producer = p.producer;
        match (h.kind, slot == CONTROL_SLOT) {
            (Kind::Batch, false) => {
                if !p.granted.contains(&index) {
                    return Err(format!(
                        "a batch written into slot {index}, which it was not granted"
                    ));
                }
                let key = (h.flags & ferry_shm::desc::FLAG_HAS_KEY != 0).then_some(h.key);
                let flags = if h.flags & ferry_shm::desc::FLAG_RECORD != 0 {
                    crate::stream::ENTRY_RECORD
                } else {
                    0
                };
                let at = entry
                    .stream
                    .publish(id, index, h.len, h.meta_len, key, None, flags)
                    .map_err(|v| v.0)?;
                p.granted.remove(&index);
                p.published += 1;
                p.ended = false;
                entry.dirty = true;
                // `home_slot` carries its outbox slot, which it may use again:
                // at once for a memory stream; for a disk stream once the
                // batch is durable (the pump's acknowledgements).
                let outbox_slot = h.home_slot;
                if entry.stream.tiered() {
                    p.acks.published(&entry.stream, at);
                    p.unacked_slots.push_back(outbox_slot);
                } else {
                    self.send_to(
                        node,
                        PeerMsg::Published {
                            producer,
                            outbox_slot,
                        },
                    );
                }
            }
            (Kind::ProducerEnd, true) => {
                p.ended = true;
                let idx = p.stream;
                self.send_to(node, PeerMsg::EndTaken { producer });
                self.maybe_end_epoch(idx, false);
            }
            (Kind::ProducerLeave, true) => self.remote_producer_gone(id, "its producer closed"),
            (k, c) => {
                return Err(format!(
                    "a {k:?} record in {} slot",
                    if c { "the control" } else { "a pool" }
                ))
            }
        }
        Ok(())
    }
}

impl Server {
    /// Grants to producers on other hosts (in the pump): returns the slots
    /// granted to each, to tell their hosts.
    pub(super) fn grant_remote(
        entry: &mut super::catalog::StreamEntry,
        p: &mut RemoteProducer,
        pid: SessionId,
        out: &mut Vec<(String, u64, u32)>,
    ) -> bool {
        if p.granted.len() as u32 >= p.credits {
            return false;
        }
        let Some(slot) = entry.stream.grant(pid) else {
            return false;
        };
        p.granted.insert(slot);
        out.push((p.node.clone(), p.producer, slot));
        true
    }
}
