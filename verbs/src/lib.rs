//! Ferry's fabric: one verbs API over several backends.
//!
//! - [`Provider`] discovers devices and opens one as a [`Domain`] (protection
//!   domain plus completion queues).
//! - [`Domain::register`] registers memory as a [`MemoryRegion`] (lkey, rkey).
//! - Endpoints are reliable connected queue pairs, brought up as a
//!   typestate: [`Domain::endpoint`] gives a [`PendingEndpoint`], whose
//!   [`EndpointInfo`] the caller exchanges out of band (it is postcard
//!   serialisable); [`PendingEndpoint::connect`] with the peer's info gives
//!   a connected [`Endpoint`]. Path MTU is the minimum of both sides.
//! - Work is posted with [`Endpoint::post_send`] (send, write, write with
//!   immediate, read; scatter-gather; signalled or not) and
//!   [`Endpoint::post_recv`]; results arrive as [`Completion`]s on the
//!   endpoint's [`CompletionQueue`]s. Errors are completions, as on a NIC:
//!   a bad rkey or an address outside the remote region completes with
//!   [`WcStatus::RemoteAccess`]; a vanished peer fails pending work with
//!   [`WcStatus::RetryExceeded`] and flushes the rest with
//!   [`WcStatus::WrFlush`], within the endpoint's timeout. Work posted to
//!   an endpoint in the error state completes with `WrFlush`.
//!
//! Posting is `unsafe`: the memory a work request names must stay valid
//! (and, for receives and reads, unaliased) until its completion is polled,
//! which no safe signature can promise. The layer above keeps buffers in an
//! in-flight table keyed by work-request id.
//!
//! Backends: [`ibv`] (rdma-core through sideway, loaded at run time) and
//! [`soft`] (the same semantics over TCP, on any machine).

mod api;
pub mod frame;
pub mod ibv;
mod mem;
pub mod select;
pub mod soft;

pub use api::*;
