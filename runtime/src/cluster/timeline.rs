//! The cluster's timeline as this node saw it: a bounded log in memory of what happened
//! (a node declared down or up, a promotion, a hand-over, a backup added or caught up,
//! a node joining, draining or removed, a new master, an in-doubt transaction resolved),
//! each with the time this node learned of it, for the console (`GET /ui`).
//!
//! Most events are changes between two cluster states the node applied (`changes`,
//! pure), so every node records them, whichever of them the console reads; a new master
//! is what Raft reports; the rest are recorded where they happen (`distributed` records
//! the in-doubt transactions it resolves). The log only remembers: it decides nothing and nothing waits on it.
//!
//! **Invariant:** the timeline holds at most `EVENTS_MAX` events; recording never blocks
//! on anything but its own short lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use understudy_control::{ClusterState, Health, NodeId, NodeStatus};

/// Events kept; the oldest go first.
pub const EVENTS_MAX: usize = 512;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    NodeDown,
    NodeUp,
    NodeJoined,
    NodeDraining,
    NodeRemoved,
    MasterChanged,
    /// A backup became primary because the primary's node was declared down.
    Promoted,
    /// The primary moved while its node was up (a drain, a rebalance, a restart).
    HandedOver,
    BackupAdded,
    BackupCaughtUp,
    BackupDropped,
    Deployed,
    Deleted,
    Stopped,
    Started,
    InDoubtResolved,
}

/// One change, before the timeline stamps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    pub node: Option<u64>,
    pub function: Option<String>,
    pub text: String,
}

/// One event of the timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Numbers events on this node, from 1: a reader asks for those after the last it saw.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when this node recorded it.
    pub at_ms: f64,
    pub kind: Kind,
    pub node: Option<u64>,
    pub function: Option<String>,
    pub text: String,
}

/// The bounded log.
#[derive(Debug, Default)]
pub struct Timeline {
    events: Mutex<VecDeque<Event>>,
    seq_last: AtomicU64,
}

impl Timeline {
    pub fn record(&self, change: Change) {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let mut events = self.events.lock();
        let seq = self.seq_last.fetch_add(1, Ordering::Relaxed) + 1;
        if events.len() == EVENTS_MAX {
            events.pop_front();
        }
        events.push_back(Event {
            seq,
            at_ms,
            kind: change.kind,
            node: change.node,
            function: change.function,
            text: change.text,
        });
    }

    /// The events after `seq` still held, oldest first.
    pub fn since(&self, seq: u64) -> Vec<Event> {
        self.events
            .lock()
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }
}

/// What changed from `old` to `new`, in the order a reader wants it: nodes, then
/// functions (their primaries before their backups).
pub fn changes(old: &ClusterState, new: &ClusterState) -> Vec<Change> {
    let mut out = Vec::new();
    for n in new.nodes.values() {
        let id = Some(n.id.0);
        let Some(was) = old.nodes.get(&n.id) else {
            out.push(change(
                Kind::NodeJoined,
                id,
                None,
                format!("node {} joined ({:?})", n.id.0, n.role).to_lowercase(),
            ));
            continue;
        };
        match (was.health, n.health) {
            (Health::Up, Health::Down) => out.push(change(
                Kind::NodeDown,
                id,
                None,
                format!("node {} declared down", n.id.0),
            )),
            (Health::Down, Health::Up) => out.push(change(
                Kind::NodeUp,
                id,
                None,
                format!("node {} is up again", n.id.0),
            )),
            _ => {}
        }
        if was.status != n.status {
            let (kind, what) = match n.status {
                NodeStatus::Draining => (Kind::NodeDraining, "is draining"),
                NodeStatus::Removed => (Kind::NodeRemoved, "was removed"),
                NodeStatus::Active => (Kind::NodeJoined, "is active again"),
            };
            out.push(change(kind, id, None, format!("node {} {what}", n.id.0)));
        }
    }
    for (name, f) in &new.functions {
        let function = Some(name.clone());
        match old.functions.get(name) {
            None => out.push(change(
                Kind::Deployed,
                None,
                function.clone(),
                format!("{name} deployed (version {})", f.version),
            )),
            Some(was) if was.version != f.version => out.push(change(
                Kind::Deployed,
                None,
                function.clone(),
                format!("{name} upgraded to version {}", f.version),
            )),
            Some(was) if was.running != f.running => out.push(change(
                if f.running {
                    Kind::Started
                } else {
                    Kind::Stopped
                },
                None,
                function.clone(),
                format!("{name} {}", if f.running { "started" } else { "stopped" }),
            )),
            Some(_) => {}
        }
        if let Some(a) = new.assignments.get(name) {
            assignment_changes(name, old.assignments.get(name), a, new, &mut out);
        }
    }
    for name in old.functions.keys() {
        if !new.functions.contains_key(name) {
            out.push(change(
                Kind::Deleted,
                None,
                Some(name.clone()),
                format!("{name} deleted"),
            ));
        }
    }
    out
}

