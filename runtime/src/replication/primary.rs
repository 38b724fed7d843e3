//! The primary's side of a function's replication: ships entries, counts
//! acknowledgements, releases commits, resends after silence, notices fencing.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{Append, Epoch, NodeId, Reply, Seq};

/// Entries sent to one backup and not yet acknowledged, at most.
pub const INFLIGHT_ENTRIES_MAX: u64 = 4096;
/// Entries in one message, at most.
pub const BATCH_ENTRIES_MAX: usize = 512;
/// A backup that acknowledged nothing for this long is sent its unacknowledged
/// entries again (messages may have been lost).
pub const RESEND_AFTER: Duration = Duration::from_millis(50);
/// Released entries kept for backups that lag behind, at most; a backup that needs an
/// older one is sent a snapshot instead.
pub const LOG_RETAINED_MAX: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Counts for commits.
    Live,
    /// Being brought up to date; joins the live set once it holds every released commit
    /// (from then on, later commits wait for it).
    CatchingUp,
}

#[derive(Clone, Debug)]
struct Peer {
    state: PeerState,
    /// False until the backup first answers: where it stands is unknown, so silence is
    /// answered with another probe, not with entries.
    known: bool,
    seq_acked: Seq,
    seq_sent: Seq,
    sent_at: Option<Instant>,
    /// A snapshot is on its way to it: nothing is sent until `Resynced`.
    installing: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<P> {
    /// The primary committed `seq` locally (in order, one after another).
    Appended { seq: Seq, payload: P },
    /// The primary's own log holds everything up to `seq` durably.
    LocalDurable { seq: Seq },
    /// A backup answered.
    Replied { from: NodeId, reply: Reply },
    /// A new backup that holds everything up to `seq` (from a snapshot) and must catch up.
    PeerAdded { node: NodeId, seq: Seq },
    /// A snapshot holding everything up to `seq` was captured for `node` (a new backup,
    /// which joins catching up, or one that asked for it with `NeedSnapshot`): entries
    /// after `seq` are kept for it, and nothing is sent to it until `Resynced`.
    Installing { node: NodeId, seq: Seq },
    /// `node` installed the snapshot holding everything up to `seq`; entries after it
    /// follow. A live backup kept its place all along (it still counted for commits).
    Resynced { node: NodeId, seq: Seq },
    /// A backup left the configuration.
    PeerRemoved { node: NodeId },
    /// Time passed.
    Tick,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<P> {
    Send {
        to: NodeId,
        append: Append<P>,
    },
    /// Every commit up to `seq` is held by this log and every live backup: answer them.
    Release {
        seq: Seq,
    },
    /// A backup knows a newer epoch: this primary is deposed and must stop serving.
    Fenced {
        epoch: Epoch,
    },
    /// `node` needs entries this primary no longer keeps (or has diverged): install a
    /// snapshot on it, then report `PeerAdded` with the snapshot's position.
    NeedSnapshot {
        to: NodeId,
    },
    /// `node` caught up and now counts for commits.
    PeerLive {
        node: NodeId,
    },
}

/// The primary of one function in one epoch.
#[derive(Debug)]
pub struct Primary<P> {
    epoch: Epoch,
    /// Names this engine among the primaries of its epoch on its node (see `Append`).
    session: u64,
    peers: BTreeMap<NodeId, Peer>,
    /// Entries some backup may still need, oldest first, contiguous up to `seq_last`.
    log: VecDeque<(Seq, P)>,
    seq_last: Seq,
    seq_durable: Seq,
    seq_released: Seq,
    /// Where this primary's log stood when its epoch began, and the epoch of that entry:
    /// everything after it was appended by this primary, in `epoch`.
    seq_start: Seq,
    epoch_start: Epoch,
    fenced: Option<Epoch>,
}

impl<P: Clone> Primary<P> {
    /// A primary for `epoch` whose log ends at `seq_last` (everything up to it durable
    /// locally), with `backups` whose positions are established by a probe. Nothing is
    /// released until they confirm it: after a promotion, the new primary may hold
    /// entries its old peers never acknowledged, and a backup may lack them (it is then
    /// sent a snapshot).
    pub fn new(
        now: Instant,
        epoch: Epoch,
        session: u64,
        seq_last: Seq,
        epoch_last: Epoch,
        backups: &[NodeId],
    ) -> (Primary<P>, Vec<Command<P>>) {
        let mut primary = Primary {
            epoch,
            session,
            peers: BTreeMap::new(),
            log: VecDeque::new(),
            seq_last,
            seq_durable: seq_last,
            seq_released: Seq(0),
            seq_start: seq_last,
            epoch_start: epoch_last,
            fenced: None,
        };
        let mut commands = Vec::new();
        for &node in backups {
            // Probe with an empty append: the backup answers with where it stands, and
            // rejects the epoch if it knows a newer one.
            let peer = Peer {
                state: PeerState::Live,
                known: false,
                seq_acked: Seq(0),
                seq_sent: seq_last,
                sent_at: Some(now),
                installing: false,
            };
            primary.peers.insert(node, peer);
            commands.push(primary.probe(node));
        }
        // With no backups, the local log is all there is.
        primary.release(&mut commands);
        (primary, commands)
    }

    fn probe(&self, to: NodeId) -> Command<P> {
        Command::Send {
            to,
            append: Append {
                epoch: self.epoch,
                session: self.session,
                seq_prev: self.seq_last,
                // Known by construction: the last entry is the start or this primary's own.
                epoch_prev: self.epoch_of(self.seq_last).unwrap_or(self.epoch),
                entries: Vec::new(),
            },
        }
    }

    /// The epoch of this primary's entry at `seq`, where it knows it: its starting point
    /// and everything it appended since (all in its own epoch).
    fn epoch_of(&self, seq: Seq) -> Option<Epoch> {
        if seq == self.seq_start {
            Some(self.epoch_start)
        } else if seq > self.seq_start && seq <= self.seq_last {
            Some(self.epoch)
        } else {
            None
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn seq_last(&self) -> Seq {
        self.seq_last
    }

    pub fn seq_released(&self) -> Seq {
        self.seq_released
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.is_some()
    }

    /// How far `node` is behind the primary's log, in entries.
    pub fn lag(&self, node: NodeId) -> Option<u64> {
        self.peers
            .get(&node)
            .map(|p| self.seq_last.0.saturating_sub(p.seq_acked.0))
    }

    /// The backups this primary ships to, live or catching up.
    pub fn peers(&self) -> Vec<NodeId> {
        self.peers.keys().copied().collect()
    }

    pub fn peer_state(&self, node: NodeId) -> Option<PeerState> {
        self.peers.get(&node).map(|p| p.state)
    }

    pub fn step(&mut self, now: Instant, event: Event<P>) -> Vec<Command<P>> {
        let mut commands = Vec::new();
        if self.fenced.is_some() {
            return commands;
        }
        match event {
            Event::Appended { seq, payload } => {
                assert_eq!(
                    seq,
                    self.seq_last.next(),
                    "the primary appends its own entries in order"
                );
                self.seq_last = seq;
                self.log.push_back((seq, payload));
                self.send_all(now, &mut commands);
            }
            Event::LocalDurable { seq } => {
                self.seq_durable = self.seq_durable.max(seq.min(self.seq_last));
            }
            Event::Replied { from, reply } => self.on_reply(now, from, reply, &mut commands),
            Event::PeerAdded { node, seq } => {
                let peer = Peer {
                    state: PeerState::CatchingUp,
                    known: true,
                    seq_acked: seq,
                    seq_sent: seq,
                    sent_at: None,
                    installing: false,
                };
                self.peers.insert(node, peer);
                self.send_to(now, node, &mut commands);
                self.check_live(node, &mut commands);
            }
            Event::Installing { node, seq } => {
                let peer = self.peers.entry(node).or_insert(Peer {
                    state: PeerState::CatchingUp,
                    known: true,
                    seq_acked: seq,
                    seq_sent: seq,
                    sent_at: None,
                    installing: true,
                });
                peer.installing = true;
            }
            Event::Resynced { node, seq } => {
                if let Some(peer) = self.peers.get_mut(&node) {
                    peer.installing = false;
                    peer.known = true;
                    peer.seq_acked = peer.seq_acked.max(seq.min(self.seq_last));
                    peer.seq_sent = peer.seq_acked;
                    peer.sent_at = None;
                    self.check_live(node, &mut commands);
                    self.send_to(now, node, &mut commands);
                }
            }
            Event::PeerRemoved { node } => {
                // What waited only for this backup is released now: without this, a copy
                // whose backup died released nothing more until its next append (and a
                // change of configuration, which holds the function's lock, waited its
                // full drain timeout for it).
                self.peers.remove(&node);
                self.release(&mut commands);
            }
            Event::Tick => {
                let stalled: Vec<NodeId> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| {
                        !p.installing
                            && (!p.known || p.seq_acked < p.seq_sent)
                            && p.sent_at
                                .is_some_and(|t| now.duration_since(t) >= RESEND_AFTER)
                    })
                    .map(|(n, _)| *n)
                    .collect();
                for node in stalled {
                    let peer = self.peers.get_mut(&node).expect("listed above");
                    peer.sent_at = Some(now);
                    if peer.known {
                        peer.seq_sent = peer.seq_acked;
                        self.send_to(now, node, &mut commands);
                    } else {
                        commands.push(self.probe(node));
                    }
                }
            }
        }
        self.release(&mut commands);
        self.trim();
        commands
    }

    fn on_reply(
        &mut self,
        now: Instant,
        from: NodeId,
        reply: Reply,
        commands: &mut Vec<Command<P>>,
    ) {
        match reply {
            Reply::Stale { epoch } if epoch > self.epoch => {
                self.fenced = Some(epoch);
                commands.push(Command::Fenced { epoch });
            }
            Reply::Stale { .. } => {}
            Reply::Ack { epoch, session, .. }
            | Reply::Gap { epoch, session, .. }
            | Reply::Diverged { epoch, session, .. }
                if epoch != self.epoch || session != self.session => {}
            Reply::Diverged { .. } => {
                if let Some(peer) = self.peers.get_mut(&from) {
                    // It keeps its place and its (old) acknowledged position: commits wait
                    // for it until it is resynchronised or the control plane replaces it,
                    // so nothing is released that it lacks while it could still be promoted.
                    peer.known = true;
                    commands.push(Command::NeedSnapshot { to: from });
                }
            }
            Reply::Ack { seq, .. } => {
                let Some(peer) = self.peers.get_mut(&from) else {
                    return;
                };
                if seq > self.seq_last {
                    // The backup claims entries this primary never had: it diverged. As
                    // above, it keeps holding back commits until it is resynchronised.
                    peer.known = true;
                    commands.push(Command::NeedSnapshot { to: from });
                    return;
                }
                if !peer.known {
                    // The answer to a probe that matched: the backup is where we are.
                    peer.known = true;
                    peer.seq_sent = seq.max(peer.seq_acked);
                }
                // Acks may arrive out of order; a durable position never goes back.
                peer.seq_acked = peer.seq_acked.max(seq);
                peer.seq_sent = peer.seq_sent.max(peer.seq_acked);
                self.check_live(from, commands);
                self.send_to(now, from, commands);
            }
            Reply::Gap {
                seq, epoch_last, ..
            } => {
                let matches = self.epoch_of(seq) == Some(epoch_last);
                let Some(peer) = self.peers.get_mut(&from) else {
                    return;
                };
                peer.known = true;
                if !matches {
                    // Its log ends in an entry this primary does not have (or cannot
                    // check): only a snapshot can bring it back.
                    commands.push(Command::NeedSnapshot { to: from });
                    return;
                }
                // Its log matches ours up to `seq`: resume after it.
                peer.seq_sent = seq.max(peer.seq_acked);
                self.send_to(now, from, commands);
            }
        }
    }

    fn check_live(&mut self, node: NodeId, commands: &mut Vec<Command<P>>) {
        if let Some(peer) = self.peers.get_mut(&node) {
            if peer.state == PeerState::CatchingUp
                && !peer.installing
                && peer.seq_acked >= self.seq_released
            {
                peer.state = PeerState::Live;
                commands.push(Command::PeerLive { node });
            }
        }
    }

    fn send_all(&mut self, now: Instant, commands: &mut Vec<Command<P>>) {
        let nodes: Vec<NodeId> = self.peers.keys().copied().collect();
        for node in nodes {
            self.send_to(now, node, commands);
        }
    }

    /// Send `node` what it lacks, within its in-flight window.
    fn send_to(&mut self, now: Instant, node: NodeId, commands: &mut Vec<Command<P>>) {
        let Some(peer) = self.peers.get(&node) else {
            return;
        };
        if !peer.known || peer.installing {
            return;
        }
        let seq_front = self.log.front().map_or(self.seq_last.next(), |(s, _)| *s);
        if peer.seq_sent.next() < seq_front && peer.seq_sent < self.seq_last {
            commands.push(Command::NeedSnapshot { to: node });
            return;
        }
        let mut seq_sent = peer.seq_sent;
        let window_end = Seq(peer.seq_acked.0 + INFLIGHT_ENTRIES_MAX).min(self.seq_last);
        let mut sent_any = false;
        while seq_sent < window_end {
            let start = (seq_sent.0 + 1 - seq_front.0) as usize;
            let end = ((window_end.0 + 1 - seq_front.0) as usize).min(start + BATCH_ENTRIES_MAX);
            let entries: Vec<(Seq, P)> = self.log.range(start..end).cloned().collect();
            let seq_prev = seq_sent;
            let Some(epoch_prev) = self.epoch_of(seq_prev) else {
                commands.push(Command::NeedSnapshot { to: node });
                return;
            };
            seq_sent = entries.last().map_or(seq_sent, |(s, _)| *s);
            commands.push(Command::Send {
                to: node,
                append: Append {
                    epoch: self.epoch,
                    session: self.session,
                    seq_prev,
                    epoch_prev,
                    entries,
                },
            });
            sent_any = true;
        }
        let peer = self.peers.get_mut(&node).expect("looked up above");
        peer.seq_sent = seq_sent;
        if sent_any || peer.sent_at.is_none() {
            peer.sent_at = Some(now);
        }
    }

    /// Release what the local log and every live backup hold.
    fn release(&mut self, commands: &mut Vec<Command<P>>) {
        let seq = self
            .peers
            .values()
            .filter(|p| p.state == PeerState::Live)
            .map(|p| p.seq_acked)
            .chain([self.seq_durable])
            .min()
            .expect("the local log is always counted");
        if seq > self.seq_released {
            self.seq_released = seq;
            commands.push(Command::Release { seq });
        }
    }

    /// Forget entries every backup has.
    fn trim(&mut self) {
        let seq_needed = self
            .peers
            .values()
            .map(|p| if p.known { p.seq_acked } else { Seq(0) })
            .min()
            .unwrap_or(self.seq_released)
            .min(self.seq_released);
        while self.log.front().is_some_and(|(s, _)| {
            *s <= seq_needed || (self.log.len() > LOG_RETAINED_MAX && *s <= self.seq_released)
        }) {
            self.log.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_dead_backup_releases_what_waited_for_it() {
        let now = Instant::now();
        let (mut primary, _) =
            Primary::<u32>::new(now, Epoch(1), 1, Seq(0), Epoch(0), &[NodeId(2)]);
        primary.step(
            now,
            Event::Appended {
                seq: Seq(1),
                payload: 7,
            },
        );
        let waiting = primary.step(now, Event::LocalDurable { seq: Seq(1) });
        assert!(
            !waiting.contains(&Command::Release { seq: Seq(1) }),
            "backup 2 does not hold it yet"
        );
        // Backup 2 died and left the configuration without acknowledging.
        let released = primary.step(now, Event::PeerRemoved { node: NodeId(2) });
        assert!(
            released.contains(&Command::Release { seq: Seq(1) }),
            "{released:?}"
        );
    }
}
