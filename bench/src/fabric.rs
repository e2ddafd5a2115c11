//! `ferry-bench fabric`: write-with-immediate bandwidth (64 KiB, 1 MiB) and
//! 8-byte latency through a fabric backend, each against a baseline in the
//! same run: for `soft`, a plain TCP socket loop on loopback; for `ibv`,
//! perftest's ib_write_bw / ib_write_lat on the same device (run it in the
//! rxe VM with scripts/bench-rxe.sh).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_verbs::ibv::IbvProvider;
use ferry_verbs::soft::SoftProvider;
use ferry_verbs::*;

use crate::cpu::{self, Cost};
use crate::{percentile, Res};

fn emit(case: &str, unit: &str, value: f64, baseline: &str, baseline_value: f64) {
    crate::emit_for("fabric", case, unit, value, baseline, baseline_value);
}

struct End<D: Domain> {
    ep: D::Ep,
    send_cq: Arc<D::Cq>,
    recv_cq: Arc<D::Cq>,
    mr: D::Mr,
    buf: Box<[u8]>,
    _dom: D,
}

impl<D: Domain> End<D> {
    /// The first 8 bytes of the registered buffer, as the peer last wrote
    /// them (a volatile read: the fabric writes this memory behind our back).
    fn word(&self) -> u64 {
        // SAFETY: the buffer holds at least 8 bytes and lives as long as
        // self; a volatile read of a plain byte array is always defined.
        u64::from_le_bytes(unsafe { std::ptr::read_volatile(self.buf.as_ptr() as *const [u8; 8]) })
    }
}

/// Two connected ends of one backend.
type Pair<D> = (End<D>, End<D>);

fn pair<P: Provider>(p: &P, device: &str, size: usize) -> Res<Pair<P::Domain>> {
    let cfg = EndpointConfig::default();
    let mk = || -> Res<_> {
        let dom = p.open(device)?;
        let send_cq = dom.create_cq(4096)?;
        let recv_cq = dom.create_cq(4096)?;
        let mut buf = vec![1u8; size].into_boxed_slice();
        // SAFETY: the buffer moves into the End beside its region and
        // outlives every operation of the benchmark.
        let mr = unsafe { dom.register(buf.as_mut_ptr(), size, access::ALL)? };
        let pending = dom.endpoint(&cfg, &send_cq, &recv_cq)?;
        Ok((dom, send_cq, recv_cq, mr, buf, pending))
    };
    let (da, sa, ra, ma, ba, pa) = mk()?;
    let (db, sb, rb, mb, bb, pb) = mk()?;
    let (ia, ib) = (pa.info(), pb.info());
    let (ea, eb) = std::thread::scope(|s| {
        let t = s.spawn(move || pa.connect(&ib));
        let eb = pb.connect(&ia);
        (t.join().expect("connect thread"), eb)
    });
    Ok((
        End {
            ep: ea?,
            send_cq: sa,
            recv_cq: ra,
            mr: ma,
            buf: ba,
            _dom: da,
        },
        End {
            ep: eb?,
            send_cq: sb,
            recv_cq: rb,
            mr: mb,
            buf: bb,
            _dom: db,
        },
    ))
}

/// One signalled write in this many.
const MODERATION: u64 = 8;

