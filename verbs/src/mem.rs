//! The unsafe corner of the verbs crate: raw copies into and out of
//! registered memory, and the eventfd behind completion queues.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A view of `len` bytes of registered memory at `addr`.
///
/// # Safety
/// The range must lie inside a live registration (checked by the caller
/// against the region table) whose owner promised, by registering it, that
/// it stays valid; the caller must not let the slice outlive the operation.
pub unsafe fn slice<'a>(addr: u64, len: usize) -> &'a [u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: per the function's contract.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
}

/// A mutable view of `len` bytes of registered memory at `addr`.
///
/// # Safety
/// As for [`slice`]; additionally the registration allows writing and the
/// verbs contract gives this operation exclusive use of the range.
pub unsafe fn slice_mut<'a>(addr: u64, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: per the function's contract.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn eventfd_signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64; a full counter already means
    // "signalled".
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

pub fn eventfd_drain(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; EAGAIN is fine.
    unsafe {
        libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8);
    }
}

/// Waits until `fd` is readable or `timeout` passes.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: pfd is a live pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}

/// One `sendmsg` of `iov` on a connected socket, without SIGPIPE;
/// `nonblocking`: `Ok(0)` instead of waiting when the socket buffer is
/// full. Returns the bytes the kernel took.
pub fn send_vectored(
    fd: &impl AsRawFd,
    iov: &[std::io::IoSlice<'_>],
    nonblocking: bool,
) -> io::Result<usize> {
    let mut flags = libc::MSG_NOSIGNAL;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    loop {
        // SAFETY: IoSlice is ABI-compatible with iovec (std guarantees
        // it on Unix); the msghdr names only that live array, no address
        // and no control data.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len() as _;
            libc::sendmsg(fd.as_raw_fd(), &msg, flags)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if nonblocking => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// One `recv` without waiting: `Ok(0)` means the peer closed, `WouldBlock`
/// that nothing is there. `peek`: the bytes stay in the socket.
pub fn recv_nonblocking(fd: &impl AsRawFd, buf: &mut [u8], peek: bool) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | if peek { libc::MSG_PEEK } else { 0 };
    loop {
        // SAFETY: writes at most buf.len() bytes into the live slice.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
