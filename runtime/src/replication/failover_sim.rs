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
//! late) with the node's own replica machine (`replication::replica`): every copy's role,
//! engine and role changes (the lock, the drain of an old engine, the snapshot offers)
//! are the node's code, and the simulation only carries out its commands.
//!
//! Leases are the node's (`cluster::lease`): every node pings the master every
//! `HEARTBEAT_MS` over the same lossy network; the master's failure detector declares a
//! node down once no ping has arrived for `DETECT_MS` on the master's clock, and answers
//! the pings of nodes it holds up with a lease that runs `LEASE_MS` from when the ping
//! was sent, on the node's clock, once the node knows the cluster state the master knew.
//! Every clock runs at its own rate, within `DRIFT` of real time. A node appends and
//! serves reads as primary only while it holds a lease and its view names it primary.
//!
//! The master stalls too, and its failure detector adapts to local health as the node's
//! does (`cluster::health`, `understudy_control::lateness`): a node reports its score
//! in every ping (a stall raises it), the master scores its own stalls, a node's timeout
//! is `DETECT_MS` times 1 + the higher of the two, and a master that just woke judges
//! nobody that round. A stalled master reads the pings that queued for it a millisecond
//! after its timers fire, as a real process may. Leases are not scaled. Run without the
//! adaptation (`adaptive: false`) the same seeds count the false verdicts it prevents.
//!
//! Checked throughout: no two releases of one position disagree; a new primary's log
//! holds every released entry (no acknowledged commit is lost); a read served by a
//! primary holds every entry released anywhere before it (no stale read from a deposed
//! primary that does not know it yet); at the end, with the network healed, everything
//! appended in the last epoch is released and every backup's log equals the primary's. A failing seed replays exactly:
//! `SIM_SEED=N cargo test --release --lib failover_sim` (`SIM_TRACE=1` to see it);
//! `SIM_SEEDS=5000` runs that many.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use understudy_control::lateness::{self, LocalHealth};
use understudy_control::{
    plan_failover, plan_repair, ClusterState, Command as Change, Health, Role as NodeRole,
};

use super::replica::{self, Command, Offer, Position, Replica};
use super::{Append, Epoch, NodeId, Reply, Seq};
use crate::sim_support::{seeds, Rng};

const NODES: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
const FUNCTION: &str = "f";
/// The master's failure detector: how long no ping from a node may arrive before it is
/// declared down (the node's `failure_timeout_ms`), on the master's clock.
const DETECT_MS: u64 = 20;
/// How often a node pings the master (`heartbeat_ms`).
const HEARTBEAT_MS: u64 = 5;
/// How long a lease runs from the ping that asked for it, on the node's clock (the
/// node's: three quarters of the failure timeout).
const LEASE_MS: f64 = DETECT_MS as f64 * 3.0 / 4.0;
/// How far any clock's rate may be from real time. A lease of three quarters of the
/// failure timeout is safe up to (1 - 3/4) / (1 + 3/4) = 1/7 (about 14%).
const DRIFT: f64 = 0.10;
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
    /// `node`, holding its function's lock, looks again at whether its old engine
    /// drained (the machine said `Drain`).
    Relock {
        node: NodeId,
        life: u32,
    },
    /// `from` asks the master for a lease, at `sent` on its own clock (in its life
    /// `life`), reporting its local health score.
    Ping {
        from: NodeId,
        life: u32,
        sent: f64,
        lateness: u8,
    },
    /// The master grants the lease asked for at `sent`, to count once `to` knows the
    /// cluster state as of change `version`.
    Pong {
        to: NodeId,
        life: u32,
        sent: f64,
        version: u64,
    },
}

impl Event {
    /// The node that handles it (none: the master, which does not stall).
    fn target(&self) -> Option<NodeId> {
        match self {
            Event::Append { to, .. } | Event::Reply { to, .. } | Event::Pong { to, .. } => {
                Some(*to)
            }
            Event::Synced { node, .. }
            | Event::Snapshot { node, .. }
            | Event::Config { node, .. }
            | Event::Restart { node }
            | Event::Relock { node, .. } => Some(*node),
            Event::Installed { primary, .. } | Event::Refused { primary, .. } => Some(*primary),
            Event::Ping { .. } => None,
        }
    }
}

