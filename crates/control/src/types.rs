//! The openraft type configuration: which types the Raft log, its entries, its nodes and
//! its snapshots are made of, plus short aliases for openraft's generic types. Nothing
//! else lives here.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::command::{Command, Response};
use crate::ids::NodeId;

/// A Raft member as openraft stores it in a membership entry: where to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The node's QUIC address, handed to [`RaftTransport::send`](crate::RaftTransport).
    pub addr: String,
}

impl Peer {
    pub fn new(addr: impl Into<String>) -> Peer {
        Peer { addr: addr.into() }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    /// The control plane's Raft types: commands in, responses out, the serialized
    /// [`ClusterState`](crate::ClusterState) as snapshot.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Peer,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Membership = openraft::Membership<NodeId, Peer>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Peer>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Peer>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Peer>;
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