/// The primary and backup changes of one function's assignment.
fn assignment_changes(
    name: &str,
    old: Option<&understudy_control::Assignment>,
    a: &understudy_control::Assignment,
    new: &ClusterState,
    out: &mut Vec<Change>,
) {
    let function = Some(name.to_owned());
    let Some(old) = old else {
        return;
    };
    if old.primary != a.primary {
        let was_down = new
            .nodes
            .get(&old.primary)
            .is_none_or(|n| n.health == Health::Down || n.status == NodeStatus::Removed);
        let (kind, text) = if was_down {
            (
                Kind::Promoted,
                format!(
                    "node {} promoted to primary of {name} (epoch {} -> {}): node {} is down",
                    a.primary.0, old.epoch.0, a.epoch.0, old.primary.0
                ),
            )
        } else {
            (
                Kind::HandedOver,
                format!(
                    "{name} handed over from node {} to node {} (epoch {} -> {})",
                    old.primary.0, a.primary.0, old.epoch.0, a.epoch.0
                ),
            )
        };
        out.push(change(kind, Some(a.primary.0), function.clone(), text));
    }
    let held = |n: &NodeId| old.backups.contains(n) || old.primary == *n;
    for n in &a.catching_up {
        if !old.catching_up.contains(n) {
            out.push(change(
                Kind::BackupAdded,
                Some(n.0),
                function.clone(),
                format!("node {} added as a backup of {name}, catching up", n.0),
            ));
        }
    }
    for n in &a.backups {
        if old.catching_up.contains(n) {
            out.push(change(
                Kind::BackupCaughtUp,
                Some(n.0),
                function.clone(),
                format!("node {} caught up: a backup of {name}", n.0),
            ));
        } else if !held(n) {
            out.push(change(
                Kind::BackupAdded,
                Some(n.0),
                function.clone(),
                format!("node {} added as a backup of {name}", n.0),
            ));
        }
    }
    for n in old.backups.iter().chain(&old.catching_up) {
        if !a.holds(*n) {
            out.push(change(
                Kind::BackupDropped,
                Some(n.0),
                function.clone(),
                format!(
                    "node {} dropped as a backup of {name} (epoch {})",
                    n.0, a.epoch.0
                ),
            ));
        }
    }
}

fn change(kind: Kind, node: Option<u64>, function: Option<String>, text: String) -> Change {
    Change {
        kind,
        node,
        function,
        text,
    }
}

/// Count what changed from `old` to `new` in the node's metrics: health verdicts,
/// promotions, hand-overs, new epochs.
fn count(
    metrics: &crate::metrics::ClusterMetrics,
    old: &ClusterState,
    new: &ClusterState,
    changes: &[Change],
) {
    use crate::metrics::{FunctionLabels, NodeHealthLabels};
    for c in changes {
        let function = || FunctionLabels {
            function: c.function.clone().unwrap_or_default(),
        };
        let health = |health: &str| NodeHealthLabels {
            node: c.node.unwrap_or_default().to_string(),
            health: health.to_owned(),
        };
        let counter = match c.kind {
            Kind::NodeDown => metrics
                .node_health_changes
                .get_or_create(&health("down"))
                .clone(),
            Kind::NodeUp => metrics
                .node_health_changes
                .get_or_create(&health("up"))
                .clone(),
            Kind::Promoted => metrics.promotions.get_or_create(&function()).clone(),
            Kind::HandedOver => metrics.handovers.get_or_create(&function()).clone(),
            _ => continue,
        };
        counter.inc();
    }
    for (name, a) in &new.assignments {
        let before = old.assignments.get(name).map(|a| a.epoch);
        if before.is_some_and(|e| e != a.epoch) {
            metrics
                .epoch_changes
                .get_or_create(&FunctionLabels {
                    function: name.clone(),
                })
                .inc();
        }
    }
}

