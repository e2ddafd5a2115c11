//! The producer-host side of publishing into a stream homed on another
//! daemon. The producer's session gets an outbox: a few slots here
//! (granted to it like pool slots) that it writes batches into. Each
//! publish waits for a slot of the home's pool that the home granted (the
//! home's credits), then goes there over the fabric: the header, the
//! metadata, then the payload with an immediate naming the producer's
//! inbox and the slot. The outbox slot goes back to the producer only once
//! the home says the batch is in the stream: a publish is acknowledged
//! when the home holds it. Ends of epoch and the producer's leaving follow
//! its batches over the same connection, so they land in order.
//!
//! A producer that publishes from GPU memory writes into a mirror of its
//! outbox on its GPU; each such publish is copied into its outbox slot
//! (on the producer's CUDA stream) before it goes, and its publishes and
//! ends of epoch go in the order they came, copies or not.
//!
//! When the home goes down, the producer's session fails (with why):
//! batches published since the last acknowledgement may be lost with it.

use std::collections::VecDeque;
use std::sync::Arc;

use ferry_shm::desc::{self, Desc};
use ferry_shm::layout::{PoolLayout, META_MAX};
use ferry_shm::proto::{ErrorCode, Response, SessionInfo, StreamSpec};
use ferry_shm::{Region, RingConsumer, RingProducer};

use super::sessions::{Rings, Role};
use super::Server;
use crate::error::Refusal;
use crate::fabric::{Registered, Write};
use crate::gpu::GpuPublish;
use crate::landing::{Header, Imm, Kind, CONTROL_SLOT, HEADER_BYTES};
use crate::limited;
use crate::peers::{PeerMsg, Producing, WireRefusal};
use crate::stream::{SessionId, Violation};

/// What waits to go to the home, in order.
enum Queued {
    Batch {
        slot: u32,
        len: u64,
        meta_len: u32,
        flags: u16,
        key: u64,
    },
    End,
    Leave,
}

impl Queued {
    /// A producer's publish (or end of epoch), once its copy from GPU
    /// memory (if any) completed.
    fn of(d: &Desc) -> Queued {
        match d.op {
            desc::OP_END => Queued::End,
            _ => Queued::Batch {
                slot: d.slot,
                len: d.len,
                meta_len: d.meta_len,
                flags: d.flags & (desc::FLAG_HAS_KEY | desc::FLAG_RECORD),
                key: d.key,
            },
        }
    }
}

/// A producer here of a stream homed on another host.
pub(super) struct Outbox {
    pub(super) node: String,
    pub(super) stream: String,
    uid: u32,
    _region: Arc<Region>,
    pub(super) sub: RingConsumer,
    comp: RingProducer,
    /// The outbox's slots and their headers (one more for control
    /// records).
    pool: Arc<Registered>,
    staging: Arc<Registered>,
    layout: PoolLayout,
    /// Outbox slots the producer holds (granted, not yet published).
    with_producer: Vec<bool>,
    queue: VecDeque<Queued>,
    /// Slots of the home's pool granted for this producer's batches.
    home_grants: VecDeque<u32>,
    /// Where to write at the home, once it answered.
    home: Option<(Producing, PoolLayout)>,
    /// A control record is on its way (its entry is in use).
    end_outstanding: bool,
    /// The producer's ends of epoch the home took, and whether the last
    /// count is still to be told (`OP_END_TAKEN`; its ring was full).
    ends_taken: u64,
    ends_untold: bool,
    /// The Produce was sent.
    sent: bool,
    answered: bool,
    pub(super) published: u64,
    pub(super) acked: u64,
    /// The home's stream is on disk: the producer is told of its durable
    /// publishes (OP_ACK, as the home's own producers are).
    acks: bool,
    /// A producer publishing from GPU memory: the outbox's mirror there,
    /// and the copies out of it in order.
    pub(super) gpu: Option<GpuPublish>,
}

impl Outbox {
    pub(super) fn status(&self, session: SessionId, pid: i32) -> ferry_admin::RemoteProducerStatus {
        ferry_admin::RemoteProducerStatus {
            session,
            pid,
            stream: self.stream.clone(),
            home: self.node.clone(),
            state: if self.answered { "active" } else { "opening" }.to_string(),
            published: self.published,
            acked: self.acked,
            device: self
                .gpu
                .as_ref()
                .map(|g| format!("cuda:{}", g.info.ordinal)),
        }
    }

    /// Tells the producer how many of its ends of epoch the home took
    /// (`OP_END_TAKEN`, cumulative), or keeps it for a later try.
    fn tell_ends_taken(&mut self) {
        self.ends_untold = !super::sessions::push_ends_taken(&mut self.comp, self.ends_taken);
    }

