//! What a node does with its files after a crash: a torn tail of the log is cut and the
//! node starts; damage in the middle, a directory of another node or a damaged snapshot
//! stop it with an error that names the file.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;

use understudy_control::{
    storage, BoxFuture, Command, ControlConfig, ControlPlane, Error, NodeId, RaftMessage,
    RaftReply, RaftTransport, Role, TransportError,
};

use crate::support::{within, Cluster};

struct Nowhere;

impl RaftTransport for Nowhere {
    fn send(
        &self,
        target: NodeId,
        _: &str,
        _: RaftMessage,
    ) -> BoxFuture<Result<RaftReply, TransportError>> {
        Box::pin(async move {
            Err(TransportError::Unreachable(format!(
                "{target}: no network in this test"
            )))
        })
    }
}

/// A one-node cluster with a few functions deployed, shut down again.
async fn single_node_with_functions(cluster: &Cluster) -> anyhow::Result<()> {
    let planes = cluster.form(&[(1, Role::Voter)]).await?;
    for i in 0..5 {
        let deploy = Command::Deploy {
            name: format!("f{i}"),
            digest: [2; 32],
            replicas: 1,
            calls: Default::default(),
        };
        within(5, planes[0].propose(deploy)).await??;
    }
    cluster.crash(&planes[0]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_cut_and_the_node_carries_on() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    single_node_with_functions(&cluster).await?;
    let log = cluster.dir(NodeId(1)).join(storage::LOG_FILE);
    // Half a frame, as a crash in the middle of an append leaves it.
    OpenOptions::new()
        .append(true)
        .open(&log)?
        .write_all(&[40, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])?;

    let plane = cluster.start(1).await?;
    assert_eq!(plane.state().functions.len(), 5);
    within(5, plane.wait_for_leader(std::time::Duration::from_secs(5))).await??;
    let deploy = Command::Deploy {
        name: "after".into(),
        digest: [2; 32],
        replicas: 1,
        calls: Default::default(),
    };
    within(5, plane.propose(deploy)).await??;
    cluster.crash(&plane).await;

    // The entry appended after the cut survives the next restart too.
    let plane = cluster.start(1).await?;
    assert_eq!(plane.state().functions.len(), 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_middle_of_the_log_stops_the_node() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    single_node_with_functions(&cluster).await?;
    let log = cluster.dir(NodeId(1)).join(storage::LOG_FILE);
    let mut bytes = std::fs::read(&log)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&log, bytes)?;
    match cluster.start(1).await {
        Err(e) => {
            let e = e.downcast::<Error>()?;
            assert!(
                matches!(e, Error::Storage(storage::Error::Corrupt { .. })),
                "{e}"
            );
        }
        Ok(_) => anyhow::bail!("a node started from a damaged log"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_another_node_is_refused() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    single_node_with_functions(&cluster).await?;
    let config = ControlConfig::new(NodeId(2), cluster.dir(NodeId(1)));
    match ControlPlane::start(config, Arc::new(Nowhere)).await {
        Err(Error::Storage(storage::Error::WrongNode {
            found, expected, ..
        })) => {
            assert_eq!((found, expected), (NodeId(1), NodeId(2)));
        }
        Err(other) => anyhow::bail!("wrong error: {other}"),
        Ok(_) => anyhow::bail!("node 2 started from node 1's directory"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_stops_the_node() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&[(1, Role::Voter)]).await?;
    let deploy = Command::Deploy {
        name: "bank".into(),
        digest: [2; 32],
        replicas: 1,
        calls: Default::default(),
    };
    within(5, planes[0].propose(deploy)).await??;
    within(5, planes[0].snapshot_now()).await??;
    let snapshot = cluster.dir(NodeId(1)).join(storage::SNAPSHOT_FILE);
    crate::support::eventually(
        std::time::Duration::from_secs(5),
        "the snapshot is written",
        || snapshot.exists(),
    )
    .await?;
    cluster.crash(&planes[0]).await;
    let mut bytes = std::fs::read(&snapshot)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&snapshot, bytes)?;
    match cluster.start(1).await {
        Err(e) => {
            let e = e.downcast::<Error>()?;
            assert!(
                matches!(e, Error::Storage(storage::Error::Corrupt { .. })),
                "{e}"
            );
        }
        Ok(_) => anyhow::bail!("a node started from a damaged snapshot"),
    }
    Ok(())
}

#[test]
fn invalid_timings_are_refused() {
    let mut config = ControlConfig::new(NodeId(1), "/nonexistent");
    config.election_timeout_min_ms = config.heartbeat_ms;
    assert!(config.raft_config().is_err());
    let mut config = ControlConfig::new(NodeId(1), "/nonexistent");
    config.election_timeout_max_ms = config.election_timeout_min_ms;
    assert!(config.raft_config().is_err());
    assert!(ControlConfig::new(NodeId(1), "/nonexistent")
        .raft_config()
        .is_ok());
}
