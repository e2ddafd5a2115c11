use super::*;

fn opts(segment_bytes: u64) -> LogOptions {
    LogOptions {
        segment_bytes,
        segment_ms: 3_600_000,
        index_every: 256,
        max_payload: 1 << 20,
    }
}

fn payload(o: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (o as usize * 31 + i) as u8).collect()
}

fn fill(log: &mut PartitionLog, from: u64, n: u64, len: usize) {
    for o in from..from + n {
        let meta = format!("m{o}");
        log.append(
            o,
            0,
            1000 + o,
            meta.as_bytes(),
            Payload::Bytes(&payload(o, len)),
        )
        .unwrap();
    }
}

fn check_all(log: &mut PartitionLog, from: u64, to: u64, len: usize) {
    for o in from..to {
        let (h, meta, p) = log.read(o).unwrap();
        assert_eq!(h.offset, o);
        assert_eq!(h.time_ms, 1000 + o);
        assert_eq!(meta, format!("m{o}").as_bytes());
        assert_eq!(p, payload(o, len), "payload of {o}");
    }
}

fn dir() -> tempdir::Dir {
    tempdir::Dir::new()
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).unwrap();
            let p =
                std::env::temp_dir().join(format!("ferry-log-test-{:016x}", u64::from_le_bytes(b)));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn last_segment(d: &Path) -> PathBuf {
    let mut v: Vec<_> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v.pop().unwrap()
}

#[test]
fn records_read_back_and_survive_reopening() {
    let d = dir();
    let (mut log, dropped) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
    assert!(dropped.is_empty());
    fill(&mut log, 0, 50, 300);
    log.append(50, REC_END, 1050, b"m50", Payload::Bytes(&[]))
        .unwrap();
    check_all(&mut log, 0, 50, 300);
    assert!(log.ends_with_marker().unwrap());
    assert!(
        log.append(7, 0, 0, b"", Payload::Bytes(b"x")).is_err(),
        "out of order"
    );
    drop(log);
    let (mut log, dropped) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
    assert!(dropped.is_empty(), "{dropped:?}");
    assert_eq!(log.next_offset(), 51);
    assert!(log.ends_with_marker().unwrap());
    // Reads in any order, not only sequential.
    for o in [49, 3, 17, 0, 48] {
        assert_eq!(log.read(o).unwrap().2, payload(o, 300));
    }
    assert!(log.read(51).is_err());
}

#[test]
fn a_torn_tail_is_cut_and_everything_before_it_kept() {
    for cut in [1u64, 20, 39, 40, 100, 339] {
        let d = dir();
        let (mut log, _) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
        fill(&mut log, 0, 10, 300);
        drop(log);
        let seg = last_segment(&d.0);
        let len = fs::metadata(&seg).unwrap().len();
        // The last record is 40 + 2 + 300 bytes: cut into it.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - cut)
            .unwrap();
        let (mut log, dropped) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
        assert_eq!(dropped.len(), 1, "cut {cut}");
        assert!(!dropped[0].kept);
        assert_eq!(dropped[0].offset, 9);
        assert_eq!(dropped[0].bytes, 342 - cut);
        assert_eq!(log.next_offset(), 9);
        check_all(&mut log, 0, 9, 300);
        // And the log goes on from there.
        fill(&mut log, 9, 3, 300);
        check_all(&mut log, 0, 12, 300);
    }
}

#[test]
fn a_corrupt_tail_record_is_dropped_never_served() {
    let d = dir();
    let (mut log, _) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
    fill(&mut log, 0, 10, 300);
    drop(log);
    let seg = last_segment(&d.0);
    let len = fs::metadata(&seg).unwrap().len();
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0xAA], len - 5).unwrap();
    // Garbage after the end, as a crash in the middle of a write leaves.
    f.write_all_at(&[0x55; 77], len).unwrap();
    let (mut log, dropped) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].offset, 9);
    assert_eq!(dropped[0].reason, "checksum mismatch");
    assert_eq!(dropped[0].bytes, 342 + 77);
    assert_eq!(log.next_offset(), 9);
    check_all(&mut log, 0, 9, 300);
}

#[test]
fn a_damaged_record_in_the_middle_is_kept_and_skipped_not_cut_with_all_after_it() {
    let d = dir();
    let (mut log, _) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
    fill(&mut log, 0, 10, 300);
    drop(log);
    let seg = last_segment(&d.0);
    // Inside the payload of offset 4 (each record is 40 + 2 + 300 bytes),
    // as a producer scribbling on its slot after publishing, or bit rot.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0xAB; 3], 4 * 342 + 200).unwrap();
    let (mut log, found) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].kept);
    assert_eq!(found[0].offset, 4);
    assert_eq!(log.next_offset(), 10, "the records after it stay");
    assert_eq!(log.read(4).unwrap_err().kind(), io::ErrorKind::InvalidData);
    check_all(&mut log, 0, 4, 300);
    check_all(&mut log, 5, 10, 300);
}

