//! The smallest safe cluster: two data nodes and a witness. The witness votes and hosts
//! nothing.

use understudy_control::{plan_failover, Command, Health, NodeId, Rejection, Role};

use crate::support::{converged, plane, within, Cluster};

const MEMBERS: [(u64, Role); 3] = [(1, Role::Voter), (2, Role::Voter), (3, Role::Witness)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_data_nodes_and_a_witness_place_only_on_the_data_nodes() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&MEMBERS).await?;
    let leader = plane(&planes, planes[0].leader().expect("a leader")).clone();
    for i in 0..4 {
        let deploy = Command::Deploy {
            name: format!("f{i}"),
            digest: [1; 32],
            replicas: 2,
            calls: Default::default(),
        };
        let response = within(5, leader.propose(deploy)).await??;
        let a = response.assignment().cloned().expect("placed");
        let mut copies: Vec<NodeId> = a.copies().collect();
        copies.sort();
        assert_eq!(copies, vec![NodeId(1), NodeId(2)]);
    }
    let wide = Command::Deploy {
        name: "wide".into(),
        digest: [1; 32],
        replicas: 3,
        calls: Default::default(),
    };
    let refused = within(5, leader.propose(wide)).await??;
    assert!(
        matches!(
            refused.rejection(),
            Some(Rejection::NotEnoughHosts {
                needed: 3,
                available: 2,
                ..
            })
        ),
        "{refused:?}"
    );
    converged(&planes, |s| s.functions.len() == 4).await?;
    let state = leader.state();
    assert_eq!(state.primaries_on(NodeId(1)).len(), 2);
    assert_eq!(state.primaries_on(NodeId(2)).len(), 2);
    assert!(state.functions_on(NodeId(3)).is_empty());
    assert_eq!(state.nodes[&NodeId(3)].role, Role::Witness);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_node_and_the_witness_carry_on_when_the_other_data_node_dies() -> anyhow::Result<()>
{
    let cluster = Cluster::new();
    let planes = cluster.form(&MEMBERS).await?;
    let leader = plane(&planes, planes[0].leader().expect("a leader")).clone();
    for i in 0..2 {
        let deploy = Command::Deploy {
            name: format!("f{i}"),
            digest: [1; 32],
            replicas: 2,
            calls: Default::default(),
        };
        within(5, leader.propose(deploy)).await??;
    }
    converged(&planes, |s| s.functions.len() == 2).await?;

    let dead = NodeId(1);
    cluster.crash(plane(&planes, dead)).await;
    let survivors: Vec<_> = planes.iter().filter(|p| p.id() != dead).cloned().collect();
    let ids: Vec<NodeId> = survivors.iter().map(|p| p.id()).collect();
    let leader = plane(&survivors, cluster.agreed_leader(&survivors, &ids).await?).clone();
    within(
        5,
        leader.propose(Command::SetHealth {
            node: dead,
            health: Health::Down,
        }),
    )
    .await??;
    let plan = plan_failover(&leader.state(), dead, |_, _| true);
    for command in plan.commands {
        let response = within(5, leader.propose(command)).await??;
        assert!(!response.is_rejected(), "{response:?}");
    }
    converged(&survivors, |s| {
        s.assignments.values().all(|a| a.primary == NodeId(2))
    })
    .await?;
    Ok(())
}
