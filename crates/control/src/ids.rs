//! Identities the control plane hands out and checks: a node's id and a function
//! assignment's epoch. Small newtypes, so that a node id is never mistaken for an epoch
//! or a log index; both encode as a bare unsigned integer on disk and on the wire.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's identity in the cluster, stable for the node's lifetime (it is written into
/// the node's control directory and checked on every start). It is also the openraft
/// node id.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

impl From<u64> for NodeId {
    fn from(id: u64) -> NodeId {
        NodeId(id)
    }
}

/// The configuration number of one function's replica set. It starts at 1 when the
/// function is placed and grows by one whenever the set of nodes that must acknowledge a
/// commit (primary and backups) changes. Every replication message carries it, and a
/// replica rejects a message from an older epoch: that is what fences a zombie primary.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch of a freshly placed function.
    pub const FIRST: Epoch = Epoch(1);

    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}
