//! Disk streams against a real ferryd: acknowledged batches survive
//! `kill -9` under each fsync policy, torn tails are cut at recovery,
//! groups resume at their committed offsets, replays past the pool come
//! from disk byte for byte, retention deletes whole segments (and keeps
//! what a group has not committed), and a full disk stalls producers with
//! a clear error while nothing acknowledged is lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry::{ConsumerOptions, GroupStart, Status, StreamSpec};
use ferry_shm::proto::{Durability, Fsync};
use ferry_tests::{delete_group, epochs_seen, eventually, Daemon};

const T: Option<Duration> = Some(Duration::from_secs(10));

fn disk(partitions: u32, slots: u32, slot_size: u64, fsync: Fsync) -> Option<StreamSpec> {
    Some(StreamSpec {
        partitions,
        slot_size,
        slot_count: slots,
        durability: Durability {
            disk: true,
            fsync,
            ..Durability::MEMORY
        },
    })
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn data_dir(d: &Daemon) -> PathBuf {
    d.dir.join("data")
}

/// A daemon whose data directory is `<its dir>/data`.
fn daemon(keys: &str) -> Daemon {
    let mut d = Daemon::start(keys, "");
    let cfg = d.dir.join("ferryd.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[daemon]\n",
        &format!("[daemon]\ndata_dir = \"{}\"\n", data_dir(&d).display()),
    );
    std::fs::write(&cfg, text).unwrap();
    d.restart();
    d
}

/// Reads every batch the consumer has until none comes for `quiet`:
/// (partition, offset, meta, payload).
fn drain(c: &mut ferry::Consumer, quiet: Duration) -> Vec<(u32, u64, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        match c.next(Some(quiet)) {
            Ok(b) => {
                // SAFETY: the batch is ours until released just below.
                let (meta, data) = unsafe { (b.meta().to_vec(), b.data().to_vec()) };
                out.push((b.partition, b.offset, meta, data));
                c.release(b.token).unwrap();
            }
            Err(e) if e.status == Status::Timeout => return out,
            Err(e) if e.status == Status::EndOfEpoch => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Checks batches read back: each is one that was sent (its metadata names
/// it, its bytes match), offsets rise by one per partition from `from`.
fn check_batches(
    got: &[(u32, u64, Vec<u8>, Vec<u8>)],
    len: usize,
    from: &BTreeMap<u32, u64>,
) -> Vec<u64> {
    let mut next = from.clone();
    let mut ids = Vec::new();
    for (p, o, meta, data) in got {
        let want = next.entry(*p).or_insert(*o);
        assert_eq!(*o, *want, "partition {p}: offsets in order, none missing");
        *want += 1;
        let id = u64::from_le_bytes(meta[..8].try_into().unwrap());
        assert_eq!(data, &payload(id, len), "bytes of batch {id} intact");
        ids.push(id);
    }
    ids
}

/// How many partition checkpoints there are under `dir`.
fn checkpoints(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                checkpoints(&p)
            } else {
                (p.file_name() == Some("checkpoint".as_ref())) as usize
            }
        })
        .sum()
}

fn earliest() -> ConsumerOptions {
    ConsumerOptions {
        start: GroupStart::Earliest,
        ..ConsumerOptions::default()
    }
}

#[test]
fn acknowledged_batches_survive_kill_9_under_each_fsync_policy() {
    for fsync in [Fsync::Every, Fsync::IntervalMs(20), Fsync::Never] {
        let mut d = daemon("");
        let client = d.client();
        let mut p = client.producer("s", disk(2, 16, 4096, fsync)).unwrap();
        // No group yet: the first group to form gets everything.
        let len = 3000;
        for i in 0..300u64 {
            p.send(&payload(i, len), &i.to_le_bytes(), None, T).unwrap();
            if i == 199 {
                p.flush(T).unwrap();
                assert_eq!(p.acked(), (200, 200));
            }
        }
        // 100 more on their way, some acknowledged by now, some not.
        let (_, acked) = p.acked();
        // A policy that syncs leaves checkpoints (stored after a sync) for
        // recovery to start its scan at.
        let syncs = fsync != Fsync::Never;
        if syncs {
            assert!(
                ferry_tests::eventually(Duration::from_secs(5), || checkpoints(&data_dir(&d)) == 2),
                "{fsync:?}: a checkpoint per partition"
            );
        }
        d.kill();
        drop(p);
        drop(client);
        d.restart();
        assert!(d.log().contains("disk stream opened"), "{}", d.log());
        // `ferry status` shows the policy the stream was reopened with.
        let st = d.status();
        let disk = st.streams[0].disk.as_ref().expect("a disk stream");
        let want = match fsync {
            Fsync::Every => "fsync=every",
            Fsync::IntervalMs(_) => "fsync=interval(20 ms)",
            Fsync::Never => "fsync=never",
        };
        assert_eq!(disk.settings, want);
        assert_eq!(
            d.log()
                .matches("scanning the active segment from its checkpoint")
                .count(),
            if syncs { 2 } else { 0 },
            "{fsync:?}\n{}",
            d.log()
        );
        let client = d.client();
        let mut c = client
            .consumer("s", "g", ConsumerOptions::default())
            .unwrap();
        let got = drain(&mut c, Duration::from_millis(1500));
        let ids = check_batches(&got, len, &BTreeMap::from([(0, 0), (1, 0)]));
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        // Every acknowledged batch is there (the producer's publishes are
        // acknowledged in order), and nothing that was never sent.
        for i in 0..acked.max(200) {
            assert!(
                sorted.binary_search(&i).is_ok(),
                "{fsync:?}: acknowledged batch {i} is lost ({} back)",
                ids.len()
            );
        }
        assert!(sorted.iter().all(|&i| i < 300));
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "no batch twice");
    }
}

