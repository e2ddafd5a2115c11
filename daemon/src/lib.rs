//! ferryd: the Ferry data-plane daemon (single host for now).
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod gpu;
pub mod idhash;
pub mod inbox;
pub mod peers;
pub mod placement;
pub mod ratelimit;
pub mod server;
pub mod sink;
pub mod stream;