#[test]
fn segments_roll_by_size_and_the_oldest_can_go() {
    let d = dir();
    let (mut log, _) = PartitionLog::open(&d.0, opts(4096)).unwrap();
    fill(&mut log, 0, 100, 500);
    let closed = log.closed_segments();
    assert!(closed.len() >= 10, "{} segments", closed.len());
    for w in closed.windows(2) {
        assert_eq!(w[0].1, w[1].0, "contiguous");
        assert!(w[0].2 >= 4096);
    }
    drop(log);
    let (mut log, dropped) = PartitionLog::open(&d.0, opts(4096)).unwrap();
    assert!(dropped.is_empty());
    assert_eq!(log.next_offset(), 100);
    check_all(&mut log, 0, 100, 500);
    let total = log.bytes();
    let first = log.closed_segments()[0];
    let (start, files) = log.detach_oldest().unwrap();
    assert_eq!(start, first.1);
    for f in files {
        fs::remove_file(f).unwrap();
    }
    assert_eq!(log.start_offset(), first.1);
    assert_eq!(log.bytes(), total - first.2);
    assert!(log.read(0).is_err());
    check_all(&mut log, first.1, 100, 500);
    // Reopened, it starts where the oldest segment left starts.
    drop(log);
    let (log, _) = PartitionLog::open(&d.0, opts(4096)).unwrap();
    assert_eq!(log.start_offset(), first.1);
}

#[test]
fn a_damaged_closed_segment_is_never_served() {
    let d = dir();
    let (mut log, _) = PartitionLog::open(&d.0, opts(4096)).unwrap();
    fill(&mut log, 0, 30, 500);
    let seg = d.0.join(seg_name(0, "log"));
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    // Inside the payload of offset 2 (each record is 40 + 2 + 500 bytes).
    f.write_all_at(&[0xFF, 0xFE], 2 * 542 + 100).unwrap();
    let e = log.read(2).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    check_all(&mut log, 3, 30, 500);
}

#[test]
fn a_missing_index_is_rebuilt_by_a_scan() {
    let d = dir();
    let (mut log, _) = PartitionLog::open(&d.0, opts(4096)).unwrap();
    fill(&mut log, 0, 40, 500);
    drop(log);
    fs::remove_file(d.0.join(seg_name(0, "idx"))).unwrap();
    fs::write(d.0.join(seg_name(8, "idx")), b"garbage").ok();
    let (mut log, dropped) = PartitionLog::open(&d.0, opts(4096)).unwrap();
    assert!(dropped.is_empty());
    check_all(&mut log, 0, 40, 500);
}

#[test]
fn state_files_are_whole_or_refused() {
    let d = dir();
    let p = d.0.join("offsets");
    assert_eq!(read_atomic(&p).unwrap(), None);
    let groups = vec![StoredGroup {
        name: "g".into(),
        owner: 7,
        committed: vec![1, 2, 3],
    }];
    write_atomic(&p, &encode(&groups)).unwrap();
    let back: Vec<StoredGroup> = decode(&p, &read_atomic(&p).unwrap().unwrap()).unwrap();
    assert_eq!(back, groups);
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    fs::write(&p, &b).unwrap();
    assert!(read_atomic(&p).is_err());
}

#[test]
fn files_a_failed_sync_named_are_named_again() {
    let d = dir();
    let (mut log, _) = PartitionLog::open(&d.0, opts(4096)).unwrap();
    // Enough to close segments: their files come with the next sync only.
    fill(&mut log, 0, 40, 500);
    assert!(log.rolled());
    let first = log.sync_files().unwrap();
    assert!(first.len() > 1, "closed segments and the active one");
    assert!(!log.rolled(), "handed out once");
    assert_eq!(
        log.sync_files().unwrap().len(),
        1,
        "only the active segment now"
    );
    // That sync failed: all it named is synced again.
    let n = first.len();
    log.sync_again(first);
    assert!(log.rolled());
    assert_eq!(log.sync_files().unwrap().len(), n + 1);
}