/// Write-with-immediate stream with `window` writes in flight; bytes per
/// second at the receiver. One thread drives both ends, taking every
/// completion available at each turn.
fn bandwidth<P: Provider>(p: &P, device: &str, size: usize, millis: u64) -> Res<f64> {
    let (a, b) = pair(p, device, size)?;
    let window = 32u64;
    for i in 0..window * 2 {
        // SAFETY: receives name no memory.
        unsafe { b.ep.post_recv(i, &[])? };
    }
    let sge = [a.mr.sge(0, size as u32)];
    let post = |i: u64| -> Res<()> {
        // SAFETY: a's buffer outlives the run; every write is waited for.
        let r: Result<()> = unsafe {
            a.ep.post_send(&SendWr {
                wr_id: i,
                op: SendOp::Write {
                    remote_addr: b.mr.addr(),
                    rkey: b.mr.rkey(),
                    imm: Some(i as u32),
                },
                sges: &sge,
                // Selective signalling, as perftest moderates its CQ.
                signaled: i % MODERATION == MODERATION - 1,
            })
        };
        r.map_err(|e| format!("write {i}: {e}").into())
    };
    for i in 0..window {
        post(i)?;
    }
    let (mut sent, mut received) = (window, 0u64);
    let mut out = Vec::with_capacity(64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    while start.elapsed() < Duration::from_millis(millis) || received < 4 {
        if Instant::now() > deadline {
            return Err("soft bandwidth run stalled".into());
        }
        out.clear();
        let got = b.recv_cq.poll(&mut out, 64);
        for c in &out {
            if c.status != WcStatus::Success {
                return Err(format!("receive failed: {c:?}").into());
            }
            // SAFETY: receives name no memory.
            unsafe { b.ep.post_recv(received + window * 2, &[])? };
            received += 1;
        }
        out.clear();
        let done = a.send_cq.poll(&mut out, 64);
        for c in &out {
            if c.status != WcStatus::Success {
                return Err(format!("write failed: {c:?}").into());
            }

            for _ in 0..MODERATION {
                post(sent).map_err(|e| {
                    format!("{e} (sent {sent}, received {received}, last completion {c:?})")
                })?;
                sent += 1;
            }
        }
        if got == 0 && done == 0 {
            // Signalled completions come once per MODERATION writes; the
            // receives they imply are ready by then (acks are sent after
            // the data landed).
            a.send_cq.wait(Duration::from_millis(1));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(received as f64 * size as f64 / secs)
}

fn tcp_pair() -> Res<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

/// A plain TCP copy loop of the same message size; bytes/second.
fn tcp_bandwidth(size: usize, millis: u64) -> Res<f64> {
    let (mut a, mut b) = tcp_pair()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let sender = std::thread::spawn(move || {
        let buf = vec![1u8; size];
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            if a.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; size];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_millis(millis) || n < 4 {
        b.read_exact(&mut buf)?;
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(b);
    let _ = sender.join();
    Ok(n as f64 * size as f64 / secs)
}

/// Spins (yielding) until `cq` has a completion; as perftest, no sleeping.
fn spin_next<C: CompletionQueue>(
    cq: &C,
    out: &mut Vec<Completion>,
    stop: &std::sync::atomic::AtomicBool,
) -> Option<Completion> {
    let mut spins = 0u32;
    loop {
        out.clear();
        if cq.poll(out, 1) == 1 {
            return Some(out[0]);
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) {
            // Let the backend's threads (soft) or the kernel's (rxe) run.
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// One signalled write in this many on the latency path (verbs frees send
/// queue slots of unsignalled work only through a later signalled one).
const LAT_SIGNAL_EVERY: u64 = 64;

/// 8-byte write-with-immediate ping-pong; round-trip p50 and p99 in ns.
fn rtt<P: Provider>(p: &P, device: &str, millis: u64) -> Res<(u64, u64, usize)>
where
    P::Domain: 'static,
{
    let (a, b) = pair(p, device, 64)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let (ra, rb) = ((a.mr.addr(), a.mr.rkey()), (b.mr.addr(), b.mr.rkey()));
    let echo = std::thread::spawn(move || -> std::result::Result<(), String> {
        let e = |e: VerbsError| e.to_string();
        let mut out = Vec::new();
        let mut sink = Vec::new();
        let sge = [b.mr.sge(0, 8)];
        // SAFETY: receives name no memory.
        unsafe { b.ep.post_recv(0, &[]).map_err(e)? };
        let mut n = 0u64;
        while let Some(c) = spin_next(&*b.recv_cq, &mut out, &st) {
            if c.status != WcStatus::Success {
                return Err(format!("echo receive: {c:?}"));
            }
            n += 1;
            // SAFETY: b's buffer outlives the run.
            unsafe {
                b.ep.post_recv(0, &[]).map_err(e)?;
                b.ep.post_send(&SendWr {
                    wr_id: n,
                    op: SendOp::Write {
                        remote_addr: ra.0,
                        rkey: ra.1,
                        imm: Some(1),
                    },
                    sges: &sge,
                    signaled: n.is_multiple_of(LAT_SIGNAL_EVERY),
                })
                .map_err(e)?;
            }
            sink.clear();
            b.send_cq.poll(&mut sink, 16);
        }
        Ok(())
    });
    let mut out = Vec::new();
    let mut sink = Vec::new();
    let sge = [a.mr.sge(0, 8)];
    let mut rtts = Vec::new();
    let never = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_millis(millis) || rtts.len() < 4 {
        i += 1;
        // SAFETY: receives name no memory.
        unsafe { a.ep.post_recv(0, &[])? };
        let t = Instant::now();
        // SAFETY: a's buffer outlives the run.
        unsafe {
            a.ep.post_send(&SendWr {
                wr_id: i,
                op: SendOp::Write {
                    remote_addr: rb.0,
                    rkey: rb.1,
                    imm: Some(0),
                },
                sges: &sge,
                signaled: i.is_multiple_of(LAT_SIGNAL_EVERY),
            })?;
        }
        let c = spin_next(&*a.recv_cq, &mut out, &never).expect("never stops");
        rtts.push(t.elapsed().as_nanos() as u64);
        if c.status != WcStatus::Success {
            return Err(format!("latency receive: {c:?}").into());
        }
        sink.clear();
        a.send_cq.poll(&mut sink, 16);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo.join().map_err(|_| "echo thread panicked")??;
    drop(a);
    let n = rtts.len();
    Ok((percentile(&mut rtts, 50.0), percentile(&mut rtts, 99.0), n))
}

/// 8-byte RDMA write ping-pong where each side polls its memory for the
/// peer's sequence number (what perftest's ib_write_lat does): round-trip
/// p50 in ns. No receives, no receive completions.
fn rtt_memory_poll<P: Provider>(p: &P, device: &str, millis: u64) -> Res<u64>
where
    P::Domain: 'static,
{
    let (mut a, mut b) = pair(p, device, 64)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let (ra, rb) = ((a.mr.addr(), a.mr.rkey()), (b.mr.addr(), b.mr.rkey()));
    let echo = std::thread::spawn(move || -> std::result::Result<(), String> {
        let mut sink = Vec::new();
        let mut seen = 0u64;
        let mut spins = 0u32;
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            let w = b.word();
            if w == seen {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) {
                    std::thread::yield_now();
                }
                continue;
            }
            seen = w;
            // Answer from a separate word so our own buffer stays readable.
            b.buf[8..16].copy_from_slice(&w.to_le_bytes());
            let sge = [b.mr.sge(8, 8)];
            // SAFETY: b's buffer outlives the run.
            unsafe {
                b.ep.post_send(&SendWr {
                    wr_id: w,
                    op: SendOp::Write {
                        remote_addr: ra.0,
                        rkey: ra.1,
                        imm: None,
                    },
                    sges: &sge,
                    signaled: w.is_multiple_of(LAT_SIGNAL_EVERY),
                })
                .map_err(|e| e.to_string())?;
            }
            sink.clear();
            b.send_cq.poll(&mut sink, 16);
        }
        Ok(())
    });
    let mut sink = Vec::new();
    let mut rtts = Vec::new();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_millis(millis) || rtts.len() < 4 {
        i += 1;
        a.buf[8..16].copy_from_slice(&i.to_le_bytes());
        let sge = [a.mr.sge(8, 8)];
        let t = Instant::now();
        // SAFETY: a's buffer outlives the run.
        unsafe {
            a.ep.post_send(&SendWr {
                wr_id: i,
                op: SendOp::Write {
                    remote_addr: rb.0,
                    rkey: rb.1,
                    imm: None,
                },
                sges: &sge,
                signaled: i.is_multiple_of(LAT_SIGNAL_EVERY),
            })?;
        }
        let mut spins = 0u32;
        while a.word() != i {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err("memory-poll ping-pong stalled".into());
            }
        }
        rtts.push(t.elapsed().as_nanos() as u64);
        sink.clear();
        a.send_cq.poll(&mut sink, 16);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo.join().map_err(|_| "echo thread panicked")??;
    Ok(percentile(&mut rtts, 50.0))
}

/// 8-byte TCP ping-pong round trip p50 and p99 in ns, and round trips.
fn tcp_rtt(millis: u64) -> Res<(u64, u64, usize)> {
    let (mut a, mut b) = tcp_pair()?;
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 8];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 8];
    let mut rtts = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(millis) || rtts.len() < 4 {
        let t = Instant::now();
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
        rtts.push(t.elapsed().as_nanos() as u64);
    }
    drop(a);
    let _ = echo.join();
    let n = rtts.len();
    Ok((percentile(&mut rtts, 50.0), percentile(&mut rtts, 99.0), n))
}

/// Runs perftest's `tool` as server and client on `device` and returns the
/// client's result line split in columns.
fn perftest(
    tool: &str,
    device: &str,
    gid_index: u32,
    host: &str,
    args: &[String],
) -> Res<Vec<f64>> {
    use std::process::{Command, Stdio};
    let common: Vec<String> = ["-d", device, "-x", &gid_index.to_string(), "-F"]
        .iter()
        .map(|s| s.to_string())
        .chain(args.iter().cloned())
        .collect();
    let mut server = Command::new(tool)
        .args(&common)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {tool} (install perftest): {e}"))?;
    std::thread::sleep(Duration::from_millis(1500));
    let out = Command::new(tool).args(&common).arg(host).output()?;
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    // The result line is the first line after the "#bytes" header.
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("#bytes"));
    lines.next();
    let row = lines
        .next()
        .ok_or_else(|| format!("{tool} printed no result:\n{text}"))?;
    row.split_whitespace()
        .map(|c| {
            c.parse::<f64>()
                .map_err(|e| format!("{tool}: {e} in {row:?}").into())
        })
        .collect()
}

/// Runs `f` and returns its result with the CPU it cost this process (the
/// fabric cases run in threads of this process, the soft backend's
/// included), over `f`'s (bytes, operations).
fn costed<T>(f: impl FnOnce() -> Res<(T, f64, f64)>) -> Res<(T, Cost)> {
    let cpu0 = cpu::used_s();
    let (v, bytes, ops) = f()?;
    let mut c = Cost::since(cpu0, ops, 0.0);
    c.bytes = bytes;
    Ok((v, c))
}

fn bench_soft(ms: u64) -> Res<()> {
    let p = SoftProvider::default();
    let gib = (1u64 << 30) as f64;
    let secs = ms as f64 / 1000.0;
    for (name, size) in [("64KiB", 64usize << 10), ("1MiB", 1 << 20)] {
        let per = |bps: f64| (bps, bps * secs, bps * secs / size as f64);
        let (soft, soft_cost) = costed(|| bandwidth(&p, "soft0", size, ms).map(per))?;
        let (tcp, tcp_cost) = costed(|| tcp_bandwidth(size, ms).map(per))?;
        crate::emit_line(
            "fabric",
            &format!("soft_write_imm_bw_{name}"),
            "GiB/s",
            soft / gib,
            "tcp_copy_loop",
            tcp / gib,
            Some((soft_cost, tcp_cost)),
        );
    }
    let with_ops = |r: (u64, u64, usize)| ((r.0, r.1), 16.0 * r.2 as f64, 2.0 * r.2 as f64);
    let ((s50, s99), soft_cost) = costed(|| rtt(&p, "soft0", ms).map(with_ops))?;
    let ((t50, t99), tcp_cost) = costed(|| tcp_rtt(ms).map(with_ops))?;
    for (pct, s, t) in [("p50", s50, t50), ("p99", s99, t99)] {
        crate::emit_line(
            "fabric",
            &format!("soft_rtt_8B_{pct}"),
            "us",
            s as f64 / 1000.0,
            &format!("tcp_pingpong_rtt_{pct}"),
            t as f64 / 1000.0,
            Some((soft_cost, tcp_cost)),
        );
    }
    Ok(())
}

fn bench_ibv(ms: u64, device: &str, gid_index: u32, host: &str) -> Res<()> {
    let p = IbvProvider;
    let gib = (1u64 << 30) as f64;
    for (name, size) in [("64KiB", 64usize << 10), ("1MiB", 1 << 20)] {
        let ours =
            bandwidth(&p, device, size, ms).map_err(|e| format!("ibv bandwidth {name}: {e}"))?;
        // Iteration mode (duration mode completes nothing at emulated
        // speed with large messages): about 32 MiB per case, 32 in flight
        // like our window.
        let iters = ((32usize << 20) / size).max(64);
        let cols = perftest(
            "ib_write_bw",
            device,
            gid_index,
            host,
            &[
                "-s".into(),
                size.to_string(),
                "-n".into(),
                iters.to_string(),
                "-t".into(),
                "32".into(),
                "--report_gbits".into(),
            ],
        )?;
        // #bytes #iterations BW-peak BW-average[Gb/sec] MsgRate
        let perf = cols
            .get(3)
            .copied()
            .ok_or("ib_write_bw: no average column")?
            * 1e9
            / 8.0;
        if perf <= 0.0 {
            return Err(format!("ib_write_bw reported no bandwidth for {name}: {cols:?}").into());
        }
        emit(
            &format!("ibv_write_imm_bw_{name}"),
            "GiB/s",
            ours / gib,
            "perftest_ib_write_bw",
            perf / gib,
        );
    }
    let (r50, _, _) = rtt(&p, device, ms).map_err(|e| format!("ibv latency: {e}"))?;
    let cols = perftest(
        "ib_write_lat",
        device,
        gid_index,
        host,
        &["-s".into(), "8".into(), "-n".into(), "2000".into()],
    )?;
    // #bytes #iterations t_min t_max t_typical ...; perftest reports one way.
    let typical = cols
        .get(4)
        .copied()
        .ok_or("ib_write_lat: no t_typical column")?;
    emit(
        "ibv_lat_8B_p50_oneway",
        "us",
        r50 as f64 / 2000.0,
        "perftest_ib_write_lat_typical",
        typical,
    );
    let m50 =
        rtt_memory_poll(&p, device, ms).map_err(|e| format!("ibv memory-poll latency: {e}"))?;
    emit(
        "ibv_write_lat_8B_p50_oneway_memory_poll",
        "us",
        m50 as f64 / 2000.0,
        "perftest_ib_write_lat_typical",
        typical,
    );
    Ok(())
}

pub fn bench_fabric(
    provider: &str,
    device: &str,
    gid_index: u32,
    host: &str,
    quick: bool,
    smoke: bool,
) -> Res<()> {
    let ms = crate::run_millis(quick, smoke);
    match provider {
        "soft" => bench_soft(ms),
        "ibv" => bench_ibv(ms, device, gid_index, host),
        other => Err(format!("unknown provider {other:?} (soft or ibv)").into()),
    }
}
