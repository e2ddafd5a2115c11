//! The consumer-host side of cross-host delivery: a trainer here that
//! consumes a stream homed on another daemon. Its session gets a landing
//! area (see `crate::landing`) that the home writes batches into over the
//! fabric; each arrival becomes a descriptor on the trainer's ring, and
//! the trainer's releases, commits and seeks go to the home as messages.
//!
//! A trainer that asked for GPU memory gets a GPU pool as on the home's
//! host: each batch that lands is copied from its landing slot into a GPU
//! slot, and its descriptor goes on the ring once the copy completed (in
//! landing order). The landing slot stays the trainer's until it releases
//! the batch: its metadata is read from there.
//!
//! When the home goes down, the trainer's session stays open and waits:
//! batches it holds stay readable, and once the home is back it joins
//! again (the home redelivered what it had not released, so a batch may
//! come twice: recognisable by its offset, within the prefetch window).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use ferry_shm::desc::{self, Desc};
use ferry_shm::layout::{PoolLayout, META_MAX};
use ferry_shm::proto::{self, ErrorCode, GroupStart, Response, SessionInfo};
use ferry_shm::{Region, RingConsumer, RingProducer};

use super::sessions::{Rings, Role};
use super::Server;
use crate::error::Refusal;
use crate::fabric::Registered;
use crate::gpu::GpuDelivery;
use crate::landing::{Header, Imm, Kind, HEADER_BYTES};
use crate::limited;
use crate::peers::{Join, Landing, PeerMsg, StreamAnnounce, WireRefusal};
use crate::stream::{SessionId, Violation};

/// Where a trainer's membership at the home stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProxyState {
    /// Join not sent yet (no data link yet) or not answered.
    Joining {
        sent: bool,
    },
    Active,
    /// The home is down; joins again when it is back.
    Waiting,
}

/// A batch in a landing slot that the trainer holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    partition: u32,
    offset: u64,
    home_slot: u32,
    /// Which membership delivered it.
    incarnation: u64,
}

/// A trainer here consuming a stream homed on another host.
pub(super) struct Proxy {
    pub(super) node: String,
    pub(super) stream: String,
    pub(super) group: String,
    uid: u32,
    pub(super) prefetch: u32,
    start: GroupStart,
    _region: Arc<Region>,
    pub(super) sub: RingConsumer,
    comp: RingProducer,
    landing_id: u16,
    pool: Arc<Registered>,
    headers: Arc<Registered>,
    layout: PoolLayout,
    partitions: u32,
    held: Vec<Option<Held>>,
    incarnation: u64,
    pub(super) state: ProxyState,
    /// The trainer got its answer to OpenConsumer.
    answered: bool,
    /// A seek is at the home; the trainer waits for its answer.
    seeking: bool,
    /// Descriptors for the trainer that its ring had no room for.
    backlog: VecDeque<Desc>,
    /// A trainer reading GPU memory: its pool there, and the copies into it.
    pub(super) gpu: Option<GpuDelivery>,
    delivered: u64,
    since: Instant,
}

impl Proxy {
    pub(super) fn status(&self, session: SessionId, pid: i32) -> ferry_admin::RemoteConsumerStatus {
        ferry_admin::RemoteConsumerStatus {
            session,
            pid,
            stream: self.stream.clone(),
            group: self.group.clone(),
            home: self.node.clone(),
            state: match self.state {
                ProxyState::Joining { .. } => "joining",
                ProxyState::Active => "active",
                ProxyState::Waiting => "waiting",
            }
            .to_string(),
            prefetch: self.prefetch,
            held: self.held() as u32,
            delivered: self.delivered,
            open_ms: self.since.elapsed().as_millis() as u64,
            device: self
                .gpu
                .as_ref()
                .map(|g| format!("cuda:{}", g.info.ordinal)),
            copies_in_flight: self.gpu.as_ref().map_or(0, |g| g.pending() as u32),
        }
    }

    /// A landed batch (`d`, in landing slot `d.slot`) on its way to the
    /// trainer: onto its ring, or first into its GPU pool.
    fn deliver(&mut self, d: Desc) -> Result<(), String> {
        let Some(g) = &mut self.gpu else {
            return self.push(d);
        };
        let src = self
            .layout
            .slot_offset(d.slot)
            .ok_or("landing slot out of range")?;
        if !g.start(d, src, None)? {
            // One GPU slot per landing slot, and a landing slot is written
            // only when it is free: the home wrote one the trainer holds.
            return Err(format!(
                "a batch landed in slot {} while all {} GPU slots are held",
                d.slot, g.info.slots
            ));
        }
        Ok(())
    }

