//! One function's copy on one node, as an I/O-free state machine: the role the copy
//! holds (none, backup, primary), the replication engine of that role, and every role
//! change: following the function's assignment (`follow::as_primary` decides a
//! primary's), taking the function's lock before a change that no transaction may be
//! half-way through, letting an old engine release what it sent before a new one
//! starts, stepping down for a hand-over, and deciding what to do with a snapshot
//! offered by a primary.
//!
//! The node (`cluster::replica`, `Cluster::follow`) and the failover simulation both
//! drive this machine and carry out its commands, so what the simulation checks is the
//! composition the node runs, not a copy of it. Nothing here reads a clock, a socket or
//! a file.
//!
//! **Invariant:** a copy holds at most one engine. A new primary engine starts only
//! under the function's lock (`Command::Lock` ... `Event::Locked`), after the old one
//! released what it had sent or [`follow::DRAIN_WAIT`] ran out, and the old session's
//! waiters are told to retry (`Command::Retire`) before the new session serves.
//! **Invariant:** a primary demoted to backup, or dropped, changes role under the lock
//! too: no commit is half-way through the old engine when it goes.

use std::collections::BTreeSet;
use std::time::Instant;

use super::backup::{self, Backup};
use super::follow::{self, Follow};
use super::primary::{self, PeerState, Primary};
use super::{Append, Epoch, NodeId, Reply, Seq};

/// Where this node's log of the function ends: its last position and the epoch of the
/// entry there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub seq: Seq,
    pub epoch_last: Epoch,
}

/// The function's assignment, as this node learned it from the cluster state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub epoch: Epoch,
    pub primary: NodeId,
    pub backups: Vec<NodeId>,
    pub catching_up: Vec<NodeId>,
}

