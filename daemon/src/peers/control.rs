//! The control plane's tasks: a hub that owns the table of live
//! connections and talks to the loop, an accept loop, one dialer per peer
//! this daemon dials, and one task per connection (handshake, then
//! reading, with a writer task beside it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::timeout;

use super::auth::{self, Role};
use super::wire::{self, Frame, PeerMsg, ReadError};
use super::{Event, Settings};
use crate::inbox::{self, Message};
use crate::limited;

/// From the loop.
pub(super) enum Command {
    Send { node: String, msg: PeerMsg },
    AddPeer { node: String, addr: String },
    RemovePeer { node: String, why: String },
    Stop,
}

/// From connection tasks to the hub.
enum HubEvent {
    Connected {
        node: String,
        conn: u64,
        addr: String,
        fabric: String,
        tx: UnboundedSender<PeerMsg>,
        /// Dropped to end the connection (when a newer one replaces it).
        close: tokio::sync::oneshot::Sender<()>,
    },
    Received {
        node: String,
        conn: u64,
        msg: PeerMsg,
    },
    Closed {
        node: String,
        conn: u64,
        why: String,
    },
    /// Passed on to the loop as it is.
    Other(Event),
}

/// Most handshakes in progress at once; more connections are closed at
/// once (so that a flood of idle connections cannot hold memory).
const MAX_HANDSHAKES: usize = 64;

/// Shortest wait before redialing.
const BACKOFF_MIN: Duration = Duration::from_millis(100);

pub(super) fn run(
    settings: Settings,
    listener: std::net::TcpListener,
    rx: UnboundedReceiver<Command>,
    inbox: inbox::Sender,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            limited!(ERROR, "the peer control plane cannot start: {e}");
            return;
        }
    };
    rt.block_on(hub(Arc::new(settings), listener, rx, inbox));
}

fn tell(inbox: &inbox::Sender, e: Event) {
    inbox.send(Message::Peer(e));
}

async fn hub(
    settings: Arc<Settings>,
    listener: std::net::TcpListener,
    mut rx: UnboundedReceiver<Command>,
    inbox: inbox::Sender,
) {
    let (ev_tx, mut ev_rx) = unbounded_channel::<HubEvent>();
    let conns = Arc::new(AtomicU64::new(1));
    match TcpListener::from_std(listener) {
        Ok(l) => {
            tokio::spawn(accept_loop(
                l,
                settings.clone(),
                ev_tx.clone(),
                conns.clone(),
            ));
        }
        Err(e) => limited!(ERROR, "the peer listener: {e}"),
    }
    // The dialers of the peers this daemon dials, by node.
    let mut dialers: HashMap<String, (String, tokio::task::JoinHandle<()>)> = HashMap::new();
    let spawn_dialer = |node: &str, addr: &str| {
        tokio::spawn(dial(
            node.to_string(),
            addr.to_string(),
            settings.clone(),
            ev_tx.clone(),
            conns.clone(),
        ))
    };
    for (node, addr) in &settings.peers {
        if settings.node < *node {
            dialers.insert(node.clone(), (addr.clone(), spawn_dialer(node, addr)));
        }
    }
    type Conn = (
        u64,
        UnboundedSender<PeerMsg>,
        tokio::sync::oneshot::Sender<()>,
    );
    let mut links: HashMap<String, Conn> = HashMap::new();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Command::Send { node, msg }) => {
                    if let Some((_, tx, _)) = links.get(&node) {
                        let _ = tx.send(msg);
                    }
                }
                Some(Command::AddPeer { node, addr }) => {
                    // Known at this address: its dialer (and the connection
                    // it serves) stays. At a new one: dialed there.
                    let known = dialers.get(&node).is_some_and(|(a, d)| *a == addr && !d.is_finished());
                    if node != settings.node && settings.node < node && !known {
                        if let Some((_, old)) = dialers.remove(&node) {
                            old.abort();
                        }
                        dialers.insert(node.clone(), (addr.clone(), spawn_dialer(&node, &addr)));
                    }
                }
                Some(Command::RemovePeer { node, why }) => {
                    if let Some((_, d)) = dialers.remove(&node) {
                        d.abort();
                    }
                    if let Some((_, tx, _)) = links.remove(&node) {
                        let _ = tx.send(PeerMsg::Bye { reason: why.clone() });
                        tell(&inbox, Event::Down { node, why });
                    }
                }
                Some(Command::Stop) | None => break,
            },
            Some(ev) = ev_rx.recv() => match ev {
                HubEvent::Connected { node, conn, addr, fabric, tx, close } => {
                    // A newer connection (the peer came back before the
                    // old one timed out) replaces the old, which ends.
                    if let Some(old) = links.insert(node.clone(), (conn, tx, close)) {
                        drop(old);
                        tell(&inbox, Event::Down {
                            node: node.clone(),
                            why: "it connected again (the old connection is closed)".into(),
                        });
                    }
                    tell(&inbox, Event::Up { node, addr, fabric });
                }
                HubEvent::Received { node, conn, msg } => {
                    if links.get(&node).is_some_and(|(c, _, _)| *c == conn) {
                        tell(&inbox, Event::Msg { node, msg });
                    }
                }
                HubEvent::Closed { node, conn, why } => {
                    if links.get(&node).is_some_and(|(c, _, _)| *c == conn) {
                        links.remove(&node);
                        tell(&inbox, Event::Down { node, why });
                    }
                }
                HubEvent::Other(e) => tell(&inbox, e),
            },
        }
    }
    // Goodbyes, given a moment to leave.
    for (_, tx, _) in links.values() {
        let _ = tx.send(PeerMsg::Bye {
            reason: "ferryd is stopping".into(),
        });
    }
    drop(links);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn accept_loop(
    listener: TcpListener,
    settings: Arc<Settings>,
    ev_tx: UnboundedSender<HubEvent>,
    conns: Arc<AtomicU64>,
) {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                limited!(WARN, "peer accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if busy.load(Ordering::Relaxed) >= MAX_HANDSHAKES {
            let _ = ev_tx.send(HubEvent::Other(Event::Refused {
                addr: addr.to_string(),
                why: format!("{MAX_HANDSHAKES} handshakes already in progress"),
            }));
            continue;
        }
        busy.fetch_add(1, Ordering::Relaxed);
        let (settings, ev_tx, busy) = (settings.clone(), ev_tx.clone(), busy.clone());
        let conn = conns.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            serve(
                stream,
                Role::Acceptor,
                None,
                &settings,
                &ev_tx,
                conn,
                || {
                    busy.fetch_sub(1, Ordering::Relaxed);
                },
            )
            .await;
        });
    }
}