/// Record the changes of every cluster state this node applies, and every change of
/// master Raft reports, until the control plane stops (counting them in `node`'s
/// metrics too). Runs on the main runtime: it takes no lock the links need.
pub async fn run(
    timeline: Arc<Timeline>,
    node: crate::node::Node,
    mut state: tokio::sync::watch::Receiver<Arc<ClusterState>>,
    mut raft: tokio::sync::watch::Receiver<understudy_control::types::RaftMetrics>,
) {
    // What the node held when it started is not news; what changes after is.
    let mut seen = state.borrow_and_update().clone();
    let mut leader = {
        let m = raft.borrow_and_update();
        m.current_leader
    };
    loop {
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = state.borrow_and_update().clone();
                let changes = changes(&seen, &now);
                count(&node.metrics().cluster, &seen, &now, &changes);
                for c in changes {
                    timeline.record(c);
                }
                seen = now;
            }
            changed = raft.changed() => {
                if changed.is_err() {
                    return;
                }
                let (now, term) = {
                    let m = raft.borrow_and_update();
                    (m.current_leader, m.current_term)
                };
                if now != leader {
                    node.metrics().cluster.raft_leader_changes.inc();
                    if let Some(l) = now {
                        timeline.record(change(
                            Kind::MasterChanged,
                            Some(l.0),
                            None,
                            format!("node {} leads the Raft group (term {term})", l.0),
                        ));
                    }
                    leader = now;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_control::{Assignment, Epoch, Function, Node, Role};

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            s.nodes.insert(
                NodeId(id),
                Node::new(NodeId(id), format!("p{id}"), format!("h{id}"), Role::Voter),
            );
        }
        s.functions.insert(
            "bank".into(),
            Function {
                name: "bank".into(),
                digest: [0; 32],
                version: 1,
                replicas: 3,
                running: true,
                calls: Default::default(),
            },
        );
        s.assignments.insert(
            "bank".into(),
            Assignment::new(NodeId(2), vec![NodeId(1), NodeId(3)]),
        );
        s
    }

    fn kinds(changes: &[Change]) -> Vec<Kind> {
        changes.iter().map(|c| c.kind).collect()
    }

    #[test]
    fn a_failover_reads_as_down_then_promoted() {
        let old = state();
        let mut new = old.clone();
        new.nodes.get_mut(&NodeId(2)).expect("node 2").health = Health::Down;
        let a = new.assignments.get_mut("bank").expect("bank");
        a.primary = NodeId(3);
        a.backups = vec![NodeId(1)];
        a.epoch = Epoch(2);
        let c = changes(&old, &new);
        assert_eq!(kinds(&c), vec![Kind::NodeDown, Kind::Promoted]);
        assert_eq!(c[1].node, Some(3));
        assert!(c[1].text.contains("epoch 1 -> 2"), "{}", c[1].text);
    }

    #[test]
    fn a_primary_moving_off_a_live_node_is_a_hand_over() {
        let old = state();
        let mut new = old.clone();
        let a = new.assignments.get_mut("bank").expect("bank");
        a.primary = NodeId(1);
        a.backups = vec![NodeId(3), NodeId(2)];
        a.epoch = Epoch(2);
        assert_eq!(kinds(&changes(&old, &new)), vec![Kind::HandedOver]);
    }

    #[test]
    fn a_backup_is_added_catching_up_then_caught_up() {
        let mut old = state();
        old.assignments.get_mut("bank").expect("bank").backups = vec![NodeId(1)];
        let mut adding = old.clone();
        adding
            .assignments
            .get_mut("bank")
            .expect("bank")
            .catching_up = vec![NodeId(3)];
        assert_eq!(kinds(&changes(&old, &adding)), vec![Kind::BackupAdded]);
        let mut caught = adding.clone();
        let a = caught.assignments.get_mut("bank").expect("bank");
        a.catching_up.clear();
        a.backups.push(NodeId(3));
        assert_eq!(
            kinds(&changes(&adding, &caught)),
            vec![Kind::BackupCaughtUp]
        );
    }

    #[test]
    fn the_same_state_is_no_news() {
        assert!(changes(&state(), &state()).is_empty());
    }

    #[test]
    fn the_timeline_keeps_only_the_newest_events() {
        let t = Timeline::default();
        for i in 0..EVENTS_MAX + 10 {
            t.record(change(Kind::NodeUp, Some(i as u64), None, String::new()));
        }
        let all = t.since(0);
        assert_eq!(all.len(), EVENTS_MAX);
        assert_eq!(all[0].seq, 11);
        assert_eq!(t.since(all[EVENTS_MAX - 2].seq).len(), 1);
    }
}
