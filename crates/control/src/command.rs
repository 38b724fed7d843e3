//! The commands the Raft log carries and how each one changes the [`ClusterState`]:
//! [`ClusterState::apply`], a pure and deterministic function that every replica runs on
//! the same log and so reaches the same state. A command that does not fit the state
//! (unknown function, stale epoch, a node that cannot host) changes nothing and comes
//! back as a [`Rejection`] saying why. **Invariant:** `apply` never panics and never
//! reads anything but the state and the command.

use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, NodeId};
use crate::placement;
use crate::state::{
    Assignment, CallGrants, ClusterState, Function, Health, Node, NodeStatus, Role,
};

/// The most copies (primary, backups and catching up) a function may have.
pub const COPIES_MAX: usize = 7;
/// The longest function name; names are 1 to this many of `a-z`, `0-9`, `-`, `_`,
/// starting with a letter (the same rule as the runtime's `FunctionName`).
pub const FUNCTION_NAME_LEN_MAX: usize = 64;

/// A change to the cluster state, proposed to the master and applied through the log.
/// Commands that change an assignment name the epoch they were planned against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Add a node, or update its addresses and role (a restarting node registers again;
    /// that also marks it up, and brings a removed node back as active).
    RegisterNode {
        id: NodeId,
        peer_addr: String,
        http_addr: String,
        role: Role,
    },
    /// Record the failure detector's verdict on a node.
    SetHealth { node: NodeId, health: Health },
    /// Stop placing new copies on a node; its copies are then moved by the master.
    DrainNode { node: NodeId },
    /// Undo a drain.
    ActivateNode { node: NodeId },
    /// Mark a node removed. Rejected while it still holds a copy of any function.
    RemoveNode { node: NodeId },
    /// Deploy a function, or redeploy it with a new digest or replica count. A first
    /// deploy places it (and starts it); a redeploy keeps its placement, adding or
    /// dropping backups to match `replicas`. Deploying what is already deployed is a no-op.
    Deploy {
        name: String,
        digest: [u8; 32],
        replicas: u8,
        /// The functions it may call.
        #[serde(default)]
        calls: CallGrants,
    },
    /// Start or stop a function.
    SetRunning { name: String, running: bool },
    /// Forget a function and its assignment.
    Delete { name: String },
    /// Make a backup the primary: the epoch grows by one and the old primary leaves the set.
    Promote {
        function: String,
        new_primary: NodeId,
        expected_epoch: Epoch,
    },
    /// The primary restarted: it serves again in a new epoch (the epoch grows by one; the
    /// copies stay). A restarted primary may have lost the tail of its log that it had
    /// not written yet, which its backups may hold: in a new epoch they check their logs
    /// against the one it has now, and one that holds entries it lost is rebuilt from its
    /// snapshot (none of those entries was acknowledged: an answer waits for the
    /// primary's own log). Rejected unless `primary` is still the primary at
    /// `expected_epoch`.
    Renew {
        function: String,
        primary: NodeId,
        expected_epoch: Epoch,
    },
    /// Add a node as a catching-up backup (no epoch change: it does not acknowledge yet).
    AddBackup {
        function: String,
        node: NodeId,
        expected_epoch: Epoch,
    },
    /// A catching-up node holds everything: it becomes a backup. The epoch stays: the
    /// primary's copy already counts it for every commit since it caught up, so the
    /// configuration that serves does not change (a new epoch would make the primary
    /// start a new copy, fence what it had in flight, and ship the backup a second
    /// snapshot of what it lacks from the old one).
    BackupCaughtUp {
        function: String,
        node: NodeId,
        expected_epoch: Epoch,
    },
    /// Drop a backup or a catching-up node (the epoch grows if it was a backup).
    RemoveBackup {
        function: String,
        node: NodeId,
        expected_epoch: Epoch,
    },
    /// A new master announces itself (placement keeps primaries off it).
    MasterIs { node: NodeId },
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Applied; nothing to report (also the answer to Raft's own blank and membership
    /// entries).
    Done,
    /// The function as deployed, and where it lives.
    Deployed {
        function: Function,
        assignment: Assignment,
    },
    /// The function's assignment after the change.
    Assigned {
        function: String,
        assignment: Assignment,
    },
    /// Not applied: the state is unchanged.
    Rejected(Rejection),
}

