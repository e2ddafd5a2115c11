//! The loop's side of monitoring: the snapshot a scrape of `/metrics`
//! gets, what `/live` and `/ready` read, and systemd's notifications
//! (READY, WATCHDOG from the loop itself, STATUS, STOPPING).

use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::{debug, info};

use super::Server;
use crate::fabric::LinkStats;
use crate::metrics::{LinkCounters, Snapshot, StreamCounters};

/// How often readiness and the STATUS line are looked at.
const READY_EVERY: Duration = Duration::from_millis(250);

/// Sends `states` to systemd when it started us with a notify socket.
pub(super) fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        debug!("sd_notify: {e}");
    }
}

/// The watchdog systemd asked for (WatchdogSec= sets WATCHDOG_USEC and
/// WATCHDOG_PID): pings go at a third of it.
pub(super) fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
        .then(|| Duration::from_micros(usec / 3).max(Duration::from_millis(1)))
}

/// The loop's monitoring state.
pub(super) struct Monitor {
    pub(super) health: std::sync::Arc<crate::http::Health>,
    /// Ping systemd's watchdog this often (None: it did not ask).
    watchdog: Option<Duration>,
    last_ping: Instant,
    last_look: Instant,
    status_line: String,
    /// The loop's turns, for `ferry_daemon_loop_turns_total`.
    pub(super) turns: u64,
    /// Snapshots taken for scrapes, and the loop's time taking them.
    snapshots: u64,
    snapshot_ns: u64,
}

impl Monitor {
    pub(super) fn new(health: std::sync::Arc<crate::http::Health>) -> Monitor {
        let watchdog = watchdog_interval();
        if let Some(w) = watchdog {
            info!(
                every_ms = w.as_millis() as u64,
                "systemd watchdog: pinging from the data-plane loop"
            );
        }
        let long_ago = Instant::now() - Duration::from_secs(3600);
        Monitor {
            health,
            watchdog,
            last_ping: long_ago,
            last_look: long_ago,
            status_line: String::new(),
            turns: 0,
            snapshots: 0,
            snapshot_ns: 0,
        }
    }

    /// The longest the loop may sleep in epoll so that it turns often
    /// enough for the watchdog and `/live`.
    pub(super) fn max_sleep_ms(&self) -> i32 {
        let w = self.watchdog.map_or(500, |w| w.as_millis().min(500) as i32);
        w.max(1)
    }
}

impl Server {
    /// Called from housekeeping (every turn of the loop that looks at the
    /// timeouts): the loop is live; ping the watchdog; now and then, say
    /// whether it is ready and what it is doing.
    pub(super) fn monitor_tick(&mut self) {
        let now = Instant::now();
        self.monitor.health.turned();
        if let Some(w) = self.monitor.watchdog {
            if now - self.monitor.last_ping >= w {
                self.monitor.last_ping = now;
                notify(&[NotifyState::Watchdog]);
            }
        }
        if now - self.monitor.last_look < READY_EVERY {
            return;
        }
        self.monitor.last_look = now;
        let why_not = self.why_not_ready();
        self.monitor.health.set_ready(&why_not);
        let line = self.status_line(&why_not);
        if line != self.monitor.status_line {
            notify(&[NotifyState::Status(&line)]);
            self.monitor.status_line = line;
        }
    }

    /// Empty when ready; else why not, for `/ready`.
    fn why_not_ready(&self) -> String {
        if self.draining.is_some() {
            return "draining".into();
        }
        let failing: Vec<String> = self
            .streams
            .iter()
            .filter_map(|e| {
                let err = e.log.as_ref()?.error.as_ref()?;
                Some(format!("stream {}: {err}", e.stream.name()))
            })
            .collect();
        if !failing.is_empty() {
            return format!("disk log writes fail: {}", failing.join("; "));
        }
        if self.cfg.admin.ready_needs_peers {
            if let Some(c) = &self.cluster {
                let down: Vec<&str> = c
                    .table
                    .iter()
                    .filter(|(_, v)| !v.is_up() && !v.has_left())
                    .map(|(n, _)| n.as_str())
                    .collect();
                if !down.is_empty() {
                    return format!(
                        "peer(s) not up: {} (admin.ready_needs_peers = true)",
                        down.join(", ")
                    );
                }
            }
        }
        String::new()
    }

