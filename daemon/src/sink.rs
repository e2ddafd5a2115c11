//! Delivery targets. A consumer group hands each batch it assigns to a
//! member to that member's [`Sink`], which gets it into the consumer's
//! hands: a descriptor on a host consumer's completion ring
//! ([`HostRing`]), or a copy into a GPU consumer's pool and then a
//! descriptor ([`GpuPool`]); a consumer on another host will be a third.
//! The pump that feeds sinks never asks which kind it has.

use ferry_shm::desc::Desc;
use ferry_shm::{RingError, RingProducer};

use std::collections::VecDeque;
use std::sync::Arc;

use ferry_shm::layout::PoolLayout;

use crate::fabric::{Link, Registered, Write};
use crate::gpu::GpuDelivery;
use crate::landing::{Header, Imm, Kind, HEADER_BYTES};
use crate::peers::Landing;
use crate::stream::Violation;

/// A batch offered to a sink.
pub struct Batch {
    /// Its descriptor as the consumer will see it (`OP_DELIVER`).
    pub desc: Desc,
    /// Where its bytes are in the stream's host pool.
    pub pool_offset: u64,
    /// Where its metadata is in the stream's host pool.
    pub meta_offset: u64,
    /// When it was published from GPU memory: that stream's mirror on the
    /// GPU, and the offset of the batch there.
    pub from_gpu: Option<(ferry_cuda::Mem, u64)>,
    /// When it was published, for the sampled batches (0: not timed).
    pub stamp: u32,
}

/// What `ferry status` shows of a sink.
#[derive(Debug, Default, Clone)]
pub struct SinkStatus {
    /// Descriptors on the consumer's completion ring, not yet read.
    pub ring_occupancy: u32,
    /// "cuda:N" for GPU delivery.
    pub device: Option<String>,
    pub copies_in_flight: u32,
    /// Copied into the consumer's GPU (GPU delivery).
    pub bytes_copied: u64,
    /// Of those, copied from GPU memory.
    pub bytes_from_gpu: u64,
    /// Free landing slots its host credited (remote sinks).
    pub credits: Option<u32>,
}

/// A delivery target of one consumer. Errors are the consumer's: its
/// session is failed, and the group goes on without it.
pub trait Sink {
    /// Takes `batch` for delivery (true), or cannot now (false: no room;
    /// offered again later).
    fn offer(&mut self, batch: Batch) -> Result<bool, String>;

    /// Tells the consumer an epoch ended (`d` is the `OP_END_OF_EPOCH`
    /// descriptor), after every batch offered before it has reached the
    /// consumer; false: not now.
    fn end_of_epoch(&mut self, d: &Desc) -> Result<bool, String>;

    /// Moves deliveries that finished in the background (copies) on to the
    /// consumer; returns how many reached it.
    fn complete(&mut self) -> Result<usize, String>;

    /// The consumer released a batch it was given: checked against what
    /// this sink delivered, before the group's bookkeeping sees it.
    fn release(&mut self, d: &Desc) -> Result<(), Violation>;

    /// Deliveries taken but not yet in the consumer's hands.
    fn pending(&self) -> usize;

    /// Whether deliveries finish in the background, so that `complete`
    /// must be called while `pending` is not zero.
    fn deferred(&self) -> bool;

    /// Waits for deliveries in flight that still read pool slots, and
    /// drops them (the consumer is going away).
    fn quiesce(&mut self);

    /// Wakes the consumer if it sleeps waiting for a delivery (after
    /// offers that were taken).
    fn wake(&mut self);

    /// Whether the consumer sleeps waiting for a delivery.
    fn consumer_sleeping(&self) -> bool;

    fn status(&self) -> SinkStatus;

    /// The consumer's host gave back slot `slot` of its landing area
    /// (remote sinks; the others have none and refuse it).
    fn returned(&mut self, slot: u32) -> Result<(), String> {
        Err(format!(
            "slot {slot} returned to a sink without a landing area"
        ))
    }
}

/// A consumer's completion ring, and whether it was pushed to since the
/// consumer was last woken.
struct Comp {
    ring: RingProducer,
    unwoken: bool,
}

impl Comp {
    fn new(ring: RingProducer) -> Comp {
        Comp {
            ring,
            unwoken: false,
        }
    }