/// Why a command was not applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("no function named {function:?}")]
    UnknownFunction { function: String },
    #[error("no node {node}")]
    UnknownNode { node: NodeId },
    #[error("stale epoch for {function}: the command expected {expected}, the assignment is at {current}")]
    StaleEpoch {
        function: String,
        expected: Epoch,
        current: Epoch,
    },
    #[error("{node} is not a backup of {function} (only a backup holding every acknowledged commit can be promoted)")]
    NotABackup { function: String, node: NodeId },
    #[error("{node} is not the primary of {function}")]
    NotPrimary { function: String, node: NodeId },
    #[error("{node} is not catching up on {function}")]
    NotCatchingUp { function: String, node: NodeId },
    #[error("{node} holds no copy of {function}")]
    NoCopy { function: String, node: NodeId },
    #[error("{node} is the primary of {function}: promote another copy first")]
    IsPrimary { function: String, node: NodeId },
    #[error("{node} already holds a copy of {function}")]
    AlreadyHolds { function: String, node: NodeId },
    #[error("{node} cannot host a copy: it is {problem}")]
    CannotHost { node: NodeId, problem: HostProblem },
    #[error(
        "{function} needs {needed} data nodes that are active and up; the cluster has {available}"
    )]
    NotEnoughHosts {
        function: String,
        needed: usize,
        available: usize,
    },
    #[error("invalid function name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("replicas must be 1 to {COPIES_MAX}, got {replicas}")]
    InvalidReplicas { replicas: u8 },
    #[error("{function} already has {COPIES_MAX} copies")]
    TooManyCopies { function: String },
    #[error("{node} still holds copies of {functions:?}: move them first")]
    NodeInUse {
        node: NodeId,
        functions: Vec<String>,
    },
    #[error("{node} was removed")]
    NodeRemoved { node: NodeId },
}

/// Why a node may not take a new copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HostProblem {
    #[error("a witness")]
    Witness,
    #[error("draining")]
    Draining,
    #[error("removed")]
    Removed,
    #[error("down")]
    Down,
}

impl Response {
    pub fn is_rejected(&self) -> bool {
        matches!(self, Response::Rejected(_))
    }

    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Response::Rejected(why) => Some(why),
            _ => None,
        }
    }

    pub fn assignment(&self) -> Option<&Assignment> {
        match self {
            Response::Deployed { assignment, .. } | Response::Assigned { assignment, .. } => {
                Some(assignment)
            }
            _ => None,
        }
    }
}

/// Checks a function name against the rule in [`FUNCTION_NAME_LEN_MAX`]'s doc.
pub fn check_function_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > FUNCTION_NAME_LEN_MAX {
        return Err(format!(
            "must be 1 to {FUNCTION_NAME_LEN_MAX} characters, got {}",
            name.len()
        ));
    }
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) || !name.chars().all(valid) {
        return Err("must start with a-z and use only a-z, 0-9, '-' and '_'".into());
    }
    Ok(())
}

impl ClusterState {
    /// Apply one command. The state changes only when the answer is not
    /// [`Response::Rejected`].
    pub fn apply(&mut self, command: &Command) -> Response {
        let outcome = match command {
            Command::RegisterNode {
                id,
                peer_addr,
                http_addr,
                role,
            } => self.register_node(*id, peer_addr, http_addr, *role),
            Command::SetHealth { node, health } => self.node_mut(*node).map(|n| {
                n.health = *health;
                Response::Done
            }),
            Command::DrainNode { node } => self.set_status(*node, NodeStatus::Draining),
            Command::MasterIs { node } => self.node_mut(*node).map(|_| ()).map(|()| {
                self.master = Some(*node);
                Response::Done
            }),
            Command::ActivateNode { node } => self.set_status(*node, NodeStatus::Active),
            Command::RemoveNode { node } => self.remove_node(*node),
            Command::Deploy {
                name,
                digest,
                replicas,
                calls,
            } => self.deploy(name, *digest, *replicas, calls),
            Command::SetRunning { name, running } => self.function_mut(name).map(|f| {
                f.running = *running;
                Response::Done
            }),
            Command::Delete { name } => self.delete(name),
            Command::Promote {
                function,
                new_primary,
                expected_epoch,
            } => self.promote(function, *new_primary, *expected_epoch),
            Command::Renew {
                function,
                primary,
                expected_epoch,
            } => self.renew(function, *primary, *expected_epoch),
            Command::AddBackup {
                function,
                node,
                expected_epoch,
            } => self.add_backup(function, *node, *expected_epoch),
            Command::BackupCaughtUp {
                function,
                node,
                expected_epoch,
            } => self.backup_caught_up(function, *node, *expected_epoch),
            Command::RemoveBackup {
                function,
                node,
                expected_epoch,
            } => self.remove_backup(function, *node, *expected_epoch),
        };
        outcome.unwrap_or_else(Response::Rejected)
    }

