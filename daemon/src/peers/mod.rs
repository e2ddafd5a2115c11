//! The peer control plane: one authenticated TCP connection to each other
//! daemon of the cluster, on a tokio runtime in a thread of its own. The
//! data plane (the loop) never waits for it: what peers say reaches the
//! loop as [`Event`]s through its inbox, and the loop sends to peers
//! through [`Peers::send`], which only queues.
//!
//! Of two peers, the one whose node id sorts first dials (and redials
//! after a failure, with backoff); the other accepts. Both prove they hold
//! the cluster secret ([`auth`]) before anything else is said; then they
//! offer their fabrics and agree on one, and exchange heartbeats. A peer
//! that sends nothing for `peer_timeout_ms` is declared down.

pub mod auth;
mod control;
pub mod wire;

use std::net::SocketAddr;
use std::time::Duration;

pub use auth::Secret;
pub use wire::{
    FabricOffer, Join, Joined, Landing, PeerMsg, Producing, StreamAnnounce, WireRefusal,
};

use crate::inbox;

/// What the control plane needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub listen: SocketAddr,
    /// (node id, address) of every peer.
    pub peers: Vec<(String, String)>,
    pub secret: Secret,
    pub heartbeat: Duration,
    pub timeout: Duration,
    pub reconnect_max: Duration,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
    pub fabric: FabricOffer,
    /// Peers come and go at run time ([`Peers::add`], [`Peers::remove`]:
    /// membership in etcd), and any daemon that proves it holds the
    /// cluster secret is accepted, listed yet or not.
    pub dynamic: bool,
}

/// What the control plane tells the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Authenticated, fabric agreed.
    Up {
        node: String,
        addr: String,
        fabric: String,
    },
    /// Connection lost or peer silent; it is redialed (by the dialing side).
    Down { node: String, why: String },
    /// A failed attempt to reach or hear a peer (it stays down).
    Error { node: String, why: String },
    /// A connection refused before the peer was known to be one: wrong
    /// secret, unknown node, garbage.
    Refused { addr: String, why: String },
    /// After each heartbeat answered.
    Stats {
        node: String,
        rtt_us: u64,
        bytes_in: u64,
        bytes_out: u64,
    },
    /// A message for the loop.
    Msg { node: String, msg: PeerMsg },
}

/// The loop's handle on the control plane.
pub struct Peers {
    tx: tokio::sync::mpsc::UnboundedSender<control::Command>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Where it listens (the configured address, with the port chosen
    /// when it was 0).
    pub listen: SocketAddr,
}

impl Peers {
    /// Binds the listener (so that a taken address fails start-up) and
    /// starts the control plane's thread.
    pub fn start(settings: Settings, inbox: inbox::Sender) -> std::io::Result<Peers> {
        let listener = std::net::TcpListener::bind(settings.listen)?;
        listener.set_nonblocking(true)?;
        let listen = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("ferryd-peers".into())
            .spawn(move || control::run(settings, listener, rx, inbox))?;
        Ok(Peers {
            tx,
            thread: Some(thread),
            listen,
        })
    }

    /// Queues `msg` for `node`; dropped when it is down (the loop learns
    /// of that from an [`Event::Down`]).
    pub fn send(&self, node: &str, msg: PeerMsg) {
        let _ = self.tx.send(control::Command::Send {
            node: node.to_string(),
            msg,
        });
    }

    /// A peer to reach at `addr` (dialed when this node's id sorts first);
    /// a peer already known is redialed at its new address.
    pub fn add(&self, node: &str, addr: &str) {
        let _ = self.tx.send(control::Command::AddPeer {
            node: node.to_string(),
            addr: addr.to_string(),
        });
    }

    /// A peer that left: no more dialing, its connection is closed (the
    /// loop hears [`Event::Down`] with `why`).
    pub fn remove(&self, node: &str, why: &str) {
        let _ = self.tx.send(control::Command::RemovePeer {
            node: node.to_string(),
            why: why.to_string(),
        });
    }

    /// Says goodbye to every peer and stops the thread.
    pub fn stop(&mut self) {
        let _ = self.tx.send(control::Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        self.stop();
    }
}
