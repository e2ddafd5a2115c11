//! Membership in etcd (`[cluster] membership = "etcd"`): this daemon
//! registers itself under a lease at `<prefix>/members/<node>` (its
//! control address, fabric and GPUs), with the streams it homes at
//! `<prefix>/streams/<name>`, keeps the lease alive, and watches the
//! members: the loop hears who joined and who left as [`MemberEvent`]s and
//! connects to peers as they appear. A lease that expires (its daemon died)
//! removes that daemon as a failure does.
//!
//! What the `etcd-client` crate leaves to us, done here: every request has
//! a deadline (a stopped etcd must not hang us); the keep-alive goes at a
//! third of the TTL with jitter; a broken keep-alive or watch stream starts
//! a new session (reconnect, keep the lease if it still lives, else
//! register anew, then a full read of the members, whose difference from
//! what the loop knows is applied, then a new watch from that revision);
//! while etcd is unreachable the current view is kept, the loss is logged
//! and reported once, and retries back off with jitter.
//!
//! It runs on a thread and runtime of its own; the loop never waits for it.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::{timeout, Instant};

use crate::inbox;

/// What a daemon registers about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub node: String,
    /// Its control plane's address:port, which peers dial.
    pub addr: String,
    /// "soft" or "ibv DEVICE".
    pub fabric: String,
    pub gpus: u32,
    pub version: String,
}

/// A stream as registered by its home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRecord {
    pub home: String,
    pub partitions: u32,
    pub slot_size: u64,
    pub slot_count: u32,
    /// As `StreamSpec::describe` says it.
    pub spec: String,
}

/// What membership tells the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// Every other member etcd lists, read whole (at the start of each
    /// session with etcd): members the loop knows and this lacks left.
    View(Vec<MemberRecord>),
    Joined(MemberRecord),
    Left {
        node: String,
        why: String,
    },
    /// etcd answers again (`up`), or stopped answering (why).
    Etcd {
        up: bool,
        why: String,
    },
}

#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ttl: Duration,
    pub me: MemberRecord,
}

enum Cmd {
    /// The streams this daemon homes now: name -> record.
    Streams(BTreeMap<String, StreamRecord>),
    /// Leave: revoke the lease (the others see this daemon go at once).
    Stop,
}

/// The loop's handle on membership.
pub struct Membership {
    tx: UnboundedSender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Membership {
    pub fn start(settings: EtcdSettings, inbox: inbox::Sender) -> std::io::Result<Membership> {
        let (tx, rx) = unbounded_channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("ferryd-etcd".into())
            .spawn(move || rt.block_on(run(settings, rx, inbox)))?;
        Ok(Membership {
            tx,
            thread: Some(thread),
        })
    }

    /// Registers these streams (and no others) as homed here.
    pub fn set_streams(&self, streams: BTreeMap<String, StreamRecord>) {
        let _ = self.tx.send(Cmd::Streams(streams));
    }

    /// Leaves the cluster (revokes the lease; at most a few seconds).
    pub fn stop(&mut self) {
        let _ = self.tx.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tell(inbox: &inbox::Sender, e: MemberEvent) {
    inbox.send(inbox::Message::Members(e));
}

/// `d` give or take a tenth, so that daemons started together do not
/// renew (or retry) in step.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = getrandom::fill(&mut b).map_or(0.5, |_| u16::from_le_bytes(b) as f64 / 65535.0);
    d.mul_f64(0.9 + 0.2 * r)
}

/// How a session with etcd ended.
enum Ended {
    Stop,
    Lost(String),
}

async fn run(s: EtcdSettings, mut rx: UnboundedReceiver<Cmd>, inbox: inbox::Sender) {
    let mut st = State {
        lease: None,
        streams: BTreeMap::new(),
        registered: BTreeMap::new(),
        up: false,
        last_error: None,
    };
    let mut backoff = Duration::from_millis(100);
    let most = (s.ttl / 3).clamp(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let started = Instant::now();
        match session(&s, &mut st, &mut rx, &inbox).await {
            Ended::Stop => return,
            Ended::Lost(why) => {
                let why = concise(&why);
                if st.up {
                    st.up = false;
                    tracing::warn!(
                        "etcd: {why}; keeping the current peers, serving on, retrying (every {} ms at most)",
                        most.as_millis()
                    );
                } else if st.last_error.is_none() {
                    tracing::warn!(
                        endpoints = %s.endpoints.join(","),
                        "etcd not reached yet: {why}; serving local work, retrying (every {} ms at most)",
                        most.as_millis()
                    );
                } else {
                    crate::limited!(DEBUG, "etcd: {why}");
                }
                if st.last_error.as_deref() != Some(why.as_str()) {
                    st.last_error = Some(why.clone());
                    tell(&inbox, MemberEvent::Etcd { up: false, why });
                }
            }
        }
        if started.elapsed() > s.ttl {
            backoff = Duration::from_millis(100); // it worked for a while
        }
        // Wait, but still hear the loop.
        let until = Instant::now() + jitter(backoff);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Streams(m)) => st.streams = m,
                    Some(Cmd::Stop) | None => return,
                },
            }
        }
        backoff = (backoff * 2).min(most);
    }
}

