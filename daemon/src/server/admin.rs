//! The admin socket: a thread that accepts admin clients (each on a
//! thread of its own) and hands their requests to the loop.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_admin::{Request as AdminRequest, Response};
use ferry_shm::sys::{self, PeerCred};

use super::sessions::{Policy, ACCEPT_PAUSE};
use super::Server;
use crate::inbox;
use crate::limited;

/// Most admin connections served at once; more are answered "busy".
pub(super) const MAX_ADMIN_CLIENTS: usize = 16;

/// Most admin connections of one uid served at once, so that one user
/// cannot take them all.
pub(super) const MAX_ADMIN_CLIENTS_PER_UID: usize = 4;

/// Longest admin request line.
pub(super) const MAX_ADMIN_REQUEST: usize = ferry_admin::MAX_REQUEST;

/// Serves the admin socket: each client on a thread of its own (at most
/// [`MAX_ADMIN_CLIENTS`] at once), its request limited to
/// [`MAX_ADMIN_REQUEST`] bytes arriving within `timeout`, so that no client
/// delays another, and none ever reaches the data-plane loop except
/// through the loop's inbox.
pub(super) fn spawn_admin(
    listener: UnixListener,
    policy: Policy,
    timeout: Duration,
    inbox: inbox::Sender,
) -> std::io::Result<()> {
    listener.set_nonblocking(false)?;
    // Admin clients being served, per uid.
    let active: Arc<std::sync::Mutex<HashMap<u32, usize>>> = Arc::default();
    std::thread::Builder::new()
        .name("ferryd-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let mut conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors: the connection stays queued
                        // and accept would fail again at once; wait instead.
                        limited!(WARN, "admin accept: {e}");
                        std::thread::sleep(ACCEPT_PAUSE);
                        continue;
                    }
                };
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                let cred = sys::peer_cred(&conn).ok();
                let uid = cred.map_or(u32::MAX, |c| c.uid);
                let busy = {
                    let mut a = active.lock().unwrap_or_else(|p| p.into_inner());
                    let total: usize = a.values().sum();
                    let mine = a.get(&uid).copied().unwrap_or(0);
                    if total >= MAX_ADMIN_CLIENTS {
                        Some("ferryd is busy with other admin clients; try again")
                    } else if mine >= MAX_ADMIN_CLIENTS_PER_UID {
                        Some("this uid already has the most admin requests in progress; try again")
                    } else {
                        *a.entry(uid).or_default() += 1;
                        None
                    }
                };
                if let Some(why) = busy {
                    let _ =
                        conn.write_all(format!("{}\n", Response::error(why).to_line()).as_bytes());
                    continue;
                }
                let (inbox, policy, done) = (inbox.clone(), policy.clone(), active.clone());
                let finished = move |a: &std::sync::Mutex<HashMap<u32, usize>>| {
                    let mut a = a.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(n) = a.get_mut(&uid) {
                        *n -= 1;
                        if *n == 0 {
                            a.remove(&uid);
                        }
                    }
                };
                let spawned = std::thread::Builder::new()
                    .name("ferryd-admin-client".into())
                    .spawn(move || {
                        serve_admin(conn, cred, &policy, timeout, &inbox);
                        finished(&done);
                    });
                if spawned.is_err() {
                    finished(&active);
                }
            }
        })?;
    Ok(())
}

