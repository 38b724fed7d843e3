//! The backup's side of a function's replication: accept entries of the current (or
//! a newer) epoch strictly in order, refuse stale epochs, acknowledge what is durable,
//! and ask for a snapshot when its log has diverged from a new primary's.

use super::{Append, Epoch, NodeId, Reply, Seq};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<P> {
    /// A message from `from`, which claims to be primary in `append.epoch`.
    Received { from: NodeId, append: Append<P> },
    /// The backup's own log holds everything up to `seq` durably.
    Durable { seq: Seq },
    /// The control plane committed `epoch` for this function (learned directly).
    EpochCommitted { epoch: Epoch },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<P> {
    /// Append these entries to the log and apply them to the state, in order.
    Apply {
        entries: Vec<(Seq, P)>,
    },
    Reply {
        to: NodeId,
        reply: Reply,
    },
    /// This backup must be rebuilt from the primary's snapshot before it can follow.
    Resync {
        from: NodeId,
    },
}

/// A backup of one function.
#[derive(Debug)]
pub struct Backup {
    epoch: Epoch,
    primary: Option<NodeId>,
    /// The session of `primary` this backup follows (0: none yet).
    session: u64,
    /// The epoch, primary and session whose log this backup's log was checked to match:
    /// entries from them may overlap what it holds.
    matched: Option<(Epoch, NodeId, u64)>,
    seq_applied: Seq,
    /// The epoch of the entry at `seq_applied`.
    epoch_applied: Epoch,
    seq_durable: Seq,
    /// Waiting for a snapshot: entries are refused until `reset`.
    resyncing: bool,
}

impl Backup {
    /// A backup whose log ends at `seq` (durable), an entry of `epoch_last`, knowing `epoch`.
    pub fn new(epoch: Epoch, seq: Seq, epoch_last: Epoch) -> Backup {
        Backup {
            epoch,
            primary: None,
            session: 0,
            matched: None,
            seq_applied: seq,
            epoch_applied: epoch_last,
            seq_durable: seq,
            resyncing: false,
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The session of the primary this backup follows (0: none yet).
    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn seq_applied(&self) -> Seq {
        self.seq_applied
    }

    pub fn seq_durable(&self) -> Seq {
        self.seq_durable
    }

    /// Whether a snapshot at `seq` from `from`'s `session`, primary of `epoch`, is behind
    /// this backup: it already follows that session past `seq` (the snapshot is an older
    /// install that arrived late, after a newer one and the entries that followed it).
    /// Installing it would take back entries this backup may have acknowledged: it must
    /// be ignored.
    pub fn snapshot_is_behind(&self, from: NodeId, epoch: Epoch, session: u64, seq: Seq) -> bool {
        !self.resyncing && self.matched == Some((epoch, from, session)) && seq < self.seq_applied
    }

    /// The state was replaced by a snapshot of the log of `from`'s `session` at `seq`,
    /// whose last entry is of `epoch_last`, `from` being the primary of `epoch`: this
    /// backup's log now matches that session's up to `seq`, and it follows it.
    pub fn install(
        &mut self,
        from: NodeId,
        epoch: Epoch,
        session: u64,
        seq: Seq,
        epoch_last: Epoch,
    ) {
        self.reset(epoch, seq, epoch_last);
        if epoch >= self.epoch {
            self.primary = Some(from);
            self.session = session;
            self.matched = Some((epoch, from, session));
        }
    }

    /// The state was replaced by a snapshot at `seq`, whose last entry is of `epoch_last`
    /// (after `Resync`, or to join).
    pub fn reset(&mut self, epoch: Epoch, seq: Seq, epoch_last: Epoch) {
        self.epoch = self.epoch.max(epoch);
        self.seq_applied = seq;
        self.epoch_applied = epoch_last;
        self.seq_durable = seq;
        self.matched = None;
        self.resyncing = false;
    }

    pub fn step<P>(&mut self, event: Event<P>) -> Vec<Command<P>> {
        match event {
            Event::Received { from, append } => self.on_append(from, append),
            Event::Durable { seq } => {
                let seq = seq.min(self.seq_applied);
                if seq <= self.seq_durable {
                    return Vec::new();
                }
                self.seq_durable = seq;
                match self.primary {
                    Some(to) => vec![Command::Reply {
                        to,
                        reply: Reply::Ack {
                            epoch: self.epoch,
                            session: self.session,
                            seq,
                        },
                    }],
                    None => Vec::new(),
                }
            }
            Event::EpochCommitted { epoch } => {
                if epoch > self.epoch {
                    self.epoch = epoch;
                    self.primary = None;
                    self.session = 0;
                    self.matched = None;
                }
                Vec::new()
            }
        }
    }

    fn on_append<P>(&mut self, from: NodeId, append: Append<P>) -> Vec<Command<P>> {
        let reply = |reply| vec![Command::Reply { to: from, reply }];
        // Input from the network: entries must follow `seq_prev` one by one.
        let contiguous = append
            .entries
            .iter()
            .enumerate()
            .all(|(i, (seq, _))| append.seq_prev.0.checked_add(1 + i as u64) == Some(seq.0));
        if !contiguous {
            tracing::warn!(%from, "ignoring a replication message whose entries are not contiguous");
            return Vec::new();
        }
        if append.epoch < self.epoch {
            return reply(Reply::Stale { epoch: self.epoch });
        }
        // An epoch is only ever sent by the node the control plane made primary in it,
        // so adopting a newer one is safe; keeping entries it does not have is not.
        let session = append.session;
        if append.epoch > self.epoch || self.primary != Some(from) || self.session != session {
            self.epoch = append.epoch;
            self.primary = Some(from);
            self.session = session;
            self.matched = None;
        }
        let diverged = vec![
            Command::Reply {
                to: from,
                reply: Reply::Diverged {
                    epoch: self.epoch,
                    session,
                    seq_applied: self.seq_applied,
                },
            },
            Command::Resync { from },
        ];
        if self.resyncing {
            // Still waiting for a snapshot. A new primary must learn that it owes one
            // (`matched` then records that it was told, until `reset`); every later
            // message is answered the same way, in case that answer was lost.
            if self.matched.is_none() {
                self.matched = Some((append.epoch, from, session));
                return diverged;
            }
            return reply(Reply::Diverged {
                epoch: self.epoch,
                session,
                seq_applied: self.seq_applied,
            });
        }
        if append.seq_prev > self.seq_applied {
            return reply(Reply::Gap {
                epoch: self.epoch,
                session,
                seq: self.seq_applied,
                epoch_last: self.epoch_applied,
            });
        }
        let overlap_ok = self.matched == Some((append.epoch, from, session));
        let matches =
            append.seq_prev == self.seq_applied && append.epoch_prev == self.epoch_applied;
        if !matches && !overlap_ok {
            // Entries here that the primary's log does not have (or cannot be checked):
            // only a snapshot of the primary's state can make this backup follow it.
            self.resyncing = true;
            self.matched = Some((append.epoch, from, session));
            return diverged;
        }
        self.matched = Some((append.epoch, from, session));
        let fresh: Vec<(Seq, P)> = append
            .entries
            .into_iter()
            .filter(|(seq, _)| *seq > self.seq_applied)
            .collect();
        let mut commands = Vec::new();
        if let Some((last, _)) = fresh.last() {
            self.seq_applied = *last;
            self.epoch_applied = append.epoch;
            commands.push(Command::Apply { entries: fresh });
        } else {
            // Nothing new (a probe or a resend): say where we stand.
            commands.push(Command::Reply {
                to: from,
                reply: Reply::Ack {
                    epoch: self.epoch,
                    session,
                    seq: self.seq_durable,
                },
            });
        }
        commands
    }
}
