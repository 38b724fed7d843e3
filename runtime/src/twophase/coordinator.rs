//! The coordinator's side: ask every participant to prepare, decide, make a commit
//! durable before telling anyone, deliver the decision until every participant has it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{Message, TxnId};

/// Silence from a participant past this aborts the transaction.
pub const PREPARE_TIMEOUT: Duration = Duration::from_millis(500);
/// Unanswered messages are sent again after this long.
pub const RESEND_AFTER: Duration = Duration::from_millis(20);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<F> {
    /// A transaction that wrote `participants` asks to commit.
    Begin { txn: TxnId, participants: Vec<F> },
    /// A vote, an acknowledgement or a query from a participant.
    Received(Message<F>),
    /// The COMMIT record of `txn` is durable in this coordinator's replicated log.
    Logged { txn: TxnId },
    /// The COMMIT record of `txn` could not be written (nothing of it was: the driver
    /// found, before writing, that this copy no longer serves): abort.
    NotLogged { txn: TxnId },
    /// Time passed.
    Tick,
    /// This coordinator was promoted: the COMMIT records its log holds without an END.
    Recovered { committed: Vec<(TxnId, Vec<F>)> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<F> {
    Send {
        to: F,
        message: Message<F>,
    },
    /// Write COMMIT (with the participants) to the replicated log; report `Logged`.
    LogCommit {
        txn: TxnId,
        participants: Vec<F>,
    },
    /// The outcome is final (a commit is durable): answer the client.
    Decided {
        txn: TxnId,
        commit: bool,
    },
    /// Every participant holds the commit: write END (the transaction can be forgotten).
    LogEnd {
        txn: TxnId,
    },
}

#[derive(Debug)]
enum Phase<F> {
    /// Waiting for votes; these said yes.
    Collecting(BTreeSet<F>),
    /// Every vote was yes; COMMIT is being written.
    Logging,
    /// COMMIT is durable; these acknowledged it.
    Delivering(BTreeSet<F>),
}

#[derive(Debug)]
struct Txn<F> {
    participants: Vec<F>,
    phase: Phase<F>,
    began: Instant,
    sent_at: Instant,
}

/// The transactions one coordinator (a function's primary) has in flight.
#[derive(Debug)]
pub struct Coordinator<F> {
    me: F,
    txns: BTreeMap<TxnId, Txn<F>>,
}

impl<F: Clone + Ord + std::fmt::Debug> Coordinator<F> {
    pub fn new(me: F) -> Coordinator<F> {
        Coordinator {
            me,
            txns: BTreeMap::new(),
        }
    }

    /// Transactions not yet forgotten.
    pub fn in_flight(&self) -> usize {
        self.txns.len()
    }

    pub fn step(&mut self, now: Instant, event: Event<F>) -> Vec<Command<F>> {
        let mut out = Vec::new();
        match event {
            Event::Begin { txn, participants } => {
                if self.txns.contains_key(&txn) {
                    return out;
                }
                for p in &participants {
                    out.push(self.prepare(txn, p));
                }
                self.txns.insert(
                    txn,
                    Txn {
                        participants,
                        phase: Phase::Collecting(BTreeSet::new()),
                        began: now,
                        sent_at: now,
                    },
                );
            }
            Event::Received(Message::Vote { txn, from, yes }) => {
                let Some(t) = self.txns.get_mut(&txn) else {
                    // Forgotten: decided long ago. A participant still prepared asks.
                    return out;
                };
                if !t.participants.contains(&from) {
                    return out;
                }
                if let Phase::Collecting(said_yes) = &mut t.phase {
                    if !yes {
                        self.abort(txn, &mut out);
                        return out;
                    }
                    said_yes.insert(from);
                    if said_yes.len() == t.participants.len() {
                        t.phase = Phase::Logging;
                        out.push(Command::LogCommit {
                            txn,
                            participants: t.participants.clone(),
                        });
                    }
                }
            }
            Event::Logged { txn } => {
                if let Some(t) = self.txns.get_mut(&txn) {
                    if matches!(t.phase, Phase::Logging) {
                        t.phase = Phase::Delivering(BTreeSet::new());
                        t.sent_at = now;
                        out.push(Command::Decided { txn, commit: true });
                        for p in &t.participants {
                            out.push(decision(&self.me, txn, p, true));
                        }
                    }
                }
            }
            Event::NotLogged { txn } => {
                if matches!(self.txns.get(&txn).map(|t| &t.phase), Some(Phase::Logging)) {
                    self.abort(txn, &mut out);
                }
            }
            Event::Received(Message::Ack { txn, from }) => {
                if let Some(t) = self.txns.get_mut(&txn) {
                    if let Phase::Delivering(acked) = &mut t.phase {
                        acked.insert(from);
                        if acked.len() == t.participants.len() {
                            self.txns.remove(&txn);
                            out.push(Command::LogEnd { txn });
                        }
                    }
                }
            }
            Event::Received(Message::Query { txn, from }) => match self.txns.get(&txn) {
                Some(Txn {
                    phase: Phase::Delivering(_),
                    ..
                }) => out.push(decision(&self.me, txn, &from, true)),
                // The decision is being written: it goes to everyone once durable.
                Some(Txn {
                    phase: Phase::Logging,
                    ..
                }) => {}
                // Undecided: decide now. Nothing was logged, so abort.
                Some(Txn {
                    phase: Phase::Collecting(_),
                    ..
                }) => self.abort(txn, &mut out),
                // No decision on record: presumed abort.
                None => out.push(decision(&self.me, txn, &from, false)),
            },
            Event::Received(Message::Prepare { .. } | Message::Decision { .. }) => {}
            Event::Tick => {
                let expired: Vec<TxnId> = self
                    .txns
                    .iter()
                    .filter(|(_, t)| {
                        matches!(t.phase, Phase::Collecting(_))
                            && now.duration_since(t.began) >= PREPARE_TIMEOUT
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for txn in expired {
                    self.abort(txn, &mut out);
                }
                for (txn, t) in &mut self.txns {
                    if now.duration_since(t.sent_at) < RESEND_AFTER {
                        continue;
                    }
                    match &t.phase {
                        Phase::Collecting(said_yes) => {
                            for p in t.participants.iter().filter(|p| !said_yes.contains(*p)) {
                                out.push(Command::Send {
                                    to: p.clone(),
                                    message: Message::Prepare {
                                        txn: *txn,
                                        coordinator: self.me.clone(),
                                    },
                                });
                            }
                        }
                        Phase::Delivering(acked) => {
                            for p in t.participants.iter().filter(|p| !acked.contains(*p)) {
                                out.push(decision(&self.me, *txn, p, true));
                            }
                        }
                        Phase::Logging => continue,
                    }
                    t.sent_at = now;
                }
            }
            Event::Recovered { committed } => {
                for (txn, participants) in committed {
                    if self.txns.contains_key(&txn) {
                        continue;
                    }
                    for p in &participants {
                        out.push(decision(&self.me, txn, p, true));
                    }
                    self.txns.insert(
                        txn,
                        Txn {
                            participants,
                            phase: Phase::Delivering(BTreeSet::new()),
                            began: now,
                            sent_at: now,
                        },
                    );
                }
            }
        }
        out
    }

    fn prepare(&self, txn: TxnId, to: &F) -> Command<F> {
        Command::Send {
            to: to.clone(),
            message: Message::Prepare {
                txn,
                coordinator: self.me.clone(),
            },
        }
    }

    /// Abort `txn` (undecided): forget it at once and tell every participant; one that
    /// misses the message asks, and an unknown transaction is an aborted one.
    fn abort(&mut self, txn: TxnId, out: &mut Vec<Command<F>>) {
        if let Some(t) = self.txns.remove(&txn) {
            out.push(Command::Decided { txn, commit: false });
            for p in &t.participants {
                out.push(decision(&self.me, txn, p, false));
            }
        }
    }
}

fn decision<F: Clone>(me: &F, txn: TxnId, to: &F, commit: bool) -> Command<F> {
    Command::Send {
        to: to.clone(),
        message: Message::Decision {
            txn,
            commit,
            from: me.clone(),
        },
    }
}
