//! The participant's side: make its part durable before voting yes, hold the
//! transaction's locks while prepared, make the outcome durable, apply it, acknowledge;
//! ask the coordinator when the outcome is slow to come.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Message, TxnId};

/// Outcomes are remembered this long, for repeated messages (a transaction's messages
/// stop long before: its coordinator's prepare timeout is half a second); then forgotten,
/// so that memory stays bounded. A late repeat is still answered safely: a commit for an
/// unknown transaction is acknowledged, anything else finds no part.
pub const DONE_KEEP: Duration = Duration::from_secs(10);

/// A prepared participant that has heard nothing for this long asks the coordinator.
pub const QUERY_AFTER: Duration = Duration::from_millis(20);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<F> {
    /// The coordinator asks to prepare `txn`; `ok` says whether this participant holds
    /// its part of it (the write set, made by the transaction's calls, still in memory
    /// and its locks held). Without it, the vote is no.
    Prepare {
        txn: TxnId,
        coordinator: F,
        ok: bool,
    },
    /// A decision from the coordinator.
    Received(Message<F>),
    /// The PREPARE record of `txn` is durable in this participant's replicated log.
    PrepareLogged {
        txn: TxnId,
    },
    /// The outcome record of `txn` is durable.
    OutcomeLogged {
        txn: TxnId,
    },
    Tick,
    /// This participant was promoted (or restarted): the PREPARE records its log holds
    /// without an outcome, and the outcomes it holds.
    Recovered {
        prepared: Vec<(TxnId, F)>,
        decided: Vec<(TxnId, bool, F)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<F> {
    Send {
        to: F,
        message: Message<F>,
    },
    /// Write PREPARE (with the write set) to the replicated log; report `PrepareLogged`.
    LogPrepare {
        txn: TxnId,
    },
    /// Write the outcome to the replicated log; report `OutcomeLogged`.
    LogOutcome {
        txn: TxnId,
        commit: bool,
    },
    /// The outcome is durable: apply the write set (or discard it) and release the
    /// transaction's locks.
    Finish {
        txn: TxnId,
        commit: bool,
    },
    /// This participant's part is gone (voted no): discard it and release its locks.
    Discard {
        txn: TxnId,
    },
}

#[derive(Debug)]
enum Phase {
    /// PREPARE is being written.
    Preparing,
    /// PREPARE is durable and the vote sent; waiting for the decision.
    Prepared { asked_at: Instant },
    /// The outcome is being written.
    Finishing(bool),
}

#[derive(Debug)]
struct Txn<F> {
    coordinator: F,
    phase: Phase,
}

/// The distributed transactions one participant (a function's primary) takes part in.
#[derive(Debug)]
pub struct Participant<F> {
    me: F,
    txns: BTreeMap<TxnId, Txn<F>>,
    /// Outcomes reached, with the coordinator (kept so that repeated messages get the
    /// same answer).
    done: BTreeMap<TxnId, (bool, F)>,
    /// When each outcome in `done` was reached, oldest first (to forget them after
    /// `DONE_KEEP`).
    done_at: std::collections::VecDeque<(Instant, TxnId)>,
}

impl<F: Clone + Ord + std::fmt::Debug> Participant<F> {
    pub fn new(me: F) -> Participant<F> {
        Participant {
            me,
            txns: BTreeMap::new(),
            done: BTreeMap::new(),
            done_at: std::collections::VecDeque::new(),
        }
    }

    /// Transactions prepared (or preparing) and not yet finished: their locks are held.
    pub fn unresolved(&self) -> impl Iterator<Item = TxnId> + '_ {
        self.txns.keys().copied()
    }

    pub fn outcome(&self, txn: TxnId) -> Option<bool> {
        self.done.get(&txn).map(|d| d.0)
    }

    pub fn step(&mut self, now: Instant, event: Event<F>) -> Vec<Command<F>> {
        let mut out = Vec::new();
        match event {
            Event::Prepare {
                txn,
                coordinator,
                ok,
            } => {
                if let Some((commit, _)) = self.done.get(&txn) {
                    out.push(self.vote(txn, &coordinator, *commit));
                    return out;
                }
                match self.txns.get(&txn).map(|t| &t.phase) {
                    Some(Phase::Prepared { .. }) => out.push(self.vote(txn, &coordinator, true)),
                    Some(Phase::Preparing | Phase::Finishing(_)) => {}
                    None if ok => {
                        self.txns.insert(
                            txn,
                            Txn {
                                coordinator,
                                phase: Phase::Preparing,
                            },
                        );
                        out.push(Command::LogPrepare { txn });
                    }
                    None => {
                        // Its part is gone (a failover lost it, or it failed): no. The
                        // transaction will abort; nothing to write.
                        self.remember(now, txn, false, coordinator.clone());
                        out.push(Command::Discard { txn });
                        out.push(self.vote(txn, &coordinator, false));
                    }
                }
            }
            Event::PrepareLogged { txn } => {
                if let Some(t) = self.txns.get_mut(&txn) {
                    if matches!(t.phase, Phase::Preparing) {
                        t.phase = Phase::Prepared { asked_at: now };
                        let to = t.coordinator.clone();
                        out.push(self.vote(txn, &to, true));
                    }
                }
            }
            Event::Received(Message::Decision { txn, commit, from }) => {
                if let Some((done, coordinator)) = self.done.get(&txn) {
                    // Decided here already: the coordinator missed the ack. (A decision
                    // that differs can only be a stale answer to an old query: a
                    // transaction forgotten after every participant acknowledged its
                    // commit reads as aborted.)
                    if *done == commit {
                        out.push(self.ack(txn, coordinator));
                    }
                    return out;
                }
                let Some(t) = self.txns.get_mut(&txn) else {
                    if commit {
                        // A commit needed this participant's yes, so its part was prepared
                        // here, and is no longer: its outcome was logged before a restart
                        // or a promotion forgot that. Confirm, so the coordinator can stop.
                        out.push(self.ack(txn, &from));
                    } else {
                        // Never prepared here (the Prepare was lost, or the part only
                        // read): drop the part, if it is still here.
                        out.push(Command::Discard { txn });
                    }
                    return out;
                };
                match t.phase {
                    Phase::Preparing | Phase::Prepared { .. } => {
                        t.phase = Phase::Finishing(commit);
                        out.push(Command::LogOutcome { txn, commit });
                    }
                    Phase::Finishing(_) => {}
                }
            }
            Event::OutcomeLogged { txn } => {
                if let Some(t) = self.txns.remove(&txn) {
                    if let Phase::Finishing(commit) = t.phase {
                        self.remember(now, txn, commit, t.coordinator.clone());
                        out.push(Command::Finish { txn, commit });
                        out.push(self.ack(txn, &t.coordinator));
                    }
                }
            }
            Event::Received(
                Message::Prepare { .. }
                | Message::Vote { .. }
                | Message::Ack { .. }
                | Message::Query { .. },
            ) => {}
            Event::Tick => {
                while let Some((at, txn)) = self.done_at.front().copied() {
                    if now.duration_since(at) < DONE_KEEP {
                        break;
                    }
                    self.done_at.pop_front();
                    self.done.remove(&txn);
                }
                for (txn, t) in &mut self.txns {
                    if let Phase::Prepared { asked_at } = &mut t.phase {
                        if now.duration_since(*asked_at) >= QUERY_AFTER {
                            *asked_at = now;
                            out.push(Command::Send {
                                to: t.coordinator.clone(),
                                message: Message::Query {
                                    txn: *txn,
                                    from: self.me.clone(),
                                },
                            });
                        }
                    }
                }
            }
            Event::Recovered { prepared, decided } => {
                for (txn, commit, c) in decided {
                    self.remember(now, txn, commit, c);
                }
                for (txn, coordinator) in prepared {
                    if self.done.contains_key(&txn) || self.txns.contains_key(&txn) {
                        continue;
                    }
                    // Ask at once: the answer may have been lost with the old primary.
                    let asked_at = now.checked_sub(QUERY_AFTER).unwrap_or(now);
                    self.txns.insert(
                        txn,
                        Txn {
                            coordinator,
                            phase: Phase::Prepared { asked_at },
                        },
                    );
                }
            }
        }
        out
    }

    fn remember(&mut self, now: Instant, txn: TxnId, commit: bool, coordinator: F) {
        if self.done.insert(txn, (commit, coordinator)).is_none() {
            self.done_at.push_back((now, txn));
        }
    }

    fn vote(&self, txn: TxnId, to: &F, yes: bool) -> Command<F> {
        Command::Send {
            to: to.clone(),
            message: Message::Vote {
                txn,
                from: self.me.clone(),
                yes,
            },
        }
    }

    fn ack(&self, txn: TxnId, to: &F) -> Command<F> {
        Command::Send {
            to: to.clone(),
            message: Message::Ack {
                txn,
                from: self.me.clone(),
            },
        }
    }
}
