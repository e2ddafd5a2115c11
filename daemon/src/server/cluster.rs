//! The loop's side of the cluster: the peer control plane's events, and
//! what the status shows of the peers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use ferry_admin::PeerStatus;

use super::Server;
use crate::config::Config;
use crate::error::Refusal;
use crate::fabric::{tag_of, Fabric, Link, PendingLink};
use crate::inbox::Message;
use crate::limited;
use crate::peers::{self, Event, FabricOffer, PeerMsg, Peers, StreamAnnounce};
use ferry_shm::proto::ErrorCode;

/// One peer as the loop knows it.
pub(super) struct PeerView {
    addr: String,
    state: &'static str,
    since: Instant,
    fabric: String,
    rtt_us: Option<u64>,
    bytes_in: u64,
    bytes_out: u64,
    errors: u64,
    last_error: Option<String>,
    /// Its streams, as it last announced them.
    streams: Vec<StreamAnnounce>,
}

impl PeerView {
    fn new(addr: &str, now: Instant) -> PeerView {
        PeerView {
            addr: addr.to_string(),
            state: "connecting",
            since: now,
            fabric: String::new(),
            rtt_us: None,
            bytes_in: 0,
            bytes_out: 0,
            errors: 0,
            last_error: None,
            streams: Vec::new(),
        }
    }

    pub(super) fn is_up(&self) -> bool {
        self.state == "up"
    }

    /// It left the cluster (its etcd registration is gone).
    pub(super) fn has_left(&self) -> bool {
        self.state == "left"
    }

    pub(super) fn has_stream(&self, name: &str) -> bool {
        self.streams.iter().any(|s| s.name == name)
    }

    pub(super) fn stream(&self, name: &str) -> Option<&StreamAnnounce> {
        self.streams.iter().find(|s| s.name == name)
    }
}

/// The data link to one peer: one endpoint per control connection.
#[derive(Default)]
pub(super) struct PeerLink {
    /// Counts the control connections; a link made for an earlier one is
    /// dropped when it comes.
    generation: u64,
    /// Ours, waiting for the peer's endpoint info.
    pending: Option<PendingLink>,
    pub(super) link: Option<Arc<Link>>,
    /// Its id in work-request ids.
    tag: u16,
    /// What its links did, all of them.
    pub(super) stats: Arc<crate::fabric::LinkStats>,
}

/// Receives kept posted on each link (one is used by each landing write).
const RECV_DEPTH: usize = 512;

/// This daemon in its cluster.
pub(super) struct Cluster {
    pub(super) node: String,
    pub(super) peers: Peers,
    pub(super) table: BTreeMap<String, PeerView>,
    pub(super) refused: u64,
    pub(super) fabric: Arc<Fabric>,
    pub(super) links: HashMap<String, PeerLink>,
    /// Peer of each link tag (tag - 1).
    tags: Vec<String>,
    /// Messages about members (joins first) that came before the data
    /// link to their host was up, in order.
    pending: Vec<(String, PeerMsg)>,
    /// Membership in etcd (`membership = "etcd"`), and what it last said.
    pub(super) membership: Option<crate::membership::Membership>,
    pub(super) etcd: Option<EtcdView>,
}

/// What the loop knows of etcd.
pub(super) struct EtcdView {
    pub(super) endpoints: Vec<String>,
    pub(super) prefix: String,
    pub(super) up: bool,
    pub(super) since: Instant,
    pub(super) last_error: Option<String>,
}