    fn register_node(
        &mut self,
        id: NodeId,
        peer_addr: &str,
        http_addr: &str,
        role: Role,
    ) -> Result<Response, Rejection> {
        if role == Role::Witness {
            let functions = self.functions_on(id);
            if !functions.is_empty() {
                return Err(Rejection::NodeInUse {
                    node: id,
                    functions,
                });
            }
        }
        let status = match self.nodes.get(&id).map(|n| n.status) {
            Some(NodeStatus::Draining) => NodeStatus::Draining,
            _ => NodeStatus::Active,
        };
        let node = Node {
            id,
            peer_addr: peer_addr.to_owned(),
            http_addr: http_addr.to_owned(),
            role,
            status,
            health: Health::Up,
        };
        self.nodes.insert(id, node);
        Ok(Response::Done)
    }

    fn set_status(&mut self, id: NodeId, status: NodeStatus) -> Result<Response, Rejection> {
        let node = self.node_mut(id)?;
        if node.status == NodeStatus::Removed {
            return Err(Rejection::NodeRemoved { node: id });
        }
        node.status = status;
        Ok(Response::Done)
    }

    fn remove_node(&mut self, id: NodeId) -> Result<Response, Rejection> {
        self.node_mut(id)?;
        let functions = self.functions_on(id);
        if !functions.is_empty() {
            return Err(Rejection::NodeInUse {
                node: id,
                functions,
            });
        }
        self.node_mut(id)?.status = NodeStatus::Removed;
        Ok(Response::Done)
    }

    fn deploy(
        &mut self,
        name: &str,
        digest: [u8; 32],
        replicas: u8,
        calls: &CallGrants,
    ) -> Result<Response, Rejection> {
        check_function_name(name).map_err(|reason| Rejection::InvalidName {
            name: name.to_owned(),
            reason,
        })?;
        if replicas == 0 || usize::from(replicas) > COPIES_MAX {
            return Err(Rejection::InvalidReplicas { replicas });
        }
        let Some(existing) = self.functions.get(name).cloned() else {
            let placed = placement::place(self, replicas).map_err(|e| match e {
                placement::Error::NotEnoughHosts { needed, available } => {
                    Rejection::NotEnoughHosts {
                        function: name.to_owned(),
                        needed,
                        available,
                    }
                }
            })?;
            let function = Function {
                name: name.to_owned(),
                digest,
                version: 1,
                replicas,
                running: true,
                calls: calls.clone(),
            };
            let assignment = Assignment::new(placed.primary, placed.backups);
            self.functions.insert(name.to_owned(), function.clone());
            self.assignments.insert(name.to_owned(), assignment.clone());
            return Ok(Response::Deployed {
                function,
                assignment,
            });
        };
        let mut assignment = self.assignment(name)?.clone();
        if existing.digest != digest || existing.replicas != replicas {
            resize(self, name, &mut assignment, usize::from(replicas))?;
        }
        let same =
            existing.digest == digest && existing.replicas == replicas && existing.calls == *calls;
        let function = Function {
            digest,
            replicas,
            calls: calls.clone(),
            version: if same {
                existing.version
            } else {
                existing.version.saturating_add(1)
            },
            ..existing
        };
        self.functions.insert(name.to_owned(), function.clone());
        self.assignments.insert(name.to_owned(), assignment.clone());
        Ok(Response::Deployed {
            function,
            assignment,
        })
    }

    fn delete(&mut self, name: &str) -> Result<Response, Rejection> {
        self.function_mut(name)?;
        self.functions.remove(name);
        self.assignments.remove(name);
        Ok(Response::Done)
    }

    fn promote(
        &mut self,
        function: &str,
        new_primary: NodeId,
        expected: Epoch,
    ) -> Result<Response, Rejection> {
        let assignment = self.assignment_at(function, expected)?;
        if !assignment.backups.contains(&new_primary) {
            return Err(Rejection::NotABackup {
                function: function.to_owned(),
                node: new_primary,
            });
        }
        let node = self.node(new_primary)?;
        if node.status == NodeStatus::Removed {
            return Err(Rejection::NodeRemoved { node: new_primary });
        }
        let mut next = assignment.clone();
        next.primary = new_primary;
        next.backups.retain(|n| *n != new_primary);
        next.epoch = next.epoch.next();
        Ok(self.assign(function, next))
    }