    fn grant(&mut self, slot: u32) -> Result<(), String> {
        let d = Desc {
            op: desc::OP_GRANT,
            stream: 0,
            slot,
            ..Desc::default()
        };
        self.comp.push(&d).map_err(|e| e.to_string())?;
        self.with_producer[slot as usize] = true;
        if self.comp.wake_needed() {
            ferry_shm::sys::futex_wake(self.comp.ring().sleep_word());
        }
        Ok(())
    }

    /// Queues the publishes whose copies from GPU memory completed, in
    /// order; returns how many.
    pub(super) fn complete_copies(&mut self) -> Result<usize, String> {
        let Some(g) = &mut self.gpu else {
            return Ok(0);
        };
        let queue = &mut self.queue;
        g.complete(|d| {
            queue.push_back(Queued::of(d));
            Ok(())
        })
    }
}

impl Server {
    /// Opens a producer of a stream homed on another host: the answer
    /// comes when the home has answered.
    pub(super) fn open_remote_producer(
        &mut self,
        id: SessionId,
        name: String,
        spec: Option<StreamSpec>,
        device: (Option<u32>, Option<String>),
    ) {
        let uid = self.sessions.get(&id).map_or(u32::MAX, |s| s.cred.uid);
        if let Err(r) = self.open_remote_producer_inner(id, name, spec, device, uid) {
            self.refuse(id, r);
        }
    }

    fn open_remote_producer_inner(
        &mut self,
        id: SessionId,
        name: String,
        spec: Option<StreamSpec>,
        device: (Option<u32>, Option<String>),
        uid: u32,
    ) -> Result<(), Refusal> {
        self.check_open(id)?;
        let ordinal = self.gpus.resolve_device(&device)?;
        let (node, have) = self.remote_home(&name)?;
        if let Some(want) = spec {
            let have = have.spec();
            if want != have {
                return Err(Refusal::new(
                    ErrorCode::StreamMismatch,
                    format!(
                        "stream {name} exists at its home, {node}, with {}, not {}",
                        have.describe(),
                        want.describe()
                    ),
                ));
            }
        }
        // With acknowledgements each returned slot puts a grant and an
        // acknowledgement on the producer's completion ring: room for both.
        let acks = have.durability.disk;
        let ring_share = if acks {
            (self.cfg.daemon.ring_capacity / 2).max(1)
        } else {
            self.cfg.daemon.ring_capacity
        };
        let slots = (have.slot_count / 4).clamp(1, 64).min(ring_share);
        let layout = PoolLayout::new(have.slot_size, slots)
            .ok_or_else(|| Refusal::invalid("the outbox's size overflows"))?;
        let reg = |what: &str, len: u64| {
            self.registered_region(
                &format!("ferry-outbox-{what}-{id}"),
                len,
                false,
                "an outbox",
            )
        };
        let pool = reg("pool", layout.total)?;
        let staging = reg("headers", (slots as u64 + 1) * HEADER_BYTES)?;
        let gpu = match ordinal {
            None => None,
            Some(n) => {
                Some(
                    self.gpus
                        .publisher_for_outbox(n, pool.region(), have.slot_size, slots)?,
                )
            }
        };
        let (rings, _) = self.new_rings(id)?;
        let Rings { _region, sub, comp } = rings;
        if gpu.is_some() {
            self.gpu_sessions += 1;
        }
        let device_name = gpu.as_ref().map(|g| format!("cuda:{}", g.info.ordinal));
        limited!(INFO, session = id, stream = %name, home = %node, device = device_name.as_deref().unwrap_or("host"), "producer of a stream homed on another host: opening there");
        let o = Outbox {
            node: node.clone(),
            stream: name,
            uid,
            _region,
            sub,
            comp,
            pool,
            staging,
            layout,
            with_producer: vec![false; slots as usize],
            queue: VecDeque::new(),
            home_grants: VecDeque::new(),
            home: None,
            end_outstanding: false,
            ends_taken: 0,
            ends_untold: false,
            sent: false,
            answered: false,
            published: 0,
            acked: 0,
            acks,
            gpu,
        };
        if let Some(s) = self.sessions.get_mut(&id) {
            s.role = Role::Outbox(Box::new(o));
        }
        self.send_produces(&node);
        Ok(())
    }

    /// The outbox of producer session `id` (open, or closing).
    fn outbox_mut(&mut self, id: SessionId) -> Option<&mut Outbox> {
        match self.sessions.get_mut(&id).map(|s| &mut s.role) {
            Some(Role::Outbox(o)) => Some(o),
            _ => self
                .closing_outboxes
                .iter_mut()
                .find(|(i, _)| *i == id)
                .map(|(_, o)| o.as_mut()),
        }
    }

