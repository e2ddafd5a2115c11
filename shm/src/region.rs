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
    /// For a private (copy-on-write) attachment: a shared read-only
    /// mapping of the same file, which always shows what the other side
    /// wrote.
    shadow: Option<sys::Mapping>,
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
        Ok(Region {
            fd,
            map,
            shadow: None,
        })
    }

    /// Maps a region received from the other side. Checks that it is sealed
    /// and exactly `expected_len` bytes long, so that every offset the
    /// layout computes stays inside the mapping.
    pub fn attach(fd: OwnedFd, expected_len: u64, writable: bool) -> Result<Region, RegionError> {
        let size = Region::check_attach(&fd, expected_len)?;
        let map = sys::Mapping::new(&fd, size, writable).map_err(RegionError::Map)?;
        Ok(Region {
            fd,
            map,
            shadow: None,
        })
    }

    /// As `attach`, mapped copy-on-write: this process may write into its
    /// view (a read-only fd is enough); its writes stay private, and
    /// [`Region::refresh_private`] makes a range show the shared contents
    /// again.
    pub fn attach_private(fd: OwnedFd, expected_len: u64) -> Result<Region, RegionError> {
        let size = Region::check_attach(&fd, expected_len)?;
        let map = sys::Mapping::new_private(&fd, size).map_err(RegionError::Map)?;
        let shadow = sys::Mapping::new(&fd, size, false).map_err(RegionError::Map)?;
        Ok(Region {
            fd,
            map,
            shadow: Some(shadow),
        })
    }

    fn check_attach(fd: &OwnedFd, expected_len: u64) -> Result<usize, RegionError> {
        let seals = sys::get_seals(fd).map_err(RegionError::Map)?;
        if seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
            != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        {
            return Err(RegionError::NotSealed(seals));
        }
        let actual = sys::file_size(fd).map_err(RegionError::Map)?;
        if actual != expected_len {
            return Err(RegionError::Size {
                expected: expected_len,
                actual,
            });
        }
        usize::try_from(actual).map_err(|_| RegionError::TooLarge(actual))
    }

    /// Whether this is a private (copy-on-write) attachment.
    pub fn is_private(&self) -> bool {
        self.shadow.is_some()
    }

    /// Pointer to `[offset, offset + len)` in the shared view: for a
    /// private attachment the read-only shadow mapping (never a private
    /// copy), otherwise the mapping itself. `None` when out of range.
    pub fn shared_range_ptr(&self, offset: u64, len: u64) -> Option<*const u8> {
        let map = self.shadow.as_ref().unwrap_or(&self.map);
        let end = offset.checked_add(len)?;
        if end > map.len() as u64 {
            return None;
        }
        Some(map.as_ptr().wrapping_add(offset as usize).cast_const())
    }

    /// Copies `[offset, offset + out.len())` of the shared view (see
    /// `shared_range_ptr`) into `out`; `false` when out of range.
    pub fn read_shared(&self, offset: u64, out: &mut [u8]) -> bool {
        let Some(src) = self.shared_range_ptr(offset, out.len() as u64) else {
            return false;
        };
        // SAFETY: the range lies inside a live mapping (checked by
        // shared_range_ptr); `out` is a distinct Rust buffer; a raw copy
        // forms no reference to the shared memory.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        true
    }

    /// For a private attachment: makes `[offset, offset + len)` show the
    /// shared contents again, dropping what this process wrote there
    /// earlier. Pages inside `[own_lo, own_hi)` (the range is the only
    /// user of them) are discarded; pages shared with neighbouring ranges
    /// get the range's bytes copied in, so a neighbour's private writes
    /// survive. `pagemap` says which pages were written; without it every
    /// page is treated as written. No-op for a shared attachment; `false`
    /// when the range is out of bounds.
    pub fn refresh_private(
        &self,
        offset: u64,
        len: u64,
        own: (u64, u64),
        pagemap: &mut Option<sys::PageMap>,
        scratch: &mut Vec<bool>,
    ) -> bool {
        let Some(shadow) = &self.shadow else {
            return true;
        };
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if end > self.map.len() as u64 || own.0 > offset || own.1 < end {
            return false;
        }
        if len == 0 {
            return true;
        }
        let page = crate::layout::PAGE;
        let (p0, p1) = (offset / page, end.div_ceil(page));
        let pages = (p1 - p0) as usize;
        let known = match pagemap {
            Some(pm) => pm
                .private_pages(&self.map, p0 as usize, pages, scratch)
                .is_ok(),
            None => false,
        };
        if !known {
            *pagemap = None;
            scratch.clear();
            scratch.resize(pages, true);
        }
        let mut run: Option<(u64, u64)> = None;
        let flush = |run: &mut Option<(u64, u64)>| {
            if let Some((a, b)) = run.take() {
                let _ = sys::discard_private(&self.map, a as usize, (b - a) as usize);
            }
        };
        for (i, &dirty) in scratch.iter().enumerate() {
            if !dirty {
                flush(&mut run);
                continue;
            }
            let a = (p0 + i as u64) * page;
            let b = a + page;
            if a >= own.0 && b <= own.1.min(self.map.len() as u64) {
                run = match run {
                    Some((ra, rb)) if rb == a => Some((ra, b)),
                    other => {
                        let mut o = other;
                        flush(&mut o);
                        Some((a, b))
                    }
                };
            } else {
                flush(&mut run);
                let (ca, cb) = (a.max(offset), b.min(end));
                // SAFETY: [ca, cb) lies inside both mappings (end <= len of
                // the mapping, checked above, and both map the same file
                // at the same size); they are distinct mappings, so the
                // ranges do not overlap; raw copies form no references.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        shadow.as_ptr().add(ca as usize),
                        self.map.as_ptr().add(ca as usize),
                        (cb - ca) as usize,
                    )
                };
            }
        }
        flush(&mut run);
        true
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

    /// Writes `head`, then each `(offset, len)` range of the region, to
    /// `fd` at file offset `file_off` in one `pwritev` (the kernel copies the
    /// region's bytes straight into the file: no copy in user space).
    /// Returns the bytes written, which may be short (the caller goes on
    /// from there, as with `write`). `InvalidInput` when a range does not
    /// lie inside the region; at most 7 ranges.
    pub fn pwritev_to(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        head: &[u8],
        ranges: &[(u64, u64)],
    ) -> io::Result<usize> {
        if ranges.len() > 7 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many ranges",
            ));
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 8];
        iov[0] = libc::iovec {
            iov_base: head.as_ptr().cast_mut().cast(),
            iov_len: head.len(),
        };
        for (i, &(off, len)) in ranges.iter().enumerate() {
            let p = self.range_ptr(off, len).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "range outside the region")
            })?;
            iov[i + 1] = libc::iovec {
                iov_base: p.cast(),
                iov_len: len as usize,
            };
        }
        // SAFETY: every iovec points into a live borrow (`head`) or into
        // our mapping, in range (checked by range_ptr); the kernel only
        // reads them, and no Rust reference to the shared memory is formed.
        let n = unsafe {
            libc::pwritev(
                fd.as_raw_fd(),
                iov.as_ptr(),
                ranges.len() as libc::c_int + 1,
                file_off as libc::off_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Reads `len` bytes of `fd` from file offset `file_off` into the
    /// region at `offset` (`pread`, looping over short reads). An early
    /// end of file is `UnexpectedEof`; a range outside the region is
    /// `InvalidInput`.
    pub fn pread_from(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        file_off: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let dst = self.range_ptr(offset, len).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "range outside the region")
        })?;
        let mut done = 0u64;
        while done < len {
            // SAFETY: `dst + done .. dst + len` lies inside our writable
            // mapping (range_ptr checked the whole range); the kernel
            // writes there and no Rust reference to it is formed.
            let n = unsafe {
                libc::pread(
                    fd.as_raw_fd(),
                    dst.wrapping_add(done as usize).cast(),
                    (len - done) as usize,
                    (file_off + done) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n as u64;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PAGE;

    fn byte(r: &Region, off: u64) -> u8 {
        let p = r.range_ptr(off, 1).unwrap();
        // SAFETY: in range; test-only single-threaded access.
        unsafe { p.read_volatile() }
    }

    fn poke(r: &Region, off: u64, v: u8) {
        let p = r.range_ptr(off, 1).unwrap();
        // SAFETY: in range of our writable (private) mapping.
        unsafe { p.write_volatile(v) }
    }

    /// A private attachment's writes stay private, and a refresh brings
    /// back the shared bytes: with the pagemap and without it (every page
    /// assumed written), and without dropping a neighbour's writes on a
    /// page the two ranges share.
    #[test]
    fn private_writes_are_private_and_refresh_restores() {
        let len = 4 * PAGE;
        let owner = Region::create("t", len).unwrap();
        owner.write(0, &vec![1u8; len as usize]);
        for pagemap_usable in [true, false] {
            let cow = Region::attach_private(owner.open_readonly().unwrap(), len).unwrap();
            assert!(cow.is_private());
            // Range A: whole pages 0-1; ranges B and C share page 3.
            poke(&cow, 10, 9);
            poke(&cow, PAGE + 5, 9);
            poke(&cow, 3 * PAGE + 10, 7); // B: [3P, 3P+100)
            poke(&cow, 3 * PAGE + 200, 8); // C: [3P+100, 4P)
            assert_eq!(byte(&owner, 10), 1, "the file must not see a private write");
            owner.write(10, &[2]);
            owner.write(3 * PAGE + 10, &[3]);
            let mut pm = if pagemap_usable {
                sys::PageMap::open().ok()
            } else {
                None
            };
            let mut scratch = Vec::new();
            assert!(cow.refresh_private(0, 2 * PAGE, (0, 2 * PAGE), &mut pm, &mut scratch));
            assert_eq!(byte(&cow, 10), 2);
            assert_eq!(byte(&cow, PAGE + 5), 1);
            // Refresh B only: C's write on the same page survives.
            assert!(cow.refresh_private(
                3 * PAGE,
                100,
                (3 * PAGE, 3 * PAGE + 100),
                &mut pm,
                &mut scratch
            ));
            assert_eq!(byte(&cow, 3 * PAGE + 10), 3);
            assert_eq!(byte(&cow, 3 * PAGE + 200), 8);
            // Out of its own range, or out of bounds: refused.
            assert!(!cow.refresh_private(0, PAGE, (PAGE, 2 * PAGE), &mut pm, &mut scratch));
            assert!(!cow.refresh_private(len, 1, (len, len + 1), &mut pm, &mut scratch));
            owner.write(10, &[1]);
            owner.write(3 * PAGE + 10, &[1]);
        }
    }
}
