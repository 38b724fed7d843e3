//! A seeded simulation of two-phase commit over the real composition: four functions,
//! each with its own log and its own store (the real `Store`, applying the records of
//! `twophase::records` as the node does), each coordinating transactions and taking part
//! in others'. What a log made durable survives a crash (it is replicated: what a log
//! released survives a failover, as `replication::failover_sim` checks); the rest of it
//! and all memory (parts of transactions not yet prepared, the function's lock, the
//! protocol's state) does not. The promoted copy rebuilds its store from the durable
//! records and its protocol state from the store (`records::recovered`, as a new primary
//! copy's slot does). Messages are dropped, duplicated, delayed and reordered; functions
//! crash at any step and come back.
//!
//! As on the node, the coordinator's own writes ride on its decision and every other
//! function written prepares; a part holds its function's lock until its PREPARE is
//! appended, the coordinator's until its decision is; a prepared part then isolates its
//! function through the store (a transaction does not begin on a function with one).
//!
//! Checked: every participant of a transaction reaches the same outcome, and the
//! client's answer is that outcome; a commit is applied only after the coordinator's log
//! holds it durably; every record the protocol writes applies to the store; once the
//! network heals and the crashes stop, no transaction is left prepared or undelivered,
//! and each store holds the writes of exactly the committed transactions it took part in.
//! A failing seed replays exactly: `SIM_SEED=N cargo test --release --lib twophase`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::coordinator::{self, Coordinator};
use super::participant::{self, Participant};
use super::{records, Message, TxnId};
use crate::ids::{Digest, FunctionName, Lsn};
use crate::sim_support::{seeds, Rng};
use crate::store::{Function, Store};
use crate::wal::record::{Commit, Decision, Deploy, Op, Record, Writes};

const PARTIES: u8 = 4;
/// The epoch every record is written in (failover here is a restart from the log).
const EPOCH: u64 = 1;

fn name(p: u8) -> FunctionName {
    FunctionName::new(&format!("f{p}")).expect("a valid name")
}

fn party_of(f: &FunctionName) -> u8 {
    f.as_str()[1..].parse().expect("a party's name")
}

/// What each transaction writes to every function it touches: its id, under its id.
fn write_of(txn: TxnId) -> Vec<Op> {
    vec![Op {
        key: txn.0.to_be_bytes().to_vec(),
        value: Some(b"w".to_vec()),
    }]
}

/// A store holding `function` deployed, and `records` applied.
fn store_of(function: &FunctionName, records: &[Record]) -> Store {
    let store = Store::default();
    let deploy = Record::Deploy(Deploy {
        function: function.clone(),
        digest: Digest([0; 32]),
        version: 1,
        at_ms: 0,
        calls: Default::default(),
    });
    store.apply(Lsn(0), &deploy).expect("deploy applies");
    for (i, r) in records.iter().enumerate() {
        store
            .apply(Lsn(i as u64 + 1), r)
            .expect("a durable record applied before applies again");
    }
    store
}

/// What the protocol is told once a record is durable.
#[derive(Clone, Copy, Debug)]
enum Then {
    PrepareLogged(TxnId),
    OutcomeLogged(TxnId),
    DecisionLogged(TxnId),
    Nothing,
}

enum Event {
    Deliver {
        to: u8,
        message: Message<FunctionName>,
    },
    /// `party`'s log is durable up to its first `len` records (void if the party crashed
    /// since).
    Durable {
        party: u8,
        life: u32,
        len: usize,
        then: Then,
    },
    Restart {
        party: u8,
    },
}

struct Party {
    up: bool,
    life: u32,
    /// Every record appended, in order; the first `durable` survive a crash.
    log: Vec<Record>,
    durable: usize,
    /// The primary's state: each record applied as it is appended, as the node applies
    /// a commit before it is durable.
    store: Store,
    coordinator: Coordinator<FunctionName>,
    participant: Participant<FunctionName>,
    /// Parts of transactions made here and not yet prepared (lost in a crash), with
    /// when they were made.
    parts: BTreeMap<TxnId, u64>,
    /// The function's lock (in memory): held by a part until its PREPARE is appended,
    /// and by the coordinator's transaction until its decision is (or it aborts).
    lock: Option<TxnId>,
    /// When the last log write issued becomes durable.
    log_due: u64,
}

