//! A seeded simulation of one function's replication *across failovers*: three nodes
//! whose primary and backups run the real engines (`Primary`, `Backup`) over a network
//! that drops, duplicates, delays and reorders messages, while nodes crash (losing what
//! they had not made durable: applied entries past their last fsync, and fsyncs in
//! flight) and come back. A master, as the control plane does, promotes a live backup
//! under a new epoch when the primary dies, drops a dead backup, adds a returning node
//! as a catching-up backup (a snapshot, then the log) and counts it once the primary says
//! it caught up (in the same epoch: the primary's engine already waits for it); every
//! other change of the backups, and every promotion, bumps the epoch, and a primary keeps its
//! place across one only after it released everything it had (as `become_primary`
//! waits for the function's lock).
//!
//! Checked throughout: no two releases of one position disagree; a new primary's log
//! holds every released entry (no acknowledged commit is lost); at the end, with the
//! network healed, everything appended in the last epoch is released and every backup's
//! log equals the primary's. A failing seed replays exactly:
//! `SIM_SEED=N cargo test --release --lib failover_sim` (`SIM_TRACE=1` to see it);
//! `SIM_SEEDS=5000` runs that many.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::backup::{self, Backup};
use super::primary::{self, Primary};
use super::{Append, Epoch, NodeId, Reply, Seq};
use crate::sim_support::{seeds, Rng};

const NODES: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
/// The master's failure detector: how long after a crash it acts.
const DETECT_MS: u64 = 20;

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
    /// A snapshot of the primary's log, captured at `seq`, arrives at `node`.
    Snapshot {
        node: NodeId,
        from: NodeId,
        epoch: Epoch,
        log: Vec<(Epoch, u64)>,
    },
    /// `node` installed a snapshot at `seq`; the primary of `epoch` resumes sending.
    Installed {
        primary: NodeId,
        node: NodeId,
        epoch: Epoch,
        seq: Seq,
    },
    /// The control plane's decision reaches `node`.
    Config {
        node: NodeId,
    },
    /// The primary starts catching `node` up (a returning node was added).
    CatchUp {
        node: NodeId,
    },
    Detect {
        node: NodeId,
        life: u32,
    },
    Restart {
        node: NodeId,
    },
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
    /// The configuration this node last learned.
    epoch: Epoch,
    /// Since when a new configuration waits for this node's primary engine to release
    /// what it had (at most `DRAIN_WAIT_MS`, as the runtime waits).
    draining_since: Option<u64>,
}