impl Cluster {
    /// Starts the control plane when the config has a `[cluster]`.
    pub(super) fn start(
        cfg: &Config,
        secret: Option<Vec<u8>>,
        fabric: &ferry_verbs::select::Choice,
        inbox: crate::inbox::Sender,
    ) -> Result<Option<Cluster>, String> {
        let c = &cfg.cluster;
        let (Some(node), Some(listen), Some(secret)) = (&c.node_id, &c.listen, secret) else {
            return Ok(None);
        };
        let listen_addr = std::net::ToSocketAddrs::to_socket_addrs(listen.as_str())
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| format!("cluster.listen = {listen:?} is not an address:port"))?;
        let settings = peers::Settings {
            node: node.clone(),
            listen: listen_addr,
            peers: c
                .peers
                .iter()
                .map(|p| (p.node_id.clone(), p.addr.clone()))
                .collect(),
            secret: peers::Secret::new(secret),
            heartbeat: std::time::Duration::from_millis(c.heartbeat_ms),
            timeout: std::time::Duration::from_millis(c.peer_timeout_ms),
            reconnect_max: std::time::Duration::from_millis(c.reconnect_max_ms),
            handshake_timeout: std::time::Duration::from_millis(cfg.daemon.handshake_timeout_ms),
            fabric: FabricOffer {
                ibv: match fabric {
                    ferry_verbs::select::Choice::Ibv { device } => Some(device.clone()),
                    ferry_verbs::select::Choice::Soft => None,
                },
            },
            dynamic: c.uses_etcd(),
        };
        let soft_bind = listen_addr.ip();
        let fabric = Arc::new(
            Fabric::open(fabric, soft_bind).map_err(|e| format!("opening the fabric: {e}"))?,
        );
        let peers = Peers::start(settings, inbox.clone())
            .map_err(|e| format!("cluster.listen = {listen:?}: {e}"))?;
        let now = Instant::now();
        let table = c
            .peers
            .iter()
            .map(|p| (p.node_id.clone(), PeerView::new(&p.addr, now)))
            .collect();
        let tags: Vec<String> = c.peers.iter().map(|p| p.node_id.clone()).collect();
        let links = tags
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.clone(),
                    PeerLink {
                        tag: i as u16 + 1,
                        ..PeerLink::default()
                    },
                )
            })
            .collect();
        let (membership, etcd) = if c.uses_etcd() {
            let me = crate::membership::MemberRecord {
                node: node.clone(),
                addr: listen.clone(),
                fabric: fabric.name.clone(),
                gpus: ferry_cuda::probe().map_or(0, |p| p.gpus.len() as u32),
                version: env!("CARGO_PKG_VERSION").to_string(),
            };
            let m = crate::membership::Membership::start(
                crate::membership::EtcdSettings {
                    endpoints: c.etcd_endpoints.clone(),
                    prefix: c.etcd_prefix.clone(),
                    ttl: std::time::Duration::from_millis(c.etcd_ttl_ms),
                    me,
                },
                inbox,
            )
            .map_err(|e| format!("starting the etcd membership thread: {e}"))?;
            (
                Some(m),
                Some(EtcdView {
                    endpoints: c.etcd_endpoints.clone(),
                    prefix: c.etcd_prefix.clone(),
                    up: false,
                    since: now,
                    last_error: Some("not reached yet".into()),
                }),
            )
        } else {
            (None, None)
        };
        Ok(Some(Cluster {
            node: node.clone(),
            peers,
            table,
            refused: 0,
            fabric,
            links,
            tags,
            pending: Vec::new(),
            membership,
            etcd,
        }))
    }

    /// A peer found at run time (in etcd, or dialing in): known from now
    /// on, dialed when this node's id sorts first. `addr` is where it
    /// listens (None: not known yet).
    pub(super) fn learn_peer(&mut self, node: &str, addr: Option<&str>) {
        if node == self.node {
            return;
        }
        let now = Instant::now();
        let v = self
            .table
            .entry(node.to_string())
            .or_insert_with(|| PeerView::new("", now));
        if v.state == "left" {
            v.state = "connecting";
            v.since = now;
        }
        if !self.links.contains_key(node) {
            self.tags.push(node.to_string());
            let tag = self.tags.len() as u16;
            self.links.insert(
                node.to_string(),
                PeerLink {
                    tag,
                    ..PeerLink::default()
                },
            );
        }
        if let Some(a) = addr {
            v.addr = a.to_string();
            self.peers.add(node, a);
        }
    }
}

