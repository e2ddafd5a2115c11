//! The daemon's life: its socket files, systemd notifications, the
//! timeouts looked at by housekeeping, and draining on SIGTERM.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::{check_socket_dir, check_socket_file, SocketFile};
use crate::stream::SessionId;

use super::*;
use crate::error::{DaemonError, Doing};

/// How often the timeouts are looked at (see `Server::housekeeping`).
pub(super) const HOUSEKEEPING_EVERY: Duration = Duration::from_millis(20);

/// Makes the socket's directory if missing (mode 0755) and checks that it
/// is safe to use.
pub(super) fn prepare_socket_dir(path: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .doing(|| format!("creating socket directory {}", dir.display()))?;
    }
    check_socket_dir(dir).map_err(DaemonError::Other)
}

/// Removes a stale socket (a socket no daemon answers on) at `path`, and
/// refuses anything else: a live daemon, or a file that is not a socket.
pub(super) fn claim_socket_path(path: &Path) -> Result<(), DaemonError> {
    prepare_socket_dir(path)?;
    match check_socket_file(path).map_err(DaemonError::Other)? {
        SocketFile::Absent => {}
        SocketFile::Stale => std::fs::remove_file(path)
            .doing(|| format!("removing stale socket {}", path.display()))?,
        SocketFile::Live => {
            return Err(DaemonError::Other(format!(
                "another ferryd is already listening on {}",
                path.display()
            )))
        }
    }
    Ok(())
}

/// Sets a socket's mode and, with `daemon.socket_group`, its group.
pub(super) fn set_socket_access(
    path: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<(), DaemonError> {
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .doing(|| format!("giving {} to group {gid}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .doing(|| format!("setting the mode of {}", path.display()))?;
    Ok(())
}

impl Server {
    /// The streams with held slots and who holds them, for the drain
    /// summary.
    pub(super) fn describe_held(&self) -> String {
        self.describe_held_where(|_| true)
    }

    /// [`Server::describe_held`] for the memory streams alone.
    pub(super) fn describe_held_in_memory(&self) -> String {
        self.describe_held_where(|e| !e.stream.tiered())
    }

    fn describe_held_where(&self, which: impl Fn(&StreamEntry) -> bool) -> String {
        self.streams
            .iter()
            .filter(|e| which(e) && e.stream.slot_counts().2 > 0)
            .map(|e| {
                format!(
                    "stream {}: {}",
                    e.stream.name(),
                    e.stream.describe_holders()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub(super) fn drained(&self) -> bool {
        // Publishes from GPU memory still copying to host count as published.
        !self.copies_pending()
            && self.streams.iter().all(|s| {
                s.stream.slot_counts().2 == 0
                    || s.stream.groups().iter().all(|g| g.members.is_empty())
                        && s.stream
                            .groups()
                            .iter()
                            .all(|g| g.parts.iter().all(|p| p.inflight.is_empty()))
            })
    }

    pub(super) fn shutdown(&mut self) {
        super::metrics::notify(&[sd_notify::NotifyState::Stopping]);
        if let Some(c) = &mut self.cluster {
            // Leave etcd first: the others drop this daemon at once.
            if let Some(m) = &mut c.membership {
                m.stop();
            }
            c.peers.stop();
        }
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.close_session(id, true);
        }
        self.close_disk_streams();
        let _ = std::fs::remove_file(&self.socket_path);
        let _ = std::fs::remove_file(&self.admin_path);
        info!("ferryd stopped");
    }

    pub(super) fn start_drain(&mut self, signo: i32) {
        if self.draining.is_some() {
            return;
        }
        info!(
            signal = signo,
            "draining: no new sessions; delivering what was published"
        );
        super::metrics::notify(&[sd_notify::NotifyState::Stopping]);
        self.draining = Some(Instant::now());
        if let Some(l) = self.listener.take() {
            self.epoll.delete(l.as_raw_fd());
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }

    /// Timeouts: connections without Hello, connections that opened
    /// nothing, a listener paused for want of descriptors, idle groups and
    /// streams. At most every HOUSEKEEPING_EVERY: the loop calls it each
    /// time it goes to sleep (up to thousands of times a second under a
    /// trickle of batches), and the timeouts are tens of milliseconds at
    /// the least.
    pub(super) fn housekeeping(&mut self) {
        if self.last_housekeeping.elapsed() < HOUSEKEEPING_EVERY {
            return;
        }
        self.last_housekeeping = Instant::now();
        self.monitor_tick();
        let hello = Duration::from_millis(self.cfg.daemon.handshake_timeout_ms);
        let idle = Duration::from_millis(self.cfg.daemon.idle_timeout_ms);
        let late: Vec<(SessionId, String)> = self
            .sessions
            .values()
            .filter_map(|s| match s.role {
                Role::Fresh if s.since.elapsed() > hello => {
                    Some((s.id, format!("no Hello within {} ms", hello.as_millis())))
                }
                Role::Control if s.since.elapsed() > idle => Some((
                    s.id,
                    format!(
                        "opened no producer or consumer within idle_timeout_ms = {}",
                        idle.as_millis()
                    ),
                )),
                _ => None,
            })
            .collect();
        for (id, why) in late {
            self.fail_session(id, &why);
        }
        if self
            .listener_paused
            .is_some_and(|t| t.elapsed() >= ACCEPT_PAUSE)
        {
            self.resume_listener();
        }
        self.finish_cluster_asks();
        self.expire_groups();
        self.expire_retired();
        self.expire_streams();
        self.report_waiting_producers();
    }

    /// Logs, once per wait, a producer that has waited `slot_wait_log_ms`
    /// for a free slot, naming the groups that hold the slots: a stalled
    /// producer is never silent.
    pub(super) fn report_waiting_producers(&mut self) {
        let after = self.cfg.daemon.slot_wait_log_ms;
        if after == 0 {
            return;
        }
        let after = Duration::from_millis(after);
        for e in self.streams.iter() {
            for pid in &e.producers {
                let Some(Session {
                    role: Role::Producer(p),
                    cred,
                    ..
                }) = self.sessions.get_mut(pid)
                else {
                    continue;
                };
                let Some(since) = p.starved_since else {
                    continue;
                };
                if p.starved_logged || since.elapsed() < after || e.stream.has_free_slot() {
                    continue;
                }
                p.starved_logged = true;
                warn!(
                    stream = %e.stream.name(),
                    session = *pid,
                    pid = cred.pid,
                    waited_ms = since.elapsed().as_millis() as u64,
                    "producer waits for a free slot: all {} slots are held, by {}",
                    e.stream.spec().slot_count,
                    e.stream.describe_holders()
                );
            }
        }
    }
}
