//! `ferry-bench log`: publishing into a disk stream under each fsync
//! policy, and replaying it from disk. Baselines in the same run, on the
//! same file system: a raw sequential write loop of the same batches with
//! the same fsync cadence (the physical limit), Redis Streams with its
//! append-only file (`appendfsync always` / `everysec` / `no`, the peer a
//! user would pick; `redis-server`, started here), and a raw sequential
//! read of the log's own segment files.
//!
//! The cadences paired: `fsync = "every"` with an fdatasync after each
//! batch (and Redis `always`); `fsync = "interval"` (1000 ms) with one
//! fdatasync a second (and Redis `everysec`); `"never"` with no sync (and
//! Redis `no`). Ferry's `every` shares one fdatasync among the publishes
//! that arrive while the previous one runs (group commit), so it can pass
//! the one-sync-per-batch loop.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry::{Client, ConsumerOptions, GroupStart, StreamSpec};
use ferry_shm::proto::{Durability, Fsync};

use crate::stream::{start_redis, Resp};
use crate::{emit_line, me, run_millis, start_daemon, touch, Res};

/// Each stream keeps at most this much per partition (retention), and the
/// raw loop starts a new file at this size, so a run does not fill the disk.
const KEEP: u64 = 512 << 20;
const SEGMENT: u64 = 64 << 20;

/// How often the raw loop syncs.
#[derive(Clone, Copy)]
enum Cadence {
    EachWrite,
    Every(Duration),
    Never,
}

/// Publishes `size`-byte batches into a new disk stream for `millis`,
/// then waits for all to be acknowledged. Bytes per second.
fn ferry_publish(client: &Client, stream: &str, size: u64, fsync: Fsync, millis: u64) -> Res<f64> {
    let spec = StreamSpec {
        partitions: 1,
        slot_size: size,
        slot_count: 64,
        durability: Durability {
            disk: true,
            fsync,
            retention_bytes: KEEP,
            ..Durability::MEMORY
        },
    };
    let mut p = client.producer(stream, Some(spec))?;
    let data = vec![7u8; size as usize];
    let t = Some(Duration::from_secs(30));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_millis(millis) {
        p.send(&data, &n.to_le_bytes(), None, t)?;
        n += 1;
    }
    let flushing = Instant::now();
    p.flush(t)?;
    // Counted to the last acknowledgement, less, for "interval", the wait
    // for the last group commit (up to one interval, by design).
    let mut secs = start.elapsed().as_secs_f64();
    if let Fsync::IntervalMs(ms) = fsync {
        secs -= flushing.elapsed().as_secs_f64().min(ms as f64 / 1000.0);
    }
    Ok(n as f64 * size as f64 / secs)
}

/// The same batches written to a file in a loop, synced as `cadence` says.
fn raw_write(dir: &Path, size: u64, cadence: Cadence, millis: u64) -> Res<f64> {
    let path = dir.join("raw.log");
    let mut f = File::create(&path)?;
    let data = vec![7u8; size as usize];
    let start = Instant::now();
    let mut last_sync = start;
    let (mut n, mut in_file) = (0u64, 0u64);
    while start.elapsed() < Duration::from_millis(millis) {
        f.write_all(&data)?;
        n += 1;
        in_file += size;
        match cadence {
            Cadence::EachWrite => f.sync_data()?,
            Cadence::Every(d) if last_sync.elapsed() >= d => {
                f.sync_data()?;
                last_sync = Instant::now();
            }
            _ => {}
        }
        if in_file >= KEEP {
            f = File::create(&path)?;
            in_file = 0;
        }
    }
    if !matches!(cadence, Cadence::Never) {
        f.sync_data()?;
    }
    let secs = start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(n as f64 * size as f64 / secs)
}