async fn dial(
    node: String,
    addr: String,
    settings: Arc<Settings>,
    ev_tx: UnboundedSender<HubEvent>,
    conns: Arc<AtomicU64>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match timeout(settings.handshake_timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(stream)) => {
                let started = Instant::now();
                let conn = conns.fetch_add(1, Ordering::Relaxed);
                serve(
                    stream,
                    Role::Dialer,
                    Some(&node),
                    &settings,
                    &ev_tx,
                    conn,
                    || {},
                )
                .await;
                if started.elapsed() > settings.timeout {
                    backoff = BACKOFF_MIN; // it worked for a while: retry soon
                }
            }
            Ok(Err(e)) => {
                let _ = ev_tx.send(HubEvent::Other(Event::Error {
                    node: node.clone(),
                    why: format!("connecting to {addr}: {e}"),
                }));
            }
            Err(_) => {
                let _ = ev_tx.send(HubEvent::Other(Event::Error {
                    node: node.clone(),
                    why: format!(
                        "connecting to {addr}: no answer within {} ms",
                        settings.handshake_timeout.as_millis()
                    ),
                }));
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(settings.reconnect_max);
    }
}

/// Microseconds on this process's monotonic clock.
fn now_us() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// One connection: the handshake, the fabric offers, then messages until
/// it ends. `handshaken` runs once the handshake is over, either way.
async fn serve(
    stream: TcpStream,
    role: Role,
    expected: Option<&str>,
    settings: &Settings,
    ev_tx: &UnboundedSender<HubEvent>,
    conn: u64,
    handshaken: impl FnOnce(),
) {
    let addr = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    let shaken = timeout(settings.handshake_timeout, async {
        let node = match role {
            Role::Dialer => {
                let expected = expected.unwrap_or_default();
                dialer_handshake(
                    &mut r,
                    &mut w,
                    settings,
                    expected,
                    &mut bytes_in,
                    &mut bytes_out,
                )
                .await?
            }
            Role::Acceptor => {
                acceptor_handshake(&mut r, &mut w, settings, &mut bytes_in, &mut bytes_out).await?
            }
        };
        // Fabric offers, both ways, before anything else.
        let offer = Frame::Msg(PeerMsg::Fabric(settings.fabric.clone()));
        bytes_out += wire::write(&mut w, &offer)
            .await
            .map_err(|e| e.to_string())?;
        match wire::read(&mut r, &mut bytes_in)
            .await
            .map_err(|e| e.to_string())?
        {
            Frame::Msg(PeerMsg::Fabric(theirs)) => Ok((node, settings.fabric.agree(&theirs))),
            other => Err(format!(
                "expected its fabric offer, got {}",
                frame_name(&other)
            )),
        }
    })
    .await;
    handshaken();
    let (node, fabric) = match shaken {
        Ok(Ok(v)) => v,
        Ok(Err(why)) => return fail(role, expected, &addr, why, ev_tx),
        Err(_) => {
            let why = format!(
                "handshake not done within {} ms",
                settings.handshake_timeout.as_millis()
            );
            return fail(role, expected, &addr, why, ev_tx);
        }
    };
    let (tx, mut rx) = unbounded_channel::<PeerMsg>();
    let (close, mut closed) = tokio::sync::oneshot::channel::<()>();
    let out = Arc::new(AtomicU64::new(bytes_out));
    let _ = ev_tx.send(HubEvent::Connected {
        node: node.clone(),
        conn,
        addr: addr.clone(),
        fabric,
        tx: tx.clone(),
        close,
    });
    // The writer: messages from the hub and this reader, and heartbeats.
    let heartbeat = settings.heartbeat;
    let written = out.clone();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(heartbeat);
        let mut seq = 0u64;
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = tick.tick() => {
                    seq += 1;
                    PeerMsg::Ping { seq, t_us: now_us() }
                }
            };
            let bye = matches!(msg, PeerMsg::Bye { .. });
            match wire::write(&mut w, &Frame::Msg(msg)).await {
                Ok(n) => {
                    written.fetch_add(n, Ordering::Relaxed);
                }
                Err(_) => break,
            }
            if bye {
                break;
            }
        }
    });
    let why = loop {
        let read = tokio::select! {
            r = timeout(settings.timeout, wire::read(&mut r, &mut bytes_in)) => r,
            _ = &mut closed => break "replaced by a newer connection".to_string(),
        };
        let frame = match read {
            Err(_) => {
                break format!(
                    "nothing heard for peer_timeout_ms = {}",
                    settings.timeout.as_millis()
                )
            }
            Ok(Err(ReadError::Closed)) => break "the connection was closed".to_string(),
            Ok(Err(e)) => break e.to_string(),
            Ok(Ok(f)) => f,
        };
        let msg = match frame {
            Frame::Msg(m) => m,
            other => break format!("{} after the handshake", frame_name(&other)),
        };
        match msg {
            PeerMsg::Ping { seq, t_us } => {
                let _ = tx.send(PeerMsg::Pong { seq, t_us });
            }
            PeerMsg::Pong { t_us, .. } => {
                let _ = ev_tx.send(HubEvent::Other(Event::Stats {
                    node: node.clone(),
                    rtt_us: now_us().saturating_sub(t_us),
                    bytes_in,
                    bytes_out: out.load(Ordering::Relaxed),
                }));
            }
            PeerMsg::Bye { reason } => break format!("it said goodbye: {reason}"),
            PeerMsg::Fabric(_) => break "a second fabric offer".to_string(),
            msg => {
                let _ = ev_tx.send(HubEvent::Received {
                    node: node.clone(),
                    conn,
                    msg,
                });
            }
        }
    };
    drop(tx);
    // Let a goodbye or an answer in flight go out, then stop writing.
    let _ = timeout(Duration::from_millis(100), writer).await;
    let _ = ev_tx.send(HubEvent::Closed { node, conn, why });
}

