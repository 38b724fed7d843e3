//! What nodes say to each other on the data-plane channels (the control plane's Raft
//! messages have their own types in `understudy-control`). rmp-serde with named fields,
//! so that a field added later with a default keeps older peers readable.
//!
//! Everything here arrives from the network: decoding fails with an error, never a
//! panic, and the receiver checks every value it acts on.

use serde::{Deserialize, Serialize};

use crate::ids::{Digest, FunctionName, TxnId};
use crate::node::{FunctionInfo, InvokeError};
use crate::replication::{Append, Reply};
use crate::wal::record::{Idempotency, Op};
use crate::wal::snapshot::FunctionImage;

/// One entry in one function's replicated log: a commit (that function's writes and
/// the answer remembered for the transaction's idempotency key, if it was this
/// function's), or a step of two-phase commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub txn: TxnId,
    pub ops: Vec<Op>,
    pub idempotency: Option<Idempotency>,
    /// Absent (from an older peer) means a plain commit.
    #[serde(default, skip_serializing_if = "Kind::is_plain")]
    pub kind: Kind,
}

/// What an [`Entry`] records (see `wal::Record`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A commit.
    #[default]
    Commit,
    /// A commit that is also the coordinator's decision to commit a distributed
    /// transaction whose other participants are these functions.
    Decision { participants: Vec<FunctionName> },
    /// This function's part of a distributed transaction (`ops`), prepared.
    Prepare { coordinator: FunctionName },
    /// The outcome of a prepared part.
    Resolved { commit: bool },
    /// The coordinator's committed transaction is confirmed everywhere.
    End,
}

impl Kind {
    pub fn is_plain(&self) -> bool {
        *self == Kind::Commit
    }
}

/// `Channel::Replication`, primary to backup: appends for any number of functions, in
/// the order the primary produced them. The answer is a [`ReplicateReply`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Replicate {
    pub appends: Vec<(FunctionName, Append<Entry>)>,
}

/// The backup's replies to each append of a [`Replicate`], in the same order (possibly
/// none for one: the primary resends after silence).
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicateReply {
    pub replies: Vec<Vec<Reply>>,
}

