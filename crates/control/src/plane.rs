//! [`ControlPlane`], the runtime's handle on the control plane: start a node's Raft
//! member from its directory, bootstrap or change the membership, propose commands
//! (locally on the leader, or forwarded to it), read and watch the applied
//! [`ClusterState`], and answer the Raft messages the runtime receives. The protocol
//! itself is openraft's; the cluster's rules are in `command` and `placement`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::command::{Command, Response};
use crate::config::{self, ControlConfig};
use crate::election::{Contact, Watchdog};
use crate::ids::NodeId;
use crate::network::Network;
use crate::state::{ClusterState, Node, Role};
use crate::storage::{self, LogStore, StateMachine};
use crate::types::{AppendEntriesResponse, Peer, Raft, RaftMetrics};
use crate::wire::{ForwardError, RaftMessage, RaftReply, RaftTransport};

/// Forwarded proposals follow at most this many leader changes before giving up.
const FORWARD_HOPS_MAX: usize = 8;
/// The largest command `propose` takes, encoded: commands hold names and addresses, and
/// a huge one from the network must not reach the log.
pub const COMMAND_BYTES_MAX: usize = 64 << 10;

/// One node's member of the control plane. Cheap to clone; clones share the member.
/// Dropping the handles does not stop the Raft tasks: call [`shutdown`](Self::shutdown).
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    state: watch::Receiver<Arc<ClusterState>>,
    transport: Arc<dyn RaftTransport>,
    config: ControlConfig,
    contact: Arc<Contact>,
}

/// Where this member stands in the Raft group, for status pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub state: ServerState,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This node is not the leader. Forward to `leader` at `leader_addr` (its peer
    /// address), or retry when no leader is known yet.
    #[error("not the leader; the leader is {leader:?} at {leader_addr:?}")]
    NotLeader {
        leader: Option<NodeId>,
        leader_addr: Option<String>,
    },
    /// No answer in time. The command may still be applied later: retry with the same
    /// command (commands are idempotent or epoch-checked, so a retry that comes back
    /// stale means the first attempt won).
    #[error("no answer within {ms} ms; the command may still be applied")]
    Timeout { ms: u64 },
    /// The Raft member stopped (shut down, or a storage failure): fatal for this node.
    #[error("the control plane stopped: {0}")]
    Stopped(String),
    #[error(transparent)]
    Storage(#[from] storage::Error),
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("initialization refused: {0}")]
    Initialize(String),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("the leader did not take the command: {0}")]
    Forward(String),
    #[error("command of {bytes} bytes; the most is {COMMAND_BYTES_MAX}")]
    TooLarge { bytes: usize },
}

