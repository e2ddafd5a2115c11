//! NATS JetStream as a baseline of `ferry-bench stream`: a nats-server of
//! our own (Debian's `nats-server`, JetStream on, memory storage, payload
//! limit raised to fit the batches), a producer publishing each batch and
//! waiting for JetStream's acknowledgement, a durable pull consumer (one
//! member) fetching, touching every byte, and acknowledging each. The
//! client is the core text protocol, written here (no crate needed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_shm::sys::monotonic_ns;

use crate::stream::{free_port, spawn_server, Server};
use crate::{percentile, touch, Res};

/// Entries kept in the stream at most (as Ferry's pool bounds a stream);
/// a publish into a full stream is refused and retried.
const MAX_MSGS: u32 = 64;

pub(crate) fn start(dir: &Path) -> Res<Server> {
    let port = free_port()?;
    std::fs::create_dir_all(dir)?;
    let cfg = dir.join("nats.conf");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 16MB\nmax_pending: 256MB\njetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 2GB\n}}\n",
            dir.join("js").display()
        ),
    )?;
    let mut cmd = Command::new("nats-server");
    cmd.arg("-c").arg(&cfg);
    spawn_server(cmd, "nats-server", port)
}

/// A message delivered to a subscription.
struct Msg {
    reply: Option<String>,
    /// A status message (no messages, timeout): its status line.
    status: Option<String>,
    data: Vec<u8>,
}

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
    inbox: u64,
}

