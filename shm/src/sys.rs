//! Raw operating-system calls: memfd, seals, mmap, futex, eventfd, epoll,
//! SOCK_SEQPACKET Unix sockets with SCM_RIGHTS, SO_PEERCRED.
//!
//! This is the only module of the crate (with the ring's raw slot access)
//! that contains `unsafe`. Everything above it works with owned file
//! descriptors and bounds-checked mappings.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_isize(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Creates an anonymous memory file (`memfd_create`) that allows sealing.
pub fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: cname is a valid NUL-terminated string that outlives the call.
    let fd = cvt(unsafe {
        libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn ftruncate(fd: &OwnedFd, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
    Ok(())
}

pub fn add_seals(fd: &OwnedFd, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: plain fcntl on a valid fd with an integer argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(())
}

pub fn get_seals(fd: &OwnedFd) -> io::Result<libc::c_int> {
    // SAFETY: plain fcntl on a valid fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

pub fn file_size(fd: &OwnedFd) -> io::Result<u64> {
    // SAFETY: stat is plain old data; zeroed is a valid value for it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer for the duration of the call.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_size as u64)
}

/// A shared mapping of a whole file. Unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access to its contents goes
// through atomics or through raw copies whose synchronisation the ring
// protocol provides.
unsafe impl Send for Mapping {}
// SAFETY: see Send.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn new(fd: &OwnedFd, len: usize, writable: bool) -> io::Result<Mapping> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        Mapping::map(fd, len, prot, libc::MAP_SHARED)
    }

    /// A private copy-on-write mapping, readable and writable: a write
    /// gives this process its own copy of the page (the file is never
    /// written, so a read-only fd is enough), unwritten pages show the
    /// file as it is.
    pub fn new_private(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        Mapping::map(
            fd,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
    }

    fn map(fd: &OwnedFd, len: usize, prot: libc::c_int, flags: libc::c_int) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory
        // is affected. The fd is valid for the call.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?,
            len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the mapping created in `new`, and
        // no reference into it outlives `self` (borrows are tied to it).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Drops this process's private copies of the pages of `[offset, offset +
/// len)` of a private file mapping: they show the file's contents again.
/// `offset` and `len` must be page multiples inside the mapping.
pub fn discard_private(map: &Mapping, offset: usize, len: usize) -> io::Result<()> {
    let page = crate::layout::PAGE as usize;
    if !offset.is_multiple_of(page)
        || !len.is_multiple_of(page)
        || offset.checked_add(len).is_none_or(|e| e > map.len)
    {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the range lies inside our own mapping (checked above);
    // MADV_DONTNEED on a private file mapping only drops pages this
    // process copied, which then fault in from the file again. No Rust
    // reference into the mapping exists (all access is through raw
    // pointers whose validity the caller's protocol provides).
    cvt(unsafe {
        libc::madvise(
            map.ptr.as_ptr().add(offset).cast(),
            len,
            libc::MADV_DONTNEED,
        )
    })?;
    Ok(())
}

/// `/proc/self/pagemap`, to tell which pages of a private mapping this
/// process has written (and so holds a copy of). Reopened after a fork:
/// an inherited descriptor would describe the parent.
#[derive(Debug)]
pub struct PageMap {
    file: std::fs::File,
    pid: u32,
    /// The raw entries of the last read (kept: one read per delivery).
    raw: Vec<u8>,
}

impl PageMap {
    pub fn open() -> io::Result<PageMap> {
        Ok(PageMap {
            file: std::fs::File::open("/proc/self/pagemap")?,
            pid: std::process::id(),
            raw: Vec::new(),
        })
    }

    /// For each of the `pages` pages from page `first` of `map`: whether
    /// this process holds its own (anonymous) copy of it: present or
    /// swapped, and not the file's page.
    pub fn private_pages(
        &mut self,
        map: &Mapping,
        first: usize,
        pages: usize,
        out: &mut Vec<bool>,
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let page = crate::layout::PAGE as usize;
        if first.checked_add(pages).is_none_or(|e| e * page > map.len) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        if self.pid != std::process::id() {
            *self = PageMap::open()?;
        }
        self.raw.resize(pages * 8, 0);
        let vpage = map.ptr.as_ptr() as usize / page + first;
        self.file.read_exact_at(&mut self.raw, (vpage * 8) as u64)?;
        out.clear();
        out.extend(self.raw.chunks_exact(8).map(|c| {
            let e = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            let present_or_swapped = e & (3 << 62) != 0;
            let file_page = e & (1 << 61) != 0;
            present_or_swapped && !file_page
        }));
        Ok(())
    }
}

/// Sleeps while `*word == expected`, at most `timeout`. Works across
/// processes on a shared mapping (no FUTEX_PRIVATE_FLAG). Spurious returns
/// are possible; callers re-check their condition.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: word is a valid, aligned u32 for the duration of the call; the
    // kernel only reads it. ts_ptr is null or points to a live timespec.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every sleeper on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: word is a valid, aligned u32; FUTEX_WAKE does not write it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd counter (wakes its poller). Never blocks.
pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) already
    // means "signalled", so the result is ignored.
    unsafe {
        libc::write(fd, (&one as *const u64).cast(), 8);
    }
}

/// Resets an eventfd counter.
pub fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; EAGAIN (already zero) is fine.
    unsafe {
        libc::read(fd, (&mut v as *mut u64).cast(), 8);
    }
}

pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fresh fd owned by nobody else.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: ev is a live epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    pub fn delete(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL since Linux 2.6.9.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            );
        }
    }

    /// Waits for events; returns (token, events) pairs.
    pub fn wait(&self, out: &mut Vec<(u64, u32)>, timeout_ms: i32) -> io::Result<()> {
        const MAX: usize = 64;
        // SAFETY: epoll_event is plain old data.
        let mut evs: [libc::epoll_event; MAX] = unsafe { std::mem::zeroed() };
        // SAFETY: evs has room for MAX events.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                evs.as_mut_ptr(),
                MAX as libc::c_int,
                timeout_ms,
            )
        };
        out.clear();
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        for ev in &evs[..n as usize] {
            let token = ev.u64;
            let events = ev.events;
            out.push((token, events));
        }
        Ok(())
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP for this thread (and threads it
/// spawns later) and returns a signalfd that reports them.
pub fn signalfd_termination() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a live sigset_t; these calls only write it / the mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: set is initialised; -1 asks for a new fd.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from a signalfd, if any.
pub fn signalfd_read(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into the live struct.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    if n as usize == size {
        Some(info.ssi_signo as i32)
    } else {
        None
    }
}

/// Ignores SIGPIPE process-wide (writes to closed sockets return EPIPE).
pub fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN for SIGPIPE has no memory-safety impact.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// The default SIGPIPE action, for command-line output: `ferry status |
/// head` then ends quietly, as other tools do, instead of panicking on a
/// failed print (Rust ignores SIGPIPE by default).
pub fn default_sigpipe() {
    // SAFETY: installing SIG_DFL for SIGPIPE has no memory-safety impact.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is empty or longer than {} bytes",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain syscall.
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, ty, 0) })?;
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds and listens on a non-blocking SOCK_SEQPACKET socket at `path`.
pub fn seqpacket_listen(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket_socket(true)?;
    let (addr, len) = sockaddr_un(path)?;
    // SAFETY: addr is a valid sockaddr_un of length len.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    // SAFETY: plain syscall on a bound socket.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(fd)
}