    /// The one-line summary systemd shows (`systemctl status ferryd`).
    fn status_line(&self, why_not: &str) -> String {
        let consumers = self
            .sessions
            .values()
            .filter(|s| matches!(s.role, super::sessions::Role::Consumer(_)))
            .count();
        let producers = self
            .sessions
            .values()
            .filter(|s| matches!(s.role, super::sessions::Role::Producer(_)))
            .count();
        let mut line = format!(
            "{} streams, {producers} producers, {consumers} consumers",
            self.streams.len()
        );
        if let Some(c) = &self.cluster {
            let up = c.table.values().filter(|v| v.is_up()).count();
            let members = c.table.values().filter(|v| !v.has_left()).count();
            line.push_str(&format!(", {up}/{members} peers up"));
            if let Some(e) = &c.etcd {
                if !e.up {
                    line.push_str(", etcd unreachable (peers kept)");
                }
            }
        }
        if !why_not.is_empty() {
            line.push_str(&format!("; not ready: {why_not}"));
        }
        line
    }

    /// What a scrape gets: the status, and the counters it lacks; the
    /// time it takes the loop is counted too.
    pub(super) fn metrics_snapshot(&mut self) -> Snapshot {
        let t = Instant::now();
        let mut snap = self.take_snapshot();
        self.monitor.snapshots += 1;
        self.monitor.snapshot_ns += t.elapsed().as_nanos() as u64;
        snap.snapshots = self.monitor.snapshots;
        snap.snapshot_ns = self.monitor.snapshot_ns;
        snap
    }

    fn take_snapshot(&self) -> Snapshot {
        let status = self.status_view(None);
        let streams = status
            .streams
            .iter()
            .map(|s| {
                let Some(&i) = self.by_name.get(&s.name) else {
                    return StreamCounters::default();
                };
                let e = &self.streams[i];
                let mut c = e.counters.clone();
                c.published_bytes = e.stream.published_bytes();
                if let Some(l) = &e.log {
                    (c.recovery_cuts, c.recovery_damaged) = l.recovered;
                }
                c
            })
            .collect();
        let links = status
            .peers
            .iter()
            .map(|p| {
                let Some(cl) = &self.cluster else {
                    return LinkCounters::default();
                };
                let mut c = match cl.links.get(&p.node_id) {
                    Some(l) => LinkCounters {
                        writes: LinkStats::get(&l.stats.writes),
                        write_bytes: LinkStats::get(&l.stats.write_bytes),
                        receives: LinkStats::get(&l.stats.receives),
                        errors: LinkStats::get(&l.stats.errors),
                        credit_stalls: LinkStats::get(&l.stats.credit_stalls),
                        credits_outstanding: 0,
                        write_latency: l.stats.write_latency.snapshot(),
                    },
                    None => LinkCounters::default(),
                };
                c.credits_outstanding = status
                    .streams
                    .iter()
                    .flat_map(|s| &s.groups)
                    .flat_map(|g| &g.members)
                    .filter(|m| m.host.as_deref() == Some(p.node_id.as_str()))
                    .filter_map(|m| m.landing_credits)
                    .map(u64::from)
                    .sum();
                c
            })
            .collect();
        Snapshot {
            status,
            streams,
            links,
            loop_turns: self.monitor.turns,
            ready: self.monitor.health.ready().is_ok(),
            data_dir: Some(self.cfg.daemon.data_dir()).filter(|d| d.exists()),
            snapshots: 0,
            snapshot_ns: 0,
        }
    }
}
