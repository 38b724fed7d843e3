//! A seeded simulation of one function's replication *across failovers*: three nodes
//! whose primary and backups run the real engines (`Primary`, `Backup`) over a network
//! that drops, duplicates, delays and reorders messages, while nodes crash (losing what
//! they had not made durable: applied entries past their last fsync, and fsyncs in
//! flight) and come back, or stall (a CPU-starved process: everything it would handle
//! waits, its timers fire late) long enough to be taken for dead.
//!
//! The master is the control plane's own code: the cluster state is a `ClusterState`
//! changed only by `apply` of the commands that `plan_failover` (a node silent for
//! `DETECT_MS` is down) and `plan_repair` (a node heard again is up, and gets its
//! copies back as a catching-up backup) return, and by `BackupCaughtUp`, which a
//! primary reports as the node does. Each copy follows the state it learns (a little
//! late) with the node's own role decisions, `replication::follow::as_primary`.
//!
//! Checked throughout: no two releases of one position disagree; a new primary's log
//! holds every released entry (no acknowledged commit is lost); at the end, with the
//! network healed, everything appended in the last epoch is released and every backup's
//! log equals the primary's. A failing seed replays exactly:
//! `SIM_SEED=N cargo test --release --lib failover_sim` (`SIM_TRACE=1` to see it);
//! `SIM_SEEDS=5000` runs that many.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use understudy_control::{
    plan_failover, plan_repair, ClusterState, Command as Change, Health, Role as NodeRole,
};

use super::backup::{self, Backup};
use super::follow::{self, Follow};
use super::primary::{self, Primary};
use super::{Append, Epoch, NodeId, Reply, Seq};
use crate::sim_support::{seeds, Rng};

const NODES: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
const FUNCTION: &str = "f";
/// The master's failure detector: how long a node must be silent to be declared down.
const DETECT_MS: u64 = 20;
/// How long a primary waits before it sends a refused snapshot again (the node's
/// `CATCH_UP_RETRY`).
const CATCH_UP_RETRY_MS: u64 = 200;

enum Event {
    /// Over the network (lossy). `to` is the node; what it holds decides who handles it.
    Append {
        to: NodeId,
        from: NodeId,
        append: Append<u64>,
    },
    Reply {
        to: NodeId,
        from: NodeId,
        reply: Reply,
    },
    /// An fsync finished on `node` (lost if the node crashed since: `life`).
    Synced {
        node: NodeId,
        life: u32,
        seq: Seq,
    },
    /// A snapshot of the log of a primary's `session`, captured at `seq`, arrives at `node`.
    Snapshot {
        node: NodeId,
        from: NodeId,
        epoch: Epoch,
        session: u64,
        log: Vec<(Epoch, u64)>,
    },
    /// `node` installed a snapshot at `seq`; that primary session resumes sending.
    Installed {
        primary: NodeId,
        node: NodeId,
        epoch: Epoch,
        session: u64,
        seq: Seq,
    },
    /// `node` refused a snapshot (not a backup there yet): the primary of `epoch` tries
    /// again, as the node's catch-up task does.
    Refused {
        primary: NodeId,
        node: NodeId,
        epoch: Epoch,
    },
    /// The cluster state (as of change `version`) reaches `node`, which follows it (its
    /// reconcile pass). A node applies the control plane's log in order: it never goes
    /// back to an older state, but it may skip some, and it acts on what it knows.
    Config {
        node: NodeId,
        version: u64,
        config: Config,
    },
    Restart {
        node: NodeId,
    },
}

impl Event {
    /// The node that handles it.
    fn target(&self) -> NodeId {
        match self {
            Event::Append { to, .. } | Event::Reply { to, .. } => *to,
            Event::Synced { node, .. }
            | Event::Snapshot { node, .. }
            | Event::Config { node, .. }
            | Event::Restart { node } => *node,
            Event::Installed { primary, .. } | Event::Refused { primary, .. } => *primary,
        }
    }
}

enum Role {
    None,
    Backup(Backup),
    Primary(Primary<u64>),
}

