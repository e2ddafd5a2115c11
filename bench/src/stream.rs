//! `ferry-bench stream`: batches from a producer on host A to a consumer
//! group member on host B, through two ferryd daemons of one cluster (on
//! loopback, with the soft fabric), every byte touched by the consumer;
//! throughput and delivery latency p50/p99. Baselines in the same run: a
//! plain TCP copy loop between the same two places (the physical limit on
//! loopback), Redis Streams (`redis-server`, started here: XADD,
//! XREADGROUP, XACK) and NATS JetStream (`nats-server`, started here: a
//! publish acknowledged by JetStream, a durable pull consumer acknowledging
//! each message; see `nats.rs`), with the same batches, one producer and a
//! group of one consumer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::{Client, StreamSpec};
use ferry_shm::sys::monotonic_ns;

use crate::{emit_line, me, percentile, run_millis, run_pair, touch, Res};

/// A ferryd of the two-host cluster.
struct Host {
    child: Child,
    socket: PathBuf,
    admin: PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Two ferryd daemons, "a" and "b", peers of each other on loopback.
fn two_hosts(ferryd: &Path, dir: &Path) -> Res<(Host, Host)> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let secret = dir.join("secret");
    std::fs::write(&secret, b"ferry-bench cluster secret, loopback only")?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    let ports = [free_port()?, free_port()?];
    let names = ["a", "b"];
    let mut hosts = Vec::new();
    for i in 0..2 {
        let d = dir.join(names[i]);
        std::fs::create_dir_all(&d)?;
        let socket = d.join("ferryd.sock");
        let cfg = format!(
            "version = 1\n[daemon]\nsocket = \"{}\"\nlog = \"warn\"\n[cluster]\nnode_id = \"{}\"\nlisten = \"127.0.0.1:{}\"\nsecret_file = \"{}\"\npeers = [{{ node_id = \"{}\", addr = \"127.0.0.1:{}\" }}]\n",
            socket.display(),
            names[i],
            ports[i],
            secret.display(),
            names[1 - i],
            ports[1 - i]
        );
        std::fs::write(d.join("ferryd.toml"), cfg)?;
        let child = Command::new(ferryd)
            .arg("--config")
            .arg(d.join("ferryd.toml"))
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", ferryd.display()))?;
        hosts.push(Host {
            child,
            admin: d.join("ferryd-admin.sock"),
            socket,
        });
    }
    let b = hosts.pop().expect("two");
    let a = hosts.pop().expect("two");
    let start = Instant::now();
    loop {
        let up = ferry_admin::Client::new(&b.admin)
            .status(None)
            .is_ok_and(|st| st.peers.iter().all(|p| p.state == "up"));
        if up {
            return Ok((a, b));
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err("the two ferryd daemons did not connect".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The consumer's prefetch: batches on their way to it or landed, which
/// also bounds what a credit round trip between the hosts costs.
const PREFETCH: u32 = 16;

/// Ferry: producer on a, consumer on b.
fn ferry_case(
    a: &Host,
    b: &Host,
    stream: &str,
    batch: u64,
    millis: u64,
    pace_us: u64,
) -> Res<serde_json::Value> {
    let client = Client::connect(Some(&a.socket))?;
    let p = client.producer(
        stream,
        Some(StreamSpec {
            durability: Default::default(),
            partitions: 1,
            slot_size: batch,
            slot_count: if batch > 4 << 20 { 16 } else { 32 },
        }),
    )?;
    // b must know of the stream before its consumer opens it.
    let start = Instant::now();
    while !ferry_admin::Client::new(&b.admin)
        .status(None)
        .is_ok_and(|st| {
            st.peers
                .iter()
                .any(|p| p.streams.iter().any(|s| s == stream))
        })
    {
        if start.elapsed() > Duration::from_secs(5) {
            return Err(format!("stream {stream} was not announced to b").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let reader = [
        "consume".to_string(),
        b.socket.display().to_string(),
        stream.to_string(),
        "50".to_string(),
        PREFETCH.to_string(),
    ];
    let writer = [
        "produce".to_string(),
        a.socket.display().to_string(),
        stream.to_string(),
        batch.to_string(),
        millis.to_string(),
        pace_us.to_string(),
    ];
    run_pair(&reader, &writer, move || drop(p))
}

/// A TCP copy loop of `size`-byte messages between two threads on
/// loopback, the receiver touching every byte; bytes/second.
fn tcp_copy(size: usize, millis: u64) -> Res<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let mut a = TcpStream::connect(l.local_addr()?)?;
    let (mut b, _) = l.accept()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let sender = std::thread::spawn(move || {
        let buf = vec![7u8; size];
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            if a.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; size];
    let mut sink = 0u64;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_millis(millis) || n < 4 {
        b.read_exact(&mut buf)?;
        sink = sink.wrapping_add(touch(&buf));
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(b);
    let _ = sender.join();
    std::hint::black_box(sink);
    Ok(n as f64 * size as f64 / secs)
}

/// A server program of our own (redis-server, nats-server), killed on
/// drop.
pub(crate) struct Server {
    child: Child,
    pub(crate) port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` (Debian package `program`) and waits until it accepts
/// connections on `port`.
pub(crate) fn spawn_server(mut cmd: Command, program: &str, port: u16) -> Res<Server> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "starting {program} (Debian package {program}; scripts/setup.sh installs it): {e}"
            )
        })?;
    let server = Server { child, port };
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("{program} did not start").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// A redis-server of our own on loopback, with no snapshots and
/// `persistence` for its append-only file (`--appendonly no`, or yes with
/// an fsync policy and a directory).
pub(crate) fn start_redis(persistence: &[&std::ffi::OsStr]) -> Res<Server> {
    let port = free_port()?;
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ])
    .args(["--protected-mode", "no"])
    .args(persistence);
    spawn_server(cmd, "redis-server", port)
}

/// A minimal RESP client: commands as arrays of bulk strings.
pub(crate) struct Resp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

/// One RESP reply (what these commands answer).
#[derive(Debug)]
pub(crate) enum Reply {
    Simple,
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Resp {
    pub(crate) fn connect(port: u16) -> Res<Resp> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        Ok(Resp {
            r: BufReader::with_capacity(1 << 20, s.try_clone()?),
            w: s,
        })
    }

    pub(crate) fn send(&mut self, args: &[&[u8]]) -> Res<()> {
        let mut head = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            head.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            if a.len() > 4096 {
                self.w.write_all(&head)?;
                head.clear();
                self.w.write_all(a)?;
            } else {
                head.extend_from_slice(a);
            }
            head.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&head)?;
        Ok(())
    }

    fn line(&mut self) -> Res<String> {
        let mut l = String::new();
        self.r.read_line(&mut l)?;
        Ok(l.trim_end().to_string())
    }

    pub(crate) fn reply(&mut self) -> Res<Reply> {
        let l = self.line()?;
        let (t, rest) = l.split_at(1.min(l.len()));
        Ok(match t {
            "+" => Reply::Simple,
            "-" => return Err(format!("redis: {rest}").into()),
            ":" => Reply::Int(rest.parse()?),
            "$" => {
                let n: i64 = rest.parse()?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut b = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut b)?;
                    b.truncate(n as usize);
                    Reply::Bulk(Some(b))
                }
            }
            "*" => {
                let n: i64 = rest.parse()?;
                if n < 0 {
                    Reply::Array(None)
                } else {
                    let mut v = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        v.push(self.reply()?);
                    }
                    Reply::Array(Some(v))
                }
            }
            _ => return Err(format!("redis: unexpected reply {l:?}").into()),
        })
    }

    fn call(&mut self, args: &[&[u8]]) -> Res<Reply> {
        self.send(args)?;
        self.reply()
    }
}

/// Redis Streams: a producer thread XADDs `batch`-byte entries (a send
/// timestamp in the first 8 bytes), a consumer of a group of one reads
/// them with XREADGROUP, touches every byte and XACKs each. Returns
/// (bytes/second, p50 ns, p99 ns, entries).
fn redis_case(port: u16, batch: usize, millis: u64, pace_us: u64) -> Res<(f64, u64, u64, u64)> {
    let key = format!("bench-{batch}");
    let mut c = Resp::connect(port)?;
    let _ = c.call(&[b"DEL", key.as_bytes()])?;
    c.call(&[
        b"XGROUP",
        b"CREATE",
        key.as_bytes(),
        b"g",
        b"$",
        b"MKSTREAM",
    ])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let k = key.clone();
    let producer = std::thread::spawn(move || -> Result<u64, String> {
        let run = || -> Res<u64> {
            let mut p = Resp::connect(port)?;
            let mut buf = vec![3u8; batch];
            let mut n = 0u64;
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                buf[..8].copy_from_slice(&monotonic_ns().to_le_bytes());
                p.call(&[b"XADD", k.as_bytes(), b"*", b"d", &buf])?;
                n += 1;
                if pace_us > 0 {
                    std::thread::sleep(Duration::from_micros(pace_us));
                }
                // Without a length cap (which would drop entries not read
                // yet) the stream keeps every entry until the reader deletes
                // it: keep at most 64 ahead, as Ferry's pool does.
                if n.is_multiple_of(16) {
                    while !st.load(std::sync::atomic::Ordering::Relaxed) {
                        match p.call(&[b"XLEN", k.as_bytes()])? {
                            Reply::Int(len) if len > 64 => {
                                std::thread::sleep(Duration::from_millis(1))
                            }
                            _ => break,
                        }
                    }
                }
            }
            Ok(n)
        };
        run().map_err(|e| e.to_string())
    });
    let mut lat = Vec::new();
    let mut bytes = 0u64;
    let mut sink = 0u64;
    let mut first = None;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(millis) || lat.len() < 4 {
        let r = c.call(&[
            b"XREADGROUP",
            b"GROUP",
            b"g",
            b"c",
            b"COUNT",
            b"16",
            b"BLOCK",
            b"1000",
            b"STREAMS",
            key.as_bytes(),
            b">",
        ])?;
        let now = monotonic_ns();
        let Reply::Array(Some(streams)) = r else {
            continue;
        };
        for s in streams {
            let Reply::Array(Some(mut kv)) = s else {
                continue;
            };
            let Some(Reply::Array(Some(entries))) = kv.pop() else {
                continue;
            };
            for e in entries {
                let Reply::Array(Some(mut parts)) = e else {
                    continue;
                };
                let fields = parts.pop();
                let id = parts.pop();
                let (Some(Reply::Bulk(Some(id))), Some(Reply::Array(Some(mut f)))) = (id, fields)
                else {
                    continue;
                };
                let Some(Reply::Bulk(Some(data))) = f.pop() else {
                    continue;
                };
                let sent = u64::from_le_bytes(data[..8].try_into()?);
                lat.push(now.saturating_sub(sent));
                sink = sink.wrapping_add(touch(&data));
                if first.is_some() {
                    bytes += data.len() as u64;
                }
                first.get_or_insert_with(Instant::now);
                c.call(&[b"XACK", key.as_bytes(), b"g", &id])?;
                c.call(&[b"XDEL", key.as_bytes(), &id])?;
            }
        }
    }
    let secs = first.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    producer.join().map_err(|_| "redis producer panicked")??;
    let _ = c.call(&[b"DEL", key.as_bytes()]);
    std::hint::black_box(sink);
    let n = lat.len() as u64;
    Ok((
        bytes as f64 / secs.max(1e-9),
        percentile(&mut lat, 50.0),
        percentile(&mut lat, 99.0),
        n,
    ))
}

pub(crate) fn bench_stream(quick: bool, smoke: bool, ferryd: Option<PathBuf>) -> Res<()> {
    let ferryd = ferryd.unwrap_or_else(|| me().with_file_name("ferryd"));
    let ms = run_millis(quick, smoke);
    let dir = std::env::temp_dir().join(format!("ferry-bench-stream-{}", std::process::id()));
    let (a, b) = two_hosts(&ferryd, &dir)?;
    let redis = start_redis(&["--appendonly".as_ref(), "no".as_ref()])?;
    let nats = crate::nats::start(&dir.join("nats"))?;
    let gib = (1u64 << 30) as f64;
    let sizes: &[(u64, &str)] = if smoke {
        &[(64 << 10, "64k"), (1 << 20, "1m")]
    } else {
        &[(64 << 10, "64k"), (1 << 20, "1m"), (9 << 20, "9m")]
    };
    for &(size, name) in sizes {
        // Throughput: every producer as fast as it can.
        let step = |what: &str| {
            if std::env::var_os("FERRY_BENCH_VERBOSE").is_some() {
                eprintln!("ferry-bench stream: {name}: {what}");
            }
        };
        step("ferry");
        let r = ferry_case(&a, &b, &format!("bench-{name}"), size, ms, 0)?;
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let ferry_bw = f("bytes") / f("secs").max(1e-9) / gib;
        step("tcp");
        let tcp = tcp_copy(size as usize, ms)? / gib;
        step("redis");
        let (rbw, ..) = redis_case(redis.port, size as usize, ms, 0)?;
        let rbw = rbw / gib;
        step("nats");
        let (nbw, ..) = crate::nats::case(nats.port, size as usize, ms, 0)?;
        let nbw = nbw / gib;
        // Delivery latency: the same offered load for all, paced to about
        // 0.1 GiB/s (half of what the slowest of them moved here), so that
        // it measures delivery, not a queue.
        let pace = (size as f64 / (0.1 * gib) * 1e6) as u64;
        step("ferry paced");
        let r = ferry_case(&a, &b, &format!("bench-{name}-paced"), size, ms * 2, pace)?;
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let (p50, p99) = (f("p50_ns") / 1000.0, f("p99_ns") / 1000.0);
        step("redis paced");
        let (_, r50, r99, _) = redis_case(redis.port, size as usize, ms * 2, pace)?;
        step("nats paced");
        let (_, n50, n99, _) = crate::nats::case(nats.port, size as usize, ms * 2, pace)?;
        emit_line(
            "stream",
            &format!("throughput_{name}_vs_nats"),
            "GiB/s",
            ferry_bw,
            "nats_jetstream",
            nbw,
            None,
        );
        emit_line(
            "stream",
            &format!("throughput_{name}"),
            "GiB/s",
            ferry_bw,
            "tcp_copy_loop",
            tcp,
            None,
        );
        emit_line(
            "stream",
            &format!("throughput_{name}_vs_redis"),
            "GiB/s",
            ferry_bw,
            "redis_streams",
            rbw,
            None,
        );
        for (pct, v, rv, nv) in [
            ("p50", p50, r50 as f64 / 1000.0, n50 as f64 / 1000.0),
            ("p99", p99, r99 as f64 / 1000.0, n99 as f64 / 1000.0),
        ] {
            emit_line(
                "stream",
                &format!("latency_{name}_{pct}_vs_nats"),
                "us",
                v,
                &format!("nats_jetstream_{pct}"),
                nv,
                None,
            );
            emit_line(
                "stream",
                &format!("latency_{name}_{pct}"),
                "us",
                v,
                &format!("redis_streams_{pct}"),
                rv,
                None,
            );
        }
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
