//! Placement: which nodes hold a function's copies, and what to change when a node goes
//! away or comes back. Pure functions of a [`ClusterState`]: `command` calls [`place`]
//! when it applies a deploy (so every replica computes the same answer), and the master
//! calls [`plan_failover`], [`plan_repair`] and [`plan_rebalance`] (which hands the
//! primaries the master holds over to their backups, one at a time) and proposes the
//! commands they return.
//! **Invariant:** no plan ever puts two copies of one function on one node, or a copy on
//! a witness, a draining, removed or down node.

use std::collections::BTreeMap;

use crate::command::{Command, Response};
use crate::ids::NodeId;
use crate::state::{ClusterState, Health, Load, NodeStatus, Role};

/// Homes for a new function's copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub primary: NodeId,
    pub backups: Vec<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{needed} copies need {needed} data nodes that are active and up; the cluster has {available}")]
    NotEnoughHosts { needed: usize, available: usize },
}

/// What [`plan_failover`] proposes, and what it could not fix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailoverPlan {
    /// To propose in order. Each names the epoch it was planned against, so a plan that
    /// went stale meanwhile is rejected, not half-applied on a changed assignment.
    pub commands: Vec<Command>,
    pub shortfalls: Vec<Shortfall>,
}

/// A function a plan leaves worse than wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shortfall {
    /// Its primary is gone and no backup qualifies (none up, or none holds every
    /// acknowledged commit): it stays unserved until the primary's node returns.
    NoPrimary { function: String },
    /// Fewer copies than wanted: no free node can take another backup.
    UnderReplicated {
        function: String,
        copies: usize,
        wanted: usize,
    },
}

/// Choose a primary and `replicas - 1` backups for a new function among the nodes that
/// can host now. The primary goes where there are fewest primaries (then fewest copies,
/// then lowest id), the backups where there are fewest copies (then fewest primaries,
/// then lowest id): primaries spread across nodes, and the choice is deterministic.
///
/// Fails when fewer nodes can host than `replicas`.
pub fn place(state: &ClusterState, replicas: u8) -> Result<Placement, Error> {
    let needed = usize::from(replicas.max(1));
    let loads = state.loads();
    let mut hosts: Vec<NodeId> = state.hosts().map(|n| n.id).collect();
    if hosts.len() < needed {
        return Err(Error::NotEnoughHosts {
            needed,
            available: hosts.len(),
        });
    }
    hosts.sort_by_key(|id| {
        let load = load_of(&loads, *id);
        (Some(*id) == state.master, load.primaries, load.copies, *id)
    });
    let primary = hosts.remove(0);
    hosts.sort_by_key(|id| backup_key(&loads, *id));
    hosts.truncate(needed - 1);
    Ok(Placement {
        primary,
        backups: hosts,
    })
}

/// The best node for one more copy of `function`: can host, holds no copy of it yet,
/// and is not in `exclude`; fewest copies first, then fewest primaries, then lowest id.
pub fn pick_backup(state: &ClusterState, function: &str, exclude: &[NodeId]) -> Option<NodeId> {
    let loads = state.loads();
    let assignment = state.assignments.get(function);
    state
        .hosts()
        .map(|n| n.id)
        .filter(|id| !exclude.contains(id))
        .filter(|id| !assignment.is_some_and(|a| a.holds(*id)))
        .min_by_key(|id| backup_key(&loads, *id))
}

/// What to do about every function with a copy on `gone` (dead, drained or removed):
///
/// - where `gone` is the primary, promote the backup that `eligible(function, node)`
///   accepts (the caller's check that it holds every acknowledged commit), preferring
///   active nodes, then fewest primaries, fewest copies, lowest id; the epoch grows by one
///   and `gone` leaves the set;
/// - where `gone` is a backup or catching up, drop it (the epoch grows if it was a backup);
/// - then add backups (catching up) on free nodes until the function has its replicas.
///
/// Functions are handled in name order and each decision counts the ones before it, so
/// primaries from one node spread over the survivors.
pub fn plan_failover<F>(state: &ClusterState, gone: NodeId, eligible: F) -> FailoverPlan
where
    F: Fn(&str, NodeId) -> bool,
{
    let mut work = state.clone();
    let mut plan = FailoverPlan::default();
    let affected = state.functions_on(gone);
    for function in affected {
        let Some(assignment) = work.assignments.get(&function).cloned() else {
            continue;
        };
        let command = if assignment.primary == gone {
            match pick_new_primary(&work, &function, gone, &eligible) {
                Some(new_primary) => Command::Promote {
                    function: function.clone(),
                    new_primary,
                    expected_epoch: assignment.epoch,
                },
                None => {
                    plan.shortfalls.push(Shortfall::NoPrimary { function });
                    continue;
                }
            }
        } else {
            Command::RemoveBackup {
                function: function.clone(),
                node: gone,
                expected_epoch: assignment.epoch,
            }
        };
        if !step(&mut work, &mut plan, command) {
            continue;
        }
        top_up(&mut work, &mut plan, &function, &[gone]);
    }
    plan
}

