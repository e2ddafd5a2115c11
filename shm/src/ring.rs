//! Single-producer single-consumer descriptor rings in shared memory.
//!
//! Layout (all `#[repr(C)]`, 64-byte lines): a header line (magic, layout
//! version, capacity, descriptor size, initialised flag), then the consumer's
//! `head`, the producer's `tail` and the consumer's `sleep` word, each on its
//! own cache line, then `capacity` descriptors. Indices are free-running
//! `u32`s; `capacity` is a power of two.
//!
//! Each side keeps its own index privately and only *publishes* it to shared
//! memory, so a hostile peer can never move our index: the worst it can do
//! is publish a nonsensical index of its own, which we detect
//! ([`RingError::Corrupt`]) because `tail - head` must never exceed the
//! capacity.
//!
//! Wake-ups: the consumer that wants to sleep swaps `sleep` to `SLEEPING`,
//! re-checks `tail`, and only then sleeps (futex or epoll, chosen by the
//! caller). The producer, after publishing `tail`, swaps `sleep` to `AWAKE`
//! and wakes the consumer only if it read `SLEEPING`. Both are
//! read-modify-writes of one location, so they are totally ordered: either
//! the producer's swap comes second and sees `SLEEPING` (it wakes), or the
//! consumer's swap comes second, reads the producer's `AWAKE` and so
//! synchronises with it, and its re-check sees the new `tail` (it does not
//! sleep). No lost wake-up, and no system call by the producer while the
//! consumer is awake. `tests/loom_ring.rs` model-checks this.

use std::any::Any;
use std::sync::Arc;

use crate::desc::Desc;
use crate::sync::{AtomicU32, Ordering};

pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"FERRYRNG");
/// Bumped whenever the shared layout of rings or descriptors changes.
pub const RING_LAYOUT_VERSION: u32 = 1;
pub const MAX_CAPACITY: u32 = 1 << 16;

const INIT_DONE: u32 = 0x1D1E_5EED;
pub const AWAKE: u32 = 0;
pub const SLEEPING: u32 = 1;

#[repr(C, align(64))]
struct Line<T>(T);

#[repr(C)]
pub struct RingHeader {
    meta: Line<RingMeta>,
    head: Line<AtomicU32>,
    tail: Line<AtomicU32>,
    sleep: Line<AtomicU32>,
}

#[repr(C)]
struct RingMeta {
    magic: u64,
    version: u32,
    capacity: u32,
    desc_size: u32,
    init: AtomicU32,
}

/// Bytes a ring of `capacity` descriptors occupies.
pub const fn ring_bytes(capacity: u32) -> usize {
    std::mem::size_of::<RingHeader>() + capacity as usize * std::mem::size_of::<Desc>()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    #[error("ring is full")]
    Full,
    #[error("ring indices are corrupt (head {head}, tail {tail}, capacity {capacity})")]
    Corrupt { head: u32, tail: u32, capacity: u32 },
    #[error("ring capacity {0} is not a power of two in 2..=65536")]
    BadCapacity(u32),
    #[error("ring memory is too small or misaligned")]
    BadMemory,
    #[error("not a ring (bad magic or not initialised)")]
    NotARing,
    #[error("ring layout version {found}, this build speaks {expected}")]
    Version { found: u32, expected: u32 },
}

