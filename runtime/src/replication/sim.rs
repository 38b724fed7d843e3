//! A seeded simulation of one primary and its backups over a network that drops,
//! duplicates, delays and reorders messages. A failing seed replays exactly:
//! `SIM_SEED=N cargo test --release --lib replication`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::backup::{self, Backup};
use super::primary::{self, Primary};
use super::{Append, Epoch, NodeId, Reply, Seq};

/// xorshift64*: deterministic and good enough to schedule faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

enum Message {
    ToBackup(NodeId, Append<u64>),
    ToPrimary(NodeId, Reply),
    BackupDurable(NodeId, Seq),
}

struct Faults {
    drop_percent: u64,
    dup_percent: u64,
    delay_ms_max: u64,
}

struct Sim {
    rng: Rng,
    start: Instant,
    now_ms: u64,
    /// Deliveries by due time; the sequence number keeps same-time order stable.
    queue: BTreeMap<(u64, u64), Message>,
    queued: u64,
    primary: Primary<u64>,
    backups: BTreeMap<NodeId, Backup>,
    /// What each backup applied, in order.
    applied: BTreeMap<NodeId, Vec<u64>>,
    released: Seq,
    faults: Faults,
}

impl Sim {
    fn new(seed: u64, backups: &[NodeId], faults: Faults) -> Sim {
        let start = Instant::now();
        let (primary, commands) = Primary::new(start, Epoch(1), 1, Seq(0), Epoch(0), backups);
        let mut sim = Sim {
            rng: Rng(seed.max(1)),
            start,
            now_ms: 0,
            queue: BTreeMap::new(),
            queued: 0,
            primary,
            backups: backups
                .iter()
                .map(|&n| (n, Backup::new(Epoch(1), Seq(0), Epoch(0))))
                .collect(),
            applied: backups.iter().map(|&n| (n, Vec::new())).collect(),
            released: Seq(0),
            faults,
        };
        sim.primary_commands(commands);
        sim
    }

    fn now(&self) -> Instant {
        self.start + Duration::from_millis(self.now_ms)
    }

    fn deliver_later(&mut self, message: Message, lossy: bool) {
        if lossy && self.rng.chance(self.faults.drop_percent) {
            return;
        }
        let copies = if lossy && self.rng.chance(self.faults.dup_percent) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let due = self.now_ms + self.rng.below(self.faults.delay_ms_max + 1);
            self.queued += 1;
            let message = match &message {
                Message::ToBackup(n, a) => Message::ToBackup(*n, a.clone()),
                Message::ToPrimary(n, r) => Message::ToPrimary(*n, *r),
                Message::BackupDurable(n, s) => Message::BackupDurable(*n, *s),
            };
            self.queue.insert((due, self.queued), message);
        }
    }

    fn primary_commands(&mut self, commands: Vec<primary::Command<u64>>) {
        for command in commands {
            match command {
                primary::Command::Send { to, append } => {
                    self.deliver_later(Message::ToBackup(to, append), true)
                }
                primary::Command::Release { seq } => {
                    // The invariant under test: released means durable on every backup.
                    for (node, backup) in &self.backups {
                        assert!(
                            backup.seq_durable() >= seq,
                            "released {seq} but {node} has only {} durable",
                            backup.seq_durable()
                        );
                    }
                    assert!(seq > self.released, "releases only move forward");
                    self.released = seq;
                }
                other => panic!("unexpected primary command {other:?}"),
            }
        }
    }

    fn backup_commands(&mut self, node: NodeId, commands: Vec<backup::Command<u64>>) {
        for command in commands {
            match command {
                backup::Command::Apply { entries } => {
                    let log = self.applied.get_mut(&node).expect("known backup");
                    for (seq, payload) in entries {
                        assert_eq!(seq.0, log.len() as u64 + 1, "{node} applies in order");
                        assert_eq!(payload, seq.0, "{node} applies the primary's entry");
                        log.push(payload);
                    }
                    let seq = Seq(log.len() as u64);
                    // The fsync finishes a little later; it is not lossy.
                    self.deliver_later(Message::BackupDurable(node, seq), false);
                }
                backup::Command::Reply { reply, .. } => {
                    self.deliver_later(Message::ToPrimary(node, reply), true)
                }
                backup::Command::Resync { .. } => panic!("no divergence in a single epoch"),
            }
        }
    }

    /// Run until `until_ms`, appending one entry every `append_every_ms` up to `entries`.
    fn run(&mut self, until_ms: u64, entries: u64, append_every_ms: u64) {
        while self.now_ms < until_ms {
            if self.now_ms.is_multiple_of(append_every_ms) && self.primary.seq_last().0 < entries {
                let seq = self.primary.seq_last().next();
                let now = self.now();
                let commands = self.primary.step(
                    now,
                    primary::Event::Appended {
                        seq,
                        payload: seq.0,
                    },
                );
                self.primary_commands(commands);
                // The primary's own fsync, immediately for simplicity.
                let commands = self.primary.step(now, primary::Event::LocalDurable { seq });
                self.primary_commands(commands);
            }
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.now_ms {
                    break;
                }
                let message = entry.remove();
                let now = self.now();
                match message {
                    Message::ToBackup(node, append) => {
                        let from = NodeId(0);
                        let commands = self
                            .backups
                            .get_mut(&node)
                            .expect("backup")
                            .step(backup::Event::Received { from, append });
                        self.backup_commands(node, commands);
                    }
                    Message::BackupDurable(node, seq) => {
                        let commands = self
                            .backups
                            .get_mut(&node)
                            .expect("backup")
                            .step(backup::Event::Durable { seq });
                        self.backup_commands(node, commands);
                    }
                    Message::ToPrimary(from, reply) => {
                        let commands = self
                            .primary
                            .step(now, primary::Event::Replied { from, reply });
                        self.primary_commands(commands);
                    }
                }
            }
            if self.now_ms.is_multiple_of(10) {
                let now = self.now();
                let commands = self.primary.step(now, primary::Event::Tick);
                self.primary_commands(commands);
            }
            self.now_ms += 1;
        }
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SIM_SEED is a number")],
        Err(_) => (1..=40).collect(),
    }
}