/// Backups to add, on free nodes, to every function with fewer copies than it wants
/// (after a failover found no free node, or when a node joins or returns). Functions with
/// a primary on a down node are left to [`plan_failover`].
pub fn plan_repair(state: &ClusterState) -> FailoverPlan {
    let mut work = state.clone();
    let mut plan = FailoverPlan::default();
    let names: Vec<String> = state.functions.keys().cloned().collect();
    for function in names {
        top_up(&mut work, &mut plan, &function, &[]);
    }
    plan
}

fn pick_new_primary<F>(
    state: &ClusterState,
    function: &str,
    gone: NodeId,
    eligible: &F,
) -> Option<NodeId>
where
    F: Fn(&str, NodeId) -> bool,
{
    let loads = state.loads();
    let assignment = state.assignments.get(function)?;
    assignment
        .backups
        .iter()
        .copied()
        .filter(|id| *id != gone)
        .filter(|id| {
            state.nodes.get(id).is_some_and(|n| {
                n.health == Health::Up && n.status != NodeStatus::Removed && n.role != Role::Witness
            })
        })
        .filter(|id| eligible(function, *id))
        .min_by_key(|id| {
            let draining = state
                .nodes
                .get(id)
                .is_some_and(|n| n.status != NodeStatus::Active);
            let load = load_of(&loads, *id);
            (
                draining,
                Some(*id) == state.master,
                load.primaries,
                load.copies,
                *id,
            )
        })
}

/// As master: hand one primary that lives on the master over to one of its backups (the
/// master's node then takes a copy again as a catching-up backup, where it fits). The
/// first command is the promotion: the master steps down as that primary before it is
/// carried out. Empty when every primary is elsewhere, or when a function's backups
/// cannot take over (none up and active and caught up).
pub fn plan_rebalance(state: &ClusterState) -> FailoverPlan {
    let mut work = state.clone();
    let mut plan = FailoverPlan::default();
    let Some(master) = state.master else {
        return plan;
    };
    let loads = state.loads();
    for (function, a) in &state.assignments {
        if a.primary != master {
            continue;
        }
        let Some(new_primary) = a
            .backups
            .iter()
            .copied()
            .filter(|id| {
                state.nodes.get(id).is_some_and(|n| {
                    n.health == Health::Up
                        && n.status == NodeStatus::Active
                        && n.role != Role::Witness
                })
            })
            .min_by_key(|id| {
                let load = load_of(&loads, *id);
                (load.primaries, load.copies, *id)
            })
        else {
            continue;
        };
        let command = Command::Promote {
            function: function.clone(),
            new_primary,
            expected_epoch: a.epoch,
        };
        if step(&mut work, &mut plan, command) {
            top_up(&mut work, &mut plan, function, &[]);
            return plan;
        }
    }
    plan
}

/// Add catching-up backups to `function` until it has its replicas or no node is free.
fn top_up(work: &mut ClusterState, plan: &mut FailoverPlan, function: &str, exclude: &[NodeId]) {
    let Some(wanted) = work
        .functions
        .get(function)
        .map(|f| usize::from(f.replicas))
    else {
        return;
    };
    loop {
        let Some(assignment) = work.assignments.get(function) else {
            return;
        };
        let copies = assignment.copy_count();
        let primary_up = work
            .nodes
            .get(&assignment.primary)
            .is_some_and(|n| n.health == Health::Up);
        if copies >= wanted || !primary_up || exclude.contains(&assignment.primary) {
            return;
        }
        let Some(node) = pick_backup(work, function, exclude) else {
            plan.shortfalls.push(Shortfall::UnderReplicated {
                function: function.to_owned(),
                copies,
                wanted,
            });
            return;
        };
        let command = Command::AddBackup {
            function: function.to_owned(),
            node,
            expected_epoch: assignment.epoch,
        };
        if !step(work, plan, command) {
            return;
        }
    }
}

/// Apply `command` to the working copy and keep it in the plan if it was accepted.
fn step(work: &mut ClusterState, plan: &mut FailoverPlan, command: Command) -> bool {
    match work.apply(&command) {
        Response::Rejected(why) => {
            // The planner only builds commands the state accepts; a rejection here is a
            // planner bug. Leave the function alone rather than propose a doomed command.
            tracing::error!(%why, ?command, "failover planner built a command the state rejects");
            false
        }
        _ => {
            plan.commands.push(command);
            true
        }
    }
}

