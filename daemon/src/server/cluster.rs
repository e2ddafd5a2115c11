//! The loop's side of the cluster: the peer control plane's events, and
//! what the status shows of the peers.

use std::collections::BTreeMap;
use std::time::Instant;

use ferry_admin::PeerStatus;

use super::Server;
use crate::config::Config;
use crate::limited;
use crate::peers::{self, Event, FabricOffer, PeerMsg, Peers, StreamAnnounce};

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

/// This daemon in its cluster.
pub(super) struct Cluster {
    pub(super) node: String,
    pub(super) peers: Peers,
    pub(super) table: BTreeMap<String, PeerView>,
    pub(super) refused: u64,
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
        };
        let peers = Peers::start(settings, inbox)
            .map_err(|e| format!("cluster.listen = {listen:?}: {e}"))?;
        let now = Instant::now();
        let table = c
            .peers
            .iter()
            .map(|p| {
                (
                    p.node_id.clone(),
                    PeerView {
                        addr: p.addr.clone(),
                        state: "connecting",
                        since: now,
                        fabric: String::new(),
                        rtt_us: None,
                        bytes_in: 0,
                        bytes_out: 0,
                        errors: 0,
                        last_error: None,
                        streams: Vec::new(),
                    },
                )
            })
            .collect();
        Ok(Some(Cluster {
            node: node.clone(),
            peers,
            table,
            refused: 0,
        }))
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
                if let Some(v) = cl.table.get_mut(&node) {
                    v.state = "up";
                    v.since = Instant::now();
                    v.fabric = fabric.clone();
                    v.rtt_us = None;
                }
                limited!(INFO, peer = %node, %addr, %fabric, "peer up");
                let mine = self.local_streams();
                if let Some(cl) = &self.cluster {
                    cl.peers.send(&node, PeerMsg::Streams(mine));
                }
            }
            Event::Down { node, why } => {
                if let Some(v) = cl.table.get_mut(&node) {
                    v.state = "down";
                    v.since = Instant::now();
                    v.errors += 1;
                    v.last_error = Some(why.clone());
                }
                limited!(WARN, peer = %node, "peer down: {why}");
            }
            Event::Error { node, why } => {
                if let Some(v) = cl.table.get_mut(&node) {
                    if v.state == "up" {
                        return; // a stale attempt
                    }
                    v.errors += 1;
                    v.last_error = Some(why.clone());
                }
                limited!(DEBUG, peer = %node, "peer unreachable: {why}");
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
            // The control plane answers these itself.
            PeerMsg::Fabric(_)
            | PeerMsg::Ping { .. }
            | PeerMsg::Pong { .. }
            | PeerMsg::Bye { .. } => {}
        }
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
    }
}