struct Node {
    up: bool,
    /// Bumped at every crash: events of an earlier life are void.
    life: u32,
    /// The applied log: (epoch that appended it, payload), position `i` is `Seq(i + 1)`.
    log: Vec<(Epoch, u64)>,
    /// How much of `log` survives a crash.
    durable: usize,
    role: Role,
    /// Since when a new primary copy waits for the old engine to release what it had
    /// (at most `follow::DRAIN_WAIT`, as the node waits).
    draining_since: Option<u64>,
    /// Stalled (handles nothing) until then.
    slow_until: u64,
    /// The latest cluster state this node learned, and its version.
    view: Option<(u64, Config)>,
    /// Set by a restart: the first state learned after it says what the process started
    /// as (`booted` then holds the epoch it found itself primary of, if any).
    fresh: bool,
    booted: Option<Epoch>,
    /// Silent (crashed or stalled) since then: what the failure detector sees.
    silent_since: Option<u64>,
}

/// The function's assignment as the sim reads it.
#[derive(Clone, Debug)]
struct Config {
    epoch: Epoch,
    primary: NodeId,
    live: BTreeSet<NodeId>,
    catching_up: BTreeSet<NodeId>,
}

struct Sim {
    rng: Rng,
    start: Instant,
    now_ms: u64,
    queue: BTreeMap<(u64, u64), Event>,
    queued: u64,
    nodes: BTreeMap<NodeId, Node>,
    /// The master's state: changed only through `ClusterState::apply`.
    state: ClusterState,
    /// How many changes were applied to `state`.
    version: u64,
    /// Every release so far, by position: the payload released there.
    released: BTreeMap<u64, u64>,
    payloads: u64,
    drop_percent: u64,
    dup_percent: u64,
    delay_ms_max: u64,
    crashes: u32,
    stalls: u32,
    false_downs: u32,
    promotions: u32,
    snapshots: u32,
    /// The last primary session handed out.
    sessions: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut state = ClusterState::default();
        for n in NODES {
            let registered = state.apply(&Change::RegisterNode {
                id: n,
                peer_addr: format!("node-{n}"),
                http_addr: String::new(),
                role: NodeRole::Voter,
            });
            assert!(!registered.is_rejected(), "{registered:?}");
        }
        let deployed = state.apply(&Change::Deploy {
            name: FUNCTION.into(),
            digest: [0; 32],
            replicas: 3,
            calls: Default::default(),
        });
        assert!(!deployed.is_rejected(), "{deployed:?}");
        let nodes = NODES
            .iter()
            .map(|&n| {
                (
                    n,
                    Node {
                        up: true,
                        life: 0,
                        log: Vec::new(),
                        durable: 0,
                        role: Role::None,
                        draining_since: None,
                        slow_until: 0,
                        view: None,
                        fresh: false,
                        booted: None,
                        silent_since: None,
                    },
                )
            })
            .collect();
        let mut sim = Sim {
            rng: Rng(seed),
            start: Instant::now(),
            now_ms: 0,
            queue: BTreeMap::new(),
            queued: 0,
            nodes,
            state,
            version: 0,
            released: BTreeMap::new(),
            payloads: 0,
            drop_percent: 15,
            dup_percent: 5,
            delay_ms_max: 8,
            crashes: 0,
            stalls: 0,
            false_downs: 0,
            promotions: 0,
            snapshots: 0,
            sessions: 0,
        };
        sim.publish();
        sim
    }

    /// Every node learns the cluster state as it is now, each a little later.
    fn publish(&mut self) {
        let config = self.config();
        for n in NODES {
            let delay = 1 + self.rng.below(5);
            self.at(
                delay,
                Event::Config {
                    node: n,
                    version: self.version,
                    config: config.clone(),
                },
            );
        }
    }

    fn config(&self) -> Config {
        let a = &self.state.assignments[FUNCTION];
        Config {
            epoch: a.epoch,
            primary: a.primary,
            live: a.backups.iter().copied().collect(),
            catching_up: a.catching_up.iter().copied().collect(),
        }
    }

    fn now(&self) -> Instant {
        self.start + Duration::from_millis(self.now_ms)
    }

    /// With `SIM_TRACE` set, say what happens (for a failing seed).
    fn trace(&self, what: impl FnOnce() -> String) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("{:>6} ms  {}", self.now_ms, what());
        }
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.at_ms(self.now_ms + delay, event);
    }

    fn at_ms(&mut self, at: u64, event: Event) {
        self.queued += 1;
        self.queue.insert((at, self.queued), event);
    }

    /// Over the network: maybe lost, maybe twice, each copy after its own delay.
    fn send(&mut self, event: Event) {
        if self.rng.chance(self.drop_percent) {
            return;
        }
        if self.rng.chance(self.dup_percent) {
            let copy = match &event {
                Event::Append { to, from, append } => Event::Append {
                    to: *to,
                    from: *from,
                    append: append.clone(),
                },
                Event::Reply { to, from, reply } => Event::Reply {
                    to: *to,
                    from: *from,
                    reply: *reply,
                },
                _ => unreachable!("only messages are sent"),
            };
            let delay = self.rng.below(self.delay_ms_max + 1);
            self.at(delay, copy);
        }
        let delay = self.rng.below(self.delay_ms_max + 1);
        self.at(delay, event);
    }

    fn node(&mut self, n: NodeId) -> &mut Node {
        self.nodes.get_mut(&n).expect("a simulated node")
    }

    // ---- The master ----

    /// Apply `change` to the cluster state; every node follows the result a little later.
    fn propose(&mut self, change: Change) {
        let response = self.state.apply(&change);
        self.trace(|| format!("master: {change:?} -> {response:?}"));
        if response.is_rejected() {
            return;
        }
        if matches!(change, Change::Promote { .. }) {
            self.promotions += 1;
        }
        self.version += 1;
        self.publish();
    }

    /// The failure detector, as the master runs it: a node silent for `DETECT_MS` is
    /// declared down and its copies failed over; a node heard again is declared up and
    /// gets its copies back.
    fn detect(&mut self) {
        for n in NODES {
            let health = self.state.nodes[&n].health;
            let silent_since = self.nodes[&n].silent_since;
            match (health, silent_since) {
                (Health::Up, Some(since)) if self.now_ms - since >= DETECT_MS => {
                    if self.nodes[&n].up {
                        self.false_downs += 1;
                    }
                    self.trace(|| format!("master: {n} is down"));
                    self.propose(Change::SetHealth {
                        node: n,
                        health: Health::Down,
                    });
                    let plan = plan_failover(&self.state, n, |_, _| true);
                    for change in plan.commands {
                        self.propose(change);
                    }
                }
                (Health::Down, None) => {
                    self.trace(|| format!("master: {n} is up"));
                    self.propose(Change::SetHealth {
                        node: n,
                        health: Health::Up,
                    });
                    for change in plan_repair(&self.state).commands {
                        self.propose(change);
                    }
                }
                _ => {}
            }
        }
    }

    // ---- The nodes ----

    fn primary_commands(&mut self, n: NodeId, commands: Vec<primary::Command<u64>>) {
        for command in commands {
            match command {
                primary::Command::Send { to, append } => self.send(Event::Append {
                    to,
                    from: n,
                    append,
                }),
                primary::Command::Release { seq } => self.released_up_to(n, seq),
                primary::Command::Fenced { .. } => {}
                primary::Command::NeedSnapshot { to } => self.snapshot(n, to),
                // The node reports it on its next pass over the cluster state.
                primary::Command::PeerLive { .. } => {
                    if let Some((version, config)) = self.nodes[&n].view.clone() {
                        self.at(
                            1,
                            Event::Config {
                                node: n,
                                version,
                                config,
                            },
                        );
                    }
                }
            }
        }
    }

    /// The invariant: a release never contradicts an earlier one.
    fn released_up_to(&mut self, n: NodeId, seq: Seq) {
        self.trace(|| format!("{n} releases up to {seq}"));
        let log = &self.nodes[&n].log;
        assert!(
            log.len() as u64 >= seq.0,
            "{n} released {seq} beyond its log ({})",
            log.len()
        );
        for s in 1..=seq.0 {
            let payload = log[(s - 1) as usize].1;
            match self.released.get(&s) {
                Some(p) => assert_eq!(
                    *p, payload,
                    "{n} released #{s} = {payload}, but #{s} = {p} was released before"
                ),
                None => {
                    self.released.insert(s, payload);
                }
            }
        }
    }

    fn snapshot(&mut self, from: NodeId, to: NodeId) {
        let now = self.now();
        let Role::Primary(engine) = &mut self.nodes.get_mut(&from).expect("node").role else {
            return;
        };
        let seq = engine.seq_last();
        let epoch = engine.epoch();
        let session = engine.session();
        let commands = engine.step(now, primary::Event::Installing { node: to, seq });
        let log = self.nodes[&from].log[..seq.0 as usize].to_vec();
        self.snapshots += 1;
        self.primary_commands(from, commands);
        let delay = 1 + self.rng.below(20);
        self.at(
            delay,
            Event::Snapshot {
                node: to,
                from,
                epoch,
                session,
                log,
            },
        );
    }

    fn backup_commands(&mut self, n: NodeId, epoch: Epoch, commands: Vec<backup::Command<u64>>) {
        for command in commands {
            match command {
                backup::Command::Apply { entries } => {
                    let node = self.node(n);
                    for (seq, payload) in entries {
                        assert_eq!(seq.0, node.log.len() as u64 + 1, "{n} applies in order");
                        node.log.push((epoch, payload));
                    }
                    let (life, seq) = (node.life, Seq(node.log.len() as u64));
                    let delay = self.rng.below(4);
                    self.at(delay, Event::Synced { node: n, life, seq });
                }
                backup::Command::Reply { to, reply } => {
                    let len = self.nodes[&n].log.len();
                    self.trace(|| format!("{n} (len {len}) -> {to}: {reply:?}"));
                    self.send(Event::Reply { to, from: n, reply })
                }
                // The primary learns it from the `Diverged` reply and sends a snapshot.
                backup::Command::Resync { .. } => {}
            }
        }
    }

    /// `n` follows the cluster state (its reconcile pass). Returns false when it must
    /// come back later (a new primary copy waiting for the old engine to drain).
    fn learn(&mut self, n: NodeId, version: u64, config: &Config) -> bool {
        let now = self.now();
        let node = self.node(n);
        if !node.up || node.view.as_ref().is_some_and(|(v, _)| *v > version) {
            return true;
        }
        node.view = Some((version, config.clone()));
        if node.fresh {
            node.fresh = false;
            node.booted = (config.primary == n).then_some(config.epoch);
        }
        let restarted = node.booted == Some(config.epoch);
        if config.primary == n {
            let backups: Vec<NodeId> = config.live.iter().copied().collect();
            let catching_up: Vec<NodeId> = config.catching_up.iter().copied().collect();
            let assigned = follow::Assigned {
                epoch: config.epoch,
                backups: &backups,
                catching_up: &catching_up,
            };
            let plan = match &self.nodes[&n].role {
                Role::Primary(engine) => follow::as_primary(
                    Some(follow::Held {
                        engine,
                        serving: !engine.is_fenced(),
                    }),
                    false,
                    restarted,
                    assigned,
                ),
                _ => follow::as_primary::<u64>(None, false, restarted, assigned),
            };
            match plan {
                Follow::Wait => {}
                Follow::Renew { epoch } => self.propose(Change::Renew {
                    function: FUNCTION.into(),
                    primary: n,
                    expected_epoch: epoch,
                }),
                Follow::Adjust {
                    catch_up,
                    caught_up,
                    remove,
                } => {
                    for c in catch_up {
                        self.snapshot(n, c);
                    }
                    for node in caught_up {
                        self.propose(Change::BackupCaughtUp {
                            function: FUNCTION.into(),
                            node,
                            expected_epoch: config.epoch,
                        });
                    }
                    for peer in remove {
                        let Role::Primary(engine) = &mut self.node(n).role else {
                            unreachable!("adjusts only an engine it holds")
                        };
                        let commands = engine.step(now, primary::Event::PeerRemoved { node: peer });
                        self.primary_commands(n, commands);
                    }
                }
                Follow::Start {
                    epoch,
                    remove_now,
                    drain_old,
                    backups,
                    catching_up,
                } => {
                    let now_ms = self.now_ms;
                    if let Role::Primary(engine) = &mut self.node(n).role {
                        let mut commands = Vec::new();
                        for peer in remove_now {
                            commands.extend(
                                engine.step(now, primary::Event::PeerRemoved { node: peer }),
                            );
                        }
                        self.primary_commands(n, commands);
                    }
                    if drain_old {
                        let node = self.node(n);
                        let since = *node.draining_since.get_or_insert(now_ms);
                        let busy = match &node.role {
                            Role::Primary(engine) => follow::draining(follow::Held {
                                engine,
                                serving: !engine.is_fenced(),
                            }),
                            _ => false,
                        };
                        if busy && now_ms - since < follow::DRAIN_WAIT.as_millis() as u64 {
                            return false;
                        }
                    }
                    self.node(n).draining_since = None;
                    let log = &self.nodes[&n].log;
                    let seq = Seq(log.len() as u64);
                    let epoch_last = log.last().map_or(Epoch(0), |e| e.0);
                    for (s, payload) in &self.released {
                        let held = self.nodes[&n].log.get((*s - 1) as usize).map(|e| e.1);
                        assert_eq!(
                            held,
                            Some(*payload),
                            "{n}, primary of {epoch}, lacks released #{s}: an acknowledged commit lost"
                        );
                    }
                    self.trace(|| {
                        format!("{n} starts as primary of {epoch} at {seq} over {backups:?}")
                    });
                    self.sessions += 1;
                    let (engine, commands) =
                        Primary::new(now, epoch, self.sessions, seq, epoch_last, &backups);
                    self.node(n).role = Role::Primary(engine);
                    self.primary_commands(n, commands);
                    for c in catching_up {
                        self.snapshot(n, c);
                    }
                }
            }
        } else if config.live.contains(&n) || config.catching_up.contains(&n) {
            let node = self.node(n);
            match &mut node.role {
                Role::Backup(b) => {
                    b.step::<u64>(backup::Event::EpochCommitted {
                        epoch: config.epoch,
                    });
                }
                _ => {
                    let seq = Seq(node.log.len() as u64);
                    let epoch_last = node.log.last().map_or(Epoch(0), |e| e.0);
                    node.role = Role::Backup(Backup::new(config.epoch, seq, epoch_last));
                }
            }
        } else {
            self.node(n).role = Role::None;
        }
        true
    }

    fn handle(&mut self, event: Event) {
        let now = self.now();
        match event {
            Event::Append { to, from, append } => {
                if !self.nodes[&to].up {
                    return;
                }
                let epoch = append.epoch;
                // A primary (or a node outside the configuration) that hears from another
                // primary is not its backup: the sender learns nothing from its silence,
                // as over the real network.
                if let Role::Backup(b) = &mut self.node(to).role {
                    let commands = b.step(backup::Event::Received { from, append });
                    self.backup_commands(to, epoch, commands);
                }
            }
            Event::Reply { to, from, reply } => {
                if !self.nodes[&to].up {
                    return;
                }
                if let Role::Primary(engine) = &mut self.node(to).role {
                    let commands = engine.step(now, primary::Event::Replied { from, reply });
                    self.primary_commands(to, commands);
                }
            }
            Event::Synced { node: n, life, seq } => {
                let node = self.node(n);
                if !node.up || node.life != life {
                    return;
                }
                let seq = Seq(seq.0.min(node.log.len() as u64));
                node.durable = node.durable.max(seq.0 as usize);
                match &mut node.role {
                    Role::Backup(b) => {
                        let epoch = b.epoch();
                        let commands = b.step(backup::Event::Durable { seq });
                        self.backup_commands(n, epoch, commands);
                    }
                    Role::Primary(engine) => {
                        let commands = engine.step(now, primary::Event::LocalDurable { seq });
                        self.primary_commands(n, commands);
                    }
                    Role::None => {}
                }
            }
            Event::Snapshot {
                node: n,
                from,
                epoch,
                session,
                log,
            } => {
                let node = self.node(n);
                if !node.up {
                    return;
                }
                let seq = Seq(log.len() as u64);
                let epoch_last = log.last().map_or(Epoch(0), |e| e.0);
                let mut held = seq;
                let install = match &mut node.role {
                    Role::Backup(b) if epoch < b.epoch() => return,
                    Role::Backup(b) if b.snapshot_is_behind(from, epoch, session, seq) => {
                        // As the runtime answers: no more than is durable here.
                        held = seq.min(b.seq_durable());
                        false
                    }
                    Role::Backup(b) => {
                        b.install(from, epoch, session, seq, epoch_last);
                        true
                    }
                    // As the runtime: not (yet) a backup here; the primary tries again.
                    Role::None | Role::Primary(_) => {
                        self.at(
                            CATCH_UP_RETRY_MS,
                            Event::Refused {
                                primary: from,
                                node: n,
                                epoch,
                            },
                        );
                        return;
                    }
                };
                let len = node.log.len();
                self.trace(|| format!("{n} (len {len}) gets a snapshot at {seq} from {from} in {epoch}: installed {install}"));
                let node = self.node(n);
                if install {
                    // Installed as one durable record.
                    node.log = log;
                    node.durable = node.log.len();
                }
                let delay = self.rng.below(self.delay_ms_max + 1);
                self.at(
                    delay,
                    Event::Installed {
                        primary: from,
                        node: n,
                        epoch,
                        session,
                        seq: held,
                    },
                );
            }
            Event::Installed {
                primary: p,
                node: n,
                epoch,
                session,
                seq,
            } => {
                if !self.nodes[&p].up {
                    return;
                }
                if let Role::Primary(engine) = &mut self.node(p).role {
                    if engine.epoch() == epoch && engine.session() == session {
                        self.trace(|| format!("{p} hears {n} installed {seq} in {epoch}"));
                        let Role::Primary(engine) = &mut self.node(p).role else {
                            return;
                        };
                        let commands = engine.step(now, primary::Event::Resynced { node: n, seq });
                        self.primary_commands(p, commands);
                    }
                }
            }
            Event::Refused {
                primary: p,
                node: n,
                epoch,
            } => {
                let current = self.nodes[&p].up
                    && matches!(&self.nodes[&p].role, Role::Primary(e) if e.epoch() == epoch && !e.is_fenced());
                if current {
                    self.snapshot(p, n);
                }
            }
            Event::Config {
                node: n,
                version,
                config,
            } => {
                if !self.learn(n, version, &config) {
                    self.at(
                        1,
                        Event::Config {
                            node: n,
                            version,
                            config,
                        },
                    );
                }
            }
            Event::Restart { node: n } => {
                let node = self.node(n);
                node.up = true;
                node.role = Role::None;
                node.view = None;
                node.fresh = true;
                node.booted = None;
                node.silent_since = None;
                self.trace(|| format!("restart {n}"));
                // It reads the cluster state its peers send it, as it is by then.
                let delay = 1 + self.rng.below(5);
                let config = self.config();
                self.at(
                    delay,
                    Event::Config {
                        node: n,
                        version: self.version,
                        config,
                    },
                );
            }
        }
    }

    fn crash(&mut self, n: NodeId) {
        self.crashes += 1;
        self.trace(|| format!("crash {n}"));
        let now_ms = self.now_ms;
        let node = self.node(n);
        node.up = false;
        node.life += 1;
        node.silent_since = Some(now_ms);
        node.draining_since = None;
        // What was not fsynced is gone.
        let durable = node.durable;
        node.log.truncate(durable);
        node.role = Role::None;
        // Mostly back after the detector acted; sometimes before (a node that restarts
        // at once, while the master was slow to judge it).
        let down_for = if self.rng.chance(20) {
            1 + self.rng.below(DETECT_MS - 1)
        } else {
            DETECT_MS + 5 + self.rng.below(200)
        };
        self.at(down_for, Event::Restart { node: n });
    }

    /// `n` stops handling anything for `ms` (a CPU-starved process).
    fn stall(&mut self, n: NodeId, ms: u64) {
        self.stalls += 1;
        self.trace(|| format!("stall {n} for {ms} ms"));
        let now_ms = self.now_ms;
        let node = self.node(n);
        node.slow_until = now_ms + ms;
        node.silent_since.get_or_insert(now_ms);
    }

    /// Whether the configuration is whole: a primary with two live backups, every node
    /// up, in its role, and heard from.
    fn whole(&self) -> bool {
        let config = self.config();
        config.live.len() == 2
            && config.catching_up.is_empty()
            && self
                .nodes
                .values()
                .all(|n| n.up && n.silent_since.is_none())
            && self.state.nodes.values().all(|n| n.health == Health::Up)
            && matches!(&self.nodes[&config.primary].role, Role::Primary(e) if e.epoch() == config.epoch)
    }

    /// Run for `ms`, appending every `append_every` ms; each ms, with `fault_per_mille`
    /// chance (when the configuration is whole), crash or stall a random node.
    fn run(&mut self, ms: u64, append_every: u64, fault_per_mille: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            for n in NODES {
                let node = &self.nodes[&n];
                if node.up && node.slow_until <= self.now_ms && node.silent_since.is_some() {
                    self.node(n).silent_since = None;
                }
            }
            if self.now_ms.is_multiple_of(append_every) {
                self.append();
            }
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.now_ms {
                    break;
                }
                let event = entry.remove();
                // A stalled node handles it when it wakes, in the order it arrived.
                let slow_until = self.nodes[&event.target()].slow_until;
                if slow_until > self.now_ms {
                    self.at_ms(slow_until, event);
                    continue;
                }
                self.handle(event);
            }
            if self.now_ms.is_multiple_of(5) {
                let now = self.now();
                for n in NODES {
                    if self.nodes[&n].slow_until > self.now_ms {
                        continue;
                    }
                    if let Role::Primary(engine) = &mut self.node(n).role {
                        let commands = engine.step(now, primary::Event::Tick);
                        self.primary_commands(n, commands);
                    }
                }
            }
            self.detect();
            if fault_per_mille > 0 && self.whole() && self.rng.below(1000) < fault_per_mille {
                let victim = NODES[self.rng.below(3) as usize];
                if self.rng.chance(50) {
                    self.crash(victim);
                } else {
                    // Mostly shorter than the detector, sometimes far longer.
                    let ms = if self.rng.chance(60) {
                        1 + self.rng.below(DETECT_MS)
                    } else {
                        DETECT_MS + self.rng.below(150)
                    };
                    self.stall(victim, ms);
                }
            }
            self.now_ms += 1;
        }
    }

    /// A client's commit on the primary, if it serves in the current configuration.
    fn append(&mut self) {
        let config = self.config();
        let p = config.primary;
        let now = self.now();
        let serving = {
            let node = &self.nodes[&p];
            node.up
                && node.slow_until <= self.now_ms
                && matches!(&node.role, Role::Primary(e) if !e.is_fenced() && e.epoch() == config.epoch)
        };
        if !serving {
            return;
        }
        self.payloads += 1;
        let payload = self.payloads;
        let node = self.node(p);
        node.log.push((config.epoch, payload));
        let seq = Seq(node.log.len() as u64);
        let life = node.life;
        let Role::Primary(engine) = &mut node.role else {
            return;
        };
        let commands = engine.step(now, primary::Event::Appended { seq, payload });
        self.primary_commands(p, commands);
        let delay = self.rng.below(4);
        self.at(delay, Event::Synced { node: p, life, seq });
    }

    /// After the faults: everything appended in the current epoch is released and every
    /// backup's log is the primary's.
    fn check_settled(&self) {
        let config = self.config();
        assert!(self.whole(), "the configuration is whole again: {config:?}");
        let p = &self.nodes[&config.primary];
        let Role::Primary(engine) = &p.role else {
            panic!("{} is not primary", config.primary)
        };
        assert_eq!(
            engine.seq_released(),
            engine.seq_last(),
            "everything is released once the network heals"
        );
        for (s, payload) in &self.released {
            assert_eq!(
                p.log.get((*s - 1) as usize).map(|e| e.1),
                Some(*payload),
                "released #{s} is kept"
            );
        }
        for b in &config.live {
            let log: Vec<u64> = self.nodes[b].log.iter().map(|e| e.1).collect();
            let primary: Vec<u64> = p.log.iter().map(|e| e.1).collect();
            assert_eq!(log, primary, "backup {b} holds the primary's log");
        }
    }
}

