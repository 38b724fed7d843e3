//! A node's seat in the cluster: its QUIC links (`understudy-net`), the control plane
//! (`understudy-control`, a Raft group whose leader is the master), and the data plane
//! that follows the master's decisions. It carries Raft messages over the `Control`
//! channel; deploys through the master (any node accepts a deploy, keeps the component
//! and proposes it; every node assigned a copy fetches the component over `Bulk`,
//! compiles it and installs it); makes this node primary or backup of each function as
//! the assignments say (`replica`); forwards invocations to primaries over `Invoke`;
//! and answers `GET /v1/cluster`.
//!
//! Beside it: `replica` (the replication engines' drivers and snapshot catch-ups),
//! `distributed` (calls across nodes and two-phase commit), `health` (the master's
//! failure detector, promotions and hand-overs), `lease` and `vip`.
//!
//! **Invariant:** every byte between nodes goes over mutually authenticated QUIC; a peer
//! is known by the node id in its certificate, never by what it claims in a message.

pub mod distributed;
pub mod health;
pub mod lease;
pub mod replica;
pub mod timeline;
pub mod vip;
pub mod wire;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use understudy_control::{
    BoxFuture, ClusterState, ControlConfig, ControlPlane, NodeId, RaftMessage, RaftReply,
    RaftTransport, Role, TransportError,
};
use understudy_net::{Channel, Handler, HandlerFuture, Identity, Transport};

use crate::ids::{Digest, FunctionName};
use crate::node::{AdminError, Answer, InvokeError, Node};
use crate::replication::replica as replica_core;
use crate::replication::Epoch;
use crate::wasm::GuestError;
use replica::Replicas;
use wire::{Bulk, BulkReply, Invoke, InvokeReply};

/// How long a deploy waits for every copy to have installed the component.
const DEPLOY_READY_WAIT: Duration = Duration::from_secs(30);
/// How often the data plane re-checks the assignments even when nothing changed (to
/// retry what failed: a peer that was down when an artifact was needed, say).
const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// How long a node that stepped down for a hand-over keeps trying to get the promotion
/// committed (through a change of master, say).
const HANDOVER_PATIENCE: Duration = Duration::from_secs(10);
/// Copies of a function when the deploy does not say.
pub const REPLICAS_DEFAULT: u8 = 2;

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
    /// `ID@HOST:PORT`, the peer address of any member of an existing cluster: on its
    /// first start this node asks to join it (its `members` may then be empty).
    #[serde(default)]
    pub join: Option<String>,
    /// How often every node pings the master (for its lease; the master's failure
    /// detector listens).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Silence after which the master declares a node down and fails its functions over.
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    /// How long an invocation waits for its function's primary to be ready (just
    /// deployed, or changing hands in a failover) before it fails.
    #[serde(default = "default_route_wait_ms")]
    pub route_wait_ms: u64,
    /// A virtual address the master holds, `ADDR/PREFIX` (see `vip`); needs `vip_dev`.
    #[serde(default)]
    pub vip: Option<String>,
    /// The interface the virtual address goes on.
    #[serde(default)]
    pub vip_dev: Option<String>,
}

fn default_heartbeat_ms() -> u64 {
    5
}

fn default_failure_timeout_ms() -> u64 {
    20
}

