//! Client sessions: accepting connections within the limits, the
//! handshake, requests on the session socket, replies, and closing.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_shm::desc::{self, Desc};
use ferry_shm::layout::SessionLayout;
use ferry_shm::proto::{self, ErrorCode, Request, Response};
use ferry_shm::sys::{self, PeerCred};
use ferry_shm::{init_ring, Region, RingConsumer, RingProducer};

use crate::gpu::GpuPublish;
use crate::idhash::IdSet;
use crate::limited;
use crate::sink::Sink;
use crate::stream::SessionId;

use super::*;
use crate::error::Refusal;

pub(super) struct Rings {
    pub(super) _region: Arc<Region>,
    pub(super) sub: RingConsumer,
    pub(super) comp: RingProducer,
}

pub(super) struct ProducerState {
    pub(super) stream: usize,
    pub(super) rings: Rings,
    pub(super) granted: IdSet<u32>,
    pub(super) credits: u32,
    pub(super) published: u64,
    /// Said the epoch is over for it (`OP_END`) and has not published since.
    pub(super) ended: bool,
    /// Its `OP_END`s taken, and whether the last count is still to be
    /// told (`OP_END_TAKEN`: its completion ring was full).
    pub(super) ends_taken: u64,
    pub(super) ends_untold: bool,
    /// Since when it has no slot granted and the pool has none free.
    pub(super) starved_since: Option<Instant>,
    /// Whether that wait was logged already.
    pub(super) starved_logged: bool,
    /// Publishing from GPU memory: the stream's mirror on that GPU and the
    /// copies to host slots in flight.
    pub(super) gpu: Option<GpuPublish>,
    /// Its publishes to a disk stream not yet durable, and what it was told.
    pub(super) acks: super::durable::Acks,
}

impl ProducerState {
    /// Tells the producer how many of its ends of epoch were taken
    /// (`OP_END_TAKEN`, cumulative); false when its ring was full (then
    /// `ends_untold` stays set for a later try).
    pub(super) fn tell_ends_taken(&mut self) -> bool {
        self.ends_untold = !push_ends_taken(&mut self.rings.comp, self.ends_taken);
        !self.ends_untold
    }
}

/// Pushes `OP_END_TAKEN` (`taken` ends so far) on a producer's completion
/// ring, waking it where it sleeps; false when the ring is full.
pub(super) fn push_ends_taken(comp: &mut RingProducer, taken: u64) -> bool {
    let d = Desc {
        op: desc::OP_END_TAKEN,
        offset: taken,
        ..Desc::default()
    };
    if comp.push(&d).is_err() {
        return false;
    }
    if comp.wake_needed() {
        sys::futex_wake(comp.ring().sleep_word());
    }
    true
}

/// A consumer group member, on this host or another: what the pump needs
/// to hand it batches.
pub(super) struct Member {
    pub(super) stream: usize,
    pub(super) group: usize,
    pub(super) prefetch: u32,
    pub(super) inflight: u32,
    pub(super) delivered: u64,
    /// The group's epochs this member was told of (OP_END_OF_EPOCH).
    pub(super) epoch_seen: u64,
    /// Where its batches go: its completion ring, its GPU pool first, or
    /// its host's landing area.
    pub(super) sink: Box<dyn Sink>,
}

pub(super) struct ConsumerState {
    pub(super) m: Member,
    /// The session's ring region (kept mapped) and its submission ring;
    /// the completion ring belongs to the sink.
    pub(super) _region: Arc<Region>,
    pub(super) sub: RingConsumer,
}

#[allow(
    clippy::large_enum_variant,
    reason = "one per session, in a map: boxing would add a pointer chase to every poll of a producer's ring"
)]
pub(super) enum Role {
    /// Connected, no Hello yet.
    Fresh,
    /// Said Hello; may open a producer or consumer.
    Control,
    Producer(ProducerState),
    Consumer(ConsumerState),
    /// Consuming a stream homed on another host.
    Remote(Box<super::proxy::Proxy>),
    /// Producing into a stream homed on another host.
    Outbox(Box<super::outbox::Outbox>),
}

pub(super) struct Session {
    pub(super) id: SessionId,
    pub(super) sock: OwnedFd,
    pub(super) cred: PeerCred,
    pub(super) role: Role,
    /// Connected (Fresh), or said Hello (Control): for the timeouts.
    pub(super) since: Instant,
}

/// Who may connect: uids, gids (primary or supplementary).
#[derive(Clone)]
pub(super) struct Policy {
    pub(super) uids: Vec<u32>,
    pub(super) gids: Vec<u32>,
}