/// What outlives a session.
struct State {
    /// The lease, while it may still live.
    lease: Option<i64>,
    /// The streams to register, and what is registered now.
    streams: BTreeMap<String, StreamRecord>,
    registered: BTreeMap<String, StreamRecord>,
    /// Whether the loop was last told that etcd answers.
    up: bool,
    /// What it was last told went wrong (None once etcd answers).
    last_error: Option<String>,
}

/// An etcd client error for people: the gRPC status's message when there
/// is one (not the whole status with its empty details and metadata).
fn concise(e: &str) -> String {
    let Some(at) = e.find("message: \"") else {
        return e.to_string();
    };
    let what = e[..at].split(':').next().unwrap_or("").trim();
    let rest = &e[at + "message: \"".len()..];
    let msg = rest.split("\", details").next().unwrap_or(rest);
    let msg = msg.strip_suffix('"').unwrap_or(msg);
    if what.is_empty() {
        msg.to_string()
    } else {
        format!("{what}: {msg}")
    }
}

/// Runs `f` with the request deadline; an error or a missed deadline is
/// the reason the session ends.
async fn within<T, E: std::fmt::Display>(
    what: &str,
    d: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match timeout(d, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {} ms", d.as_millis())),
    }
}

fn member_key(s: &EtcdSettings, node: &str) -> String {
    format!("{}/members/{node}", s.prefix)
}

fn stream_key(s: &EtcdSettings, name: &str) -> String {
    format!("{}/streams/{name}", s.prefix)
}