fn default_route_wait_ms() -> u64 {
    2000
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
    #[error(transparent)]
    Vip(#[from] vip::Error),
}

/// This node's place in the cluster.
pub struct Cluster {
    id: NodeId,
    role: Role,
    transport: Transport,
    control: ControlPlane,
    node: Node,
    replicas: Arc<Replicas>,
    /// Functions this run has seen in the cluster state: one that disappears from it was
    /// deleted (as opposed to not yet known after a restart).
    seen: Mutex<HashSet<String>>,
    /// As master: pings, grants and suspicions (see `health`, `lease`).
    grants: Mutex<lease::Grants>,
    lease: lease::Shared,
    /// How long a lease lasts: shorter than the failure timeout.
    lease_for: Duration,
    /// How long the master's own lease lasts after a quorum acknowledged it: shorter than
    /// the election timeout, which must pass before another voter can even campaign.
    master_lease_for: Duration,
    /// Serialises reconciliation passes.
    reconciling: tokio::sync::Mutex<()>,
    /// The master's last verdicts on nodes (see `health`).
    events: Mutex<Vec<health::Event>>,
    /// Numbers the idempotency keys this node assigns to forwarded invocations.
    auto_keys: std::sync::atomic::AtomicU64,
    /// The interface of the virtual address, when this node may hold it.
    vip: Option<Arc<vip::Link>>,
    /// Set by `shutdown`: background tasks stop taking things on.
    stopping: std::sync::atomic::AtomicBool,
    /// How long an invocation waits for its function's primary (`route_wait_ms`).
    route_wait: Duration,
    /// Distributed transactions: parts run here, two-phase commit.
    distributed: Arc<distributed::Distributed>,
    /// What happened to the cluster, as this node saw it (for the console).
    timeline: Arc<timeline::Timeline>,
    /// How often this node asks the master for its lease (`heartbeat_ms`).
    heartbeat: Duration,
    /// The failure timeout before local health scales it (`failure_timeout_ms`).
    failure_timeout: Duration,
    /// This node's local health (see `understudy_control::lateness`): measured by the
    /// lease task, read by the failure detector and Raft's election watchdog.
    lateness: Arc<understudy_control::Lateness>,
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
        node: &Node,
        http_addr: SocketAddr,
    ) -> Result<Arc<Cluster>, Error> {
        let data_dir = node.config().data_dir.clone();
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
                node.http_addr = advertised_http(http_addr, &m.http_addr, config.peer_listen);
            }
            members.insert(NodeId(m.id), node);
        }
        let join = match &config.join {
            Some(target) => Some(parse_join(target)?),
            None => None,
        };
        if join.is_none() && !members.contains_key(&NodeId(config.node_id)) {
            return Err(Error::Config(format!(
                "node {} is not among the members",
                config.node_id
            )));
        }
        let vip = match (&config.vip, &config.vip_dev) {
            (Some(cidr), Some(dev)) => Some(vip::Vip::parse(cidr, dev)?),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "vip and vip_dev go together: the address and the interface it goes on".into(),
                ))
            }
        };
        let identity = Identity::load(&config.certs_dir, config.node_id)?;
        // The QUIC endpoint, Raft and the failure detector run on threads of their own,
        // so that guest execution, HTTP and disk waits cannot delay a heartbeat (a busy
        // node is not a dead node).
        let links = links_runtime()?;
        let main = tokio::runtime::Handle::current();
        let failure_timeout = Duration::from_millis(config.failure_timeout_ms.max(1));
        let lateness = Arc::new(understudy_control::Lateness::new(failure_timeout));
        let (transport, control) = {
            let lateness = lateness.clone();
            let (peer_listen, node_id) = (config.peer_listen, config.node_id);
            links
                .spawn(async move {
                    let transport =
                        Transport::bind(&identity, peer_listen, understudy_net::Config::default())?;
                    let raft_transport = Arc::new(QuicRaft {
                        transport: transport.clone(),
                    });
                    let mut control_config =
                        ControlConfig::new(NodeId(node_id), data_dir.join("control"));
                    control_config.lateness = lateness;
                    let control = ControlPlane::start(control_config, raft_transport).await?;
                    Ok::<_, Error>((transport, control))
                })
                .await
                .map_err(|e| Error::Config(format!("the links runtime failed: {e}")))??
        };
        let vip = match vip {
            Some(vip) => {
                Some(Arc::new(links.spawn(vip::Link::open(vip)).await.map_err(
                    |e| Error::Config(format!("the links runtime failed: {e}")),
                )??))
            }
            None => None,
        };
        let dispatch = Arc::new(Dispatch {
            cluster: OnceLock::new(),
            main,
        });
        let replicas = Replicas::new(NodeId(config.node_id), node.clone(), transport.clone());
        let cluster = Arc::new_cyclic(|weak| Cluster {
            distributed: distributed::Distributed::new(node.clone(), weak.clone()),
            id: NodeId(config.node_id),
            role,
            transport: transport.clone(),
            control: control.clone(),
            node: node.clone(),
            replicas,
            seen: Mutex::new(HashSet::new()),
            grants: Mutex::new(lease::Grants::default()),
            lease: Mutex::new(lease::Lease::default()),
            lease_for: Duration::from_millis(config.failure_timeout_ms.max(2) * 3 / 4),
            master_lease_for: Duration::from_millis(
                (config.failure_timeout_ms.max(2) * 3 / 4)
                    .min(understudy_control::config::ELECTION_TIMEOUT_MIN_MS_DEFAULT * 2 / 3),
            ),
            reconciling: tokio::sync::Mutex::new(()),
            events: Mutex::new(Vec::new()),
            auto_keys: std::sync::atomic::AtomicU64::new(crate::node::now_ms() * 1000),
            vip: vip.clone(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            route_wait: Duration::from_millis(config.route_wait_ms),
            timeline: Arc::new(timeline::Timeline::default()),
            heartbeat: Duration::from_millis(config.heartbeat_ms.max(1)),
            failure_timeout,
            lateness,
        });
        // Before anything is served: from now on the node runs transactions only as a
        // primary of the cluster.
        node.set_cluster(cluster.clone());
        let _ = dispatch.cluster.set(cluster.clone());
        {
            let transport = transport.clone();
            links.spawn(async move { transport.serve(dispatch).await });
        }
        tokio::spawn(reconcile_loop(Arc::downgrade(&cluster)));
        tokio::spawn(timeline::run(
            cluster.timeline.clone(),
            node.clone(),
            control.watch(),
            control.metrics(),
        ));
        links.spawn(lease::run(
            Arc::downgrade(&cluster),
            Duration::from_millis(config.heartbeat_ms.max(1)),
        ));
        links.spawn(lease::measure(Arc::downgrade(&cluster)));
        links.spawn(health::run(
            Arc::downgrade(&cluster),
            Duration::from_millis(config.heartbeat_ms.max(1)),
        ));
        if let Some(link) = vip {
            links.spawn(vip::run(Arc::downgrade(&cluster), link));
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
        if let Some((target, addr)) = join {
            if control.status().last_log_index.is_none() {
                let me = understudy_control::Node::new(
                    NodeId(config.node_id),
                    config.peer_listen.to_string(),
                    advertised_http(http_addr, "", config.peer_listen),
                    role,
                );
                let transport = transport.clone();
                tokio::spawn(async move {
                    join_cluster(&transport, target, addr, me).await;
                });
            }
        }
        tracing::info!(node = config.node_id, peer_addr = %config.peer_listen, "joined the cluster links");
        Ok(cluster)
    }

    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    pub fn distributed(&self) -> &Arc<distributed::Distributed> {
        &self.distributed
    }

    /// Whether the cluster has a function of this name (wherever it lives).
    pub fn is_deployed(&self, function: &str) -> bool {
        self.control.state().functions.contains_key(function)
    }

    pub fn control(&self) -> &ControlPlane {
        &self.control
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Whether `origin` (`http://host:port`, lowercase) is the HTTP address of a
    /// member of the cluster, as its state knows it now.
    pub fn has_member_origin(&self, origin: &str) -> bool {
        let Some(address) = origin.strip_prefix("http://") else {
            return false;
        };
        self.control.state().nodes.values().any(|n| {
            n.status != understudy_control::NodeStatus::Removed
                && !n.http_addr.is_empty()
                && n.http_addr.eq_ignore_ascii_case(address)
        })
    }

    /// Await `proposed`, a command proposed to the control plane, timing it in
    /// `raft_commit_latency_seconds` when it was applied.
    pub(crate) async fn timed<T, E>(
        &self,
        proposed: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = proposed.await;
        if result.is_ok() {
            self.node
                .metrics()
                .cluster
                .raft_commit_latency_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    pub fn timeline(&self) -> &Arc<timeline::Timeline> {
        &self.timeline
    }

    /// Set the gauges of `/metrics` that sample the cluster's state: each function's
    /// epoch, the lag of this node's primaries' backups, the Raft term and leader, the
    /// lease and the in-doubt transactions held.
    pub fn sample_metrics(&self) {
        let m = &self.node.metrics().cluster;
        let status = self.control.status();
        let state = self.control.state();
        m.raft_term
            .set(i64::try_from(status.term).unwrap_or(i64::MAX));
        m.raft_leader.set(i64::from(status.leader == Some(self.id)));
        m.raft_applied_index.set(
            status
                .last_applied_index
                .and_then(|i| i64::try_from(i).ok())
                .unwrap_or(0),
        );
        let lease = self.lease_status();
        m.lease_held.set(i64::from(lease.held));
        m.lease_age_seconds
            .set(lease.renewed_ms_ago.map_or(0.0, |ms| ms / 1000.0));
        m.local_health_score.set(i64::from(self.lateness.score()));
        m.failure_timeout_seconds
            .set(self.lateness.scaled(self.failure_timeout).as_secs_f64());
        m.peer_local_health_score.clear();
        m.peer_failure_timeout_seconds.clear();
        if status.leader == Some(self.id) {
            let own = self.lateness.score();
            let reported: Vec<(NodeId, u8)> = self
                .grants
                .lock()
                .lateness
                .iter()
                .map(|(n, s)| (*n, *s))
                .collect();
            for (n, score) in reported {
                let labels = crate::metrics::NodeLabels {
                    node: n.0.to_string(),
                };
                m.peer_local_health_score
                    .get_or_create(&labels)
                    .set(i64::from(score));
                m.peer_failure_timeout_seconds.get_or_create(&labels).set(
                    understudy_control::lateness::scaled(self.failure_timeout, own.max(score))
                        .as_secs_f64(),
                );
            }
        }
        m.function_epoch.clear();
        for (name, a) in &state.assignments {
            m.function_epoch
                .get_or_create(&crate::metrics::FunctionLabels {
                    function: name.clone(),
                })
                .set(i64::try_from(a.epoch.0).unwrap_or(i64::MAX));
        }
        m.replication_lag_entries.clear();
        for (function, backup, lag) in self.replicas.lags(&state) {
            m.replication_lag_entries
                .get_or_create(&crate::metrics::FunctionBackupLabels {
                    function: function.to_string(),
                    backup: backup.0.to_string(),
                })
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
        }
        m.twophase_in_doubt
            .set(i64::try_from(self.distributed.in_doubt_held().len()).unwrap_or(i64::MAX));
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
            "functions": self.functions_status(&state),
            "lease": self.lease_status(),
            "failovers": *self.events.lock(),
            "catch_ups": *self.replicas.senders().catch_up_log.lock(),
            "transactions": self.distributed.status(),
        })
    }

    fn functions_status(&self, state: &ClusterState) -> Vec<serde_json::Value> {
        let local = self.replicas.status(state);
        state
            .functions
            .values()
            .map(|f| {
                let a = state.assignments.get(&f.name);
                serde_json::json!({
                    "name": f.name,
                    "digest": Digest(f.digest).to_string(),
                    "version": f.version,
                    "replicas": f.replicas,
                    "running": f.running,
                    "calls": f.calls,
                    "epoch": a.map(|a| a.epoch.0),
                    "primary": a.map(|a| a.primary.0),
                    "backups": a.map(|a| a.backups.iter().map(|n| n.0).collect::<Vec<_>>()),
                    "catching_up": a.map(|a| a.catching_up.iter().map(|n| n.0).collect::<Vec<_>>()),
                    "here": local.get(&f.name),
                })
            })
            .collect()
    }

    /// Deploy (or upgrade) `function` from `bytes` with `replicas` copies, from any node:
    /// the component is checked and kept here, the master places it, and every node given
    /// a copy fetches and installs it. Answers once every copy has it (or after
    /// `DEPLOY_READY_WAIT`, saying which have not).
    pub async fn deploy(
        &self,
        function: &str,
        bytes: Vec<u8>,
        replicas: u8,
        calls: understudy_control::CallGrants,
    ) -> Result<serde_json::Value, AdminError> {
        let name = FunctionName::new(function).map_err(AdminError::BadName)?;
        let digest = self.node.prepare(bytes).await?;
        let response = self
            .timed(
                self.control
                    .propose_via_leader(understudy_control::Command::Deploy {
                        name: name.to_string(),
                        digest: digest.0,
                        replicas,
                        calls,
                    }),
            )
            .await
            .map_err(|e| AdminError::Unavailable(e.to_string()))?;
        let (function, assignment) = match response {
            understudy_control::Response::Deployed {
                function,
                assignment,
            } => (function, assignment),
            understudy_control::Response::Rejected(why) => {
                return Err(AdminError::Rejected(why.to_string()))
            }
            other => {
                return Err(AdminError::Unavailable(format!(
                    "the master answered a deploy with {other:?}"
                )))
            }
        };
        tracing::info!(function = %name, %digest, version = function.version, primary = %assignment.primary, "deployed through the master");
        let started = Instant::now();
        let mut waiting: Vec<NodeId> = assignment.copies().collect();
        while !waiting.is_empty() && started.elapsed() < DEPLOY_READY_WAIT {
            let mut still = Vec::new();
            for n in waiting {
                let has = self
                    .describe_on(n, name.as_str())
                    .await
                    .is_some_and(|info| {
                        info.digest == digest.to_string() && info.version == function.version
                    });
                if !has {
                    still.push(n);
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(serde_json::json!({
            "name": function.name,
            "digest": digest.to_string(),
            "version": function.version,
            "replicas": function.replicas,
            "running": function.running,
            "epoch": assignment.epoch.0,
            "primary": assignment.primary.0,
            "backups": assignment.backups.iter().map(|n| n.0).collect::<Vec<_>>(),
            "ready": waiting.is_empty(),
            "not_ready": waiting.iter().map(|n| n.0).collect::<Vec<_>>(),
        }))
    }

    /// Stop or start `function` everywhere, through the master.
    pub async fn set_running(
        &self,
        function: &str,
        running: bool,
    ) -> Result<serde_json::Value, AdminError> {
        self.propose_for(
            function,
            understudy_control::Command::SetRunning {
                name: function.to_owned(),
                running,
            },
        )
        .await?;
        Ok(serde_json::json!({ "name": function, "running": running }))
    }

    /// Delete `function` and its state everywhere, through the master.
    pub async fn delete(&self, function: &str) -> Result<(), AdminError> {
        self.propose_for(
            function,
            understudy_control::Command::Delete {
                name: function.to_owned(),
            },
        )
        .await
    }

    async fn propose_for(
        &self,
        function: &str,
        command: understudy_control::Command,
    ) -> Result<(), AdminError> {
        if !self.is_deployed(function) {
            return Err(AdminError::UnknownFunction(function.to_owned()));
        }
        match self.timed(self.control.propose_via_leader(command)).await {
            Ok(understudy_control::Response::Rejected(
                understudy_control::Rejection::UnknownFunction { .. },
            )) => Err(AdminError::UnknownFunction(function.to_owned())),
            Ok(understudy_control::Response::Rejected(why)) => {
                Err(AdminError::Rejected(why.to_string()))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(AdminError::Unavailable(e.to_string())),
        }
    }

    /// Drain node `n`: no new copies go there, and the master moves its copies away (its
    /// primaries handed over first), through the master.
    pub async fn drain(&self, n: u64) -> Result<(), AdminError> {
        self.propose_node(understudy_control::Command::DrainNode { node: NodeId(n) })
            .await
    }

    /// Remove drained node `n` from the cluster and from the Raft group. Refused while it
    /// still holds a copy.
    pub async fn remove(&self, n: u64) -> Result<(), AdminError> {
        self.propose_node(understudy_control::Command::RemoveNode { node: NodeId(n) })
            .await?;
        let leader = self
            .control
            .leader()
            .ok_or_else(|| AdminError::Unavailable("no master right now".into()))?;
        if leader == self.id {
            return self
                .control
                .remove_member(NodeId(n))
                .await
                .map_err(|e| AdminError::Unavailable(e.to_string()));
        }
        // The Raft membership change is the leader's: ask it through the HTTP API.
        let http = self
            .control
            .state()
            .nodes
            .get(&leader)
            .map(|l| l.http_addr.clone())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                AdminError::Unavailable(format!(
                    "the master, node {leader}, has no known HTTP address"
                ))
            })?;
        Err(AdminError::Rejected(format!(
            "node {n} is marked removed; take it out of the Raft group on the master: POST http://{http}/v1/cluster/nodes/{n}/remove"
        )))
    }

    async fn propose_node(&self, command: understudy_control::Command) -> Result<(), AdminError> {
        match self.timed(self.control.propose_via_leader(command)).await {
            Ok(understudy_control::Response::Rejected(why)) => {
                Err(AdminError::Rejected(why.to_string()))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(AdminError::Unavailable(e.to_string())),
        }
    }

    /// As master: move one step of a draining node's copies away. A primary is asked to
    /// step down (it stops serving, under its lock) before the promotion is committed,
    /// so it never answers from a state another primary is already changing.
    async fn drain_step(&self, n: NodeId) {
        let state = self.control.state();
        let plan = understudy_control::plan_failover(&state, n, |_, _| true);
        let Some(first) = plan.commands.first() else {
            return;
        };
        if let understudy_control::Command::Promote {
            function,
            expected_epoch,
            ..
        } = first
        {
            if n == self.id {
                self.step_down_here(function, *expected_epoch).await;
                self.finish_handover(first, function, *expected_epoch, true)
                    .await;
                return;
            }
            let Some(addr) = self.peer_addr(n) else {
                return;
            };
            let request = wire::encode(&Invoke::StepDown {
                function: function.clone(),
                epoch: expected_epoch.0,
            });
            let reply = self
                .transport
                .request_within(n.0, addr, Channel::Invoke, request, Duration::from_secs(2))
                .await;
            let stepped = reply
                .ok()
                .and_then(|r| wire::decode::<InvokeReply>(&r).ok())
                .is_some_and(|r| matches!(r, InvokeReply::SteppedDown));
            if !stepped {
                // Not reachable: if it is dead, the failure detector takes over.
                return;
            }
            let promoted = self
                .finish_handover(first, function, *expected_epoch, false)
                .await;
            tracing::info!(node = %n, %function, promoted, "draining");
            return;
        }
        let one = understudy_control::FailoverPlan {
            commands: vec![first.clone()],
            shortfalls: Vec::new(),
        };
        let done = self.carry_out(&one).await;
        tracing::info!(node = %n, steps = ?done, "draining");
    }

    /// This node stepped down as `function`'s primary in `epoch` for `promote`: see it
    /// through, through whichever node leads now (a change of master in between must
    /// not leave the function with no primary: the node that stepped down never serves
    /// that epoch again). Done once the function is past `epoch`. If the promotion is
    /// refused while the function is still at `epoch` (the copy to promote left, say),
    /// nobody else took over: if it stepped down `here`, this node serves it again
    /// (another node that stepped down is left to the failure detector and the next
    /// drain step). Returns whether the promotion (or another change) went through.
    pub(super) async fn finish_handover(
        &self,
        promote: &understudy_control::Command,
        function: &str,
        epoch: Epoch,
        here: bool,
    ) -> bool {
        let started = Instant::now();
        loop {
            let past = |state: &ClusterState| {
                state
                    .assignments
                    .get(function)
                    .is_none_or(|a| a.epoch.0 > epoch.0)
            };
            if past(&self.control.state()) {
                return true;
            }
            match self
                .timed(self.control.propose_via_leader(promote.clone()))
                .await
            {
                Ok(understudy_control::Response::Rejected(why)) => {
                    if past(&self.control.state()) {
                        return true;
                    }
                    tracing::warn!(function, %why, here, "the promotion after a step-down was refused");
                    if let (true, Ok(name)) = (here, FunctionName::new(function)) {
                        self.replicas.undo_step_down(&name, epoch);
                        self.replicas.senders().poke.notify_one();
                    }
                    return false;
                }
                Ok(_) => return true,
                Err(e) => {
                    if started.elapsed() > HANDOVER_PATIENCE {
                        tracing::error!(function, epoch = epoch.0, error = %e, "a promotion after a step-down is still not committed; the function has no primary until the master acts");
                        return false;
                    }
                    tracing::warn!(function, error = %e, "cannot commit the promotion after a step-down yet; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Stop serving `function` as its primary in `epoch` here, under its lock (no commit
    /// half-way), before the master promotes another copy.
    async fn step_down_here(&self, function: &str, epoch: Epoch) {
        if let Ok(name) = FunctionName::new(function) {
            let _locked = self.node.lock_function(&name).await;
            self.replicas.step_down(&name, epoch);
        }
    }

    /// `function`'s copy on node `n`, as it describes it.
    async fn describe_on(&self, n: NodeId, function: &str) -> Option<crate::node::FunctionInfo> {
        if n == self.id {
            return self.node.describe(function).ok();
        }
        let addr = self.peer_addr(n)?;
        let request = wire::encode(&Invoke::Describe {
            function: function.to_owned(),
        });
        let reply = self
            .transport
            .request_within(n.0, addr, Channel::Invoke, request, Duration::from_secs(2))
            .await
            .ok()?;
        match wire::decode::<InvokeReply>(&reply).ok()? {
            InvokeReply::Described(info) => info,
            _ => None,
        }
    }

    fn peer_addr(&self, n: NodeId) -> Option<SocketAddr> {
        self.control.state().nodes.get(&n)?.peer_addr.parse().ok()
    }

    /// Run `method` of `function` on its primary, wherever it is. Waits (up to
    /// `route_wait_ms`) while the function has no primary ready.
    pub async fn invoke(
        &self,
        function: &str,
        method: &str,
        input: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Answer, InvokeError> {
        let deadline = Instant::now() + self.route_wait;
        let mut changes = self.control.watch();
        // An invocation may be cut off by a failover (or a change of configuration
        // before its commit was replicated) and retried, here or on the new primary: it
        // needs a key for that to happen exactly once.
        let auto_key;
        let key = match idempotency_key {
            Some(key) => Some(key),
            None => {
                auto_key = format!(
                    "{}{}:{}",
                    crate::store::AUTO_KEY_PREFIX,
                    self.id.0,
                    self.auto_keys
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                Some(auto_key.as_str())
            }
        };
        loop {
            let state = self.control.state();
            let (Some(f), Some(a)) = (
                state.functions.get(function),
                state.assignments.get(function),
            ) else {
                return Err(InvokeError::UnknownFunction(function.to_owned()));
            };
            if !f.running {
                if let Ok(name) = FunctionName::new(function) {
                    return Err(InvokeError::Stopped(name));
                }
            }
            let result = if a.primary == self.id {
                self.node.invoke(function, method, input, key).await
            } else {
                self.forward(a.primary, function, method, input, key).await
            };
            let result = result.map(|mut answer| {
                if idempotency_key.is_none() {
                    // The client gave no key: a replay of ours is news to nobody.
                    answer.replayed = false;
                }
                answer
            });
            match result {
                // Not ready there yet (just deployed, or the role is changing hands):
                // nothing ran, so trying again is safe.
                Err(InvokeError::NotPrimary(_) | InvokeError::UnknownFunction(_))
                    if Instant::now() < deadline =>
                {
                    self.retry_pause(&mut changes, function, a.primary).await;
                }
                // The primary could not be reached, or its commit's fate is unknown (cut
                // off half-way, or the configuration changed before it was replicated):
                // the request carries a key, so trying again (there or on a new primary)
                // happens exactly once.
                Err(InvokeError::Unavailable(why)) if Instant::now() < deadline => {
                    tracing::debug!(function, error = %why, "forwarding failed; retrying");
                    self.retry_pause(&mut changes, function, a.primary).await;
                }
                Err(InvokeError::NotPrimary(name)) => {
                    return Err(InvokeError::Unavailable(format!(
                        "function {name} has no primary ready after {:?}",
                        self.route_wait
                    )))
                }
                other => return other,
            }
        }
    }

    /// Before trying `function` again: none if its primary already moved, else until the
    /// cluster state changes or a millisecond passes (the new primary may be setting up).
    async fn retry_pause(
        &self,
        changes: &mut tokio::sync::watch::Receiver<Arc<ClusterState>>,
        function: &str,
        tried: NodeId,
    ) {
        let moved = changes
            .borrow_and_update()
            .assignments
            .get(function)
            .is_none_or(|a| a.primary != tried);
        if !moved {
            let _ = tokio::time::timeout(Duration::from_millis(1), changes.changed()).await;
        }
    }

    async fn forward(
        &self,
        primary: NodeId,
        function: &str,
        method: &str,
        input: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Answer, InvokeError> {
        let Some(addr) = self.peer_addr(primary) else {
            return Err(InvokeError::Unavailable(format!(
                "no address known for node {primary}, the primary of {function}"
            )));
        };
        let span = crate::trace::inner_span!("forward", node = primary.0);
        let request = wire::encode(&Invoke::Call {
            function: function.to_owned(),
            method: method.to_owned(),
            input: input.to_vec(),
            idempotency_key: idempotency_key.map(str::to_owned),
            // The primary's spans are this `forward` span's children.
            trace: span.in_scope(crate::trace::outgoing),
        });
        // The primary bounds the transaction by its deadline; this only catches a primary
        // that went silent.
        let timeout =
            Duration::from_millis(self.node.config().wasm.deadline_ms) + Duration::from_secs(10);
        let mut watch = self.control.watch();
        let moved = async {
            loop {
                if watch
                    .borrow_and_update()
                    .assignments
                    .get(function)
                    .is_none_or(|a| a.primary != primary)
                {
                    return;
                }
                if watch.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        let request = tracing::Instrument::instrument(
            self.transport
                .request_within(primary.0, addr, Channel::Invoke, request, timeout),
            span,
        );
        let reply = tokio::select! {
            reply = request => reply,
            // A failover moved the function (the old primary may be dead, and the request
            // would hang until the link times out): try again on the new one, with the
            // same key.
            () = moved => {
                return Err(InvokeError::NotPrimary(FunctionName::new(function).map_err(|_| {
                    InvokeError::UnknownFunction(function.to_owned())
                })?));
            }
        };
        let reply = reply.map_err(|e| {
            InvokeError::Unavailable(format!(
                "forwarding to node {primary}, the primary of {function}: {e}"
            ))
        })?;
        match wire::decode::<InvokeReply>(&reply) {
            Ok(InvokeReply::Answer {
                outcome,
                txn,
                replayed,
                served_by,
            }) => Ok(Answer {
                outcome: outcome
                    .map(|b| b.0)
                    .map_err(|(code, message)| GuestError { code, message }),
                txn,
                replayed,
                served_by,
            }),
            Ok(InvokeReply::Failed(e)) => Err(e),
            Ok(other) => Err(InvokeError::Unavailable(format!(
                "node {primary} answered an invocation with {other:?}"
            ))),
            Err(e) => Err(InvokeError::Unavailable(format!(
                "node {primary} answered an invocation with an {e}"
            ))),
        }
    }

    async fn serve_invoke(&self, peer: u64, body: Bytes) -> Bytes {
        let request = match wire::decode::<Invoke>(&body) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(peer, error = %e, "undecodable invoke request");
                // A peer of another version, or a bug: the asking node may try again.
                return wire::encode(&InvokeReply::Failed(InvokeError::Unavailable(format!(
                    "node {} could not read the request: {e}",
                    self.id
                ))));
            }
        };
        let reply = match request {
            Invoke::Describe { function } => {
                InvokeReply::Described(self.node.describe(&function).ok())
            }
            Invoke::StepDown { function, epoch } => match FunctionName::new(&function) {
                Ok(name) => {
                    // Under the function's lock: no transaction is half-way when it stops.
                    let _locked = self.node.lock_function(&name).await;
                    self.replicas.step_down(&name, Epoch(epoch));
                    InvokeReply::SteppedDown
                }
                Err(_) => InvokeReply::Failed(InvokeError::UnknownFunction(function)),
            },
            Invoke::Part(call) => {
                // On its own task: the part is left consistent even if the peer gives up.
                let node = self.node.clone();
                let span =
                    crate::trace::remote_span("serve.call", call.trace.as_deref(), &call.function);
                let run = async move { node.run_part(call).await };
                match tokio::spawn(tracing::Instrument::instrument(run, span)).await {
                    Ok(reply) => reply,
                    Err(e) => InvokeReply::Failed(InvokeError::Unavailable(format!(
                        "call task failed: {e}"
                    ))),
                }
            }
            Invoke::TwoPhase { to, message, trace } => {
                // Only a message sent for a traced transaction gets a span.
                let span = trace
                    .as_deref()
                    .map(|t| crate::trace::remote_span("serve.twophase", Some(t), to.as_str()));
                let _in_span = span.as_ref().map(tracing::Span::enter);
                match self.distributed.receive(to, message) {
                    Ok(()) => InvokeReply::Taken,
                    Err(e) => InvokeReply::Failed(e),
                }
            }
            Invoke::Call {
                function,
                method,
                input,
                idempotency_key,
                trace,
            } => {
                // On its own task: the transaction finishes even if the peer gives up.
                let node = self.node.clone();
                let span = crate::trace::remote_span("serve.invoke", trace.as_deref(), &function);
                let run = tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        node.invoke(&function, &method, &input, idempotency_key.as_deref())
                            .await
                    },
                    span,
                ));
                match run.await {
                    Ok(Ok(answer)) => InvokeReply::Answer {
                        outcome: answer
                            .outcome
                            .map(wire::ByteBuf)
                            .map_err(|e| (e.code, e.message)),
                        txn: answer.txn,
                        replayed: answer.replayed,
                        served_by: answer.served_by,
                    },
                    Ok(Err(e)) => InvokeReply::Failed(e),
                    // The outcome is unknown: the asking node tries again with the key.
                    Err(e) => InvokeReply::Failed(InvokeError::Unavailable(format!(
                        "invocation task failed: {e}"
                    ))),
                }
            }
        };
        wire::encode(&reply)
    }

    async fn serve_bulk(&self, peer: u64, body: Bytes) -> Bytes {
        // A snapshot is megabytes: decoded off the async threads.
        let decoded = tokio::task::spawn_blocking(move || wire::decode::<Bulk>(&body))
            .await
            .unwrap_or_else(|e| Err(wire::DecodeError(format!("the decoding task failed: {e}"))));
        let reply = match decoded {
            Ok(Bulk::Artifact { digest }) => {
                let node = self.node.clone();
                let bytes = tokio::task::spawn_blocking(move || node.artifact(digest))
                    .await
                    .ok()
                    .flatten();
                BulkReply::Artifact { bytes }
            }
            Ok(Bulk::Install {
                function,
                epoch,
                session,
                image,
            }) => {
                self.replicas
                    .handle_install(NodeId(peer), function, epoch, session, *image)
                    .await
            }
            Err(e) => {
                tracing::warn!(peer, error = %e, "undecodable bulk request");
                BulkReply::Error(e.to_string())
            }
        };
        wire::encode(&reply)
    }

    /// The component with `digest`: from this node's files, else from the first peer
    /// (in `order`, then any other) that has it.
    async fn fetch_artifact(
        &self,
        digest: Digest,
        order: &[NodeId],
        state: &ClusterState,
    ) -> Result<Vec<u8>, String> {
        if let Some(bytes) = self.node.artifact(digest) {
            return Ok(bytes);
        }
        let mut peers: Vec<NodeId> = order.to_vec();
        peers.extend(state.nodes.keys().filter(|n| !order.contains(n)));
        let mut errors = Vec::new();
        for peer in peers.into_iter().filter(|n| *n != self.id) {
            let Some(addr) = state
                .nodes
                .get(&peer)
                .and_then(|n| n.peer_addr.parse::<SocketAddr>().ok())
            else {
                continue;
            };
            let reply = self
                .transport
                .request_within(
                    peer.0,
                    addr,
                    Channel::Bulk,
                    wire::encode(&Bulk::Artifact { digest }),
                    Duration::from_secs(30),
                )
                .await;
            match reply
                .map_err(|e| e.to_string())
                .and_then(|b| wire::decode::<BulkReply>(&b).map_err(|e| e.to_string()))
            {
                Ok(BulkReply::Artifact { bytes: Some(bytes) }) if Digest::of(&bytes) == digest => {
                    return Ok(bytes)
                }
                Ok(BulkReply::Artifact { bytes: Some(_) }) => {
                    errors.push(format!("{peer}: sent bytes that do not match the digest"))
                }
                Ok(BulkReply::Artifact { bytes: None }) => {
                    errors.push(format!("{peer}: does not have it"))
                }
                Ok(BulkReply::Error(e)) | Err(e) => errors.push(format!("{peer}: {e}")),
                Ok(other) => errors.push(format!("{peer}: answered with {other:?}")),
            }
        }
        Err(format!(
            "no node could provide component {digest}: {}",
            errors.join("; ")
        ))
    }

    /// Make this node's copy of `function` follow assignment `a`: its replica machine
    /// decides (a new primary engine for a new epoch once the old one released what it
    /// had sent, catch-ups for new backups, a demotion, a renewal after a restart), and
    /// this carries out what needs the function's lock or the master.
    async fn follow(&self, function: &FunctionName, a: &understudy_control::Assignment) {
        let copy = self.replicas.copy(function);
        let restarted = self.replicas.restarted_as_primary(function, a.epoch);
        let mut todo: std::collections::VecDeque<_> = copy
            .step_with(|| replica_core::Event::Assigned {
                assignment: replica_core::Assignment {
                    epoch: a.epoch,
                    primary: a.primary,
                    backups: a.backups.clone(),
                    catching_up: a.catching_up.clone(),
                },
                log: self.replicas.position(function),
                restarted,
            })
            .into();
        let mut locked = None;
        while let Some(command) = todo.pop_front() {
            let more = match command {
                replica_core::Command::Lock | replica_core::Command::Drain => {
                    if locked.is_some() {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    } else {
                        locked = self.node.lock_function(function).await;
                        if locked.is_none() {
                            return;
                        }
                    }
                    copy.step_with(|| replica_core::Event::Locked {
                        log: self.replicas.position(function),
                        session: replica::new_session(),
                    })
                }
                replica_core::Command::Unlock => {
                    locked = None;
                    Vec::new()
                }
                replica_core::Command::Renew { epoch } => {
                    let command = understudy_control::Command::Renew {
                        function: function.to_string(),
                        primary: self.id,
                        expected_epoch: epoch,
                    };
                    match self.timed(self.control.propose_via_leader(command)).await {
                        Ok(understudy_control::Response::Rejected(why)) => {
                            tracing::info!(%function, epoch = epoch.0, %why, "restarted as primary of an epoch the cluster has left; following the cluster");
                        }
                        Ok(_) => {
                            tracing::info!(%function, epoch = epoch.0, "restarted as primary: serving again in a new epoch");
                        }
                        Err(e) => {
                            tracing::warn!(%function, epoch = epoch.0, error = %e, "restarted as primary: cannot get a new epoch yet");
                        }
                    }
                    Vec::new()
                }
                replica_core::Command::ReportCaughtUp { node, epoch } => {
                    // It holds every released commit: it can count from now on.
                    let command = understudy_control::Command::BackupCaughtUp {
                        function: function.to_string(),
                        node,
                        expected_epoch: epoch,
                    };
                    if let Err(e) = self.timed(self.control.propose_via_leader(command)).await {
                        tracing::warn!(%function, backup = %node, error = %e, "cannot report a caught-up backup");
                    }
                    Vec::new()
                }
                other => {
                    tracing::debug!(%function, command = ?other, "a command the copy does not expect here");
                    Vec::new()
                }
            };
            todo.extend(more);
        }
    }

    /// Bring this node's copies in line with the cluster state: install components,
    /// follow start/stop and deletes, take the primary or backup role of each assignment.
    async fn reconcile(&self, state: &ClusterState) {
        let _pass = self.reconciling.lock().await;
        let me = self.id;
        self.replicas.note_boot(state);
        for n in state.nodes.values() {
            if let Ok(addr) = n.peer_addr.parse() {
                self.replicas.set_addr(n.id, addr);
            }
        }
        for (name, function) in &state.functions {
            self.seen.lock().insert(name.clone());
            let Ok(fname) = FunctionName::new(name) else {
                continue;
            };
            let Some(a) = state.assignments.get(name) else {
                continue;
            };
            if !a.holds(me) {
                if self.replicas.holds(&fname) {
                    self.follow(&fname, a).await;
                }
                continue;
            }
            let digest = Digest(function.digest);
            let current = self.node.store().get(&fname).map(|f| f.meta());
            let installed = current
                .as_ref()
                .is_some_and(|m| m.deploy.digest == digest && m.deploy.version >= function.version);
            if !installed {
                let order: Vec<NodeId> = a.copies().collect();
                match self.fetch_artifact(digest, &order, state).await {
                    Ok(bytes) => {
                        if let Err(e) = self
                            .node
                            .install(
                                &fname,
                                bytes,
                                function.version,
                                function.running,
                                function.calls.clone(),
                            )
                            .await
                        {
                            tracing::error!(function = %name, error = %e, "cannot install the component");
                            continue;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(function = %name, error = %e, "component not available yet");
                        continue;
                    }
                }
            } else if current
                .as_ref()
                .is_some_and(|m| m.running != function.running)
            {
                if let Err(e) = self.node.set_running(name, function.running).await {
                    tracing::error!(function = %name, error = %e, "cannot follow start/stop");
                }
            }
            self.follow(&fname, a).await;
        }
        // Deleted from the cluster: delete here too (only functions this run saw in the
        // cluster state, so a state not yet recovered deletes nothing).
        let gone: Vec<String> = {
            let mut seen = self.seen.lock();
            let gone: Vec<String> = seen
                .iter()
                .filter(|n| !state.functions.contains_key(*n))
                .cloned()
                .collect();
            for n in &gone {
                seen.remove(n);
            }
            gone
        };
        for name in gone {
            if let Ok(fname) = FunctionName::new(&name) {
                {
                    let _locked = self.node.lock_function(&fname).await;
                    self.replicas.forget(&fname);
                }
                if self.node.is_deployed(&name) {
                    if let Err(e) = self.node.delete(&name).await {
                        tracing::error!(function = %name, error = %e, "cannot delete");
                    }
                }
            }
        }
    }

    /// Leave cleanly: give up the virtual address, stop Raft and close the QUIC
    /// endpoint.
    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(link) = &self.vip {
            match link.remove().await {
                Ok(true) => {
                    tracing::info!(vip = %link.vip, "gave up the virtual address (stopping)")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(vip = %link.vip, error = %e, "cannot give up the virtual address")
                }
            }
        }
        if let Err(e) = self.control.shutdown().await {
            tracing::warn!(error = %e, "control plane shutdown");
        }
        self.transport.close().await;
    }
}

/// `ID@HOST:PORT`.
/// The HTTP address the cluster state gives this node (the console and other members
/// reach it there): the one it listens on, unless that is every interface (`0.0.0.0`,
/// `[::]`), which no one can connect to; then the one its config names (`configured`),
/// else its peer address's IP with the HTTP port.
fn advertised_http(bound: SocketAddr, configured: &str, peer_listen: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    if !configured.is_empty() {
        return configured.to_owned();
    }
    if !peer_listen.ip().is_unspecified() {
        return SocketAddr::new(peer_listen.ip(), bound.port()).to_string();
    }
    bound.to_string()
}

fn parse_join(target: &str) -> Result<(NodeId, SocketAddr), Error> {
    let bad = || {
        Error::Config(format!(
            "join must be ID@HOST:PORT (a member's id and peer address), got {target:?}"
        ))
    };
    let (id, addr) = target.split_once('@').ok_or_else(bad)?;
    Ok((
        NodeId(id.parse().map_err(|_| bad())?),
        addr.parse().map_err(|_| bad())?,
    ))
}

/// Ask `target` (a member) to admit `me`, following it to the leader, until one says yes.
async fn join_cluster(
    transport: &Transport,
    mut target: NodeId,
    mut addr: SocketAddr,
    me: understudy_control::Node,
) {
    loop {
        let reply = match RaftMessage::Join(me.clone()).encode() {
            Ok(body) => {
                transport
                    .request_within(
                        target.0,
                        addr,
                        Channel::Control,
                        Bytes::from(body),
                        Duration::from_secs(30),
                    )
                    .await
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a join request");
                return;
            }
        };
        match reply
            .map_err(|e| e.to_string())
            .and_then(|r| RaftReply::decode(&r).map_err(|e| e.to_string()))
        {
            Ok(RaftReply::Join(Ok(()))) => {
                tracing::info!(via = %target, "joined the cluster");
                return;
            }
            Ok(RaftReply::Join(Err(understudy_control::ForwardError::NotLeader {
                leader: Some(leader),
                leader_addr: Some(leader_addr),
            }))) => {
                if let Ok(a) = leader_addr.parse() {
                    target = leader;
                    addr = a;
                    continue;
                }
            }
            Ok(other) => tracing::warn!(answer = ?other, "joining the cluster: not yet"),
            Err(e) => tracing::warn!(error = %e, %target, "joining the cluster: no answer"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Follow the cluster state for as long as the cluster lives.
async fn reconcile_loop(cluster: std::sync::Weak<Cluster>) {
    let Some(mut watch) = cluster.upgrade().map(|c| c.control.watch()) else {
        return;
    };
    loop {
        let state = watch.borrow_and_update().clone();
        let Some(c) = cluster.upgrade() else { return };
        c.reconcile(&state).await;
        let poke = c.replicas.senders().poke.clone();
        drop(c);
        // Until the next change, a poke from the data plane, or a while (to retry what
        // failed).
        tokio::select! {
            _ = watch.changed() => {}
            _ = poke.notified() => {}
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
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

/// Routes what arrives over QUIC to the part of the node that handles it. Raft and
/// pings are answered on the links runtime; everything else moves to the main one.
struct Dispatch {
    cluster: OnceLock<Arc<Cluster>>,
    main: tokio::runtime::Handle,
}

/// A runtime on threads of its own for the node's links, kept for the life of the process.
/// Ask the kernel to favour the calling thread over the node's others (nice -10): the
/// heartbeats, leases and Raft run on the links runtime, and a node busy with its own
/// guests must not look dead (corosync runs its heartbeats at real-time priority for the
/// same reason). Needs CAP_SYS_NICE (root); without it the thread keeps its priority.
#[allow(unsafe_code)]
fn favour_this_thread() {
    // SAFETY: gettid and setpriority take and return plain integers; no memory is shared.
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -10)
    };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "the links threads keep the default priority");
    }
}

fn links_runtime() -> Result<tokio::runtime::Handle, Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("understudy-links".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("understudy-links")
                .on_thread_start(favour_this_thread)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(Ok(runtime.handle().clone()));
            runtime.block_on(std::future::pending::<()>());
        })
        .map_err(|e| Error::Config(format!("cannot start the links thread: {e}")))?;
    rx.recv()
        .map_err(|e| Error::Config(format!("the links thread died: {e}")))?
        .map_err(|e| Error::Config(format!("cannot build the links runtime: {e}")))
}

impl Handler for Dispatch {
    fn handle(&self, peer: u64, channel: Channel, body: Bytes) -> HandlerFuture<'_> {
        Box::pin(async move {
            match channel {
                Channel::Control => {
                    let Some(control) = self.cluster.get().map(|c| &c.control) else {
                        return Bytes::new();
                    };
                    let message = match RaftMessage::decode(&body) {
                        Ok(message) => message,
                        Err(e) => {
                            tracing::warn!(peer, error = %e, "undecodable control message");
                            return Bytes::new();
                        }
                    };
                    if let RaftMessage::Ping { lateness } = message {
                        let Some(cluster) = self.cluster.get() else {
                            return Bytes::new();
                        };
                        return match cluster.answer_ping(NodeId(peer), lateness).encode() {
                            Ok(bytes) => Bytes::from(bytes),
                            Err(_) => Bytes::new(),
                        };
                    }
                    if let RaftMessage::Join(node) = &message {
                        // A node joins as itself: the id in its certificate.
                        if node.id != NodeId(peer) {
                            tracing::warn!(peer, claimed = %node.id, "refused a join for another node id");
                            return RaftReply::Join(Err(understudy_control::ForwardError::Failed(
                                format!("node {peer} cannot join as node {}", node.id),
                            )))
                            .encode()
                            .map(Bytes::from)
                            .unwrap_or_default();
                        }
                    }
                    let reply = control.handle_raft(message).await;
                    match reply.encode() {
                        Ok(bytes) => Bytes::from(bytes),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode a control reply");
                            Bytes::new()
                        }
                    }
                }
                Channel::Replication | Channel::Bulk | Channel::Invoke => {
                    let Some(cluster) = self.cluster.get().cloned() else {
                        return Bytes::new();
                    };
                    let work = self.main.spawn(async move {
                        match channel {
                            Channel::Replication => match wire::decode::<wire::Replicate>(&body)
                            {
                                Ok(request) => wire::encode(
                                    &cluster
                                        .replicas
                                        .handle_replicate(NodeId(peer), request)
                                        .await,
                                ),
                                Err(e) => {
                                    tracing::warn!(peer, error = %e, "undecodable replication request");
                                    Bytes::new()
                                }
                            },
                            Channel::Bulk => cluster.serve_bulk(peer, body).await,
                            _ => cluster.serve_invoke(peer, body).await,
                        }
                    });
                    work.await.unwrap_or_default()
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_on_every_interface_advertises_an_address_one_can_reach() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("an address");
        let peer = addr("10.0.0.1:7301");
        assert_eq!(
            advertised_http(addr("10.0.0.1:7201"), "10.9.9.9:1", peer),
            "10.0.0.1:7201"
        );
        assert_eq!(
            advertised_http(addr("0.0.0.0:7201"), "10.0.0.1:8080", peer),
            "10.0.0.1:8080"
        );
        assert_eq!(
            advertised_http(addr("0.0.0.0:7201"), "", peer),
            "10.0.0.1:7201"
        );
        assert_eq!(
            advertised_http(addr("[::]:7201"), "", addr("0.0.0.0:7301")),
            "[::]:7201"
        );
    }
}
