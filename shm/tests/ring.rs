#![cfg(not(loom))]
//! Ring, region and socket tests on real shared memory.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_shm::layout::SessionLayout;
use ferry_shm::ring::{ring_bytes, RingError};
use ferry_shm::{attach_ring, init_ring, sys, wait, Desc, Region, RingConsumer, RingProducer};

fn ring_pair(cap: u32) -> (RingProducer, RingConsumer, Arc<Region>) {
    let len = ring_bytes(cap) as u64;
    let region = Arc::new(Region::create("test-ring", len).unwrap());
    let a = init_ring(&region, 0, len, cap).unwrap();
    let b = attach_ring(&region, 0, len, cap).unwrap();
    (RingProducer::new(a), RingConsumer::new(b), region)
}

fn d(n: u64) -> Desc {
    Desc {
        op: 1,
        offset: n,
        cookie: n * 3,
        ..Desc::default()
    }
}

#[test]
fn push_pop_in_order_through_wraparound() {
    let (mut p, mut c, _r) = ring_pair(4);
    assert_eq!(c.pop().unwrap(), None);
    for round in 0..10u64 {
        for i in 0..4 {
            p.push(&d(round * 4 + i)).unwrap();
        }
        assert_eq!(p.push(&d(99)), Err(RingError::Full));
        assert_eq!(p.free().unwrap(), 0);
        for i in 0..4 {
            assert_eq!(c.pop().unwrap(), Some(d(round * 4 + i)));
        }
        assert_eq!(c.pop().unwrap(), None);
    }
}

#[test]
fn hostile_indices_and_sequences_are_detected_not_trusted() {
    let (mut p, mut c, region) = ring_pair(8);
    p.push(&d(1)).unwrap();
    // The slots follow the four header lines; each slot's sequence word is
    // its last 4 bytes. A garbage number in the next slot is corruption.
    // SAFETY (test): aligned u32s inside the region we own.
    let seq = |i: usize| unsafe { &*(region.as_ptr().add(256 + 64 * i + 60) as *const AtomicU32) };
    assert_eq!(seq(0).load(Ordering::Acquire), 1, "slot 0 carries number 1");
    assert_eq!(c.pop().unwrap(), Some(d(1)));
    seq(1).store(1000, Ordering::Release);
    assert!(matches!(
        c.pop(),
        Err(RingError::Sequence {
            index: 1,
            found: 1000,
            ..
        })
    ));
    // The previous lap's number means empty, not corrupt.
    seq(1).store(2u32.wrapping_sub(8), Ordering::Release);
    assert_eq!(c.pop().unwrap(), None);
    // The tail word (third line) is for displays only: garbage there
    // changes nothing the consumer does.
    let tail = unsafe { &*(region.as_ptr().add(128) as *const AtomicU32) };
    tail.store(1000, Ordering::Release);
    assert_eq!(c.pop().unwrap(), None);
    assert!(c.ring().occupancy() <= 8, "displays stay within capacity");
    // A garbage head seen by the producer once it has to read it (its
    // cached copy says the ring is full).
    let (mut p, _c, region) = ring_pair(2);
    p.push(&d(1)).unwrap();
    p.push(&d(2)).unwrap();
    let head = unsafe { &*(region.as_ptr().add(64) as *const AtomicU32) };
    head.store(500, Ordering::Release);
    assert!(matches!(p.push(&d(3)), Err(RingError::Corrupt { .. })));
}

#[test]
fn consumer_publishes_its_head_in_batches_and_when_empty() {
    let (mut p, mut c, region) = ring_pair(64);
    let head =
        || unsafe { &*(region.as_ptr().add(64) as *const AtomicU32) }.load(Ordering::Acquire);
    for i in 0..10 {
        p.push(&d(i)).unwrap();
    }
    for i in 0..3 {
        assert_eq!(c.pop().unwrap(), Some(d(i)));
    }
    assert_eq!(head(), 0, "three of 64: not yet published");
    for i in 3..4 {
        assert_eq!(c.pop().unwrap(), Some(d(i)));
    }
    assert_eq!(head(), 4, "every capacity/16 = 4 descriptors");
    for i in 4..10 {
        assert_eq!(c.pop().unwrap(), Some(d(i)));
    }
    assert_eq!(c.pop().unwrap(), None);
    assert_eq!(head(), 10, "an empty ring publishes what was read");
    // A producer filling the ring sees the room the consumer made.
    let (mut p, mut c, _r) = ring_pair(4);
    for round in 0..50u64 {
        while p.push(&d(round)).is_ok() {}
        while c.pop().unwrap().is_some() {}
    }
    assert!(p.free().unwrap() == 4);
}

