//! Offsets inside the session region and the data pool. Both sides compute
//! them from the numbers announced at session open, and the receiving side
//! checks the region sizes against them before mapping anything.

use crate::ring::ring_bytes;

/// Most metadata bytes a batch may carry.
pub const META_MAX: u32 = 256;
pub const PAGE: u64 = 4096;

const fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Where the two rings of a session live in its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLayout {
    pub ring_capacity: u32,
    /// Submission ring (client -> daemon) offset.
    pub sub_offset: u64,
    /// Completion ring (daemon -> client) offset.
    pub comp_offset: u64,
    pub ring_len: u64,
    pub total: u64,
}

impl SessionLayout {
    pub fn new(ring_capacity: u32) -> SessionLayout {
        let ring_len = round_up(ring_bytes(ring_capacity) as u64, PAGE);
        SessionLayout {
            ring_capacity,
            sub_offset: 0,
            comp_offset: ring_len,
            ring_len,
            total: 2 * ring_len,
        }
    }
}

/// The data pool of a stream: `slot_count` payload slots of `stride` bytes
/// (slot size rounded up to 64 bytes, or to a page from a page up), then one
/// [`META_MAX`]-byte metadata area per slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLayout {
    pub slot_size: u64,
    pub slot_count: u32,
    pub stride: u64,
    pub meta_offset: u64,
    pub total: u64,
}

impl PoolLayout {
    /// `None` when the numbers overflow.
    pub fn new(slot_size: u64, slot_count: u32) -> Option<PoolLayout> {
        if slot_size == 0 || slot_count == 0 {
            return None;
        }
        let stride = if slot_size >= PAGE {
            round_up(slot_size, PAGE)
        } else {
            round_up(slot_size, 64)
        };
        let payload = stride.checked_mul(slot_count as u64)?;
        let meta_offset = round_up(payload, PAGE);
        let total = meta_offset.checked_add(round_up(META_MAX as u64 * slot_count as u64, PAGE))?;
        Some(PoolLayout {
            slot_size,
            slot_count,
            stride,
            meta_offset,
            total,
        })
    }

    /// Offset of slot `i`'s payload; `None` when `i` is out of range.
    pub fn slot_offset(&self, i: u32) -> Option<u64> {
        (i < self.slot_count).then(|| i as u64 * self.stride)
    }

    /// Offset of slot `i`'s metadata area; `None` when `i` is out of range.
    pub fn meta_offset(&self, i: u32) -> Option<u64> {
        (i < self.slot_count).then(|| self.meta_offset + i as u64 * META_MAX as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_layout_rounds_and_bounds() {
        let l = PoolLayout::new(1000, 3).unwrap();
        assert_eq!(l.stride, 1024);
        assert_eq!(l.slot_offset(2), Some(2048));
        assert_eq!(l.slot_offset(3), None);
        assert_eq!(l.meta_offset(0), Some(4096));
        assert_eq!(l.meta_offset(3), None);
        assert!(l.total >= l.meta_offset + 3 * META_MAX as u64);
        let big = PoolLayout::new(5000, 2).unwrap();
        assert_eq!(big.stride, 8192);
        assert!(PoolLayout::new(u64::MAX / 2, 4).is_none());
        assert!(PoolLayout::new(0, 4).is_none());
    }

    #[test]
    fn session_layout_separates_rings() {
        let l = SessionLayout::new(256);
        assert!(l.comp_offset >= ring_bytes(256) as u64);
        assert_eq!(l.total, 2 * l.ring_len);
        assert_eq!(l.comp_offset % PAGE, 0);
    }
}
