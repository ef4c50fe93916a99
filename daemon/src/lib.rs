//! rustfuse: a copy-on-write overlay filesystem in userspace, a drop-in for fuse-overlayfs.
//!
//! - [`options`]: the `-o` option codec (pure; used by the snapshotter too).
//! - [`sys`]: the one seam for kernel calls; the only module with `unsafe`.
//! - [`overlay`]: the layer stack, lookup, whiteouts, copy-up, inode table. No FUSE types.
//! - `fuse` (feature `fuse`): the thin adapter from fuser requests to [`overlay`].
//! - `pacer` (feature `fuse`): which session thread reads the next request.

#[cfg(feature = "fuse")]
pub mod fuse;
pub mod options;
pub mod overlay;
#[cfg(feature = "fuse")]
pub mod pacer;
pub mod sys;
