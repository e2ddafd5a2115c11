//! A misbehaving client writes garbage into its submission ring. ferryd must
//! close that session and keep serving everyone else.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferry::ConsumerOptions;
use ferry_shm::desc::{self, Desc};
use ferry_shm::{proto, sys};
use ferry_tests::raw::{self, RawSession};
use ferry_tests::{eventually, Daemon};

const T: Option<Duration> = Some(Duration::from_secs(10));

/// A raw producer session on `stream`: exactly two fds (rings and pool,
/// no doorbell).
fn raw_producer(d: &Daemon, stream: &str) -> RawSession {
    let s = raw::raw_producer(d, stream, None);
    assert_eq!(s.fds.len(), 2, "two fds: rings and pool, no doorbell");
    s
}

fn healthy_round_trip(d: &Daemon, n: u64) {
    let client = d.client();
    let mut p = client.producer("s", None).unwrap();
    let mut c = client
        .consumer("s", &format!("g{n}"), ConsumerOptions::default())
        .unwrap();
    for i in 0..n {
        p.send(&i.to_le_bytes(), b"", None, T).unwrap();
        let b = c.next(T).unwrap();
        // SAFETY (test): held until released.
        assert_eq!(unsafe { b.data() }, &i.to_le_bytes());
        c.release(b.token).unwrap();
    }
}

fn daemon() -> Daemon {
    Daemon::start(
        "",
        "[[streams]]\nname = \"s\"\npartitions = 2\nslot_size = 64\nslot_count = 16\n",
    )
}

#[test]
fn out_of_range_slot_closes_only_that_session() {
    let d = daemon();
    let client = d.client();
    // A healthy consumer that is connected throughout.
    let mut bystander = client
        .consumer("s", "watch", ConsumerOptions::default())
        .unwrap();
    let mut bad = raw_producer(&d, "s");
    bad.push(&Desc {
        op: desc::OP_PUBLISH,
        slot: 999_999,
        len: 8,
        ..Desc::default()
    });
    assert!(
        bad.closed_by_daemon(),
        "daemon closes the faulty session\n{}",
        d.log()
    );
    assert!(d.log().contains("out of range"), "{}", d.log());
    // Everyone else is served.
    healthy_round_trip(&d, 5);
    for _ in 0..5 {
        let b = bystander.next(T).unwrap();
        bystander.release(b.token).unwrap();
    }
}

#[test]
fn garbage_descriptors_of_every_kind_are_rejected() {
    let d = daemon();
    let cases: Vec<Desc> = vec![
        Desc {
            op: 77,
            ..Desc::default()
        },
        Desc {
            op: desc::OP_RELEASE,
            ..Desc::default()
        },
        // A slot that exists but was never granted to this session.
        Desc {
            op: desc::OP_PUBLISH,
            slot: 15,
            len: 1,
            ..Desc::default()
        },
        // Pseudo-random bytes.
        Desc {
            op: 0xBEEF,
            flags: 0xFFFF,
            status: 0xDEAD_BEEF,
            stream: u32::MAX,
            partition: u32::MAX,
            slot: 0x7FFF_FFFF,
            meta_len: u32::MAX,
            len: u64::MAX,
            offset: u64::MAX,
            key: 0x0123_4567_89AB_CDEF,
            cookie: 1,
            dslot: u32::MAX,
            reserved: 2,
        },
    ];
    for (i, g) in cases.iter().enumerate() {
        let mut bad = raw_producer(&d, "s");
        bad.push(g);
        assert!(bad.closed_by_daemon(), "case {i}: {g:?}\n{}", d.log());
    }
    healthy_round_trip(&d, 3);
}

#[test]
fn oversized_publish_in_a_granted_slot_is_rejected() {
    let d = daemon();
    let mut bad = raw_producer(&d, "s");
    // Wait for the grants ferryd pushes on the completion ring, then lie
    // about the length of a slot we really own.
    let mut granted = None;
    assert!(eventually(Duration::from_secs(5), || {
        if let Some(g) = bad.comp.pop().unwrap() {
            granted = Some(g.slot);
        }
        granted.is_some()
    }));
    bad.push(&Desc {
        op: desc::OP_PUBLISH,
        slot: granted.unwrap(),
        len: 65,
        ..Desc::default()
    });
    assert!(bad.closed_by_daemon());
    assert!(
        d.log().contains("65 bytes into a 64-byte slot"),
        "{}",
        d.log()
    );
    // Its granted slots went back to the pool.
    assert!(eventually(Duration::from_secs(5), || d.status().streams[0]
        .slots_granted
        == 0));
    healthy_round_trip(&d, 3);
}

#[test]
fn corrupt_ring_sequence_closes_the_session() {
    let d = daemon();
    let bad = raw_producer(&d, "s");
    // The first slot of the submission ring follows the header's four
    // lines; its sequence number is the slot's last word. A number that is
    // neither "ready" nor the previous lap's is corruption.
    let seq_ptr = bad
        .region
        .range_ptr(bad.layout.sub_offset + 256 + 60, 4)
        .unwrap();
    // SAFETY (test): an aligned u32 inside our own mapping of the region.
    let seq = unsafe { &*(seq_ptr as *const AtomicU32) };
    seq.store(123_456, Ordering::Release);
    sys::send_dontwait(&bad.sock, proto::WAKE).unwrap();
    assert!(bad.closed_by_daemon(), "{}", d.log());
    assert!(d.log().contains("corrupt"), "{}", d.log());
    healthy_round_trip(&d, 3);
}

#[test]
fn undecodable_socket_message_closes_the_session() {
    let d = daemon();
    let sock = sys::seqpacket_connect(&d.socket).unwrap();
    sys::send_with_fds(&sock, &[0xFF, 0xFF, 0xFF, 0x01, 0x02], &[]).unwrap();
    let mut buf = [0u8; 64];
    assert!(eventually(Duration::from_secs(5), || sys::peer_hung_up(
        &sock
    )));
    assert!(matches!(
        sys::recv_with_fds(&sock, &mut buf, true),
        Ok(None)
    ));
    healthy_round_trip(&d, 2);
}

#[test]
fn a_client_of_the_previous_ring_layout_is_refused_by_name() {
    // Protocol 6 brought ring layout 2 (sequence numbers in the slots): a
    // client of protocol 5 would misread every ring, so it is refused at
    // its Hello, with both versions named, and served nothing.
    let d = daemon();
    let sock = sys::seqpacket_connect(&d.socket).unwrap();
    let old = proto::Request::Hello {
        protocol: proto::PROTOCOL_VERSION - 1,
        client: "an older libferry".into(),
    };
    sys::send_with_fds(&sock, &raw::encode(&old), &[]).unwrap();
    match raw::recv_reply(&sock, Duration::from_secs(5)) {
        Ok((proto::Response::Error { message, .. }, fds)) => {
            assert!(fds.is_empty());
            assert!(
                message.contains(&format!(
                    "client speaks protocol {}, this ferryd speaks {}",
                    proto::PROTOCOL_VERSION - 1,
                    proto::PROTOCOL_VERSION
                )),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    healthy_round_trip(&d, 2);
}