impl Conn {
    fn connect(port: u16) -> Res<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        let mut c = Conn {
            r: BufReader::with_capacity(1 << 20, s.try_clone()?),
            w: s,
            inbox: 0,
        };
        let info = c.line()?;
        if !info.starts_with("INFO") {
            return Err(format!("nats: expected INFO, got {info:?}").into());
        }
        c.w.write_all(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true}\r\nPING\r\n",
        )?;
        loop {
            match c.line()?.as_str() {
                "PONG" => return Ok(c),
                l if l.starts_with("-ERR") => return Err(format!("nats: {l}").into()),
                _ => {}
            }
        }
    }

    fn line(&mut self) -> Res<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err("nats: connection closed".into());
        }
        Ok(l.trim_end().to_string())
    }

    fn publish(&mut self, subject: &str, reply: Option<&str>, data: &[u8]) -> Res<()> {
        let head = match reply {
            Some(r) => format!("PUB {subject} {r} {}\r\n", data.len()),
            None => format!("PUB {subject} {}\r\n", data.len()),
        };
        self.w.write_all(head.as_bytes())?;
        self.w.write_all(data)?;
        self.w.write_all(b"\r\n")?;
        Ok(())
    }

    /// A fresh inbox subject, subscribed with id `sid`.
    fn subscribe_inbox(&mut self, sid: u32) -> Res<String> {
        self.inbox += 1;
        let subject = format!("_INBOX.bench.{}.{sid}", self.inbox);
        self.w
            .write_all(format!("SUB {subject} {sid}\r\n").as_bytes())?;
        Ok(subject)
    }

    /// The next message (answering the server's pings on the way).
    fn next_msg(&mut self) -> Res<Msg> {
        loop {
            let l = self.line()?;
            let parts: Vec<&str> = l.split(' ').collect();
            match parts[0] {
                "PING" => self.w.write_all(b"PONG\r\n")?,
                "PONG" | "+OK" | "" => {}
                "-ERR" => return Err(format!("nats: {l}").into()),
                "MSG" => {
                    // MSG <subject> <sid> [reply] <len>
                    let len: usize = parts.last().ok_or("nats: bad MSG")?.parse()?;
                    let reply = (parts.len() == 5).then(|| parts[3].to_string());
                    let mut data = vec![0u8; len + 2];
                    self.r.read_exact(&mut data)?;
                    data.truncate(len);
                    return Ok(Msg {
                        reply,
                        status: None,
                        data,
                    });
                }
                "HMSG" => {
                    // HMSG <subject> <sid> [reply] <hdr_len> <total_len>
                    let n = parts.len();
                    let total: usize = parts[n - 1].parse()?;
                    let hdr: usize = parts[n - 2].parse()?;
                    let reply = (n == 6).then(|| parts[3].to_string());
                    let mut data = vec![0u8; total + 2];
                    self.r.read_exact(&mut data)?;
                    let headers = String::from_utf8_lossy(&data[..hdr]).to_string();
                    let status = headers
                        .lines()
                        .next()
                        .filter(|l| l.trim().len() > "NATS/1.0".len())
                        .map(|l| l.trim().to_string());
                    let body = data[hdr..total].to_vec();
                    return Ok(Msg {
                        reply,
                        status,
                        data: body,
                    });
                }
                _ => return Err(format!("nats: unexpected {l:?}").into()),
            }
        }
    }

    /// The next message, or None when nothing came within the socket's
    /// read timeout (a pull request that ended without a status message).
    fn next_msg_or_idle(&mut self) -> Res<Option<Msg>> {
        if self.r.buffer().is_empty() {
            match self.r.fill_buf() {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.next_msg().map(Some)
    }

    /// A request and its one answer.
    fn request(&mut self, subject: &str, data: &[u8], sid: u32) -> Res<Vec<u8>> {
        let inbox = self.subscribe_inbox(sid)?;
        self.publish(subject, Some(&inbox), data)?;
        let m = self.next_msg()?;
        self.w.write_all(format!("UNSUB {sid}\r\n").as_bytes())?;
        if let Some(s) = m.status {
            return Err(format!("nats: {subject}: {s}").into());
        }
        Ok(m.data)
    }
}

fn api(c: &mut Conn, subject: &str, body: &str, sid: u32) -> Res<serde_json::Value> {
    let answer: serde_json::Value =
        serde_json::from_slice(&c.request(subject, body.as_bytes(), sid)?)?;
    if let Some(e) = answer.get("error") {
        return Err(format!("nats: {subject}: {e}").into());
    }
    Ok(answer)
}

/// One run: (bytes/second, p50 ns, p99 ns, messages).
pub(crate) fn case(
    port: u16,
    batch: usize,
    millis: u64,
    pace_us: u64,
) -> Res<(f64, u64, u64, u64)> {
    let name = format!("BENCH{batch}");
    let subject = format!("bench.{batch}");
    let mut c = Conn::connect(port)?;
    let _ = c.request(&format!("$JS.API.STREAM.DELETE.{name}"), b"", 1);
    api(
        &mut c,
        &format!("$JS.API.STREAM.CREATE.{name}"),
        &serde_json::json!({
            "name": name, "subjects": [subject], "storage": "memory",
            "retention": "workqueue", "max_msgs": MAX_MSGS, "discard": "new",
            "max_msg_size": -1,
        })
        .to_string(),
        2,
    )?;
    api(
        &mut c,
        &format!("$JS.API.CONSUMER.DURABLE.CREATE.{name}.c"),
        &serde_json::json!({
            "stream_name": name,
            "config": {"durable_name": "c", "ack_policy": "explicit", "max_ack_pending": MAX_MSGS},
        })
        .to_string(),
        3,
    )?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let subj = subject.clone();
    let producer = std::thread::spawn(move || -> Result<u64, String> {
        let run = || -> Res<u64> {
            let mut p = Conn::connect(port)?;
            // An acknowledgement that never comes fails the run, not hangs it.
            p.w.set_read_timeout(Some(Duration::from_secs(10)))?;
            let inbox = p.subscribe_inbox(1)?;
            let mut buf = vec![5u8; batch];
            let mut n = 0u64;
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                buf[..8].copy_from_slice(&monotonic_ns().to_le_bytes());
                p.publish(&subj, Some(&inbox), &buf)?;
                let ack = p.next_msg()?;
                let ok = ack.status.is_none()
                    && serde_json::from_slice::<serde_json::Value>(&ack.data)
                        .is_ok_and(|v| v.get("error").is_none());
                if ok {
                    n += 1;
                    if pace_us > 0 {
                        std::thread::sleep(Duration::from_micros(pace_us));
                    }
                } else {
                    // The stream is full (discard new): wait for the reader.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(n)
        };
        run().map_err(|e| e.to_string())
    });
    let fetch = format!("$JS.API.CONSUMER.MSG.NEXT.{name}.c");
    // At most about 16 MiB asked for at once; one at a time when paced
    // (a request for more waits for them, or for its expiry).
    let per_fetch = if pace_us > 0 {
        1
    } else {
        (16usize << 20).div_ceil(batch).clamp(1, 16)
    };
    let fetch_req = format!("{{\"batch\":{per_fetch},\"expires\":200000000}}");
    let inbox = c.subscribe_inbox(9)?;
    // A pull request that expires without a word is followed by another.
    c.w.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut lat = Vec::new();
    let (mut bytes, mut sink) = (0u64, 0u64);
    let mut first: Option<Instant> = None;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(millis) || lat.len() < 4 {
        c.publish(&fetch, Some(&inbox), fetch_req.as_bytes())?;
        let mut got = 0;
        while let Some(m) = c.next_msg_or_idle()? {
            if m.status.is_some() {
                break; // no more now (timeout, or the batch is done)
            }
            let now = monotonic_ns();
            let sent =
                u64::from_le_bytes(m.data.get(..8).ok_or("nats: short message")?.try_into()?);
            lat.push(now.saturating_sub(sent));
            sink = sink.wrapping_add(touch(&m.data));
            if first.is_some() {
                bytes += m.data.len() as u64;
            }
            first.get_or_insert_with(Instant::now);
            if let Some(r) = m.reply {
                c.publish(&r, None, b"")?;
            }
            got += 1;
            if got == per_fetch {
                break; // the batch asked for is done
            }
        }
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // The reader goes (what it was still sent is dropped with it), and a
    // fresh connection empties the stream, so that a producer waiting for
    // its acknowledgement or for room gets it.
    drop(c);
    let mut admin = Conn::connect(port)?;
    let _ = admin.request(&format!("$JS.API.STREAM.PURGE.{name}"), b"", 4);
    producer.join().map_err(|_| "nats producer panicked")??;
    let _ = admin.request(&format!("$JS.API.STREAM.DELETE.{name}"), b"", 5);
    std::hint::black_box(sink);
    let n = lat.len() as u64;
    Ok((
        bytes as f64 / secs.max(1e-9),
        percentile(&mut lat, 50.0),
        percentile(&mut lat, 99.0),
        n,
    ))
}