/// `Channel::Bulk` requests.
#[derive(Debug, Serialize, Deserialize)]
pub enum Bulk {
    /// The component with this digest, if the node has it.
    Artifact { digest: Digest },
    /// From the primary of `epoch`: replace your copy of `function` with this snapshot,
    /// then follow the log after `image.seq`.
    Install {
        function: FunctionName,
        epoch: u64,
        /// The primary session whose log the image is of (see `replication::Append`).
        session: u64,
        image: Box<FunctionImage>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum BulkReply {
    Artifact {
        #[serde(with = "serde_bytes")]
        bytes: Option<Vec<u8>>,
    },
    /// The snapshot is installed and durable: the copy holds everything up to `seq`.
    Installed {
        seq: u64,
    },
    /// Refused: this copy knows a newer epoch.
    Stale {
        epoch: u64,
    },
    Error(String),
}

/// `Channel::Invoke` requests.
#[derive(Debug, Serialize, Deserialize)]
pub enum Invoke {
    /// Run a transaction here, as the function's primary.
    Call {
        function: String,
        method: String,
        #[serde(with = "serde_bytes")]
        input: Vec<u8>,
        idempotency_key: Option<String>,
        /// The invocation's W3C `traceparent` (absent from an older peer).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<String>,
    },
    /// This node's copy of a function, if it has one.
    Describe { function: String },
    /// From the master, before it promotes another copy (a drain): stop serving
    /// `function` as its primary in `epoch`.
    StepDown { function: String, epoch: u64 },
    /// Run a call inside a distributed transaction here, as the callee's primary.
    Part(PartCall),
    /// A two-phase-commit message for the primary of `to`.
    TwoPhase {
        to: FunctionName,
        message: crate::twophase::Message<FunctionName>,
        /// The `traceparent` of the transaction's trace, when the message was sent on
        /// its behalf (absent from an older peer, and for a resend by a timer).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<String>,
    },
}

/// A call from a transaction running elsewhere: `method` of `function`, run here as a
/// part of transaction `txn` (which began on `coordinator`'s primary).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartCall {
    pub txn: TxnId,
    /// The id of the transaction's first attempt (wait-die).
    pub age: TxnId,
    pub coordinator: FunctionName,
    /// How deep the call is nested.
    pub depth: u32,
    /// What is left of the transaction's deadline.
    pub deadline_ms: u64,
    pub function: String,
    pub method: String,
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
    /// Every function the transaction touched so far, and whether it wrote to it.
    pub touched: Vec<(FunctionName, bool)>,
    /// The transaction's W3C `traceparent` (absent from an older peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum InvokeReply {
    /// The handler's answer (its output, or its own error).
    Answer {
        outcome: Result<ByteBuf, (String, String)>,
        txn: TxnId,
        replayed: bool,
        /// The node that answered as primary, and its epoch.
        #[serde(default)]
        served_by: Option<(u64, u64)>,
    },
    /// The invocation failed outside the handler, as it would have on the asking node.
    Failed(InvokeError),
    Described(Option<FunctionInfo>),
    SteppedDown,
    /// The answer of a `Part` call (the callee's output, or its own error), and every
    /// function the transaction has touched now, with whether it wrote to it.
    PartAnswer {
        outcome: Result<ByteBuf, (String, String)>,
        touched: Vec<(FunctionName, bool)>,
    },
    /// A `TwoPhase` message was taken by the primary of its function.
    Taken,
}

/// Bytes, encoded as a msgpack binary rather than an array of numbers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteBuf(#[serde(with = "serde_bytes")] pub Vec<u8>);

#[derive(Debug, thiserror::Error)]
#[error("undecodable message: {0}")]
pub struct DecodeError(pub String);

pub fn encode<T: Serialize>(message: &T) -> bytes::Bytes {
    // Our own types always encode; a failure here is a bug worth stopping for.
    bytes::Bytes::from(rmp_serde::to_vec_named(message).expect("data-plane messages encode"))
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(bytes).map_err(|e| DecodeError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::{Epoch, Seq};

    #[test]
    fn a_replicate_message_round_trips_and_garbage_is_an_error() {
        let message = Replicate {
            appends: vec![(
                FunctionName::new("bank").expect("name"),
                Append {
                    epoch: Epoch(2),
                    session: 7,
                    seq_prev: Seq(4),
                    epoch_prev: Epoch(1),
                    entries: vec![(
                        Seq(5),
                        Entry {
                            txn: TxnId(9),
                            ops: vec![Op {
                                key: b"k".to_vec(),
                                value: Some(b"v".to_vec()),
                            }],
                            idempotency: None,
                            kind: Kind::Commit,
                        },
                    )],
                },
            )],
        };
        let decoded: Replicate = decode(&encode(&message)).expect("decodes");
        assert_eq!(decoded.appends, message.appends);
        assert!(decode::<Replicate>(b"\xc1garbage").is_err());
    }

    #[test]
    fn an_invocations_trace_crosses_the_wire_and_an_older_peers_call_still_decodes() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let call = Invoke::Call {
            function: "bank".into(),
            method: "open".into(),
            input: b"null".to_vec(),
            idempotency_key: None,
            trace: Some(traceparent.into()),
        };
        match decode::<Invoke>(&encode(&call)).expect("decodes") {
            Invoke::Call { trace, .. } => assert_eq!(trace.as_deref(), Some(traceparent)),
            other => panic!("{other:?}"),
        }
        // What a peer without traces sends: the same message with no `trace` field.
        #[derive(Serialize)]
        enum OldInvoke {
            Call {
                function: String,
                method: String,
                #[serde(with = "serde_bytes")]
                input: Vec<u8>,
                idempotency_key: Option<String>,
            },
        }
        let old = OldInvoke::Call {
            function: "bank".into(),
            method: "open".into(),
            input: b"null".to_vec(),
            idempotency_key: Some("k".into()),
        };
        match decode::<Invoke>(&encode(&old)).expect("decodes") {
            Invoke::Call {
                trace,
                idempotency_key,
                ..
            } => {
                assert_eq!(trace, None);
                assert_eq!(idempotency_key.as_deref(), Some("k"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_invocation_error_crosses_the_wire_as_itself() {
        let bank = FunctionName::new("bank").expect("name");
        let errors = [
            InvokeError::UnknownFunction("nope".into()),
            InvokeError::Stopped(bank.clone()),
            InvokeError::BadIdempotencyKey("too long".into()),
            InvokeError::Trap("unreachable".into()),
            InvokeError::Deadline("1000 ms".into()),
            InvokeError::ResourceCap("memory".into()),
            InvokeError::StateFull("keys".into()),
            InvokeError::Conflict(3),
            InvokeError::CalleeFailedAcrossNodes("callee".into()),
            InvokeError::Busy("queue full".into()),
            InvokeError::Overloaded("waited 1000 ms".into()),
            InvokeError::OutputTooLarge(17 << 20),
            InvokeError::Storage("disk".into()),
            InvokeError::NotPrimary(bank),
            InvokeError::Unavailable("no primary".into()),
        ];
        for error in errors {
            let sent = InvokeReply::Failed(error.clone());
            match decode::<InvokeReply>(&encode(&sent)).expect("decodes") {
                InvokeReply::Failed(received) => {
                    assert_eq!(received, error);
                    assert_eq!(received.code(), error.code());
                    assert_eq!(received.to_string(), error.to_string());
                }
                other => panic!("{error:?} came back as {other:?}"),
            }
        }
    }
}