#[test]
fn groups_resume_at_their_commits_and_replays_past_the_pool_come_from_disk() {
    let mut d = daemon("offsets_flush_ms = 20");
    let client = d.client();
    let len = 2000;
    // 8 slots, 100 batches: most of the stream lives on disk only.
    let mut p = client
        .producer("s", disk(1, 8, 4096, Fsync::Every))
        .unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    for i in 0..100u64 {
        p.send(&payload(i, len), &i.to_le_bytes(), None, T).unwrap();
    }
    p.flush(T).unwrap();
    let mut first = Vec::new();
    while first.len() < 60 {
        let b = c.next(T).unwrap();
        // SAFETY: ours until released.
        first.push((
            b.partition,
            b.offset,
            unsafe { b.meta().to_vec() },
            unsafe { b.data().to_vec() },
        ));
        c.release(b.token).unwrap();
    }
    c.commit().unwrap();
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    d.kill();
    drop(p);
    drop(client);
    d.restart();
    let client = d.client();
    // The group goes on from its commit.
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    let rest = drain(&mut c, Duration::from_millis(1000));
    assert_eq!(
        rest.first().map(|b| b.1),
        Some(60),
        "resumes at the committed offset"
    );
    check_batches(&rest, len, &BTreeMap::from([(0, 60)]));
    assert_eq!(rest.len(), 40);
    // A new group replays everything from disk, the same bytes.
    let mut r = client.consumer("s", "replay", earliest()).unwrap();
    let all = drain(&mut r, Duration::from_millis(1000));
    assert_eq!(all.len(), 100);
    assert_eq!(
        &all[..60],
        &first[..],
        "a replay returns what was read the first time"
    );
    // And a seek back to a range long gone from the pool.
    r.seek(0, 10).unwrap();
    let again = drain(&mut r, Duration::from_millis(1000));
    assert_eq!(again.first().map(|b| b.1), Some(10));
    assert_eq!(&again[..], &all[10..]);
}

fn last_segment(dir: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v.pop().unwrap()
}