    /// A descriptor with nothing to copy (an end of epoch), after every
    /// batch that landed before it.
    fn deliver_after(&mut self, d: Desc) -> Result<(), String> {
        match &mut self.gpu {
            Some(g) if g.pending() > 0 => {
                g.after_copies(d);
                Ok(())
            }
            _ => self.push(d),
        }
    }

    /// Puts the descriptors of finished GPU copies on the ring (through
    /// its backlog, which keeps them in order), in order; returns how many.
    pub(super) fn complete_copies(&mut self) -> Result<usize, String> {
        let Some(g) = &mut self.gpu else {
            return Ok(0);
        };
        let backlog = &mut self.backlog;
        let n = g.complete(|d| {
            backlog.push_back(*d);
            true
        })?;
        self.flush()?;
        Ok(n)
    }

    pub(super) fn held(&self) -> usize {
        self.held.iter().filter(|h| h.is_some()).count()
    }

    fn push(&mut self, d: Desc) -> Result<(), String> {
        if self.backlog.is_empty() {
            match self.comp.push(&d) {
                Ok(()) => {
                    self.wake();
                    return Ok(());
                }
                Err(ferry_shm::RingError::Full) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        self.backlog.push_back(d);
        Ok(())
    }

    /// Moves the backlog onto the ring as far as it has room.
    fn flush(&mut self) -> Result<usize, String> {
        let mut n = 0;
        while let Some(d) = self.backlog.front() {
            match self.comp.push(d) {
                Ok(()) => {
                    self.backlog.pop_front();
                    n += 1;
                }
                Err(ferry_shm::RingError::Full) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        if n > 0 {
            self.wake();
        }
        Ok(n)
    }

    fn wake(&mut self) {
        if self.comp.wake_needed() {
            ferry_shm::sys::futex_wake(self.comp.ring().sleep_word());
        }
    }

    fn join_msg(&self, member: u64) -> Join {
        Join {
            member,
            stream: self.stream.clone(),
            group: self.group.clone(),
            prefetch: self.prefetch,
            start: self.start.clone(),
            uid: self.uid,
            landing: Landing {
                id: self.landing_id,
                slots: self.layout.slot_count,
                pool_addr: self.pool.addr(),
                pool_rkey: self.pool.rkey(),
                header_addr: self.headers.addr(),
                header_rkey: self.headers.rkey(),
            },
            busy: self
                .held
                .iter()
                .enumerate()
                .filter(|(_, h)| h.is_some())
                .map(|(i, _)| i as u32)
                .collect(),
        }
    }
}

/// A landing area no session uses any more, kept registered a while so
/// that writes the home posted before it heard of the leave land in
/// memory that is still there.
pub(super) struct Retired {
    _regs: Vec<Arc<Registered>>,
    landing_id: u16,
    until: Instant,
}

/// How long a landing area (and its id) stays retired.
const RETIRE_FOR: std::time::Duration = std::time::Duration::from_secs(30);

impl Server {
    /// The home of stream `name` among the peers, if one announced it;
    /// `Err` says why it cannot be used now.
    pub(super) fn home_of(&self, name: &str) -> Option<Result<String, String>> {
        let cl = self.cluster.as_ref()?;
        let mut down = None;
        for (node, v) in &cl.table {
            if v.has_stream(name) {
                if v.is_up() {
                    return Some(Ok(node.clone()));
                }
                down = Some(node.clone());
            }
        }
        down.map(|n| {
            Err(format!(
                "stream {name}'s home, {n}, is down (`ferry status` shows the peers); try again once it is back"
            ))
        })
    }

    /// The home of stream `name` on a peer that is up, and the stream as
    /// it announced it; a refusal says why there is none.
    pub(super) fn remote_home(&self, name: &str) -> Result<(String, StreamAnnounce), Refusal> {
        let node = match self.home_of(name) {
            Some(Ok(n)) => n,
            Some(Err(why)) => return Err(Refusal::new(ErrorCode::UnknownStream, why)),
            None => {
                return Err(Refusal::new(
                    ErrorCode::UnknownStream,
                    format!("no stream named {name:?} here or on a peer"),
                ))
            }
        };
        let spec = self
            .cluster
            .as_ref()
            .and_then(|c| c.table.get(&node))
            .and_then(|v| v.stream(name))
            .cloned()
            .ok_or_else(|| Refusal::new(ErrorCode::UnknownStream, format!("no stream {name:?}")))?;
        Ok((node, spec))
    }

    /// Whether stream `name` is homed on a peer (as far as this daemon
    /// knows).
    pub(super) fn is_remote_stream(&self, name: &str) -> bool {
        !self.by_name.contains_key(name) && self.home_of(name).is_some()
    }

    /// Opens a consumer of a stream homed on another host: the answer
    /// comes when the home has answered the join.
    pub(super) fn open_remote_consumer(
        &mut self,
        id: SessionId,
        name: String,
        group: String,
        prefetch: u32,
        device: (Option<u32>, Option<String>),
        start: GroupStart,
    ) {
        let uid = self.sessions.get(&id).map_or(u32::MAX, |s| s.cred.uid);
        match self.open_remote_inner(id, name, group, prefetch, device, start, uid) {
            Ok(()) => {}
            Err(r) => self.refuse(id, r),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn open_remote_inner(
        &mut self,
        id: SessionId,
        name: String,
        group: String,
        prefetch: u32,
        device: (Option<u32>, Option<String>),
        start: GroupStart,
        uid: u32,
    ) -> Result<(), Refusal> {
        self.check_open(id)?;
        let ordinal = self.gpus.resolve_device(&device)?;
        if !proto::valid_name(&group) {
            return Err(Refusal::invalid(format!(
                "group name {group:?} must be 1-128 characters of A-Z a-z 0-9 . _ -"
            )));
        }
        let (node, spec) = self.remote_home(&name)?;
        let layout = PoolLayout::new(spec.slot_size, prefetch)
            .ok_or_else(|| Refusal::invalid("the landing area's size overflows"))?;
        let max = self.cfg.daemon.max_pool_bytes;
        if layout.total > max {
            return Err(Refusal::limit(format!(
                "a landing area of {prefetch} slots of {} bytes for stream {name} is over daemon.max_pool_bytes = {max}; ask for a smaller prefetch",
                spec.slot_size
            )));
        }
        let reg = |what: &str, len: u64| {
            self.registered_region(
                &format!("ferry-landing-{what}-{id}"),
                len,
                true,
                "a landing area",
            )
        };
        let pool = reg("pool", layout.total)?;
        let headers = reg("headers", prefetch as u64 * HEADER_BYTES)?;
        let gpu = match ordinal {
            None => None,
            Some(n) => {
                Some(
                    self.gpus
                        .delivery_from_landing(n, pool.region(), spec.slot_size, prefetch)?,
                )
            }
        };
        let landing_id = self
            .free_landing_id()
            .ok_or_else(|| Refusal::limit("65536 landing areas in use"))?;
        let (rings, _) = self.new_rings(id)?;
        let Rings { _region, sub, comp } = rings;
        let proxy = Proxy {
            node: node.clone(),
            stream: name.clone(),
            group: group.clone(),
            uid,
            prefetch,
            start,
            _region,
            sub,
            comp,
            landing_id,
            pool,
            headers,
            layout,
            partitions: spec.partitions,
            held: vec![None; prefetch as usize],
            incarnation: 0,
            state: ProxyState::Joining { sent: false },
            answered: false,
            seeking: false,
            backlog: VecDeque::new(),
            gpu,
            delivered: 0,
            since: Instant::now(),
        };
        if proxy.gpu.is_some() {
            self.gpu_sessions += 1;
        }
        let device_name = proxy
            .gpu
            .as_ref()
            .map(|g| format!("cuda:{}", g.info.ordinal));
        self.landings
            .insert(landing_id, super::inbound::Landed::Consumer(id));
        limited!(INFO, session = id, stream = %name, %group, home = %node, prefetch, device = device_name.as_deref().unwrap_or("host"), "consumer of a stream homed on another host: joining there");
        if let Some(s) = self.sessions.get_mut(&id) {
            s.role = Role::Remote(Box::new(proxy));
        }
        self.send_joins(&node);
        Ok(())
    }

    pub(super) fn free_landing_id(&self) -> Option<u16> {
        let taken = |i: u16| {
            self.landings.contains_key(&i) || self.retired.iter().any(|r| r.landing_id == i)
        };
        // Start after the last one handed out, so that ids are not reused
        // soon.
        let start = self.next_landing;
        (0..=u16::MAX)
            .map(|k| start.wrapping_add(k))
            .find(|&i| !taken(i))
    }

    /// Sends the joins of trainers waiting for `node`, once there is a data
    /// link to it.
    pub(super) fn send_joins(&mut self, node: &str) {
        let Some(cl) = &self.cluster else {
            return;
        };
        if cl.link(node).is_none() {
            return;
        }
        let mut joins = Vec::new();
        for (id, s) in self.sessions.iter_mut() {
            if let Role::Remote(p) = &mut s.role {
                if p.node == node
                    && matches!(
                        p.state,
                        ProxyState::Joining { sent: false } | ProxyState::Waiting
                    )
                {
                    p.state = ProxyState::Joining { sent: true };
                    // What lands from now on belongs to this membership.
                    p.incarnation += 1;
                    joins.push(p.join_msg(*id));
                }
            }
        }
        for j in joins {
            cl.peers.send(node, PeerMsg::Join(j));
        }
    }

    /// The home answered a join.
    pub(super) fn proxy_joined(
        &mut self,
        node: &str,
        member: u64,
        result: Result<crate::peers::Joined, WireRefusal>,
    ) {
        let cap = self.cfg.daemon.ring_capacity;
        let Some(s) = self.sessions.get_mut(&member) else {
            // The trainer left meanwhile.
            self.send_to(node, PeerMsg::Leave { member });
            return;
        };
        let Role::Remote(p) = &mut s.role else {
            return;
        };
        if p.node != node {
            return;
        }
        match result {
            Ok(j) => {
                if j.slot_size != p.layout.slot_size || j.partitions != p.partitions {
                    let why = format!(
                        "stream {} changed at its home (now {} partitions of {}-byte slots)",
                        p.stream, j.partitions, j.slot_size
                    );
                    return self.fail_session(member, &why);
                }
                p.state = ProxyState::Active;
                limited!(INFO, session = member, stream = %p.stream, home = node, "joined at the home");
                if p.answered {
                    return;
                }
                p.answered = true;
                let info = SessionInfo {
                    session: member,
                    stream_id: 0,
                    partitions: p.partitions,
                    slot_size: p.layout.slot_size,
                    slot_count: p.layout.slot_count,
                    ring_capacity: cap,
                    credits: p.prefetch,
                    gpu: p.gpu.as_ref().map(|g| g.info.clone()),
                    acks: false,
                };
                let pool_ro = p.pool.region().open_readonly();
                let ring_fd = p._region.fd();
                match pool_ro {
                    Ok(ro) => {
                        use std::os::fd::AsRawFd;
                        let fds = [ring_fd, ro.as_raw_fd()];
                        self.reply(member, &Response::Opened(info), &fds);
                    }
                    Err(e) => self.fail_session(member, &format!("opening the landing area: {e}")),
                }
            }
            Err(r) if !p.answered => {
                // Never opened: the trainer gets the home's refusal.
                let landing = p.landing_id;
                if p.gpu.is_some() {
                    self.gpu_sessions -= 1;
                }
                s.role = Role::Control;
                self.landings.remove(&landing);
                self.refuse(
                    member,
                    Refusal::new(
                        r.code,
                        format!("at the stream's home, {node}: {}", r.message),
                    ),
                );
            }
            Err(r) => {
                let why = format!(
                    "stream's home {node} refused to take it back: {}",
                    r.message
                );
                self.fail_session(member, &why);
            }
        }
    }

    /// A write with immediate landed.
    pub(super) fn landed(&mut self, node: &str, imm: u32) {
        let Imm { landing, slot } = Imm::decode(imm);
        let id = match self.landings.get(&landing) {
            Some(super::inbound::Landed::Consumer(id)) => *id,
            Some(super::inbound::Landed::Producer(id)) => {
                let id = *id;
                return self.inbound(node, id, slot);
            }
            None => return, // a retired landing area: its session is gone
        };
        match self.landed_inner(node, id, slot as u32) {
            Ok(()) => {}
            Err(why) => {
                limited!(
                    WARN,
                    peer = node,
                    session = id,
                    "a landing write broke the protocol: {why}"
                );
                self.fail_session(id, &why);
            }
        }
    }

    fn landed_inner(&mut self, node: &str, id: SessionId, slot: u32) -> Result<(), String> {
        let Some(Role::Remote(p)) = self.sessions.get_mut(&id).map(|s| &mut s.role) else {
            return Ok(());
        };
        // Writes may come before the answer to the join does (they take
        // the fabric, it the control connection); a link carries only the
        // membership joined over it.
        if p.node != node
            || !matches!(
                p.state,
                ProxyState::Active | ProxyState::Joining { sent: true }
            )
        {
            return Ok(());
        }
        if slot >= p.layout.slot_count {
            return Err(format!(
                "a write into landing slot {slot} of {}",
                p.layout.slot_count
            ));
        }
        let mut hb = [0u8; HEADER_BYTES as usize];
        if !p
            .headers
            .region()
            .read_shared(slot as u64 * HEADER_BYTES, &mut hb)
        {
            return Err("reading a landing header".into());
        }
        let h = Header::decode(&hb)?;
        if h.member != id {
            return Err(format!(
                "a landing header for member {} in member {id}'s area",
                h.member
            ));
        }
        match h.kind {
            Kind::EndOfEpoch => {
                let d = Desc {
                    op: desc::OP_END_OF_EPOCH,
                    stream: 0,
                    offset: h.epoch,
                    ..Desc::default()
                };
                p.deliver_after(d)?;
                let member = id;
                let node = p.node.clone();
                self.send_to(
                    &node,
                    PeerMsg::Credit {
                        member,
                        landing_slot: slot,
                    },
                );
            }
            Kind::ProducerEnd | Kind::ProducerLeave => {
                return Err("a producer's record in a consumer's landing area".into())
            }
            Kind::Batch => {
                if p.held[slot as usize].is_some() {
                    return Err(format!(
                        "a batch written into landing slot {slot}, which the trainer holds"
                    ));
                }
                if h.partition >= p.partitions
                    || h.len > p.layout.slot_size
                    || h.meta_len > META_MAX
                {
                    return Err(format!(
                        "a landing header out of range (partition {}, {} bytes, {} of metadata)",
                        h.partition, h.len, h.meta_len
                    ));
                }
                p.held[slot as usize] = Some(Held {
                    partition: h.partition,
                    offset: h.offset,
                    home_slot: h.home_slot,
                    incarnation: p.incarnation,
                });
                let d = Desc {
                    op: desc::OP_DELIVER,
                    flags: h.flags & desc::FLAG_RECORD,
                    stream: 0,
                    partition: h.partition,
                    slot,
                    len: h.len,
                    meta_len: h.meta_len,
                    offset: h.offset,
                    ..Desc::default()
                };
                p.delivered += 1;
                p.deliver(d)?;
            }
        }
        Ok(())
    }

    /// A trainer's submissions: releases and commits, to its home.
    pub(super) fn drain_proxy(&mut self, id: SessionId) -> Result<usize, Violation> {
        let Some(Role::Remote(p)) = self.sessions.get_mut(&id).map(|s| &mut s.role) else {
            return Ok(0);
        };
        let mut out = Vec::new();
        let mut n = 0;
        while let Some(d) = p.sub.pop().map_err(|e| Violation(e.to_string()))? {
            n += 1;
            match d.op {
                desc::OP_RELEASE => {
                    let slot = d.slot as usize;
                    let held = p.held.get(slot).copied().flatten().ok_or_else(|| {
                        Violation(format!(
                            "release of landing slot {}, which it does not hold",
                            d.slot
                        ))
                    })?;
                    if held.partition != d.partition || held.offset != d.offset {
                        return Err(Violation(format!(
                            "release of partition {} offset {} from landing slot {}, which holds partition {} offset {}",
                            d.partition, d.offset, d.slot, held.partition, held.offset
                        )));
                    }
                    if let Some(g) = &mut p.gpu {
                        g.release(d.partition, d.offset, d.dslot)?;
                    }
                    p.held[slot] = None;
                    let commit = d.flags & desc::FLAG_COMMIT != 0;
                    // A join on its way counts as the membership: the
                    // home answers messages in the order they come.
                    let joined = matches!(
                        p.state,
                        ProxyState::Active | ProxyState::Joining { sent: true }
                    );
                    match p.state {
                        _ if joined && held.incarnation == p.incarnation => {
                            out.push(PeerMsg::Release {
                                member: id,
                                partition: d.partition,
                                offset: d.offset,
                                home_slot: held.home_slot,
                                landing_slot: d.slot,
                                commit,
                            })
                        }
                        // Delivered by an earlier membership (the home
                        // redelivers it): the slot, which the join named
                        // busy, is free for the new one.
                        _ if joined => out.push(PeerMsg::Credit {
                            member: id,
                            landing_slot: d.slot,
                        }),
                        // Free for the next join.
                        _ => {}
                    }
                }
                desc::OP_COMMIT => {
                    if matches!(
                        p.state,
                        ProxyState::Active | ProxyState::Joining { sent: true }
                    ) {
                        out.push(PeerMsg::Commit {
                            member: id,
                            partition: (d.partition != desc::COMMIT_ALL).then_some(d.partition),
                            offset: d.offset,
                        });
                    }
                }
                op => return Err(Violation(format!("consumer sent op {op}"))),
            }
        }
        let flushed = p.flush().map_err(Violation)?;
        let node = p.node.clone();
        for m in out {
            self.send_to(&node, m);
        }
        Ok(n + flushed)
    }

    /// A trainer seeks: asked of the home, answered when it answers.
    pub(super) fn proxy_seek(&mut self, id: SessionId, partition: u32, offset: u64) {
        let _ = self.drain_proxy(id);
        let Some(Role::Remote(p)) = self.sessions.get_mut(&id).map(|s| &mut s.role) else {
            return;
        };
        if p.state != ProxyState::Active {
            let why = format!(
                "stream {}'s home, {}, is not reachable now; seek again once it is back",
                p.stream, p.node
            );
            return self.refuse(id, Refusal::new(ErrorCode::ShuttingDown, why));
        }
        p.seeking = true;
        let node = p.node.clone();
        self.send_to(
            &node,
            PeerMsg::Seek {
                member: id,
                partition,
                offset,
            },
        );
    }

    pub(super) fn proxy_seek_done(
        &mut self,
        node: &str,
        member: u64,
        result: Result<(), WireRefusal>,
    ) {
        let Some(Role::Remote(p)) = self.sessions.get_mut(&member).map(|s| &mut s.role) else {
            return;
        };
        if p.node != node || !std::mem::take(&mut p.seeking) {
            return;
        }
        match result {
            Ok(()) => self.reply(member, &Response::Done, &[]),
            Err(r) => self.refuse(member, Refusal::new(r.code, r.message)),
        }
    }

    /// The home ended the membership.
    pub(super) fn proxy_evicted(&mut self, node: &str, member: u64, why: String) {
        if let Some(Role::Remote(p)) = self.sessions.get(&member).map(|s| &s.role) {
            if p.node == node {
                self.fail_session(member, &format!("its stream's home {node} ended it: {why}"));
            }
        }
    }

    /// The home went down: its trainers wait for it.
    pub(super) fn proxies_wait(&mut self, node: &str) {
        let mut refused = Vec::new();
        for (id, s) in self.sessions.iter_mut() {
            if let Role::Remote(p) = &mut s.role {
                if p.node == node {
                    if !p.answered {
                        refused.push(*id);
                    }
                    p.state = ProxyState::Waiting;
                    if std::mem::take(&mut p.seeking) {
                        refused.push(*id);
                    }
                }
            }
        }
        for id in refused {
            self.refuse(
                id,
                Refusal::new(
                    ErrorCode::ShuttingDown,
                    format!("the stream's home, {node}, went down"),
                ),
            );
        }
    }

    /// A trainer's session closed: its membership at the home ends, and its
    /// landing area is retired.
    pub(super) fn proxy_closed(&mut self, id: SessionId, mut p: Proxy) {
        if let Some(mut g) = p.gpu.take() {
            // Copies still reading the landing area finish before it is
            // unregistered from the GPU (as `g` goes).
            g.quiesce();
            self.gpu_sessions -= 1;
        }
        self.landings.remove(&p.landing_id);
        if matches!(
            p.state,
            ProxyState::Active | ProxyState::Joining { sent: true }
        ) {
            self.send_to(&p.node, PeerMsg::Leave { member: id });
        }
        limited!(INFO, session = id, stream = %p.stream, home = %p.node, delivered = p.delivered, unreleased = p.held(), "consumer of a stream homed on another host closed");
        self.retire(p.landing_id, vec![p.pool, p.headers]);
    }

    /// Keeps `regs` registered, and `id` from being handed out, a while:
    /// writes posted before the peer heard of the close may still come.
    pub(super) fn retire(&mut self, id: u16, regs: Vec<Arc<Registered>>) {
        self.retired.push(Retired {
            _regs: regs,
            landing_id: id,
            until: Instant::now() + RETIRE_FOR,
        });
    }

    /// Drops retired landing areas whose time is up.
    pub(super) fn expire_retired(&mut self) {
        let now = Instant::now();
        self.retired.retain(|r| r.until > now);
    }
}