impl Assignment {
    fn holds(&self, node: NodeId) -> bool {
        self.primary == node || self.backups.contains(&node) || self.catching_up.contains(&node)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<P> {
    /// The node follows `assignment` (its reconcile pass). `log` is where the local log
    /// ends now; `restarted` says this process found itself primary of exactly this
    /// epoch when it started (it asks for a new epoch before it serves).
    Assigned {
        assignment: Assignment,
        log: Position,
        restarted: bool,
    },
    /// The function's lock is held (after `Command::Lock`): no transaction is half-way.
    /// `log` is where the local log ends under it; `session` is a number no primary
    /// engine on this node has had, for the engine this may start.
    Locked { log: Position, session: u64 },
    /// The function left this node (deleted, or its assignment no longer names the
    /// node). The caller holds the function's lock.
    Dropped,
    /// Time passed (the primary resends to silent backups).
    Tick,
    /// The primary's session `session` appended `payload` at `seq` to the local log.
    Appended { session: u64, seq: Seq, payload: P },
    /// The local log holds everything up to `seq` durably (whatever the role).
    Durable { seq: Seq },
    /// A backup answered the primary.
    Replied { from: NodeId, reply: Reply },
    /// `session`'s catch-up of `node` captured a snapshot at `seq`.
    Installing {
        session: u64,
        node: NodeId,
        seq: Seq,
    },
    /// `node` installed `session`'s snapshot and holds it up to `seq`.
    Resynced {
        session: u64,
        node: NodeId,
        seq: Seq,
    },
    /// An append from `from`, which claims to be primary of `append.epoch`.
    Received { from: NodeId, append: Append<P> },
    /// The master asked this node to give up its primary place in `epoch` (a drain).
    StepDown { epoch: Epoch },
    /// The hand-over `StepDown` made way for was refused: serve in `epoch` again.
    UndoStepDown { epoch: Epoch },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<P> {
    /// Take the function's lock, then step `Locked`.
    Lock,
    /// Step `Locked` again in a moment, still holding the lock: the old engine has not
    /// released everything it sent yet.
    Drain,
    /// Give the function's lock back.
    Unlock,
    /// Ask the master to renew this node as primary in a new epoch (after `epoch`).
    Renew { epoch: Epoch },
    /// Tell the master `node` holds every released commit of `epoch` (it counts now).
    ReportCaughtUp { node: NodeId, epoch: Epoch },
    /// A backup caught up: follow the assignment again soon, to report it.
    CaughtUp { node: NodeId },
    /// A primary session starts serving `epoch` from `seq` over `backups`.
    Serve {
        epoch: Epoch,
        session: u64,
        seq: Seq,
        backups: Vec<NodeId>,
    },
    /// The old engine of a new primary session did not release everything it sent
    /// within `follow::DRAIN_WAIT`; its waiters are told to retry.
    DrainGaveUp {
        epoch: Epoch,
        seq_last: Seq,
        seq_released: Seq,
    },
    /// That primary session no longer serves (replaced, demoted, stepped down or
    /// dropped): its waiters whose commits were not released retry.
    Retire { session: u64 },
    /// That primary session was fenced: a backup knows the newer `epoch`.
    Fenced { session: u64, epoch: Epoch },
    /// Every commit of that session up to `seq` is held by every backup of its epoch.
    Release { session: u64, seq: Seq },
    /// Send `append` to `to`.
    Send { to: NodeId, append: Append<P> },
    /// Bring `to` up to date with a snapshot of that session's log.
    CatchUp { session: u64, to: NodeId },
    /// The copy is now a backup knowing `epoch`, its log ending at `seq`.
    Follow { epoch: Epoch, seq: Seq },
    /// The backup applies these entries of `epoch` to its log and state, in order.
    Apply {
        epoch: Epoch,
        entries: Vec<(Seq, P)>,
    },
    /// The backup answers the primary.
    Reply { to: NodeId, reply: Reply },
    /// The backup diverged from `from`'s log: it waits for that primary's snapshot.
    Resync { from: NodeId },
}

/// What a backup does with a snapshot a primary offers (see [`Replica::offered`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Replace the state with it, durably, then call [`Replica::installed`].
    Install,
    /// Already past it (an older install that arrived late): answer that `seq` is held.
    Held { seq: Seq },
    /// The offer's epoch is stale: this copy knows `epoch`.
    Stale { epoch: Epoch },
    /// Not (yet) a backup of the function here: the primary tries again later.
    Refuse,
}

/// The role a copy holds, with its engine.
#[derive(Debug)]
enum Role<P> {
    None,
    Backup(Backup),
    Primary {
        engine: Primary<P>,
        /// Replaced by nothing yet, but no longer serving (stepped down).
        retired: bool,
    },
}

/// A change that waits for the function's lock.
#[derive(Debug)]
enum Pending {
    /// Start a primary engine for `epoch` (after the old one drained, if `drain_old`).
    Start {
        epoch: Epoch,
        drain_old: bool,
        backups: Vec<NodeId>,
        catching_up: Vec<NodeId>,
        /// When the wait for the old engine began.
        since: Option<Instant>,
    },
    /// Demote the primary engine to a backup knowing `epoch`.
    Backup { epoch: Epoch },
    /// Drop the role.
    Drop,
}

/// One function's copy on this node.
#[derive(Debug)]
pub struct Replica<P> {
    me: NodeId,
    role: Role<P>,
    /// Epochs in which this node handed its primary place over: not to be taken again in
    /// them.
    stepped_down: BTreeSet<Epoch>,
    pending: Option<Pending>,
}

impl<P: Clone> Replica<P> {
    pub fn new(me: NodeId) -> Replica<P> {
        Replica {
            me,
            role: Role::None,
            stepped_down: BTreeSet::new(),
            pending: None,
        }
    }

    /// The primary engine, serving or not.
    pub fn primary(&self) -> Option<&Primary<P>> {
        match &self.role {
            Role::Primary { engine, .. } => Some(engine),
            _ => None,
        }
    }

    /// The primary engine, if it serves: not fenced, not retired.
    pub fn serving(&self) -> Option<&Primary<P>> {
        match &self.role {
            Role::Primary { engine, retired } if !retired && !engine.is_fenced() => Some(engine),
            _ => None,
        }
    }

    pub fn backup(&self) -> Option<&Backup> {
        match &self.role {
            Role::Backup(b) => Some(b),
            _ => None,
        }
    }

    /// Whether the copy holds a role (primary or backup).
    pub fn holds(&self) -> bool {
        !matches!(self.role, Role::None)
    }

    pub fn stepped_down(&self, epoch: Epoch) -> bool {
        self.stepped_down.contains(&epoch)
    }

    pub fn step(&mut self, now: Instant, event: Event<P>) -> Vec<Command<P>> {
        let mut out = Vec::new();
        match event {
            Event::Assigned {
                assignment,
                log,
                restarted,
            } => self.assigned(now, assignment, log, restarted, &mut out),
            Event::Locked { log, session } => self.locked(now, log, session, &mut out),
            Event::Dropped => {
                self.pending = None;
                self.retire(&mut out);
                self.role = Role::None;
            }
            Event::Tick => self.engine(now, primary::Event::Tick, &mut out),
            Event::Appended {
                session,
                seq,
                payload,
            } => {
                if self.primary().is_some_and(|e| e.session() == session) {
                    self.engine(now, primary::Event::Appended { seq, payload }, &mut out);
                }
            }
            Event::Durable { seq } => match &mut self.role {
                Role::Backup(b) => {
                    let epoch = b.epoch();
                    let commands = b.step(backup::Event::Durable { seq });
                    backup_commands(epoch, commands, &mut out);
                }
                Role::Primary { .. } => {
                    self.engine(now, primary::Event::LocalDurable { seq }, &mut out)
                }
                Role::None => {}
            },
            Event::Replied { from, reply } => {
                self.engine(now, primary::Event::Replied { from, reply }, &mut out)
            }
            Event::Installing { session, node, seq } => {
                if self.primary().is_some_and(|e| e.session() == session) {
                    self.engine(now, primary::Event::Installing { node, seq }, &mut out);
                }
            }
            Event::Resynced { session, node, seq } => {
                if self.primary().is_some_and(|e| e.session() == session) {
                    self.engine(now, primary::Event::Resynced { node, seq }, &mut out);
                }
            }
            Event::Received { from, append } => match &mut self.role {
                Role::Backup(b) => {
                    let epoch = append.epoch;
                    let commands = b.step(backup::Event::Received { from, append });
                    backup_commands(epoch, commands, &mut out);
                }
                // A newer primary: this node was deposed and has not heard yet. It says
                // nothing (the newer primary resends until this node follows it).
                Role::Primary { engine, .. } if engine.epoch() < append.epoch => {}
                // Two primaries of one epoch cannot exist; an older one is stale.
                Role::Primary { engine, .. } => out.push(Command::Reply {
                    to: from,
                    reply: Reply::Stale {
                        epoch: engine.epoch(),
                    },
                }),
                // Not (yet) a backup here: the primary resends after silence.
                Role::None => {}
            },
            Event::StepDown { epoch } => {
                self.stepped_down.insert(epoch);
                if self.primary().is_some_and(|e| e.epoch() <= epoch) {
                    self.retire(&mut out);
                }
            }
            Event::UndoStepDown { epoch } => {
                self.stepped_down.remove(&epoch);
            }
        }
        out
    }

    /// What to do with a snapshot of `session`'s log at `seq` that `from`, primary of
    /// `epoch`, offers this copy.
    pub fn offered(&self, from: NodeId, epoch: Epoch, session: u64, seq: Seq) -> Offer {
        match &self.role {
            Role::Backup(b) if epoch < b.epoch() => Offer::Stale { epoch: b.epoch() },
            // Claim no more than is durable here: the primary counts it as held.
            Role::Backup(b) if b.snapshot_is_behind(from, epoch, session, seq) => Offer::Held {
                seq: seq.min(b.seq_durable()),
            },
            Role::Backup(_) => Offer::Install,
            Role::Primary { engine, .. } if engine.epoch() >= epoch => Offer::Stale {
                epoch: engine.epoch(),
            },
            Role::Primary { .. } | Role::None => Offer::Refuse,
        }
    }

    /// The snapshot `offered` said to install is in the local log, ending at `log`.
    pub fn installed(&mut self, from: NodeId, epoch: Epoch, session: u64, log: Position) {
        if let Role::Backup(b) = &mut self.role {
            b.install(from, epoch, session, log.seq, log.epoch_last);
        }
    }

    fn assigned(
        &mut self,
        now: Instant,
        assignment: Assignment,
        log: Position,
        restarted: bool,
        out: &mut Vec<Command<P>>,
    ) {
        self.pending = None;
        if !assignment.holds(self.me) {
            if self.holds() {
                self.lock(Pending::Drop, out);
            }
            return;
        }
        if assignment.primary != self.me {
            match &mut self.role {
                Role::Backup(b) => {
                    b.step::<P>(backup::Event::EpochCommitted {
                        epoch: assignment.epoch,
                    });
                }
                Role::Primary { .. } => self.lock(
                    Pending::Backup {
                        epoch: assignment.epoch,
                    },
                    out,
                ),
                Role::None => self.become_backup(assignment.epoch, log, out),
            }
            return;
        }
        let assigned = follow::Assigned {
            epoch: assignment.epoch,
            backups: &assignment.backups,
            catching_up: &assignment.catching_up,
        };
        let stepped_down = self.stepped_down(assignment.epoch);
        let held = match &self.role {
            Role::Primary { engine, retired } => Some(follow::Held {
                engine,
                serving: !retired && !engine.is_fenced(),
            }),
            _ => None,
        };
        match follow::as_primary(held, stepped_down, restarted, assigned) {
            Follow::Wait => {}
            Follow::Renew { epoch } => out.push(Command::Renew { epoch }),
            Follow::Adjust {
                catch_up,
                caught_up,
                remove,
            } => {
                let session = self.primary().map_or(0, |e| e.session());
                for to in catch_up {
                    out.push(Command::CatchUp { session, to });
                }
                for node in caught_up {
                    out.push(Command::ReportCaughtUp {
                        node,
                        epoch: assignment.epoch,
                    });
                }
                for node in remove {
                    self.engine(now, primary::Event::PeerRemoved { node }, out);
                }
            }
            Follow::Start {
                epoch,
                remove_now,
                drain_old,
                backups,
                catching_up,
            } => {
                // What waited only for backups that left (a dead node's) is released
                // now: a transaction holding the lock may be waiting for exactly that.
                for node in remove_now {
                    self.engine(now, primary::Event::PeerRemoved { node }, out);
                }
                self.lock(
                    Pending::Start {
                        epoch,
                        drain_old,
                        backups,
                        catching_up,
                        since: None,
                    },
                    out,
                );
            }
        }
    }

    fn lock(&mut self, pending: Pending, out: &mut Vec<Command<P>>) {
        self.pending = Some(pending);
        out.push(Command::Lock);
    }

    fn locked(&mut self, now: Instant, log: Position, session: u64, out: &mut Vec<Command<P>>) {
        match self.pending.take() {
            None => {}
            Some(Pending::Drop) => {
                self.retire(out);
                self.role = Role::None;
            }
            Some(Pending::Backup { epoch }) => {
                self.retire(out);
                self.become_backup(epoch, log, out);
            }
            Some(Pending::Start {
                epoch,
                drain_old,
                backups,
                catching_up,
                since,
            }) => {
                let since = since.unwrap_or(now);
                let draining = match &self.role {
                    Role::Primary { engine, retired } => follow::draining(follow::Held {
                        engine,
                        serving: !retired && !engine.is_fenced(),
                    }),
                    _ => false,
                };
                if drain_old && draining {
                    if now.saturating_duration_since(since) < follow::DRAIN_WAIT {
                        self.pending = Some(Pending::Start {
                            epoch,
                            drain_old,
                            backups,
                            catching_up,
                            since: Some(since),
                        });
                        out.push(Command::Drain);
                        return;
                    }
                    if let Some(engine) = self.primary() {
                        out.push(Command::DrainGaveUp {
                            epoch: engine.epoch(),
                            seq_last: engine.seq_last(),
                            seq_released: engine.seq_released(),
                        });
                    }
                }
                self.retire(out);
                let (engine, commands) =
                    Primary::new(now, epoch, session, log.seq, log.epoch_last, &backups);
                self.role = Role::Primary {
                    engine,
                    retired: false,
                };
                out.push(Command::Serve {
                    epoch,
                    session,
                    seq: log.seq,
                    backups,
                });
                self.primary_commands(session, commands, out);
                for to in catching_up {
                    out.push(Command::CatchUp { session, to });
                }
            }
        }
        out.push(Command::Unlock);
    }

    fn become_backup(&mut self, epoch: Epoch, log: Position, out: &mut Vec<Command<P>>) {
        self.role = Role::Backup(Backup::new(epoch, log.seq, log.epoch_last));
        out.push(Command::Follow {
            epoch,
            seq: log.seq,
        });
    }

    /// The primary session, if any, stops serving.
    fn retire(&mut self, out: &mut Vec<Command<P>>) {
        if let Role::Primary { engine, retired } = &mut self.role {
            if !*retired {
                *retired = true;
                out.push(Command::Retire {
                    session: engine.session(),
                });
            }
        }
    }

    fn engine(&mut self, now: Instant, event: primary::Event<P>, out: &mut Vec<Command<P>>) {
        if let Role::Primary { engine, .. } = &mut self.role {
            let session = engine.session();
            let commands = engine.step(now, event);
            self.primary_commands(session, commands, out);
        }
    }

    fn primary_commands(
        &self,
        session: u64,
        commands: Vec<primary::Command<P>>,
        out: &mut Vec<Command<P>>,
    ) {
        for command in commands {
            out.push(match command {
                primary::Command::Send { to, append } => Command::Send { to, append },
                primary::Command::Release { seq } => Command::Release { session, seq },
                primary::Command::Fenced { epoch } => Command::Fenced { session, epoch },
                primary::Command::NeedSnapshot { to } => Command::CatchUp { session, to },
                primary::Command::PeerLive { node } => Command::CaughtUp { node },
            });
        }
    }

    /// The backups the primary engine ships to, with whether each is live (counts for
    /// commits).
    pub fn peers(&self) -> Vec<(NodeId, bool)> {
        self.primary().map_or_else(Vec::new, |engine| {
            engine
                .peers()
                .into_iter()
                .map(|n| (n, engine.peer_state(n) == Some(PeerState::Live)))
                .collect()
        })
    }
}

fn backup_commands<P>(epoch: Epoch, commands: Vec<backup::Command<P>>, out: &mut Vec<Command<P>>) {
    for command in commands {
        out.push(match command {
            backup::Command::Apply { entries } => Command::Apply { epoch, entries },
            backup::Command::Reply { to, reply } => Command::Reply { to, reply },
            backup::Command::Resync { from } => Command::Resync { from },
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const ME: NodeId = NodeId(1);
    const N2: NodeId = NodeId(2);
    const N3: NodeId = NodeId(3);

    fn assigned(epoch: u64, primary: NodeId, backups: &[NodeId]) -> Event<u64> {
        Event::Assigned {
            assignment: Assignment {
                epoch: Epoch(epoch),
                primary,
                backups: backups.to_vec(),
                catching_up: Vec::new(),
            },
            log: Position::default(),
            restarted: false,
        }
    }

    fn locked(session: u64) -> Event<u64> {
        Event::Locked {
            log: Position::default(),
            session,
        }
    }

    fn serving(now: Instant, epoch: u64) -> Replica<u64> {
        let mut r = Replica::new(ME);
        assert_eq!(r.step(now, assigned(epoch, ME, &[N2])), vec![Command::Lock]);
        let out = r.step(now, locked(7));
        assert!(out.contains(&Command::Serve {
            epoch: Epoch(epoch),
            session: 7,
            seq: Seq(0),
            backups: vec![N2],
        }));
        assert_eq!(out.last(), Some(&Command::Unlock));
        r
    }

    #[test]
    fn a_new_primary_starts_under_the_lock_and_releases_what_its_backups_hold() {
        let now = Instant::now();
        let mut r = serving(now, 1);
        assert!(r.serving().is_some());
        // The backup answers the engine's first probe: from then on entries leave as
        // they are appended.
        r.step(
            now,
            Event::Replied {
                from: N2,
                reply: Reply::Ack {
                    epoch: Epoch(1),
                    session: 7,
                    seq: Seq(0),
                },
            },
        );
        let out = r.step(
            now,
            Event::Appended {
                session: 7,
                seq: Seq(1),
                payload: 10,
            },
        );
        assert!(
            matches!(&out[..], [Command::Send { to, .. }] if *to == N2),
            "{out:?}"
        );
        r.step(now, Event::Durable { seq: Seq(1) });
        let out = r.step(
            now,
            Event::Replied {
                from: N2,
                reply: Reply::Ack {
                    epoch: Epoch(1),
                    session: 7,
                    seq: Seq(1),
                },
            },
        );
        assert_eq!(
            out,
            vec![Command::Release {
                session: 7,
                seq: Seq(1)
            }]
        );
        // An append of another session (a retired handle) is not this engine's.
        let out = r.step(
            now,
            Event::Appended {
                session: 6,
                seq: Seq(2),
                payload: 11,
            },
        );
        assert!(out.is_empty());
    }

    #[test]
    fn a_new_epoch_waits_under_the_lock_for_the_old_engine_to_drain_then_gives_up() {
        let now = Instant::now();
        let mut r = serving(now, 1);
        r.step(
            now,
            Event::Appended {
                session: 7,
                seq: Seq(1),
                payload: 10,
            },
        );
        r.step(now, Event::Durable { seq: Seq(1) });
        // Epoch 2 keeps N2: the old engine must release #1 first.
        assert_eq!(r.step(now, assigned(2, ME, &[N2])), vec![Command::Lock]);
        assert_eq!(r.step(now, locked(8)), vec![Command::Drain]);
        let later = now + follow::DRAIN_WAIT / 2;
        assert_eq!(r.step(later, locked(8)), vec![Command::Drain]);
        // Released meanwhile: the new engine starts, the old session retires first.
        r.step(
            later,
            Event::Replied {
                from: N2,
                reply: Reply::Ack {
                    epoch: Epoch(1),
                    session: 7,
                    seq: Seq(1),
                },
            },
        );
        let out = r.step(
            later,
            Event::Locked {
                log: Position {
                    seq: Seq(1),
                    epoch_last: Epoch(1),
                },
                session: 8,
            },
        );
        let retire = out
            .iter()
            .position(|c| *c == Command::Retire { session: 7 });
        let serve = out
            .iter()
            .position(|c| matches!(c, Command::Serve { session: 8, .. }));
        assert!(retire.is_some() && retire < serve, "{out:?}");
        assert_eq!(r.serving().map(|e| e.epoch()), Some(Epoch(2)));

        // Never released: after DRAIN_WAIT the new engine starts anyway.
        r.step(
            later,
            Event::Appended {
                session: 8,
                seq: Seq(2),
                payload: 11,
            },
        );
        assert_eq!(r.step(later, assigned(3, ME, &[N2])), vec![Command::Lock]);
        assert_eq!(r.step(later, locked(9)), vec![Command::Drain]);
        let out = r.step(
            later + follow::DRAIN_WAIT + Duration::from_millis(1),
            locked(9),
        );
        assert!(matches!(out[0], Command::DrainGaveUp { .. }), "{out:?}");
        assert!(out.contains(&Command::Retire { session: 8 }));
    }

    #[test]
    fn a_primary_becomes_a_backup_or_drops_its_role_only_under_the_lock() {
        let now = Instant::now();
        let mut r = serving(now, 1);
        assert_eq!(r.step(now, assigned(2, N2, &[ME])), vec![Command::Lock]);
        assert!(
            r.primary().is_some(),
            "still primary until the lock is held"
        );
        let out = r.step(now, locked(0));
        assert_eq!(
            out,
            vec![
                Command::Retire { session: 7 },
                Command::Follow {
                    epoch: Epoch(2),
                    seq: Seq(0)
                },
                Command::Unlock
            ]
        );
        assert_eq!(r.backup().map(|b| b.epoch()), Some(Epoch(2)));
        // Left out of the assignment: dropped under the lock.
        assert_eq!(r.step(now, assigned(3, N2, &[N3])), vec![Command::Lock]);
        r.step(now, locked(0));
        assert!(!r.holds());
        // A copy that holds nothing joins as a backup at once.
        assert_eq!(
            r.step(now, assigned(4, N2, &[ME])),
            vec![Command::Follow {
                epoch: Epoch(4),
                seq: Seq(0)
            }]
        );
    }

    #[test]
    fn a_primary_that_stepped_down_stops_serving_and_does_not_take_the_epoch_again() {
        let now = Instant::now();
        let mut r = serving(now, 1);
        assert_eq!(
            r.step(now, Event::StepDown { epoch: Epoch(1) }),
            vec![Command::Retire { session: 7 }]
        );
        assert!(r.serving().is_none());
        assert!(r.step(now, assigned(1, ME, &[N2])).is_empty());
        r.step(now, Event::UndoStepDown { epoch: Epoch(1) });
        // Refused hand-over: a new engine serves the same epoch.
        assert_eq!(r.step(now, assigned(1, ME, &[N2])), vec![Command::Lock]);
        assert!(r.step(now, locked(8)).contains(&Command::Serve {
            epoch: Epoch(1),
            session: 8,
            seq: Seq(0),
            backups: vec![N2]
        }));
    }

    #[test]
    fn appends_and_snapshots_are_answered_by_role() {
        let now = Instant::now();
        let append = |epoch| Append {
            epoch: Epoch(epoch),
            session: 3,
            seq_prev: Seq(0),
            epoch_prev: Epoch(0),
            entries: vec![(Seq(1), 5u64)],
        };
        let mut r = serving(now, 2);
        // An older primary's append is answered stale; a newer one's is not answered.
        assert_eq!(
            r.step(
                now,
                Event::Received {
                    from: N2,
                    append: append(1)
                }
            ),
            vec![Command::Reply {
                to: N2,
                reply: Reply::Stale { epoch: Epoch(2) }
            }]
        );
        assert!(r
            .step(
                now,
                Event::Received {
                    from: N2,
                    append: append(3)
                }
            )
            .is_empty());
        assert_eq!(
            r.offered(N2, Epoch(2), 3, Seq(1)),
            Offer::Stale { epoch: Epoch(2) }
        );
        assert_eq!(r.offered(N2, Epoch(3), 3, Seq(1)), Offer::Refuse);
        let mut b: Replica<u64> = Replica::new(ME);
        assert_eq!(b.offered(N2, Epoch(3), 3, Seq(1)), Offer::Refuse);
        b.step(now, assigned(3, N2, &[ME]));
        assert_eq!(
            b.offered(N2, Epoch(2), 3, Seq(1)),
            Offer::Stale { epoch: Epoch(3) }
        );
        assert_eq!(b.offered(N2, Epoch(3), 3, Seq(1)), Offer::Install);
        b.installed(
            N2,
            Epoch(3),
            3,
            Position {
                seq: Seq(4),
                epoch_last: Epoch(3),
            },
        );
        // A late, older install of the same session is already held.
        assert_eq!(
            b.offered(N2, Epoch(3), 3, Seq(2)),
            Offer::Held { seq: Seq(2) }
        );
        let out = b.step(
            now,
            Event::Received {
                from: N2,
                append: Append {
                    epoch: Epoch(3),
                    session: 3,
                    seq_prev: Seq(4),
                    epoch_prev: Epoch(3),
                    entries: vec![(Seq(5), 9)],
                },
            },
        );
        assert_eq!(
            out,
            vec![Command::Apply {
                epoch: Epoch(3),
                entries: vec![(Seq(5), 9)]
            }]
        );
    }
}
