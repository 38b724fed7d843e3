//! The records of the write-ahead log: what a node remembers across a crash.
//!
//! Records are serde types encoded with rmp-serde as maps with named fields, so that
//! a field added later (with `#[serde(default)]`) leaves old logs decodable. The
//! framing around them (length, checksum, position) lives in `wal::segment`.

use serde::{Deserialize, Serialize};

use crate::ids::{Digest, FunctionName, TxnId};

/// One entry of the log. Every change to a node's durable state is one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A function was deployed or upgraded to a new component.
    Deploy(Deploy),
    /// A function was deleted, with all of its state.
    Delete { function: FunctionName },
    /// A function was stopped (`running = false`) or started again.
    SetRunning {
        function: FunctionName,
        running: bool,
    },
    /// A transaction committed.
    Commit(Commit),
    /// A backup's copy of a function was replaced by its primary's snapshot (catch-up).
    Restore(Box<crate::wal::snapshot::FunctionImage>),
    /// A function's part of a distributed transaction, made durable before its yes vote
    /// (two-phase commit): held apart from the state until its outcome.
    Prepare(Prepare),
    /// The outcome of a prepared part: its writes applied (commit) or dropped.
    Resolved(Resolved),
    /// A coordinator's committed distributed transaction that every participant now
    /// holds: it can be forgotten.
    End(End),
}

/// See `Record::Prepare`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub function: FunctionName,
    pub txn: TxnId,
    /// The function whose primary coordinates the transaction (asked about the outcome).
    pub coordinator: FunctionName,
    pub ops: Vec<Op>,
    pub epoch: u64,
}

/// See `Record::Resolved`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub function: FunctionName,
    pub txn: TxnId,
    pub commit: bool,
    pub epoch: u64,
}

/// See `Record::End`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub function: FunctionName,
    pub txn: TxnId,
    pub epoch: u64,
}

/// A coordinator's decision to commit a distributed transaction, logged with its own
/// writes: `participants` (functions on other primaries) prepared and are told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub coordinator: FunctionName,
    pub participants: Vec<FunctionName>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deploy {
    pub function: FunctionName,
    pub digest: Digest,
    pub version: u64,
    pub at_ms: u64,
    /// The functions it may call (none in records written before grants were kept).
    #[serde(default)]
    pub calls: understudy_control::CallGrants,
}

/// A committed transaction: its writes to every function it touched, and the answer
/// remembered for its idempotency key, if it had one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub txn: TxnId,
    pub writes: Vec<Writes>,
    #[serde(default)]
    pub idempotency: Option<Idempotency>,
    /// In a cluster: the epoch of each replicated function's configuration that the
    /// commit belongs to (so that a restarted replica knows the epoch of its last entry,
    /// which replication's log matching checks). Absent on a single node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<FunctionEpoch>,
    /// Present when this commit is a coordinator's decision (two-phase commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

/// The epoch under which a commit entered one function's replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionEpoch {
    pub function: FunctionName,
    pub epoch: u64,
}

/// The writes of one transaction to one function's state, in key order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writes {
    pub function: FunctionName,
    pub ops: Vec<Op>,
}

/// Set `key` to `value`, or delete it when `value` is `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

/// The answer given to a request with an idempotency key, kept so that a repeat of
/// the request gets the same answer without running the handler again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    pub function: FunctionName,
    pub key: String,
    pub outcome: Outcome,
    pub at_ms: u64,
    /// What was asked with the key (`request_digest` of the function, method and body):
    /// a request that reuses the key for something else is refused, not answered with
    /// this. Absent in records written before it was kept.
    #[serde(default)]
    pub request: Option<crate::ids::Digest>,
}

/// What a handler answered: its output, or its own error (the transaction aborted,
/// but the answer is still the answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ok(#[serde(with = "serde_bytes")] Vec<u8>),
    Err { code: String, message: String },
}
