//! The log side of two-phase commit on one function: the records its steps write, the
//! rules for when a step writes nothing, and what a new primary copy recovers from the
//! state those records built. The node (`cluster::distributed`) and the simulation
//! (`sim`) both use these over the real store, so the simulation checks the records the
//! node writes and the recovery it makes, not a model of them.

use super::{coordinator, participant, TxnId};
use crate::ids::FunctionName;
use crate::store::Function;
use crate::wal::record::{End, Op, Prepare, Record, Resolved};

/// `function`'s part of `txn` with its write set, held apart from the state until its
/// outcome (`Record::Resolved`) applies or drops it.
pub fn prepare(
    function: &FunctionName,
    txn: TxnId,
    coordinator: FunctionName,
    ops: Vec<Op>,
    epoch: u64,
) -> Record {
    Record::Prepare(Prepare {
        function: function.clone(),
        txn,
        coordinator,
        ops,
        epoch,
    })
}

/// The outcome of `txn`'s part on `f`, or `None` when there is nothing to write: the
/// part never prepared here (its Prepare was lost, or it voted no) or was resolved
/// already (a repeated decision). Either way the outcome counts as logged.
pub fn outcome(f: &Function, txn: TxnId, commit: bool, epoch: u64) -> Option<Record> {
    f.is_prepared(txn).then(|| {
        Record::Resolved(Resolved {
            function: f.name.clone(),
            txn,
            commit,
            epoch,
        })
    })
}

/// END for the decision on `txn` that `f` coordinated, or `None` when `f`'s state holds
/// no undelivered decision for it (already ended).
pub fn end(f: &Function, txn: TxnId, epoch: u64) -> Option<Record> {
    f.decided().iter().any(|(t, _)| *t == txn).then(|| {
        Record::End(End {
            function: f.name.clone(),
            txn,
            epoch,
        })
    })
}

/// What a new primary copy of `f` starts its participant and coordinator from: the
/// parts prepared and not resolved (it asks their coordinators), and the decisions not
/// yet ended (it delivers them again). Outcomes already written are not recovered: a
/// decision that arrives again for one finds nothing prepared and is acknowledged.
pub fn recovered(
    f: &Function,
) -> (
    participant::Event<FunctionName>,
    coordinator::Event<FunctionName>,
) {
    (
        participant::Event::Recovered {
            prepared: f.prepared(),
            decided: Vec::new(),
        },
        coordinator::Event::Recovered {
            committed: f.decided(),
        },
    )
}