#[test]
fn a_torn_tail_is_cut_at_recovery_and_reported_never_served() {
    let mut d = daemon("");
    let client = d.client();
    let len = 1000;
    let mut p = client
        .producer("s", disk(1, 8, 4096, Fsync::Every))
        .unwrap();
    for i in 0..20u64 {
        p.send(&payload(i, len), &i.to_le_bytes(), None, T).unwrap();
    }
    p.flush(T).unwrap();
    d.kill();
    drop(p);
    drop(client);
    // Tear the last record (as a crash in the middle of its write would)
    // and damage the one before it.
    let seg = last_segment(&data_dir(&d).join("streams/s/p0"));
    let size = std::fs::metadata(&seg).unwrap().len();
    let rec = 40 + 8 + len as u64;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(size - 100).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"XX", size - rec - 50).unwrap();
    d.restart();
    let log = d.log();
    assert!(log.contains("dropping a torn or corrupt tail"), "{log}");
    let client = d.client();
    let mut c = client.consumer("s", "g", earliest()).unwrap();
    let got = drain(&mut c, Duration::from_millis(1000));
    let ids = check_batches(&got, len, &BTreeMap::from([(0, 0)]));
    assert_eq!(
        ids,
        (0..18).collect::<Vec<u64>>(),
        "everything before the damage, nothing after"
    );
    // The log goes on after the cut.
    let mut p = client.producer("s", None).unwrap();
    p.send(&payload(18, len), &18u64.to_le_bytes(), None, T)
        .unwrap();
    p.flush(T).unwrap();
    let more = drain(&mut c, Duration::from_millis(1000));
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].1, 18);
}