struct Node {
    up: bool,
    /// Bumped at every crash: events of an earlier life are void.
    life: u32,
    /// The applied log: (epoch that appended it, payload), position `i` is `Seq(i + 1)`.
    log: Vec<(Epoch, u64)>,
    /// How much of `log` survives a crash.
    durable: usize,
    /// Its copy of the function: the node's own replica machine.
    replica: Replica<u64>,
    /// Stalled (handles nothing) until then.
    slow_until: u64,
    /// The latest cluster state this node learned, and its version.
    view: Option<(u64, Config)>,
    /// Set by a restart: the first state learned after it says what the process started
    /// as (`booted` then holds the epoch it found itself primary of, if any).
    fresh: bool,
    booted: Option<Epoch>,
    /// Crashed or stalled since then (the faults' own bookkeeping: the master knows
    /// only the pings it gets).
    silent_since: Option<u64>,
    /// Its clock runs at this many times real time (within `DRIFT`).
    rate: f64,
    /// The lease it holds: until then on its own clock, once it knows the cluster state
    /// of that version.
    lease: Option<(f64, u64)>,
    /// When it pings the master next (real ms; a stalled node pings when it wakes).
    next_ping: u64,
    /// Its local health: a stall raises it (see `understudy_control::lateness`).
    health: LocalHealth,
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
    /// The epoch each position was first released in.
    released_in: BTreeMap<u64, Epoch>,
    payloads: u64,
    drop_percent: u64,
    dup_percent: u64,
    delay_ms_max: u64,
    crashes: u32,
    stalls: u32,
    false_downs: u32,
    /// Stalls of the master.
    master_stalls: u32,
    /// Whether the master's detector adapts to local health (as the node's does).
    adaptive: bool,
    /// The master handles nothing until then; its own local health; whether it judged
    /// in its last round; each node's score from its last ping.
    master_slow_until: u64,
    master_health: LocalHealth,
    master_woke: bool,
    reported: BTreeMap<NodeId, u8>,
    promotions: u32,
    snapshots: u32,
    /// The last primary session handed out.
    sessions: u64,
    /// The master's clock rate, when the last ping of each node arrived by that clock,
    /// and when each node was last declared down.
    master_rate: f64,
    pinged: BTreeMap<NodeId, f64>,
    downed: BTreeMap<NodeId, f64>,
    /// Each time the highest released position grew: when (real ms), and to what.
    released_high: Vec<(u64, u64)>,
    reads: u32,
}