#[test]
fn every_entry_is_released_once_durable_on_all_backups_despite_faults() {
    for seed in seeds() {
        let result = std::panic::catch_unwind(|| {
            let faults = Faults {
                drop_percent: 20,
                dup_percent: 10,
                delay_ms_max: 15,
            };
            let mut sim = Sim::new(seed, &[NodeId(1), NodeId(2)], faults);
            sim.run(3_000, 500, 3);
            // Heal the network and let resends finish the job.
            sim.faults = Faults {
                drop_percent: 0,
                dup_percent: 0,
                delay_ms_max: 1,
            };
            sim.run(6_000, 500, 3);
            assert_eq!(
                sim.released,
                Seq(500),
                "everything is released once the network heals"
            );
            for (node, log) in &sim.applied {
                assert_eq!(log.len(), 500, "{node} holds every entry");
            }
        });
        if result.is_err() {
            panic!("replication simulation failed with SIM_SEED={seed}");
        }
    }
}

#[test]
fn stale_epoch_fences_the_primary() {
    let now = Instant::now();
    let (mut primary, _) = Primary::<u64>::new(now, Epoch(1), 1, Seq(0), Epoch(0), &[NodeId(1)]);
    let mut backup = Backup::new(Epoch(1), Seq(0), Epoch(0));
    // The control plane promoted someone else: the backup knows epoch 2.
    backup.step::<u64>(backup::Event::EpochCommitted { epoch: Epoch(2) });
    let sent = primary.step(
        now,
        primary::Event::Replied {
            from: NodeId(1),
            reply: Reply::Ack {
                epoch: Epoch(1),
                session: 1,
                seq: Seq(0),
            },
        },
    );
    assert!(sent.is_empty());
    let commands = primary.step(
        now,
        primary::Event::Appended {
            seq: Seq(1),
            payload: 1,
        },
    );
    let primary::Command::Send { append, .. } = &commands[0] else {
        panic!("expected a send, got {commands:?}")
    };
    let replies = backup.step(backup::Event::Received {
        from: NodeId(0),
        append: append.clone(),
    });
    assert_eq!(
        replies,
        vec![backup::Command::Reply {
            to: NodeId(0),
            reply: Reply::Stale { epoch: Epoch(2) }
        }],
        "the backup rejects the stale epoch and says which one it knows"
    );
    let backup::Command::Reply { reply, .. } = replies[0] else {
        unreachable!()
    };
    let commands = primary.step(
        now,
        primary::Event::Replied {
            from: NodeId(1),
            reply,
        },
    );
    assert_eq!(commands, vec![primary::Command::Fenced { epoch: Epoch(2) }]);
    assert!(primary.is_fenced());
    assert!(
        primary
            .step(now, primary::Event::LocalDurable { seq: Seq(1) })
            .is_empty(),
        "a fenced primary releases nothing"
    );
}

