//! The local session protocol spoken by hand, for tests that play a
//! misbehaving client: raw producer and consumer sessions whose rings and
//! socket the test drives itself.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::StreamSpec;
use ferry_shm::desc::Desc;
use ferry_shm::layout::SessionLayout;
use ferry_shm::proto::{self, Request, Response, SessionInfo};
use ferry_shm::{attach_ring, sys, Region, RingConsumer, RingProducer};

use crate::{eventually, Daemon};

pub fn encode(r: &Request) -> Vec<u8> {
    proto::encode(r).unwrap()
}

pub fn hello() -> Request {
    Request::Hello {
        protocol: proto::PROTOCOL_VERSION,
        client: "ferry-tests raw".into(),
    }
}

/// The next message from ferryd on `sock`, waiting at most `timeout`.
pub fn recv_reply(sock: &OwnedFd, timeout: Duration) -> Result<(Response, Vec<OwnedFd>), String> {
    sys::set_recv_timeout(sock, timeout).unwrap();
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    match sys::recv_with_fds(sock, &mut buf, false) {
        Ok(Some((n, fds))) => proto::decode::<Response>(&buf[..n])
            .map(|r| (r, fds))
            .map_err(|e| format!("undecodable reply: {e}")),
        Ok(None) => Err("closed by ferryd (EOF)".into()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Err(format!("no reply within {timeout:?}"))
        }
        Err(e) => Err(format!("receiving: {e}")),
    }
}

/// Connects to `path` and says Hello; returns the socket and the reply.
/// A send error is ignored: a refusal may already be queued for us.
pub fn say_hello(path: &Path) -> (OwnedFd, Result<Response, String>) {
    let sock = sys::seqpacket_connect(path).unwrap_or_else(|e| panic!("connect {path:?}: {e}"));
    let _ = sys::send_with_fds(&sock, &encode(&hello()), &[]);
    let reply = recv_reply(&sock, Duration::from_secs(5)).map(|(r, _)| r);
    (sock, reply)
}

/// True when ferryd closed `sock` within `timeout` (hang-up, then EOF).
pub fn closed_by_daemon(sock: &OwnedFd, timeout: Duration) -> bool {
    if !eventually(timeout, || sys::peer_hung_up(sock)) {
        return false;
    }
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    // Whatever was queued before the close, then EOF.
    for _ in 0..64 {
        match sys::recv_with_fds(sock, &mut buf, true) {
            Ok(Some(_)) => continue,
            Ok(None) => return true,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
    false
}

/// A producer or consumer session opened by hand.
pub struct RawSession {
    pub sock: OwnedFd,
    pub info: SessionInfo,
    /// Every fd that came with `Opened`, in order.
    pub fds: Vec<OwnedFd>,
    /// The session region (both rings) and where they lie in it.
    pub region: Arc<Region>,
    pub layout: SessionLayout,
    pub sub: RingProducer,
    pub comp: RingConsumer,
}

pub fn open_raw(d: &Daemon, req: Request) -> RawSession {
    let (sock, welcome) = say_hello(&d.socket);
    assert!(
        matches!(welcome, Ok(Response::Welcome { .. })),
        "Hello: {welcome:?}\n{}",
        d.log()
    );
    sys::send_with_fds(&sock, &encode(&req), &[]).unwrap();
    let (info, fds) = match recv_reply(&sock, Duration::from_secs(5)) {
        Ok((Response::Opened(info), fds)) => (info, fds),
        other => panic!("{req:?}: {other:?}\n{}", d.log()),
    };
    assert!(!fds.is_empty(), "Opened came without file descriptors");
    let layout = SessionLayout::new(info.ring_capacity);
    let region = Arc::new(Region::attach(fds[0].try_clone().unwrap(), layout.total, true).unwrap());
    let sub = attach_ring(
        &region,
        layout.sub_offset,
        layout.ring_len,
        info.ring_capacity,
    )
    .unwrap();
    let comp = attach_ring(
        &region,
        layout.comp_offset,
        layout.ring_len,
        info.ring_capacity,
    )
    .unwrap();
    RawSession {
        sock,
        info,
        fds,
        region,
        layout,
        sub: RingProducer::new(sub),
        comp: RingConsumer::new(comp),
    }
}

pub fn raw_consumer(d: &Daemon, stream: &str, group: &str, prefetch: u32) -> RawSession {
    raw_consumer_from(
        d,
        stream,
        group,
        prefetch,
        ferry_shm::proto::GroupStart::Default,
    )
}

/// As `raw_consumer`, with the start position of a group the join creates.
pub fn raw_consumer_from(
    d: &Daemon,
    stream: &str,
    group: &str,
    prefetch: u32,
    start: ferry_shm::proto::GroupStart,
) -> RawSession {
    open_raw(
        d,
        Request::OpenConsumer {
            stream: stream.into(),
            group: group.into(),
            prefetch,
            device: None,
            device_bus: None,
            start,
        },
    )
}

pub fn raw_producer(d: &Daemon, stream: &str, create: Option<StreamSpec>) -> RawSession {
    open_raw(
        d,
        Request::OpenProducer {
            stream: stream.into(),
            spec: create,
            device: None,
            device_bus: None,
        },
    )
}

impl RawSession {
    /// The stream's pool: the second fd of `Opened`.
    pub fn pool(&self) -> &OwnedFd {
        assert!(
            self.fds.len() >= 2,
            "Opened came with {} fds, no pool",
            self.fds.len()
        );
        &self.fds[1]
    }

    /// Pushes onto the submission ring and wakes ferryd with `Wake`.
    pub fn push(&mut self, d: &Desc) {
        self.sub.push(d).unwrap();
        let _ = sys::send_dontwait(&self.sock, proto::WAKE);
    }

    /// Takes up to `n` descriptors from the completion ring, waiting at most
    /// `timeout` for them.
    pub fn take(&mut self, n: usize, timeout: Duration) -> Vec<Desc> {
        let start = Instant::now();
        let mut got = Vec::new();
        while got.len() < n && start.elapsed() < timeout {
            match self.comp.pop() {
                Ok(Some(d)) => got.push(d),
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("completion ring: {e:?}"),
            }
        }
        got
    }

    /// True when ferryd closed this session within 5 s.
    pub fn closed_by_daemon(&self) -> bool {
        closed_by_daemon(&self.sock, Duration::from_secs(5))
    }

    /// Sends `req` and waits (5 s) for the answer.
    pub fn request(&self, req: &Request) -> Result<Response, String> {
        sys::send_with_fds(&self.sock, &encode(req), &[]).map_err(|e| format!("send: {e}"))?;
        recv_reply(&self.sock, Duration::from_secs(5)).map(|(r, _)| r)
    }
}
