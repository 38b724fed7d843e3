//! An in-memory [`RaftTransport`] that routes to the other control planes of the test
//! (encoding every message and reply, as the runtime will), cuts nodes off on demand,
//! and helpers to start, crash and restart nodes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use understudy_control::{
    BoxFuture, ControlConfig, ControlPlane, Node, NodeId, RaftMessage, RaftReply, RaftTransport,
    Role, ServerState, TransportError,
};

/// Where the test nodes find each other, and which of them are cut off.
#[derive(Default)]
pub struct Router {
    planes: Mutex<HashMap<NodeId, ControlPlane>>,
    isolated: Mutex<HashSet<NodeId>>,
}

struct MemTransport {
    from: NodeId,
    router: Arc<Router>,
}

impl Router {
    fn is_cut(&self, a: NodeId, b: NodeId) -> bool {
        let isolated = self.isolated.lock();
        isolated.contains(&a) || isolated.contains(&b)
    }

    /// Cut `id` off from every other node, both ways.
    pub fn isolate(&self, id: NodeId) {
        self.isolated.lock().insert(id);
    }

    pub fn heal(&self, id: NodeId) {
        self.isolated.lock().remove(&id);
    }
}

impl RaftTransport for MemTransport {
    fn send(
        &self,
        target: NodeId,
        addr: &str,
        message: RaftMessage,
    ) -> BoxFuture<Result<RaftReply, TransportError>> {
        let router = Arc::clone(&self.router);
        let from = self.from;
        let expected = addr_of(target);
        let addr = addr.to_owned();
        Box::pin(async move {
            if addr != expected {
                return Err(TransportError::Unreachable(format!(
                    "{target} is not at {addr}"
                )));
            }
            if router.is_cut(from, target) {
                return Err(TransportError::Unreachable(format!(
                    "{from} -> {target} is cut"
                )));
            }
            let plane = router.planes.lock().get(&target).cloned();
            let plane = plane
                .ok_or_else(|| TransportError::Unreachable(format!("{target} is not running")))?;
            let bytes = message
                .encode()
                .map_err(|e| TransportError::Failed(e.to_string()))?;
            let message =
                RaftMessage::decode(&bytes).map_err(|e| TransportError::Failed(e.to_string()))?;
            let reply = plane.handle_raft(message).await;
            if router.is_cut(from, target) {
                return Err(TransportError::Failed(format!(
                    "{from} -> {target} was cut mid-call"
                )));
            }
            let bytes = reply
                .encode()
                .map_err(|e| TransportError::Failed(e.to_string()))?;
            RaftReply::decode(&bytes).map_err(|e| TransportError::Failed(e.to_string()))
        })
    }
}

pub fn addr_of(id: NodeId) -> String {
    format!("mem://{}", id.0)
}

pub fn member(id: u64, role: Role) -> (NodeId, Node) {
    let id = NodeId(id);
    (
        id,
        Node::new(id, addr_of(id), format!("http://{}", id.0), role),
    )
}

/// A test cluster: nodes' directories under one temp dir, and the router.
pub struct Cluster {
    pub router: Arc<Router>,
    root: tempfile::TempDir,
    /// Applied to every node's config before it starts.
    pub tune: fn(&mut ControlConfig),
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster {
            router: Arc::new(Router::default()),
            root: tempfile::tempdir().expect("temp dir"),
            tune: |_| {},
        }
    }

    pub fn dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("n{}", id.0))
    }

    pub fn config(&self, id: NodeId) -> ControlConfig {
        let mut config = ControlConfig::new(id, self.dir(id));
        (self.tune)(&mut config);
        config
    }

    /// Start node `id` from its directory (fresh or not) and route to it.
    pub async fn start(&self, id: u64) -> anyhow::Result<ControlPlane> {
        let id = NodeId(id);
        let transport = Arc::new(MemTransport {
            from: id,
            router: Arc::clone(&self.router),
        });
        let plane = ControlPlane::start(self.config(id), transport).await?;
        self.router.planes.lock().insert(id, plane.clone());
        self.router.heal(id);
        Ok(plane)
    }

    /// Start `members` and initialize the cluster with all of them from the first.
    pub async fn form(&self, members: &[(u64, Role)]) -> anyhow::Result<Vec<ControlPlane>> {
        let mut planes = Vec::new();
        for (id, _) in members {
            planes.push(self.start(*id).await?);
        }
        let map: BTreeMap<NodeId, Node> = members
            .iter()
            .map(|(id, role)| member(*id, *role))
            .collect();
        planes[0].initialize(map).await?;
        let ids: Vec<NodeId> = members.iter().map(|(id, _)| NodeId(*id)).collect();
        self.agreed_leader(&planes, &ids).await?;
        Ok(planes)
    }

    /// Crash node `id`: cut it off at once, then stop it.
    pub async fn crash(&self, plane: &ControlPlane) {
        self.router.isolate(plane.id());
        self.router.planes.lock().remove(&plane.id());
        let _ = plane.shutdown().await;
    }

    /// Wait until every plane in `planes` names the same leader, one of `candidates`.
    pub async fn agreed_leader(
        &self,
        planes: &[ControlPlane],
        candidates: &[NodeId],
    ) -> anyhow::Result<NodeId> {
        let mut found = None;
        eventually(
            Duration::from_secs(10),
            "the nodes agree on a leader",
            || {
                let leaders: HashSet<Option<NodeId>> = planes.iter().map(|p| p.leader()).collect();
                found = match leaders.into_iter().collect::<Vec<_>>().as_slice() {
                    [Some(l)] if candidates.contains(l) => Some(*l),
                    _ => None,
                };
                // After a restart every node names the leader of its saved vote until a
                // new one is elected: only a leader that says so itself counts.
                let leads = |id: NodeId| {
                    planes
                        .iter()
                        .any(|p| p.id() == id && p.status().state == ServerState::Leader)
                };
                found = found.filter(|l| leads(*l));
                found.is_some()
            },
        )
        .await?;
        found.ok_or_else(|| anyhow::anyhow!("no leader"))
    }
}

/// The plane in `planes` with id `id`.
pub fn plane(planes: &[ControlPlane], id: NodeId) -> &ControlPlane {
    planes
        .iter()
        .find(|p| p.id() == id)
        .expect("a plane with that id")
}

/// Poll `check` every millisecond until it holds; fail after `timeout`.
pub async fn eventually<F: FnMut() -> bool>(
    timeout: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Wait until every plane's applied state equals `planes[0]`'s and `check` holds on it.
pub async fn converged<F: Fn(&understudy_control::ClusterState) -> bool>(
    planes: &[ControlPlane],
    check: F,
) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(10),
        "every node applied the same state",
        || {
            let first = planes[0].state();
            check(&first) && planes.iter().all(|p| *p.state() == *first)
        },
    )
    .await
}

/// Run `future` with a timeout, as a test step.
pub async fn within<T, F: Future<Output = T>>(secs: u64, future: F) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(secs), future)
        .await
        .map_err(|_| anyhow::anyhow!("step took over {secs} s"))
}