/// A log of 30 records whose first 20 a sync covered and a checkpoint
/// names; returns it closed, with where record 4's payload is.
fn checkpointed_log(d: &Path) -> u64 {
    let (mut log, _) = PartitionLog::open(d, opts(1 << 20)).unwrap();
    fill(&mut log, 0, 20, 300);
    for f in log.sync_files().unwrap() {
        f.sync_data().unwrap();
    }
    let c = log.checkpoint();
    assert_eq!((c.base, c.next), (0, 20));
    write_atomic_unsynced(&checkpoint_path(d), &encode(&c)).unwrap();
    fill(&mut log, 20, 10, 300);
    let (_, h, pos) = log.header(4).unwrap();
    pos + HEADER as u64 + h.meta_len as u64
}

/// Damages record 4 (before the checkpoint) and tears the last record.
fn damage_and_tear(d: &Path, payload_of_4: u64) {
    let seg = last_segment(d);
    let len = fs::metadata(&seg).unwrap().len();
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0xAB; 3], payload_of_4 + 100).unwrap();
    f.set_len(len - 7).unwrap();
}

#[test]
fn recovery_scans_the_active_segment_from_its_checkpoint() {
    let d = dir();
    let at = checkpointed_log(&d.0);
    damage_and_tear(&d.0, at);
    let (mut log, dropped) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
    // Only the torn tail, after the checkpoint, is found: the damaged
    // record before it was not scanned.
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(!dropped[0].kept);
    assert_eq!(dropped[0].offset, 29);
    assert_eq!(log.next_offset(), 29);
    // Still never served: read-back checks every record.
    assert_eq!(log.read(4).unwrap_err().kind(), io::ErrorKind::InvalidData);
    check_all(&mut log, 0, 4, 300);
    check_all(&mut log, 5, 29, 300);
    // The index rebuilt past the checkpoint serves the records after it,
    // and the log goes on (and reopens) from there.
    fill(&mut log, 29, 5, 300);
    drop(log);
    let (mut log, dropped) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
    assert!(dropped.is_empty(), "{dropped:?}");
    assert_eq!(log.next_offset(), 34);
    check_all(&mut log, 5, 34, 300);
}

#[test]
fn a_checkpoint_that_does_not_fit_its_segment_is_ignored_and_all_is_scanned() {
    let bad: [&dyn Fn(&Path); 4] = [
        // Fails its checksum.
        &|d| {
            let p = checkpoint_path(d);
            let mut b = fs::read(&p).unwrap();
            *b.last_mut().unwrap() ^= 1;
            fs::write(&p, b).unwrap();
        },
        // Names another segment.
        &|d| {
            let c = Checkpoint {
                base: 7,
                position: 342,
                next: 8,
            };
            write_atomic(&checkpoint_path(d), &encode(&c)).unwrap();
        },
        // Past the end of the file.
        &|d| {
            let c = Checkpoint {
                base: 0,
                position: 1 << 30,
                next: 20,
            };
            write_atomic(&checkpoint_path(d), &encode(&c)).unwrap();
        },
        // A position where another record starts.
        &|d| {
            let c = Checkpoint {
                base: 0,
                position: 2 * 342,
                next: 5,
            };
            write_atomic(&checkpoint_path(d), &encode(&c)).unwrap();
        },
    ];
    for (i, spoil) in bad.iter().enumerate() {
        let d = dir();
        let at = checkpointed_log(&d.0);
        damage_and_tear(&d.0, at);
        spoil(&d.0);
        let (mut log, dropped) = PartitionLog::open(&d.0, opts(1 << 20)).unwrap();
        // The whole segment was scanned: the damaged record is found too.
        assert_eq!(dropped.len(), 2, "case {i}: {dropped:?}");
        assert!(dropped[0].kept && dropped[0].offset == 4, "case {i}");
        assert!(!dropped[1].kept && dropped[1].offset == 29, "case {i}");
        assert_eq!(log.next_offset(), 29);
        check_all(&mut log, 5, 29, 300);
    }
}

