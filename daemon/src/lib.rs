//! ferryd: the Ferry data-plane daemon (single host for now).
#![deny(unsafe_code)]

pub mod config;
pub mod error;
#[allow(unsafe_code)]
pub mod fabric;
pub mod gpu;
pub mod http;
pub mod idhash;
pub mod inbox;
pub mod landing;
pub mod log;
pub mod membership;
pub mod metrics;
pub mod peers;
pub mod placement;
pub mod ratelimit;
pub mod server;
pub mod sink;
pub mod stream;