/// How long a primary that keeps its place waits for its old engine to release what it
/// had sent before it starts the new epoch anyway.
const DRAIN_WAIT_MS: u64 = 1000;

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
    config: Config,
    /// Every release so far, by position: the payload released there.
    released: BTreeMap<u64, u64>,
    payloads: u64,
    drop_percent: u64,
    dup_percent: u64,
    delay_ms_max: u64,
    crashes: u32,
    promotions: u32,
    snapshots: u32,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let config = Config {
            epoch: Epoch(1),
            primary: NodeId(1),
            live: [NodeId(2), NodeId(3)].into(),
            catching_up: BTreeSet::new(),
        };
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
                        epoch: Epoch(0),
                        draining_since: None,
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
            config,
            released: BTreeMap::new(),
            payloads: 0,
            drop_percent: 15,
            dup_percent: 5,
            delay_ms_max: 8,
            crashes: 0,
            promotions: 0,
            snapshots: 0,
        };
        for n in NODES {
            sim.at(0, Event::Config { node: n });
        }
        sim
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
        self.queued += 1;
        self.queue.insert((self.now_ms + delay, self.queued), event);
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
                primary::Command::PeerLive { node } => {
                    // The primary tells the master (for its current epoch), which counts
                    // the backup from now on, in the same epoch: the primary's engine
                    // already waits for it.
                    let current =
                        self.config.primary == n && self.nodes[&n].epoch == self.config.epoch;
                    if current && self.config.catching_up.remove(&node) {
                        self.trace(|| {
                            format!("{node} caught up: a backup of {:?}", self.config.epoch)
                        });
                        self.config.live.insert(node);
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

    /// The master commits a new configuration: the epoch grows, every node learns it a
    /// little later.
    fn reconfigure(&mut self) {
        self.config.epoch = Epoch(self.config.epoch.0 + 1);
        let config = self.config.clone();
        let logs: Vec<String> = NODES
            .iter()
            .map(|n| {
                let node = &self.nodes[n];
                format!(
                    "{n}: up {} len {} durable {}",
                    node.up,
                    node.log.len(),
                    node.durable
                )
            })
            .collect();
        self.trace(|| {
            format!(
                "config {config:?}; {logs:?}; released up to {:?}",
                self.released.keys().last()
            )
        });
        for n in NODES {
            let delay = 1 + self.rng.below(5);
            self.at(delay, Event::Config { node: n });
        }
    }

    /// `n` learns the current configuration and takes its role in it.
    fn learn(&mut self, n: NodeId) -> bool {
        let config = self.config.clone();
        let now = self.now();
        let node = self.node(n);
        if !node.up || node.epoch >= config.epoch {
            return true;
        }
        if config.primary == n {
            // Keep the place: backups that left no longer count, and the old engine gets
            // (up to a second) to release what it sent, so the new epoch starts in sync.
            let now_ms = self.now_ms;
            let node = self.node(n);
            if let Role::Primary(engine) = &mut node.role {
                let mut commands = Vec::new();
                for peer in engine.peers() {
                    if !config.live.contains(&peer) && !config.catching_up.contains(&peer) {
                        commands
                            .extend(engine.step(now, primary::Event::PeerRemoved { node: peer }));
                    }
                }
                let busy = engine.seq_released() < engine.seq_last() && !engine.is_fenced();
                let since = *node.draining_since.get_or_insert(now_ms);
                self.primary_commands(n, commands);
                if busy && now_ms - since < DRAIN_WAIT_MS {
                    return false;
                }
            }
            self.node(n).draining_since = None;
            let log = &self.nodes[&n].log;
            let seq = Seq(log.len() as u64);
            let epoch_last = log.last().map_or(Epoch(0), |e| e.0);
            let live: Vec<NodeId> = config.live.iter().copied().collect();
            for (s, payload) in &self.released {
                let held = self.nodes[&n].log.get((*s - 1) as usize).map(|e| e.1);
                assert_eq!(
                    held,
                    Some(*payload),
                    "{n}, primary of {}, lacks released #{s}: an acknowledged commit lost",
                    config.epoch
                );
            }
            let (engine, commands) = Primary::new(now, config.epoch, seq, epoch_last, &live);
            if !matches!(self.nodes[&n].role, Role::Primary(_)) {
                self.promotions += 1;
            }
            let node = self.node(n);
            node.role = Role::Primary(engine);
            node.epoch = config.epoch;
            self.primary_commands(n, commands);
            for c in config.catching_up.clone() {
                self.snapshot(n, c);
            }
        } else if config.live.contains(&n) || config.catching_up.contains(&n) {
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
            node.epoch = config.epoch;
        } else {
            node.role = Role::None;
            node.epoch = config.epoch;
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
                    Role::Backup(b) if b.snapshot_is_behind(from, epoch, seq) => {
                        // As the runtime answers: no more than is durable here.
                        held = seq.min(b.seq_durable());
                        false
                    }
                    Role::Backup(b) => {
                        b.install(from, epoch, seq, epoch_last);
                        true
                    }
                    Role::None => {
                        let mut b = Backup::new(epoch, seq, epoch_last);
                        b.install(from, epoch, seq, epoch_last);
                        node.role = Role::Backup(b);
                        true
                    }
                    Role::Primary(_) => return,
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
                        seq: held,
                    },
                );
            }
            Event::Installed {
                primary: p,
                node: n,
                epoch,
                seq,
            } => {
                if !self.nodes[&p].up {
                    return;
                }
                if let Role::Primary(engine) = &mut self.node(p).role {
                    if engine.epoch() == epoch {
                        self.trace(|| format!("{p} hears {n} installed {seq} in {epoch}"));
                        let Role::Primary(engine) = &mut self.node(p).role else {
                            return;
                        };
                        let commands = engine.step(now, primary::Event::Resynced { node: n, seq });
                        self.primary_commands(p, commands);
                    }
                }
            }
            Event::Config { node: n } => {
                if !self.learn(n) {
                    self.at(1, Event::Config { node: n });
                }
            }
            Event::Detect { node: n, life } => {
                let node = &self.nodes[&n];
                if node.up || node.life != life {
                    return;
                }
                if self.config.primary == n {
                    // Promote a live backup that is up: it holds every released commit.
                    let candidates: Vec<NodeId> = self
                        .config
                        .live
                        .iter()
                        .copied()
                        .filter(|c| self.nodes[c].up)
                        .collect();
                    if candidates.is_empty() {
                        return;
                    }
                    let new = candidates[self.rng.below(candidates.len() as u64) as usize];
                    self.config.live.remove(&new);
                    self.config.primary = new;
                } else if self.config.catching_up.remove(&n) {
                    // Not counted for commits: no new epoch, the primary stops sending.
                    let p = self.config.primary;
                    if let Role::Primary(engine) = &mut self.node(p).role {
                        let commands = engine.step(now, primary::Event::PeerRemoved { node: n });
                        self.primary_commands(p, commands);
                    }
                    return;
                } else if !self.config.live.remove(&n) {
                    return;
                }
                self.reconfigure();
            }
            Event::CatchUp { node: n } => {
                let p = self.config.primary;
                let current = matches!(&self.nodes[&p].role, Role::Primary(e) if e.epoch() == self.config.epoch);
                if self.nodes[&p].up && current && self.config.catching_up.contains(&n) {
                    self.snapshot(p, n);
                }
            }
            Event::Restart { node: n } => {
                let node = self.node(n);
                node.up = true;
                node.epoch = Epoch(0);
                node.role = Role::None;
                // It rejoins as a catching-up backup (no new epoch: it does not count
                // yet): a snapshot replaces whatever it holds past the primary's log.
                self.config.catching_up.insert(n);
                let delay = 1 + self.rng.below(5);
                self.at(delay, Event::Config { node: n });
                let delay = 1 + self.rng.below(10);
                self.at(delay, Event::CatchUp { node: n });
            }
        }
    }

    fn crash(&mut self, n: NodeId) {
        self.crashes += 1;
        self.trace(|| format!("crash {n}"));
        let node = self.node(n);
        node.up = false;
        node.life += 1;
        // What was not fsynced is gone.
        let durable = node.durable;
        node.log.truncate(durable);
        node.role = Role::None;
        let life = node.life;
        self.at(DETECT_MS, Event::Detect { node: n, life });
        let down_for = DETECT_MS + 5 + self.rng.below(200);
        self.at(down_for, Event::Restart { node: n });
    }

    /// Whether the configuration is whole: a primary with two live backups, every node
    /// up and in its role.
    fn whole(&self) -> bool {
        self.config.live.len() == 2
            && self.config.catching_up.is_empty()
            && self
                .nodes
                .values()
                .all(|n| n.up && n.epoch == self.config.epoch)
    }

    /// Run for `ms`, appending every `append_every` ms; with `crash_percent` per ms
    /// chance (when the configuration is whole) of crashing a random node.
    fn run(&mut self, ms: u64, append_every: u64, crash_per_mille: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            if self.now_ms.is_multiple_of(append_every) {
                self.append();
            }
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.now_ms {
                    break;
                }
                let event = entry.remove();
                self.handle(event);
            }
            if self.now_ms.is_multiple_of(5) {
                let now = self.now();
                for n in NODES {
                    if let Role::Primary(engine) = &mut self.node(n).role {
                        let commands = engine.step(now, primary::Event::Tick);
                        self.primary_commands(n, commands);
                    }
                }
            }
            if crash_per_mille > 0 && self.whole() && self.rng.below(1000) < crash_per_mille {
                let victim = NODES[self.rng.below(3) as usize];
                self.crash(victim);
            }
            self.now_ms += 1;
        }
    }

    /// A client's commit on the primary, if it serves in the current configuration.
    fn append(&mut self) {
        let p = self.config.primary;
        let epoch = self.config.epoch;
        let now = self.now();
        let serving = {
            let node = &self.nodes[&p];
            node.up
                && node.epoch == epoch
                && matches!(&node.role, Role::Primary(e) if !e.is_fenced() && e.epoch() == epoch)
        };
        if !serving {
            return;
        }
        self.payloads += 1;
        let payload = self.payloads;
        let node = self.node(p);
        node.log.push((epoch, payload));
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
        assert!(
            self.whole(),
            "the configuration is whole again: {:?}",
            self.config
        );
        let p = &self.nodes[&self.config.primary];
        let Role::Primary(engine) = &p.role else {
            panic!("{} is not primary", self.config.primary)
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
        for b in &self.config.live {
            let log: Vec<u64> = self.nodes[b].log.iter().map(|e| e.1).collect();
            let primary: Vec<u64> = p.log.iter().map(|e| e.1).collect();
            assert_eq!(log, primary, "backup {b} holds the primary's log");
        }
    }
}

