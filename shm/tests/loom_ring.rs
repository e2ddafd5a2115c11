#![cfg(loom)]
//! Loom models of the ring protocol: the descriptor hand-off through the
//! slot's sequence number (descriptor bytes live in loom cells, so loom
//! reports any read not ordered after its write, and any write racing a
//! read), wrap-around with the consumer's lazily published head, full and
//! empty, and the sleep/wake handshake (a lost wake-up deadlocks the model,
//! which loom reports as a failure).
//!
//! Run: RUSTFLAGS="--cfg loom" cargo test -p ferry-shm --test loom_ring --release
//! With FERRY_RING_MUTANT=<seq_relaxed|head_early|wake_load|check_first>
//! the ring runs a broken variant and some model here must fail
//! (`scripts/test.sh` checks that each does).

use std::any::Any;
use std::sync::Arc as StdArc;

use ferry_shm::ring::{ring_bytes, Ring, RingConsumer, RingProducer, SLEEPING};
use ferry_shm::Desc;
use loom::sync::atomic::Ordering;
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

/// A futex modelled with a mutex and condvar: `wait` sleeps only while the
/// word still holds `expected` when checked under the lock, and `wake`
/// takes the lock, exactly the guarantee the kernel gives.
struct ModelFutex {
    m: Mutex<()>,
    cv: Condvar,
}

impl ModelFutex {
    fn new() -> Self {
        ModelFutex {
            m: Mutex::new(()),
            cv: Condvar::new(),
        }
    }
    fn wait(&self, word: &loom::sync::atomic::AtomicU32, expected: u32) {
        let g = self.m.lock().unwrap();
        if word.load(Ordering::SeqCst) == expected {
            drop(self.cv.wait(g).unwrap());
        }
    }
    fn wake(&self) {
        let _g = self.m.lock().unwrap();
        self.cv.notify_all();
    }
}

#[repr(C, align(64))]
struct Line([u8; 64]);

fn new_ring(cap: u32) -> (RingProducer, RingConsumer) {
    // Loom's atomics and cells are larger than std's: size the memory
    // from this build's layout.
    let lines = ring_bytes(cap).div_ceil(64);
    let mem: StdArc<std::sync::Mutex<Vec<Line>>> = StdArc::new(std::sync::Mutex::new(
        (0..lines).map(|_| Line([0; 64])).collect(),
    ));
    let ptr = mem.lock().unwrap().as_mut_ptr().cast::<u8>();
    let keep: StdArc<dyn Any + Send + Sync> = mem;
    // SAFETY (test): the buffer is owned by `keep`, 64-byte aligned, large
    // enough, and used only by this ring.
    let ring: Ring = unsafe { Ring::init(ptr, lines * 64, cap, keep) }.unwrap();
    (RingProducer::new(ring.clone()), RingConsumer::new(ring))
}

/// A descriptor whose every field derives from `n`, so that a torn or
/// stale copy shows.
fn item(n: u64) -> Desc {
    Desc {
        op: n as u16 + 1,
        stream: n as u32 * 7,
        len: n * 11,
        offset: n,
        cookie: !n,
        dslot: n as u32 + 3,
        ..Desc::default()
    }
}

/// Pushes `item(n)`, yielding while the ring is full.
fn push_when_room(p: &mut RingProducer, n: u64) {
    loop {
        match p.push(&item(n)) {
            Ok(()) => return,
            Err(ferry_shm::RingError::Full) => thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

/// The consumer sleeps when empty; the producer wakes it only when told to.
/// Loom explores every interleaving; a lost wake-up is a deadlock.
#[test]
fn no_lost_wakeup() {
    model(|| {
        let (mut p, mut c) = new_ring(2);
        let futex = Arc::new(ModelFutex::new());
        let f2 = futex.clone();
        let consumer = thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < 2 {
                match c.pop().unwrap() {
                    Some(d) => got.push(d),
                    None => {
                        if c.prepare_sleep().unwrap() {
                            f2.wait(c.ring().sleep_word(), SLEEPING);
                            c.finish_sleep();
                        }
                    }
                }
            }
            got
        });
        for n in 0..2 {
            p.push(&item(n)).unwrap();
            if p.wake_needed() {
                futex.wake();
            }
        }
        assert_eq!(consumer.join().unwrap(), vec![item(0), item(1)]);
    });
}

/// Full and empty through wrap-around: a producer pushing 3 items into a
/// 2-entry ring must wait for room (which it learns only from the
/// consumer's published head) and then rewrites a slot the consumer has
/// read; the consumer sees every item once, whole and in order.
#[test]
fn wraparound_hands_over_whole_descriptors_in_order() {
    model(|| {
        let (mut p, mut c) = new_ring(2);
        let producer = thread::spawn(move || {
            for n in 0..3 {
                push_when_room(&mut p, n);
            }
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            match c.pop().unwrap() {
                Some(d) => got.push(d),
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, vec![item(0), item(1), item(2)]);
        assert!(c.pop().unwrap().is_none());
    });
}

/// A consumer that only polls (never sleeps) on a ring whose head it
/// publishes in batches still lets a producer that filled the ring go on.
#[test]
fn batched_head_never_stalls_a_full_producer() {
    model(|| {
        // Capacity 32: the head is published every 2 descriptors.
        let (mut p, mut c) = new_ring(32);
        let producer = thread::spawn(move || {
            // Fill it without the consumer, then one more.
            for n in 0..33 {
                push_when_room(&mut p, n);
            }
        });
        let mut n = 0;
        while n < 33 {
            match c.pop().unwrap() {
                Some(d) => {
                    assert_eq!(d, item(n));
                    n += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
    });
}
