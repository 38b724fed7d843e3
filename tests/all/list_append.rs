//! The list-append workload over the two `lists` functions, recorded for `history`:
//! clients send transactions of appends (each a unique integer) and reads of a few
//! keys, a third of them across both functions in one transaction (two-phase commit
//! when their primaries are on different nodes), each retried through the next node
//! with its idempotency key until answered. At the end, a read of every key, and the
//! whole history checked for strict serializability, duplicates, phantoms and lost
//! acknowledged appends. Used by the nemesis and by the distributed-transaction tests
//! that kill a node at each step of two-phase commit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::history::{self, Op, Txn};
use crate::support::Api;
pub use understudy::sim_support::Rng;

pub const LISTS: [&str; 2] = ["lists-a", "lists-b"];
/// What the history calls the lists functions together: keys are `<function>/<key>`.
const LISTS_NAMESPACE: &str = "lists";
/// Appends per key before the clients move on to a fresh key (reads return whole lists).
const APPENDS_PER_KEY: u64 = 150;
/// How long a client keeps retrying one request (on every node in turn) before it
/// records it as unanswered.
const GIVE_UP: Duration = Duration::from_secs(20);

/// Send `method` with `input` and idempotency key `key`, starting at node `first`, on
/// to the next node after each failure, until answered or `GIVE_UP`. Returns the status
/// and body, and the unavailability window (ms) if there were failures.
pub fn ask(
    apis: &[Api],
    first: usize,
    function: &str,
    method: &str,
    input: &Value,
    key: Option<&str>,
) -> (Option<(u16, Value)>, Option<f64>) {
    let started = Instant::now();
    let mut failed_at: Option<Instant> = None;
    let mut at = first;
    loop {
        let reply = apis[at % apis.len()].try_invoke(function, method, input, key);
        match reply {
            // Answers: the function's own (200, or a 4xx that is its error or a conflict
            // limit) are final; 5xx and transport errors are retried elsewhere.
            Ok(r) if r.status < 500 => {
                let window = failed_at.map(|f| f.elapsed().as_secs_f64() * 1000.0);
                return (Some((r.status, r.body)), window);
            }
            _ => {
                failed_at.get_or_insert_with(Instant::now);
                if started.elapsed() > GIVE_UP {
                    return (None, None);
                }
                at += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `groups` of operations on functions as one list of operations on qualified keys.
fn qualified<'a>(groups: impl Iterator<Item = (&'a str, Vec<Op>)>) -> Vec<Op> {
    groups
        .flat_map(|(f, ops)| {
            ops.into_iter().map(move |op| match op {
                Op::Append(k, v) => Op::Append(format!("{f}/{k}"), v),
                Op::Read(k, l) => Op::Read(format!("{f}/{k}"), l),
            })
        })
        .collect()
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::Append(k, v) => json!(["append", k, v]),
        Op::Read(k, _) => json!(["read", k, null]),
    }
}

fn parse_ops(body: &Value) -> Option<Vec<Op>> {
    body.as_array()?
        .iter()
        .map(|op| {
            let key = op[1].as_str()?.to_owned();
            match op[0].as_str()? {
                "append" => Some(Op::Append(key, op[2].as_u64()?)),
                "read" => Some(Op::Read(
                    key,
                    Some(
                        op[2]
                            .as_array()?
                            .iter()
                            .map(Value::as_u64)
                            .collect::<Option<_>>()?,
                    ),
                )),
                _ => None,
            }
        })
        .collect()
}

/// What the clients recorded.
#[derive(Default)]
pub struct Recorded {
    pub txns: Vec<Txn>,
    /// Per request that needed retries: first failure to answer, in ms.
    pub windows: Vec<f64>,
    pub unanswered: usize,
    /// Transactions refused after too many conflicts (409): they did not happen.
    pub conflicts: usize,
    /// Transactions that spanned both functions, and how many were answered.
    pub across: usize,
    pub across_answered: usize,
}

/// The clients, running.
pub struct ListAppends {
    stop: Arc<AtomicBool>,
    recorded: Arc<Mutex<Recorded>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    epoch: Instant,
}

/// A finished run: the history's check, what was recorded, where the history is.
pub struct Checked {
    pub report: history::Report,
    pub recorded: Recorded,
    pub path: PathBuf,
}

impl ListAppends {
    /// Start `clients` clients through `apis` (the first of client `c` is node `c`),
    /// their choices drawn from `seed`; times are recorded from `epoch`.
    pub fn start(apis: Vec<Api>, clients: usize, seed: u64, epoch: Instant) -> ListAppends {
        let stop = Arc::new(AtomicBool::new(false));
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let next_value = Arc::new(AtomicU64::new(1));
        let threads = (0..clients)
            .map(|c| {
                let (apis, stop, recorded, next_value) = (
                    apis.clone(),
                    stop.clone(),
                    recorded.clone(),
                    next_value.clone(),
                );
                std::thread::spawn(move || {
                    client(c, &apis, seed, epoch, &stop, &recorded, &next_value)
                })
            })
            .collect();
        ListAppends {
            stop,
            recorded,
            threads,
            epoch,
        }
    }

    /// Transactions answered so far.
    pub fn answered(&self) -> usize {
        let r = self.recorded.lock().expect("recorded");
        r.txns.iter().filter(|t| t.answered.is_some()).count()
    }

    /// Stop the clients, read every key through `apis` (the cluster must be whole by
    /// now), check the history and write it, with `about`, to
    /// `target/tmp/<folder>/history-<name>.json`.
    pub fn finish(self, apis: &[Api], folder: &str, name: &str, about: Value) -> Checked {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a list-append client panicked");
        }
        let mut recorded = std::mem::take(&mut *self.recorded.lock().expect("recorded"));
        for f in LISTS {
            let prefix = format!("{f}/");
            let mut keys: Vec<String> = recorded
                .txns
                .iter()
                .flat_map(|t| t.ops.iter())
                .filter_map(|op| match op {
                    Op::Append(k, _) | Op::Read(k, _) => k.strip_prefix(&prefix).map(str::to_owned),
                })
                .collect();
            keys.sort();
            keys.dedup();
            let ops: Vec<Op> = keys.iter().map(|k| Op::Read(k.clone(), None)).collect();
            let input = Value::Array(ops.iter().map(op_json).collect());
            let sent = self.epoch.elapsed().as_secs_f64() * 1000.0;
            let (answer, _) = ask(apis, 0, f, "txn", &input, None);
            let (status, body) = answer.expect("the final read is answered");
            assert_eq!(status, 200, "{body}");
            let read = parse_ops(&body).expect("the final read parses");
            recorded.txns.push(Txn {
                function: LISTS_NAMESPACE.into(),
                ops: qualified([(f, read)].into_iter()),
                sent,
                answered: Some(self.epoch.elapsed().as_secs_f64() * 1000.0),
            });
        }
        let report = history::check(&recorded.txns);
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(folder);
        std::fs::create_dir_all(&dir).expect("create the history folder");
        let path = dir.join(format!("history-{name}.json"));
        std::fs::write(
            &path,
            serde_json::to_vec(&json!({
                "about": about,
                "transactions": recorded.txns,
                "report": report,
            }))
            .expect("JSON"),
        )
        .expect("write the history");
        Checked {
            report,
            recorded,
            path,
        }
    }
}

