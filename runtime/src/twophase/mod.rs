//! Two-phase commit with presumed abort, as I/O-free state machines (like
//! `replication`): a transaction that wrote functions whose primaries are on different
//! nodes commits on all of them or on none.
//!
//! The primary of the function that began the transaction coordinates; its own writes
//! ride on its decision. Each participant (every other function the transaction wrote,
//! on this node or another) is asked to prepare: it writes PREPARE with its write set to its own replicated log and votes
//! yes only once that is durable (or no, if its part failed). When every vote is yes the
//! coordinator writes COMMIT to its replicated log, and only then tells anyone; a no vote
//! or silence past the prepare timeout aborts, which needs no log record (presumed
//! abort: a transaction the coordinator has no decision for is aborted). A participant
//! writes the outcome to its log, applies or discards the write set, releases the
//! transaction's locks and acknowledges; once every participant has acknowledged a
//! commit, the coordinator may forget it (an END record).
//!
//! Failover: a promoted coordinator recovers the COMMIT records without an END from its
//! log and delivers them again; a promoted participant recovers its PREPARE records
//! without an outcome and asks the coordinator's (current) primary, which answers from
//! its log, or with abort when it has no decision. A prepared participant keeps asking
//! until it learns the outcome: no transaction waits forever on a dead node, because the
//! coordinator's understudy holds the answer.
//!
//! A participant's part that was never prepared (the Prepare was lost, and then the
//! abort) holds its locks until the driver drops it: it may do so at any time after the
//! coordinator's prepare timeout, since without its yes vote nothing can commit.
//!
//! Nothing here reads a clock, a socket or a file: `step(now, event)` returns commands.
//! The seeded simulation in `sim` drives coordinators and participants over a lossy
//! network with crashes.
//!
//! **Invariant:** a participant commits only what the coordinator's log decided to
//! commit; every participant of a transaction reaches the same outcome.
//! **Invariant:** a coordinator decides commit only with a yes vote (a durable PREPARE)
//! from every participant, and tells no one before the decision is durable.

pub mod coordinator;
pub mod participant;
pub mod records;

#[cfg(test)]
mod sim;

use serde::{Deserialize, Serialize};

pub use coordinator::Coordinator;
pub use participant::Participant;

/// A distributed transaction is identified as any transaction is (the coordinator's
/// node is in the id's low bits).
pub use crate::ids::TxnId;

/// Messages between a coordinator and its participants. `F` names a party (a function).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message<F> {
    /// Coordinator to participant: prepare your part of `txn`.
    Prepare { txn: TxnId, coordinator: F },
    /// Participant to coordinator.
    Vote { txn: TxnId, from: F, yes: bool },
    /// Coordinator to participant: the outcome.
    Decision { txn: TxnId, commit: bool, from: F },
    /// Participant to coordinator: the outcome is durable here.
    Ack { txn: TxnId, from: F },
    /// Participant to coordinator: what became of `txn`?
    Query { txn: TxnId, from: F },
}