#[test]
fn retention_deletes_whole_segments_keeps_uncommitted_ones_and_seeks_below_it_are_told() {
    let d = daemon("segment_bytes = 4096");
    let client = d.client();
    let len = 1000;
    let mut spec = disk(1, 8, 2048, Fsync::Never).unwrap();
    spec.durability.retention_bytes = 8192;
    let mut p = client.producer("s", Some(spec.clone())).unwrap();
    // A second stream whose group holds everything back (retention keeps
    // what a live group has not committed).
    let mut p2 = client.producer("k", Some(spec)).unwrap();
    // It never reads: with a prefetch below the pool, the pool still has
    // slots to cache through (what a member holds cannot leave memory).
    let _slow = client
        .consumer(
            "k",
            "slow",
            ConsumerOptions {
                prefetch: 2,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    for i in 0..60u64 {
        p.send(&payload(i, len), &i.to_le_bytes(), None, T).unwrap();
        p2.send(&payload(i, len), &i.to_le_bytes(), None, T)
            .unwrap();
    }
    p.flush(T).unwrap();
    p2.flush(T).unwrap();
    let start_of = |d: &Daemon, name: &str| {
        let st = d.status();
        let s = st.streams.iter().find(|s| s.name == name).unwrap();
        let disk = s.disk.as_ref().unwrap();
        (disk.start_offsets[0], disk.bytes)
    };
    assert!(
        eventually(Duration::from_secs(5), || start_of(&d, "s").0 > 0),
        "retention deleted nothing: {:?}",
        start_of(&d, "s")
    );
    let (start, bytes) = start_of(&d, "s");
    // At most the limit is kept, and only whole segments go (each holds
    // 4 records of 1048 bytes here).
    assert!(bytes <= 8192, "kept {bytes} bytes");
    assert!(start.is_multiple_of(4) && start <= 56, "starts at {start}");
    assert_eq!(
        start_of(&d, "k").0,
        0,
        "a group's uncommitted batches are kept"
    );
    // Reading from the start gets the retained range, exactly.
    let mut c = client.consumer("s", "late", earliest()).unwrap();
    let got = drain(&mut c, Duration::from_millis(1000));
    assert_eq!(got.first().map(|b| b.1), Some(start));
    check_batches(&got, len, &BTreeMap::from([(0, start)]));
    assert_eq!(got.len() as u64, 60 - start);
    // Below retention: a clear status naming the earliest offset.
    let Err(e) = client.consumer(
        "s",
        "below",
        ConsumerOptions {
            start: GroupStart::Offsets(vec![0]),
            ..ConsumerOptions::default()
        },
    ) else {
        panic!("a start below retention is refused");
    };
    assert_eq!(e.status, Status::OffsetGone, "{e}");
    assert!(
        e.message
            .contains(&format!("the earliest retained is {start}")),
        "{e}"
    );
    let e = c.seek(0, 0).unwrap_err();
    assert_eq!(e.status, Status::OffsetGone, "{e}");
    drop(d);
}

/// A small file system of its own for the data directory.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a {size} tmpfs at {} (the test needs root, as CI has)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stalls_producers_with_a_clear_error_and_loses_nothing_acknowledged() {
    let mut d = daemon("");
    d.kill();
    let _fs = Tmpfs::mount(&data_dir(&d), "2m");
    // Room taken by something else, freed later.
    std::fs::write(data_dir(&d).join("filler"), vec![0u8; 1 << 20]).unwrap();
    d.restart();
    let client = d.client();
    let len = 60 << 10;
    let mut p = client
        .producer("s", disk(1, 8, 64 << 10, Fsync::Every))
        .unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    let mut sent = 0u64;
    let mut got = Vec::new();
    let err = loop {
        match p.reserve(Some(Duration::from_secs(2))) {
            Ok(slot) => {
                // SAFETY: the slot is ours until published.
                unsafe {
                    std::ptr::copy_nonoverlapping(payload(sent, len).as_ptr(), slot.ptr, len)
                };
                p.publish(slot.slot, len as u64, &sent.to_le_bytes(), None)
                    .unwrap();
                sent += 1;
                got.extend(drain(&mut c, Duration::from_millis(20)));
            }
            Err(e) => break e,
        }
        assert!(sent < 100, "2 MiB never filled up");
    };
    assert_eq!(err.status, Status::Timeout);
    assert!(
        err.message.contains("cannot write the stream's disk log"),
        "{err}"
    );
    let st = d.status();
    let disk = st.streams[0].disk.as_ref().unwrap();
    assert!(
        disk.error
            .as_deref()
            .is_some_and(|e| e.contains("No space left")),
        "{disk:?}"
    );
    let (_, acked) = p.acked();
    // Reads go on: everything acknowledged is delivered.
    got.extend(drain(&mut c, Duration::from_millis(500)));
    assert!(
        got.len() as u64 >= acked && acked > 0,
        "{} delivered, {acked} acknowledged",
        got.len()
    );
    // Room again: the waiting publishes go in, and producing resumes.
    std::fs::remove_file(data_dir(&d).join("filler")).unwrap();
    p.flush(T).unwrap();
    for i in sent..sent + 3 {
        p.send(&payload(i, len), &i.to_le_bytes(), None, T).unwrap();
    }
    p.flush(T).unwrap();
    got.extend(drain(&mut c, Duration::from_millis(500)));
    let ids = check_batches(&got, len, &BTreeMap::from([(0, 0)]));
    assert_eq!(ids, (0..sent + 3).collect::<Vec<u64>>());
    assert!(
        d.log().contains("disk log writes succeed again"),
        "{}",
        d.log()
    );
    d.kill();
}

#[test]
fn a_memory_stream_producer_flushes_once_ferryd_has_read_its_ring() {
    let d = daemon("");
    let client = d.client();
    let mut spec = disk(1, 16, 64, Fsync::Every).unwrap();
    spec.durability = Durability::MEMORY;
    let mut p = client.producer("m", Some(spec)).unwrap();
    let _c = client
        .consumer("m", "g", ConsumerOptions::default())
        .unwrap();
    for i in 0..10u64 {
        p.send(b"x", &i.to_le_bytes(), None, T).unwrap();
    }
    p.flush(T).unwrap();
    assert_eq!(p.acked(), (10, 10));
    // No OP_ACK traffic for it: the producer's ring carries grants only.
    assert_eq!(d.status().streams[0].published, 10);
}

#[test]
fn retention_by_age_deletes_old_segments_and_strict_retention_moves_a_lagging_group_on() {
    // Segments close every 200 ms; whole segments older than 600 ms go.
    let d = daemon("segment_bytes = 4096\nsegment_ms = 200");
    let client = d.client();
    let len = 1000;
    let mut spec = disk(1, 8, 2048, Fsync::Never).unwrap();
    spec.durability.retention_ms = 600;
    spec.durability.strict = true;
    let mut p = client.producer("s", Some(spec)).unwrap();
    // A group that reads 5 batches, commits, and then stops reading.
    let mut lag = client
        .consumer(
            "s",
            "lagging",
            ConsumerOptions {
                prefetch: 2,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    for i in 0..20u64 {
        p.send(&payload(i, len), &i.to_le_bytes(), None, T).unwrap();
    }
    p.flush(T).unwrap();
    for _ in 0..5 {
        let b = lag.next(T).unwrap();
        lag.release(b.token).unwrap();
    }
    lag.commit().unwrap();
    let start_of = |d: &Daemon| d.status().streams[0].disk.as_ref().unwrap().start_offsets[0];
    assert_eq!(start_of(&d), 0, "nothing is old yet");
    // Time passes; a few more batches close the last full segment.
    std::thread::sleep(Duration::from_millis(700));
    p.send(&payload(20, len), &20u64.to_le_bytes(), None, T)
        .unwrap();
    p.flush(T).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || start_of(&d) >= 20),
        "strict age retention deleted the old segments, the group's uncommitted ones too: starts at {}",
        start_of(&d)
    );
    let start = start_of(&d);
    assert!(
        eventually(Duration::from_secs(2), || d
            .log()
            .contains("deleted batches this group had not read")),
        "the lagging group is told: {}",
        d.log()
    );
    // The group goes on from the new start (what it held stays readable).
    let got = drain(&mut lag, Duration::from_millis(800));
    let after: Vec<u64> = got.iter().map(|b| b.1).filter(|&o| o >= start).collect();
    assert_eq!(after, (start..21).collect::<Vec<u64>>());
    assert!(
        got.iter().all(|b| b.1 < 7 || b.1 >= start),
        "nothing from the deleted range past what it held: {:?}",
        got.iter().map(|b| b.1).collect::<Vec<_>>()
    );
    // Its commit moved with it: a restart resumes there, not at 5.
    let st = d.status();
    let g = &st.streams[0].groups[0];
    assert!(g.partitions.iter().all(|gp| gp.committed >= start), "{g:?}");
}

#[test]
fn two_groups_at_different_speeds_each_get_every_batch_once_in_order_through_a_small_pool() {
    let d = daemon("");
    let client = d.client();
    let len = 3000;
    // 8 slots for 2 partitions and 300 batches: the slow group reads
    // almost everything back from disk while the fast one keeps up.
    let mut p = client
        .producer("s", disk(2, 8, 4096, Fsync::Every))
        .unwrap();
    let small = |_| ConsumerOptions {
        prefetch: 2,
        ..ConsumerOptions::default()
    };
    let mut fast = client.consumer("s", "fast", small(())).unwrap();
    let mut slow = client.consumer("s", "slow", small(())).unwrap();
    let mut got_fast = Vec::new();
    for i in 0..300u64 {
        p.send(&payload(i, len), &i.to_le_bytes(), None, T).unwrap();
        got_fast.extend(drain(&mut fast, Duration::from_millis(1)));
    }
    p.flush(T).unwrap();
    got_fast.extend(drain(&mut fast, Duration::from_millis(500)));
    // The slow one only now, and a member of it on each partition.
    let mut slow2 = client.consumer("s", "slow", small(())).unwrap();
    let mut got_slow = Vec::new();
    loop {
        let a = drain(&mut slow, Duration::from_millis(300));
        let b = drain(&mut slow2, Duration::from_millis(300));
        if a.is_empty() && b.is_empty() {
            break;
        }
        got_slow.extend(a);
        got_slow.extend(b);
    }
    for (name, got) in [("fast", &got_fast), ("slow", &got_slow)] {
        let mut per_part: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (p, o, meta, data) in got.iter() {
            let id = u64::from_le_bytes(meta[..8].try_into().unwrap());
            assert_eq!(data, &payload(id, len), "{name}: bytes of batch {id}");
            per_part.entry(*p).or_default().push(*o);
        }
        let mut total = 0;
        for (p, offs) in per_part.iter_mut() {
            if name == "slow" {
                // Two members: in order each, interleaved between them
                // around the rebalance when the second joined.
                offs.sort_unstable();
            }
            let want: Vec<u64> = (0..offs.len() as u64).collect();
            assert_eq!(offs, &want, "{name}: partition {p} in order, each once");
            total += offs.len();
        }
        assert_eq!(total, 300, "{name}: every batch");
    }
}

#[test]
fn a_producer_asking_for_other_durability_is_told_what_the_stream_has() {
    let d = daemon("");
    let client = d.client();
    let _p = client.producer("s", disk(1, 8, 64, Fsync::Never)).unwrap();
    let mut memory = disk(1, 8, 64, Fsync::Never).unwrap();
    memory.durability = Durability::MEMORY;
    let Err(e) = client.producer("s", Some(memory)) else {
        panic!("a memory spec for a disk stream is refused");
    };
    assert_eq!(e.status, Status::StreamMismatch, "{e}");
    assert!(
        e.message.contains("durability=disk fsync=never, not partitions=1 slot_size=64 slot_count=8 durability=memory"),
        "{e}"
    );
    // Without a spec it opens whatever the stream is.
    client.producer("s", None).unwrap();
}

/// A group formed on a disk stream is stored at once, not at the next
/// offsets flush: after a `kill -9` soon after it formed, it comes back
/// (from its commit or before it). Were it lost, it would come back as a
/// new group, which starts at the end while another group exists, and
/// never get the batches it had not read.
#[test]
fn a_group_formed_just_before_a_crash_comes_back() {
    let mut d = daemon("offsets_flush_ms = 600000");
    let client = d.client();
    let mut p = client
        .producer("s", disk(2, 16, 4096, Fsync::Every))
        .unwrap();
    let _other = client
        .consumer("s", "other", ConsumerOptions::default())
        .unwrap();
    for i in 0..40u64 {
        p.send(&payload(i, 500), &i.to_le_bytes(), None, T).unwrap();
    }
    p.flush(T).unwrap();
    let mut c = client.consumer("s", "g", earliest()).unwrap();
    let mut released = Vec::new();
    for _ in 0..10 {
        let b = c.next(T).unwrap();
        // SAFETY (test): the batch is ours until released just below.
        released.push(u64::from_le_bytes(
            unsafe { b.meta() }[..8].try_into().unwrap(),
        ));
        c.release(b.token).unwrap();
    }
    // Well within the flush interval, well past a loop turn.
    std::thread::sleep(Duration::from_millis(300));
    d.kill();
    drop((p, c, _other, client));
    d.restart();
    assert!(d.log().contains("2 group(s) restored"), "{}", d.log());
    let client = d.client();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    let got = drain(&mut c, Duration::from_millis(1500));
    let mut ids: Vec<u64> = got
        .iter()
        .map(|(_, _, meta, _)| u64::from_le_bytes(meta[..8].try_into().unwrap()))
        .collect();
    // From its stored commit (which may lag its releases): every batch it
    // had not released comes, and those it had may come again.
    ids.extend(released);
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids, (0..40).collect::<Vec<u64>>());
}

