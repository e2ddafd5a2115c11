//! Rate-limited logging for every line a client can make ferryd write:
//! each call site may log [`BURST`] lines per second; the lines it drops
//! are counted and reported (`suppressed = N`) with its next line, so a
//! flood of bad clients costs a few lines a second, not the disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines per call site per second.
pub const BURST: u64 = 10;

/// One call site's budget. `const`-constructible, so each use of
/// [`limited!`](crate::limited) keeps its own in a `static`.
pub struct Limiter {
    /// (second, count) packed: second since start in the high 40 bits,
    /// lines logged in that second in the low 24.
    window: AtomicU64,
    suppressed: AtomicU64,
}

fn now_s() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl Limiter {
    pub const fn new() -> Limiter {
        Limiter {
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(dropped since the last line)` when this line may be logged.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_s())
    }

    fn allow_at(&self, sec: u64) -> Option<u64> {
        let mut cur = self.window.load(Ordering::Relaxed);
        loop {
            let (wsec, count) = (cur >> 24, cur & 0xFF_FFFF);
            let next = if wsec == sec {
                if count >= BURST {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                cur + 1
            } else {
                (sec << 24) | 1
            };
            // Relaxed: the counter orders nothing but itself.
            match self
                .window
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(v) => cur = v,
            }
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new()
    }
}

/// `limited!(WARN, field = value, "message {}", x)`: a `tracing` event at
/// that level, at most [`BURST`] a second from this call site.
#[macro_export]
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::Limiter = $crate::ratelimit::Limiter::new();
        if tracing::enabled!(tracing::Level::$level) {
            if let Some(suppressed) = LIMIT.allow() {
                if suppressed > 0 {
                    tracing::event!(tracing::Level::$level, suppressed, $($arg)+);
                } else {
                    tracing::event!(tracing::Level::$level, $($arg)+);
                }
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_second_then_counts_what_it_dropped() {
        let l = Limiter::new();
        for _ in 0..BURST {
            assert_eq!(l.allow_at(5), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(l.allow_at(5), None);
        }
        assert_eq!(l.allow_at(6), Some(7), "the next second reports the drops");
        assert_eq!(l.allow_at(6), Some(0));
    }
}
