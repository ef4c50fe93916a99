//! rustfuse-snapshotter: containerd's snapshots API v1 over kernel overlayfs or rustfuse.
//!
//! - [`api`]: wire types (our own protos, compiled with protox + tonic-prost-build).
//! - [`store`]: the redb metadata store (keys live only there; disk uses numeric ids).
//! - [`info`]: the snapshotter's own [`info::Kind`] and [`info::Info`].
//! - [`snapshotter`]: the semantics of the ten RPCs, synchronous, no gRPC types beyond Mount.
//! - [`service`]: the tonic service: a span per call, blocking work off the runtime, the
//!   conversions between wire and own types.
//! - [`filter`], [`labels`]: pure parsers and rules.
//! - [`mounts`], [`mode`], [`usage`]: mount specs, mode detection (doctor), disk usage.
//! - [`redirects`]: which layers hold directory redirects, for the mode choice.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod error;
pub mod filter;
pub mod info;
pub mod labels;
pub mod mode;
pub mod mounts;
pub mod redirects;
pub mod service;
pub mod snapshotter;
pub mod store;
pub mod usage;

pub use error::{Error, Result};