/// Connects a blocking SOCK_SEQPACKET socket to `path`.
pub fn seqpacket_connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket_socket(false)?;
    let (addr, len) = sockaddr_un(path)?;
    // SAFETY: addr is a valid sockaddr_un of length len.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    Ok(fd)
}

/// Accepts one connection (non-blocking listener); `Ok(None)` when none waits.
pub fn accept(listener: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: null address arguments are allowed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(e);
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Credentials of the process at the other end of a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_cred(fd: impl AsFd) -> io::Result<PeerCred> {
    let fd = fd.as_fd();
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len are live out-pointers of the right size.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Most file descriptors one message may carry.
pub const MAX_FDS: usize = 4;

/// Sends one message with up to [`MAX_FDS`] file descriptors attached.
pub fn send_with_fds(sock: &OwnedFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        debug_assert!(space <= std::mem::size_of_val(&cbuf));
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points to a buffer of at least `space` bytes,
        // so the first header and its data fit; CMSG_* compute offsets in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload as usize,
            );
        }
    }
    loop {
        // SAFETY: msg and everything it points to is live for the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        match cvt_isize(r) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives one message and the file descriptors attached to it. Returns
/// `Ok(None)` at end of stream. A message longer than `buf` is an error.
pub fn recv_with_fds(
    sock: &OwnedFd,
    buf: &mut [u8],
    nonblocking: bool,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    let mut flags = libc::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    let n = loop {
        // SAFETY: msg points to live buffers of the sizes it states.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
        match cvt_isize(r) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    let mut fds = Vec::new();
    if msg.msg_controllen > 0 {
        // SAFETY: the kernel filled msg_control with msg_controllen bytes of
        // well-formed cmsg headers; CMSG_NXTHDR stays inside that buffer.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let bytes = (*cmsg).cmsg_len - (data as usize - cmsg as usize);
                    let count = bytes / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message or its file descriptors were truncated",
        ));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((n, fds)))
}

