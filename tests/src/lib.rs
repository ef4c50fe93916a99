//! Harness for the integration tests: they mount for real (kernel overlayfs as the oracle, the
//! FUSE overlay under test, Debian's fuse-overlayfs for interop) and compare what they see.
//!
//! - [`buildah`]: a rootless `buildah bud` (the build user, base image, context, Dockerfile).
//! - [`buildkit`]: rootless BuildKit (buildkitd under RootlessKit) building one Dockerfile
//!   offline on a chosen snapshotter; the unpacked image and its description.
//! - [`env`]: where the binaries are, privilege checks (`SKIPPED` / CI failure), deadlines.
//! - [`mount`]: a guard that mounts kernel overlayfs or a FUSE overlay and always unmounts.
//! - [`layers`]: declarative lower/upper layer trees, materialized once per filesystem.
//! - [`snapshot`]: a normalized description of a merged view, and its diff.
//! - [`ops`]: a list of filesystem operations applied to a mount, errno recorded per step.
//! - [`upper`]: a normalized description of an upper directory after unmount.
//! - [`fsck`]: a checker of an upper directory's on-disk format after unmount.
//! - [`held`]: a lower log appended to beside a reader opened before the appends.
//! - [`rng`]: a small deterministic PRNG for the random-operation tests.
//! - [`scenario`]: runs one tree + op list on kernel overlay and on the FUSE overlay and
//!   compares everything.

pub mod buildah;
pub mod buildkit;
pub mod env;
pub mod fsck;
pub mod held;
pub mod layers;
pub mod mount;
pub mod ops;
pub mod rng;
pub mod scenario;
pub mod snapshot;
pub mod upper;

pub use env::{bin_under_test, fuse_overlayfs_bin, require_privileged, skip};