impl Policy {
    pub(super) fn allows(&self, sock: impl std::os::fd::AsFd, cred: &PeerCred) -> bool {
        if self.uids.contains(&cred.uid) || self.gids.contains(&cred.gid) {
            return true;
        }
        !self.gids.is_empty()
            && sys::peer_groups(sock).is_ok_and(|g| g.iter().any(|g| self.gids.contains(g)))
    }
}

/// Most messages read from one session socket per readiness event, so
/// one client flooding its socket cannot hold the loop.
pub(super) const MAX_MESSAGES_PER_EVENT: usize = 64;

/// How long the listener stays paused after running out of file
/// descriptors, unless a connection closes sooner.
pub(super) const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The submission ring of a producer or consumer.
pub(super) fn sub_of(role: &Role) -> Option<&RingConsumer> {
    match role {
        Role::Producer(p) => Some(&p.rings.sub),
        Role::Consumer(c) => Some(&c.sub),
        Role::Remote(p) => Some(&p.sub),
        Role::Outbox(o) => Some(&o.sub),
        _ => None,
    }
}

pub(super) fn sub_of_mut(role: &mut Role) -> Option<&mut RingConsumer> {
    match role {
        Role::Producer(p) => Some(&mut p.rings.sub),
        Role::Consumer(c) => Some(&mut c.sub),
        Role::Remote(p) => Some(&mut p.sub),
        Role::Outbox(o) => Some(&mut o.sub),
        _ => None,
    }
}

impl Server {
    /// Accepting again after running out of file descriptors.
    pub(super) fn resume_listener(&mut self) {
        if self.listener_paused.take().is_none() {
            return;
        }
        if let Some(l) = &self.listener {
            if let Err(e) = self.epoll.add(l.as_raw_fd(), Token::Listener.to_u64()) {
                limited!(WARN, "resuming the listener: {e}");
            }
        }
    }

    /// Why a new connection of `uid` would pass a connection limit.
    pub(super) fn over_connection_limit(&self, uid: u32) -> Option<String> {
        let d = &self.cfg.daemon;
        if self.sessions.len() >= d.max_connections as usize {
            return Some(format!(
                "ferryd has {} connections open, daemon.max_connections = {}",
                self.sessions.len(),
                d.max_connections
            ));
        }
        let mine = self.sessions.values().filter(|s| s.cred.uid == uid).count();
        if mine >= d.max_connections_per_uid as usize {
            return Some(format!(
                "uid {uid} has {mine} connections open, daemon.max_connections_per_uid = {}",
                d.max_connections_per_uid
            ));
        }
        None
    }

    pub(super) fn accept_all(&mut self) {
        loop {
            let Some(l) = self.listener.as_ref() else {
                return;
            };
            match sys::accept(l) {
                Ok(Some(sock)) => {
                    let cred = match sys::peer_cred(&sock) {
                        Ok(c) => c,
                        Err(e) => {
                            limited!(WARN, "SO_PEERCRED failed: {e}");
                            continue;
                        }
                    };
                    if let Some(why) = self.over_connection_limit(cred.uid) {
                        limited!(
                            WARN,
                            pid = cred.pid,
                            uid = cred.uid,
                            "connection refused: {why}"
                        );
                        let refusal = Response::Error {
                            code: ErrorCode::Limit,
                            message: format!("connection refused: {why}"),
                        };
                        if let Ok(b) = proto::encode(&refusal) {
                            let _ = sys::send_dontwait(&sock, &b);
                        }
                        // Read what it sent already (its Hello), so that
                        // closing does not reset the connection before the
                        // client reads the refusal (libferry copes either way).
                        let mut junk = [0u8; 256];
                        for _ in 0..4 {
                            if !matches!(sys::recv_with_fds(&sock, &mut junk, true), Ok(Some(_))) {
                                break;
                            }
                        }
                        continue;
                    }
                    let id = self.next_session;
                    self.next_session += 1;
                    if let Err(e) = self
                        .epoll
                        .add(sock.as_raw_fd(), Token::Session(id).to_u64())
                    {
                        limited!(WARN, "epoll add: {e}");
                        continue;
                    }
                    limited!(
                        DEBUG,
                        session = id,
                        pid = cred.pid,
                        uid = cred.uid,
                        "connection"
                    );
                    self.sessions.insert(
                        id,
                        Session {
                            id,
                            sock,
                            cred,
                            role: Role::Fresh,
                            since: Instant::now(),
                        },
                    );
                }
                Ok(None) => return,
                Err(e) => {
                    let out_of_fds = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if out_of_fds {
                        // Waiting connections stay queued; retrying now
                        // would spin. Resume when a session closes or
                        // after ACCEPT_PAUSE.
                        self.epoll.delete(l.as_raw_fd());
                        self.listener_paused = Some(Instant::now());
                        limited!(
                            WARN,
                            sessions = self.sessions.len(),
                            "accept: {e}: not accepting connections until a descriptor is free"
                        );
                    } else {
                        limited!(WARN, "accept: {e}");
                    }
                    return;
                }
            }
        }
    }