/// While ferryd's loop is busy (a producer at full speed into a disk
/// stream, a group reading it), a group's commits are still stored every
/// `offsets_flush_ms`.
#[test]
fn commits_are_stored_on_time_while_the_loop_is_busy() {
    let d = daemon("offsets_flush_ms = 50");
    let client = d.client();
    let mut p = client
        .producer("s", disk(2, 32, 64 << 10, Fsync::Never))
        .unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let run = |stop: &std::sync::Arc<std::sync::atomic::AtomicBool>| {
        !stop.load(std::sync::atomic::Ordering::Relaxed)
    };
    let (s1, s2) = (stop.clone(), stop.clone());
    let producer = std::thread::spawn(move || {
        let data = payload(7, 64 << 10);
        let mut i = 0u64;
        while run(&s1) {
            p.send(&data, &i.to_le_bytes(), None, T).unwrap();
            i += 1;
        }
        i
    });
    let consumer = std::thread::spawn(move || {
        let mut n = 0u64;
        while run(&s2) {
            if let Ok(b) = c.next(Some(Duration::from_millis(100))) {
                c.release(b.token).unwrap();
                n += 1;
            }
        }
        n
    });
    let offsets = data_dir(&d).join("streams").join("s").join("offsets");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(m) = std::fs::metadata(&offsets).and_then(|m| m.modified()) {
            seen.insert(m);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, read) = (producer.join().unwrap(), consumer.join().unwrap());
    assert!(sent > 100 && read > 100, "busy: {sent} sent, {read} read");
    // About 40 stores in those 2 s; a loop that stores only every so many
    // turns managed none in 4 s on a loaded machine.
    assert!(
        seen.len() >= 5,
        "the offsets file changed {} times in 2 s ({sent} sent, {read} read)",
        seen.len()
    );
}

