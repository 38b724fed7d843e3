//! Cluster membership for a node: its QUIC links (`understudy-net`) and its seat in
//! the control plane (`understudy-control`, a Raft group whose leader is the master).
//! This module is the driver that connects the two: it carries Raft messages over the
//! `Control` channel and answers `GET /v1/cluster`.
//!
//! Not yet here (issue 3): deploy through the master with placement, replication of each
//! function's log to its backups (the engine is in `replication`), forwarding of
//! invocations to primaries, catch-up.
//!
//! **Invariant:** every byte between nodes goes over mutually authenticated QUIC; a peer
//! is known by the node id in its certificate, never by what it claims in a message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use understudy_control::{
    BoxFuture, ControlConfig, ControlPlane, NodeId, RaftMessage, RaftReply, RaftTransport, Role,
    TransportError,
};
use understudy_net::{Channel, Handler, HandlerFuture, Identity, Transport};

/// How long a Raft message may take before the peer counts as unreachable for it.
const RAFT_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// The `[cluster]` section of a node's config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node_id: u64,
    /// The QUIC address this node listens on for its peers.
    pub peer_listen: SocketAddr,
    /// Where `understudy cluster init` wrote the CA and node certificates.
    pub certs_dir: PathBuf,
    /// `voter` (hosts functions and votes) or `witness` (votes only).
    #[serde(default = "default_role")]
    pub role: String,
    /// The founding members. On first start, the member with the lowest id bootstraps
    /// the Raft group with all of them; later starts recover from the data directory.
    pub members: Vec<Member>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u64,
    pub peer_addr: SocketAddr,
    #[serde(default)]
    pub http_addr: String,
    #[serde(default = "default_role")]
    pub role: String,
}

fn default_role() -> String {
    "voter".into()
}