    /// Sends the Produce of producers waiting for `node`, once there is a
    /// data link to it.
    pub(super) fn send_produces(&mut self, node: &str) {
        let Some(cl) = &self.cluster else {
            return;
        };
        if cl.link(node).is_none() {
            return;
        }
        for (id, s) in self.sessions.iter_mut() {
            if let Role::Outbox(o) = &mut s.role {
                if o.node == node && !o.sent {
                    o.sent = true;
                    cl.peers.send(
                        node,
                        PeerMsg::Produce {
                            producer: *id,
                            stream: o.stream.clone(),
                            uid: o.uid,
                        },
                    );
                }
            }
        }
    }

    /// The home answered a Produce (or failed the producer later).
    pub(super) fn outbox_producing(
        &mut self,
        node: &str,
        producer: u64,
        result: Result<Producing, WireRefusal>,
    ) {
        let cap = self.cfg.daemon.ring_capacity;
        let Some(o) = self.outbox_mut(producer) else {
            return;
        };
        if o.node != node {
            return;
        }
        let info = match result {
            Err(r) if !o.answered => {
                if o.gpu.take().is_some() {
                    self.gpu_sessions -= 1;
                }
                if let Some(s) = self.sessions.get_mut(&producer) {
                    s.role = Role::Control;
                }
                self.closing_outboxes.retain(|(i, _)| *i != producer);
                return self.refuse(
                    producer,
                    Refusal::new(
                        r.code,
                        format!("at the stream's home, {node}: {}", r.message),
                    ),
                );
            }
            Err(r) => {
                return self.fail_session(
                    producer,
                    &format!("the stream's home, {node}, ended it: {}", r.message),
                )
            }
            Ok(info) => info,
        };
        if o.answered {
            return;
        }
        let Some(home_layout) = PoolLayout::new(info.slot_size, info.slot_count) else {
            return self.fail_session(producer, "the home's pool layout overflows");
        };
        o.answered = true;
        let session = SessionInfo {
            session: producer,
            stream_id: 0,
            partitions: info.partitions,
            slot_size: o.layout.slot_size,
            slot_count: o.layout.slot_count,
            ring_capacity: cap,
            credits: o.layout.slot_count,
            gpu: o.gpu.as_ref().map(|g| g.info.clone()),
            acks: o.acks,
        };
        o.home = Some((info, home_layout));
        let fds = [o._region.fd(), o.pool.region().fd()];
        let closing = self.closing_outboxes.iter().any(|(i, _)| *i == producer);
        if closing {
            // Its producer left before the home answered.
            if let Some(o) = self.outbox_mut(producer) {
                o.queue.push_back(Queued::Leave);
            }
            return self.pump_outbox(producer);
        }
        self.reply(producer, &Response::Opened(session), &fds);
        let Some(o) = self.outbox_mut(producer) else {
            return;
        };
        for slot in 0..o.layout.slot_count {
            if let Err(e) = o.grant(slot) {
                return self.fail_session(producer, &e);
            }
        }
    }

    /// A producer's submissions: publishes and ends of epoch, queued for
    /// the home.
    pub(super) fn drain_outbox(&mut self, id: SessionId) -> Result<usize, Violation> {
        let Some(Role::Outbox(o)) = self.sessions.get_mut(&id).map(|s| &mut s.role) else {
            return Ok(0);
        };
        let mut n = 0;
        while let Some(d) = o.sub.pop().map_err(|e| Violation(e.to_string()))? {
            n += 1;
            match d.op {
                desc::OP_PUBLISH => {
                    let slot = d.slot as usize;
                    if !o.with_producer.get(slot).copied().unwrap_or(false) {
                        return Err(Violation(format!(
                            "publish of slot {}, which it was not granted",
                            d.slot
                        )));
                    }
                    if d.len > o.layout.slot_size || d.meta_len > META_MAX {
                        return Err(Violation(format!(
                            "publish of {} bytes with {} of metadata into {}-byte slots",
                            d.len, d.meta_len, o.layout.slot_size
                        )));
                    }
                    o.with_producer[slot] = false;
                    o.published += 1;
                    match &mut o.gpu {
                        // Goes once its copy into the outbox slot is done
                        // (progress_gpu), in order.
                        Some(g) => {
                            let off = o.layout.slot_offset(d.slot).ok_or_else(|| {
                                Violation(format!("publish of slot {} out of range", d.slot))
                            })?;
                            g.queue(d, off).map_err(Violation)?;
                        }
                        None if d.flags & desc::FLAG_DEVICE != 0 => {
                            return Err(Violation(
                                "publish from GPU memory by a producer opened for host memory"
                                    .into(),
                            ));
                        }
                        None => o.queue.push_back(Queued::of(&d)),
                    }
                }
                desc::OP_END => match &mut o.gpu {
                    // After the copies of the publishes before it.
                    Some(g) => g.queue(d, 0).map_err(Violation)?,
                    None => o.queue.push_back(Queued::End),
                },
                op => return Err(Violation(format!("producer sent op {op}"))),
            }
        }
        if n > 0 {
            self.pump_outbox(id);
        }
        Ok(n)
    }