#[test]
fn attach_rejects_garbage_and_wrong_capacity() {
    let len = ring_bytes(8) as u64;
    let region = Arc::new(Region::create("junk", len).unwrap());
    assert!(matches!(
        attach_ring(&region, 0, len, 8),
        Err(RingError::NotARing)
    ));
    init_ring(&region, 0, len, 8).unwrap();
    // A ring of another layout version (an older client's or daemon's) is
    // refused with both versions named.
    // SAFETY (test): the version word follows the 8-byte magic.
    let version = unsafe { &*(region.as_ptr().add(8) as *const AtomicU32) };
    version.store(1, Ordering::Release);
    let Err(e) = attach_ring(&region, 0, len, 8) else {
        panic!("a ring of layout 1 attached");
    };
    assert_eq!(
        e,
        RingError::Version {
            found: 1,
            expected: ferry_shm::ring::RING_LAYOUT_VERSION
        }
    );
    assert!(
        e.to_string()
            .contains("layout version 1, this build speaks 2"),
        "{e}"
    );
    version.store(ferry_shm::ring::RING_LAYOUT_VERSION, Ordering::Release);
    assert!(attach_ring(&region, 0, len, 16).is_err());
    assert!(attach_ring(&region, 0, len, 3).is_err());
    assert!(attach_ring(&region, 4096, len, 8).is_err());
}

#[test]
fn wake_only_when_consumer_sleeps() {
    let (mut p, mut c, _r) = ring_pair(4);
    p.push(&d(1)).unwrap();
    assert!(!p.wake_needed(), "consumer never announced sleep");
    // Data is present, so the consumer must not go to sleep.
    assert!(!c.prepare_sleep().unwrap());
    assert!(!p.wake_needed());
}

#[test]
fn futex_sleeper_is_woken_by_push() {
    let (mut p, mut c, _r) = ring_pair(4);
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        loop {
            if let Some(x) = c.pop().unwrap() {
                return (x, start.elapsed());
            }
            wait::futex_sleep(&mut c, Duration::from_secs(20)).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    p.push(&d(7)).unwrap();
    if p.wake_needed() {
        sys::futex_wake(p.ring().sleep_word());
    }
    let (x, waited) = t.join().unwrap();
    assert_eq!(x, d(7));
    // A lost wake-up would only end at the 20 s timeout.
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
}

#[test]
fn region_is_sealed_and_size_checked() {
    let r = Region::create("sealed", 8192).unwrap();
    let dup = r.fd();
    // SAFETY (test): dup the fd so attach can own its copy.
    let fd2 =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(dup)) };
    let err = Region::attach(fd2, 4096, false).unwrap_err();
    assert!(err.to_string().contains("expected 4096"), "{err}");
    // Shrinking a sealed memfd fails.
    let rc = unsafe { libc::ftruncate(r.fd(), 10) };
    assert_eq!(rc, -1);
    assert!(r.range_ptr(8000, 192).is_some());
    assert!(r.range_ptr(8000, 193).is_none());
    assert!(r.range_ptr(u64::MAX, 2).is_none());
}

#[test]
fn unsealed_memfd_is_refused() {
    let fd = sys::memfd_create("plain").unwrap();
    sys::ftruncate(&fd, 4096).unwrap();
    assert!(matches!(
        Region::attach(fd, 4096, false),
        Err(ferry_shm::RegionError::NotSealed(_))
    ));
}

#[test]
fn fds_cross_a_seqpacket_socket() {
    let dir = std::env::temp_dir().join(format!("ferry-shm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let _ = std::fs::remove_file(&path);
    let listener = sys::seqpacket_listen(&path).unwrap();
    let client = sys::seqpacket_connect(&path).unwrap();
    let server = loop {
        if let Some(s) = sys::accept(&listener).unwrap() {
            break s;
        }
    };
    let cred = sys::peer_cred(&server).unwrap();
    assert_eq!(cred.pid, std::process::id() as i32);
    let region = Region::create("passed", SessionLayout::new(16).total).unwrap();
    unsafe { *region.as_ptr() = 0xAB };
    sys::send_with_fds(&server, b"hello", &[region.fd()]).unwrap();
    let mut buf = [0u8; 64];
    let (n, fds) = sys::recv_with_fds(&client, &mut buf, false)
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(fds.len(), 1);
    let total = SessionLayout::new(16).total;
    let mapped = Region::attach(fds.into_iter().next().unwrap(), total, false).unwrap();
    assert_eq!(unsafe { *mapped.as_ptr() }, 0xAB);
    drop(server);
    assert!(sys::peer_hung_up(&client));
    assert!(sys::recv_with_fds(&client, &mut buf, false)
        .unwrap()
        .is_none());
    let _ = client.as_raw_fd();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn too_long_socket_path_is_a_clear_error() {
    let long = std::path::PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
    let e = sys::seqpacket_connect(&long).unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
}
