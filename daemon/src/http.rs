//! The admin HTTP endpoint (`[admin] http`): `/metrics`, `/live` and
//! `/ready`, on a thread and runtime of its own, never the data-plane
//! loop's. A scrape asks the loop for a snapshot through its inbox (one
//! message; the loop copies counters it keeps anyway) and encodes it here.
//! `/live` and `/ready` read what the loop last published in [`Health`], so
//! they answer even while the loop is wedged: that is when `/live` must
//! say so.
//!
//! HTTP/1.1 with one request per connection, GET and HEAD only, a request
//! head of at most [`MAX_HEAD`] bytes arriving within [`HEAD_TIMEOUT`], at
//! most [`MAX_CLIENTS`] connections served at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::inbox;

/// Longest request head read.
pub const MAX_HEAD: usize = 8192;
/// A request head must arrive whole within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed unanswered until one ends.
pub const MAX_CLIENTS: usize = 32;
/// How long a scrape waits for the loop's snapshot.
pub const LOOP_ANSWER: Duration = Duration::from_secs(2);
/// The loop is live while its last turn is at most this old (it turns at
/// least every half second, idle or not).
pub const LIVE_WITHIN: Duration = Duration::from_secs(2);

/// What the loop publishes for `/live` and `/ready` (and systemd).
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds from `started` to the loop's last turn.
    turn_ms: AtomicU64,
    ready: AtomicBool,
    /// Why it is not ready (empty while it is).
    why_not: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            turn_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            why_not: Mutex::new("starting".into()),
        }
    }
}

impl Health {
    /// The loop turned (called from its housekeeping).
    pub fn turned(&self) {
        self.turn_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long ago the loop last turned.
    pub fn since_turn(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.turn_ms.load(Ordering::Relaxed)))
    }

    /// The loop's verdict; `why_not` is empty when ready.
    pub fn set_ready(&self, why_not: &str) {
        let mut w = self.why_not.lock().unwrap_or_else(|p| p.into_inner());
        if *w != why_not {
            *w = why_not.to_string();
        }
        self.ready.store(why_not.is_empty(), Ordering::Relaxed);
    }

    /// (live, why not) for `/live`.
    pub fn live(&self) -> Result<(), String> {
        let age = self.since_turn();
        if age > LIVE_WITHIN {
            return Err(format!(
                "the data-plane loop has not turned for {} ms",
                age.as_millis()
            ));
        }
        Ok(())
    }

    /// For `/ready`: live, and what the loop last said.
    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        if self.ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(self
            .why_not
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
}

/// Starts serving on `listener` (bound by the caller, so that a bad or
/// busy address fails start-up).
pub fn spawn(
    listener: std::net::TcpListener,
    health: Arc<Health>,
    inbox: inbox::Sender,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("ferryd-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("admin.http: {e}");
                        return;
                    }
                };
                let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
                loop {
                    let (conn, _) = match listener.accept().await {
                        Ok(c) => c,
                        Err(e) => {
                            crate::limited!(WARN, "admin.http accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        continue; // dropped: too many at once
                    };
                    let (health, inbox) = (health.clone(), inbox.clone());
                    tokio::spawn(async move {
                        serve(conn, &health, &inbox).await;
                        drop(permit);
                    });
                }
            });
        })?;
    Ok(())
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
}

/// Parses the head's first line ("GET /metrics HTTP/1.1"); the query
/// string, if any, is dropped.
pub fn parse_request_line(head: &str) -> Result<RequestLine<'_>, &'static str> {
    let line = head.lines().next().unwrap_or("");
    let mut it = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Err("only HTTP/1.x is served");
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(RequestLine { method, path })
}

/// The answer to `req`: status code, content type, body.
async fn answer(
    req: &RequestLine<'_>,
    health: &Health,
    inbox: &inbox::Sender,
) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method != "GET" && req.method != "HEAD" {
        return (405, TEXT, "only GET and HEAD are served\n".into());
    }
    match req.path {
        "/live" => match health.live() {
            Ok(()) => (200, TEXT, "live\n".into()),
            Err(why) => (503, TEXT, format!("not live: {why}\n")),
        },
        "/ready" => match health.ready() {
            Ok(()) => (200, TEXT, "ready\n".into()),
            Err(why) => (503, TEXT, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            let (reply, snap) = tokio::sync::oneshot::channel();
            if !inbox.send(inbox::Message::Metrics { reply }) {
                return (503, TEXT, "ferryd is stopping\n".into());
            }
            match tokio::time::timeout(LOOP_ANSWER, snap).await {
                Ok(Ok(s)) => (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    crate::metrics::encode(s),
                ),
                Ok(Err(_)) => (503, TEXT, "ferryd is stopping\n".into()),
                Err(_) => (
                    503,
                    TEXT,
                    format!(
                        "the data-plane loop did not answer within {} ms (last turn {} ms ago)\n",
                        LOOP_ANSWER.as_millis(),
                        health.since_turn().as_millis()
                    ),
                ),
            }
        }
        "/" => (
            200,
            TEXT,
            "ferryd: /metrics (Prometheus), /live, /ready\n".into(),
        ),
        _ => (
            404,
            TEXT,
            "not found: try /metrics, /live or /ready\n".into(),
        ),
    }
}

async fn serve(mut conn: tokio::net::TcpStream, health: &Health, inbox: &inbox::Sender) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_HEAD {
            break false;
        }
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return, // gone, or too slow
            Ok(Ok(n)) => head.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return,
        }
    };
    let text = String::from_utf8_lossy(&head);
    let (code, ctype, body, head_only) = if !complete {
        (
            431,
            "text/plain",
            format!("request head over {MAX_HEAD} bytes\n"),
            false,
        )
    } else {
        match parse_request_line(&text) {
            Err(why) => (400, "text/plain", format!("{why}\n"), false),
            Ok(req) => {
                let (c, t, b) = answer(&req, health, inbox).await;
                (c, t, b, req.method == "HEAD")
            }
        }
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.write_all(&out)).await;
    let _ = conn.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_request_line("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(RequestLine {
                method: "GET",
                path: "/metrics"
            })
        );
        for bad in [
            "",
            "GET",
            "GET /",
            "GET / HTTP/2",
            "GET  / HTTP/1.1",
            "GET / HTTP/1.1 x",
        ] {
            assert!(parse_request_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_loop_that_stops_turning_is_not_live_and_so_not_ready() {
        let h = Health::default();
        assert!(h.ready().is_err(), "not ready before the loop says so");
        h.turned();
        h.set_ready("");
        assert_eq!(h.live(), Ok(()));
        assert_eq!(h.ready(), Ok(()));
        h.set_ready("peer b is down");
        assert_eq!(h.ready(), Err("peer b is down".to_string()));
        // The last turn, as if long ago.
        h.turn_ms.store(0, Ordering::Relaxed);
        let h = Health {
            started: Instant::now() - LIVE_WITHIN * 2,
            ..h
        };
        assert!(h.live().unwrap_err().contains("has not turned"));
        assert!(h.ready().is_err());
    }
}