/// A clock rate within `DRIFT` of real time.
fn drifting(rng: &mut Rng) -> f64 {
    1.0 + (rng.below(2001) as f64 - 1000.0) / 1000.0 * DRIFT
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
        let mut rng = Rng(seed);
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
                        replica: Replica::new(n),
                        slow_until: 0,
                        view: None,
                        fresh: false,
                        booted: None,
                        silent_since: None,
                        rate: drifting(&mut rng),
                        lease: None,
                        next_ping: 0,
                        health: LocalHealth::new(Duration::from_millis(DETECT_MS)),
                    },
                )
            })
            .collect();
        let master_rate = drifting(&mut rng);
        let mut sim = Sim {
            rng,
            start: Instant::now(),
            now_ms: 0,
            queue: BTreeMap::new(),
            queued: 0,
            nodes,
            state,
            version: 0,
            released: BTreeMap::new(),
            released_in: BTreeMap::new(),
            payloads: 0,
            drop_percent: 15,
            dup_percent: 5,
            delay_ms_max: 8,
            crashes: 0,
            stalls: 0,
            false_downs: 0,
            master_stalls: 0,
            adaptive: true,
            master_slow_until: 0,
            master_health: LocalHealth::new(Duration::from_millis(DETECT_MS)),
            master_woke: false,
            reported: BTreeMap::new(),
            promotions: 0,
            snapshots: 0,
            sessions: 0,
            master_rate,
            pinged: BTreeMap::new(),
            downed: BTreeMap::new(),
            released_high: Vec::new(),
            reads: 0,
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
                Event::Ping {
                    from,
                    life,
                    sent,
                    lateness,
                } => Event::Ping {
                    from: *from,
                    life: *life,
                    sent: *sent,
                    lateness: *lateness,
                },
                Event::Pong {
                    to,
                    life,
                    sent,
                    version,
                } => Event::Pong {
                    to: *to,
                    life: *life,
                    sent: *sent,
                    version: *version,
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

    /// The failure detector, as the master runs it: a node whose last ping arrived
    /// `DETECT_MS` ago (on the master's clock) is declared down and its copies failed
    /// over; a node heard again is declared up and gets its copies back.
    fn detect(&mut self) {
        if self.master_slow_until > self.now_ms {
            return;
        }
        let now = self.now();
        if std::mem::take(&mut self.master_woke) && self.adaptive {
            // Its own stall: read what queued up before judging anyone.
            return;
        }
        self.master_health.observe(now, Duration::ZERO);
        let master_now = self.now_ms as f64 * self.master_rate;
        for n in NODES {
            let health = self.state.nodes[&n].health;
            let heard = self.pinged.get(&n).copied().unwrap_or(0.0);
            let timeout = match self.adaptive {
                true => {
                    let score = self
                        .master_health
                        .score()
                        .max(self.reported.get(&n).copied().unwrap_or(0));
                    lateness::scaled(Duration::from_millis(DETECT_MS), score).as_millis() as f64
                }
                false => DETECT_MS as f64,
            };
            match health {
                Health::Up if master_now - heard >= timeout => {
                    if self.nodes[&n].up {
                        self.false_downs += 1;
                    }
                    self.trace(|| format!("master: {n} is down"));
                    self.downed.insert(n, master_now);
                    self.propose(Change::SetHealth {
                        node: n,
                        health: Health::Down,
                    });
                    let plan = plan_failover(&self.state, n, |_, _| true);
                    for change in plan.commands {
                        self.propose(change);
                    }
                }
                Health::Down if heard > self.downed.get(&n).copied().unwrap_or(0.0) => {
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

    /// `n`'s clock now.
    fn clock(&self, n: NodeId) -> f64 {
        self.now_ms as f64 * self.nodes[&n].rate
    }

    /// Whether `n` holds a lease now, and knows the state it was granted in.
    fn lease_ok(&self, n: NodeId) -> bool {
        let node = &self.nodes[&n];
        let known = node.view.as_ref().map_or(0, |(v, _)| *v);
        node.lease
            .is_some_and(|(until, version)| self.clock(n) < until && known >= version)
    }

    /// Whether `n` may answer as the primary of the current view: it holds a serving
    /// engine of the epoch its view names it primary of, and a lease (`check_lease`).
    fn serves(&self, n: NodeId) -> bool {
        let node = &self.nodes[&n];
        node.up
            && node.slow_until <= self.now_ms
            && matches!(
                (node.replica.serving(), &node.view),
                (Some(e), Some((_, view))) if view.primary == n && view.epoch == e.epoch()
            )
            && self.lease_ok(n)
    }

    /// A client's read at a random node, served if that node serves as primary: it
    /// holds every entry released anywhere so far (the node answers once its position
    /// is released; it may hold more).
    fn read(&mut self) {
        let n = NODES[self.rng.below(3) as usize];
        if !self.serves(n) {
            return;
        }
        self.reads += 1;
        let high = self.released_high.last().map_or(0, |(_, s)| *s);
        let log = &self.nodes[&n].log;
        assert!(
            log.len() as u64 >= high,
            "{n} served a read at {} while #{high} had been released elsewhere: a stale read",
            log.len()
        );
        // The highest released entry and one other (checking them all at every read
        // would make a run quadratic in its length).
        if high == 0 {
            return;
        }
        let other = 1 + self.rng.below(high);
        for s in [high, other] {
            assert_eq!(
                log[(s - 1) as usize].1,
                self.released[&s],
                "{n} served a read whose #{s} is not the released one: a stale read"
            );
        }
    }

    // ---- The nodes ----

    /// Carry out what `n`'s replica machine commands, as the node does.
    fn commands(&mut self, n: NodeId, commands: Vec<Command<u64>>) {
        for command in commands {
            match command {
                // The simulated node takes its function's lock at once: no transaction
                // holds it between two events.
                Command::Lock => self.locked(n),
                Command::Drain => {
                    let life = self.nodes[&n].life;
                    self.at(1, Event::Relock { node: n, life });
                }
                Command::Unlock => {}
                Command::Renew { epoch } => self.propose(Change::Renew {
                    function: FUNCTION.into(),
                    primary: n,
                    expected_epoch: epoch,
                }),
                Command::ReportCaughtUp { node, epoch } => self.propose(Change::BackupCaughtUp {
                    function: FUNCTION.into(),
                    node,
                    expected_epoch: epoch,
                }),
                // The node reports it on its next pass over the cluster state.
                Command::CaughtUp { .. } => {
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
                Command::Serve {
                    epoch,
                    seq,
                    backups,
                    ..
                } => {
                    // A primary of `epoch` holds what was released before it; a stale
                    // view (a node that learns of its promotion late, after a later
                    // epoch released more) lacks the later releases, and its engine
                    // releases nothing until its backups follow it (they refuse an
                    // older epoch).
                    let earlier = self
                        .released
                        .iter()
                        .filter(|(s, _)| self.released_in[s] < epoch);
                    for (s, payload) in earlier {
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
                }
                Command::DrainGaveUp { epoch, .. } => {
                    self.trace(|| format!("{n} gave up draining its engine of {epoch}"));
                }
                // Nobody waits on a simulated primary's answers.
                Command::Retire { .. } | Command::Fenced { .. } => {}
                Command::Release { seq, .. } => self.released_up_to(n, seq),
                Command::Send { to, append } => self.send(Event::Append {
                    to,
                    from: n,
                    append,
                }),
                Command::CatchUp { session, to } => {
                    if self.nodes[&n]
                        .replica
                        .primary()
                        .is_some_and(|e| e.session() == session)
                    {
                        self.snapshot(n, to);
                    }
                }
                Command::Follow { epoch, seq } => {
                    self.trace(|| format!("{n} follows as a backup of {epoch} at {seq}"));
                }
                Command::Apply { epoch, entries } => {
                    let node = self.node(n);
                    for (seq, payload) in entries {
                        assert_eq!(seq.0, node.log.len() as u64 + 1, "{n} applies in order");
                        node.log.push((epoch, payload));
                    }
                    let (life, seq) = (node.life, Seq(node.log.len() as u64));
                    let delay = self.rng.below(4);
                    self.at(delay, Event::Synced { node: n, life, seq });
                }
                Command::Reply { to, reply } => {
                    let len = self.nodes[&n].log.len();
                    self.trace(|| format!("{n} (len {len}) -> {to}: {reply:?}"));
                    self.send(Event::Reply { to, from: n, reply })
                }
                // The primary learns it from the `Diverged` reply and sends a snapshot.
                Command::Resync { .. } => {}
            }
        }
    }

    /// Step `n`'s machine and carry out its commands.
    fn step(&mut self, n: NodeId, event: replica::Event<u64>) {
        let now = self.now();
        let commands = self.node(n).replica.step(now, event);
        self.commands(n, commands);
    }

    /// `n` holds its function's lock.
    fn locked(&mut self, n: NodeId) {
        self.sessions += 1;
        let session = self.sessions;
        let log = self.position(n);
        self.step(n, replica::Event::Locked { log, session });
    }

    fn position(&self, n: NodeId) -> Position {
        let log = &self.nodes[&n].log;
        Position {
            seq: Seq(log.len() as u64),
            epoch_last: log.last().map_or(Epoch(0), |e| e.0),
        }
    }

    /// The invariant: a release never contradicts an earlier one.
    fn released_up_to(&mut self, n: NodeId, seq: Seq) {
        self.trace(|| format!("{n} releases up to {seq}"));
        let epoch = self.nodes[&n]
            .replica
            .primary()
            .expect("only a primary releases")
            .epoch();
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
                    self.released_in.insert(s, epoch);
                    self.released_high.push((self.now_ms, s));
                }
            }
        }
    }

    fn snapshot(&mut self, from: NodeId, to: NodeId) {
        let Some(engine) = self.nodes[&from].replica.primary() else {
            return;
        };
        let (seq, epoch, session) = (engine.seq_last(), engine.epoch(), engine.session());
        self.step(
            from,
            replica::Event::Installing {
                session,
                node: to,
                seq,
            },
        );
        let log = self.nodes[&from].log[..seq.0 as usize].to_vec();
        self.snapshots += 1;
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

    /// `n` did not take `primary`'s snapshot of `epoch`: the primary sends it again after
    /// `CATCH_UP_RETRY_MS`, as the runtime's catch-up retries.
    fn refuse_snapshot(&mut self, primary: NodeId, n: NodeId, epoch: Epoch) {
        self.at(
            CATCH_UP_RETRY_MS,
            Event::Refused {
                primary,
                node: n,
                epoch,
            },
        );
    }

    /// `n` follows the cluster state (its reconcile pass).
    fn learn(&mut self, n: NodeId, version: u64, config: &Config) {
        let node = self.node(n);
        if !node.up || node.view.as_ref().is_some_and(|(v, _)| *v > version) {
            return;
        }
        node.view = Some((version, config.clone()));
        if node.fresh {
            node.fresh = false;
            node.booted = (config.primary == n).then_some(config.epoch);
        }
        let restarted = node.booted == Some(config.epoch);
        let assignment = replica::Assignment {
            epoch: config.epoch,
            primary: config.primary,
            backups: config.live.iter().copied().collect(),
            catching_up: config.catching_up.iter().copied().collect(),
        };
        let log = self.position(n);
        self.step(
            n,
            replica::Event::Assigned {
                assignment,
                log,
                restarted,
            },
        );
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Append { to, from, append } => {
                if self.nodes[&to].up {
                    self.step(to, replica::Event::Received { from, append });
                }
            }
            Event::Reply { to, from, reply } => {
                if self.nodes[&to].up {
                    self.step(to, replica::Event::Replied { from, reply });
                }
            }
            Event::Synced { node: n, life, seq } => {
                let node = self.node(n);
                if !node.up || node.life != life {
                    return;
                }
                let seq = Seq(seq.0.min(node.log.len() as u64));
                node.durable = node.durable.max(seq.0 as usize);
                self.step(n, replica::Event::Durable { seq });
            }
            Event::Snapshot {
                node: n,
                from,
                epoch,
                session,
                log,
            } => {
                if !self.nodes[&n].up {
                    // The transfer fails (the node is down); the primary tries again, as
                    // the runtime's catch-up does after any failure.
                    self.refuse_snapshot(from, n, epoch);
                    return;
                }
                let seq = Seq(log.len() as u64);
                let offer = self.nodes[&n].replica.offered(from, epoch, session, seq);
                let len = self.nodes[&n].log.len();
                self.trace(|| {
                    format!("{n} (len {len}) gets a snapshot at {seq} from {from} in {epoch}: {offer:?}")
                });
                let held = match offer {
                    // As the runtime: not (yet) a backup here; the primary tries again.
                    Offer::Refuse => {
                        self.refuse_snapshot(from, n, epoch);
                        return;
                    }
                    // The runtime's catch-up hands the answer to the primary's copy.
                    Offer::Stale { epoch } => {
                        self.send(Event::Reply {
                            to: from,
                            from: n,
                            reply: Reply::Stale { epoch },
                        });
                        return;
                    }
                    Offer::Held { seq } => seq,
                    Offer::Install => {
                        // Installed as one durable record.
                        let node = self.node(n);
                        node.log = log;
                        node.durable = node.log.len();
                        let position = self.position(n);
                        self.node(n)
                            .replica
                            .installed(from, epoch, session, position);
                        seq
                    }
                };
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
                self.trace(|| format!("{p} hears {n} installed {seq} in {epoch}"));
                self.step(
                    p,
                    replica::Event::Resynced {
                        session,
                        node: n,
                        seq,
                    },
                );
            }
            Event::Refused {
                primary: p,
                node: n,
                epoch,
            } => {
                let current = self.nodes[&p].up
                    && self.nodes[&p]
                        .replica
                        .serving()
                        .is_some_and(|e| e.epoch() == epoch);
                if current {
                    self.snapshot(p, n);
                }
            }
            Event::Relock { node: n, life } => {
                let node = &self.nodes[&n];
                if node.up && node.life == life {
                    self.locked(n);
                }
            }
            Event::Config {
                node: n,
                version,
                config,
            } => self.learn(n, version, &config),
            Event::Ping {
                from,
                life,
                sent,
                lateness,
            } => {
                // As the master records it: when the ping arrived, on its own clock.
                let master_now = self.now_ms as f64 * self.master_rate;
                let heard = self.pinged.entry(from).or_insert(0.0);
                *heard = heard.max(master_now);
                self.reported.insert(from, lateness);
                // Suspected nodes get no lease until they are judged up again.
                if self.state.nodes[&from].health == Health::Up {
                    let version = self.version;
                    self.send(Event::Pong {
                        to: from,
                        life,
                        sent,
                        version,
                    });
                }
            }
            Event::Pong {
                to,
                life,
                sent,
                version,
            } => {
                let node = self.node(to);
                if !node.up || node.life != life {
                    return;
                }
                let until = sent + LEASE_MS;
                if node.lease.is_none_or(|(u, _)| until > u) {
                    node.lease = Some((until, version));
                }
            }
            Event::Restart { node: n } => {
                let node = self.node(n);
                node.up = true;
                node.replica = Replica::new(n);
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
        node.lease = None;
        // What was not fsynced is gone.
        let durable = node.durable;
        node.log.truncate(durable);
        // Its copy's machine lived in the process: it starts over.
        node.replica = Replica::new(n);
        // Mostly back after the detector acted; sometimes before (a node that restarts
        // at once, while the master was slow to judge it).
        let down_for = if self.rng.chance(20) {
            1 + self.rng.below(DETECT_MS - 1)
        } else {
            DETECT_MS + 5 + self.rng.below(200)
        };
        self.at(down_for, Event::Restart { node: n });
    }

    /// The master stops handling anything for `ms`.
    fn stall_master(&mut self, ms: u64) {
        self.master_stalls += 1;
        self.trace(|| format!("stall the master for {ms} ms"));
        self.master_slow_until = self.now_ms + ms;
        self.master_woke = true;
        let woke = self.start + Duration::from_millis(self.master_slow_until);
        self.master_health.observe(woke, Duration::from_millis(ms));
    }

    /// `n` stops handling anything for `ms` (a CPU-starved process).
    fn stall(&mut self, n: NodeId, ms: u64) {
        self.stalls += 1;
        self.trace(|| format!("stall {n} for {ms} ms"));
        let now_ms = self.now_ms;
        let node = self.node(n);
        node.slow_until = now_ms + ms;
        node.silent_since.get_or_insert(now_ms);
        // Scored as the node wakes and finds its timers late.
        let woke = self.start + Duration::from_millis(now_ms + ms);
        self.node(n).health.observe(woke, Duration::from_millis(ms));
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
            && self.nodes[&config.primary]
                .replica
                .primary()
                .is_some_and(|e| e.epoch() == config.epoch)
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
                // A stalled node handles it when it wakes, in the order it arrived; a
                // stalled master reads its socket a millisecond after its timers fire.
                let slow_until = event.target().map_or_else(
                    || match self.master_slow_until {
                        0 => 0,
                        until => until + 1,
                    },
                    |n| self.nodes[&n].slow_until,
                );
                if slow_until > self.now_ms {
                    self.at_ms(slow_until, event);
                    continue;
                }
                self.handle(event);
            }
            if self.now_ms.is_multiple_of(5) {
                for n in NODES {
                    if self.nodes[&n].up && self.nodes[&n].slow_until <= self.now_ms {
                        self.step(n, replica::Event::Tick);
                    }
                }
            }
            for n in NODES {
                let node = &self.nodes[&n];
                if node.up && node.slow_until <= self.now_ms && node.next_ping <= self.now_ms {
                    let (life, sent) = (node.life, self.clock(n));
                    let (now, next_ping) = (self.now(), self.now_ms + HEARTBEAT_MS);
                    let node = self.node(n);
                    node.next_ping = next_ping;
                    node.health.observe(now, Duration::ZERO);
                    let lateness = node.health.score();
                    self.send(Event::Ping {
                        from: n,
                        life,
                        sent,
                        lateness,
                    });
                }
            }
            self.read();
            self.detect();
            if fault_per_mille > 0 && self.whole() && self.rng.below(1000) < fault_per_mille {
                let victim = NODES[self.rng.below(3) as usize];
                if self.rng.chance(20) {
                    // Mostly shorter than an election would take (the master stays).
                    let ms = 1 + self.rng.below(2 * DETECT_MS);
                    self.stall_master(ms);
                } else if self.rng.chance(50) {
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
        if !self.serves(p)
            || self.nodes[&p].view.as_ref().map(|(_, v)| v.epoch) != Some(config.epoch)
        {
            return;
        }
        self.payloads += 1;
        let payload = self.payloads;
        let node = self.node(p);
        node.log.push((config.epoch, payload));
        let seq = Seq(node.log.len() as u64);
        let life = node.life;
        let Some(session) = node.replica.serving().map(|e| e.session()) else {
            return;
        };
        self.step(
            p,
            replica::Event::Appended {
                session,
                seq,
                payload,
            },
        );
        let delay = self.rng.below(4);
        self.at(delay, Event::Synced { node: p, life, seq });
    }

    /// After the faults: everything appended in the current epoch is released and every
    /// backup's log is the primary's.
    fn check_settled(&self) {
        let config = self.config();
        assert!(self.whole(), "the configuration is whole again: {config:?}");
        let p = &self.nodes[&config.primary];
        let Some(engine) = p.replica.primary() else {
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

/// One seed's run: faults, then a healed network, then the checks.
fn simulate(seed: u64, adaptive: bool) -> Sim {
    let mut sim = Sim::new(seed);
    sim.adaptive = adaptive;
    sim.run(12_000, 2, 5);
    // Heal: no more faults, a clean network, time to settle.
    sim.drop_percent = 0;
    sim.dup_percent = 0;
    sim.delay_ms_max = 1;
    sim.run(3_000, 2, 0);
    sim.run(2_000, u64::MAX, 0);
    sim.check_settled();
    sim
}

/// Seeds also run with fixed timeouts, to count the false verdicts adaptation prevents.
const COMPARED_SEEDS: usize = 100;

#[test]
fn no_acknowledged_entry_is_lost_across_crashes_stalls_and_failovers() {
    #[derive(Default)]
    struct Totals {
        crashes: u32,
        stalls: u32,
        master_stalls: u32,
        false_downs: u32,
        promotions: u32,
        snapshots: u32,
        released: usize,
        reads: u32,
        compared: usize,
        compared_adaptive: u32,
        compared_fixed: u32,
    }
    let mut totals = Totals::default();
    for (i, seed) in seeds().into_iter().enumerate() {
        let result = std::panic::catch_unwind(|| {
            let sim = simulate(seed, true);
            let fixed = (i < COMPARED_SEEDS).then(|| simulate(seed, false).false_downs);
            (sim, fixed)
        });
        match result {
            Ok((sim, fixed)) => {
                totals.crashes += sim.crashes;
                totals.stalls += sim.stalls;
                totals.master_stalls += sim.master_stalls;
                totals.false_downs += sim.false_downs;
                totals.promotions += sim.promotions;
                totals.snapshots += sim.snapshots;
                totals.released += sim.released.len();
                totals.reads += sim.reads;
                if let Some(fixed) = fixed {
                    totals.compared += 1;
                    totals.compared_adaptive += sim.false_downs;
                    totals.compared_fixed += fixed;
                }
            }
            Err(_) => panic!("failover simulation failed with SIM_SEED={seed}"),
        }
    }
    println!(
        "failover simulation: {} crashes, {} stalls of nodes and {} of the master ({} nodes declared down while alive), {} promotions, {} snapshots, {} entries released and checked, {} reads checked",
        totals.crashes,
        totals.stalls,
        totals.master_stalls,
        totals.false_downs,
        totals.promotions,
        totals.snapshots,
        totals.released,
        totals.reads
    );
    println!(
        "over the first {} seeds: {} nodes declared down while alive with timeouts adapted to local health, {} with fixed timeouts",
        totals.compared, totals.compared_adaptive, totals.compared_fixed
    );
    assert!(
        totals.crashes > 0 && totals.promotions > 0 && totals.false_downs > 0 && totals.reads > 0,
        "the simulation crashed nodes, took stalled ones for dead and promoted backups"
    );
    assert!(
        totals.compared_adaptive < totals.compared_fixed,
        "adapting to local health takes fewer live nodes for dead"
    );
}