fn parse_role(role: &str) -> Result<Role, Error> {
    match role {
        "voter" => Ok(Role::Voter),
        "witness" => Ok(Role::Witness),
        other => Err(Error::Config(format!(
            "role must be \"voter\" or \"witness\", got {other:?}"
        ))),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster config: {0}")]
    Config(String),
    #[error(transparent)]
    Certs(#[from] understudy_net::certs::Error),
    #[error("QUIC: {0}")]
    Net(#[from] understudy_net::transport::Error),
    #[error("control plane: {0}")]
    Control(#[from] understudy_control::Error),
}

/// This node's place in the cluster.
pub struct Cluster {
    id: NodeId,
    role: Role,
    transport: Transport,
    control: ControlPlane,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Bind the QUIC endpoint, start the control plane (state in `data_dir/control`),
    /// and bootstrap the Raft group if this is the founding member's first start.
    ///
    /// Fails when the config is inconsistent, the certificates do not load, the address
    /// cannot be bound, or the control plane's files are damaged.
    pub async fn start(
        config: &Config,
        data_dir: &Path,
        http_addr: SocketAddr,
    ) -> Result<Cluster, Error> {
        let role = parse_role(&config.role)?;
        let mut members = BTreeMap::new();
        for m in &config.members {
            let mut node = understudy_control::Node::new(
                NodeId(m.id),
                m.peer_addr.to_string(),
                m.http_addr.clone(),
                parse_role(&m.role)?,
            );
            if m.id == config.node_id {
                node.http_addr = http_addr.to_string();
            }
            members.insert(NodeId(m.id), node);
        }
        if !members.contains_key(&NodeId(config.node_id)) {
            return Err(Error::Config(format!(
                "node {} is not among the members",
                config.node_id
            )));
        }
        let identity = Identity::load(&config.certs_dir, config.node_id)?;
        let transport = Transport::bind(
            &identity,
            config.peer_listen,
            understudy_net::Config::default(),
        )?;
        let dispatch = Arc::new(Dispatch {
            control: OnceLock::new(),
        });
        let raft_transport = Arc::new(QuicRaft {
            transport: transport.clone(),
        });
        let control = ControlPlane::start(
            ControlConfig::new(NodeId(config.node_id), data_dir.join("control")),
            raft_transport,
        )
        .await?;
        let _ = dispatch.control.set(control.clone());
        {
            let transport = transport.clone();
            tokio::spawn(async move { transport.serve(dispatch).await });
        }
        let founder = members.keys().next().copied();
        if founder == Some(NodeId(config.node_id)) && control.status().last_log_index.is_none() {
            // In the background: the other members may not be up yet, and the node
            // must serve (and answer health checks) meanwhile.
            let control = control.clone();
            tokio::spawn(async move {
                while control.status().last_log_index.is_none() {
                    match control.initialize(members.clone()).await {
                        Ok(()) => tracing::info!("bootstrapped the control plane"),
                        Err(e) => {
                            tracing::info!(error = %e, "bootstrapping the control plane; waiting for the other members")
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        tracing::info!(node = config.node_id, peer_addr = %config.peer_listen, "joined the cluster links");
        Ok(Cluster {
            id: NodeId(config.node_id),
            role,
            transport,
            control,
        })
    }

    pub fn control(&self) -> &ControlPlane {
        &self.control
    }

    /// The cluster as this node sees it: for people (`understudy status`) and tools.
    pub fn status(&self) -> serde_json::Value {
        let status = self.control.status();
        let state = self.control.state();
        let nodes: Vec<serde_json::Value> = state
            .nodes
            .values()
            .map(|n| {
                serde_json::json!({
                    "id": n.id.0,
                    "peer_addr": n.peer_addr,
                    "http_addr": n.http_addr,
                    "role": format!("{:?}", n.role).to_lowercase(),
                    "status": format!("{:?}", n.status).to_lowercase(),
                    "health": format!("{:?}", n.health).to_lowercase(),
                    "master": status.leader == Some(n.id),
                    "voter": status.voters.contains(&n.id),
                })
            })
            .collect();
        serde_json::json!({
            "node": self.id.0,
            "role": format!("{:?}", self.role).to_lowercase(),
            "raft": {
                "state": format!("{:?}", status.state).to_lowercase(),
                "term": status.term,
                "leader": status.leader.map(|l| l.0),
                "last_log_index": status.last_log_index,
                "last_applied_index": status.last_applied_index,
                "voters": status.voters.iter().map(|v| v.0).collect::<Vec<_>>(),
                "learners": status.learners.iter().map(|v| v.0).collect::<Vec<_>>(),
            },
            "nodes": nodes,
        })
    }

    /// Leave cleanly: stop Raft and close the QUIC endpoint.
    pub async fn shutdown(&self) {
        if let Err(e) = self.control.shutdown().await {
            tracing::warn!(error = %e, "control plane shutdown");
        }
        self.transport.close().await;
    }
}

/// Raft messages over the `Control` channel.
struct QuicRaft {
    transport: Transport,
}

impl RaftTransport for QuicRaft {
    fn send(
        &self,
        target: NodeId,
        addr: &str,
        message: RaftMessage,
    ) -> BoxFuture<Result<RaftReply, TransportError>> {
        let transport = self.transport.clone();
        let addr = addr.to_owned();
        Box::pin(async move {
            let addr: SocketAddr = addr.parse().map_err(|e| {
                TransportError::Unreachable(format!("bad peer address {addr:?}: {e}"))
            })?;
            let body = message
                .encode()
                .map_err(|e| TransportError::Failed(e.to_string()))?;
            let reply = transport
                .request_within(
                    target.0,
                    addr,
                    Channel::Control,
                    Bytes::from(body),
                    RAFT_REQUEST_TIMEOUT,
                )
                .await
                .map_err(|e| TransportError::Unreachable(e.to_string()))?;
            RaftReply::decode(&reply).map_err(|e| TransportError::Failed(e.to_string()))
        })
    }
}

/// Routes what arrives over QUIC to the part of the node that handles it.
struct Dispatch {
    control: OnceLock<ControlPlane>,
}

impl Handler for Dispatch {
    fn handle(&self, peer: u64, channel: Channel, body: Bytes) -> HandlerFuture<'_> {
        Box::pin(async move {
            match channel {
                Channel::Control => {
                    let Some(control) = self.control.get() else {
                        return Bytes::new();
                    };
                    let message = match RaftMessage::decode(&body) {
                        Ok(message) => message,
                        Err(e) => {
                            tracing::warn!(peer, error = %e, "undecodable control message");
                            return Bytes::new();
                        }
                    };
                    let reply = control.handle_raft(message).await;
                    match reply.encode() {
                        Ok(bytes) => Bytes::from(bytes),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode a control reply");
                            Bytes::new()
                        }
                    }
                }
                Channel::Replication | Channel::Bulk => {
                    tracing::warn!(peer, %channel, "no handler for this channel yet");
                    Bytes::new()
                }
            }
        })
    }
}
