//! The fabric as the daemon uses it: one opened device (soft or ibv,
//! chosen at start-up), memory registered from shared-memory regions, and
//! links (one reliable connected endpoint per peer) with a safe posting
//! API. This is the daemon's only unsafe code: the verbs calls promise
//! nothing about the memory they name, so every registration here owns
//! its region, and every posted write holds the regions it reads until
//! its completion was polled (or the link is gone, and with it the queue
//! pair that could touch them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_shm::Region;
use ferry_verbs::ibv::{IbvDomain, IbvEndpoint, IbvMr, IbvPending, IbvProvider};
use ferry_verbs::soft::{SoftDomain, SoftEndpoint, SoftMr, SoftPending, SoftProvider};
use ferry_verbs::{
    access, Completion, CompletionQueue, Domain, Endpoint, EndpointConfig, EndpointInfo,
    MemoryRegion, PendingEndpoint, Provider, SendOp, SendWr,
};

/// Completion queue depth.
const CQ_DEPTH: u32 = 8192;

enum Dom {
    Soft(SoftDomain),
    Ibv(IbvDomain),
}

enum Cq {
    Soft(Arc<ferry_verbs::soft::SoftCq>),
    Ibv(Arc<ferry_verbs::ibv::IbvCq>),
}

impl Cq {
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        match self {
            Cq::Soft(c) => c.poll(out, max),
            Cq::Ibv(c) => c.poll(out, max),
        }
    }

    fn fd(&self) -> i32 {
        match self {
            Cq::Soft(c) => c.fd(),
            Cq::Ibv(c) => c.fd(),
        }
    }

    fn unpolled(&self) {
        match self {
            Cq::Soft(c) => c.unpolled(),
            Cq::Ibv(c) => c.unpolled(),
        }
    }
}

/// An opened fabric device with one send and one receive completion
/// queue for all links.
pub struct Fabric {
    dom: Dom,
    send_cq: Cq,
    recv_cq: Cq,
    /// "soft" or "ibv DEVICE".
    pub name: String,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Fabric {
    /// Opens `choice`; the soft backend's endpoints listen on `soft_bind`.
    pub fn open(
        choice: &ferry_verbs::select::Choice,
        soft_bind: std::net::IpAddr,
    ) -> Result<Fabric, String> {
        match choice {
            ferry_verbs::select::Choice::Soft => {
                let dom = SoftProvider { bind: soft_bind }
                    .open("soft0")
                    .map_err(err)?;
                let send_cq = dom.create_cq(CQ_DEPTH).map_err(err)?;
                let recv_cq = dom.create_cq(CQ_DEPTH).map_err(err)?;
                Ok(Fabric {
                    dom: Dom::Soft(dom),
                    send_cq: Cq::Soft(send_cq),
                    recv_cq: Cq::Soft(recv_cq),
                    name: "soft".into(),
                })
            }
            ferry_verbs::select::Choice::Ibv { device } => {
                let dom = IbvProvider.open(device).map_err(err)?;
                let send_cq = dom.create_cq(CQ_DEPTH).map_err(err)?;
                let recv_cq = dom.create_cq(CQ_DEPTH).map_err(err)?;
                Ok(Fabric {
                    dom: Dom::Ibv(dom),
                    send_cq: Cq::Ibv(send_cq),
                    recv_cq: Cq::Ibv(recv_cq),
                    name: format!("ibv {device}"),
                })
            }
        }
    }

    /// Registers all of `region` for local use and for remote writes
    /// (landing areas) or local reads only (pools read by outgoing writes).
    pub fn register(&self, region: Arc<Region>, remote_write: bool) -> Result<Registered, String> {
        let acc = if remote_write {
            access::LOCAL_WRITE | access::REMOTE_WRITE
        } else {
            access::LOCAL_WRITE
        };
        let (ptr, len) = (region.as_ptr(), region.len());
        let mr = match &self.dom {
            // SAFETY: `region` is a live mapping of `len` bytes; the
            // registration keeps an `Arc` of it, so the memory stays
            // mapped until the registration is dropped.
            Dom::Soft(d) => Mr::Soft(unsafe { d.register(ptr, len, acc) }.map_err(err)?),
            // SAFETY: as above.
            Dom::Ibv(d) => Mr::Ibv(unsafe { d.register(ptr, len, acc) }.map_err(err)?),
        };
        Ok(Registered { mr, region })
    }

    /// A new endpoint, to be connected with the peer's info.
    pub fn endpoint(&self) -> Result<PendingLink, String> {
        let cfg = EndpointConfig::default();
        Ok(PendingLink(
            match (&self.dom, &self.send_cq, &self.recv_cq) {
                (Dom::Soft(d), Cq::Soft(s), Cq::Soft(r)) => {
                    Pending::Soft(d.endpoint(&cfg, s, r).map_err(err)?)
                }
                (Dom::Ibv(d), Cq::Ibv(s), Cq::Ibv(r)) => {
                    Pending::Ibv(d.endpoint(&cfg, s, r).map_err(err)?)
                }
                _ => unreachable!("the queues belong to the domain"),
            },
        ))
    }

    /// Polls up to `max` send (`send`) or receive completions into `out`.
    pub fn poll(&self, send: bool, out: &mut Vec<Completion>, max: usize) -> usize {
        if send {
            self.send_cq.poll(out, max)
        } else {
            self.recv_cq.poll(out, max)
        }
    }

    /// Readable when receive completions may be there (for epoll).
    pub fn recv_fd(&self) -> i32 {
        self.recv_cq.fd()
    }

    /// The loop goes to sleep in epoll: the backend's own threads make
    /// progress until it polls again.
    pub fn unpolled(&self) {
        self.send_cq.unpolled();
        self.recv_cq.unpolled();
    }

    /// Readable when send completions may be there.
    pub fn send_fd(&self) -> i32 {
        self.send_cq.fd()
    }
}

enum Mr {
    Soft(SoftMr),
    Ibv(IbvMr),
}

/// A region registered with the fabric; it owns the region.
pub struct Registered {
    // Dropped first: the registration, then the memory.
    mr: Mr,
    region: Arc<Region>,
}

impl Registered {
    fn mr(&self) -> &dyn MemoryRegion {
        match &self.mr {
            Mr::Soft(m) => m,
            Mr::Ibv(m) => m,
        }
    }