/// A view of one ring. Keeps the memory it points into alive.
#[derive(Clone)]
pub struct Ring {
    hdr: *const RingHeader,
    slots: *mut Desc,
    mask: u32,
    _keep: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the ring points into memory owned by `_keep` (Send + Sync); all
// shared fields are atomics and slot contents are handed over by the
// Release/Acquire pairs documented on push/pop.
unsafe impl Send for Ring {}
// SAFETY: see Send; `&Ring` exposes only atomic operations.
unsafe impl Sync for Ring {}

/// Checks capacity and memory; returns the header and slot pointers.
fn check_memory(
    ptr: *mut u8,
    len: usize,
    capacity: u32,
) -> Result<(*mut RingHeader, *mut Desc), RingError> {
    if !(2..=MAX_CAPACITY).contains(&capacity) || !capacity.is_power_of_two() {
        return Err(RingError::BadCapacity(capacity));
    }
    if len < ring_bytes(capacity) || !(ptr as usize).is_multiple_of(64) {
        return Err(RingError::BadMemory);
    }
    // In bounds: len >= ring_bytes(capacity) > size_of::<RingHeader>().
    let slots = ptr
        .wrapping_add(std::mem::size_of::<RingHeader>())
        .cast::<Desc>();
    Ok((ptr.cast::<RingHeader>(), slots))
}

impl Ring {
    /// Initialises a new, empty ring at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be writable memory owned by `keep` and not used
    /// for anything else while any `Ring` made from it lives.
    pub unsafe fn init(
        ptr: *mut u8,
        len: usize,
        capacity: u32,
        keep: Arc<dyn Any + Send + Sync>,
    ) -> Result<Ring, RingError> {
        let (hdr, slots) = check_memory(ptr, len, capacity)?;
        // SAFETY: the caller guarantees the memory is ours, writable and large
        // enough; it is 64-byte aligned as checked above.
        unsafe {
            hdr.write(RingHeader {
                meta: Line(RingMeta {
                    magic: RING_MAGIC,
                    version: RING_LAYOUT_VERSION,
                    capacity,
                    desc_size: std::mem::size_of::<Desc>() as u32,
                    init: AtomicU32::new(0),
                }),
                head: Line(AtomicU32::new(0)),
                tail: Line(AtomicU32::new(0)),
                sleep: Line(AtomicU32::new(AWAKE)),
            });
            // Pairs with the Acquire load in `attach`: a process that sees
            // INIT_DONE sees the whole header.
            (*hdr).meta.0.init.store(INIT_DONE, Ordering::Release);
        }
        Ok(Ring {
            hdr,
            slots,
            mask: capacity - 1,
            _keep: keep,
        })
    }

    /// Attaches to a ring another process initialised, checking its magic,
    /// layout version and that its capacity matches what was announced.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped memory owned by `keep`.
    pub unsafe fn attach(
        ptr: *mut u8,
        len: usize,
        capacity: u32,
        keep: Arc<dyn Any + Send + Sync>,
    ) -> Result<Ring, RingError> {
        let (hdr, slots) = check_memory(ptr, len, capacity)?;
        // SAFETY: the memory is mapped, aligned and large enough for the
        // header (checked above); reading it is fine even if it is garbage.
        let meta = unsafe { &(*hdr).meta.0 };
        // Pairs with the Release store in `init`.
        if meta.init.load(Ordering::Acquire) != INIT_DONE || meta.magic != RING_MAGIC {
            return Err(RingError::NotARing);
        }
        if meta.version != RING_LAYOUT_VERSION
            || meta.desc_size != std::mem::size_of::<Desc>() as u32
        {
            return Err(RingError::Version {
                found: meta.version,
                expected: RING_LAYOUT_VERSION,
            });
        }
        if meta.capacity != capacity {
            return Err(RingError::BadCapacity(meta.capacity));
        }
        Ok(Ring {
            hdr,
            slots,
            mask: capacity - 1,
            _keep: keep,
        })
    }

    fn hdr(&self) -> &RingHeader {
        // SAFETY: hdr points to an initialised header kept alive by `_keep`.
        unsafe { &*self.hdr }
    }

    pub fn capacity(&self) -> u32 {
        self.mask + 1
    }

    /// The word a sleeping consumer waits on (futex), see module docs.
    pub fn sleep_word(&self) -> &AtomicU32 {
        &self.hdr().sleep.0
    }

    /// Descriptors currently queued, as published (for status displays).
    pub fn occupancy(&self) -> u32 {
        let h = self.hdr();
        h.tail
            .0
            .load(Ordering::Relaxed)
            .wrapping_sub(h.head.0.load(Ordering::Relaxed))
    }

    fn write_slot(&self, idx: u32, d: &Desc) {
        // SAFETY: idx & mask < capacity, so the slot lies inside the ring's
        // memory. The consumer does not read this slot until it observes the
        // tail published after this write (Release in `push`).
        unsafe {
            self.slots
                .add((idx & self.mask) as usize)
                .write_volatile(*d)
        }
    }

