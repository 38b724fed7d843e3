//! What a copy does when it learns its function's assignment and the assignment names it
//! primary: the decisions of a role change, without I/O. The copy's machine
//! (`replication::replica`, which the node and the failover simulation both drive) calls
//! [`as_primary`] and carries out what it returns.
//!
//! The rules:
//!
//! - A copy that handed its place over in this epoch (it stepped down for a promotion)
//!   does nothing: the master is promoting another copy.
//! - A node that restarted and finds itself primary of the epoch it was primary of before
//!   asks the master for a new epoch first (`Command::Renew`) and serves only in that
//!   one. What it had not written when it died is gone from its log, but its backups may
//!   hold it: a new session in the same epoch would append other entries at those
//!   positions, and a backup checking its log by epoch would take them for the ones it
//!   has. In a new epoch every backup checks its log against what the primary has now.
//! - A primary engine of a later epoch than the assignment means this node's view of the
//!   cluster is behind its own copy: wait for the view.
//! - Same epoch, still serving: the backups stay counted; catching-up nodes that the
//!   engine does not ship to yet get a catch-up, those it counts as live are reported
//!   caught up (the master moves them into the backups, in the same epoch), and peers
//!   that left the assignment are dropped.
//! - Otherwise a new primary copy starts for the assignment's epoch. Backups of the old
//!   engine that left stop counting at once, before the function's lock is taken, so that
//!   what waited only for them (a dead node's) is released now: a transaction holding the
//!   lock may be waiting for exactly that. Under the lock, the old engine gets up to
//!   [`DRAIN_WAIT`] to release what it sent (so the new epoch starts in sync), then the
//!   new engine starts over the assignment's backups and catches up the catching-up
//!   nodes.

use std::time::Duration;

use super::primary::{PeerState, Primary};
use super::{Epoch, NodeId};

/// How long a primary that keeps its place across a new epoch lets its old engine release
/// what it had sent before it starts the new one anyway (the old one's waiters are then
/// told to retry).
pub const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// A function's assignment as a copy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Assigned<'a> {
    pub epoch: Epoch,
    pub backups: &'a [NodeId],
    pub catching_up: &'a [NodeId],
}

/// The primary copy this node holds for the function, if any.
#[derive(Debug)]
pub struct Held<'a, P> {
    pub engine: &'a Primary<P>,
    /// Still serving (not fenced, not retired).
    pub serving: bool,
}

impl<P> Clone for Held<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Held<'_, P> {}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Follow {
    /// Nothing for now.
    Wait,
    /// Ask the master to renew this node as primary in a new epoch (after `epoch`).
    Renew { epoch: Epoch },
    /// Keep the engine; adjust its peers.
    Adjust {
        /// Start catching these up (the engine does not ship to them yet).
        catch_up: Vec<NodeId>,
        /// Report these caught up to the master (the engine counts them).
        caught_up: Vec<NodeId>,
        /// Stop shipping to these (they left the assignment).
        remove: Vec<NodeId>,
    },
    /// Start a new primary engine for `epoch` over `backups`.
    Start {
        epoch: Epoch,
        /// Drop these from the old engine now, before taking the lock.
        remove_now: Vec<NodeId>,
        /// There is an old engine: under the lock, let it release what it sent (at most
        /// [`DRAIN_WAIT`]) before starting.
        drain_old: bool,
        backups: Vec<NodeId>,
        /// Then catch these up.
        catching_up: Vec<NodeId>,
    },
}

/// What a copy named primary of `assigned` does, given the primary engine it holds (if
/// any), whether it stepped down in this epoch, and whether this process found itself
/// primary of this very epoch when it started (`restarted`).
pub fn as_primary<P: Clone>(
    held: Option<Held<'_, P>>,
    stepped_down: bool,
    restarted: bool,
    assigned: Assigned<'_>,
) -> Follow {
    if stepped_down {
        return Follow::Wait;
    }
    if held.is_none() && restarted {
        return Follow::Renew {
            epoch: assigned.epoch,
        };
    }
    if let Some(held) = held {
        let engine = held.engine;
        if engine.epoch() > assigned.epoch {
            return Follow::Wait;
        }
        if engine.epoch() == assigned.epoch && held.serving {
            let peers = engine.peers();
            let mut catch_up = Vec::new();
            let mut caught_up = Vec::new();
            for n in assigned.catching_up {
                if !peers.contains(n) {
                    catch_up.push(*n);
                } else if engine.peer_state(*n) == Some(PeerState::Live) {
                    caught_up.push(*n);
                }
            }
            let remove = peers
                .into_iter()
                .filter(|n| !assigned.backups.contains(n) && !assigned.catching_up.contains(n))
                .collect();
            return Follow::Adjust {
                catch_up,
                caught_up,
                remove,
            };
        }
    }
    Follow::Start {
        epoch: assigned.epoch,
        remove_now: held.map_or_else(Vec::new, |held| {
            held.engine
                .peers()
                .into_iter()
                .filter(|n| !assigned.backups.contains(n))
                .collect()
        }),
        drain_old: held.is_some(),
        backups: assigned.backups.to_vec(),
        catching_up: assigned.catching_up.to_vec(),
    }
}

