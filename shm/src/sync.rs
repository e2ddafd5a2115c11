//! Atomics and the descriptor cell used by the rings: std's normally,
//! loom's under `--cfg loom` so that `tests/loom_ring.rs` can model-check
//! the ring protocol, descriptor hand-off included.

#[cfg(loom)]
pub use loom::cell::UnsafeCell as DescCell;
#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU32, Ordering};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU32, Ordering};

/// A descriptor's bytes in a ring slot. Outside loom a plain
/// `UnsafeCell` (the same size as its contents, so the shared layout is
/// exact); under loom, loom's, which checks every access against the
/// happens-before order the ring's atomics establish.
#[cfg(not(loom))]
#[repr(transparent)]
pub struct DescCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> DescCell<T> {
    pub fn new(v: T) -> Self {
        DescCell(std::cell::UnsafeCell::new(v))
    }

    pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
