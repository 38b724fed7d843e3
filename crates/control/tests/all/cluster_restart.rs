//! Restarts from the same directory: the vote, the log and the snapshot come back, the
//! node rejoins and catches up; snapshots and log purges survive a whole-cluster restart;
//! a node added after a purge catches up from a snapshot.

use std::time::Duration;

use openraft::storage::RaftLogStorage;
use understudy_control::storage::LogStore;
use understudy_control::{Command, NodeId, Role};

use crate::support::{addr_of, converged, eventually, plane, within, Cluster};

const VOTERS: [(u64, Role); 3] = [(1, Role::Voter), (2, Role::Voter), (3, Role::Voter)];

fn deploy(name: String) -> Command {
    Command::Deploy {
        name,
        digest: [9; 32],
        replicas: 2,
        calls: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_recovers_its_log_and_state_and_rejoins() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let mut planes = cluster.form(&VOTERS).await?;
    let leader_id = planes[0].leader().expect("a leader");
    let leader = plane(&planes, leader_id).clone();
    for i in 0..5 {
        within(5, leader.propose(deploy(format!("before{i}")))).await??;
    }
    converged(&planes, |s| s.functions.len() == 5).await?;

    let victim = planes
        .iter()
        .find(|p| p.id() != leader_id)
        .cloned()
        .expect("a follower");
    let term_before = victim.status().term;
    let state_before = victim.state();
    cluster.crash(&victim).await;
    for i in 0..5 {
        within(5, leader.propose(deploy(format!("while_down{i}")))).await??;
    }

    // The vote is on disk: read it back with the node down.
    let mut log = LogStore::open(&cluster.dir(victim.id()), victim.id())?;
    let vote = log.read_vote().await?.expect("a saved vote");
    assert_eq!(vote.leader_id.term, term_before);
    assert_eq!(vote.leader_id.voted_for(), Some(leader_id));
    assert!(vote.committed, "a vote for an elected leader");
    drop(log);

    let restarted = cluster.start(victim.id().0).await?;
    // Straight from its own directory, before hearing from anyone: the committed state.
    let recovered = restarted.state();
    assert!(
        state_before
            .functions
            .keys()
            .all(|f| recovered.functions.contains_key(f)),
        "recovered {:?}, had {:?}",
        recovered.functions.keys().collect::<Vec<_>>(),
        state_before.functions.keys().collect::<Vec<_>>()
    );
    planes.retain(|p| p.id() != victim.id());
    planes.push(restarted);
    converged(&planes, |s| s.functions.len() == 10).await?;
    Ok(())
}

/// A node that comes back must not depose the leader: it has heard from nobody, so its
/// lease has run out at once, and it once campaigned within 40 ms, before the leader
/// (backing off from a peer that was unreachable) reached it; its higher term then
/// deposed the leader, and every lease in the cluster lapsed for the new election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_does_not_depose_the_leader() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let mut planes = cluster.form(&VOTERS).await?;
    let leader_id = planes[0].leader().expect("a leader");
    let leader = plane(&planes, leader_id).clone();
    within(5, leader.propose(deploy("before".into()))).await??;
    let victim = planes
        .iter()
        .find(|p| p.id() != leader_id)
        .cloned()
        .expect("a follower");
    cluster.crash(&victim).await;
    within(5, leader.propose(deploy("while_down".into()))).await??;
    // Long enough for the leader to back off from the unreachable node.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = leader.status().term;

    let restarted = cluster.start(victim.id().0).await?;
    planes.retain(|p| p.id() != victim.id());
    planes.push(restarted.clone());
    converged(&planes, |s| s.functions.len() == 2).await?;
    // Past the returning node's election timeout several times over.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = leader.status();
    assert_eq!(
        (status.leader, status.term),
        (Some(leader_id), term),
        "the leader kept its term while the node came back"
    );
    assert_eq!(
        restarted.status().term,
        term,
        "the returning node did not campaign"
    );
    within(5, leader.propose(deploy("after".into()))).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_purged_logs_survive_a_whole_cluster_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::new();
    cluster.tune = |c| {
        c.snapshot_logs_since_last = 20;
        c.logs_kept_after_snapshot = 5;
    };
    let planes = cluster.form(&VOTERS).await?;
    let leader = plane(&planes, planes[0].leader().expect("a leader")).clone();
    for i in 0..60 {
        within(5, leader.propose(deploy(format!("f{i}")))).await??;
    }
    for i in 0..60 {
        let stop = Command::SetRunning {
            name: format!("f{i}"),
            running: i % 2 == 0,
        };
        within(5, leader.propose(stop)).await??;
    }
    converged(&planes, |s| s.functions.len() == 60).await?;
    eventually(
        Duration::from_secs(10),
        "every node snapshotted and purged",
        || {
            planes.iter().all(|p| {
                let m = p.metrics().borrow().clone();
                m.snapshot.is_some_and(|s| s.index >= 100)
                    && m.purged.is_some_and(|s| s.index >= 90)
            })
        },
    )
    .await?;
    for p in &planes {
        assert!(cluster.dir(p.id()).join("snapshot").exists());
    }
    let before = planes[0].state();

    for p in &planes {
        cluster.crash(p).await;
    }
    let mut restarted = Vec::new();
    for (id, _) in VOTERS {
        restarted.push(cluster.start(id).await?);
    }
    for p in &restarted {
        assert_eq!(
            *p.state(),
            *before,
            "n{} restored snapshot + log tail",
            p.id().0
        );
    }
    let ids: Vec<NodeId> = restarted.iter().map(|p| p.id()).collect();
    cluster.agreed_leader(&restarted, &ids).await?;
    within(5, restarted[0].propose_via_leader(deploy("after".into()))).await??;
    converged(&restarted, |s| s.functions.len() == 61).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_after_a_purge_catches_up_from_a_snapshot() -> anyhow::Result<()> {
    let mut cluster = Cluster::new();
    cluster.tune = |c| {
        c.snapshot_logs_since_last = 10;
        c.logs_kept_after_snapshot = 0;
    };
    let planes = cluster.form(&VOTERS).await?;
    let leader = plane(&planes, planes[0].leader().expect("a leader")).clone();
    for i in 0..30 {
        within(5, leader.propose(deploy(format!("f{i}")))).await??;
    }
    eventually(Duration::from_secs(10), "the leader purged its log", || {
        leader
            .metrics()
            .borrow()
            .purged
            .is_some_and(|p| p.index >= 20)
    })
    .await?;

    let newcomer = cluster.start(4).await?;
    within(10, leader.add_voter(NodeId(4), &addr_of(NodeId(4)))).await??;
    let register = Command::RegisterNode {
        id: NodeId(4),
        peer_addr: addr_of(NodeId(4)),
        http_addr: "http://4".into(),
        role: Role::Voter,
    };
    within(5, newcomer.propose_via_leader(register)).await??;
    let mut all = planes.clone();
    all.push(newcomer.clone());
    converged(&all, |s| s.functions.len() == 30 && s.nodes.len() == 4).await?;
    assert!(
        newcomer.metrics().borrow().snapshot.is_some(),
        "the newcomer installed a snapshot"
    );
    assert_eq!(newcomer.status().voters.len(), 4);
    Ok(())
}
