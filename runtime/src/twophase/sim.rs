//! A seeded simulation of two-phase commit: four functions, each with a coordinator and
//! a participant, whose logs survive crashes (they are replicated: what a log
//! acknowledged survives a failover, as `replication::failover_sim` checks) but whose
//! memory does not (parts of transactions not yet prepared, locks, records being
//! written). Messages are dropped, duplicated, delayed and reordered; functions crash at
//! any step of the protocol and come back from their logs (the promoted backup).
//!
//! Checked: every participant of a transaction reaches the same outcome, and the
//! client's answer is that outcome; a commit is applied only after the coordinator's
//! log holds it; once the network heals and the crashes stop, no transaction is left
//! prepared (nothing waits forever) and every coordinator has delivered everything.
//! A failing seed replays exactly: `SIM_SEED=N cargo test --release --lib twophase`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::coordinator::{self, Coordinator};
use super::participant::{self, Participant};
use super::{Message, TxnId};
use crate::sim_support::{seeds, Rng};

const PARTIES: u8 = 4;

#[derive(Clone, Debug)]
enum Record {
    Prepare {
        txn: TxnId,
        coordinator: u8,
    },
    Outcome {
        txn: TxnId,
        commit: bool,
        coordinator: u8,
    },
    Commit {
        txn: TxnId,
        participants: Vec<u8>,
    },
    End {
        txn: TxnId,
    },
}

enum Event {
    Deliver {
        to: u8,
        message: Message<u8>,
    },
    /// A log write of `party` becomes durable (void if the party crashed since).
    Logged {
        party: u8,
        life: u32,
        record: Record,
    },
    Restart {
        party: u8,
    },
}