/// Redis Streams with its append-only file: XADD of `size`-byte entries,
/// 16 in flight, for `millis`. Bytes per second.
fn redis_aof(dir: &Path, size: u64, appendfsync: &str, millis: u64) -> Res<f64> {
    let rdir = dir.join(format!("redis-{appendfsync}"));
    std::fs::create_dir_all(&rdir)?;
    let server = start_redis(&[
        "--appendonly".as_ref(),
        "yes".as_ref(),
        "--appendfsync".as_ref(),
        appendfsync.as_ref(),
        "--dir".as_ref(),
        rdir.as_os_str(),
    ])?;
    let mut c = Resp::connect(server.port)?;
    let data = vec![7u8; size as usize];
    // Trimmed so that the server's memory stays small; the AOF has every
    // entry.
    let cap = (KEEP / size).max(16).to_string();
    let add = |c: &mut Resp| {
        c.send(&[
            b"XADD",
            b"bench",
            b"MAXLEN",
            b"~",
            cap.as_bytes(),
            b"*",
            b"d",
            &data,
        ])
    };
    let start = Instant::now();
    let (mut sent, mut done) = (0u64, 0u64);
    while start.elapsed() < Duration::from_millis(millis) {
        while sent - done < 16 {
            add(&mut c)?;
            sent += 1;
        }
        c.reply()?;
        done += 1;
    }
    while done < sent {
        c.reply()?;
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(server);
    let _ = std::fs::remove_dir_all(&rdir);
    Ok(done as f64 * size as f64 / secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Writes back every dirty page.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Empties the page cache (root only): the replays then read the disk.
fn drop_caches() -> bool {
    settle();
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

/// Reads every batch of `stream` from its start with a new group,
/// touching each byte. Bytes per second.
fn ferry_replay(client: &Client, stream: &str, group: &str) -> Res<(f64, u64)> {
    let mut c = client.consumer(
        stream,
        group,
        ConsumerOptions {
            start: GroupStart::Earliest,
            prefetch: 16,
            ..ConsumerOptions::default()
        },
    )?;
    let (mut bytes, mut sink) = (0u64, 0u64);
    let start = Instant::now();
    let mut last = start;
    loop {
        match c.next(Some(Duration::from_millis(500))) {
            Ok(b) => {
                // SAFETY: ours until released just below.
                sink = sink.wrapping_add(touch(unsafe { b.data() }));
                bytes += b.len;
                last = Instant::now();
                c.release(b.token)?;
            }
            Err(e) if e.status == ferry::Status::Timeout => break,
            Err(e) => return Err(e.into()),
        }
    }
    std::hint::black_box(sink);
    Ok((bytes as f64 / (last - start).as_secs_f64().max(1e-9), bytes))
}

/// Reads the files under `dir` (the log's segments) sequentially, 1 MiB at
/// a time, touching each byte. Bytes per second.
fn raw_read(dir: &Path) -> Res<f64> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut sink) = (0u64, 0u64);
    let start = Instant::now();
    for p in files {
        let mut f = File::open(p)?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            sink = sink.wrapping_add(touch(&buf[..n]));
            bytes += n as u64;
        }
    }
    std::hint::black_box(sink);
    Ok(bytes as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

pub(crate) fn bench_log(
    quick: bool,
    smoke: bool,
    ferryd: Option<PathBuf>,
    only: Option<&str>,
) -> Res<()> {
    let ferryd = ferryd.unwrap_or_else(|| me().with_file_name("ferryd"));
    let ms = run_millis(quick, smoke);
    let rounds = if smoke {
        1
    } else if quick {
        2
    } else {
        3
    };
    let dir = std::env::temp_dir().join(format!("ferry-bench-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("data");
    let d = start_daemon(
        &ferryd,
        50,
        &format!(
            "data_dir = \"{}\"\nsegment_bytes = {SEGMENT}",
            data.display()
        ),
    )?;
    let client = Client::connect(Some(&d.socket))?;
    let admin = ferry_admin::Client::new(ferry_admin::admin_path_for(&d.socket));
    let gib = (1u64 << 30) as f64;
    let policies = [
        ("every", Fsync::Every, Cadence::EachWrite, "always"),
        (
            "interval",
            Fsync::IntervalMs(1000),
            Cadence::Every(Duration::from_secs(1)),
            "everysec",
        ),
        ("never", Fsync::Never, Cadence::Never, "no"),
    ];
    let res = (|| -> Res<()> {
        for (size, name) in [(64u64 << 10, "64k"), (1 << 20, "1m")] {
            for (policy, fsync, cadence, redis) in policies {
                if only.is_some_and(|o| o != policy) {
                    continue;
                }
                let stream = format!("log-{name}-{policy}");
                // The disks of these machines are shared and noisy: a few
                // rounds in turn, the median of each. Each measurement
                // starts with no dirty pages left by the one before (the
                // kernel would throttle it for them).
                let (mut fs, mut raws, mut rs) = (Vec::new(), Vec::new(), Vec::new());
                for round in 0..rounds {
                    let name = format!("{stream}-{round}");
                    let keep = round == 0 && policy == "never"; // replayed below
                    let mut ferry = || -> Res<()> {
                        settle();
                        fs.push(ferry_publish(&client, &name, size, fsync, ms)? / gib);
                        if !keep {
                            admin.delete_stream(&name, true)?;
                        }
                        Ok(())
                    };
                    let mut raw = || -> Res<()> {
                        settle();
                        raws.push(raw_write(&dir, size, cadence, ms)? / gib);
                        Ok(())
                    };
                    if round % 2 == 0 {
                        ferry()?;
                        raw()?;
                    } else {
                        raw()?;
                        ferry()?;
                    }
                    settle();
                    rs.push(redis_aof(&dir, size, redis, ms)? / gib);
                }
                let (f, raw, r) = (median(&mut fs), median(&mut raws), median(&mut rs));
                let case = format!("publish_{name}_fsync_{policy}");
                emit_line(
                    "log",
                    &case,
                    "GiB/s",
                    f,
                    &format!("raw_write_{policy}"),
                    raw,
                    None,
                );
                emit_line(
                    "log",
                    &format!("{case}_vs_redis"),
                    "GiB/s",
                    f,
                    &format!("redis_aof_{redis}"),
                    r,
                    None,
                );
            }
            if only.is_some_and(|o| o != "never") {
                continue;
            }
            // Replay what the last run wrote, from disk when the page
            // cache can be emptied.
            let stream = format!("log-{name}-never-0");
            // Then again from the page cache (what ferryd itself costs).
            let cold = drop_caches();
            let part = data.join("streams").join(&stream).join("p0");
            for (group, cold) in [("replay", cold), ("replay-warm", false)] {
                let (f, bytes) = ferry_replay(&client, &stream, group)?;
                if cold {
                    drop_caches();
                }
                let raw = raw_read(&part)?;
                let case = format!("replay_{name}_{}", if cold { "cold" } else { "warm" });
                if bytes == 0 {
                    return Err(format!("{case}: nothing was replayed").into());
                }
                emit_line(
                    "log",
                    &case,
                    "GiB/s",
                    f / gib,
                    if cold {
                        "raw_sequential_read"
                    } else {
                        "raw_sequential_read_warm"
                    },
                    raw / gib,
                    None,
                );
            }
            admin.delete_stream(&stream, true)?;
        }
        Ok(())
    })();
    drop(client);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
    res
}