    fn renew(
        &mut self,
        function: &str,
        primary: NodeId,
        expected: Epoch,
    ) -> Result<Response, Rejection> {
        let assignment = self.assignment_at(function, expected)?;
        if assignment.primary != primary {
            return Err(Rejection::NotPrimary {
                function: function.to_owned(),
                node: primary,
            });
        }
        let mut next = assignment.clone();
        next.epoch = next.epoch.next();
        Ok(self.assign(function, next))
    }

    fn add_backup(
        &mut self,
        function: &str,
        node: NodeId,
        expected: Epoch,
    ) -> Result<Response, Rejection> {
        let assignment = self.assignment_at(function, expected)?.clone();
        if assignment.holds(node) {
            return Err(Rejection::AlreadyHolds {
                function: function.to_owned(),
                node,
            });
        }
        if assignment.copy_count() >= COPIES_MAX {
            return Err(Rejection::TooManyCopies {
                function: function.to_owned(),
            });
        }
        self.check_can_host(node)?;
        let mut next = assignment;
        next.catching_up.push(node);
        Ok(self.assign(function, next))
    }

    fn backup_caught_up(
        &mut self,
        function: &str,
        node: NodeId,
        expected: Epoch,
    ) -> Result<Response, Rejection> {
        let mut next = self.assignment_at(function, expected)?.clone();
        if !next.catching_up.contains(&node) {
            return Err(Rejection::NotCatchingUp {
                function: function.to_owned(),
                node,
            });
        }
        next.catching_up.retain(|n| *n != node);
        next.backups.push(node);
        Ok(self.assign(function, next))
    }

    fn remove_backup(
        &mut self,
        function: &str,
        node: NodeId,
        expected: Epoch,
    ) -> Result<Response, Rejection> {
        let mut next = self.assignment_at(function, expected)?.clone();
        if next.primary == node {
            return Err(Rejection::IsPrimary {
                function: function.to_owned(),
                node,
            });
        }
        if next.backups.contains(&node) {
            next.backups.retain(|n| *n != node);
            next.epoch = next.epoch.next();
        } else if next.catching_up.contains(&node) {
            next.catching_up.retain(|n| *n != node);
        } else {
            return Err(Rejection::NoCopy {
                function: function.to_owned(),
                node,
            });
        }
        Ok(self.assign(function, next))
    }

    fn assign(&mut self, function: &str, assignment: Assignment) -> Response {
        self.assignments
            .insert(function.to_owned(), assignment.clone());
        Response::Assigned {
            function: function.to_owned(),
            assignment,
        }
    }

    fn check_can_host(&self, id: NodeId) -> Result<(), Rejection> {
        let node = self.node(id)?;
        let problem = if node.role == Role::Witness {
            HostProblem::Witness
        } else if node.status == NodeStatus::Removed {
            HostProblem::Removed
        } else if node.status == NodeStatus::Draining {
            HostProblem::Draining
        } else if node.health == Health::Down {
            HostProblem::Down
        } else {
            return Ok(());
        };
        Err(Rejection::CannotHost { node: id, problem })
    }

    fn node(&self, id: NodeId) -> Result<&Node, Rejection> {
        self.nodes
            .get(&id)
            .ok_or(Rejection::UnknownNode { node: id })
    }

    fn node_mut(&mut self, id: NodeId) -> Result<&mut Node, Rejection> {
        self.nodes
            .get_mut(&id)
            .ok_or(Rejection::UnknownNode { node: id })
    }

    fn function_mut(&mut self, name: &str) -> Result<&mut Function, Rejection> {
        self.functions
            .get_mut(name)
            .ok_or_else(|| Rejection::UnknownFunction {
                function: name.to_owned(),
            })
    }

    fn assignment(&self, name: &str) -> Result<&Assignment, Rejection> {
        self.assignments
            .get(name)
            .ok_or_else(|| Rejection::UnknownFunction {
                function: name.to_owned(),
            })
    }

    /// The assignment of `name`, if it is still at the epoch the command expects.
    fn assignment_at(&self, name: &str, expected: Epoch) -> Result<&Assignment, Rejection> {
        let assignment = self.assignment(name)?;
        if assignment.epoch != expected {
            return Err(Rejection::StaleEpoch {
                function: name.to_owned(),
                expected,
                current: assignment.epoch,
            });
        }
        Ok(assignment)
    }
}

