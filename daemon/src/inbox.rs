//! The loop's one way in from other threads: a channel and the loop's
//! doorbell (an eventfd only ferryd holds, in the loop's epoll set). The
//! admin thread, and later the peer control plane, send [`Message`]s; the
//! loop owns all state and answers through the reply channels the
//! messages carry. Nothing is shared with the loop but this.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;

use ferry_shm::sys;

/// What another thread asks of the loop.
pub enum Message {
    /// An admin client's request, with the client's uid (from the socket).
    Admin {
        req: ferry_admin::Request,
        uid: u32,
        reply: mpsc::Sender<ferry_admin::Response>,
    },
    /// From the peer control plane.
    Peer(crate::peers::Event),
    /// A data link to a peer connected (or failed to), for its
    /// `generation`th control connection.
    Link {
        node: String,
        generation: u64,
        result: Result<std::sync::Arc<crate::fabric::Link>, String>,
    },
    /// The syncer thread synced part of a disk stream's log.
    Synced(crate::server::Synced),
    /// Membership in etcd saw a change.
    Members(crate::membership::MemberEvent),
    /// A scrape of `/metrics` wants a snapshot.
    Metrics {
        reply: tokio::sync::oneshot::Sender<crate::metrics::Snapshot>,
    },
}

/// The sending side, cloned into each thread that may ask.
#[derive(Clone)]
pub struct Sender {
    tx: mpsc::Sender<Message>,
    doorbell: Arc<OwnedFd>,
}

impl Sender {
    /// Queues `m` and wakes the loop; false when the loop is gone.
    pub fn send(&self, m: Message) -> bool {
        if self.tx.send(m).is_err() {
            return false;
        }
        sys::eventfd_signal(self.doorbell.as_raw_fd());
        true
    }
}

/// The loop's side.
pub struct Inbox {
    rx: mpsc::Receiver<Message>,
    doorbell: Arc<OwnedFd>,
}

impl Inbox {
    pub fn new() -> std::io::Result<(Inbox, Sender)> {
        let (tx, rx) = mpsc::channel();
        let doorbell = Arc::new(sys::eventfd()?);
        Ok((
            Inbox {
                rx,
                doorbell: doorbell.clone(),
            },
            Sender { tx, doorbell },
        ))
    }

    /// The doorbell, for the loop's epoll set.
    pub fn fd(&self) -> i32 {
        self.doorbell.as_raw_fd()
    }

    /// After the doorbell rang: nobody else reads it, so this never blocks.
    pub fn rang(&self) {
        sys::eventfd_drain(self.doorbell.as_raw_fd());
    }

    /// The next message, if any (the loop asks after every epoll wait).
    pub fn next(&self) -> Option<Message> {
        self.rx.try_recv().ok()
    }
}