/// Reads one request line: at most [`MAX_ADMIN_REQUEST`] bytes, all of it
/// before `deadline`.
pub(super) fn read_admin_line(
    conn: &mut std::os::unix::net::UnixStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<String, String> {
    let mut line = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the request did not arrive whole within {} ms",
                timeout.as_millis()
            ));
        }
        let _ = conn.set_read_timeout(Some(left));
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                if let Some(end) = line.iter().position(|&b| b == b'\n') {
                    line.truncate(end);
                    break;
                }
                if line.len() > MAX_ADMIN_REQUEST {
                    return Err(format!("request longer than {MAX_ADMIN_REQUEST} bytes"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue; // the deadline check above answers
            }
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
    if line.len() > MAX_ADMIN_REQUEST {
        return Err(format!("request longer than {MAX_ADMIN_REQUEST} bytes"));
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

/// Hands `req` of admin client `uid` to the loop and waits for its answer;
/// None when the loop is gone.
pub(super) fn ask_loop(req: AdminRequest, uid: u32, inbox: &inbox::Sender) -> Option<Response> {
    let (reply, answer) = std::sync::mpsc::channel();
    if !inbox.send(inbox::Message::Admin { req, uid, reply }) {
        return None;
    }
    Some(
        answer
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| Response::error("ferryd did not answer")),
    )
}

/// Serves one admin client (`cred`, read at accept): the policy first,
/// then one request line, then the loop's answer.
pub(super) fn serve_admin(
    mut conn: std::os::unix::net::UnixStream,
    cred: Option<PeerCred>,
    policy: &Policy,
    timeout: Duration,
    inbox: &inbox::Sender,
) {
    let deadline = Instant::now() + timeout;
    let answer = match cred {
        Some(c) if policy.allows(&conn, &c) => {
            let req = read_admin_line(&mut conn, deadline, timeout)
                .and_then(|line| AdminRequest::parse(&line));
            match req {
                Err(e) => Response::Error(e),
                Ok(req) => match ask_loop(req, c.uid, inbox) {
                    Some(a) => a,
                    None => return, // the loop is gone
                },
            }
        }
        Some(c) => {
            limited!(
                WARN,
                pid = c.pid,
                uid = c.uid,
                "admin connection refused by policy"
            );
            Response::Error(format!(
                "permission denied: uid {} gid {} may not use this ferryd",
                c.uid, c.gid
            ))
        }
        None => Response::error("permission denied: no peer credentials"),
    };
    // A status is encoded here, not on the loop.
    let mut line = answer.to_line();
    line.push('\n');
    let _ = conn.write_all(line.as_bytes());
}

impl Server {
    /// Answers admin client `uid`'s request on `reply`: at once, or (a
    /// cluster status, which waits for the peers) later.
    pub(super) fn answer_admin(
        &mut self,
        req: AdminRequest,
        uid: u32,
        reply: std::sync::mpsc::Sender<Response>,
    ) {
        if let AdminRequest::Status {
            stream: None,
            cluster: true,
        } = req
        {
            return self.ask_cluster(reply);
        }
        let _ = reply.send(self.answer_now(req, uid));
    }

    fn answer_now(&mut self, req: AdminRequest, uid: u32) -> Response {
        match req {
            AdminRequest::Status { stream: None, .. } => {
                Response::Status(Box::new(self.status_view(None)))
            }
            AdminRequest::Status {
                stream: Some(name), ..
            } => {
                // Here, or homed on a peer: then its consumers and
                // producers here.
                if self.by_name.contains_key(&name) || self.home_of(&name).is_some() {
                    Response::Status(Box::new(self.status_view(Some(&name))))
                } else {
                    Response::Error(format!("no stream named {name:?}"))
                }
            }
            AdminRequest::DeleteGroup { stream, group } => self.delete_group(&stream, &group, uid),
            AdminRequest::DeleteStream { stream, force } => self.delete_stream(&stream, force, uid),
            AdminRequest::DebugStall { ms } => {
                if !self.cfg.admin.debug_requests {
                    return Response::error(
                        "debug requests are off (they need [admin] debug_requests = true)",
                    );
                }
                if uid != 0 && uid != ferry_shm::sys::geteuid() {
                    return Response::error(
                        "permission denied: only root and ferryd's uid may stall it",
                    );
                }
                let ms = ms.min(60_000);
                tracing::warn!(ms, "debug-stall: the data-plane loop sleeps on request");
                std::thread::sleep(Duration::from_millis(ms));
                Response::Ok(format!("the loop slept {ms} ms"))
            }
        }
    }
}
