//! The cluster's replicated state: the nodes, the deployed functions, and for each
//! function its assignment (epoch, primary, backups, backups still catching up). Plain
//! data with serde, identical on every node that applied the same log prefix. How a
//! [`Command`](crate::Command) changes it lives in `command`; which node gets which copy
//! is decided in `placement`. **Invariant:** nothing here does I/O, reads a clock or
//! draws a random number.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, NodeId};

/// Everything the master decides, as of some applied log index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<NodeId, Node>,
    pub functions: BTreeMap<String, Function>,
    /// One entry per function in `functions`, under the same name.
    pub assignments: BTreeMap<String, Assignment>,
    /// The master as it announced itself (`Command::MasterIs`). Placement keeps
    /// primaries off it where another node can serve: a primary there would fail over
    /// only after an election, and every primary already waits on the master's leases.
    #[serde(default)]
    pub master: Option<NodeId>,
}

/// A node as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// Where peers reach it over QUIC (control plane, replication, forwarding).
    pub peer_addr: String,
    /// Where clients reach its HTTP API.
    pub http_addr: String,
    pub role: Role,
    pub status: NodeStatus,
    /// The master's last verdict on it. Not a heartbeat record: it changes only when the
    /// failure detector changes its mind (see [`Command::SetHealth`](crate::Command)).
    pub health: Health,
}

/// What a node is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A Raft voter that also hosts functions.
    Voter,
    /// A Raft voter that hosts no function: it only breaks ties (two data nodes plus a
    /// witness is the smallest safe cluster).
    Witness,
    /// A data node that does not vote (a Raft learner).
    Member,
}

/// Where a node is in its life in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Takes new copies.
    Active,
    /// Takes no new copies; its copies are being moved away.
    Draining,
    /// Gone; kept so that its id is not silently reused.
    Removed,
}

/// The master's verdict on a node's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Health {
    Up,
    Down,
}

/// The functions a function may call, granted at deploy: names, or `*` for any. None by
/// default: a function calls (and locks) only what its operator allowed, as Spin's
/// allowed hosts and wasmCloud's links do. A function may always call itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CallGrants(pub Vec<String>);

impl CallGrants {
    /// Any function.
    pub fn any() -> CallGrants {
        CallGrants(vec!["*".into()])
    }

    /// Parse `a,b` or `*` (blank: none). Fails on a name that is not a valid function
    /// name.
    pub fn parse(text: &str) -> Result<CallGrants, String> {
        let mut names: Vec<String> = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name != "*" {
                crate::command::check_function_name(name)
                    .map_err(|reason| format!("cannot grant calls to {name:?}: {reason}"))?;
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(CallGrants(names))
    }

    /// Whether `caller`, holding these grants, may call `callee`.
    pub fn allows(&self, caller: &str, callee: &str) -> bool {
        caller == callee || self.0.iter().any(|n| n == "*" || n == callee)
    }
}

impl std::fmt::Display for CallGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// A deployed function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    /// sha256 of the component: its content address.
    pub digest: [u8; 32],
    /// 1 on the first deploy, +1 on every deploy that changes the digest or the replicas.
    pub version: u64,
    /// Copies wanted: the primary and `replicas - 1` backups.
    pub replicas: u8,
    /// Started (serving) or stopped.
    pub running: bool,
    /// The functions it may call.
    #[serde(default)]
    pub calls: CallGrants,
}

/// Where one function's copies live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub epoch: Epoch,
    /// Serves the function and ships its log to the backups.
    pub primary: NodeId,
    /// Hold every acknowledged commit: the primary acknowledges a commit only after all
    /// of them have it. A promotion picks the new primary among them.
    pub backups: Vec<NodeId>,
    /// Receive the log but are not yet counted for acknowledgement; they join `backups`
    /// through [`Command::BackupCaughtUp`](crate::Command).
    pub catching_up: Vec<NodeId>,
}

/// How much a node already carries, the key placement balances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Load {
    pub primaries: usize,
    /// Primaries, backups and catching-up copies together.
    pub copies: usize,
}

impl Node {
    /// A node as it registers: active and up.
    pub fn new(
        id: NodeId,
        peer_addr: impl Into<String>,
        http_addr: impl Into<String>,
        role: Role,
    ) -> Node {
        Node {
            id,
            peer_addr: peer_addr.into(),
            http_addr: http_addr.into(),
            role,
            status: NodeStatus::Active,
            health: Health::Up,
        }
    }

    /// Whether it may receive a new copy of a function now.
    pub fn can_host(&self) -> bool {
        self.role != Role::Witness && self.status == NodeStatus::Active && self.health == Health::Up
    }
}

impl Assignment {
    /// A fresh placement at the first epoch.
    pub fn new(primary: NodeId, backups: Vec<NodeId>) -> Assignment {
        Assignment {
            epoch: Epoch::FIRST,
            primary,
            backups,
            catching_up: Vec::new(),
        }
    }

    /// Every node holding a copy: primary, backups, then the ones catching up.
    pub fn copies(&self) -> impl Iterator<Item = NodeId> + '_ {
        std::iter::once(self.primary)
            .chain(self.backups.iter().copied())
            .chain(self.catching_up.iter().copied())
    }

    pub fn copy_count(&self) -> usize {
        1 + self.backups.len() + self.catching_up.len()
    }

    pub fn holds(&self, node: NodeId) -> bool {
        self.copies().any(|n| n == node)
    }
}

impl ClusterState {
    /// Nodes that may take a new copy now, in id order.
    pub fn hosts(&self) -> impl Iterator<Item = &Node> + '_ {
        self.nodes.values().filter(|n| n.can_host())
    }

    /// What every node carries, counted over all assignments. Nodes that carry nothing
    /// are absent (their load is the default, zero).
    pub fn loads(&self) -> BTreeMap<NodeId, Load> {
        let mut loads: BTreeMap<NodeId, Load> = BTreeMap::new();
        for assignment in self.assignments.values() {
            loads.entry(assignment.primary).or_default().primaries += 1;
            for node in assignment.copies() {
                loads.entry(node).or_default().copies += 1;
            }
        }
        loads
    }

    /// Names of the functions with a copy on `node`, in name order.
    pub fn functions_on(&self, node: NodeId) -> Vec<String> {
        self.assignments
            .iter()
            .filter(|(_, a)| a.holds(node))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Names of the functions whose primary is `node`, in name order.
    pub fn primaries_on(&self, node: NodeId) -> Vec<String> {
        self.assignments
            .iter()
            .filter(|(_, a)| a.primary == node)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_count_primaries_and_every_copy() {
        let mut state = ClusterState::default();
        state.assignments.insert(
            "a".into(),
            Assignment {
                epoch: Epoch(3),
                primary: NodeId(1),
                backups: vec![NodeId(2)],
                catching_up: vec![NodeId(3)],
            },
        );
        state
            .assignments
            .insert("b".into(), Assignment::new(NodeId(2), vec![NodeId(1)]));
        let loads = state.loads();
        assert_eq!(
            loads[&NodeId(1)],
            Load {
                primaries: 1,
                copies: 2
            }
        );
        assert_eq!(
            loads[&NodeId(2)],
            Load {
                primaries: 1,
                copies: 2
            }
        );
        assert_eq!(
            loads[&NodeId(3)],
            Load {
                primaries: 0,
                copies: 1
            }
        );
        assert_eq!(state.functions_on(NodeId(3)), vec!["a".to_string()]);
        assert_eq!(state.primaries_on(NodeId(2)), vec!["b".to_string()]);
    }
}
