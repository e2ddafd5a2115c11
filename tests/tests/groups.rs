//! Consumer groups that never block a job silently, against a real
//! ferryd: a producer waiting for slots is logged and shown with the
//! groups holding them, the drain summary names who still holds what,
//! idle groups expire (per stream), commits happen by themselves, and the
//! end of an epoch reaches every member once every producer ended it.

use std::time::Duration;

use ferry::{ConsumerOptions, Status, StreamSpec};
use ferry_tests::{epochs_seen, eventually, Daemon};

const T: Option<Duration> = Some(Duration::from_secs(10));

fn spec(partitions: u32, slots: u32) -> Option<StreamSpec> {
    Some(StreamSpec {
        durability: Default::default(),
        partitions,
        slot_size: 64,
        slot_count: slots,
    })
}

#[test]
fn a_waiting_producer_is_logged_and_shown_with_the_groups_holding_the_slots() {
    let mut d = Daemon::start("slot_wait_log_ms = 300", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 4)).unwrap();
    // A member that takes its batches and never releases them.
    let mut stuck = client
        .consumer("s", "stuck", ConsumerOptions::default())
        .unwrap();
    for _ in 0..4 {
        p.send(b"x", b"", None, T).unwrap();
    }
    for _ in 0..4 {
        stuck.next(T).unwrap();
    }
    let e = p.reserve(Some(Duration::from_millis(800))).unwrap_err();
    assert_eq!(e.status, Status::Timeout);
    let st = d.status();
    let s = &st.streams[0];
    let waiting = s.producers[0].waiting_for_slot_ms;
    assert!(
        waiting.is_some_and(|ms| ms >= 300),
        "status shows the wait: {waiting:?}"
    );
    assert_eq!(s.groups[0].slots_held, 4);
    assert!(
        eventually(Duration::from_secs(5), || d
            .log()
            .contains("producer waits for a free slot")),
        "{}",
        d.log()
    );
    let log = d.log();
    assert!(
        log.contains("all 4 slots are held, by group stuck (4, 1 member)"),
        "{log}"
    );

    // The member leaves without releasing: its group keeps the slots.
    drop(stuck);
    assert!(eventually(Duration::from_secs(5), || d.status().streams[0]
        .groups[0]
        .members
        .is_empty()));
    // Drain: the summary says what is still held, and by whom.
    drop(p);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
    let log = d.log();
    assert!(
        !log.contains("every published batch was delivered and released"),
        "{log}"
    );
    assert!(
        log.contains("4 batches were never released")
            && log.contains("stream s: group stuck (4, no member)"),
        "{log}"
    );
}

#[test]
fn idle_groups_expire_per_stream_and_are_counted() {
    let d = Daemon::start(
        "",
        "[[streams]]\nname = \"quick\"\nslot_size = 64\nslot_count = 4\ngroup_idle_timeout_ms = 200\n\
         [[streams]]\nname = \"slow\"\nslot_size = 64\nslot_count = 4\n",
    );
    let client = d.client();
    for stream in ["quick", "slow"] {
        let mut p = client.producer(stream, None).unwrap();
        let c = client
            .consumer(stream, "gone", ConsumerOptions::default())
            .unwrap();
        p.send(b"x", b"", None, T).unwrap();
        drop(c);
    }
    assert!(
        eventually(Duration::from_secs(5), || {
            let st = d.status();
            let q = st.streams.iter().find(|s| s.name == "quick").unwrap();
            q.groups.is_empty() && q.groups_expired == 1 && q.slots_held == 0
        }),
        "{}",
        d.log()
    );
    // The daemon's default (10 minutes) still holds for the other stream.
    let st = d.status();
    let slow = st.streams.iter().find(|s| s.name == "slow").unwrap();
    assert_eq!((slow.groups.len(), slow.groups_expired), (1, 0));
    assert!(d
        .log()
        .contains("consumer group deleted: no member for group_idle_timeout_ms = 200"));
}

