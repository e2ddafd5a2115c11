//! Delivery targets. A consumer group hands each batch it assigns to a
//! member to that member's [`Sink`], which gets it into the consumer's
//! hands: a descriptor on a host consumer's completion ring
//! ([`HostRing`]), or a copy into a GPU consumer's pool and then a
//! descriptor ([`GpuPool`]); a consumer on another host will be a third.
//! The pump that feeds sinks never asks which kind it has.

use ferry_shm::desc::Desc;
use ferry_shm::{RingError, RingProducer};

use crate::gpu::GpuDelivery;
use crate::stream::Violation;

/// A batch offered to a sink.
pub struct Batch {
    /// Its descriptor as the consumer will see it (`OP_DELIVER`).
    pub desc: Desc,
    /// Where its bytes are in the stream's host pool.
    pub pool_offset: u64,
    /// When it was published from GPU memory: that stream's mirror on the
    /// GPU, and the offset of the batch there.
    pub from_gpu: Option<(ferry_cuda::Mem, u64)>,
}

/// What `ferry status` shows of a sink.
#[derive(Debug, Default, Clone)]
pub struct SinkStatus {
    /// Descriptors on the consumer's completion ring, not yet read.
    pub ring_occupancy: u32,
    /// "cuda:N" for GPU delivery.
    pub device: Option<String>,
    pub copies_in_flight: u32,
    pub bytes_copied: u64,
    /// Of those, copied from GPU memory.
    pub bytes_from_gpu: u64,
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
        }
    }
}
