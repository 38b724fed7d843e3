//! openraft's network traits over a [`RaftTransport`]: each Raft RPC becomes a
//! [`RaftMessage`], each reply is unpacked back into openraft's result types, and a
//! transport failure becomes the `RPCError` that tells openraft whether to back off.
//! Snapshots go out in chunks through openraft's default `full_snapshot`.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};

use crate::ids::NodeId;
use crate::types::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    Peer, TypeConfig, VoteRequest, VoteResponse,
};
use crate::wire::{RaftMessage, RaftReply, RaftTransport, TransportError};

/// Hands openraft one [`Connection`] per replication target.
pub(crate) struct Network {
    pub(crate) transport: Arc<dyn RaftTransport>,
    /// How long to leave an unreachable node alone before trying again.
    pub(crate) backoff: Duration,
}

/// Sends to one node. Connects lazily: the transport owns the actual links.
pub(crate) struct Connection {
    target: NodeId,
    addr: String,
    transport: Arc<dyn RaftTransport>,
    backoff: Duration,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Peer, E>>;

/// A reply in the wrong variant: the peer runs something else, or the transport mixed
/// up its streams.
#[derive(Debug, thiserror::Error)]
#[error("node {target} answered a {asked} request with {got}")]
struct WrongReply {
    target: NodeId,
    asked: &'static str,
    got: &'static str,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Peer) -> Connection {
        Connection {
            target,
            addr: node.addr.clone(),
            transport: Arc::clone(&self.transport),
            backoff: self.backoff,
        }
    }
}

impl Connection {
    async fn call<E: std::error::Error>(&self, message: RaftMessage) -> RpcResult<RaftReply, E> {
        self.transport
            .send(self.target, &self.addr, message)
            .await
            .map_err(|e| match &e {
                TransportError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
                TransportError::Failed(_) => RPCError::Network(NetworkError::new(&e)),
            })
    }

    fn wrong<E: std::error::Error>(
        &self,
        asked: &'static str,
        got: &RaftReply,
    ) -> RPCError<NodeId, Peer, E> {
        let got = match got {
            RaftReply::AppendEntries(_) => "AppendEntries",
            RaftReply::Vote(_) => "Vote",
            RaftReply::InstallSnapshot(_) => "InstallSnapshot",
            RaftReply::Propose(_) => "Propose",
            RaftReply::Pong { .. } => "Pong",
            RaftReply::Join(_) => "Join",
        };
        RPCError::Network(NetworkError::new(&WrongReply {
            target: self.target,
            asked,
            got,
        }))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse, RaftError<NodeId>> {
        match self.call(RaftMessage::AppendEntries(rpc)).await? {
            RaftReply::AppendEntries(Ok(response)) => Ok(response),
            RaftReply::AppendEntries(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.wrong("AppendEntries", &other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse, RaftError<NodeId, InstallSnapshotError>> {
        match self.call(RaftMessage::InstallSnapshot(rpc)).await? {
            RaftReply::InstallSnapshot(Ok(response)) => Ok(response),
            RaftReply::InstallSnapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.wrong("InstallSnapshot", &other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse, RaftError<NodeId>> {
        match self.call(RaftMessage::Vote(rpc)).await? {
            RaftReply::Vote(Ok(response)) => Ok(response),
            RaftReply::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.wrong("Vote", &other)),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }
}
