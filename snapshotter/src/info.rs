//! What a snapshot is, in the snapshotter's own terms: its [`Kind`] and its [`Info`]. The
//! wire forms (`api::snapshots::Kind`, `api::snapshots::Info`) are converted to and from
//! these at the gRPC edge only ([`crate::service`]).

use std::collections::HashMap;
use std::time::SystemTime;

/// Snapshot kinds. The discriminants are the metadata store's encoding (the same numbers
/// as the wire's, which the service does not rely on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    View = 1,
    Active = 2,
    Committed = 3,
}

impl Kind {
    /// The kind stored as `v`, or None for a number that is no kind.
    pub fn from_i32(v: i32) -> Option<Kind> {
        match v {
            1 => Some(Kind::View),
            2 => Some(Kind::Active),
            3 => Some(Kind::Committed),
            _ => None,
        }
    }

    /// The name containerd's filters and messages use: `view`, `active`, `committed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// A snapshot as Stat, Update and List describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key (Active, View) or name (Committed).
    pub name: String,
    /// The parent's name, empty for none.
    pub parent: String,
    pub kind: Kind,
    pub labels: HashMap<String, String>,
    /// None only in records written without one (none this build writes).
    pub created: Option<SystemTime>,
    /// None only in records written without one (none this build writes).
    pub updated: Option<SystemTime>,
}