#[test]
fn no_acknowledged_entry_is_lost_across_crashes_and_failovers() {
    let mut totals = (0u32, 0u32, 0u32, 0usize);
    for seed in seeds() {
        let result = std::panic::catch_unwind(|| {
            let mut sim = Sim::new(seed);
            sim.run(12_000, 2, 5);
            // Heal: no more crashes, a clean network, time to settle.
            sim.drop_percent = 0;
            sim.dup_percent = 0;
            sim.delay_ms_max = 1;
            sim.run(3_000, 2, 0);
            sim.run(2_000, u64::MAX, 0);
            sim.check_settled();
            (
                sim.crashes,
                sim.promotions,
                sim.snapshots,
                sim.released.len(),
            )
        });
        match result {
            Ok((c, p, s, r)) => {
                totals.0 += c;
                totals.1 += p;
                totals.2 += s;
                totals.3 += r;
            }
            Err(_) => panic!("failover simulation failed with SIM_SEED={seed}"),
        }
    }
    println!(
        "failover simulation: {} crashes, {} promotions, {} snapshots, {} entries released and checked",
        totals.0, totals.1, totals.2, totals.3
    );
    assert!(
        totals.0 > 0 && totals.1 > 0,
        "the simulation crashed nodes and promoted backups"
    );
}
