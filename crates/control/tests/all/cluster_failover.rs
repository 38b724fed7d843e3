//! Losing the leader: the survivors elect a new one that takes promotions, stale
//! promotions are refused, and (printed, not asserted) how long the election takes with
//! the default timings.

use std::time::Duration;

use tokio::time::Instant;
use understudy_control::{plan_failover, Command, NodeId, Rejection, Response, Role};

use crate::support::{converged, plane, within, Cluster};

const VOTERS: [(u64, Role); 3] = [(1, Role::Voter), (2, Role::Voter), (3, Role::Voter)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_of_a_leader_crash_elect_a_leader_that_promotes_and_refuses_stale_epochs(
) -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&VOTERS).await?;
    let old_leader = planes[0].leader().expect("a leader");
    let deploy = Command::Deploy {
        name: "bank".into(),
        digest: [5; 32],
        replicas: 3,
        calls: Default::default(),
    };
    let placed = within(5, plane(&planes, old_leader).propose(deploy)).await??;
    let placed = placed.assignment().cloned().expect("an assignment");
    converged(&planes, |s| s.functions.contains_key("bank")).await?;

    cluster.crash(plane(&planes, old_leader)).await;
    let survivors: Vec<_> = planes
        .iter()
        .filter(|p| p.id() != old_leader)
        .cloned()
        .collect();
    let survivor_ids: Vec<NodeId> = survivors.iter().map(|p| p.id()).collect();
    let new_leader = cluster.agreed_leader(&survivors, &survivor_ids).await?;
    let leader = plane(&survivors, new_leader);

    // Promote a surviving backup (the old leader may or may not have been the primary).
    let new_primary = placed
        .copies()
        .find(|n| *n != old_leader && *n != placed.primary)
        .expect("a surviving backup");
    let promote = |epoch| Command::Promote {
        function: "bank".into(),
        new_primary,
        expected_epoch: epoch,
    };
    let promoted = within(5, leader.propose(promote(placed.epoch))).await??;
    let after = promoted
        .assignment()
        .cloned()
        .expect("promote answers the assignment");
    assert_eq!(after.epoch, placed.epoch.next());
    assert_eq!(after.primary, new_primary);
    assert!(!after.holds(placed.primary), "the old primary left the set");

    let stale = within(5, leader.propose(promote(placed.epoch))).await??;
    assert_eq!(
        stale,
        Response::Rejected(Rejection::StaleEpoch {
            function: "bank".into(),
            expected: placed.epoch,
            current: after.epoch,
        })
    );
    converged(&survivors, |s| s.assignments.get("bank") == Some(&after)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_plan_from_the_new_leader_moves_the_dead_nodes_primaries() -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&VOTERS).await?;
    let old_leader = planes[0].leader().expect("a leader");
    for i in 0..6 {
        let deploy = Command::Deploy {
            name: format!("f{i}"),
            digest: [5; 32],
            replicas: 2,
            calls: Default::default(),
        };
        within(5, plane(&planes, old_leader).propose(deploy)).await??;
    }
    converged(&planes, |s| s.functions.len() == 6).await?;
    cluster.crash(plane(&planes, old_leader)).await;
    let survivors: Vec<_> = planes
        .iter()
        .filter(|p| p.id() != old_leader)
        .cloned()
        .collect();
    let ids: Vec<NodeId> = survivors.iter().map(|p| p.id()).collect();
    let leader = plane(&survivors, cluster.agreed_leader(&survivors, &ids).await?).clone();

    let health = Command::SetHealth {
        node: old_leader,
        health: understudy_control::Health::Down,
    };
    within(5, leader.propose(health)).await??;
    let plan = plan_failover(&leader.state(), old_leader, |_, _| true);
    assert!(!plan.commands.is_empty());
    for command in plan.commands {
        let response = within(5, leader.propose(command.clone())).await??;
        assert!(!response.is_rejected(), "{command:?}: {response:?}");
    }
    converged(&survivors, |s| s.functions_on(old_leader).is_empty()).await?;
    let state = leader.state();
    for (name, a) in &state.assignments {
        assert!(
            ids.contains(&a.primary),
            "{name} still has its primary on the dead node"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_commits_nothing_and_its_entries_are_discarded_after_healing(
) -> anyhow::Result<()> {
    let mut cluster = Cluster::new();
    cluster.tune = |c| c.propose_timeout_ms = 600;
    let planes = cluster.form(&VOTERS).await?;
    let all: Vec<NodeId> = planes.iter().map(|p| p.id()).collect();
    let zombie = plane(&planes, planes[0].leader().expect("a leader")).clone();
    cluster.router.isolate(zombie.id());

    let lost = Command::Deploy {
        name: "lost".into(),
        digest: [1; 32],
        replicas: 1,
        calls: Default::default(),
    };
    match within(5, zombie.propose(lost)).await? {
        Err(understudy_control::Error::Timeout { .. }) => {}
        other => anyhow::bail!("a cut-off leader answered {other:?}"),
    }
    let majority: Vec<_> = planes
        .iter()
        .filter(|p| p.id() != zombie.id())
        .cloned()
        .collect();
    let ids: Vec<NodeId> = majority.iter().map(|p| p.id()).collect();
    let leader = plane(&majority, cluster.agreed_leader(&majority, &ids).await?).clone();
    let kept = Command::Deploy {
        name: "kept".into(),
        digest: [1; 32],
        replicas: 1,
        calls: Default::default(),
    };
    within(5, leader.propose(kept)).await??;

    cluster.router.heal(zombie.id());
    cluster.agreed_leader(&planes, &all).await?;
    converged(&planes, |s| s.functions.contains_key("kept")).await?;
    assert!(
        !zombie.state().functions.contains_key("lost"),
        "the cut-off leader's entry was discarded"
    );
    Ok(())
}

/// Prints the time from cutting the leader off to a survivor becoming leader, and to
/// the other survivor knowing it, over ten runs: with the default timings, then with the
/// same timings but openraft's own election timer alone (no fast-election watchdog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_from_leader_loss_to_new_leader_with_defaults() -> anyhow::Result<()> {
    measure_elections("defaults (fast election)", |_| {}).await?;
    measure_elections("defaults without fast election", |c| {
        c.fast_election = false
    })
    .await
}

async fn measure_elections(
    label: &str,
    tune: fn(&mut understudy_control::ControlConfig),
) -> anyhow::Result<()> {
    const RUNS: usize = 10;
    let mut cluster = Cluster::new();
    cluster.tune = tune;
    let planes = cluster.form(&VOTERS).await?;
    let all: Vec<NodeId> = planes.iter().map(|p| p.id()).collect();
    let mut elected_ms = Vec::new();
    let mut known_ms = Vec::new();
    for run in 0..RUNS {
        let old = cluster.agreed_leader(&planes, &all).await?;
        // Let heartbeats settle, as in a cluster that has been up for a while.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let old_term = plane(&planes, old).status().term;
        let t0 = Instant::now();
        cluster.router.isolate(old);
        let survivors: Vec<_> = planes.iter().filter(|p| p.id() != old).collect();
        let mut elected = None;
        let mut known = None;
        let deadline = t0 + Duration::from_secs(5);
        while (elected.is_none() || known.is_none()) && Instant::now() < deadline {
            let leaders: Vec<Option<NodeId>> = survivors.iter().map(|p| p.leader()).collect();
            let new_leader = survivors
                .iter()
                .find(|p| {
                    let status = p.status();
                    status.state == understudy_control::ServerState::Leader
                        && status.term > old_term
                })
                .map(|p| p.id());
            if elected.is_none() && new_leader.is_some() {
                elected = Some(t0.elapsed());
            }
            if known.is_none() && new_leader.is_some() && leaders.iter().all(|l| *l == new_leader) {
                known = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let (Some(elected), Some(known)) = (elected, known) else {
            anyhow::bail!("run {run}: no new leader within 5 s");
        };
        println!(
            "run {run}: leader n{} cut off; new leader after {:.1} ms, known to both survivors after {:.1} ms",
            old.0,
            elected.as_secs_f64() * 1e3,
            known.as_secs_f64() * 1e3
        );
        elected_ms.push(elected.as_secs_f64() * 1e3);
        known_ms.push(known.as_secs_f64() * 1e3);
        cluster.router.heal(old);
    }
    for (what, ms) in [("elected", &mut elected_ms), ("known", &mut known_ms)] {
        ms.sort_by(f64::total_cmp);
        println!(
            "{label}: leader loss -> {what}: min {:.1} ms, median {:.1} ms, max {:.1} ms over {RUNS} runs",
            ms[0],
            (ms[RUNS / 2 - 1] + ms[RUNS / 2]) / 2.0,
            ms[RUNS - 1]
        );
    }
    Ok(())
}