#[test]
fn commits_follow_releases_unless_asked_not_to() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(2, 16)).unwrap();
    let mut auto = client
        .consumer("s", "auto", ConsumerOptions::default())
        .unwrap();
    let mut manual = client
        .consumer(
            "s",
            "manual",
            ConsumerOptions {
                auto_commit: false,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    let mut timed = client
        .consumer(
            "s",
            "timed",
            ConsumerOptions {
                commit_interval: Duration::from_millis(300),
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    for _ in 0..10 {
        p.send(b"x", b"", None, T).unwrap();
    }
    for c in [&mut auto, &mut manual, &mut timed] {
        for _ in 0..10 {
            let b = c.next(T).unwrap();
            c.release(b.token).unwrap();
        }
    }
    let lag = |name: &str| {
        d.status().streams[0]
            .groups
            .iter()
            .find(|g| g.name == name)
            .unwrap()
            .lag
    };
    assert!(eventually(Duration::from_secs(5), || lag("auto") == 0));
    assert_eq!(lag("manual"), 10, "no commit without asking");
    // The interval's last releases are committed by a later call once due.
    let _ = timed.next(Some(Duration::from_millis(600)));
    assert!(eventually(Duration::from_secs(5), || lag("timed") == 0));
    manual.commit().unwrap();
    assert!(eventually(Duration::from_secs(5), || lag("manual") == 0));
}

#[test]
fn the_epoch_ends_when_every_producer_ended_or_left() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut a = client.producer("s", spec(2, 16)).unwrap();
    let mut b = client.producer("s", None).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    a.send(b"a", b"", None, T).unwrap();
    b.send(b"b", b"", None, T).unwrap();
    a.end().unwrap();
    for _ in 0..2 {
        let x = c.next(T).unwrap();
        c.release(x.token).unwrap();
    }
    // b has not ended: no end yet.
    assert_eq!(
        c.next(Some(Duration::from_millis(300))).unwrap_err().status,
        Status::Timeout
    );
    drop(b); // leaving counts: every producer still here has ended
    assert_eq!(c.next(T).unwrap_err().status, Status::EndOfEpoch);
    // The next epoch goes on.
    a.send(b"c", b"", None, T).unwrap();
    let x = c.next(T).unwrap();
    // SAFETY (test): the batch is held and the consumer open.
    assert_eq!(unsafe { x.data() }, b"c");
    assert_eq!(d.status().streams[0].groups[0].epochs, 1);
}

#[test]
fn an_end_read_together_with_later_publishes_still_separates_the_epochs() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(1, 32)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    // ferryd stopped: it reads all of this in one pass afterwards.
    d.signal(libc::SIGSTOP);
    for epoch in 0..3u8 {
        for _ in 0..2 {
            p.send(&[epoch], b"", None, T).unwrap();
        }
        p.end().unwrap();
    }
    d.signal(libc::SIGCONT);
    let seen: String = epochs_seen(&mut c, 3).into_iter().collect();
    assert_eq!(seen, "00E11E22E");
}

#[test]
fn no_member_gets_the_next_epoch_before_the_end_of_this_one() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(2, 32)).unwrap();
    let mut a = client
        .consumer(
            "s",
            "g",
            ConsumerOptions {
                prefetch: 8,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    let mut b = client
        .consumer(
            "s",
            "g",
            ConsumerOptions {
                prefetch: 1,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    for epoch in 0..2u8 {
        for _ in 0..4 {
            p.send(&[epoch], b"", None, T).unwrap();
        }
        p.end().unwrap();
    }
    // The slow member (prefetch 1) holds the group at the first end; the
    // fast one must not run ahead into epoch 1 meanwhile.
    let slow = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let s: String = epochs_seen(&mut b, 2).into_iter().collect();
        s
    });
    let sa: String = epochs_seen(&mut a, 2).into_iter().collect();
    let sb = slow.join().unwrap();
    assert_eq!((sa.as_str(), sb.as_str()), ("00E11E", "00E11E"));
}

#[test]
fn a_group_formed_after_the_end_reaches_it_also_through_empty_partitions() {
    let d = Daemon::start("", "");
    let client = d.client();
    // 4 partitions, 1 batch: three partitions hold only their marker.
    let mut p = client.producer("s", spec(4, 8)).unwrap();
    p.send(&[0], b"", None, T).unwrap();
    p.end().unwrap();
    let mut c = client
        .consumer("s", "late", ConsumerOptions::default())
        .unwrap();
    let seen: String = epochs_seen(&mut c, 1).into_iter().collect();
    assert_eq!(seen, "0E");
}

#[test]
fn an_end_counts_after_its_producer_left() {
    let d = Daemon::start("", "");
    let client = d.client();
    let idle = client.producer("s", spec(1, 8)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    let mut b = client.producer("s", None).unwrap();
    b.send(&[0], b"", None, T).unwrap();
    b.end().unwrap();
    drop(b); // ended, and gone, while `idle` has not ended
    std::thread::sleep(Duration::from_millis(200));
    drop(idle); // leaving counts as done: B's end still stands
    let seen: String = epochs_seen(&mut c, 1).into_iter().collect();
    assert_eq!(seen, "0E");
}

#[test]
fn a_producer_ending_over_and_over_marks_one_end() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(2, 8)).unwrap();
    let mut c = client
        .consumer("s", "g", ConsumerOptions::default())
        .unwrap();
    p.send(&[0], b"", None, T).unwrap();
    for _ in 0..10_000 {
        p.end().unwrap(); // markers take no slot: nothing else bounds them
    }
    let seen: String = epochs_seen(&mut c, 1).into_iter().collect();
    assert_eq!(seen, "0E");
    assert!(eventually(Duration::from_secs(5), || d.status().streams[0]
        .end_offsets
        == vec![2, 1]));
    assert_eq!(
        c.next(Some(Duration::from_millis(200))).unwrap_err().status,
        Status::Timeout,
        "one end, not ten thousand"
    );
}

/// One member owning 4 partitions with a backlog in each gets them in
/// turn: of the first 100 batches, each partition gives about a quarter
/// (a user trial saw 4, 500, 0 and 496 of 1000: partitions skipped).
#[test]
fn a_member_of_four_partitions_is_served_from_each_in_turn() {
    let d = Daemon::start("", "");
    let client = d.client();
    let mut p = client.producer("s", spec(4, 512)).unwrap();
    let mut c = client
        .consumer(
            "s",
            "g",
            ConsumerOptions {
                prefetch: 4,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    for i in 0..400u64 {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
    }
    p.flush(T).unwrap();
    let mut per = [0u32; 4];
    for _ in 0..100 {
        let b = c.next(T).unwrap();
        per[b.partition as usize] += 1;
        c.release(b.token).unwrap();
    }
    assert!(per.iter().all(|&n| (15..=35).contains(&n)), "{per:?}");
}
