//! Ferry's shared-memory building blocks: memfd regions, single-producer
//! single-consumer descriptor rings, wake-ups, and the local session
//! protocol. No tokio, no verbs. Unsafe code is confined to `sys` (system
//! calls) and the raw slot access of `ring`.

pub mod desc;
pub mod layout;
pub mod proto;
pub mod region;
pub mod ring;
mod sync;
pub mod sys;
pub mod wait;

pub use desc::Desc;
pub use region::{Region, RegionError};
pub use ring::{Ring, RingConsumer, RingError, RingProducer};

/// The bounds-checked range of `region` a ring at `offset` occupies, and a
/// handle that keeps the region alive for as long as the ring lives.
fn ring_memory(
    region: &std::sync::Arc<Region>,
    offset: u64,
    len: u64,
) -> Result<(*mut u8, std::sync::Arc<dyn std::any::Any + Send + Sync>), RingError> {
    let ptr = region.range_ptr(offset, len).ok_or(RingError::BadMemory)?;
    Ok((ptr, region.clone()))
}

/// Puts a fresh ring into `region` at `offset`.
pub fn init_ring(
    region: &std::sync::Arc<Region>,
    offset: u64,
    len: u64,
    capacity: u32,
) -> Result<Ring, RingError> {
    let (ptr, keep) = ring_memory(region, offset, len)?;
    // SAFETY: ring_memory checked that [offset, offset+len) lies inside the
    // mapping, which `keep` holds alive; the creator uses this range for
    // nothing but this ring.
    unsafe { Ring::init(ptr, len as usize, capacity, keep) }
}

/// Attaches to a ring another process put into `region` at `offset`.
pub fn attach_ring(
    region: &std::sync::Arc<Region>,
    offset: u64,
    len: u64,
    capacity: u32,
) -> Result<Ring, RingError> {
    let (ptr, keep) = ring_memory(region, offset, len)?;
    // SAFETY: ring_memory checked that [offset, offset+len) lies inside the
    // mapping, which `keep` holds alive.
    unsafe { Ring::attach(ptr, len as usize, capacity, keep) }
}
