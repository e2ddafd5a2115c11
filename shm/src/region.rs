//! Memory regions: memfd-backed, sealed against shrinking and growing, mapped
//! shared by the daemon and its clients. The fd travels over the session
//! socket with SCM_RIGHTS.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys;

/// The seals every Ferry region carries: its size can never change, so a
/// mapping of it can never fault because the other side truncated the file.
pub const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    #[error("creating memory region: {0}")]
    Create(#[source] io::Error),
    #[error("mapping memory region: {0}")]
    Map(#[source] io::Error),
    #[error("region is not sealed against resizing (seals {0:#x})")]
    NotSealed(libc::c_int),
    #[error("region is {actual} bytes, expected {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("region size {0} does not fit this address space")]
    TooLarge(u64),
}

/// A mapped, sealed memory region.
#[derive(Debug)]
pub struct Region {
    fd: OwnedFd,
    map: sys::Mapping,
}

impl Region {
    /// Creates a zero-filled region of `len` bytes, sealed against resizing.
    pub fn create(name: &str, len: u64) -> Result<Region, RegionError> {
        let size = usize::try_from(len).map_err(|_| RegionError::TooLarge(len))?;
        let fd = sys::memfd_create(name).map_err(RegionError::Create)?;
        sys::ftruncate(&fd, len).map_err(RegionError::Create)?;
        sys::add_seals(&fd, REQUIRED_SEALS).map_err(RegionError::Create)?;
        // A memfd starts as mode 0777, and anyone holding a read-only fd of
        // it could open it again read-write through /proc/self/fd: only our
        // own user may.
        sys::fchmod(&fd, 0o600).map_err(RegionError::Create)?;
        let map = sys::Mapping::new(&fd, size, true).map_err(RegionError::Map)?;
        Ok(Region { fd, map })
    }

    /// Maps a region received from the other side. Checks that it is sealed
    /// and exactly `expected_len` bytes long, so that every offset the
    /// layout computes stays inside the mapping.
    pub fn attach(fd: OwnedFd, expected_len: u64, writable: bool) -> Result<Region, RegionError> {
        let seals = sys::get_seals(&fd).map_err(RegionError::Map)?;
        if seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
            != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        {
            return Err(RegionError::NotSealed(seals));
        }
        let actual = sys::file_size(&fd).map_err(RegionError::Map)?;
        if actual != expected_len {
            return Err(RegionError::Size {
                expected: expected_len,
                actual,
            });
        }
        let size = usize::try_from(actual).map_err(|_| RegionError::TooLarge(actual))?;
        let map = sys::Mapping::new(&fd, size, writable).map_err(RegionError::Map)?;
        Ok(Region { fd, map })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A new, read-only open file description of this region, to hand to
    /// a process that must read it and nothing more: it cannot be mapped
    /// writable, written, or have holes punched through it, and (the
    /// region's mode being 0600) not be opened read-write again by another
    /// user.
    pub fn open_readonly(&self) -> io::Result<OwnedFd> {
        let f = std::fs::File::open(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))?;
        Ok(OwnedFd::from(f))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Base address of the mapping. Valid while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Copies `src` into the region at `offset`. `false` (nothing written)
    /// when the range does not lie inside the region.
    pub fn write(&self, offset: u64, src: &[u8]) -> bool {
        let Some(dst) = self.range_ptr(offset, src.len() as u64) else {
            return false;
        };
        // SAFETY: range_ptr checked that the destination lies inside our
        // writable mapping; a raw byte copy forms no Rust reference to the
        // shared memory, and `src` cannot overlap it (it is a Rust borrow).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        true
    }

    /// Pointer to `[offset, offset + len)` when that range lies inside the
    /// region; `None` otherwise. Never panics on hostile input.
    pub fn range_ptr(&self, offset: u64, len: u64) -> Option<*mut u8> {
        let end = offset.checked_add(len)?;
        if end > self.map.len() as u64 {
            return None;
        }
        // `offset <= len of mapping` so the add stays in the allocation.
        Some(self.map.as_ptr().wrapping_add(offset as usize))
    }
}