impl ControlPlane {
    /// Open the directory (creating it on first start), replay the log, load the
    /// snapshot, and start this node's Raft member. It joins whatever cluster its log
    /// knows; a fresh node waits for [`initialize`](Self::initialize) or for a leader to
    /// add it.
    ///
    /// Fails on invalid settings, on a directory of another node, and on damaged files.
    pub async fn start(
        config: ControlConfig,
        transport: Arc<dyn RaftTransport>,
    ) -> Result<ControlPlane, Error> {
        let raft_config = Arc::new(config.raft_config()?);
        let dir = config.dir.clone();
        let id = config.node_id;
        let (log, machine, state) = storage::blocking(move || {
            storage::prepare_dir(&dir)?;
            let log = LogStore::open(&dir, id)?;
            let (machine, state) = StateMachine::open(&dir)?;
            Ok((log, machine, state))
        })
        .await?;
        let network = Network {
            transport: Arc::clone(&transport),
            backoff: Duration::from_millis(config.unreachable_backoff_ms),
        };
        let raft = Raft::new(id, raft_config, network, log, machine)
            .await
            .map_err(|e| Error::Stopped(e.to_string()))?;
        let contact = Arc::new(Contact::new());
        let armed = Arc::new(AtomicBool::new(false));
        let poll = Duration::from_millis((config.heartbeat_ms / 4).max(1));
        tokio::spawn(crate::election::boot_quiet(
            raft.clone(),
            Arc::clone(&contact),
            Arc::clone(&armed),
            tokio::time::Instant::now(),
            Duration::from_millis(config.boot_quiet_ms),
            poll,
        ));
        if config.fast_election {
            let watchdog = Watchdog {
                id,
                raft: raft.clone(),
                contact: Arc::clone(&contact),
                armed,
                lease: Duration::from_millis(config.election_timeout_max_ms),
                stagger: Duration::from_millis((config.heartbeat_ms / 2).max(1)),
                poll,
                lateness: Arc::clone(&config.lateness),
            };
            tokio::spawn(watchdog.run());
        }
        Ok(ControlPlane {
            inner: Arc::new(Inner {
                id,
                raft,
                state,
                transport,
                config,
                contact,
            }),
        })
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Form a new cluster whose voters are `members` (voters and witnesses; data-only
    /// members join later with [`add_learner`](Self::add_learner)), then register every
    /// member in the cluster state through the leader. Safe to call on several of the
    /// members with the same map, and again after the cluster formed: then it only
    /// registers what is missing.
    ///
    /// Fails when this node is not among `members`, when a member has the role `Member`,
    /// or when registration cannot reach a leader within the propose timeout.
    pub async fn initialize(&self, members: BTreeMap<NodeId, Node>) -> Result<(), Error> {
        if let Some(member) = members.values().find(|n| n.role == Role::Member) {
            return Err(Error::Initialize(format!(
                "{} has role Member; the first members must be voters or witnesses",
                member.id
            )));
        }
        let peers: BTreeMap<NodeId, Peer> = members
            .iter()
            .map(|(id, n)| (*id, Peer::new(n.peer_addr.clone())))
            .collect();
        match self.inner.raft.initialize(peers).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(RaftError::APIError(e @ InitializeError::NotInMembers(_))) => {
                return Err(Error::Initialize(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => return Err(Error::Stopped(e.to_string())),
        }
        for (id, node) in &members {
            let known = self.state().nodes.get(id).is_some_and(|n| {
                n.peer_addr == node.peer_addr
                    && n.http_addr == node.http_addr
                    && n.role == node.role
            });
            if known {
                continue;
            }
            let command = Command::RegisterNode {
                id: *id,
                peer_addr: node.peer_addr.clone(),
                http_addr: node.http_addr.clone(),
                role: node.role,
            };
            if let Response::Rejected(why) = self.propose_via_leader(command).await? {
                return Err(Error::Initialize(format!("registering {id}: {why}")));
            }
        }
        Ok(())
    }

    /// Commit `command` through the log and return what applying it did. Only the leader
    /// proposes; elsewhere this fails at once with [`Error::NotLeader`]. Fails with
    /// [`Error::TooLarge`] for a command over [`COMMAND_BYTES_MAX`] encoded.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: once sent, the command may be applied even if this future is
    /// dropped.
    pub async fn propose(&self, command: Command) -> Result<Response, Error> {
        let size = rmp_serde::to_vec_named(&command).map_or(usize::MAX, |b| b.len());
        if size > COMMAND_BYTES_MAX {
            return Err(Error::TooLarge { bytes: size });
        }
        let ms = self.inner.config.propose_timeout_ms;
        let write = self.inner.raft.client_write(command);
        match tokio::time::timeout(Duration::from_millis(ms), write).await {
            Err(_) => Err(Error::Timeout { ms }),
            Ok(Ok(written)) => Ok(written.data),
            Ok(Err(e)) => Err(self.write_error(e)),
        }
    }

    /// Like [`propose`](Self::propose), but from any node: a follower sends the command
    /// to the leader over the transport and returns its answer, following leader changes
    /// and waiting for an election, up to the propose timeout.
    ///
    /// Fails with [`Error::Timeout`] when no leader answers in time.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe, as `propose`.
    pub async fn propose_via_leader(&self, command: Command) -> Result<Response, Error> {
        let ms = self.inner.config.propose_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(ms);
        let mut hops = 0;
        loop {
            match self.propose(command.clone()).await {
                Err(Error::NotLeader {
                    leader: Some(leader),
                    leader_addr: Some(addr),
                }) if leader != self.id() => {
                    hops += 1;
                    let send = self.inner.transport.send(
                        leader,
                        &addr,
                        RaftMessage::Propose(command.clone()),
                    );
                    match tokio::time::timeout_at(deadline, send).await {
                        Err(_) => return Err(Error::Timeout { ms }),
                        Ok(Ok(RaftReply::Propose(Ok(response)))) => return Ok(response),
                        Ok(Ok(RaftReply::Propose(Err(ForwardError::Failed(why))))) => {
                            return Err(Error::Forward(why))
                        }
                        Ok(Ok(RaftReply::Propose(Err(ForwardError::NotLeader { .. })))) => {}
                        Ok(Ok(other)) => {
                            return Err(Error::Forward(format!(
                                "{leader} answered a proposal with {other:?}"
                            )))
                        }
                        // The leader may have just died: wait for the next one.
                        Ok(Err(e)) => {
                            tracing::debug!(%leader, error = %e, "forwarding a proposal failed")
                        }
                    }
                    if hops >= FORWARD_HOPS_MAX {
                        return Err(Error::Forward(format!(
                            "the leader moved {hops} times; giving up"
                        )));
                    }
                }
                Err(Error::NotLeader { .. }) => {}
                other => return other,
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout { ms });
            }
            tokio::time::sleep(Duration::from_millis(self.inner.config.heartbeat_ms)).await;
        }
    }

    /// This node's last applied log index (cheap: no copy of the metrics).
    pub fn last_applied(&self) -> Option<u64> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|id| id.index)
    }

    /// When this node last heard from a leader it accepts (or granted a vote).
    pub fn last_leader_contact(&self) -> Instant {
        self.inner.contact.last()
    }

    /// The cluster state as applied on this node (it may trail the leader by a few
    /// entries).
    pub fn state(&self) -> Arc<ClusterState> {
        Arc::clone(&self.inner.state.borrow())
    }

    /// A receiver that sees the cluster state after every applied batch of commands.
    pub fn watch(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.inner.state.clone()
    }

    /// The leader as this node last heard of it. Right after a restart that is the leader
    /// of its saved vote, which may be gone; [`propose_via_leader`](Self::propose_via_leader)
    /// copes with that.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// The leader's id and peer address, as this node knows them.
    pub fn leader_addr(&self) -> Option<(NodeId, String)> {
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)?
            .addr
            .clone();
        Some((leader, addr))
    }

