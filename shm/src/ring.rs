//! Single-producer single-consumer descriptor rings in shared memory.
//!
//! Layout (all `#[repr(C)]`, 64-byte lines): a header line (magic, layout
//! version, capacity, descriptor size, initialised flag), then the consumer's
//! `head`, the producer's `tail` and the consumer's `sleep` word, each on its
//! own cache line, then `capacity` slots of one line each: a descriptor's
//! first 60 bytes and a sequence word in its last 4 (where [`Desc`]'s
//! `reserved` word would be). Indices are free-running `u32`s; `capacity`
//! is a power of two.
//!
//! A hand-off costs one cache-line transfer: the producer writes the
//! descriptor, then stores `index + 1` into the slot's sequence word
//! (Release); the consumer polls the sequence word of the slot at its head
//! (Acquire), and when it reads `head + 1` the descriptor on the same line
//! is complete. An empty slot holds the previous lap's number
//! (`head + 1 - capacity`); any other value is corruption. Neither side
//! reads the other's index on the fast path: the consumer publishes `head`
//! every `capacity / 16` descriptors and whenever it finds the ring empty
//! or is about to sleep, and the producer reads it only when its cached
//! copy says the ring is full. `tail` is published by
//! [`RingProducer::wake_needed`] (once per batch of pushes) for status
//! displays only; nothing trusts it.
//!
//! Each side keeps its own index privately and only *publishes* it to shared
//! memory, so a hostile peer can never move our index: the worst it can do
//! is publish a nonsensical index or sequence of its own, which we detect
//! ([`RingError::Corrupt`], [`RingError::Sequence`]); a descriptor is copied
//! out of the shared slot once, and only the copy is validated and used.
//!
//! Wake-ups: the consumer that wants to sleep swaps `sleep` to `SLEEPING`,
//! re-checks the slot at its head, and only then sleeps (futex or epoll,
//! chosen by the caller). The producer, after its pushes, swaps `sleep` to
//! `AWAKE` and wakes the consumer only if it read `SLEEPING`. Both are
//! read-modify-writes of one location, so they are totally ordered: either
//! the producer's swap comes second and sees `SLEEPING` (it wakes), or the
//! consumer's swap comes second, reads the producer's `AWAKE` and so
//! synchronises with it, and its re-check sees the new sequence number (it
//! does not sleep). No lost wake-up, and no system call by the producer
//! while the consumer is awake. `tests/loom_ring.rs` model-checks this and
//! the descriptor hand-off, and `scripts/test.sh` checks that the models
//! fail for deliberately broken variants of the protocol (`mutant`).

use std::any::Any;
use std::sync::Arc;

use crate::desc::Desc;
use crate::sync::{AtomicU32, DescCell, Ordering};

pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"FERRYRNG");
/// Bumped whenever the shared layout of rings or descriptors changes
/// (2: sequence numbers in the slots).
pub const RING_LAYOUT_VERSION: u32 = 2;
pub const MAX_CAPACITY: u32 = 1 << 16;

const INIT_DONE: u32 = 0x1D1E_5EED;
pub const AWAKE: u32 = 0;
pub const SLEEPING: u32 = 1;

/// Bytes of a descriptor carried in a slot: all but its last word, which
/// the slot uses for the sequence number.
const BODY: usize = 60;

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

/// One ring entry: a descriptor and, in the same cache line, the number
/// that says it is complete.
#[repr(C, align(64))]
struct RingSlot {
    body: DescCell<[u8; BODY]>,
    seq: AtomicU32,
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<RingSlot>() == 64);
const _: () = assert!(std::mem::size_of::<Desc>() == BODY + 4);

fn body_of(d: &Desc) -> [u8; BODY] {
    let mut b = [0u8; BODY];
    // SAFETY: Desc is repr(C), 64 bytes of plain integers with no padding
    // (see its size assertion); we read its first BODY bytes.
    unsafe { std::ptr::copy_nonoverlapping((d as *const Desc).cast::<u8>(), b.as_mut_ptr(), BODY) };
    b
}

fn desc_of(b: &[u8; BODY]) -> Desc {
    let mut d = Desc::default();
    // SAFETY: every bit pattern is a valid Desc (plain integers); we write
    // its first BODY bytes, `reserved` stays zero.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut d as *mut Desc).cast::<u8>(), BODY) };
    d
}

/// Bytes a ring of `capacity` descriptors occupies.
pub const fn ring_bytes(capacity: u32) -> usize {
    std::mem::size_of::<RingHeader>() + capacity as usize * std::mem::size_of::<RingSlot>()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    #[error("ring is full")]
    Full,
    #[error("ring indices are corrupt (head {head}, tail {tail}, capacity {capacity})")]
    Corrupt { head: u32, tail: u32, capacity: u32 },
    #[error("ring slot sequence is corrupt (index {index}: found {found}, expected {expected} or the previous lap's)")]
    Sequence {
        index: u32,
        found: u32,
        expected: u32,
    },
    #[error("ring capacity {0} is not a power of two in 2..=65536")]
    BadCapacity(u32),
    #[error("ring memory is too small or misaligned")]
    BadMemory,
    #[error("not a ring (bad magic or not initialised)")]
    NotARing,
    #[error("ring layout version {found}, this build speaks {expected}")]
    Version { found: u32, expected: u32 },
}