    /// Sends what waits in `id`'s outbox as far as the home's grants go.
    pub(super) fn pump_outbox(&mut self, id: SessionId) {
        let link = self
            .outbox_mut(id)
            .map(|o| o.node.clone())
            .and_then(|n| self.cluster.as_ref().and_then(|c| c.link(&n)));
        let Some(link) = link else {
            return; // no data link: its session fails with the peer
        };
        let mut err = None;
        let mut done = false;
        if let Some(o) = self.outbox_mut(id) {
            if o.ends_untold {
                o.tell_ends_taken();
            }
            let Some((home, home_layout)) = o.home.clone() else {
                return;
            };
            let control = o.layout.slot_count as u64 * HEADER_BYTES;
            while let Some(q) = o.queue.front() {
                let res = match q {
                    Queued::Batch {
                        slot,
                        len,
                        meta_len,
                        flags,
                        key,
                    } => {
                        let Some(hs) = o.home_grants.pop_front() else {
                            break;
                        };
                        let h = Header {
                            kind: Kind::Batch,
                            member: id,
                            partition: 0,
                            offset: 0,
                            len: *len,
                            meta_len: *meta_len,
                            flags: *flags,
                            home_slot: *slot,
                            epoch: 0,
                            key: *key,
                        };
                        let hoff = *slot as u64 * HEADER_BYTES;
                        let wr_id = link.next_wr_id();
                        let (src_slot, src_meta) = (
                            o.layout.slot_offset(*slot).unwrap_or(0),
                            o.layout.meta_offset(*slot).unwrap_or(0),
                        );
                        let (dst_slot, dst_meta) = (
                            home_layout.slot_offset(hs).unwrap_or(0),
                            home_layout.meta_offset(hs).unwrap_or(0),
                        );
                        let imm = Imm {
                            landing: home.inbox,
                            slot: hs as u16,
                        }
                        .encode();
                        o.staging.region().write(hoff, &h.encode());
                        link.write(&Write {
                            wr_id,
                            src: &o.staging,
                            src_offset: hoff,
                            len: HEADER_BYTES as u32,
                            remote_addr: home.header_addr + hs as u64 * HEADER_BYTES,
                            rkey: home.header_rkey,
                            imm: None,
                            signaled: false,
                            timed: false,
                        })
                        .and_then(|()| {
                            if *meta_len == 0 {
                                return Ok(());
                            }
                            link.write(&Write {
                                wr_id,
                                src: &o.pool,
                                src_offset: src_meta,
                                len: *meta_len,
                                remote_addr: home.pool_addr + dst_meta,
                                rkey: home.pool_rkey,
                                imm: None,
                                signaled: false,
                                timed: false,
                            })
                        })
                        .and_then(|()| {
                            link.write(&Write {
                                wr_id,
                                src: &o.pool,
                                src_offset: src_slot,
                                len: *len as u32,
                                remote_addr: home.pool_addr + dst_slot,
                                rkey: home.pool_rkey,
                                imm: Some(imm),
                                signaled: true,
                                timed: false,
                            })
                        })
                    }
                    Queued::End | Queued::Leave => {
                        if o.end_outstanding {
                            break;
                        }
                        let leave = matches!(q, Queued::Leave);
                        let h = Header {
                            kind: if leave {
                                Kind::ProducerLeave
                            } else {
                                Kind::ProducerEnd
                            },
                            member: id,
                            partition: 0,
                            offset: 0,
                            len: 0,
                            meta_len: 0,
                            flags: 0,
                            home_slot: 0,
                            epoch: 0,
                            key: 0,
                        };
                        o.staging.region().write(control, &h.encode());
                        let wr_id = link.next_wr_id();
                        o.end_outstanding = !leave;
                        done |= leave;
                        link.write(&Write {
                            wr_id,
                            src: &o.staging,
                            src_offset: control,
                            len: HEADER_BYTES as u32,
                            remote_addr: home.header_addr + home.slot_count as u64 * HEADER_BYTES,
                            rkey: home.header_rkey,
                            imm: None,
                            signaled: false,
                            timed: false,
                        })
                        .and_then(|()| {
                            link.write(&Write {
                                wr_id,
                                src: &o.staging,
                                src_offset: control,
                                len: 0,
                                remote_addr: home.header_addr
                                    + home.slot_count as u64 * HEADER_BYTES,
                                rkey: home.header_rkey,
                                imm: Some(
                                    Imm {
                                        landing: home.inbox,
                                        slot: CONTROL_SLOT,
                                    }
                                    .encode(),
                                ),
                                signaled: true,
                                timed: false,
                            })
                        })
                    }
                };
                if let Err(e) = res {
                    err = Some(e);
                    break;
                }
                o.queue.pop_front();
            }
        }
        if let Some(e) = err {
            return self.fail_session(id, &format!("writing to the stream's home: {e}"));
        }
        if done {
            // Its leave went out: nothing more will come of it.
            if let Some(pos) = self.closing_outboxes.iter().position(|(i, _)| *i == id) {
                let (_, o) = self.closing_outboxes.remove(pos);
                drop(o); // the link holds what its writes still read
            }
        }
    }