    /// Pushes `d`: false when the ring is full; other errors are the
    /// consumer's broken ring.
    fn push(&mut self, d: &Desc) -> Result<bool, String> {
        match self.ring.push(d) {
            Ok(()) => {
                self.unwoken = true;
                Ok(true)
            }
            Err(RingError::Full) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    fn wake(&mut self) {
        if std::mem::take(&mut self.unwoken) && self.ring.wake_needed() {
            ferry_shm::sys::futex_wake(self.ring.ring().sleep_word());
        }
    }

    fn sleeping(&self) -> bool {
        self.ring
            .ring()
            .sleep_word()
            .load(std::sync::atomic::Ordering::Relaxed)
            == ferry_shm::ring::SLEEPING
    }

    fn occupancy(&self) -> u32 {
        self.ring.ring().occupancy()
    }
}

/// A consumer on this host reading host memory: the batch's slot in the
/// stream's pool, which it maps read-only, named by a descriptor on its
/// completion ring.
pub struct HostRing {
    comp: Comp,
}

impl HostRing {
    pub fn new(comp: RingProducer) -> HostRing {
        HostRing {
            comp: Comp::new(comp),
        }
    }
}

impl Sink for HostRing {
    fn offer(&mut self, batch: Batch) -> Result<bool, String> {
        self.comp.push(&batch.desc)
    }

    fn end_of_epoch(&mut self, d: &Desc) -> Result<bool, String> {
        self.comp.push(d)
    }

    fn complete(&mut self) -> Result<usize, String> {
        Ok(0)
    }

    fn release(&mut self, _d: &Desc) -> Result<(), Violation> {
        Ok(()) // the group checks the slot and offset
    }

    fn pending(&self) -> usize {
        0
    }

    fn deferred(&self) -> bool {
        false
    }

    fn quiesce(&mut self) {}

    fn wake(&mut self) {
        self.comp.wake();
    }

    fn consumer_sleeping(&self) -> bool {
        self.comp.sleeping()
    }

    fn status(&self) -> SinkStatus {
        SinkStatus {
            ring_occupancy: self.comp.occupancy(),
            ..SinkStatus::default()
        }
    }
}

/// A consumer on this host reading GPU memory: each batch is copied into
/// a slot of the consumer's GPU pool, and its descriptor (naming that GPU
/// slot) goes on the completion ring once the copy is done, in order.
pub struct GpuPool {
    comp: Comp,
    gpu: GpuDelivery,
}

impl GpuPool {
    pub fn new(comp: RingProducer, gpu: GpuDelivery) -> GpuPool {
        GpuPool {
            comp: Comp::new(comp),
            gpu,
        }
    }
}

impl Sink for GpuPool {
    fn offer(&mut self, batch: Batch) -> Result<bool, String> {
        self.gpu
            .start(batch.desc, batch.pool_offset, batch.from_gpu)
    }

    fn end_of_epoch(&mut self, d: &Desc) -> Result<bool, String> {
        if self.gpu.pending() > 0 {
            return Ok(false); // after the copies of that epoch
        }
        self.comp.push(d)
    }

    fn complete(&mut self) -> Result<usize, String> {
        let comp = &mut self.comp;
        let mut ring_err = None;
        let n = self.gpu.complete(|d| match comp.push(d) {
            Ok(taken) => taken,
            Err(e) => {
                ring_err = Some(e);
                false
            }
        })?;
        match ring_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    fn release(&mut self, d: &Desc) -> Result<(), Violation> {
        self.gpu.release(d.partition, d.offset, d.dslot)
    }

    fn pending(&self) -> usize {
        self.gpu.pending()
    }

    fn deferred(&self) -> bool {
        true
    }

    fn quiesce(&mut self) {
        self.gpu.quiesce();
    }

    fn wake(&mut self) {
        self.comp.wake();
    }

    fn consumer_sleeping(&self) -> bool {
        self.comp.sleeping()
    }

    fn status(&self) -> SinkStatus {
        SinkStatus {
            ring_occupancy: self.comp.occupancy(),
            device: Some(format!("cuda:{}", self.gpu.info.ordinal)),
            copies_in_flight: self.gpu.pending() as u32,
            bytes_copied: self.gpu.copied_bytes,
            bytes_from_gpu: self.gpu.d2d_bytes,
            credits: None,
        }
    }
}

/// A consumer on another host: each batch is written over the fabric into
/// a slot of its landing area that its daemon credited (see
/// `crate::landing`); without a credit, nothing is written.
pub struct RemoteSink {
    link: Arc<Link>,
    /// The stream's pool, registered: what the writes read.
    pool: Arc<Registered>,
    /// Headers are written from here, one entry per landing slot.
    staging: Arc<Registered>,
    landing: Landing,
    layout: PoolLayout,
    /// The consumer daemon's id of the member.
    member: u64,
    /// Landing slots free for a write, and which are.
    credits: VecDeque<u32>,
    credited: Vec<bool>,
    /// Out of credit since the last batch it had to hold back (counted
    /// once per stall in the link's stats).
    stalled: bool,
}

impl RemoteSink {
    /// `busy`: landing slots still in use from an earlier membership.
    pub fn new(
        link: Arc<Link>,
        pool: Arc<Registered>,
        staging: Arc<Registered>,
        landing: Landing,
        layout: PoolLayout,
        member: u64,
        busy: &[u32],
    ) -> RemoteSink {
        let mut credited = vec![true; landing.slots as usize];
        for &b in busy {
            if let Some(c) = credited.get_mut(b as usize) {
                *c = false;
            }
        }
        let credits = (0..landing.slots)
            .filter(|&i| credited[i as usize])
            .collect();
        RemoteSink {
            link,
            pool,
            staging,
            landing,
            layout,
            member,
            credits,
            credited,
            stalled: false,
        }
    }

    /// Writes `h` into landing slot `ls`'s header, then (for a batch) the
    /// metadata and payload, the last with the immediate.
    fn send(
        &mut self,
        ls: u32,
        h: &Header,
        meta: Option<(u64, u32)>,
        payload: (u64, u32),
        timed: bool,
    ) -> Result<(), String> {
        let hoff = ls as u64 * HEADER_BYTES;
        if !self.staging.region().write(hoff, &h.encode()) {
            return Err("the header staging area is too small".into());
        }
        let wr_id = self.link.next_wr_id();
        self.link.write(&Write {
            wr_id,
            src: &self.staging,
            src_offset: hoff,
            len: HEADER_BYTES as u32,
            remote_addr: self.landing.header_addr + hoff,
            rkey: self.landing.header_rkey,
            imm: None,
            signaled: false,
            timed: false,
        })?;
        let slot_off = self
            .layout
            .slot_offset(ls)
            .ok_or("landing slot out of range")?;
        if let Some((src, len)) = meta {
            let moff = self
                .layout
                .meta_offset(ls)
                .ok_or("landing slot out of range")?;
            self.link.write(&Write {
                wr_id,
                src: &self.pool,
                src_offset: src,
                len,
                remote_addr: self.landing.pool_addr + moff,
                rkey: self.landing.pool_rkey,
                imm: None,
                signaled: false,
                timed: false,
            })?;
        }
        self.link.write(&Write {
            wr_id,
            src: &self.pool,
            src_offset: payload.0,
            len: payload.1,
            remote_addr: self.landing.pool_addr + slot_off,
            rkey: self.landing.pool_rkey,
            imm: Some(
                Imm {
                    landing: self.landing.id,
                    slot: ls as u16,
                }
                .encode(),
            ),
            signaled: true,
            timed,
        })?;
        Ok(())
    }

    fn take_credit(&mut self) -> Option<u32> {
        let ls = self.credits.pop_front()?;
        self.credited[ls as usize] = false;
        Some(ls)
    }
}

impl Sink for RemoteSink {
    fn offer(&mut self, batch: Batch) -> Result<bool, String> {
        let d = &batch.desc;
        let Ok(len) = u32::try_from(d.len) else {
            return Err(format!("a batch of {} bytes", d.len));
        };
        let Some(ls) = self.take_credit() else {
            if !self.stalled {
                self.stalled = true;
                crate::fabric::LinkStats::add(&self.link.stats.credit_stalls, 1);
            }
            return Ok(false);
        };
        let h = Header {
            kind: Kind::Batch,
            member: self.member,
            partition: d.partition,
            offset: d.offset,
            len: d.len,
            meta_len: d.meta_len,
            flags: d.flags,
            home_slot: d.slot,
            epoch: 0,
            key: 0,
        };
        let meta = (d.meta_len > 0).then_some((batch.meta_offset, d.meta_len));
        self.send(ls, &h, meta, (batch.pool_offset, len), batch.stamp != 0)?;
        Ok(true)
    }

    fn end_of_epoch(&mut self, d: &Desc) -> Result<bool, String> {
        let Some(ls) = self.take_credit() else {
            return Ok(false);
        };
        let h = Header {
            kind: Kind::EndOfEpoch,
            member: self.member,
            partition: 0,
            offset: 0,
            len: 0,
            meta_len: 0,
            flags: 0,
            home_slot: 0,
            epoch: d.offset,
            key: 0,
        };
        // The payload write is empty: only the header and the immediate.
        self.send(ls, &h, None, (0, 0), false)?;
        Ok(true)
    }

    fn complete(&mut self) -> Result<usize, String> {
        Ok(0)
    }

    fn release(&mut self, _d: &Desc) -> Result<(), Violation> {
        Ok(()) // releases come from the consumer's daemon, as messages
    }

    fn pending(&self) -> usize {
        0
    }

    fn deferred(&self) -> bool {
        false
    }

    fn quiesce(&mut self) {}

    fn wake(&mut self) {}

    fn consumer_sleeping(&self) -> bool {
        false
    }

    fn status(&self) -> SinkStatus {
        SinkStatus {
            // Its bytes go over the fabric, not into a GPU: they are
            // counted per peer, not as GPU copies.
            credits: Some(self.credits.len() as u32),
            ..SinkStatus::default()
        }
    }

    fn returned(&mut self, slot: u32) -> Result<(), String> {
        match self.credited.get_mut(slot as usize) {
            None => Err(format!(
                "landing slot {slot} returned; the landing area has {}",
                self.landing.slots
            )),
            Some(true) => Err(format!("landing slot {slot} returned twice")),
            Some(c) => {
                *c = true;
                self.credits.push_back(slot);
                self.stalled = false;
                Ok(())
            }
        }
    }
}