/// Deliberately broken variants of the protocol, for the loom models'
/// mutation checks: under `--cfg loom`, `FERRY_RING_MUTANT=<name>` turns
/// one on, and `scripts/test.sh` checks that each makes a model fail.
/// Outside loom they are constants `false`.
mod mutant {
    #[cfg(loom)]
    fn on(name: &str) -> bool {
        std::env::var("FERRY_RING_MUTANT").is_ok_and(|v| v == name)
    }
    #[cfg(not(loom))]
    #[inline(always)]
    fn on(_: &str) -> bool {
        false
    }
    /// The sequence number is stored Relaxed: the descriptor may be seen
    /// before it is complete.
    #[inline(always)]
    pub fn seq_relaxed() -> bool {
        on("seq_relaxed")
    }
    /// The consumer publishes its head before copying the descriptor: the
    /// producer may overwrite it mid-copy.
    #[inline(always)]
    pub fn head_early() -> bool {
        on("head_early")
    }
    /// The producer reads the sleep word instead of swapping it: a wake-up
    /// can be lost.
    #[inline(always)]
    pub fn wake_load() -> bool {
        on("wake_load")
    }
    /// The consumer re-checks the ring before announcing sleep instead of
    /// after: a wake-up can be lost.
    #[inline(always)]
    pub fn check_first() -> bool {
        on("check_first")
    }
}

/// A view of one ring. Keeps the memory it points into alive.
#[derive(Clone)]
pub struct Ring {
    hdr: *const RingHeader,
    slots: *const RingSlot,
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
) -> Result<(*mut RingHeader, *mut RingSlot), RingError> {
    if !(2..=MAX_CAPACITY).contains(&capacity) || !capacity.is_power_of_two() {
        return Err(RingError::BadCapacity(capacity));
    }
    if len < ring_bytes(capacity) || !(ptr as usize).is_multiple_of(64) {
        return Err(RingError::BadMemory);
    }
    // In bounds: len >= ring_bytes(capacity) > size_of::<RingHeader>().
    let slots = ptr
        .wrapping_add(std::mem::size_of::<RingHeader>())
        .cast::<RingSlot>();
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
        // enough; it is 64-byte aligned as checked above, and the slots
        // follow the header inside it (ring_bytes).
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
            for i in 0..capacity {
                // Empty: the number of the lap before the first.
                slots.add(i as usize).write(RingSlot {
                    body: DescCell::new([0; BODY]),
                    seq: AtomicU32::new(i.wrapping_add(1).wrapping_sub(capacity)),
                });
            }
            // Pairs with the Acquire load in `attach`: a process that sees
            // INIT_DONE sees the whole ring.
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

    fn slot(&self, idx: u32) -> &RingSlot {
        // SAFETY: idx & mask < capacity, so the slot lies inside the ring's
        // memory (check_memory), initialised by `init` and kept alive by
        // `_keep`. Its body is only reached through DescCell, its number
        // only atomically.
        unsafe { &*self.slots.add((idx & self.mask) as usize) }
    }

    pub fn capacity(&self) -> u32 {
        self.mask + 1
    }

    /// The word a sleeping consumer waits on (futex), see module docs.
    pub fn sleep_word(&self) -> &AtomicU32 {
        &self.hdr().sleep.0
    }

    /// Descriptors queued as last published by both sides (for status
    /// displays; both indices are published lazily, so this lags).
    pub fn occupancy(&self) -> u32 {
        let h = self.hdr();
        h.tail
            .0
            .load(Ordering::Relaxed)
            .wrapping_sub(h.head.0.load(Ordering::Relaxed))
            .min(self.capacity())
    }
}

/// The producing end of a ring.
pub struct RingProducer {
    ring: Ring,
    tail: u32,
    /// The consumer's head as last read: the ring has room for at least
    /// `capacity - (tail - head)` more.
    head: u32,
}