    /// The address peers write to (with `rkey`).
    pub fn addr(&self) -> u64 {
        self.mr().addr()
    }

    pub fn rkey(&self) -> u32 {
        self.mr().rkey()
    }

    pub fn len(&self) -> u64 {
        self.region.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }
}

enum Pending {
    Soft(SoftPending),
    Ibv(IbvPending),
}

/// An endpoint not yet connected.
pub struct PendingLink(Pending);

impl PendingLink {
    pub fn info(&self) -> EndpointInfo {
        match &self.0 {
            Pending::Soft(p) => p.info(),
            Pending::Ibv(p) => p.info(),
        }
    }

    /// Connects to the peer (blocks until it answers or the endpoint's
    /// timeout passes: call it off the loop). The link's work-request ids
    /// carry `tag` in their top 16 bits (see [`tag_of`]).
    /// `stats` counts what the link does (shared with the links made
    /// before and after it to the same peer).
    pub fn connect(
        self,
        remote: &EndpointInfo,
        tag: u16,
        stats: Arc<LinkStats>,
    ) -> Result<Link, String> {
        let ep = match self.0 {
            Pending::Soft(p) => Ep::Soft(p.connect(remote).map_err(err)?),
            Pending::Ibv(p) => Ep::Ibv(p.connect(remote).map_err(err)?),
        };
        Ok(Link {
            ep,
            holds: Mutex::new(HashMap::new()),
            tag: (tag as u64) << 48,
            next: std::sync::atomic::AtomicU64::new(1),
            stats,
        })
    }
}

enum Ep {
    Soft(SoftEndpoint),
    Ibv(IbvEndpoint),
}

/// One write of a batch or a header.
pub struct Write<'a> {
    /// Its completion reports this id; the regions of every write posted
    /// with the same id are held until that completion.
    pub wr_id: u64,
    pub src: &'a Arc<Registered>,
    pub src_offset: u64,
    pub len: u32,
    pub remote_addr: u64,
    pub rkey: u32,
    pub imm: Option<u32>,
    /// Whether it reports a completion (the last write of a group must).
    pub signaled: bool,
    /// Time it (a signaled write) from post to completion, for
    /// `ferry_fabric_write_latency_seconds`.
    pub timed: bool,
}