    pub(super) fn session_readable(&mut self, id: SessionId) {
        let mut buf = vec![0u8; proto::MAX_MESSAGE];
        // Level-triggered: what is left is reported again next turn.
        for _ in 0..MAX_MESSAGES_PER_EVENT {
            let Some(s) = self.sessions.get(&id) else {
                return;
            };
            match sys::recv_with_fds(&s.sock, &mut buf, true) {
                Ok(None) => {
                    limited!(DEBUG, session = id, "peer closed");
                    self.close_session(id, false);
                    return;
                }
                Ok(Some((n, _fds))) => {
                    let req = match proto::decode::<Request>(&buf[..n]) {
                        Ok(r) => r,
                        Err(e) => {
                            self.fail_session(id, &format!("undecodable request: {e}"));
                            return;
                        }
                    };
                    self.handle_request(id, req);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.fail_session(id, &format!("socket error: {e}"));
                    return;
                }
            }
        }
    }

    pub(super) fn reply(&mut self, id: SessionId, resp: &Response, fds: &[i32]) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let bytes = match proto::encode(resp) {
            Ok(b) => b,
            Err(e) => {
                limited!(WARN, "encoding a reply: {e}");
                return;
            }
        };
        if let Err(e) = sys::send_with_fds(&s.sock, &bytes, fds) {
            limited!(DEBUG, session = id, "reply failed: {e}");
            self.close_session(id, false);
        }
    }

    pub(super) fn refuse(&mut self, id: SessionId, r: Refusal) {
        limited!(DEBUG, session = id, code = ?r.code, message = %r.message, "request refused");
        self.reply(id, &r.response(), &[]);
    }

    pub(super) fn handle_request(&mut self, id: SessionId, req: Request) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let fresh = matches!(s.role, Role::Fresh);
        let cred = s.cred;
        match req {
            Request::Wake => {} // the loop is awake now; the rings say the rest
            Request::Hello { protocol, client } => {
                if !fresh {
                    return self.fail_session(id, "second Hello");
                }
                if !self.policy.allows(&s.sock, &cred) {
                    limited!(
                        WARN,
                        pid = cred.pid,
                        uid = cred.uid,
                        gid = cred.gid,
                        "connection refused by policy"
                    );
                    self.refuse(
                        id,
                        Refusal::new(
                            ErrorCode::PermissionDenied,
                            format!(
                            "uid {} gid {} is not allowed to use this ferryd (see daemon.allowed_uids / allowed_gids)",
                            cred.uid, cred.gid
                            ),
                        ),
                    );
                    return self.close_session(id, true);
                }
                if protocol != proto::PROTOCOL_VERSION {
                    self.refuse(
                        id,
                        Refusal::new(
                            ErrorCode::Protocol,
                            format!(
                                "client speaks protocol {protocol}, this ferryd speaks {}",
                                proto::PROTOCOL_VERSION
                            ),
                        ),
                    );
                    return self.close_session(id, true);
                }
                limited!(DEBUG, session = id, client, "hello");
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.role = Role::Control;
                    s.since = Instant::now();
                }
                self.reply(
                    id,
                    &Response::Welcome {
                        protocol: proto::PROTOCOL_VERSION,
                        daemon: format!("ferryd {}", env!("CARGO_PKG_VERSION")),
                    },
                    &[],
                );
            }
            _ if fresh => self.fail_session(id, "request before Hello"),
            Request::OpenProducer {
                stream,
                spec,
                device,
                device_bus,
            } => self.open_producer(id, stream, spec, (device, device_bus)),
            Request::OpenConsumer {
                stream,
                group,
                prefetch,
                device,
                device_bus,
                start,
            } => self.open_consumer(id, stream, group, prefetch, (device, device_bus), start),
            Request::Seek { partition, offset } => {
                if matches!(
                    self.sessions.get(&id).map(|s| &s.role),
                    Some(Role::Remote(_))
                ) {
                    self.proxy_seek(id, partition, offset)
                } else {
                    self.seek(id, partition, offset)
                }
            }
        }
    }

    /// A client broke the protocol: close its session, keep serving others.
    pub(super) fn fail_session(&mut self, id: SessionId, why: &str) {
        if self.remotes.contains_key(&id) {
            // A member on another host.
            return self.remote_evict(id, why);
        }
        if let Some(s) = self.sessions.get(&id) {
            limited!(
                WARN,
                session = id,
                pid = s.cred.pid,
                uid = s.cred.uid,
                "closing session: {why}"
            );
        }
        self.close_session(id, true);
    }

    /// Closes a session. Unless it misbehaved, whatever it queued on its
    /// submission ring (publishes, releases) is processed first: nothing a
    /// client handed over before it went away is lost.
    pub(super) fn close_session(&mut self, id: SessionId, skip_drain: bool) {
        if !skip_drain {
            // Until the ring is empty: a producer's drain stops after an
            // end of epoch (bounded: a client writing on after its death
            // cannot keep us here).
            for _ in 0..=self.cfg.daemon.ring_capacity {
                match self.drain_session_inner(id) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(v) => {
                        limited!(WARN, session = id, "while closing: {}", v.0);
                        break;
                    }
                }
            }
        }
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        self.epoll.delete(s.sock.as_raw_fd());
        // A descriptor is free again.
        self.resume_listener();
        match s.role {
            Role::Producer(mut p) => {
                let entry = &mut self.streams[p.stream];
                if let Some(g) = &mut p.gpu {
                    // Everything it published is kept: wait for the copies
                    // and put those batches into the stream.
                    let (granted, published, acks) =
                        (&mut p.granted, &mut p.published, &mut p.acks);
                    let dev = g.info.ordinal;
                    if let Err(e) =
                        g.finish(|d| publish_copied(entry, id, d, dev, granted, published, acks))
                    {
                        limited!(WARN, session = id, "while closing: {e}");
                    }
                    self.gpu_sessions -= 1;
                    entry.counters.gpu_bytes_closed += g.copied_bytes;
                }
                drop(p.gpu.take());
                for slot in p.granted {
                    entry.stream.return_grant(id, slot);
                }
                entry.producers.retain(|&x| x != id);
                entry.dirty = true;
                // The others may all have ended already (or this one was
                // the last, and ended).
                let (idx, ended) = (p.stream, p.ended);
                self.maybe_end_epoch(idx, ended);
                limited!(
                    INFO,
                    session = id,
                    pid = s.cred.pid,
                    published = p.published,
                    "producer closed"
                );
            }
            Role::Consumer(mut c) => {
                // Copies still reading host slots finish before those
                // slots can go to anybody else.
                c.m.sink.quiesce();
                if c.m.sink.deferred() {
                    self.gpu_sessions -= 1;
                }
                let entry = &mut self.streams[c.m.stream];
                entry.counters.gpu_bytes_closed += c.m.sink.status().bytes_copied;
                entry.stream.leave(c.m.group, id);
                entry.dirty = true;
                limited!(
                    INFO,
                    session = id,
                    pid = s.cred.pid,
                    delivered = c.m.delivered,
                    unreleased = c.m.inflight,
                    "consumer left; its unreleased batches go to the rest of its group"
                );
            }
            Role::Remote(p) => self.proxy_closed(id, *p),
            Role::Outbox(o) => self.outbox_closed(id, o),
            _ => {}
        }
    }

    pub(super) fn check_open(&self, id: SessionId) -> Result<(), Refusal> {
        if self.draining.is_some() {
            return Err(Refusal::new(
                ErrorCode::ShuttingDown,
                "ferryd is shutting down",
            ));
        }
        match self.sessions.get(&id).map(|s| &s.role) {
            Some(Role::Control) => Ok(()),
            _ => Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "this connection already is a producer or consumer",
            )),
        }
    }

    pub(super) fn new_rings(&self, id: SessionId) -> Result<(Rings, Arc<Region>), Refusal> {
        let cap = self.cfg.daemon.ring_capacity;
        let layout = SessionLayout::new(cap);
        let region = Arc::new(
            Region::create(&format!("ferry-session-{id}"), layout.total).map_err(|e| {
                Refusal::new(ErrorCode::Limit, format!("creating session rings: {e}"))
            })?,
        );
        let sub = init_ring(&region, layout.sub_offset, layout.ring_len, cap)
            .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        let comp = init_ring(&region, layout.comp_offset, layout.ring_len, cap)
            .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        Ok((
            Rings {
                _region: region.clone(),
                sub: RingConsumer::new(sub),
                comp: RingProducer::new(comp),
            },
            region,
        ))
    }
}
