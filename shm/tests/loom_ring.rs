#![cfg(loom)]
//! Loom models of the ring protocol: ordering through push/pop, full and
//! empty, and the sleep/wake handshake (a lost wake-up deadlocks the model,
//! which loom reports as a failure).
//!
//! Run: RUSTFLAGS="--cfg loom" cargo test -p ferry-shm --test loom_ring --release

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
struct Mem([u8; 64 * 8]);

fn new_ring(cap: u32) -> (RingProducer, RingConsumer) {
    assert!(ring_bytes(cap) <= std::mem::size_of::<Mem>());
    let mem: StdArc<std::sync::Mutex<Box<Mem>>> =
        StdArc::new(std::sync::Mutex::new(Box::new(Mem([0; 512]))));
    let ptr = mem.lock().unwrap().0.as_mut_ptr();
    let keep: StdArc<dyn Any + Send + Sync> = mem;
    // SAFETY (test): the boxed buffer is owned by `keep` and used only here.
    let ring: Ring = unsafe { Ring::init(ptr, 512, cap, keep) }.unwrap();
    (RingProducer::new(ring.clone()), RingConsumer::new(ring))
}

fn item(n: u64) -> Desc {
    Desc {
        offset: n,
        ..Desc::default()
    }
}

/// The consumer sleeps when empty; the producer wakes it only when told to.
/// Loom explores every interleaving; a lost wake-up is a deadlock.
#[test]
fn no_lost_wakeup() {
    loom::model(|| {
        let (mut p, mut c) = new_ring(2);
        let futex = Arc::new(ModelFutex::new());
        let f2 = futex.clone();
        let consumer = thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < 2 {
                match c.pop().unwrap() {
                    Some(d) => got.push(d.offset),
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
        assert_eq!(consumer.join().unwrap(), vec![0, 1]);
    });
}

/// Full and empty: a producer pushing 3 items into a 2-entry ring must
/// wait for space; the consumer sees every item once, in order.
#[test]
fn full_and_empty_preserve_order() {
    loom::model(|| {
        let (mut p, mut c) = new_ring(2);
        let producer = thread::spawn(move || {
            for n in 0..3 {
                loop {
                    match p.push(&item(n)) {
                        Ok(()) => break,
                        Err(ferry_shm::RingError::Full) => thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            match c.pop().unwrap() {
                Some(d) => got.push(d.offset),
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, vec![0, 1, 2]);
        assert!(c.pop().unwrap().is_none());
    });
}