/// Sets SO_RCVTIMEO on a socket (blocking receives give up after `d`).
pub fn set_recv_timeout(sock: &OwnedFd, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: tv is a live timeval of the stated size.
    cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// True when the peer of `sock` has hung up (or the socket errored).
pub fn peer_hung_up(sock: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: pfd is a live pollfd; timeout 0 never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && (pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR)) != 0
}

/// Asks the kernel to read `len` bytes of the file from `offset` into the
/// page cache in the background (`POSIX_FADV_WILLNEED`), so that a later
/// read finds them there. A hint: errors are returned but change nothing.
pub fn advise_willneed(fd: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: plain syscall on a valid fd with integer arguments.
    let r =
        unsafe { libc::posix_fadvise(fd.as_fd().as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
    // posix_fadvise returns the error number instead of setting errno.
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Yields the CPU to another runnable thread, if any.
pub fn yield_now() {
    // SAFETY: plain syscall.
    unsafe {
        libc::sched_yield();
    }
}

pub fn geteuid() -> u32 {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    // SAFETY: plain syscall.
    unsafe { libc::getegid() }
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the
/// host (C's clock_gettime(CLOCK_MONOTONIC) and Python's time.monotonic_ns()).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a live out-pointer.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sends one message without blocking (`MSG_DONTWAIT`): `WouldBlock` when
/// the socket's buffer is full.
pub fn send_dontwait(sock: &OwnedFd, data: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `data` is a live buffer of the stated length.
        let r = unsafe {
            libc::send(
                sock.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match cvt_isize(r) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `SO_PEERGROUPS` (Linux 4.13): the same number on every architecture
/// Ferry builds for except MIPS, SPARC and Alpha.
const SO_PEERGROUPS: libc::c_int = 59;

/// Supplementary groups of the process at the other end of a Unix socket,
/// as they were when it connected.
pub fn peer_groups(fd: impl AsFd) -> io::Result<Vec<u32>> {
    let fd = fd.as_fd();
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = std::mem::size_of_val(groups.as_slice()) as libc::socklen_t;
        // SAFETY: `groups` is a live buffer of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: `len` now says how much is needed.
        if e.raw_os_error() == Some(libc::ERANGE) && groups.len() < 65536 {
            let need = (len as usize / std::mem::size_of::<libc::gid_t>()).max(groups.len() * 2);
            groups.resize(need, 0);
            continue;
        }
        return Err(e);
    }
}

/// Changes the permission bits of an open file (a memfd).
pub fn fchmod(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a live fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
    Ok(())
}

/// (free bytes for unprivileged users, total bytes) of the file system
/// holding `path` (statvfs).
pub fn fs_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path; `st` is a statvfs the call
    // fills (and is zeroed besides), read only on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call (and zeroed before).
    let st = unsafe { st.assume_init() };
    let frsize: u64 = st.f_frsize;
    let (avail, blocks): (u64, u64) = (st.f_bavail, st.f_blocks);
    Ok((avail.saturating_mul(frsize), blocks.saturating_mul(frsize)))
}

/// Raises the soft limit of open files towards `want` (at most the hard
/// limit). Returns the (soft, hard) limits now in force.
pub fn raise_nofile_limit(want: u64) -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live out-pointer.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    let target = want.min(lim.rlim_max);
    if target > lim.rlim_cur {
        let new = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `new` is a live rlimit.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) })?;
        lim.rlim_cur = target;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Waits until `fd` is readable or `timeout` passes; true when readable
/// (or hung up).
pub fn poll_readable(fd: impl AsFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: pfd is a live pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}

/// CPUs the calling thread may run on (`sched_getaffinity`).
pub fn thread_affinity() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain bits; sched_getaffinity(0) fills the set
    // we pass, of the size we pass, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Restricts the calling thread to `cpus` (`sched_setaffinity`).
pub fn set_thread_affinity(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() || cpus.iter().any(|&c| c >= libc::CPU_SETSIZE as usize) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no such CPU set {cpus:?}"),
        ));
    }
    // SAFETY: as above; CPU_SET is given indices below CPU_SETSIZE only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