    pub fn status(&self) -> Status {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow().clone();
        let membership = m.membership_config.membership();
        Status {
            id: m.id,
            state: m.state,
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|id| id.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }

    /// openraft's metrics, for whoever wants more than [`status`](Self::status).
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.inner.raft.metrics()
    }

    /// Wait until this node knows a leader; return it.
    ///
    /// Fails with [`Error::Timeout`] after `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, Error> {
        let mut metrics = self.inner.raft.metrics();
        let wait = async move {
            let m = metrics.wait_for(|m| m.current_leader.is_some()).await;
            m.map(|m| m.current_leader)
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(Some(leader))) => Ok(leader),
            Ok(Ok(None)) => Err(Error::Stopped("leader vanished".into())),
            Ok(Err(_)) => Err(Error::Stopped("Raft metrics closed".into())),
            Err(_) => Err(Error::Timeout {
                ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// Add `id` at `addr` as a learner (it receives the log, it does not vote) and wait
    /// until it has caught up. Leader only.
    pub async fn add_learner(&self, id: NodeId, addr: &str) -> Result<(), Error> {
        self.inner
            .raft
            .add_learner(id, Peer::new(addr), true)
            .await
            .map(|_| ())
            .map_err(|e| self.write_error(e))
    }

    /// Add `id` at `addr` as a voter (a data node or a witness): first as a learner until
    /// it has caught up, then into the voting configuration. Leader only.
    pub async fn add_voter(&self, id: NodeId, addr: &str) -> Result<(), Error> {
        self.add_learner(id, addr).await?;
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await
    }

    /// Make `voters` the voting configuration; voters left out are removed from the
    /// group. Every id must already be a voter or a learner. Leader only.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), Error> {
        self.change(ChangeMembers::ReplaceAllVoters(voters)).await
    }

    /// Admit `node` to the cluster: register it in the cluster state, then add it to the
    /// Raft group (a voter or witness votes once it has caught up; a member only
    /// learns). Leader only: elsewhere [`Error::NotLeader`].
    pub async fn join(&self, node: crate::state::Node) -> Result<(), Error> {
        let (id, addr, role) = (node.id, node.peer_addr.clone(), node.role);
        let registered = self
            .propose(Command::RegisterNode {
                id,
                peer_addr: node.peer_addr,
                http_addr: node.http_addr,
                role,
            })
            .await?;
        if let Response::Rejected(why) = registered {
            return Err(Error::Forward(why.to_string()));
        }
        let status = self.status();
        if status.voters.contains(&id) {
            return Ok(());
        }
        match role {
            Role::Voter | Role::Witness => self.add_voter(id, &addr).await,
            Role::Member => self.add_learner(id, &addr).await,
        }
    }

    /// Take `id` out of the Raft group, voter or learner. Leader only. The cluster state
    /// is separate: propose [`Command::RemoveNode`] too.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), Error> {
        if self.status().voters.contains(&id) {
            self.change(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
                .await?;
        }
        if self.status().learners.contains(&id) {
            self.change(ChangeMembers::RemoveNodes(BTreeSet::from([id])))
                .await?;
        }
        Ok(())
    }

    /// Build a snapshot now (normally built every `snapshot_logs_since_last` entries).
    pub async fn snapshot_now(&self) -> Result<(), Error> {
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Error::Stopped(e.to_string()))
    }