    fn read_slot(&self, idx: u32) -> Desc {
        // SAFETY: idx & mask < capacity, so the slot lies inside the ring's
        // memory. A volatile copy: the contents are untrusted and the caller
        // validates the copy, never the shared original.
        unsafe { self.slots.add((idx & self.mask) as usize).read_volatile() }
    }
}

/// The producing end of a ring.
pub struct RingProducer {
    ring: Ring,
    tail: u32,
}

impl RingProducer {
    pub fn new(ring: Ring) -> RingProducer {
        let tail = ring.hdr().tail.0.load(Ordering::Relaxed);
        RingProducer { ring, tail }
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Free entries right now.
    pub fn free(&self) -> Result<u32, RingError> {
        let head = self.ring.hdr().head.0.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.ring.capacity() {
            return Err(RingError::Corrupt {
                head,
                tail: self.tail,
                capacity: self.ring.capacity(),
            });
        }
        Ok(self.ring.capacity() - used)
    }

    /// Appends one descriptor. Call [`RingProducer::wake_needed`] after a
    /// push (or a batch of pushes) to learn whether the consumer sleeps.
    pub fn push(&mut self, d: &Desc) -> Result<(), RingError> {
        // Acquire pairs with the consumer's Release store of `head` in `pop`:
        // the consumer has finished reading the slot we are about to reuse.
        let head = self.ring.hdr().head.0.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.ring.capacity() {
            return Err(RingError::Corrupt {
                head,
                tail: self.tail,
                capacity: self.ring.capacity(),
            });
        }
        if used == self.ring.capacity() {
            return Err(RingError::Full);
        }
        self.ring.write_slot(self.tail, d);
        self.tail = self.tail.wrapping_add(1);
        // Release pairs with the consumer's Acquire load of `tail` in `pop`
        // and `prepare_sleep`: the descriptor is visible before the index.
        self.ring.hdr().tail.0.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// True when the consumer announced it is going to sleep; the caller must
    /// then wake it (futex wake or eventfd). Clears the announcement.
    pub fn wake_needed(&self) -> bool {
        // AcqRel RMW pairs with the consumer's swap in `prepare_sleep` (see
        // the module docs for why an RMW, not a load, is needed here).
        self.ring.hdr().sleep.0.swap(AWAKE, Ordering::AcqRel) == SLEEPING
    }
}

/// The consuming end of a ring.
pub struct RingConsumer {
    ring: Ring,
    head: u32,
}

impl RingConsumer {
    pub fn new(ring: Ring) -> RingConsumer {
        let head = ring.hdr().head.0.load(Ordering::Relaxed);
        RingConsumer { ring, head }
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    fn available(&self) -> Result<u32, RingError> {
        // Acquire pairs with the producer's Release store of `tail` in `push`.
        let tail = self.ring.hdr().tail.0.load(Ordering::Acquire);
        let avail = tail.wrapping_sub(self.head);
        if avail > self.ring.capacity() {
            return Err(RingError::Corrupt {
                head: self.head,
                tail,
                capacity: self.ring.capacity(),
            });
        }
        Ok(avail)
    }

    /// Takes the next descriptor, if any. The returned copy is untrusted.
    pub fn pop(&mut self) -> Result<Option<Desc>, RingError> {
        if self.available()? == 0 {
            return Ok(None);
        }
        let d = self.ring.read_slot(self.head);
        self.head = self.head.wrapping_add(1);
        // Release pairs with the producer's Acquire load of `head` in `push`:
        // our read of the slot happens before the producer reuses it.
        self.ring.hdr().head.0.store(self.head, Ordering::Release);
        Ok(Some(d))
    }

    pub fn is_empty(&self) -> Result<bool, RingError> {
        Ok(self.available()? == 0)
    }

    /// Announces that we are about to sleep. Returns `true` when the ring is
    /// still empty, in which case the caller may sleep on
    /// [`Ring::sleep_word`] while it equals [`SLEEPING`] (or on its eventfd);
    /// `false` when data arrived meanwhile (the announcement is withdrawn).
    pub fn prepare_sleep(&self) -> Result<bool, RingError> {
        // AcqRel RMW pairs with the producer's swap in `wake_needed`.
        self.ring.hdr().sleep.0.swap(SLEEPING, Ordering::AcqRel);
        if self.available()? != 0 {
            self.finish_sleep();
            return Ok(false);
        }
        Ok(true)
    }

    /// Withdraws a sleep announcement after waking (or timing out).
    pub fn finish_sleep(&self) {
        // Pairs with the producer's swap in `wake_needed`; a stale SLEEPING
        // would only cost the producer one spurious wake.
        self.ring.hdr().sleep.0.swap(AWAKE, Ordering::AcqRel);
    }
}