/// Whether an old engine still has something to release (and is serving, so it may).
pub fn draining<P: Clone>(held: Held<'_, P>) -> bool {
    held.serving && held.engine.seq_released() < held.engine.seq_last()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::replication::Seq;

    fn engine(epoch: u64, backups: &[NodeId]) -> Primary<u64> {
        Primary::new(Instant::now(), Epoch(epoch), 1, Seq(0), Epoch(0), backups).0
    }

    const N2: NodeId = NodeId(2);
    const N3: NodeId = NodeId(3);

    #[test]
    fn a_copy_that_stepped_down_or_is_ahead_waits() {
        let e = engine(5, &[N2]);
        let held = Held {
            engine: &e,
            serving: true,
        };
        let assigned = Assigned {
            epoch: Epoch(4),
            backups: &[N2],
            catching_up: &[],
        };
        assert_eq!(as_primary(Some(held), false, false, assigned), Follow::Wait);
        let same = Assigned {
            epoch: Epoch(5),
            ..assigned
        };
        assert_eq!(as_primary(Some(held), true, false, same), Follow::Wait);
    }

    #[test]
    fn the_same_epoch_adjusts_peers_and_reports_caught_up_ones() {
        // The engine ships to N2 and N3 and counts both; the assignment has dropped N2,
        // still lists N3 as catching up, and adds N4.
        let e = engine(5, &[N2, N3]);
        let held = Held {
            engine: &e,
            serving: true,
        };
        let follow = as_primary(
            Some(held),
            false,
            false,
            Assigned {
                epoch: Epoch(5),
                backups: &[],
                catching_up: &[N3, NodeId(4)],
            },
        );
        assert_eq!(
            follow,
            Follow::Adjust {
                catch_up: vec![NodeId(4)],
                caught_up: vec![N3],
                remove: vec![N2],
            }
        );
        // A fenced engine of the same epoch is replaced, not adjusted.
        let fenced = Held {
            engine: &e,
            serving: false,
        };
        assert!(matches!(
            as_primary(
                Some(fenced),
                false,
                false,
                Assigned {
                    epoch: Epoch(5),
                    backups: &[N2, N3],
                    catching_up: &[],
                }
            ),
            Follow::Start { .. }
        ));
    }

    #[test]
    fn a_new_epoch_starts_a_new_engine_after_dropping_backups_that_left() {
        let e = engine(5, &[N2, N3]);
        let held = Held {
            engine: &e,
            serving: true,
        };
        let follow = as_primary(
            Some(held),
            false,
            false,
            Assigned {
                epoch: Epoch(6),
                backups: &[N3],
                catching_up: &[N2],
            },
        );
        assert_eq!(
            follow,
            Follow::Start {
                epoch: Epoch(6),
                remove_now: vec![N2],
                drain_old: true,
                backups: vec![N3],
                catching_up: vec![N2],
            }
        );
        let fresh = as_primary::<u64>(
            None,
            false,
            false,
            Assigned {
                epoch: Epoch(1),
                backups: &[N2],
                catching_up: &[],
            },
        );
        assert!(matches!(
            fresh,
            Follow::Start {
                drain_old: false,
                ..
            }
        ));
    }

    #[test]
    fn a_restarted_primary_asks_for_a_new_epoch_before_it_serves() {
        let assigned = Assigned {
            epoch: Epoch(7),
            backups: &[N2],
            catching_up: &[],
        };
        assert_eq!(
            as_primary::<u64>(None, false, true, assigned),
            Follow::Renew { epoch: Epoch(7) }
        );
        // Its engine of this process keeps serving as before.
        let e = engine(7, &[N2]);
        let held = Held {
            engine: &e,
            serving: true,
        };
        assert!(matches!(
            as_primary(Some(held), false, true, assigned),
            Follow::Adjust { .. }
        ));
    }
}