#[test]
fn backup_ahead_of_a_new_primary_asks_for_a_snapshot() {
    let mut backup = Backup::new(Epoch(1), Seq(5), Epoch(1));
    let probe = Append::<u64> {
        epoch: Epoch(2),
        session: 1,
        seq_prev: Seq(4),
        epoch_prev: Epoch(1),
        entries: vec![],
    };
    let commands = backup.step(backup::Event::Received {
        from: NodeId(7),
        append: probe,
    });
    assert_eq!(
        commands,
        vec![
            backup::Command::Reply {
                to: NodeId(7),
                reply: Reply::Diverged {
                    epoch: Epoch(2),
                    session: 1,
                    seq_applied: Seq(5)
                }
            },
            backup::Command::Resync { from: NodeId(7) },
        ]
    );
    // Until the snapshot is installed, entries are refused, and every message is answered
    // with the same news (the first answer may have been lost).
    let append = Append {
        epoch: Epoch(2),
        session: 1,
        seq_prev: Seq(4),
        epoch_prev: Epoch(1),
        entries: vec![(Seq(5), 50)],
    };
    assert_eq!(
        backup.step(backup::Event::Received {
            from: NodeId(7),
            append
        }),
        vec![backup::Command::Reply {
            to: NodeId(7),
            reply: Reply::Diverged {
                epoch: Epoch(2),
                session: 1,
                seq_applied: Seq(5)
            }
        }]
    );
    backup.reset(Epoch(2), Seq(4), Epoch(1));
    let append = Append {
        epoch: Epoch(2),
        session: 1,
        seq_prev: Seq(4),
        epoch_prev: Epoch(1),
        entries: vec![(Seq(5), 50)],
    };
    assert_eq!(
        backup.step(backup::Event::Received {
            from: NodeId(7),
            append
        }),
        vec![backup::Command::Apply {
            entries: vec![(Seq(5), 50)]
        }]
    );
}

#[test]
fn non_contiguous_entries_from_the_network_are_ignored() {
    let mut backup = Backup::new(Epoch(1), Seq(0), Epoch(0));
    let append = Append {
        epoch: Epoch(1),
        session: 1,
        seq_prev: Seq(0),
        epoch_prev: Epoch(0),
        entries: vec![(Seq(1), 1u64), (Seq(3), 3)],
    };
    assert!(backup
        .step(backup::Event::Received {
            from: NodeId(0),
            append
        })
        .is_empty());
    assert_eq!(backup.seq_applied(), Seq(0));
}

#[test]
fn catching_up_backup_joins_the_live_set_when_it_holds_everything() {
    let now = Instant::now();
    let (mut primary, _) = Primary::<u64>::new(now, Epoch(1), 1, Seq(0), Epoch(0), &[]);
    for seq in 1..=3 {
        primary.step(
            now,
            primary::Event::Appended {
                seq: Seq(seq),
                payload: seq,
            },
        );
        primary.step(now, primary::Event::LocalDurable { seq: Seq(seq) });
    }
    assert_eq!(
        primary.seq_released(),
        Seq(3),
        "with no backups, the local log alone releases"
    );
    // A new backup restored from a snapshot at #1 must catch up on #2 and #3.
    let commands = primary.step(
        now,
        primary::Event::PeerAdded {
            node: NodeId(9),
            seq: Seq(1),
        },
    );
    assert!(
        commands.is_empty()
            || matches!(
                commands[0],
                primary::Command::NeedSnapshot { .. } | primary::Command::Send { .. }
            )
    );
    assert_eq!(
        primary.peer_state(NodeId(9)),
        Some(primary::PeerState::CatchingUp)
    );
}

