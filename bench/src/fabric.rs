//! `ferry-bench fabric`: the soft backend on loopback against a plain TCP
//! socket loop of the same sizes, in the same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_verbs::soft::{SoftDomain, SoftProvider};
use ferry_verbs::*;

use crate::{percentile, Res};

fn emit(case: &str, unit: &str, value: f64, baseline: &str, baseline_value: f64) {
    crate::emit_for("fabric", case, unit, value, baseline, baseline_value);
}

struct End {
    ep: <SoftDomain as Domain>::Ep,
    send_cq: Arc<<SoftDomain as Domain>::Cq>,
    recv_cq: Arc<<SoftDomain as Domain>::Cq>,
    mr: <SoftDomain as Domain>::Mr,
    _buf: Box<[u8]>,
    _dom: SoftDomain,
}

fn pair(size: usize) -> Res<(End, End)> {
    let p = SoftProvider::default();
    let cfg = EndpointConfig::default();
    let mk = || -> Res<_> {
        let dom = p.open("soft0")?;
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
            _buf: ba,
            _dom: da,
        },
        End {
            ep: eb?,
            send_cq: sb,
            recv_cq: rb,
            mr: mb,
            _buf: bb,
            _dom: db,
        },
    ))
}

fn wait<C: CompletionQueue>(cq: &C, out: &mut Vec<Completion>) -> Res<Completion> {
    let start = Instant::now();
    loop {
        out.clear();
        if cq.poll(out, 1) == 1 {
            if out[0].status != WcStatus::Success {
                return Err(format!("completion failed: {:?}", out[0]).into());
            }
            return Ok(out[0]);
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err("no completion in 30 s".into());
        }
        cq.wait(Duration::from_millis(10));
    }
}

/// One signalled write in this many.
const MODERATION: u64 = 8;

/// Write-with-immediate stream with `window` writes in flight; bytes per
/// second at the receiver. One thread drives both ends, taking every
/// completion available at each turn.
fn soft_bandwidth(size: usize, millis: u64) -> Res<f64> {
    let (a, b) = pair(size)?;
    let window = 32u64;
    for i in 0..window * 2 {
        // SAFETY: receives name no memory.
        unsafe { b.ep.post_recv(i, &[])? };
    }
    let sge = [a.mr.sge(0, size as u32)];
    let post = |i: u64| -> Res<()> {
        // SAFETY: a's buffer outlives the run; every write is waited for.
        unsafe {
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
            })?
        };
        Ok(())
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
                post(sent)?;
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

/// 8-byte write-with-immediate ping-pong; round-trip p50 and p99 in ns.
fn soft_rtt(millis: u64) -> Res<(u64, u64)> {
    let (a, b) = pair(64)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let (ra, rb) = ((a.mr.addr(), a.mr.rkey()), (b.mr.addr(), b.mr.rkey()));
    let echo = std::thread::spawn(move || -> std::result::Result<(), String> {
        let e = |e: VerbsError| e.to_string();
        let mut out = Vec::new();
        let sge = [b.mr.sge(0, 8)];
        // SAFETY: receives name no memory.
        unsafe { b.ep.post_recv(0, &[]).map_err(e)? };
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            out.clear();
            if b.recv_cq.poll(&mut out, 1) == 0 {
                b.recv_cq.wait(Duration::from_millis(10));
                continue;
            }
            // SAFETY: b's buffer outlives the run.
            unsafe {
                b.ep.post_recv(0, &[]).map_err(e)?;
                b.ep.post_send(&SendWr {
                    wr_id: 0,
                    op: SendOp::Write {
                        remote_addr: ra.0,
                        rkey: ra.1,
                        imm: Some(1),
                    },
                    sges: &sge,
                    signaled: false,
                })
                .map_err(e)?;
            }
        }
        Ok(())
    });
    let mut out = Vec::new();
    let sge = [a.mr.sge(0, 8)];
    let mut rtts = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(millis) || rtts.len() < 4 {
        // SAFETY: a's buffer outlives the run.
        unsafe {
            a.ep.post_recv(0, &[])?;
        }
        let t = Instant::now();
        // SAFETY: as above.
        unsafe {
            a.ep.post_send(&SendWr {
                wr_id: 0,
                op: SendOp::Write {
                    remote_addr: rb.0,
                    rkey: rb.1,
                    imm: Some(0),
                },
                sges: &sge,
                signaled: false,
            })?;
        }
        wait(&*a.recv_cq, &mut out)?;
        rtts.push(t.elapsed().as_nanos() as u64);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo.join().map_err(|_| "echo thread panicked")??;
    drop(a);
    Ok((percentile(&mut rtts, 50.0), percentile(&mut rtts, 99.0)))
}

/// 8-byte TCP ping-pong round trip p50 and p99 in ns.
fn tcp_rtt(millis: u64) -> Res<(u64, u64)> {
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
    Ok((percentile(&mut rtts, 50.0), percentile(&mut rtts, 99.0)))
}

pub fn bench_fabric(quick: bool, smoke: bool) -> Res<()> {
    let ms = if smoke {
        100
    } else if quick {
        1500
    } else {
        5000
    };
    let gib = (1u64 << 30) as f64;
    for (name, size) in [("64KiB", 64usize << 10), ("1MiB", 1 << 20)] {
        let soft = soft_bandwidth(size, ms)?;
        let tcp = tcp_bandwidth(size, ms)?;
        emit(
            &format!("soft_write_imm_bw_{name}"),
            "GiB/s",
            soft / gib,
            "tcp_copy_loop",
            tcp / gib,
        );
    }
    let (s50, s99) = soft_rtt(ms)?;
    let (t50, t99) = tcp_rtt(ms)?;
    emit(
        "soft_rtt_8B_p50",
        "us",
        s50 as f64 / 1000.0,
        "tcp_pingpong_rtt_p50",
        t50 as f64 / 1000.0,
    );
    emit(
        "soft_rtt_8B_p99",
        "us",
        s99 as f64 / 1000.0,
        "tcp_pingpong_rtt_p99",
        t99 as f64 / 1000.0,
    );
    Ok(())
}
