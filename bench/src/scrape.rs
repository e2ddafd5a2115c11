//! `ferry-bench scrape`: what reading `/metrics` costs the data plane. The
//! local hand-off (a sleeping consumer, ferryd at its defaults) and 1 MiB
//! throughput, each with ferryd's admin endpoint on, once scraped every
//! second (as Prometheus does at its most eager settings), once every 10 ms
//! (abuse: a hundred times that), once not at all: the baseline. Rounds in
//! turn, medians. Also the scrape's own time against a `/live` request
//! (which does not reach the loop): the snapshot and its encoding.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{emit_for, ferry_case, me, round3, Res, Run};

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One GET; its duration.
fn get(addr: &str, path: &str) -> Option<Duration> {
    let t = Instant::now();
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    c.read_to_end(&mut out).ok()?;
    out.starts_with(b"HTTP/1.1 200").then(|| t.elapsed())
}

/// Scrapes `addr` every `every` until stopped; how many scrapes answered.
fn scraper(addr: String, every: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            if get(&addr, "/metrics").is_some() {
                n += 1;
            } else {
                // Not up yet: try again soon.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let until = Instant::now() + every;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5).min(every));
            }
        }
        n
    })
}

/// One sample's value from a fresh scrape of `addr`.
fn last_sample(addr: &str, name: &str) -> Option<f64> {
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn bench_scrape(quick: bool, smoke: bool, ferryd: Option<PathBuf>) -> Res<()> {
    let ferryd = ferryd.unwrap_or_else(|| me().with_file_name("ferryd"));
    let (ms, rounds) = if smoke {
        (200, 1)
    } else if quick {
        (3000, 3)
    } else {
        (6000, 5)
    };
    let spin = crate::env_u64("FERRY_BENCH_DAEMON_SPIN_US", 100);
    let gib = (1u64 << 30) as f64;
    // (case, run, what is measured)
    let handoff = Run {
        stream: "scrape-handoff",
        batch: 64,
        millis: ms,
        slots: 2,
        spin_us: 0,
        prefetch: 1,
        pace_us: crate::env_u64("FERRY_BENCH_PACE_US", 100),
    };
    let tput = Run {
        stream: "scrape-tput",
        batch: 1 << 20,
        millis: ms,
        slots: 32,
        spin_us: ferry::client::DEFAULT_SPIN_US,
        prefetch: 8,
        pace_us: 0,
    };
    let modes: [(&str, Option<Duration>); 3] = [
        ("unscraped", None),
        ("scraped_1s", Some(Duration::from_secs(1))),
        ("scraped_10ms", Some(Duration::from_millis(10))),
    ];
    // Per mode: hand-off p50 and p99 (us), throughput (GiB/s), scrapes.
    let mut p50 = vec![Vec::new(); modes.len()];
    let mut p99 = vec![Vec::new(); modes.len()];
    let mut gbs = vec![Vec::new(); modes.len()];
    let mut scrapes = vec![0u64; modes.len()];
    let (mut scrape_ms, mut live_ms) = (Vec::new(), Vec::new());
    let loop_us: f64;
    for round in 0..rounds {
        for k in 0..modes.len() {
            // Each round in another order, so no mode always goes first.
            let m = (k + round) % modes.len();
            for run in [&handoff, &tput] {
                let port = free_port()?;
                let addr = format!("127.0.0.1:{port}");
                let extra = format!("\n[admin]\nhttp = \"{addr}\"\n");
                let stop = Arc::new(AtomicBool::new(false));
                let s = modes[m]
                    .1
                    .map(|every| scraper(addr.clone(), every, stop.clone()));
                let (r, _) = ferry_case(Path::new(&ferryd), spin, &extra, run)?;
                stop.store(true, Ordering::Relaxed);
                if let Some(s) = s {
                    scrapes[m] += s.join().unwrap_or(0);
                }
                if run.batch == 64 {
                    p50[m].push(r["p50_ns"].as_f64().unwrap_or(0.0) / 1000.0);
                    p99[m].push(r["p99_ns"].as_f64().unwrap_or(0.0) / 1000.0);
                } else {
                    gbs[m].push(crate::rate(&r) / gib);
                }
            }
        }
    }
    // The scrape itself, against a request that does not reach the loop.
    {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        // 16 streams of 8 partitions: what the snapshot walks.
        let mut cfg = format!("\n[admin]\nhttp = \"{addr}\"\n");
        for i in 0..16 {
            cfg.push_str(&format!(
                "[[streams]]\nname = \"s{i}\"\npartitions = 8\nslot_size = 4096\nslot_count = 64\n"
            ));
        }
        let d = crate::start_daemon(Path::new(&ferryd), spin, &cfg)?;
        let n = if smoke { 5 } else { 200 };
        for _ in 0..n {
            if let Some(t) = get(&addr, "/metrics") {
                scrape_ms.push(t.as_secs_f64() * 1e3);
            }
            if let Some(t) = get(&addr, "/live") {
                live_ms.push(t.as_secs_f64() * 1e3);
            }
        }
        loop_us = last_sample(&addr, "ferry_daemon_snapshot_seconds_total")
            .zip(last_sample(&addr, "ferry_daemon_snapshots_total"))
            .map(|(s, n)| s * 1e6 / n.max(1.0))
            .unwrap_or(0.0);
        drop(d);
    }
    for m in 1..modes.len() {
        let name = modes[m].0;
        emit_for(
            "scrape",
            &format!("handoff_sleeping_p50_{name}"),
            "us",
            median(&mut p50[m]),
            "handoff_sleeping_p50_unscraped",
            median(&mut p50[0].clone()),
        );
        emit_for(
            "scrape",
            &format!("handoff_sleeping_p99_{name}"),
            "us",
            median(&mut p99[m]),
            "handoff_sleeping_p99_unscraped",
            median(&mut p99[0].clone()),
        );
        emit_for(
            "scrape",
            &format!("throughput_1MiB_{name}"),
            "GiB/s",
            median(&mut gbs[m]),
            "throughput_1MiB_unscraped",
            median(&mut gbs[0].clone()),
        );
        eprintln!(
            "scrape: {name}: {} scrapes answered during the runs",
            scrapes[m]
        );
    }
    // The loop's own share of a scrape (16 streams of 8 partitions),
    // against one local hand-off.
    emit_for(
        "scrape",
        "loop_us_per_scrape",
        "us",
        round3(loop_us),
        "handoff_sleeping_p50_unscraped",
        median(&mut p50[0].clone()),
    );
    emit_for(
        "scrape",
        "metrics_request_ms",
        "ms",
        round3(median(&mut scrape_ms)),
        "live_request_ms",
        round3(median(&mut live_ms)),
    );
    Ok(())
}
