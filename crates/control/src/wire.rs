//! What travels between control planes, and the seam to whatever carries it. The
//! control plane does no networking: it hands a [`RaftMessage`] to a [`RaftTransport`]
//! (the runtime implements it over QUIC) and answers the messages the runtime receives
//! with [`ControlPlane::handle_raft`](crate::ControlPlane::handle_raft). Both directions
//! encode with rmp-serde (named fields) through [`RaftMessage::encode`] and friends.

use std::future::Future;
use std::pin::Pin;

use openraft::error::{InstallSnapshotError, RaftError};
use serde::{Deserialize, Serialize};

use crate::command::{Command, Response};
use crate::ids::NodeId;
use crate::types::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

/// A boxed future, as [`RaftTransport::send`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Carries control-plane messages to other nodes. The runtime implements it over its
/// QUIC links; tests implement it in memory.
///
/// Requirements on an implementation:
///
/// - A message for `target` reaches node `target` and no other: the QUIC layer checks
///   the peer certificate's node id. A reply from the wrong node could count a vote twice.
/// - It answers with the reply the other side's `handle_raft` produced, or an error. It
///   should not wait much longer than a heartbeat interval for a dead peer: openraft
///   drops the future on its own timeout (heartbeat interval for appends, the minimum
///   election timeout for votes), so the future must be cancel safe.
/// - Heartbeats must not queue behind a snapshot transfer: use one stream per call, or a
///   separate stream for `InstallSnapshot`.
pub trait RaftTransport: Send + Sync + 'static {
    /// Deliver `message` to node `target` at `addr` (the address it registered in the
    /// Raft membership) and return its reply.
    fn send(
        &self,
        target: NodeId,
        addr: &str,
        message: RaftMessage,
    ) -> BoxFuture<Result<RaftReply, TransportError>>;
}

/// Why a message got no reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection to the node (refused, no route, handshake failed). Raft waits a
    /// back-off interval before trying that node again.
    #[error("node unreachable: {0}")]
    Unreachable(String),
    /// The exchange failed some other way (stream reset, timeout, bad reply). Raft
    /// retries at its next heartbeat.
    #[error("exchange failed: {0}")]
    Failed(String),
}

/// A request from one control plane to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftMessage {
    AppendEntries(AppendEntriesRequest),
    Vote(VoteRequest),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest),
    /// A command for the leader from a node that is not the leader.
    Propose(Command),
    /// A node to the master: alive, and asking for a lease (see the runtime's
    /// `cluster::lease`). `lateness` is the sender's local health score (see
    /// `lateness`): a node whose own timers run late is given longer before it is
    /// suspected.
    Ping {
        lateness: u8,
    },
    /// A new node asks to join the cluster (the receiver forwards it to the leader).
    Join(crate::state::Node),
}

/// The answer to a [`RaftMessage`], in the variant of the same name.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse, RaftError<NodeId>>),
    Vote(Result<VoteResponse, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse, RaftError<NodeId, InstallSnapshotError>>),
    Propose(Result<Response, ForwardError>),
    /// `leader` is the leader the receiver knows; when that is the receiver itself,
    /// `applied` is its last applied log index (the lease's condition).
    Pong {
        leader: Option<NodeId>,
        applied: Option<u64>,
    },
    Join(Result<(), ForwardError>),
}

/// Why a forwarded command was not applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    /// The receiver is not the leader (any more); it names the one it knows.
    #[error("not the leader; the leader is {leader:?} at {leader_addr:?}")]
    NotLeader {
        leader: Option<NodeId>,
        leader_addr: Option<String>,
    },
    /// The leader took it but could not answer (timeout, shutting down): the command may
    /// or may not be applied.
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot encode a control message: {0}")]
    Encode(String),
    #[error("undecodable control message: {0}")]
    Decode(String),
}

impl RaftMessage {
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        rmp_serde::to_vec_named(self).map_err(|e| Error::Encode(e.to_string()))
    }

    /// Fails on bytes that are not a message of this version; never panics.
    pub fn decode(bytes: &[u8]) -> Result<RaftMessage, Error> {
        rmp_serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))
    }
}

impl RaftReply {
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        rmp_serde::to_vec_named(self).map_err(|e| Error::Encode(e.to_string()))
    }

    /// Fails on bytes that are not a reply of this version; never panics.
    pub fn decode(bytes: &[u8]) -> Result<RaftReply, Error> {
        rmp_serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Epoch;

    #[test]
    fn propose_round_trips() {
        let message = RaftMessage::Propose(Command::Promote {
            function: "bank".into(),
            new_primary: NodeId(2),
            expected_epoch: Epoch(4),
        });
        let bytes = message.encode().expect("encodes");
        match RaftMessage::decode(&bytes).expect("decodes") {
            RaftMessage::Propose(Command::Promote {
                function,
                new_primary,
                expected_epoch,
            }) => {
                assert_eq!(
                    (function.as_str(), new_primary, expected_epoch),
                    ("bank", NodeId(2), Epoch(4))
                );
            }
            other => panic!("decoded into {other:?}"),
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], b"\xc1", b"\x81\xa4Vote\xc0", &[0xff; 64]] {
            assert!(RaftMessage::decode(bytes).is_err());
            assert!(RaftReply::decode(bytes).is_err());
        }
    }
}