/// A `ferry status --cluster` waiting for its peers' summaries.
pub(super) struct ClusterAsk {
    id: u64,
    status: ferry_admin::Status,
    reply: std::sync::mpsc::Sender<ferry_admin::Response>,
    waiting: std::collections::BTreeSet<String>,
    deadline: Instant,
}

/// How long a cluster status waits for its peers.
const CLUSTER_ASK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Server {
    /// Answers a status with the cluster's summaries: at once without
    /// peers up, else once every peer up answered (or a second passed).
    pub(super) fn ask_cluster(&mut self, reply: std::sync::mpsc::Sender<ferry_admin::Response>) {
        let mut status = self.status_view(None);
        status.cluster.push(self.node_summary());
        let up: std::collections::BTreeSet<String> = self
            .cluster
            .as_ref()
            .map(|c| {
                c.table
                    .iter()
                    .filter(|(_, v)| v.is_up())
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        if up.is_empty() {
            let _ = reply.send(ferry_admin::Response::Status(Box::new(status)));
            return;
        }
        self.next_ask += 1;
        let id = self.next_ask;
        if let Some(cl) = &self.cluster {
            for n in &up {
                cl.peers.send(n, PeerMsg::StatusAsk { id });
            }
        }
        self.cluster_asks.push(ClusterAsk {
            id,
            status,
            reply,
            waiting: up,
            deadline: Instant::now() + CLUSTER_ASK_WAIT,
        });
    }

    fn status_told(&mut self, node: &str, id: u64, summary: ferry_admin::NodeSummary) {
        let Some(a) = self.cluster_asks.iter_mut().find(|a| a.id == id) else {
            return; // late
        };
        if a.waiting.remove(node) {
            // It is who it says: the summary's node is the connection's.
            a.status.cluster.push(ferry_admin::NodeSummary {
                node: node.to_string(),
                ..summary
            });
        }
        self.finish_cluster_asks();
    }

    /// Answers the cluster statuses that have every summary, or waited
    /// long enough (from housekeeping too).
    pub(super) fn finish_cluster_asks(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.cluster_asks.len() {
            let a = &self.cluster_asks[i];
            if a.waiting.is_empty() || now >= a.deadline {
                let mut a = self.cluster_asks.swap_remove(i);
                a.status.cluster_missing = a.waiting.into_iter().collect();
                a.status.cluster.sort_by(|x, y| x.node.cmp(&y.node));
                let _ = a
                    .reply
                    .send(ferry_admin::Response::Status(Box::new(a.status)));
            } else {
                i += 1;
            }
        }
    }

    /// What etcd membership said.
    pub(super) fn member_event(&mut self, e: crate::membership::MemberEvent) {
        use crate::membership::MemberEvent;
        let Some(cl) = &mut self.cluster else {
            return;
        };
        match e {
            MemberEvent::View(list) => {
                let known: Vec<String> = cl
                    .table
                    .iter()
                    .filter(|(_, v)| v.state != "left")
                    .map(|(n, _)| n.clone())
                    .collect();
                let gone = crate::membership::gone(known.iter().map(String::as_str), &list);
                for m in &list {
                    cl.learn_peer(&m.node, Some(&m.addr));
                }
                limited!(
                    INFO,
                    members = list.len() + 1,
                    left = gone.len(),
                    "etcd: the members, read whole"
                );
                for node in gone {
                    self.peer_left(&node, "it is no longer registered in etcd");
                }
            }
            MemberEvent::Joined(m) => {
                limited!(INFO, peer = %m.node, addr = %m.addr, fabric = %m.fabric, gpus = m.gpus, "etcd: a member registered");
                cl.learn_peer(&m.node, Some(&m.addr));
            }
            MemberEvent::Left { node, why } => self.peer_left(&node, &why),
            MemberEvent::Etcd { up, why } => {
                if let Some(v) = &mut cl.etcd {
                    if v.up != up {
                        v.up = up;
                        v.since = Instant::now();
                    }
                    if !up {
                        v.last_error = Some(why);
                    }
                }
            }
        }
    }

    /// A peer left the cluster (its etcd lease expired): not dialed any
    /// more; its connection closes, and what it did here ends as when it
    /// fails (the control plane reports the Down).
    fn peer_left(&mut self, node: &str, why: &str) {
        let Some(cl) = &mut self.cluster else {
            return;
        };
        limited!(WARN, peer = %node, "peer left: {why}");
        cl.peers
            .remove(node, &format!("it left the cluster: {why}"));
        if let Some(v) = cl.table.get_mut(node) {
            v.state = "left";
            v.since = Instant::now();
            v.last_error = Some(why.to_string());
        }
    }
}

impl Cluster {
    /// The data link to `node`, when up.
    pub(super) fn link(&self, node: &str) -> Option<Arc<Link>> {
        self.links.get(node)?.link.clone()
    }

    fn node_of_tag(&self, tag: u16) -> Option<&str> {
        self.tags
            .get((tag as usize).checked_sub(1)?)
            .map(String::as_str)
    }

    pub(super) fn status(&self) -> Vec<PeerStatus> {
        self.table
            .iter()
            .map(|(node, v)| PeerStatus {
                node_id: node.clone(),
                addr: v.addr.clone(),
                state: v.state.to_string(),
                state_ms: v.since.elapsed().as_millis() as u64,
                fabric: v.fabric.clone(),
                rtt_us: v.rtt_us,
                bytes_in: v.bytes_in,
                bytes_out: v.bytes_out,
                errors: v.errors,
                last_error: v.last_error.clone(),
                streams: v.streams.iter().map(|s| s.name.clone()).collect(),
            })
            .collect()
    }
}

impl Server {
    /// What the control plane said.
    pub(super) fn peer_event(&mut self, e: Event) {
        let Some(cl) = &mut self.cluster else {
            return;
        };
        match e {
            Event::Up { node, addr, fabric } => {
                if !cl.table.contains_key(&node) && cl.etcd.is_some() {
                    // It dialed in before etcd told us of it.
                    cl.learn_peer(&node, None);
                }
                if let Some(v) = cl.table.get_mut(&node) {
                    v.state = "up";
                    v.since = Instant::now();
                    v.fabric = fabric.clone();
                    v.rtt_us = None;
                }
                limited!(INFO, peer = %node, %addr, %fabric, "peer up");
                let mine = self.local_streams();
                let Some(cl) = &mut self.cluster else {
                    return;
                };
                cl.peers.send(&node, PeerMsg::Streams(mine));
                // A data link for this connection: our endpoint now, theirs
                // when it comes.
                let Some(pl) = cl.links.get_mut(&node) else {
                    return;
                };
                pl.generation += 1;
                pl.link = None;
                match cl.fabric.endpoint() {
                    Ok(p) => {
                        cl.peers.send(&node, PeerMsg::Endpoint(p.info()));
                        pl.pending = Some(p);
                    }
                    Err(e) => limited!(WARN, peer = %node, "creating a data endpoint: {e}"),
                }
            }
            Event::Down { node, why } => {
                if let Some(v) = cl.table.get_mut(&node) {
                    if v.state != "left" {
                        v.state = "down";
                    }
                    v.since = Instant::now();
                    v.errors += 1;
                    v.last_error = Some(why.clone());
                }
                limited!(WARN, peer = %node, "peer down: {why}");
                if let Some(pl) = cl.links.get_mut(&node) {
                    pl.pending = None;
                    pl.link = None;
                }
                cl.pending.retain(|(n, _)| *n != node);
                self.remote_node_gone(&node, "its host is down");
                self.remote_producers_gone(&node, "its host is down");
                self.proxies_wait(&node);
                self.outboxes_fail(&node);
            }
            Event::Error { node, why } => {
                let mut new = true;
                if let Some(v) = cl.table.get_mut(&node) {
                    if v.state == "up" {
                        return; // a stale attempt
                    }
                    v.errors += 1;
                    new = v.last_error.as_deref() != Some(why.as_str());
                    v.last_error = Some(why.clone());
                }
                // Said once at WARN (a wrong secret, a refused
                // connection), then at DEBUG while it repeats.
                if new {
                    limited!(WARN, peer = %node, "peer unreachable: {why}");
                } else {
                    limited!(DEBUG, peer = %node, "peer unreachable: {why}");
                }
            }
            Event::Refused { addr, why } => {
                cl.refused += 1;
                limited!(WARN, %addr, "peer connection refused: {why}");
            }
            Event::Stats {
                node,
                rtt_us,
                bytes_in,
                bytes_out,
            } => {
                if let Some(v) = cl.table.get_mut(&node) {
                    v.rtt_us = Some(rtt_us);
                    v.bytes_in = bytes_in;
                    v.bytes_out = bytes_out;
                }
            }
            Event::Msg { node, msg } => self.peer_message(node, msg),
        }
    }

    fn peer_message(&mut self, node: String, msg: PeerMsg) {
        let Some(cl) = &mut self.cluster else {
            return;
        };
        match msg {
            PeerMsg::Streams(list) => {
                if let Some(v) = cl.table.get_mut(&node) {
                    limited!(DEBUG, peer = %node, streams = list.len(), "peer's streams");
                    v.streams = list;
                }
            }
            PeerMsg::Endpoint(info) => {
                let Some(pl) = cl.links.get_mut(&node) else {
                    return;
                };
                let Some(pending) = pl.pending.take() else {
                    limited!(WARN, peer = %node, "an endpoint it sent without ours waiting");
                    return;
                };
                let (tag, generation, stats) = (pl.tag, pl.generation, pl.stats.clone());
                let inbox = self.inbox_sender.clone();
                let n = node.clone();
                // Connecting blocks until the peer's side answers: not on
                // the loop.
                let spawned = std::thread::Builder::new()
                    .name("ferryd-link".into())
                    .spawn(move || {
                        let result = pending.connect(&info, tag, stats).map(Arc::new);
                        inbox.send(Message::Link {
                            node: n,
                            generation,
                            result,
                        });
                    });
                if let Err(e) = spawned {
                    limited!(WARN, peer = %node, "connecting the data link: {e}");
                }
            }
            m @ (PeerMsg::Join(_)
            | PeerMsg::Produce { .. }
            | PeerMsg::Leave { .. }
            | PeerMsg::Release { .. }
            | PeerMsg::Credit { .. }
            | PeerMsg::Commit { .. }
            | PeerMsg::Seek { .. }) => {
                if cl.link(&node).is_none() {
                    // The home side waits for its data link first.
                    cl.pending.push((node, m));
                } else {
                    self.member_message(&node, m);
                }
            }
            PeerMsg::Joined { member, result } => self.proxy_joined(&node, member, result),
            PeerMsg::SeekDone { member, result } => self.proxy_seek_done(&node, member, result),
            PeerMsg::Evicted { member, why } => self.proxy_evicted(&node, member, why),
            PeerMsg::Producing { producer, result } => {
                self.outbox_producing(&node, producer, result)
            }
            m @ (PeerMsg::Grant { .. } | PeerMsg::Published { .. } | PeerMsg::EndTaken { .. }) => {
                self.outbox_message(&node, m)
            }

            // The control plane answers these itself.
            PeerMsg::StatusAsk { id } => {
                let summary = self.node_summary();
                if let Some(cl) = &self.cluster {
                    cl.peers.send(&node, PeerMsg::StatusTell { id, summary });
                }
            }
            PeerMsg::StatusTell { id, summary } => self.status_told(&node, id, summary),
            PeerMsg::Fabric(_)
            | PeerMsg::Ping { .. }
            | PeerMsg::Pong { .. }
            | PeerMsg::Bye { .. } => {}
        }
    }

    /// The data link to `node` is connected (or failed).
    pub(super) fn link_ready(
        &mut self,
        node: String,
        generation: u64,
        result: Result<Arc<Link>, String>,
    ) {
        let Some(cl) = &mut self.cluster else {
            return;
        };
        let Some(pl) = cl.links.get_mut(&node) else {
            return;
        };
        if pl.generation != generation {
            return; // made for an earlier connection
        }
        let link = match result {
            Ok(l) => l,
            Err(e) => {
                limited!(WARN, peer = %node, "the data link did not connect: {e}; reconnecting");
                cl.peers.send(
                    &node,
                    PeerMsg::Bye {
                        reason: format!("the data link did not connect: {e}"),
                    },
                );
                return;
            }
        };
        for _ in 0..RECV_DEPTH {
            if let Err(e) = link.recv(link.next_wr_id()) {
                limited!(WARN, peer = %node, "posting receives: {e}");
                break;
            }
        }
        pl.link = Some(link);
        limited!(INFO, peer = %node, fabric = %cl.fabric.name, "data link up");
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut cl.pending)
            .into_iter()
            .partition(|(n, _)| *n == node);
        cl.pending = rest;
        for (_, m) in mine {
            self.member_message(&node, m);
        }
        self.send_joins(&node);
        self.send_produces(&node);
    }

    /// A consumer host's message about one of its members here.
    fn member_message(&mut self, node: &str, m: PeerMsg) {
        match m {
            PeerMsg::Join(j) => self.remote_join(node, j),
            PeerMsg::Produce {
                producer,
                stream,
                uid,
            } => self.remote_produce(node, producer, stream, uid),
            m => self.remote_message(node, m),
        }
    }

    /// Polls the fabric's completions: landing writes that arrived, and
    /// the end of writes this daemon posted. Returns completions handled.
    pub(super) fn progress_fabric(&mut self) -> usize {
        let Some(cl) = &self.cluster else {
            return 0;
        };
        let mut done = std::mem::take(&mut self.fabric_scratch);
        done.clear();
        let sent = cl.fabric.poll(true, &mut done, 64);
        let mut broken: Vec<(String, String)> = Vec::new();
        for c in &done {
            let Some(node) = cl.node_of_tag(tag_of(c.wr_id)) else {
                continue;
            };
            if let Some(l) = cl.link(node) {
                if let Some(t) = l.completed(c.wr_id) {
                    if c.status == ferry_verbs::WcStatus::Success {
                        l.stats.write_latency.observe(crate::metrics::since_us(t));
                    }
                }
            }
            if c.status != ferry_verbs::WcStatus::Success {
                if let Some(l) = cl.link(node) {
                    crate::fabric::LinkStats::add(&l.stats.errors, 1);
                }
                broken.push((
                    node.to_string(),
                    format!("a write completed with {:?}", c.status),
                ));
            }
        }
        done.clear();
        let got = cl.fabric.poll(false, &mut done, 64);
        let mut arrived: Vec<(String, u32)> = Vec::new();
        for c in &done {
            let Some(node) = cl.node_of_tag(tag_of(c.wr_id)) else {
                continue;
            };
            let Some(l) = cl.link(node) else {
                continue; // a receive of a link that is gone
            };
            match (c.status, c.imm) {
                (ferry_verbs::WcStatus::Success, Some(imm)) => {
                    crate::fabric::LinkStats::add(&l.stats.receives, 1);
                    arrived.push((node.to_string(), imm));
                    if let Err(e) = l.recv(l.next_wr_id()) {
                        broken.push((node.to_string(), format!("posting a receive: {e}")));
                    }
                }
                (ferry_verbs::WcStatus::WrFlush, _) => {}
                (st, _) => {
                    crate::fabric::LinkStats::add(&l.stats.errors, 1);
                    broken.push((node.to_string(), format!("a receive completed with {st:?}")))
                }
            }
        }
        self.fabric_scratch = done;
        for (node, imm) in arrived {
            self.landed(&node, imm);
        }
        broken.dedup();
        for (node, why) in broken {
            self.link_broken(&node, &why);
        }
        sent + got
    }

    /// The data link to `node` failed: its members here leave (their
    /// batches go to others), and the connection is made anew.
    fn link_broken(&mut self, node: &str, why: &str) {
        let Some(cl) = &mut self.cluster else {
            return;
        };
        let Some(pl) = cl.links.get_mut(node) else {
            return;
        };
        if pl.link.take().is_none() {
            return;
        }
        limited!(
            WARN,
            peer = node,
            "the data link failed: {why}; reconnecting"
        );
        cl.peers.send(
            node,
            PeerMsg::Bye {
                reason: format!("the data link failed: {why}"),
            },
        );
        self.remote_node_gone(node, "the data link to its host failed");
        self.remote_producers_gone(node, "the data link to its host failed");
        self.proxies_wait(node);
        self.outboxes_fail(node);
    }

    /// Registers `region` with the fabric (for remote writes into it when
    /// `remote_write`); `what` names it in the refusal.
    pub(super) fn register(
        &self,
        region: Arc<ferry_shm::Region>,
        remote_write: bool,
        what: &str,
    ) -> Result<Arc<crate::fabric::Registered>, Refusal> {
        let fabric = &self
            .cluster
            .as_ref()
            .ok_or_else(|| Refusal::new(ErrorCode::Internal, "not in a cluster"))?
            .fabric;
        fabric
            .register(region, remote_write)
            .map(Arc::new)
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("registering {what}: {e}")))
    }

    /// A new shared-memory region of `len` bytes, registered with the
    /// fabric (see [`Server::register`]).
    pub(super) fn registered_region(
        &self,
        name: &str,
        len: u64,
        remote_write: bool,
        what: &str,
    ) -> Result<Arc<crate::fabric::Registered>, Refusal> {
        let r = ferry_shm::Region::create(name, len)
            .map_err(|e| Refusal::limit(format!("creating {what}: {e}")))?;
        self.register(Arc::new(r), remote_write, what)
    }

    /// The streams whose home is this daemon, as peers are told of them.
    fn local_streams(&self) -> Vec<StreamAnnounce> {
        self.streams
            .iter()
            .map(|e| {
                let s = e.stream.spec();
                StreamAnnounce {
                    name: e.stream.name().to_string(),
                    partitions: s.partitions,
                    slot_size: s.slot_size,
                    slot_count: s.slot_count,
                    durability: s.durability,
                }
            })
            .collect()
    }

    /// Tells every peer that is up of this daemon's streams (after one was
    /// created or deleted).
    pub(super) fn announce_streams(&self) {
        let Some(cl) = &self.cluster else {
            return;
        };
        let mine = self.local_streams();
        for (node, v) in &cl.table {
            if v.state == "up" {
                cl.peers.send(node, PeerMsg::Streams(mine.clone()));
            }
        }
        if let Some(m) = &cl.membership {
            m.set_streams(
                mine.iter()
                    .map(|a| {
                        (
                            a.name.clone(),
                            crate::membership::StreamRecord {
                                home: cl.node.clone(),
                                partitions: a.partitions,
                                slot_size: a.slot_size,
                                slot_count: a.slot_count,
                                spec: a.spec().describe(),
                            },
                        )
                    })
                    .collect(),
            );
        }
    }
}