/// Regression: a new primary whose first probe was lost re-probed at its later end; a
/// backup holding the old primary's unreleased entries answered with a gap, and the
/// primary counted it and sent its own entries on top: a mixed history, released.
#[test]
fn backup_with_the_old_primarys_unreleased_entries_is_resynchronised_not_extended() {
    let now = Instant::now();
    // The backup holds #1..#10 from the primary of epoch 1; #9 and #10 were never released.
    let mut backup = Backup::new(Epoch(1), Seq(10), Epoch(1));
    // The new primary of epoch 2 had only #1..#8.
    let (mut primary, _lost_probe) =
        Primary::<u64>::new(now, Epoch(2), 1, Seq(8), Epoch(1), &[NodeId(1)]);
    let mut released = Vec::new();
    for seq in 9..=11 {
        for c in primary.step(
            now,
            primary::Event::Appended {
                seq: Seq(seq),
                payload: 100 + seq,
            },
        ) {
            if let primary::Command::Release { seq } = c {
                released.push(seq);
            }
        }
        primary.step(now, primary::Event::LocalDurable { seq: Seq(seq) });
    }
    // Silence: the primary probes again, now at its end (#11, epoch 2).
    let later = now + primary::RESEND_AFTER;
    let probes = primary.step(later, primary::Event::Tick);
    let Some(primary::Command::Send { append, .. }) = probes.first() else {
        panic!("expected a probe, got {probes:?}")
    };
    let replies = backup.step(backup::Event::Received {
        from: NodeId(0),
        append: append.clone(),
    });
    let [backup::Command::Reply { reply, .. }] = replies.as_slice() else {
        panic!("expected one reply, got {replies:?}")
    };
    assert!(
        matches!(
            reply,
            Reply::Gap {
                seq: Seq(10),
                epoch_last: Epoch(1),
                ..
            }
        ),
        "{reply:?}"
    );
    let commands = primary.step(
        later,
        primary::Event::Replied {
            from: NodeId(1),
            reply: *reply,
        },
    );
    assert_eq!(
        commands,
        vec![primary::Command::NeedSnapshot { to: NodeId(1) }],
        "its #10 is not ours: resync"
    );
    assert!(
        released.is_empty(),
        "nothing is released while the backup lacks it: {released:?}"
    );
    assert_eq!(
        primary.seq_released(),
        Seq(0),
        "not even the entries it inherited: no backup confirmed them in this epoch"
    );
}

/// A backup that restarted and lost its place answers a probe with where its log ends;
/// a primary whose log holds that entry resumes from there without a snapshot.
#[test]
fn lagging_backup_with_a_matching_log_resumes_without_a_snapshot() {
    let now = Instant::now();
    let (mut primary, probes) =
        Primary::<u64>::new(now, Epoch(1), 1, Seq(0), Epoch(0), &[NodeId(1)]);
    let mut backup = Backup::new(Epoch(1), Seq(0), Epoch(0));
    for seq in 1..=5 {
        primary.step(
            now,
            primary::Event::Appended {
                seq: Seq(seq),
                payload: seq,
            },
        );
        primary.step(now, primary::Event::LocalDurable { seq: Seq(seq) });
    }
    // The backup answers the (empty, #0) probe: it matches, and the primary sends #1..#5.
    let primary::Command::Send { append, .. } = &probes[0] else {
        panic!("expected a probe")
    };
    let replies = backup.step(backup::Event::Received {
        from: NodeId(0),
        append: append.clone(),
    });
    let backup::Command::Reply { reply, .. } = replies[0] else {
        panic!("expected a reply, got {replies:?}")
    };
    let sends = primary.step(
        now,
        primary::Event::Replied {
            from: NodeId(1),
            reply,
        },
    );
    let primary::Command::Send { append, .. } = &sends[0] else {
        panic!("expected entries, got {sends:?}")
    };
    assert_eq!(append.entries.len(), 5);
    let applied = backup.step(backup::Event::Received {
        from: NodeId(0),
        append: append.clone(),
    });
    assert_eq!(applied.len(), 1);
    let acks = backup.step::<u64>(backup::Event::Durable { seq: Seq(5) });
    let backup::Command::Reply { reply, .. } = acks[0] else {
        panic!("expected an ack")
    };
    let released = primary.step(
        now,
        primary::Event::Replied {
            from: NodeId(1),
            reply,
        },
    );
    assert!(
        released.contains(&primary::Command::Release { seq: Seq(5) }),
        "{released:?}"
    );
}
