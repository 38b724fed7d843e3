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
    seq_applied: Seq,
    seq_durable: Seq,
    /// Waiting for a snapshot: entries are refused until `reset`.
    resyncing: bool,
}

impl Backup {
    /// A backup whose log ends at `seq` (durable), knowing `epoch`.
    pub fn new(epoch: Epoch, seq: Seq) -> Backup {
        Backup {
            epoch,
            primary: None,
            seq_applied: seq,
            seq_durable: seq,
            resyncing: false,
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn seq_applied(&self) -> Seq {
        self.seq_applied
    }

    pub fn seq_durable(&self) -> Seq {
        self.seq_durable
    }

    /// The state was replaced by a snapshot at `seq` (after `Resync`, or to join).
    pub fn reset(&mut self, epoch: Epoch, seq: Seq) {
        self.epoch = self.epoch.max(epoch);
        self.seq_applied = seq;
        self.seq_durable = seq;
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
        if self.resyncing {
            return Vec::new();
        }
        if append.epoch > self.epoch || self.primary != Some(from) {
            // A new primary. An epoch is only ever sent by the node the control plane
            // made primary in it, so adopting it is safe; what is not safe is keeping
            // entries it does not have.
            let diverged = append.seq_prev < self.seq_applied;
            self.epoch = append.epoch;
            self.primary = Some(from);
            if diverged {
                self.resyncing = true;
                return vec![
                    Command::Reply {
                        to: from,
                        reply: Reply::Diverged {
                            epoch: self.epoch,
                            seq_applied: self.seq_applied,
                        },
                    },
                    Command::Resync { from },
                ];
            }
        }
        if append.seq_prev > self.seq_applied {
            return reply(Reply::Gap {
                epoch: self.epoch,
                seq: self.seq_durable.min(self.seq_applied),
            });
        }
        let fresh: Vec<(Seq, P)> = append
            .entries
            .into_iter()
            .filter(|(seq, _)| *seq > self.seq_applied)
            .collect();
        let mut commands = Vec::new();
        if let Some((last, _)) = fresh.last() {
            self.seq_applied = *last;
            commands.push(Command::Apply { entries: fresh });
        } else {
            // Nothing new (a probe or a resend): say where we stand.
            commands.push(Command::Reply {
                to: from,
                reply: Reply::Ack {
                    epoch: self.epoch,
                    seq: self.seq_durable,
                },
            });
        }
        commands
    }
}