/// Grow or shrink a deployed function's copies to `wanted`. Growth adds catching-up
/// copies on free nodes (rejected when too few exist); shrinking drops catching-up copies
/// first, then backups, newest first, and grows the epoch if a backup left.
fn resize(
    state: &ClusterState,
    name: &str,
    assignment: &mut Assignment,
    wanted: usize,
) -> Result<(), Rejection> {
    while assignment.copy_count() < wanted {
        let mut exclude: Vec<NodeId> = assignment.copies().collect();
        exclude.sort();
        match placement::pick_backup(state, name, &exclude) {
            Some(node) => assignment.catching_up.push(node),
            None => {
                return Err(Rejection::NotEnoughHosts {
                    function: name.to_owned(),
                    needed: wanted,
                    available: assignment.copy_count(),
                });
            }
        }
    }
    let mut backups_changed = false;
    while assignment.copy_count() > wanted {
        if assignment.catching_up.pop().is_none() {
            assignment.backups.pop();
            backups_changed = true;
        }
    }
    if backups_changed {
        assignment.epoch = assignment.epoch.next();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: [u8; 32] = [7; 32];

    fn cluster(data_nodes: u64) -> ClusterState {
        let mut state = ClusterState::default();
        for id in 1..=data_nodes {
            let register = Command::RegisterNode {
                id: NodeId(id),
                peer_addr: format!("10.0.0.{id}:7000"),
                http_addr: format!("10.0.0.{id}:8080"),
                role: Role::Voter,
            };
            assert_eq!(state.apply(&register), Response::Done);
        }
        state
    }

    fn deploy(state: &mut ClusterState, name: &str, replicas: u8) -> Assignment {
        let command = Command::Deploy {
            name: name.into(),
            digest: DIGEST,
            replicas,
            calls: CallGrants::default(),
        };
        match state.apply(&command) {
            Response::Deployed { assignment, .. } => assignment,
            other => panic!("deploy of {name} answered {other:?}"),
        }
    }

    #[test]
    fn promote_bumps_epoch_and_drops_old_primary() {
        let mut state = cluster(3);
        let placed = deploy(&mut state, "bank", 3);
        let new_primary = placed.backups[0];
        let response = state.apply(&Command::Promote {
            function: "bank".into(),
            new_primary,
            expected_epoch: placed.epoch,
        });
        let after = response
            .assignment()
            .expect("promote answers the new assignment");
        assert_eq!(after.epoch, placed.epoch.next());
        assert_eq!(after.primary, new_primary);
        assert!(
            !after.holds(placed.primary),
            "the old primary leaves the set"
        );
        assert_eq!(after.backups, vec![placed.backups[1]]);
    }

    #[test]
    fn call_grants_parse_allow_and_version_the_function() {
        let grants = CallGrants::parse(" bank-west, bank-east ,bank-west").expect("valid");
        assert_eq!(grants.0, vec!["bank-east", "bank-west"]);
        assert!(grants.allows("transfer", "bank-east"));
        assert!(!grants.allows("transfer", "bank-other"));
        assert!(
            grants.allows("transfer", "transfer"),
            "a function may call itself"
        );
        assert!(CallGrants::parse("*").expect("any").allows("a", "b"));
        assert!(!CallGrants::parse("").expect("none").allows("a", "b"));
        assert!(CallGrants::parse("Bad Name").is_err());

        let mut state = cluster(3);
        deploy(&mut state, "transfer", 2);
        assert_eq!(state.functions["transfer"].version, 1);
        let again = |calls: CallGrants| Command::Deploy {
            name: "transfer".into(),
            digest: DIGEST,
            replicas: 2,
            calls,
        };
        state.apply(&again(grants.clone()));
        assert_eq!(
            state.functions["transfer"].version, 2,
            "new grants, new version"
        );
        assert_eq!(state.functions["transfer"].calls, grants);
        state.apply(&again(grants));
        assert_eq!(
            state.functions["transfer"].version, 2,
            "the same deploy changes nothing"
        );
    }

    #[test]
    fn renew_bumps_the_epoch_of_the_same_copies_and_only_for_the_primary() {
        let mut state = cluster(3);
        let placed = deploy(&mut state, "bank", 3);
        let renew = |primary, epoch| Command::Renew {
            function: "bank".into(),
            primary,
            expected_epoch: epoch,
        };
        let before = state.clone();
        assert_eq!(
            state.apply(&renew(placed.backups[0], placed.epoch)),
            Response::Rejected(Rejection::NotPrimary {
                function: "bank".into(),
                node: placed.backups[0],
            })
        );
        assert_eq!(state, before);
        let after = state
            .apply(&renew(placed.primary, placed.epoch))
            .assignment()
            .cloned()
            .expect("renew answers the new assignment");
        assert_eq!(after.epoch, placed.epoch.next());
        assert_eq!(after.primary, placed.primary);
        assert_eq!(after.backups, placed.backups);
        assert!(
            state
                .apply(&renew(placed.primary, placed.epoch))
                .is_rejected(),
            "a renewal planned against an old epoch is stale"
        );
    }

    #[test]
    fn stale_promote_is_rejected_and_changes_nothing() {
        let mut state = cluster(3);
        let placed = deploy(&mut state, "bank", 3);
        let promote = |node, epoch| Command::Promote {
            function: "bank".into(),
            new_primary: node,
            expected_epoch: epoch,
        };
        assert!(!state
            .apply(&promote(placed.backups[0], placed.epoch))
            .is_rejected());
        let before = state.clone();
        let stale = state.apply(&promote(placed.backups[1], placed.epoch));
        assert_eq!(
            stale,
            Response::Rejected(Rejection::StaleEpoch {
                function: "bank".into(),
                expected: placed.epoch,
                current: placed.epoch.next(),
            })
        );
        assert_eq!(state, before);
    }

    #[test]
    fn catching_up_node_cannot_be_promoted_until_caught_up() {
        let mut state = cluster(3);
        let placed = deploy(&mut state, "bank", 2);
        let spare = NodeId(3);
        assert!(!placed.holds(spare));
        let added = state.apply(&Command::AddBackup {
            function: "bank".into(),
            node: spare,
            expected_epoch: placed.epoch,
        });
        assert_eq!(
            added.assignment().map(|a| a.epoch),
            Some(placed.epoch),
            "catching up does not change the epoch"
        );
        let early = state.apply(&Command::Promote {
            function: "bank".into(),
            new_primary: spare,
            expected_epoch: placed.epoch,
        });
        assert_eq!(
            early.rejection(),
            Some(&Rejection::NotABackup {
                function: "bank".into(),
                node: spare
            })
        );
        let caught_up = state.apply(&Command::BackupCaughtUp {
            function: "bank".into(),
            node: spare,
            expected_epoch: placed.epoch,
        });
        let after = caught_up
            .assignment()
            .expect("caught up answers the assignment");
        assert_eq!(
            after.epoch, placed.epoch,
            "a caught-up backup keeps the epoch"
        );
        assert!(after.backups.contains(&spare) && after.catching_up.is_empty());
    }

    #[test]
    fn add_backup_refuses_witnesses_duplicates_and_unknown_nodes() {
        let mut state = cluster(2);
        state.apply(&Command::RegisterNode {
            id: NodeId(9),
            peer_addr: "w".into(),
            http_addr: "w".into(),
            role: Role::Witness,
        });
        let placed = deploy(&mut state, "bank", 2);
        let add = |node| Command::AddBackup {
            function: "bank".into(),
            node,
            expected_epoch: placed.epoch,
        };
        assert_eq!(
            state.apply(&add(NodeId(9))).rejection(),
            Some(&Rejection::CannotHost {
                node: NodeId(9),
                problem: HostProblem::Witness
            })
        );
        assert_eq!(
            state.apply(&add(placed.primary)).rejection(),
            Some(&Rejection::AlreadyHolds {
                function: "bank".into(),
                node: placed.primary
            })
        );
        assert_eq!(
            state.apply(&add(NodeId(42))).rejection(),
            Some(&Rejection::UnknownNode { node: NodeId(42) })
        );
    }

    #[test]
    fn remove_backup_bumps_epoch_only_for_acknowledging_copies() {
        let mut state = cluster(3);
        let placed = deploy(&mut state, "bank", 2);
        let spare = NodeId(3);
        state.apply(&Command::AddBackup {
            function: "bank".into(),
            node: spare,
            expected_epoch: placed.epoch,
        });
        let removed = state.apply(&Command::RemoveBackup {
            function: "bank".into(),
            node: spare,
            expected_epoch: placed.epoch,
        });
        assert_eq!(removed.assignment().map(|a| a.epoch), Some(placed.epoch));
        let backup = placed.backups[0];
        let removed = state.apply(&Command::RemoveBackup {
            function: "bank".into(),
            node: backup,
            expected_epoch: placed.epoch,
        });
        assert_eq!(
            removed.assignment().map(|a| a.epoch),
            Some(placed.epoch.next())
        );
        let primary = state.apply(&Command::RemoveBackup {
            function: "bank".into(),
            node: placed.primary,
            expected_epoch: placed.epoch.next(),
        });
        assert!(matches!(
            primary.rejection(),
            Some(Rejection::IsPrimary { .. })
        ));
    }

    #[test]
    fn remove_node_is_refused_while_it_holds_copies() {
        let mut state = cluster(2);
        let placed = deploy(&mut state, "bank", 2);
        let refused = state.apply(&Command::RemoveNode {
            node: placed.primary,
        });
        assert_eq!(
            refused.rejection(),
            Some(&Rejection::NodeInUse {
                node: placed.primary,
                functions: vec!["bank".into()]
            })
        );
        assert_eq!(
            state.apply(&Command::Delete {
                name: "bank".into()
            }),
            Response::Done
        );
        assert_eq!(
            state.apply(&Command::RemoveNode {
                node: placed.primary
            }),
            Response::Done
        );
        assert_eq!(state.nodes[&placed.primary].status, NodeStatus::Removed);
    }

    #[test]
    fn deploy_is_idempotent_and_redeploy_bumps_the_version() {
        let mut state = cluster(3);
        let first = deploy(&mut state, "bank", 2);
        let again = deploy(&mut state, "bank", 2);
        assert_eq!(first, again);
        assert_eq!(state.functions["bank"].version, 1);
        let new_code = Command::Deploy {
            name: "bank".into(),
            digest: [8; 32],
            replicas: 2,
            calls: CallGrants::default(),
        };
        assert!(!state.apply(&new_code).is_rejected());
        assert_eq!(state.functions["bank"].version, 2);
        assert_eq!(
            state.assignments["bank"], first,
            "new code keeps the placement and the epoch"
        );
    }

    #[test]
    fn redeploy_with_more_replicas_adds_catching_up_copies() {
        let mut state = cluster(3);
        let first = deploy(&mut state, "bank", 2);
        let grown = deploy(&mut state, "bank", 3);
        assert_eq!(grown.epoch, first.epoch);
        assert_eq!(grown.catching_up.len(), 1);
        let too_many = state.apply(&Command::Deploy {
            name: "bank".into(),
            digest: DIGEST,
            replicas: 4,
            calls: CallGrants::default(),
        });
        assert!(matches!(
            too_many.rejection(),
            Some(Rejection::NotEnoughHosts {
                needed: 4,
                available: 3,
                ..
            })
        ));
        let shrunk = deploy(&mut state, "bank", 1);
        assert_eq!(shrunk.copy_count(), 1);
        assert_eq!(
            shrunk.epoch,
            first.epoch.next(),
            "dropping a backup changes the epoch"
        );
    }

    #[test]
    fn bad_deploys_are_rejected() {
        let mut state = cluster(2);
        for name in ["", "Bank", "9lives", "has space", &"x".repeat(65)] {
            let r = state.apply(&Command::Deploy {
                name: name.into(),
                digest: DIGEST,
                replicas: 2,
                calls: CallGrants::default(),
            });
            assert!(
                matches!(r.rejection(), Some(Rejection::InvalidName { .. })),
                "{name:?} gave {r:?}"
            );
        }
        for replicas in [0, 8, 255] {
            let r = state.apply(&Command::Deploy {
                name: "bank".into(),
                digest: DIGEST,
                replicas,
                calls: CallGrants::default(),
            });
            assert_eq!(
                r.rejection(),
                Some(&Rejection::InvalidReplicas { replicas })
            );
        }
        let r = state.apply(&Command::Deploy {
            name: "bank".into(),
            digest: DIGEST,
            replicas: 3,
            calls: CallGrants::default(),
        });
        assert!(matches!(
            r.rejection(),
            Some(Rejection::NotEnoughHosts {
                needed: 3,
                available: 2,
                ..
            })
        ));
        assert!(state.functions.is_empty());
    }

    #[test]
    fn commands_on_unknown_things_are_rejected() {
        let mut state = cluster(1);
        let e = Epoch::FIRST;
        let n = NodeId(1);
        let f = || "ghost".to_string();
        for command in [
            Command::SetRunning {
                name: f(),
                running: false,
            },
            Command::Delete { name: f() },
            Command::Promote {
                function: f(),
                new_primary: n,
                expected_epoch: e,
            },
            Command::AddBackup {
                function: f(),
                node: n,
                expected_epoch: e,
            },
            Command::BackupCaughtUp {
                function: f(),
                node: n,
                expected_epoch: e,
            },
            Command::RemoveBackup {
                function: f(),
                node: n,
                expected_epoch: e,
            },
        ] {
            assert_eq!(
                state.apply(&command).rejection(),
                Some(&Rejection::UnknownFunction { function: f() })
            );
        }
        for command in [
            Command::SetHealth {
                node: NodeId(5),
                health: Health::Down,
            },
            Command::DrainNode { node: NodeId(5) },
            Command::ActivateNode { node: NodeId(5) },
            Command::RemoveNode { node: NodeId(5) },
        ] {
            assert_eq!(
                state.apply(&command).rejection(),
                Some(&Rejection::UnknownNode { node: NodeId(5) })
            );
        }
    }

    #[test]
    fn registering_again_keeps_a_drain_and_marks_the_node_up() {
        let mut state = cluster(2);
        state.apply(&Command::DrainNode { node: NodeId(1) });
        state.apply(&Command::SetHealth {
            node: NodeId(1),
            health: Health::Down,
        });
        state.apply(&Command::RegisterNode {
            id: NodeId(1),
            peer_addr: "new:7000".into(),
            http_addr: "new:8080".into(),
            role: Role::Voter,
        });
        let node = &state.nodes[&NodeId(1)];
        assert_eq!(
            (node.status, node.health, node.peer_addr.as_str()),
            (NodeStatus::Draining, Health::Up, "new:7000")
        );
    }

    /// Arbitrary commands, including nonsense, never panic and never break the
    /// placement invariants. A tiny LCG keeps it deterministic; the seed is in the name.
    #[test]
    fn arbitrary_commands_never_panic_or_double_place_seed_42() {
        let mut rng = 42u64;
        let mut next = move |n: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        let mut state = cluster(4);
        let names = ["a", "b", "c", "d", "e"];
        for _ in 0..20_000 {
            let name = names[next(5) as usize].to_string();
            let node = NodeId(next(6));
            let epoch = Epoch(next(6));
            let command = match next(12) {
                0 => Command::Deploy {
                    name,
                    digest: [next(3) as u8; 32],
                    replicas: next(5) as u8,
                    calls: Default::default(),
                },
                1 => Command::Promote {
                    function: name,
                    new_primary: node,
                    expected_epoch: epoch,
                },
                2 => Command::AddBackup {
                    function: name,
                    node,
                    expected_epoch: epoch,
                },
                3 => Command::BackupCaughtUp {
                    function: name,
                    node,
                    expected_epoch: epoch,
                },
                4 => Command::RemoveBackup {
                    function: name,
                    node,
                    expected_epoch: epoch,
                },
                5 => Command::SetHealth {
                    node,
                    health: if next(2) == 0 {
                        Health::Up
                    } else {
                        Health::Down
                    },
                },
                6 => Command::DrainNode { node },
                7 => Command::ActivateNode { node },
                8 => Command::RemoveNode { node },
                9 => Command::Delete { name },
                10 => Command::SetRunning {
                    name,
                    running: next(2) == 0,
                },
                _ => Command::RegisterNode {
                    id: node,
                    peer_addr: "p".into(),
                    http_addr: "h".into(),
                    role: [Role::Voter, Role::Witness, Role::Member][next(3) as usize],
                },
            };
            state.apply(&command);
            for (name, a) in &state.assignments {
                let mut copies: Vec<NodeId> = a.copies().collect();
                let n = copies.len();
                copies.sort();
                copies.dedup();
                assert_eq!(copies.len(), n, "{name} has two copies on one node: {a:?}");
                assert!(n <= COPIES_MAX);
                assert!(state.functions.contains_key(name));
                for id in copies {
                    let node = state.nodes.get(&id).expect("copies live on known nodes");
                    assert_ne!(
                        node.status,
                        NodeStatus::Removed,
                        "{name} has a copy on removed {id}"
                    );
                    assert_ne!(
                        node.role,
                        Role::Witness,
                        "{name} has a copy on witness {id}"
                    );
                }
            }
        }
    }
}