#[test]
fn no_acknowledged_entry_is_lost_across_crashes_stalls_and_failovers() {
    #[derive(Default)]
    struct Totals {
        crashes: u32,
        stalls: u32,
        false_downs: u32,
        promotions: u32,
        snapshots: u32,
        released: usize,
    }
    let mut totals = Totals::default();
    for seed in seeds() {
        let result = std::panic::catch_unwind(|| {
            let mut sim = Sim::new(seed);
            sim.run(12_000, 2, 5);
            // Heal: no more faults, a clean network, time to settle.
            sim.drop_percent = 0;
            sim.dup_percent = 0;
            sim.delay_ms_max = 1;
            sim.run(3_000, 2, 0);
            sim.run(2_000, u64::MAX, 0);
            sim.check_settled();
            sim
        });
        match result {
            Ok(sim) => {
                totals.crashes += sim.crashes;
                totals.stalls += sim.stalls;
                totals.false_downs += sim.false_downs;
                totals.promotions += sim.promotions;
                totals.snapshots += sim.snapshots;
                totals.released += sim.released.len();
            }
            Err(_) => panic!("failover simulation failed with SIM_SEED={seed}"),
        }
    }
    println!(
        "failover simulation: {} crashes, {} stalls ({} nodes declared down while alive), {} promotions, {} snapshots, {} entries released and checked",
        totals.crashes,
        totals.stalls,
        totals.false_downs,
        totals.promotions,
        totals.snapshots,
        totals.released
    );
    assert!(
        totals.crashes > 0 && totals.promotions > 0 && totals.false_downs > 0,
        "the simulation crashed nodes, took stalled ones for dead and promoted backups"
    );
}