/// Brings the stream keys in line with `st.streams` (under the lease).
async fn sync_streams(
    c: &mut Client,
    s: &EtcdSettings,
    st: &mut State,
    lease: i64,
    op: Duration,
    all: bool,
) -> Result<(), String> {
    let want = st.streams.clone();
    for (name, rec) in &want {
        if all || st.registered.get(name) != Some(rec) {
            let v = serde_json::to_string(rec).map_err(|e| e.to_string())?;
            within(
                "registering a stream",
                op,
                c.put(
                    stream_key(s, name),
                    v,
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await?;
        }
    }
    for name in st.registered.keys() {
        if !want.contains_key(name) {
            within("removing a stream", op, c.delete(stream_key(s, name), None)).await?;
        }
    }
    st.registered = want;
    Ok(())
}

async fn session(
    s: &EtcdSettings,
    st: &mut State,
    rx: &mut UnboundedReceiver<Cmd>,
    inbox: &inbox::Sender,
) -> Ended {
    match session_inner(s, st, rx, inbox).await {
        Ok(e) => e,
        Err(why) => Ended::Lost(why),
    }
}

async fn session_inner(
    s: &EtcdSettings,
    st: &mut State,
    rx: &mut UnboundedReceiver<Cmd>,
    inbox: &inbox::Sender,
) -> Result<Ended, String> {
    // Every request's deadline: well inside the TTL.
    let op = (s.ttl / 3).min(Duration::from_secs(2));
    let opts = ConnectOptions::new()
        .with_connect_timeout(op)
        .with_timeout(op)
        .with_keep_alive(op, op);
    let mut c = within(
        &format!("connecting to {}", s.endpoints.join(",")),
        op,
        Client::connect(&s.endpoints, Some(opts)),
    )
    .await?;
    let ttl_s = s.ttl.as_secs().max(1) as i64;
    // The lease of the last session if it still lives (a short outage:
    // nobody saw this daemon go), else a new one.
    let mut lease = None;
    if let Some(id) = st.lease {
        let left = within("reading the lease", op, c.lease_time_to_live(id, None)).await?;
        if left.ttl() > 0 {
            lease = Some(id);
        }
    }
    let fresh = lease.is_none();
    let lease = match lease {
        Some(id) => id,
        None => within("granting a lease", op, c.lease_grant(ttl_s, None))
            .await?
            .id(),
    };
    st.lease = Some(lease);
    let me = serde_json::to_string(&s.me).map_err(|e| e.to_string())?;
    within(
        "registering this daemon",
        op,
        c.put(
            member_key(s, &s.me.node),
            me,
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await?;
    sync_streams(&mut c, s, st, lease, op, fresh).await?;
    let prefix = format!("{}/members/", s.prefix);
    let got = within(
        "reading the members",
        op,
        c.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let rev = got.header().map_or(0, |h| h.revision());
    let others: Vec<MemberRecord> = got
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<MemberRecord>(kv.value()).ok())
        .filter(|m| m.node != s.me.node)
        .collect();
    let (_watcher, mut watch) = within(
        "watching the members",
        op,
        c.watch(
            prefix.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        ),
    )
    .await?;
    let (mut keeper, mut alive) =
        within("keeping the lease alive", op, c.lease_keep_alive(lease)).await?;
    tracing::info!(
        members = others.len() + 1,
        lease = format!("{lease:x}"),
        renewed = !fresh,
        "etcd: registered at {}",
        member_key(s, &s.me.node)
    );
    tell(inbox, MemberEvent::View(others));
    st.last_error = None;
    if !st.up {
        st.up = true;
        tell(
            inbox,
            MemberEvent::Etcd {
                up: true,
                why: String::new(),
            },
        );
    }
    let period = s.ttl / 3;
    let mut next = Instant::now() + jitter(period);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                within("renewing the lease", op, keeper.keep_alive()).await?;
                match within("renewing the lease", op, alive.message()).await? {
                    Some(r) if r.ttl() > 0 => {}
                    Some(_) => {
                        // Expired (etcd was away longer than the TTL): the
                        // others dropped this daemon; register anew.
                        st.lease = None;
                        return Ok(Ended::Lost("this daemon's lease expired; registering again".into()));
                    }
                    None => return Err("the lease keep-alive stream closed".into()),
                }
                next = Instant::now() + jitter(period);
            }
            m = watch.message() => {
                let Some(resp) = m.map_err(|e| format!("watching the members: {e}"))? else {
                    return Err("the watch of the members closed".into());
                };
                if resp.canceled() {
                    return Err(format!("the watch of the members was canceled: {}", resp.cancel_reason()));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    let Some(node) = key.strip_prefix(prefix.as_str()) else { continue };
                    match ev.event_type() {
                        EventType::Put => match serde_json::from_slice::<MemberRecord>(kv.value()) {
                            Ok(m) if m.node == s.me.node => {}
                            Ok(m) if m.node == node => tell(inbox, MemberEvent::Joined(m)),
                            Ok(m) => crate::limited!(WARN, key = %key, "etcd: a member record naming {:?} under another key: ignored", m.node),
                            Err(e) => crate::limited!(WARN, key = %key, "etcd: not a member record ({e}): ignored"),
                        },
                        EventType::Delete if node == s.me.node => {
                            // Our own key went (the lease expired while we
                            // could not renew it, or someone deleted it).
                            st.lease = None;
                            return Ok(Ended::Lost("this daemon's registration was deleted; registering again".into()));
                        }
                        EventType::Delete => tell(inbox, MemberEvent::Left {
                            node: node.to_string(),
                            why: "its etcd lease expired or it left".into(),
                        }),
                    }
                }
            }
            cmd = rx.recv() => match cmd {
                Some(Cmd::Streams(m)) => {
                    st.streams = m;
                    sync_streams(&mut c, s, st, lease, op, false).await?;
                }
                Some(Cmd::Stop) | None => {
                    // Leaving: the others see the keys go now, not after the TTL.
                    let _ = timeout(op, c.lease_revoke(lease)).await;
                    return Ok(Ended::Stop);
                }
            },
        }
    }
}

/// The loop's view, for a `View`: which known members are gone.
pub fn gone<'a>(known: impl Iterator<Item = &'a str>, view: &[MemberRecord]) -> Vec<String> {
    known
        .filter(|k| !view.iter().any(|m| m.node == *k))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_errors_read_short() {
        let raw = r#"reading the lease: grpc request error: status: Unknown, message: "h2 protocol error: error reading a body from connection", details: [], metadata: MetadataMap { headers: {} }"#;
        assert_eq!(
            concise(raw),
            "reading the lease: h2 protocol error: error reading a body from connection"
        );
        assert_eq!(
            concise("connecting to x: no answer within 2000 ms"),
            "connecting to x: no answer within 2000 ms"
        );
    }

    #[test]
    fn jitter_stays_within_a_tenth() {
        for _ in 0..200 {
            let j = jitter(Duration::from_millis(1000));
            assert!(
                j >= Duration::from_millis(899) && j <= Duration::from_millis(1101),
                "{j:?}"
            );
        }
    }

    #[test]
    fn a_view_says_which_known_members_are_gone() {
        let m = |n: &str| MemberRecord {
            node: n.into(),
            addr: "a:1".into(),
            fabric: "soft".into(),
            gpus: 0,
            version: "v".into(),
        };
        let view = [m("a"), m("c")];
        assert_eq!(gone(["a", "b", "c", "d"].into_iter(), &view), ["b", "d"]);
        assert!(gone(std::iter::empty(), &view).is_empty());
    }
}
