//! Three voters: election, deploy, convergence, and what a follower says when it is
//! asked to propose.

use std::collections::BTreeMap;
use std::time::Duration;

use understudy_control::{Command, Error, NodeId, Response, Role};

use crate::support::{addr_of, converged, member, plane, within, Cluster};

const VOTERS: [(u64, Role); 3] = [(1, Role::Voter), (2, Role::Voter), (3, Role::Voter)];

fn deploy(name: &str, replicas: u8) -> Command {
    Command::Deploy {
        name: name.into(),
        digest: [3; 32],
        replicas,
        calls: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_elect_a_leader_and_every_node_applies_a_deploy() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&VOTERS).await?;
    let leader = plane(&planes, planes[0].leader().expect("a leader"));
    let response = within(5, leader.propose(deploy("bank", 2))).await??;
    let Response::Deployed {
        function,
        assignment,
    } = response
    else {
        anyhow::bail!("deploy answered {response:?}");
    };
    assert_eq!(
        (function.version, function.replicas, function.running),
        (1, 2, true)
    );
    assert_ne!(assignment.primary, assignment.backups[0]);
    converged(&planes, |s| {
        s.functions.contains_key("bank") && s.nodes.len() == 3
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_to_propose_and_names_the_leader() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&VOTERS).await?;
    let leader = planes[0].leader().expect("a leader");
    let follower = planes
        .iter()
        .find(|p| p.id() != leader)
        .expect("a follower");
    match follower.propose(deploy("bank", 2)).await {
        Err(Error::NotLeader {
            leader: Some(named),
            leader_addr: Some(addr),
        }) => {
            assert_eq!(named, leader);
            assert_eq!(addr, addr_of(leader));
        }
        other => anyhow::bail!("a follower's propose answered {other:?}"),
    }
    // The same command, forwarded by the follower, is applied by the leader.
    let response = within(5, follower.propose_via_leader(deploy("bank", 2))).await??;
    assert!(
        matches!(response, Response::Deployed { .. }),
        "{response:?}"
    );
    converged(&planes, |s| s.functions.contains_key("bank")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_through_raft_spreads_primaries_and_never_doubles_up() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&VOTERS).await?;
    let leader = plane(&planes, planes[0].leader().expect("a leader"));
    for i in 0..6 {
        let response = within(5, leader.propose(deploy(&format!("f{i}"), 2))).await??;
        assert!(!response.is_rejected(), "{response:?}");
    }
    let too_many = within(5, leader.propose(deploy("wide", 4))).await??;
    assert!(too_many.is_rejected(), "4 copies on 3 nodes: {too_many:?}");
    converged(&planes, |s| s.functions.len() == 6).await?;
    let state = planes[1].state();
    for (name, a) in &state.assignments {
        let copies: Vec<NodeId> = a.copies().collect();
        assert_eq!(copies.len(), 2, "{name}");
        assert_ne!(
            copies[0], copies[1],
            "{name} has two copies on {}",
            copies[0]
        );
    }
    for id in 1..=3 {
        assert_eq!(
            state.primaries_on(NodeId(id)).len(),
            2,
            "primaries on n{id}: {:?}",
            state.loads()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_every_assignment_change() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&VOTERS).await?;
    let leader = plane(&planes, planes[0].leader().expect("a leader"));
    let follower = planes
        .iter()
        .find(|p| p.id() != leader.id())
        .expect("a follower");
    let mut watch = follower.watch();
    let placed = within(5, leader.propose(deploy("bank", 3))).await??;
    let placed = placed.assignment().cloned().expect("an assignment");
    within(
        5,
        watch.wait_for(|s| s.assignments.get("bank") == Some(&placed)),
    )
    .await??;
    let promote = Command::Promote {
        function: "bank".into(),
        new_primary: placed.backups[0],
        expected_epoch: placed.epoch,
    };
    within(5, leader.propose(promote)).await??;
    let seen = within(
        5,
        watch.wait_for(|s| {
            s.assignments
                .get("bank")
                .is_some_and(|a| a.epoch > placed.epoch)
        }),
    )
    .await??;
    assert_eq!(seen.assignments["bank"].primary, placed.backups[0]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_is_idempotent_from_any_member() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&VOTERS).await?;
    let members: BTreeMap<_, _> = VOTERS.iter().map(|(id, role)| member(*id, *role)).collect();
    for p in &planes {
        within(5, p.initialize(members.clone())).await??;
    }
    converged(&planes, |s| s.nodes.len() == 3).await?;
    let status = planes[2].status();
    assert_eq!(status.voters.len(), 3);
    assert!(planes[2]
        .wait_for_leader(Duration::from_secs(1))
        .await
        .is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_command_is_refused_before_it_reaches_the_log() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&VOTERS).await?;
    let leader = plane(&planes, planes[0].leader().expect("a leader"));
    let huge = Command::Deploy {
        name: "x".repeat(1 << 20),
        digest: [0; 32],
        replicas: 2,
        calls: Default::default(),
    };
    match leader.propose(huge.clone()).await {
        Err(Error::TooLarge { bytes }) => assert!(bytes > 1 << 20),
        other => anyhow::bail!("a 1 MiB command answered {other:?}"),
    }
    let follower = planes
        .iter()
        .find(|p| p.id() != leader.id())
        .expect("a follower");
    assert!(matches!(
        follower.propose_via_leader(huge).await,
        Err(Error::TooLarge { .. })
    ));
    Ok(())
}