struct Party {
    up: bool,
    life: u32,
    log: Vec<Record>,
    coordinator: Coordinator<u8>,
    participant: Participant<u8>,
    /// Parts of transactions made here and still in memory (lost in a crash), with
    /// when they were made.
    parts: BTreeMap<TxnId, u64>,
    /// The one lock: the transaction whose part is here (made, prepared or finishing).
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
            coordinator: Coordinator::new(me),
            participant: Participant::new(me),
            parts: BTreeMap::new(),
            lock: None,
            log_due: 0,
        }
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
    /// Every transaction begun: its participants.
    begun: BTreeMap<TxnId, Vec<u8>>,
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

    fn send(&mut self, to: u8, message: Message<u8>) {
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

    /// A log write: replicated and fsynced a few milliseconds later, after the writes
    /// before it (a log is written in order).
    fn log(&mut self, party: u8, record: Record) {
        let life = self.parties[party as usize].life;
        let due = (self.now_ms + 1 + self.rng.below(5)).max(self.parties[party as usize].log_due);
        self.parties[party as usize].log_due = due;
        let delay = due - self.now_ms;
        self.at(
            delay,
            Event::Logged {
                party,
                life,
                record,
            },
        );
    }

    fn holds_commit(&self, coordinator: u8, txn: TxnId) -> bool {
        self.parties[coordinator as usize]
            .log
            .iter()
            .any(|r| matches!(r, Record::Commit { txn: t, .. } if *t == txn))
    }

    fn coordinator_commands(&mut self, c: u8, commands: Vec<coordinator::Command<u8>>) {
        for command in commands {
            match command {
                coordinator::Command::Send { to, message } => self.send(to, message),
                coordinator::Command::LogCommit { txn, participants } => {
                    self.log(c, Record::Commit { txn, participants })
                }
                coordinator::Command::LogEnd { txn } => self.log(c, Record::End { txn }),
                coordinator::Command::Decided { txn, commit } => {
                    assert!(
                        !commit || self.holds_commit(c, txn),
                        "{txn}: the client was told commit before the decision was durable"
                    );
                    if let Some(earlier) = self.answers.insert(txn, commit) {
                        assert_eq!(earlier, commit, "{txn}: two different answers");
                    }
                }
            }
        }
    }

    fn participant_commands(&mut self, p: u8, commands: Vec<participant::Command<u8>>) {
        for command in commands {
            match command {
                participant::Command::Send { to, message } => self.send(to, message),
                participant::Command::LogPrepare { txn } => {
                    let coordinator = self.coordinator_of(txn);
                    self.log(p, Record::Prepare { txn, coordinator })
                }
                participant::Command::LogOutcome { txn, commit } => {
                    let coordinator = self.coordinator_of(txn);
                    self.log(
                        p,
                        Record::Outcome {
                            txn,
                            commit,
                            coordinator,
                        },
                    )
                }
                participant::Command::Finish { txn, commit } => {
                    let coordinator = self.coordinator_of(txn);
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

    fn coordinator_of(&self, txn: TxnId) -> u8 {
        self.begun[&txn][0]
    }

    fn release(&mut self, p: u8, txn: TxnId) {
        let party = &mut self.parties[p as usize];
        party.parts.remove(&txn);
        if party.lock == Some(txn) {
            party.lock = None;
        }
    }

    /// A client's transaction at a random coordinator, writing it and one or two other
    /// functions (their parts made now, under their locks), then asking to commit.
    fn begin(&mut self) {
        let c = self.rng.below(u64::from(PARTIES)) as u8;
        let mut participants = vec![c];
        for _ in 0..1 + self.rng.below(2) {
            let p = self.rng.below(u64::from(PARTIES)) as u8;
            if !participants.contains(&p) {
                participants.push(p);
            }
        }
        let free = participants.iter().all(|p| {
            let party = &self.parties[*p as usize];
            party.up && party.lock.is_none()
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
        self.begun.insert(txn, participants.clone());
        let now = self.now();
        let commands = self.parties[c as usize]
            .coordinator
            .step(now, coordinator::Event::Begin { txn, participants });
        self.coordinator_commands(c, commands);
    }

    fn handle(&mut self, event: Event) {
        let now = self.now();
        match event {
            Event::Deliver { to, message } => {
                let party = &mut self.parties[to as usize];
                if !party.up {
                    return;
                }
                match message {
                    Message::Prepare { txn, coordinator } => {
                        let ok = party.parts.contains_key(&txn);
                        let commands = party.participant.step(
                            now,
                            participant::Event::Prepare {
                                txn,
                                coordinator,
                                ok,
                            },
                        );
                        self.participant_commands(to, commands);
                    }
                    Message::Decision { .. } => {
                        let commands = party
                            .participant
                            .step(now, participant::Event::Received(message));
                        self.participant_commands(to, commands);
                    }
                    Message::Vote { .. } | Message::Ack { .. } | Message::Query { .. } => {
                        let commands = party
                            .coordinator
                            .step(now, coordinator::Event::Received(message));
                        self.coordinator_commands(to, commands);
                    }
                }
            }
            Event::Logged {
                party: p,
                life,
                record,
            } => {
                let party = &mut self.parties[p as usize];
                if !party.up || party.life != life {
                    return;
                }
                if let Record::Outcome { txn, commit, .. } = &record {
                    // Atomicity, as soon as it is written.
                    let (txn, commit) = (*txn, *commit);
                    for q in &self.begun[&txn] {
                        for r in &self.parties[*q as usize].log {
                            if let Record::Outcome {
                                txn: t, commit: c, ..
                            } = r
                            {
                                assert!(
                                    *t != txn || *c == commit,
                                    "{txn}: party {p} logs commit={commit}, party {q} logged commit={c}"
                                );
                            }
                        }
                    }
                }
                let party = &mut self.parties[p as usize];
                party.log.push(record.clone());
                match record {
                    Record::Prepare { txn, .. } => {
                        let commands = party
                            .participant
                            .step(now, participant::Event::PrepareLogged { txn });
                        self.participant_commands(p, commands);
                    }
                    Record::Outcome { txn, .. } => {
                        let commands = party
                            .participant
                            .step(now, participant::Event::OutcomeLogged { txn });
                        self.participant_commands(p, commands);
                    }
                    Record::Commit { txn, .. } => {
                        let commands = party
                            .coordinator
                            .step(now, coordinator::Event::Logged { txn });
                        self.coordinator_commands(p, commands);
                    }
                    Record::End { .. } => {}
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
        party.coordinator = Coordinator::new(p);
        party.participant = Participant::new(p);
        party.parts.clear();
        party.lock = None;
        let down_for = 20 + self.rng.below(80);
        self.at(down_for, Event::Restart { party: p });
    }

    /// The promoted backup takes over from the log.
    fn recover(&mut self, p: u8) {
        let now = self.now();
        let party = &mut self.parties[p as usize];
        party.up = true;
        let mut committed: BTreeMap<TxnId, Vec<u8>> = BTreeMap::new();
        let mut prepared: BTreeMap<TxnId, u8> = BTreeMap::new();
        let mut decided = Vec::new();
        for r in &party.log {
            match r {
                Record::Commit { txn, participants } => {
                    committed.insert(*txn, participants.clone());
                }
                Record::End { txn } => {
                    committed.remove(txn);
                }
                Record::Prepare { txn, coordinator } => {
                    prepared.insert(*txn, *coordinator);
                }
                Record::Outcome {
                    txn,
                    commit,
                    coordinator,
                } => {
                    prepared.remove(txn);
                    decided.push((*txn, *commit, *coordinator));
                }
            }
        }
        assert!(
            prepared.len() <= 1,
            "party {p} holds two prepared transactions: {prepared:?}"
        );
        party.lock = prepared.keys().next().copied();
        let commands = party.coordinator.step(
            now,
            coordinator::Event::Recovered {
                committed: committed.into_iter().collect(),
            },
        );
        self.coordinator_commands(p, commands);
        let party = &mut self.parties[p as usize];
        let commands = party.participant.step(
            now,
            participant::Event::Recovered {
                prepared: prepared.into_iter().collect(),
                decided,
            },
        );
        self.participant_commands(p, commands);
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
                let now = self.now();
                for p in 0..PARTIES {
                    let party = &mut self.parties[p as usize];
                    if !party.up {
                        continue;
                    }
                    let commands = party.coordinator.step(now, coordinator::Event::Tick);
                    self.coordinator_commands(p, commands);
                    let party = &mut self.parties[p as usize];
                    let commands = party.participant.step(now, participant::Event::Tick);
                    self.participant_commands(p, commands);
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

    /// After the faults: nothing is left undecided, and every transaction has one
    /// outcome everywhere, the one its client was told.
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
        }
        for (txn, participants) in &self.begun {
            let outcomes: Vec<Option<bool>> = participants
                .iter()
                .map(|p| {
                    self.parties[*p as usize].log.iter().find_map(|r| match r {
                        Record::Outcome { txn: t, commit, .. } if t == txn => Some(*commit),
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
            if let Some(answer) = self.answers.get(txn) {
                assert_eq!(
                    *answer, all_committed,
                    "{txn}: the client was told commit={answer}, the participants hold {outcomes:?}"
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