    /// The home granted slots, said a batch is in, or took an end.
    pub(super) fn outbox_message(&mut self, node: &str, msg: PeerMsg) {
        let producer = match &msg {
            PeerMsg::Grant { producer, .. }
            | PeerMsg::Published { producer, .. }
            | PeerMsg::EndTaken { producer } => *producer,
            _ => return,
        };
        let Some(o) = self.outbox_mut(producer) else {
            return;
        };
        if o.node != node {
            return;
        }
        let res = match msg {
            PeerMsg::Grant { slots, .. } => {
                let count = o.home.as_ref().map_or(0, |(h, _)| h.slot_count);
                if slots.iter().any(|&s| s >= count) {
                    Err(format!("the home granted a slot out of its {count}"))
                } else {
                    o.home_grants.extend(slots);
                    Ok(())
                }
            }
            PeerMsg::Published { outbox_slot, .. } => {
                if outbox_slot >= o.layout.slot_count || o.with_producer[outbox_slot as usize] {
                    Err(format!(
                        "the home acknowledged outbox slot {outbox_slot}, which it does not have"
                    ))
                } else {
                    o.acked += 1;
                    o.grant(outbox_slot).map(|()| {
                        if o.acks {
                            // Cumulative: one lost to a full ring is made
                            // good by the next.
                            let d = Desc {
                                op: desc::OP_ACK,
                                stream: 0,
                                offset: o.acked,
                                ..Desc::default()
                            };
                            if o.comp.push(&d).is_ok() && o.comp.wake_needed() {
                                ferry_shm::sys::futex_wake(o.comp.ring().sleep_word());
                            }
                        }
                    })
                }
            }
            PeerMsg::EndTaken { .. } => {
                o.end_outstanding = false;
                o.ends_taken += 1;
                o.tell_ends_taken();
                Ok(())
            }
            _ => Ok(()),
        };
        match res {
            Ok(()) => self.pump_outbox(producer),
            Err(e) => self.fail_session(producer, &e),
        }
    }

    /// The producer's session closed: what it published goes on to the
    /// home, then its leave.
    pub(super) fn outbox_closed(&mut self, id: SessionId, mut o: Box<Outbox>) {
        if let Some(mut g) = o.gpu.take() {
            // Everything it published goes: its copies finish first (and
            // before the outbox is unregistered from the GPU, as `g` goes).
            let queue = &mut o.queue;
            if let Err(e) = g.finish(|d| {
                queue.push_back(Queued::of(d));
                Ok(())
            }) {
                limited!(WARN, session = id, "while closing: {e}");
            }
            self.gpu_sessions -= 1;
        }
        limited!(INFO, session = id, stream = %o.stream, home = %o.node, published = o.published, acknowledged = o.acked, "producer of a stream homed on another host closed");
        if !o.sent {
            return;
        }
        if o.home.is_some() {
            o.queue.push_back(Queued::Leave);
        }
        self.closing_outboxes.push((id, o));
        self.pump_outbox(id);
    }

    /// The home went down: its producers here fail, their closing
    /// outboxes go.
    pub(super) fn outboxes_fail(&mut self, node: &str) {
        self.closing_outboxes.retain(|(_, o)| o.node != node);
        let ids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| matches!(&s.role, Role::Outbox(o) if o.node == node))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.fail_session(
                id,
                &format!("the stream's home, {node}, went down; batches published since its last acknowledgement may be lost"),
            );
        }
    }
}