impl Party {
    fn new(me: u8) -> Party {
        Party {
            up: true,
            life: 0,
            log: Vec::new(),
            durable: 0,
            store: store_of(&name(me), &[]),
            coordinator: Coordinator::new(name(me)),
            participant: Participant::new(name(me)),
            parts: BTreeMap::new(),
            lock: None,
            log_due: 0,
        }
    }

    fn function(&self, me: u8) -> std::sync::Arc<Function> {
        self.store.get(&name(me)).expect("deployed")
    }
}

struct Sim {
    rng: Rng,
    start: Instant,
    now_ms: u64,
    queue: BTreeMap<(u64, u64), Event>,
    queued: u64,
    parties: Vec<Party>,
    next_txn: u64,
    /// Every transaction begun: its coordinator and its participants.
    begun: BTreeMap<TxnId, (u8, Vec<u8>)>,
    /// The answers the clients got.
    answers: BTreeMap<TxnId, bool>,
    drop_percent: u64,
    dup_percent: u64,
    delay_ms_max: u64,
    crashes: u32,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        Sim {
            rng: Rng(seed),
            start: Instant::now(),
            now_ms: 0,
            queue: BTreeMap::new(),
            queued: 0,
            parties: (0..PARTIES).map(Party::new).collect(),
            next_txn: 0,
            begun: BTreeMap::new(),
            answers: BTreeMap::new(),
            drop_percent: 10,
            dup_percent: 5,
            delay_ms_max: 6,
            crashes: 0,
        }
    }

    fn now(&self) -> Instant {
        self.start + Duration::from_millis(self.now_ms)
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.queued += 1;
        self.queue.insert((self.now_ms + delay, self.queued), event);
    }

    fn send(&mut self, to: &FunctionName, message: Message<FunctionName>) {
        let to = party_of(to);
        if self.rng.chance(self.drop_percent) {
            return;
        }
        if self.rng.chance(self.dup_percent) {
            let delay = self.rng.below(self.delay_ms_max + 1);
            self.at(
                delay,
                Event::Deliver {
                    to,
                    message: message.clone(),
                },
            );
        }
        let delay = self.rng.below(self.delay_ms_max + 1);
        self.at(delay, Event::Deliver { to, message });
    }

    /// Append `record` to `party`'s log and apply it to its store; it is replicated and
    /// durable a few milliseconds later, after the records before it (a log is written
    /// in order), and then the protocol hears `then`.
    fn append(&mut self, party: u8, record: Record, then: Then) {
        if let Record::Resolved(r) = &record {
            // Atomicity, as soon as an outcome is written.
            let (c, participants) = self.begun[&r.txn].clone();
            for q in participants.iter().chain([&c]) {
                for other in &self.parties[*q as usize].log {
                    if let Record::Resolved(o) = other {
                        assert!(
                            o.txn != r.txn || o.commit == r.commit,
                            "{}: party {party} writes commit={}, party {q} wrote commit={}",
                            r.txn,
                            r.commit,
                            o.commit
                        );
                    }
                }
            }
        }
        let p = &mut self.parties[party as usize];
        let lsn = Lsn(p.log.len() as u64 + 1);
        if let Err(e) = p.store.apply(lsn, &record) {
            panic!(
                "party {party}: the composition wrote a record its store refuses: {e} ({record:?})"
            );
        }
        p.log.push(record);
        let len = p.log.len();
        let life = p.life;
        let due = (self.now_ms + 1 + self.rng.below(5)).max(p.log_due);
        p.log_due = due;
        let delay = due - self.now_ms;
        self.at(
            delay,
            Event::Durable {
                party,
                life,
                len,
                then,
            },
        );
    }

    /// Whether `coordinator`'s durable log holds the decision to commit `txn`.
    fn holds_commit(&self, coordinator: u8, txn: TxnId) -> bool {
        let p = &self.parties[coordinator as usize];
        p.log[..p.durable]
            .iter()
            .any(|r| matches!(r, Record::Commit(c) if c.txn == txn && c.decision.is_some()))
    }

    fn coordinator_commands(&mut self, c: u8, commands: Vec<coordinator::Command<FunctionName>>) {
        for command in commands {
            match command {
                coordinator::Command::Send { to, message } => self.send(&to, message),
                coordinator::Command::LogCommit { txn, participants } => {
                    // The decision, with the coordinator's own writes.
                    let record = Record::Commit(Commit {
                        txn,
                        writes: vec![Writes {
                            function: name(c),
                            ops: write_of(txn),
                        }],
                        idempotency: None,
                        epochs: Vec::new(),
                        decision: Some(Decision {
                            coordinator: name(c),
                            participants,
                        }),
                    });
                    self.append(c, record, Then::DecisionLogged(txn));
                    // Appended and applied: the transaction lets go of its lock.
                    self.unlock(c, txn);
                }
                coordinator::Command::LogEnd { txn } => {
                    let f = self.parties[c as usize].function(c);
                    if let Some(record) = records::end(&f, txn, EPOCH) {
                        self.append(c, record, Then::Nothing);
                    }
                }
                coordinator::Command::Decided { txn, commit } => {
                    assert!(
                        !commit || self.holds_commit(c, txn),
                        "{txn}: the client was told commit before the decision was durable"
                    );
                    if let Some(earlier) = self.answers.insert(txn, commit) {
                        assert_eq!(earlier, commit, "{txn}: two different answers");
                    }
                    if !commit {
                        self.unlock(c, txn);
                    }
                }
            }
        }
    }

    fn participant_commands(&mut self, p: u8, commands: Vec<participant::Command<FunctionName>>) {
        for command in commands {
            match command {
                participant::Command::Send { to, message } => self.send(&to, message),
                participant::Command::LogPrepare { txn } => {
                    let coordinator = name(self.begun[&txn].0);
                    let record = records::prepare(&name(p), txn, coordinator, write_of(txn), EPOCH);
                    self.append(p, record, Then::PrepareLogged(txn));
                    // Its writes are promised in the log: isolation is the store's now.
                    self.release(p, txn);
                }
                participant::Command::LogOutcome { txn, commit } => {
                    let f = self.parties[p as usize].function(p);
                    match records::outcome(&f, txn, commit, EPOCH) {
                        Some(record) => self.append(p, record, Then::OutcomeLogged(txn)),
                        // Nothing prepared here: the outcome counts as logged.
                        None => self.participant_step(p, participant::Event::OutcomeLogged { txn }),
                    }
                }
                participant::Command::Finish { txn, commit } => {
                    let coordinator = self.begun[&txn].0;
                    assert!(
                        !commit || self.holds_commit(coordinator, txn),
                        "{txn}: party {p} applied a commit its coordinator never logged"
                    );
                    self.release(p, txn);
                }
                participant::Command::Discard { txn } => self.release(p, txn),
            }
        }
    }

    fn participant_step(&mut self, p: u8, event: participant::Event<FunctionName>) {
        let now = self.now();
        let commands = self.parties[p as usize].participant.step(now, event);
        self.participant_commands(p, commands);
    }

    fn coordinator_step(&mut self, c: u8, event: coordinator::Event<FunctionName>) {
        let now = self.now();
        let commands = self.parties[c as usize].coordinator.step(now, event);
        self.coordinator_commands(c, commands);
    }

    /// `txn`'s part at `p` is gone (prepared, finished or dropped): so is its lock.
    fn release(&mut self, p: u8, txn: TxnId) {
        self.parties[p as usize].parts.remove(&txn);
        self.unlock(p, txn);
    }

    fn unlock(&mut self, p: u8, txn: TxnId) {
        let party = &mut self.parties[p as usize];
        if party.lock == Some(txn) {
            party.lock = None;
        }
    }

    /// A client's transaction at a random coordinator, writing its own function and one
    /// or two others (their parts made now, under their locks), then asking to commit.
    fn begin(&mut self) {
        let c = self.rng.below(u64::from(PARTIES)) as u8;
        let mut participants = Vec::new();
        for _ in 0..1 + self.rng.below(2) {
            let p = self.rng.below(u64::from(PARTIES)) as u8;
            if p != c && !participants.contains(&p) {
                participants.push(p);
            }
        }
        if participants.is_empty() {
            return;
        }
        // As `lock_unprepared`: not while another transaction holds a function's lock or
        // its prepared part isolates it.
        let free = participants.iter().chain([&c]).all(|p| {
            let party = &self.parties[*p as usize];
            party.up && party.lock.is_none() && party.function(*p).prepared().is_empty()
        });
        if !free {
            return;
        }
        self.next_txn += 1;
        let txn = TxnId(self.next_txn);
        for p in &participants {
            let party = &mut self.parties[*p as usize];
            party.parts.insert(txn, self.now_ms);
            party.lock = Some(txn);
        }
        self.parties[c as usize].lock = Some(txn);
        self.begun.insert(txn, (c, participants.clone()));
        let participants = participants.into_iter().map(name).collect();
        self.coordinator_step(c, coordinator::Event::Begin { txn, participants });
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { to, message } => {
                if !self.parties[to as usize].up {
                    return;
                }
                match message {
                    Message::Prepare { txn, coordinator } => {
                        let ok = self.parties[to as usize].parts.contains_key(&txn);
                        self.participant_step(
                            to,
                            participant::Event::Prepare {
                                txn,
                                coordinator,
                                ok,
                            },
                        );
                    }
                    Message::Decision { .. } => {
                        self.participant_step(to, participant::Event::Received(message))
                    }
                    Message::Vote { .. } | Message::Ack { .. } | Message::Query { .. } => {
                        self.coordinator_step(to, coordinator::Event::Received(message))
                    }
                }
            }
            Event::Durable {
                party: p,
                life,
                len,
                then,
            } => {
                let party = &mut self.parties[p as usize];
                if !party.up || party.life != life {
                    return;
                }
                party.durable = party.durable.max(len);
                match then {
                    Then::PrepareLogged(txn) => {
                        self.participant_step(p, participant::Event::PrepareLogged { txn })
                    }
                    Then::OutcomeLogged(txn) => {
                        self.participant_step(p, participant::Event::OutcomeLogged { txn })
                    }
                    Then::DecisionLogged(txn) => {
                        self.coordinator_step(p, coordinator::Event::Logged { txn })
                    }
                    Then::Nothing => {}
                }
            }
            Event::Restart { party: p } => self.recover(p),
        }
    }

    fn crash(&mut self, p: u8) {
        self.crashes += 1;
        let party = &mut self.parties[p as usize];
        party.up = false;
        party.life += 1;
        party.log.truncate(party.durable);
        party.coordinator = Coordinator::new(name(p));
        party.participant = Participant::new(name(p));
        party.parts.clear();
        party.lock = None;
        let down_for = 20 + self.rng.below(80);
        self.at(down_for, Event::Restart { party: p });
    }

    /// The promoted copy takes over: its store holds the durable records, and its slot
    /// starts from what that store holds.
    fn recover(&mut self, p: u8) {
        let party = &mut self.parties[p as usize];
        party.up = true;
        party.store = store_of(&name(p), &party.log);
        let f = party.function(p);
        let prepared = f.prepared();
        assert!(
            prepared.len() <= 1,
            "party {p} holds two prepared transactions: {prepared:?}"
        );
        let (as_participant, as_coordinator) = records::recovered(&f);
        self.coordinator_step(p, as_coordinator);
        self.participant_step(p, as_participant);
    }

    fn run(&mut self, ms: u64, begin_percent: u64, crash_per_mille: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            if self.rng.chance(begin_percent) {
                self.begin();
            }
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.now_ms {
                    break;
                }
                let event = entry.remove();
                self.handle(event);
            }
            if self.now_ms.is_multiple_of(5) {
                for p in 0..PARTIES {
                    if !self.parties[p as usize].up {
                        continue;
                    }
                    self.coordinator_step(p, coordinator::Event::Tick);
                    self.participant_step(p, participant::Event::Tick);
                    // Parts never prepared (their Prepare and abort were lost): dropped
                    // after twice the prepare timeout.
                    let party = &self.parties[p as usize];
                    let limit = 2 * coordinator::PREPARE_TIMEOUT.as_millis() as u64;
                    let stale: Vec<TxnId> = party
                        .parts
                        .iter()
                        .filter(|(txn, made)| {
                            self.now_ms - **made > limit
                                && !party.participant.unresolved().any(|u| u == **txn)
                        })
                        .map(|(txn, _)| *txn)
                        .collect();
                    for txn in stale {
                        self.release(p, txn);
                    }
                }
            }
            if crash_per_mille > 0 && self.rng.below(1000) < crash_per_mille {
                let p = self.rng.below(u64::from(PARTIES)) as u8;
                if self.parties.iter().all(|q| q.up) {
                    self.crash(p);
                }
            }
            self.now_ms += 1;
        }
    }

    /// After the faults: nothing is left undecided or undelivered, every transaction has
    /// one outcome everywhere, the one its client was told, and the stores hold the
    /// writes of exactly the committed transactions.
    fn check_settled(&self) -> (usize, usize, usize) {
        let (mut committed, mut aborted) = (0, 0);
        for (p, party) in self.parties.iter().enumerate() {
            assert!(party.up);
            let stuck: Vec<TxnId> = party.participant.unresolved().collect();
            assert!(stuck.is_empty(), "party {p} still waits on {stuck:?}");
            assert_eq!(
                party.coordinator.in_flight(),
                0,
                "party {p} has undelivered decisions"
            );
            let f = party.function(p as u8);
            assert!(
                f.prepared().is_empty(),
                "party {p}'s store holds prepared parts: {:?}",
                f.prepared()
            );
        }
        for (txn, (c, participants)) in &self.begun {
            let outcomes: Vec<Option<bool>> = participants
                .iter()
                .map(|p| {
                    self.parties[*p as usize].log.iter().find_map(|r| match r {
                        Record::Resolved(o) if o.txn == *txn => Some(o.commit),
                        _ => None,
                    })
                })
                .collect();
            // A participant that voted no (its part was lost) writes nothing: it has no
            // outcome record, and then nobody may have committed.
            let commits = outcomes.iter().filter(|o| **o == Some(true)).count();
            let all_committed = commits == participants.len();
            assert!(
                commits == 0 || all_committed,
                "{txn}: mixed outcomes {outcomes:?} over {participants:?}"
            );
            assert_eq!(
                all_committed,
                self.holds_commit(*c, *txn),
                "{txn}: the participants hold {outcomes:?}, the coordinator's decision disagrees"
            );
            if let Some(answer) = self.answers.get(txn) {
                assert_eq!(
                    *answer, all_committed,
                    "{txn}: the client was told commit={answer}, the participants hold {outcomes:?}"
                );
            }
            let key = txn.0.to_be_bytes();
            for p in participants.iter().chain([c]) {
                let f = self.parties[*p as usize].function(*p);
                assert_eq!(
                    f.get(&key).is_some(),
                    all_committed,
                    "{txn}: party {p}'s state disagrees with the outcome (committed: {all_committed})"
                );
            }
            if all_committed {
                committed += 1;
            } else {
                aborted += 1;
            }
        }
        (self.begun.len(), committed, aborted)
    }
}

#[test]
fn every_participant_reaches_the_coordinators_decision_despite_crashes() {
    let mut totals = (0usize, 0usize, 0usize, 0u32);
    for seed in seeds() {
        let result = std::panic::catch_unwind(|| {
            let mut sim = Sim::new(seed);
            sim.run(8_000, 30, 4);
            // Heal: no crashes, no loss; let every decision arrive.
            sim.drop_percent = 0;
            sim.dup_percent = 0;
            sim.run(3_000, 0, 0);
            let (begun, committed, aborted) = sim.check_settled();
            (begun, committed, aborted, sim.crashes)
        });
        match result {
            Ok((b, c, a, k)) => {
                totals.0 += b;
                totals.1 += c;
                totals.2 += a;
                totals.3 += k;
            }
            Err(_) => panic!("two-phase commit simulation failed with SIM_SEED={seed}"),
        }
    }
    println!(
        "two-phase commit simulation: {} transactions ({} committed, {} aborted), {} crashes",
        totals.0, totals.1, totals.2, totals.3
    );
    assert!(totals.1 > 0 && totals.2 > 0 && totals.3 > 0);
}