/// A connection that failed before it was a peer's.
fn fail(
    role: Role,
    expected: Option<&str>,
    addr: &str,
    why: String,
    ev_tx: &UnboundedSender<HubEvent>,
) {
    let e = match role {
        Role::Dialer => Event::Error {
            node: expected.unwrap_or_default().to_string(),
            why: format!("{addr}: {why}"),
        },
        Role::Acceptor => Event::Refused {
            addr: addr.to_string(),
            why,
        },
    };
    let _ = ev_tx.send(HubEvent::Other(e));
}

fn frame_name(f: &Frame) -> String {
    match f {
        Frame::Hello { .. } => "a Hello".into(),
        Frame::Challenge { .. } => "a Challenge".into(),
        Frame::Proof { .. } => "a Proof".into(),
        Frame::Welcome => "a Welcome".into(),
        Frame::Refused { reason } => format!("a refusal ({reason})"),
        Frame::Msg(_) => "a message".into(),
    }
}

async fn dialer_handshake(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    s: &Settings,
    expected: &str,
    bytes_in: &mut u64,
    bytes_out: &mut u64,
) -> Result<String, String> {
    let nd = auth::nonce().map_err(|e| e.to_string())?;
    let hello = Frame::Hello {
        magic: wire::MAGIC,
        version: wire::VERSION,
        node: s.node.clone(),
        nonce: nd,
    };
    *bytes_out += wire::write(w, &hello).await.map_err(|e| e.to_string())?;
    let (node, na, proof) = match wire::read(r, bytes_in).await.map_err(|e| e.to_string())? {
        Frame::Challenge { node, nonce, proof } => (node, nonce, proof),
        Frame::Refused { reason } => return Err(format!("refused: {reason}")),
        other => return Err(format!("expected a Challenge, got {}", frame_name(&other))),
    };
    if node != expected {
        return Err(format!(
            "the daemon there is node {node:?}, not {expected:?} (check cluster.peers)"
        ));
    }
    if !auth::check(&s.secret, Role::Acceptor, &s.node, &node, &nd, &na, &proof) {
        return Err(
            "it could not prove that it holds the cluster secret (is its cluster.secret_file the same?); nothing more was said"
                .into(),
        );
    }
    let mine = auth::prove(&s.secret, Role::Dialer, &s.node, &node, &nd, &na);
    *bytes_out += wire::write(w, &Frame::Proof { proof: mine })
        .await
        .map_err(|e| e.to_string())?;
    match wire::read(r, bytes_in).await.map_err(|e| e.to_string())? {
        Frame::Welcome => Ok(node),
        Frame::Refused { reason } => Err(format!("refused: {reason}")),
        other => Err(format!("expected a Welcome, got {}", frame_name(&other))),
    }
}