/// What the links to one peer did, for `/metrics`: written by the loop,
/// read by a scrape's snapshot (relaxed atomics, one add per operation).
#[derive(Debug, Default)]
pub struct LinkStats {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub receives: AtomicU64,
    pub errors: AtomicU64,
    /// Times a consumer on the peer ran out of landing credit while a
    /// batch waited for it here.
    pub credit_stalls: AtomicU64,
    /// Post to completion of timed writes (the sampled batches).
    pub write_latency: crate::metrics::AtomicHist,
}

impl LinkStats {
    pub fn add(n: &AtomicU64, v: u64) {
        n.fetch_add(v, Ordering::Relaxed);
    }

    pub fn get(n: &AtomicU64) -> u64 {
        n.load(Ordering::Relaxed)
    }
}

/// What the writes of one work-request id hold, and when a timed one was
/// posted (0: untimed).
type Held = (Vec<Arc<Registered>>, u32);

/// A connected endpoint to one peer.
pub struct Link {
    // Dropped first: the endpoint (queue pair), then what its writes held.
    ep: Ep,
    /// Registrations read by writes in flight, by work-request id, and
    /// when a timed one was posted ([`crate::metrics::now_us`]; 0: untimed).
    holds: Mutex<HashMap<u64, Held>>,
    tag: u64,
    next: std::sync::atomic::AtomicU64,
    pub stats: Arc<LinkStats>,
}

/// The tag of the link a work-request id belongs to.
pub fn tag_of(wr_id: u64) -> u16 {
    (wr_id >> 48) as u16
}

impl Link {
    /// A work-request id of this link, not used before.
    pub fn next_wr_id(&self) -> u64 {
        self.tag | (self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & ((1 << 48) - 1))
    }

    /// Posts `w`; an out-of-range source is refused here, a bad remote
    /// address by the peer (a `RemoteAccess` completion).
    pub fn write(&self, w: &Write<'_>) -> Result<(), String> {
        let end = w.src_offset.checked_add(w.len as u64);
        if end.is_none_or(|e| e > w.src.len()) {
            return Err(format!(
                "a write of {} bytes at {} of a {}-byte region",
                w.len,
                w.src_offset,
                w.src.len()
            ));
        }
        let sge = [w.src.mr().sge(w.src_offset as usize, w.len)];
        let sges: &[ferry_verbs::Sge] = if w.len == 0 { &[] } else { &sge };
        let wr = SendWr {
            wr_id: w.wr_id,
            op: SendOp::Write {
                remote_addr: w.remote_addr,
                rkey: w.rkey,
                imm: w.imm,
            },
            sges,
            signaled: w.signaled,
        };
        {
            let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            let held = holds.entry(w.wr_id).or_default();
            held.0.push(w.src.clone());
            if w.timed && w.signaled {
                held.1 = crate::metrics::now_us();
            }
        }
        // SAFETY: the sge lies inside `w.src` (checked above), whose
        // region stays mapped while `holds` keeps it: until `completed`
        // for this id (after its completion was polled) or until the link
        // (and its queue pair) is dropped. Pool slots are only read.
        let posted = match &self.ep {
            Ep::Soft(e) => unsafe { e.post_send(&wr) },
            Ep::Ibv(e) => unsafe { e.post_send(&wr) },
        };
        match &posted {
            Ok(()) => {
                LinkStats::add(&self.stats.writes, 1);
                LinkStats::add(&self.stats.write_bytes, w.len as u64);
            }
            Err(_) => LinkStats::add(&self.stats.errors, 1),
        }
        posted.map_err(err)
    }

    /// Posts a receive without buffer, which a peer's write with
    /// immediate consumes.
    pub fn recv(&self, wr_id: u64) -> Result<(), String> {
        // SAFETY: no memory is named.
        let posted = match &self.ep {
            Ep::Soft(e) => unsafe { e.post_recv(wr_id, &[]) },
            Ep::Ibv(e) => unsafe { e.post_recv(wr_id, &[]) },
        };
        posted.map_err(err)
    }

    /// The completion of `wr_id` was polled: what its writes read may go.
    /// Returns when it was posted, if it was timed.
    pub fn completed(&self, wr_id: u64) -> Option<u32> {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&wr_id)
            .map(|(_, t)| t)
            .filter(|&t| t != 0)
    }

    /// Writes in flight.
    pub fn in_flight(&self) -> usize {
        self.holds.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
