//! Waiting: spin for a bounded time, then sleep. The sleeping side pays at
//! most one wake-up per batch, and none while it keeps up.

use std::time::{Duration, Instant};

#[cfg(not(loom))]
use crate::ring::{RingConsumer, RingError, SLEEPING};
use crate::sys;

/// Spins between checks, handing the CPU to other runnable threads now and
/// then so that a spinner never starves the process it waits for on a
/// machine with fewer cores than busy threads.
pub struct Spinner {
    iters: u32,
}

impl Spinner {
    pub fn new() -> Spinner {
        Spinner { iters: 0 }
    }

    pub fn spin(&mut self) {
        self.iters = self.iters.wrapping_add(1);
        if self.iters.is_multiple_of(256) {
            sys::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

impl Default for Spinner {
    fn default() -> Self {
        Self::new()
    }
}

/// Sleeps on the consumer's futex until the producer wakes us or `timeout`
/// passes. Returns immediately when data arrived meanwhile.
#[cfg(not(loom))]
pub fn futex_sleep(cons: &mut RingConsumer, timeout: Duration) -> Result<(), RingError> {
    if cons.prepare_sleep()? {
        sys::futex_wait(cons.ring().sleep_word(), SLEEPING, Some(timeout));
        cons.finish_sleep();
    }
    Ok(())
}

/// Time left until `deadline` (`None`: forever), capped at `cap`.
pub fn remaining(deadline: Option<Instant>, cap: Duration) -> Option<Duration> {
    match deadline {
        None => Some(cap),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                None
            } else {
                Some((d - now).min(cap))
            }
        }
    }
}