fn load_of(loads: &BTreeMap<NodeId, Load>, id: NodeId) -> Load {
    loads.get(&id).copied().unwrap_or_default()
}

fn backup_key(loads: &BTreeMap<NodeId, Load>, id: NodeId) -> (usize, usize, NodeId) {
    let load = load_of(loads, id);
    (load.copies, load.primaries, id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Epoch;
    use crate::state::{Assignment, Role};

    fn cluster(data_nodes: u64) -> ClusterState {
        let mut state = ClusterState::default();
        for id in 1..=data_nodes {
            register(&mut state, id, Role::Voter);
        }
        state
    }

    fn register(state: &mut ClusterState, id: u64, role: Role) {
        let command = Command::RegisterNode {
            id: NodeId(id),
            peer_addr: format!("p{id}"),
            http_addr: format!("h{id}"),
            role,
        };
        assert_eq!(state.apply(&command), Response::Done);
    }

    fn deploy(state: &mut ClusterState, name: &str, replicas: u8) -> Assignment {
        let command = Command::Deploy {
            name: name.into(),
            digest: [1; 32],
            replicas,
            calls: Default::default(),
        };
        state
            .apply(&command)
            .assignment()
            .cloned()
            .unwrap_or_else(|| panic!("deploy of {name} was rejected"))
    }

    fn apply_all(state: &mut ClusterState, commands: &[Command]) {
        for command in commands {
            let response = state.apply(command);
            assert!(
                !response.is_rejected(),
                "{command:?} was rejected: {response:?}"
            );
        }
    }

    fn assert_no_double_copies(state: &ClusterState) {
        for (name, a) in &state.assignments {
            let mut copies: Vec<NodeId> = a.copies().collect();
            let n = copies.len();
            copies.sort();
            copies.dedup();
            assert_eq!(copies.len(), n, "{name} has two copies on one node: {a:?}");
        }
    }

    #[test]
    fn first_placement_is_deterministic_with_ties_broken_by_node_id() {
        let state = cluster(3);
        assert_eq!(
            place(&state, 2),
            Ok(Placement {
                primary: NodeId(1),
                backups: vec![NodeId(2)]
            })
        );
        assert_eq!(
            place(&state, 3),
            Ok(Placement {
                primary: NodeId(1),
                backups: vec![NodeId(2), NodeId(3)]
            })
        );
    }

    #[test]
    fn primaries_spread_evenly_across_nodes() {
        let mut state = cluster(3);
        for i in 0..9 {
            deploy(&mut state, &format!("f{i}"), 2);
        }
        let loads = state.loads();
        for id in 1..=3 {
            assert_eq!(loads[&NodeId(id)].primaries, 3, "node {id}: {loads:?}");
        }
        // Copies are balanced greedily, one function at a time: close, not exact.
        let copies: Vec<usize> = loads.values().map(|l| l.copies).collect();
        let spread = copies.iter().max().unwrap_or(&0) - copies.iter().min().unwrap_or(&0);
        assert!(spread <= 2, "copies {copies:?}");
        assert_no_double_copies(&state);
    }

    #[test]
    fn never_two_copies_on_one_node() {
        let state = cluster(3);
        let placed = place(&state, 3).expect("3 copies fit on 3 nodes");
        let mut all = vec![placed.primary];
        all.extend(&placed.backups);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 3);
        assert_eq!(
            place(&state, 4),
            Err(Error::NotEnoughHosts {
                needed: 4,
                available: 3
            })
        );
    }

    #[test]
    fn witnesses_draining_and_down_nodes_get_no_copies() {
        let mut state = cluster(4);
        register(&mut state, 9, Role::Witness);
        state.apply(&Command::DrainNode { node: NodeId(1) });
        state.apply(&Command::SetHealth {
            node: NodeId(2),
            health: crate::state::Health::Down,
        });
        for i in 0..4 {
            let a = deploy(&mut state, &format!("f{i}"), 2);
            let mut copies: Vec<NodeId> = a.copies().collect();
            copies.sort();
            assert_eq!(copies, vec![NodeId(3), NodeId(4)]);
        }
    }

    #[test]
    fn failover_promotes_a_backup_and_adds_a_catching_up_one() {
        let mut state = cluster(4);
        let placed = deploy(&mut state, "bank", 2);
        assert_eq!(
            (placed.primary, placed.backups.clone()),
            (NodeId(1), vec![NodeId(2)])
        );
        let plan = plan_failover(&state, NodeId(1), |_, _| true);
        assert_eq!(
            plan.commands,
            vec![
                Command::Promote {
                    function: "bank".into(),
                    new_primary: NodeId(2),
                    expected_epoch: Epoch(1)
                },
                Command::AddBackup {
                    function: "bank".into(),
                    node: NodeId(3),
                    expected_epoch: Epoch(2)
                },
            ]
        );
        assert!(plan.shortfalls.is_empty());
        apply_all(&mut state, &plan.commands);
        let after = &state.assignments["bank"];
        assert_eq!((after.epoch, after.primary), (Epoch(2), NodeId(2)));
        assert_eq!(
            (after.backups.clone(), after.catching_up.clone()),
            (vec![], vec![NodeId(3)])
        );
    }

    #[test]
    fn failover_promotes_only_backups_the_caller_accepts() {
        let mut state = cluster(3);
        deploy(&mut state, "bank", 3);
        let plan = plan_failover(&state, NodeId(1), |function, node| {
            function == "bank" && node == NodeId(3)
        });
        assert_eq!(
            plan.commands[0],
            Command::Promote {
                function: "bank".into(),
                new_primary: NodeId(3),
                expected_epoch: Epoch(1)
            }
        );
        let none = plan_failover(&state, NodeId(1), |_, _| false);
        assert_eq!(none.commands, vec![]);
        assert_eq!(
            none.shortfalls,
            vec![Shortfall::NoPrimary {
                function: "bank".into()
            }]
        );
    }

    #[test]
    fn failover_skips_backups_that_are_down() {
        let mut state = cluster(3);
        deploy(&mut state, "bank", 3);
        state.apply(&Command::SetHealth {
            node: NodeId(2),
            health: crate::state::Health::Down,
        });
        let plan = plan_failover(&state, NodeId(1), |_, _| true);
        assert_eq!(
            plan.commands[0],
            Command::Promote {
                function: "bank".into(),
                new_primary: NodeId(3),
                expected_epoch: Epoch(1)
            }
        );
    }

    #[test]
    fn failover_spreads_the_dead_nodes_primaries() {
        let mut state = cluster(3);
        for i in 0..6 {
            deploy(&mut state, &format!("f{i}"), 3);
        }
        let dead = NodeId(1);
        let moved = state.primaries_on(dead).len();
        assert_eq!(moved, 2);
        let plan = plan_failover(&state, dead, |_, _| true);
        apply_all(&mut state, &plan.commands);
        let loads = state.loads();
        assert_eq!(loads[&NodeId(2)].primaries, 3);
        assert_eq!(loads[&NodeId(3)].primaries, 3);
        assert!(
            state.functions_on(dead).is_empty(),
            "the dead node holds nothing after the plan"
        );
        assert_no_double_copies(&state);
        // Three copies wanted, two nodes left: every function is short of one.
        assert_eq!(plan.shortfalls.len(), 6);
    }

    #[test]
    fn failover_of_a_backup_drops_it_and_replaces_it() {
        let mut state = cluster(3);
        deploy(&mut state, "bank", 2);
        let plan = plan_failover(&state, NodeId(2), |_, _| true);
        assert_eq!(
            plan.commands,
            vec![
                Command::RemoveBackup {
                    function: "bank".into(),
                    node: NodeId(2),
                    expected_epoch: Epoch(1)
                },
                Command::AddBackup {
                    function: "bank".into(),
                    node: NodeId(3),
                    expected_epoch: Epoch(2)
                },
            ]
        );
    }

    #[test]
    fn failover_never_picks_the_gone_node_as_new_backup() {
        // The gone node is still "up" in the state (the caller did not mark it down).
        let mut state = cluster(2);
        deploy(&mut state, "bank", 2);
        let plan = plan_failover(&state, NodeId(1), |_, _| true);
        assert_eq!(
            plan.commands,
            vec![Command::Promote {
                function: "bank".into(),
                new_primary: NodeId(2),
                expected_epoch: Epoch(1)
            }]
        );
        assert_eq!(
            plan.shortfalls,
            vec![Shortfall::UnderReplicated {
                function: "bank".into(),
                copies: 1,
                wanted: 2
            }]
        );
    }

    #[test]
    fn repair_tops_up_when_a_node_returns() {
        let mut state = cluster(2);
        deploy(&mut state, "bank", 2);
        state.apply(&Command::SetHealth {
            node: NodeId(1),
            health: crate::state::Health::Down,
        });
        let plan = plan_failover(&state, NodeId(1), |_, _| true);
        apply_all(&mut state, &plan.commands);
        assert_eq!(state.assignments["bank"].copy_count(), 1);
        // Node 1 comes back (registers again): repair puts a backup on it.
        register(&mut state, 1, Role::Voter);
        let repair = plan_repair(&state);
        assert_eq!(
            repair.commands,
            vec![Command::AddBackup {
                function: "bank".into(),
                node: NodeId(1),
                expected_epoch: Epoch(2)
            }]
        );
    }

    /// Random deploys and node losses, with the plan applied each time: no function ever
    /// has two copies on one node or a copy on the lost node. Seed in the name.
    #[test]
    fn random_failovers_keep_placement_invariants_seed_7() {
        let mut rng = 7u64;
        let mut next = move |n: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        let mut state = cluster(5);
        for round in 0..300 {
            let name = format!("f{}", next(12));
            let _ = state.apply(&Command::Deploy {
                name,
                digest: [0; 32],
                replicas: 1 + next(3) as u8,
                calls: Default::default(),
            });
            if round % 7 == 0 {
                let gone = NodeId(1 + next(5));
                state.apply(&Command::SetHealth {
                    node: gone,
                    health: crate::state::Health::Down,
                });
                let salt = next(3);
                let plan = plan_failover(&state, gone, |f, node| {
                    !(node.0 + f.len() as u64 + salt).is_multiple_of(3)
                });
                apply_all(&mut state, &plan.commands);
                for (name, a) in &state.assignments {
                    let stranded = plan.shortfalls.contains(&Shortfall::NoPrimary {
                        function: name.clone(),
                    });
                    assert!(
                        stranded || !a.holds(gone),
                        "{name} still on {gone} after the plan"
                    );
                }
                // The node comes back.
                register(&mut state, gone.0, Role::Voter);
                let repair = plan_repair(&state);
                apply_all(&mut state, &repair.commands);
            }
            assert_no_double_copies(&state);
        }
    }

    #[test]
    fn primaries_stay_off_the_master_where_another_node_can_serve() {
        let mut state = cluster(3);
        apply_all(&mut state, &[Command::MasterIs { node: NodeId(1) }]);
        for name in ["a", "b", "c", "d"] {
            let a = deploy(&mut state, name, 2);
            assert_ne!(
                a.primary,
                NodeId(1),
                "{name} placed its primary on the master"
            );
        }
        // A failover prefers a backup that is not the master.
        let a = state.assignments["a"].clone();
        let mut work = state.clone();
        apply_all(
            &mut work,
            &[Command::SetHealth {
                node: a.primary,
                health: Health::Down,
            }],
        );
        let plan = plan_failover(&work, a.primary, |_, _| true);
        if let Some(Command::Promote { new_primary, .. }) = plan.commands.first() {
            let others: Vec<NodeId> = a
                .backups
                .iter()
                .copied()
                .filter(|b| *b != NodeId(1))
                .collect();
            if !others.is_empty() {
                assert_ne!(*new_primary, NodeId(1));
            }
        }
    }

    #[test]
    fn a_new_master_hands_its_primaries_over_one_at_a_time() {
        let mut state = cluster(3);
        for name in ["a", "b", "c"] {
            deploy(&mut state, name, 3);
        }
        let on_2: Vec<String> = state
            .assignments
            .iter()
            .filter(|(_, a)| a.primary == NodeId(2))
            .map(|(n, _)| n.clone())
            .collect();
        assert!(
            !on_2.is_empty(),
            "node 2 holds a primary: {:?}",
            state.assignments
        );
        apply_all(&mut state, &[Command::MasterIs { node: NodeId(2) }]);
        for _ in 0..on_2.len() {
            let plan = plan_rebalance(&state);
            let Some(Command::Promote { new_primary, .. }) = plan.commands.first() else {
                panic!("expected a handover, got {plan:?}");
            };
            assert_ne!(*new_primary, NodeId(2));
            // Node 2 comes back as a catching-up copy (3 copies wanted).
            assert!(
                plan.commands
                    .iter()
                    .any(|c| matches!(c, Command::AddBackup { node, .. } if *node == NodeId(2))),
                "{plan:?}"
            );
            apply_all(&mut state, &plan.commands);
            assert_no_double_copies(&state);
        }
        assert!(state.assignments.values().all(|a| a.primary != NodeId(2)));
        assert!(plan_rebalance(&state).commands.is_empty());
        // Without a backup to take over, the primary stays.
        let mut lone = cluster(2);
        deploy(&mut lone, "solo", 1);
        let holder = lone.assignments["solo"].primary;
        apply_all(&mut lone, &[Command::MasterIs { node: holder }]);
        assert!(plan_rebalance(&lone).commands.is_empty());
    }
}