/// `ferryd --check` refuses what start-up would refuse about the data
/// directory: a file in its place, a relative path, and a declared disk
/// stream whose log was written with another partition count.
#[test]
fn check_refuses_a_data_dir_start_up_would_refuse() {
    let base = std::env::temp_dir().join(format!("ferry-durable-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let run = |data_dir: &str, partitions: u32, check: bool| {
        let cfg = base.join("ferryd.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 1\n[daemon]\nsocket = \"{}\"\ndata_dir = \"{data_dir}\"\n[[streams]]\nname = \"s\"\npartitions = {partitions}\nslot_size = 4096\nslot_count = 8\ndurability = \"disk\"\n",
                base.join("ferryd.sock").display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(ferry_tests::bin("ferryd"));
        cmd.arg("--config").arg(&cfg);
        if check {
            cmd.arg("--check");
        }
        cmd.output().unwrap()
    };
    let said = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();
    let file = base.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    for (data_dir, want) in [
        (file.display().to_string(), "is not a directory"),
        ("relative/data".to_string(), "must be an absolute path"),
    ] {
        let out = run(&data_dir, 3, true);
        assert!(!out.status.success(), "{data_dir}: {}", said(&out));
        assert!(said(&out).contains(want), "{data_dir}: {}", said(&out));
    }
    // A log written with 3 partitions: a config with 4 is refused before
    // start-up, naming both.
    let data = base.join("data");
    let mut d = Command::new(ferry_tests::bin("ferryd"));
    let cfg_ok = run(&data.display().to_string(), 3, true);
    assert!(cfg_ok.status.success(), "{}", said(&cfg_ok));
    let mut child = d
        .arg("--config")
        .arg(base.join("ferryd.toml"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || data
        .join("streams/s/stream.meta")
        .exists()));
    child.kill().unwrap();
    child.wait().unwrap();
    let out = run(&data.display().to_string(), 4, true);
    assert!(!out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("was written with partitions=3"),
        "{}",
        said(&out)
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// `n` batches whose payload is `epoch`, flushed, then the end of the epoch.
fn send_epoch(p: &mut ferry::Producer, epoch: u8, n: usize) {
    for _ in 0..n {
        p.send(&[epoch], b"", None, T).unwrap();
    }
    p.flush(T).unwrap();
    p.end().unwrap();
}

/// Lets ferryd write what it has, kills it (-9) with the producer and
/// client still open, restarts it: a new client.
fn kill_and_restart(d: &mut Daemon, p: ferry::Producer, client: ferry::Client) -> ferry::Client {
    std::thread::sleep(Duration::from_millis(300));
    d.kill();
    drop(p);
    drop(client);
    d.restart();
    d.client()
}

/// Ends of epoch are in the log with their numbers: after a kill -9 a new
/// group replays the epochs with their ends where they were. A group that
/// starts one partition past two ends of epoch (markers that are on disk
/// only after the restart) is not held back by them: it had waited at the
/// other partition's first marker for one its partition would never meet
/// again, and never got that partition's last batches.
#[test]
fn ends_of_epoch_survive_a_restart_and_a_start_past_them_holds_nothing_back() {
    let mut d = daemon("");
    let client = d.client();
    let mut p = client
        .producer("s", disk(2, 8, 4096, Fsync::Every))
        .unwrap();
    // Round robin: 2 batches per partition and epoch, then its marker.
    for epoch in 0..3u8 {
        send_epoch(&mut p, epoch, 4);
    }
    let client = kill_and_restart(&mut d, p, client);
    let mut r = client.consumer("s", "replay", earliest()).unwrap();
    let seen: String = epochs_seen(&mut r, 3).into_iter().collect();
    assert_eq!(seen, "0000E1111E2222E");
    // Partition 0 from offset 6: past the markers at 2 and 5.
    let mut c = client
        .consumer(
            "s",
            "late",
            ConsumerOptions {
                start: GroupStart::Offsets(vec![6, 0]),
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    let seen: String = epochs_seen(&mut c, 3).into_iter().collect();
    assert_eq!(seen, "00E11E2222E", "partition 1 catches up epoch by epoch");
    let st = d.status();
    let g = st.streams[0]
        .groups
        .iter()
        .find(|g| g.name == "late")
        .unwrap();
    assert_eq!(g.epochs, 3);
}

/// A group deleted before a restart: what its successor, formed after the
/// restart with the default start, gets is what was published while the
/// stream had no group, not the deleted group's old batches (a user trial
/// saw the whole log replayed, epochs and all).
#[test]
fn a_group_formed_after_a_restart_does_not_get_a_deleted_groups_old_batches() {
    let mut d = daemon("offsets_flush_ms = 20");
    let client = d.client();
    let mut p = client
        .producer("s", disk(2, 16, 4096, Fsync::Every))
        .unwrap();
    let mut c = client
        .consumer("s", "first", ConsumerOptions::default())
        .unwrap();
    for epoch in 0..2u8 {
        send_epoch(&mut p, epoch, 4);
    }
    let seen: String = epochs_seen(&mut c, 2).into_iter().collect();
    assert_eq!(seen, "0000E1111E");
    drop(c);
    delete_group(&d, "s", "first");
    send_epoch(&mut p, 2, 4);
    let client = kill_and_restart(&mut d, p, client);
    let mut c = client
        .consumer("s", "second", ConsumerOptions::default())
        .unwrap();
    let seen: String = epochs_seen(&mut c, 1).into_iter().collect();
    assert_eq!(seen, "2222E", "only what came while there was no group");
    assert_eq!(
        c.next(Some(Duration::from_millis(300))).unwrap_err().status,
        Status::Timeout
    );
}

/// `flush` returns only once ferryd has read what the producer submitted,
/// an end of epoch included, also on a disk stream whose publishes are all
/// acknowledged already: two producers ending an epoch one after the other
/// flush after `end()` so that the next epoch's publishes of one cannot be
/// read before the other's end (a user trial lost an end of epoch that
/// way, its publishes then fell into the epoch still open).
#[test]
fn flush_waits_for_ferryd_to_read_an_end_of_epoch() {
    let d = daemon("");
    let client = d.client();
    for (name, spec) in [
        ("disk", disk(2, 16, 4096, Fsync::Every)),
        (
            "mem",
            Some(StreamSpec {
                partitions: 2,
                slot_size: 4096,
                slot_count: 16,
                durability: Durability::MEMORY,
            }),
        ),
    ] {
        let mut p = client.producer(name, spec).unwrap();
        p.send(&[0], b"", None, T).unwrap();
        p.flush(T).unwrap();
        d.signal(libc::SIGSTOP);
        p.end().unwrap();
        let e = p.flush(Some(Duration::from_millis(300)));
        d.signal(libc::SIGCONT);
        assert_eq!(
            e.unwrap_err().status,
            Status::Timeout,
            "{name}: flush returned before ferryd read the end"
        );
        p.flush(T).unwrap();
        // Two producers, in turns, each flushing after its end: every
        // epoch ends, none merges with the next.
        let mut q = client.producer(name, None).unwrap();
        let mut c = client
            .consumer(name, "g", ConsumerOptions::default())
            .unwrap();
        for epoch in 1..=5u8 {
            p.send(&[epoch], b"", None, T).unwrap();
            q.send(&[epoch], b"", None, T).unwrap();
            p.end().unwrap();
            p.flush(T).unwrap();
            q.end().unwrap();
            q.flush(T).unwrap();
        }
        let seen: String = epochs_seen(&mut c, 6).into_iter().collect();
        assert_eq!(seen, "0E11E22E33E44E55E", "{name}");
    }
}