impl Checked {
    /// One line on what was checked.
    pub fn summary(&self) -> String {
        let (report, r) = (&self.report, &self.recorded);
        format!(
            "list-append: {} transactions ({} answered, {} unanswered, {} across both functions of which {} answered; {} refused after conflicts), {} appends and {} reads checked, {} graph edges, {} anomalies; history: {}",
            report.transactions,
            report.answered,
            r.unanswered,
            r.across,
            r.across_answered,
            r.conflicts,
            report.appends_checked,
            report.reads_checked,
            report.edges,
            report.anomalies.len(),
            self.path.display()
        )
    }
}

fn client(
    c: usize,
    apis: &[Api],
    seed: u64,
    epoch: Instant,
    stop: &AtomicBool,
    recorded: &Mutex<Recorded>,
    next_value: &AtomicU64,
) {
    let mut rng = Rng(seed ^ (0x1157 + c as u64));
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        // Every key is recorded with its function, as one namespace, so the checker
        // sees across functions.
        let across = rng.below(3) == 0;
        let first = rng.below(LISTS.len() as u64) as usize;
        let functions: Vec<&str> = if across {
            vec![LISTS[first], LISTS[1 - first]]
        } else {
            vec![LISTS[first]]
        };
        let window = next_value.load(Ordering::Relaxed) / APPENDS_PER_KEY;
        let mut groups: Vec<(&str, Vec<Op>)> = Vec::new();
        for f in &functions {
            let mut ops = Vec::new();
            for _ in 0..1 + rng.below(if across { 2 } else { 3 }) {
                let key = format!("k{}", window + rng.below(3));
                if rng.below(2) == 0 {
                    ops.push(Op::Append(key, next_value.fetch_add(1, Ordering::Relaxed)));
                } else {
                    ops.push(Op::Read(key, None));
                }
            }
            groups.push((f, ops));
        }
        let (method, input) = if across {
            let body: Vec<Value> = groups
                .iter()
                .map(|(f, ops)| json!([f, ops.iter().map(op_json).collect::<Vec<_>>()]))
                .collect();
            ("across", Value::Array(body))
        } else {
            (
                "txn",
                Value::Array(groups[0].1.iter().map(op_json).collect()),
            )
        };
        let sent = epoch.elapsed().as_secs_f64() * 1000.0;
        let key = format!("l{c}-{n}");
        let (answer, window) = ask(apis, c, functions[0], method, &input, Some(&key));
        let answered = epoch.elapsed().as_secs_f64() * 1000.0;
        let mut r = recorded.lock().expect("recorded");
        if let Some(w) = window {
            r.windows.push(w);
        }
        let asked = || qualified(groups.iter().map(|(f, ops)| (*f, ops.clone())));
        let (txn_ops, answered) = match answer {
            Some((200, body)) => {
                let answered_groups = if across {
                    body.as_array().and_then(|gs| {
                        gs.iter()
                            .map(|g| Some((g[0].as_str()?.to_owned(), parse_ops(&g[1])?)))
                            .collect::<Option<Vec<_>>>()
                    })
                } else {
                    parse_ops(&body).map(|ops| vec![(functions[0].to_owned(), ops)])
                };
                match answered_groups {
                    Some(gs) => (
                        qualified(gs.iter().map(|(f, ops)| (f.as_str(), ops.clone()))),
                        Some(answered),
                    ),
                    None => (asked(), Some(answered)),
                }
            }
            // Given up after too many conflicts: it did not happen (an append of it seen
            // in a read would be a phantom).
            Some((409, _)) => {
                r.conflicts += 1;
                continue;
            }
            Some((status, body)) => {
                panic!("the lists function refused a transaction: {status} {body}")
            }
            None => {
                r.unanswered += 1;
                (asked(), None)
            }
        };
        if across {
            r.across += 1;
            r.across_answered += usize::from(answered.is_some());
        }
        r.txns.push(Txn {
            function: LISTS_NAMESPACE.into(),
            ops: txn_ops,
            sent,
            answered,
        });
    }
}