async fn acceptor_handshake(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    s: &Settings,
    bytes_in: &mut u64,
    bytes_out: &mut u64,
) -> Result<String, String> {
    let hello = wire::read(r, bytes_in)
        .await
        .map_err(|e| format!("not a ferry peer: {e}"))?;
    let Frame::Hello {
        magic,
        version,
        node,
        nonce: nd,
    } = hello
    else {
        return Err(format!(
            "not a ferry peer: its first frame is {}",
            frame_name(&hello)
        ));
    };
    if magic != wire::MAGIC {
        return Err("not a ferry peer (wrong magic)".into());
    }
    if version != wire::VERSION {
        let why = format!(
            "it speaks peer protocol {version}, this ferryd speaks {}",
            wire::VERSION
        );
        refuse(w, bytes_out, &why).await;
        return Err(why);
    }
    if node > s.node {
        // Of two peers the one whose id sorts first dials.
        refuse(w, bytes_out, "this daemon dials you").await;
        return Err(format!(
            "node {node:?} dialed, but {:?} sorts first and dials it",
            s.node
        ));
    }
    if !s.dynamic && !s.peers.iter().any(|(p, _)| *p == node) {
        refuse(w, bytes_out, "not a peer of this daemon").await;
        return Err(format!(
            "it calls itself node {node:?}, which is not in cluster.peers"
        ));
    }
    let na = auth::nonce().map_err(|e| e.to_string())?;
    let proof = auth::prove(&s.secret, Role::Acceptor, &node, &s.node, &nd, &na);
    let challenge = Frame::Challenge {
        node: s.node.clone(),
        nonce: na,
        proof,
    };
    *bytes_out += wire::write(w, &challenge)
        .await
        .map_err(|e| e.to_string())?;
    let theirs = match wire::read(r, bytes_in).await.map_err(|e| {
        format!(
            "node {node:?} went after our challenge ({e}): a daemon with another cluster secret finds our proof wrong and leaves"
        )
    })? {
        Frame::Proof { proof } => proof,
        other => {
            return Err(format!(
                "node {node:?} sent {} instead of its proof",
                frame_name(&other)
            ))
        }
    };
    if !auth::check(&s.secret, Role::Dialer, &node, &s.node, &nd, &na, &theirs) {
        refuse(w, bytes_out, "authentication failed").await;
        return Err(format!(
            "it calls itself node {node:?} but does not hold the cluster secret"
        ));
    }
    *bytes_out += wire::write(w, &Frame::Welcome)
        .await
        .map_err(|e| e.to_string())?;
    Ok(node)
}

/// Tells a connection that is not going to be a peer's why, and nothing
/// more.
async fn refuse(w: &mut tokio::net::tcp::OwnedWriteHalf, bytes_out: &mut u64, reason: &str) {
    let f = Frame::Refused {
        reason: reason.into(),
    };
    if let Ok(n) = wire::write(w, &f).await {
        *bytes_out += n;
    }
}
