//! Atomics used by the rings: std's normally, loom's under `--cfg loom` so
//! that `tests/loom_ring.rs` can model-check the ring protocol.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU32, Ordering};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU32, Ordering};