/// End markers' numbers are known after reopening without reading the
/// records: from closed segments' indexes, from the active segment's
/// scan (whole, or from its checkpoint), and from the count kept when
/// retention deletes segments. A damaged index makes recovery scan.
#[test]
fn end_marker_numbers_survive_reopening_and_retention() {
    let d = dir();
    let o = opts(2048);
    let (mut log, _) = PartitionLog::open(&d.0, o).unwrap();
    let mut expect = Vec::new();
    let mut next = 0;
    for epoch in 1..=6u64 {
        fill(&mut log, next, 5, 300);
        next += 5;
        log.append(next, REC_END, 0, &epoch.to_le_bytes(), Payload::Bytes(&[]))
            .unwrap();
        expect.push((next, epoch));
        next += 1;
    }
    // A marker of an old log (no number) is no numbered marker.
    log.append(next, REC_END, 0, &[], Payload::Bytes(&[]))
        .unwrap();
    next += 1;
    fill(&mut log, next, 2, 300);
    assert!(log.segment_count() > 3, "several segments");
    assert_eq!(log.marks(), expect);
    let c = log.checkpoint();
    drop(log);
    let (log, _) = PartitionLog::open(&d.0, o).unwrap();
    assert_eq!(log.marks(), expect, "whole scan of the active segment");
    drop(log);
    write_atomic_unsynced(&checkpoint_path(&d.0), &encode(&c)).unwrap();
    let (mut log, _) = PartitionLog::open(&d.0, o).unwrap();
    assert_eq!(log.marks(), expect, "scan from the checkpoint");
    // Retention: the numbers of deleted markers are counted.
    let mut gone = 0;
    while log.start_offset() < expect[2].0 + 1 {
        let (start, files) = log.detach_oldest().unwrap();
        for f in files {
            fs::remove_file(f).unwrap();
        }
        gone = expect.iter().filter(|m| m.0 < start).count();
    }
    let base = expect[gone - 1].1;
    assert_eq!(log.marks_base(), base);
    drop(log);
    let (log, _) = PartitionLog::open(&d.0, o).unwrap();
    assert_eq!(log.marks_base(), base);
    assert_eq!(log.marks(), expect[gone..].to_vec());
    drop(log);
    // A closed segment's damaged index: the segment is scanned instead.
    let mut idx: Vec<_> = fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect();
    idx.sort();
    fs::write(&idx[0], b"garbage").unwrap();
    let (log, _) = PartitionLog::open(&d.0, o).unwrap();
    assert_eq!(log.marks(), expect[gone..].to_vec());
}

/// `read_ahead` asks for the bytes after the last record read, across
/// segments, each range once; reads go on as before.
#[test]
fn read_ahead_asks_for_what_follows_the_cursor_once() {
    let d = dir();
    let (mut log, _) = PartitionLog::open(&d.0, opts(4096)).unwrap();
    fill(&mut log, 0, 40, 300);
    assert!(log.segment_count() > 2);
    log.read_ahead(1 << 20); // nothing read yet: nothing to follow
    assert_eq!(log.advised, (0, 0));
    check_all(&mut log, 0, 3, 300);
    log.read_ahead(2000);
    let first = log.advised;
    assert!(first > (0, 0), "{first:?}");
    log.read_ahead(2000);
    assert_eq!(log.advised, first, "the same range is not asked again");
    log.read_ahead(1 << 20);
    let last = *log.segments.keys().next_back().unwrap();
    assert_eq!(log.advised.0, last, "up to the last segment");
    check_all(&mut log, 3, 40, 300);
}

/// A large payload from the pool is hashed and written through the
/// scratch buffer in chunks: it reads back whole, next to small records
/// and markers, and a range outside the pool leaves nothing in the file.
#[test]
fn large_payloads_from_the_pool_are_written_in_chunks_and_read_back() {
    let d = dir();
    let (mut log, _) = PartitionLog::open(&d.0, opts(1 << 30)).unwrap();
    let len = (1 << 20) - 5; // several chunks and a short last one
    let pool = Region::create("log-test", 2 << 20).unwrap();
    let bytes = payload(7, len);
    assert!(pool.write(4096, &bytes));
    log.append(0, 0, 1, b"small", Payload::Bytes(b"abc"))
        .unwrap();
    log.append(1, 0, 2, b"big", Payload::Region(&pool, 4096, len as u64))
        .unwrap();
    let size = log.active().bytes;
    let err = log.append(2, 0, 3, b"", Payload::Region(&pool, 1 << 20, 2 << 20));
    assert!(err.is_err(), "outside the pool");
    assert_eq!(log.active().bytes, size);
    assert_eq!(
        log.active().file.metadata().unwrap().len(),
        size,
        "nothing left of it"
    );
    log.append(2, REC_END, 3, &1u64.to_le_bytes(), Payload::Bytes(&[]))
        .unwrap();
    drop(log);
    let (mut log, dropped) = PartitionLog::open(&d.0, opts(1 << 30)).unwrap();
    assert!(dropped.is_empty(), "{dropped:?}");
    let (h, meta, p) = log.read(1).unwrap();
    assert_eq!((h.len as usize, meta.as_slice()), (len, &b"big"[..]));
    assert!(p == bytes, "payload intact");
    assert_eq!(log.read(0).unwrap().2, b"abc");
    assert_eq!(log.marks(), vec![(2, 1)]);
}
