//! Primary-backup replication of one function's log, as I/O-free state machines.
//!
//! A function's commits form their own sequence (`Seq`), separate from the node's log
//! positions. The primary ships each commit to every backup of the current epoch as
//! soon as it is appended (pipelining: it does not wait for the previous batch), and
//! releases a commit to its clients only when its own log and every live backup hold
//! it. A backup applies entries strictly in order and acknowledges what is durable.
//! Every message carries the epoch; a backup rejects a stale one, and a primary that
//! hears of a newer epoch is fenced and must stop serving.
//!
//! Nothing here reads a clock, a socket or a file: `step(now, event)` returns the
//! commands a driver carries out. That is what lets the same code run under a
//! simulated network with seeded faults (see the tests).
//!
//! **Invariant:** the primary never releases `seq` before its own log and every live
//! backup acknowledged `seq`.
//! **Invariant:** a backup never applies an entry out of order or from a stale epoch.

pub mod backup;
pub mod follow;
pub mod primary;
pub mod replica;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use backup::Backup;
pub use primary::Primary;

/// A position in one function's replicated log. 0 is "nothing".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A configuration's epoch and a node's identity are the control plane's own: one type
/// of each across the crates.
pub use understudy_control::{Epoch, NodeId};

/// Primary to backup: entries after `seq_prev`, in order (possibly none: a probe that
/// establishes the epoch). Every entry in it was appended by the primary of `epoch`;
/// `epoch_prev` is the epoch of the entry at `seq_prev`, so that the backup can check
/// that its log matches the primary's up to there (Raft's log-matching check).
///
/// `session` names the primary engine that sent it. A node that restarts may find itself
/// primary of the same epoch again (the master did not fail it over in time) with a
/// shorter log (what it had not written yet is gone), and append different entries at
/// positions its backups already hold: the epoch and the node alone would let a backup
/// take those for entries it has. A backup trusts overlapping entries only from the
/// session it matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Append<P> {
    pub epoch: Epoch,
    pub session: u64,
    pub seq_prev: Seq,
    pub epoch_prev: Epoch,
    pub entries: Vec<(Seq, P)>,
}

/// Backup to primary. `session` is the primary session the answer is about: a primary
/// ignores answers meant for another of its sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Everything up to `seq` is durable here.
    Ack {
        epoch: Epoch,
        session: u64,
        seq: Seq,
    },
    /// The message left a gap: this backup's log ends at `seq`, an entry of
    /// `epoch_last`; resume after it if that is the primary's entry too.
    Gap {
        epoch: Epoch,
        session: u64,
        seq: Seq,
        epoch_last: Epoch,
    },
    /// The message's epoch is stale: this backup knows `epoch`.
    Stale { epoch: Epoch },
    /// This backup holds entries the new primary does not: it needs a snapshot.
    Diverged {
        epoch: Epoch,
        session: u64,
        seq_applied: Seq,
    },
}

#[cfg(test)]
mod failover_sim;
#[cfg(test)]
mod sim;