impl RingProducer {
    pub fn new(ring: Ring) -> RingProducer {
        let tail = ring.hdr().tail.0.load(Ordering::Relaxed);
        let head = ring.hdr().head.0.load(Ordering::Relaxed);
        RingProducer { ring, tail, head }
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Reads the consumer's published head (it only moves forward within
    /// one capacity of our tail, or the ring is corrupt).
    fn reload_head(&mut self) -> Result<u32, RingError> {
        // Acquire pairs with the consumer's Release store of `head`: the
        // consumer has finished copying every slot before it, so we may
        // write them again.
        let head = self.ring.hdr().head.0.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.ring.capacity() {
            return Err(RingError::Corrupt {
                head,
                tail: self.tail,
                capacity: self.ring.capacity(),
            });
        }
        self.head = head;
        Ok(used)
    }

    /// Free entries right now.
    pub fn free(&mut self) -> Result<u32, RingError> {
        Ok(self.ring.capacity() - self.reload_head()?)
    }

    /// Appends one descriptor. Call [`RingProducer::wake_needed`] after a
    /// push (or a batch of pushes) to learn whether the consumer sleeps.
    pub fn push(&mut self, d: &Desc) -> Result<(), RingError> {
        let cap = self.ring.capacity();
        if self.tail.wrapping_sub(self.head) >= cap && self.reload_head()? == cap {
            return Err(RingError::Full);
        }
        let slot = self.ring.slot(self.tail);
        let body = body_of(d);
        // SAFETY: the slot is ours: the consumer published a head past its
        // previous use (reload_head's Acquire), and will not read it until
        // it sees the number stored below. Volatile: the memory is shared.
        slot.body.with_mut(|p| unsafe { p.write_volatile(body) });
        self.tail = self.tail.wrapping_add(1);
        // Release pairs with the consumer's Acquire load of the number in
        // `pop`: the descriptor is complete before the number says so.
        let order = if mutant::seq_relaxed() {
            Ordering::Relaxed
        } else {
            Ordering::Release
        };
        slot.seq.store(self.tail, order);
        Ok(())
    }

    /// Publishes the tail (for displays) and returns true when the consumer
    /// announced it is going to sleep; the caller must then wake it (futex
    /// wake or eventfd). Clears the announcement.
    pub fn wake_needed(&self) -> bool {
        self.ring.hdr().tail.0.store(self.tail, Ordering::Relaxed);
        let sleep = &self.ring.hdr().sleep.0;
        if mutant::wake_load() {
            return sleep.load(Ordering::Acquire) == SLEEPING;
        }
        // AcqRel RMW pairs with the consumer's swap in `prepare_sleep` (see
        // the module docs for why an RMW, not a load, is needed here).
        sleep.swap(AWAKE, Ordering::AcqRel) == SLEEPING
    }
}

/// The consuming end of a ring.
pub struct RingConsumer {
    ring: Ring,
    head: u32,
    /// The head as last published.
    published: u32,
    /// Publish the head at least every this many descriptors.
    batch: u32,
}

impl RingConsumer {
    pub fn new(ring: Ring) -> RingConsumer {
        let head = ring.hdr().head.0.load(Ordering::Relaxed);
        let batch = (ring.capacity() / 16).max(1);
        RingConsumer {
            ring,
            head,
            published: head,
            batch,
        }
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Whether the slot at our head holds the next descriptor.
    fn ready(&self) -> Result<bool, RingError> {
        let expected = self.head.wrapping_add(1);
        // Acquire pairs with the producer's Release store in `push`.
        let found = self.ring.slot(self.head).seq.load(Ordering::Acquire);
        if found == expected {
            Ok(true)
        } else if found == expected.wrapping_sub(self.ring.capacity()) {
            Ok(false)
        } else {
            Err(RingError::Sequence {
                index: self.head,
                found,
                expected,
            })
        }
    }

    /// Tells the producer how far we have read: every slot before `head`
    /// may be written again.
    fn publish_head(&mut self) {
        if self.published != self.head {
            // Release pairs with the producer's Acquire load in
            // `reload_head`: our copies of those slots are done.
            self.ring.hdr().head.0.store(self.head, Ordering::Release);
            self.published = self.head;
        }
    }

    /// Takes the next descriptor, if any. The returned copy is untrusted.
    pub fn pop(&mut self) -> Result<Option<Desc>, RingError> {
        if !self.ready()? {
            self.publish_head();
            return Ok(None);
        }
        let idx = self.head;
        self.head = idx.wrapping_add(1);
        if mutant::head_early() {
            self.publish_head();
        }
        let slot = self.ring.slot(idx);
        // SAFETY: the number said the descriptor is complete, and the
        // producer does not write this slot again until we publish a head
        // past it (below). A volatile copy: the contents are untrusted and
        // the caller validates the copy, never the shared original.
        let body = slot.body.with(|p| unsafe { p.read_volatile() });
        if self.head.wrapping_sub(self.published) >= self.batch {
            self.publish_head();
        }
        Ok(Some(desc_of(&body)))
    }

    pub fn is_empty(&self) -> Result<bool, RingError> {
        Ok(!self.ready()?)
    }

    /// Announces that we are about to sleep. Returns `true` when the ring is
    /// still empty, in which case the caller may sleep on
    /// [`Ring::sleep_word`] while it equals [`SLEEPING`] (or on its eventfd);
    /// `false` when data arrived meanwhile (the announcement is withdrawn).
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        // A producer waiting for room must learn of it before we sleep.
        self.publish_head();
        if mutant::check_first() {
            if self.ready()? {
                return Ok(false);
            }
            self.ring.hdr().sleep.0.swap(SLEEPING, Ordering::AcqRel);
            return Ok(true);
        }
        // AcqRel RMW pairs with the producer's swap in `wake_needed`.
        self.ring.hdr().sleep.0.swap(SLEEPING, Ordering::AcqRel);
        if self.ready()? {
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