    /// Answer a message another node's control plane sent through the transport.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe for Raft messages (openraft finishes or drops the request on its own);
    /// a `Propose` may be applied even if the future is dropped.
    pub async fn handle_raft(&self, message: RaftMessage) -> RaftReply {
        let raft = &self.inner.raft;
        let contact = &self.inner.contact;
        match message {
            RaftMessage::AppendEntries(rpc) => {
                let reply = raft.append_entries(rpc).await;
                // Heard from a leader this node accepts: its lease runs again.
                if reply
                    .as_ref()
                    .is_ok_and(|r| !matches!(r, AppendEntriesResponse::HigherVote(_)))
                {
                    contact.touch();
                }
                RaftReply::AppendEntries(reply)
            }
            RaftMessage::Vote(rpc) => {
                let reply = raft.vote(rpc).await;
                // Voted for a candidate: give it the time to win before campaigning.
                if reply.as_ref().is_ok_and(|r| r.vote_granted) {
                    contact.touch();
                }
                RaftReply::Vote(reply)
            }
            RaftMessage::InstallSnapshot(rpc) => {
                let reply = raft.install_snapshot(rpc).await;
                if reply.is_ok() {
                    contact.touch();
                }
                RaftReply::InstallSnapshot(reply)
            }
            // Leases are the runtime's to grant (it answers pings before they get here):
            // this only names the leader.
            RaftMessage::Ping { .. } => RaftReply::Pong {
                leader: self.leader(),
                applied: None,
            },
            RaftMessage::Join(node) => {
                RaftReply::Join(self.join(node).await.map_err(|e| match e {
                    Error::NotLeader {
                        leader,
                        leader_addr,
                    } => ForwardError::NotLeader {
                        leader,
                        leader_addr,
                    },
                    other => ForwardError::Failed(other.to_string()),
                }))
            }
            RaftMessage::Propose(command) => {
                RaftReply::Propose(self.propose(command).await.map_err(|e| match e {
                    Error::NotLeader {
                        leader,
                        leader_addr,
                    } => ForwardError::NotLeader {
                        leader,
                        leader_addr,
                    },
                    // A stopped node leads nothing: the sender should wait for the leader.
                    Error::Stopped(_) => ForwardError::NotLeader {
                        leader: None,
                        leader_addr: None,
                    },
                    other => ForwardError::Failed(other.to_string()),
                }))
            }
        }
    }

    /// Stop this node's Raft member. Messages that arrive afterwards are answered with an
    /// error; other clones of this handle stop working too.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| Error::Stopped(e.to_string()))
    }

    async fn change(&self, changes: ChangeMembers<NodeId, Peer>) -> Result<(), Error> {
        self.inner
            .raft
            .change_membership(changes, false)
            .await
            .map(|_| ())
            .map_err(|e| self.write_error(e))
    }

    fn write_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, Peer>>) -> Error {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
                leader: f.leader_id,
                leader_addr: f.leader_node.map(|n| n.addr),
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                Error::Membership(e.to_string())
            }
            RaftError::Fatal(e) => Error::Stopped(e.to_string()),
        }
    }
}
