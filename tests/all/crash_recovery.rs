//! `kill -9` in the middle of a concurrent write workload loses no acknowledged commit
//! and leaves no partial transaction: after a restart on the same data directory, each
//! client's state is exactly what it was told, give or take its one unanswered request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{wait_until, wal_snapshots, Api, NodeOptions, NodeProcess, Reply};

/// Client threads writing at once.
const CLIENTS: usize = 16;
/// Acknowledged commits (over all clients) to wait for before the kill.
const ACKED_BEFORE_KILL: u64 = 2000;
/// Bound on how long the workload may take to reach `ACKED_BEFORE_KILL`.
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// A config that takes a snapshot (and truncates the log) every few KiB of log.
const SMALL_CHECKPOINTS: &str = "checkpoint_log_bytes = 8192\n";

/// What one client sent: requests are numbered from 1, and each waits for the answer to
/// the one before.
#[derive(Debug, Default)]
struct ClientLog {
    /// The number of the last request whose answer was 200.
    acked: AtomicU64,
    /// The number of the last request sent (answered or not).
    attempted: AtomicU64,
}

/// Run `request(api, client, seq)` from `CLIENTS` threads, each numbering its requests
/// 1, 2, 3..., until `ACKED_BEFORE_KILL` are acknowledged in all; then `kill -9` the node
/// while they are still sending, and return what each client saw.
///
/// Panics when a request gets an answer other than 200, or fails before the kill.
fn run_and_kill9(
    node: &mut NodeProcess,
    request: impl Fn(&Api, usize, u64) -> reqwest::Result<Reply> + Send + Sync + 'static,
) -> Vec<Arc<ClientLog>> {
    let request = Arc::new(request);
    let logs: Vec<Arc<ClientLog>> = (0..CLIENTS)
        .map(|_| Arc::new(ClientLog::default()))
        .collect();
    let acked_total = Arc::new(AtomicU64::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let unexpected = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(client, log)| {
            let (api, request, log) = (node.api().clone(), request.clone(), log.clone());
            let (acked_total, killed, unexpected) =
                (acked_total.clone(), killed.clone(), unexpected.clone());
            thread::spawn(move || {
                for seq in 1.. {
                    log.attempted.store(seq, Ordering::SeqCst);
                    match request(&api, client, seq) {
                        Ok(reply) if reply.status == 200 => {
                            log.acked.store(seq, Ordering::SeqCst);
                            acked_total.fetch_add(1, Ordering::SeqCst);
                        }
                        // The kill breaks connections; it never produces an answer,
                        // so any answer but 200 is a failure, before the kill or after.
                        Err(_) if killed.load(Ordering::SeqCst) => return,
                        Ok(reply) => {
                            unexpected
                                .lock()
                                .expect("not poisoned")
                                .push(format!("{} {}", reply.status, reply.text));
                            return;
                        }
                        Err(e) => {
                            unexpected
                                .lock()
                                .expect("not poisoned")
                                .push(format!("transport error before the kill: {e}"));
                            return;
                        }
                    }
                }
            })
        })
        .collect();

    let reached = || {
        acked_total.load(Ordering::SeqCst) >= ACKED_BEFORE_KILL
            || !unexpected.lock().expect("not poisoned").is_empty()
    };
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            "the workload's acknowledged commits",
            WORKLOAD_TIMEOUT,
            reached,
        )
    }));
    // Mark the kill first, so that the errors it causes are expected.
    killed.store(true, Ordering::SeqCst);
    node.kill9();
    for worker in workers {
        worker.join().expect("a client thread panicked");
    }
    if let Err(panic) = waited {
        std::panic::resume_unwind(panic);
    }
    let unexpected = unexpected.lock().expect("not poisoned");
    assert!(
        unexpected.is_empty(),
        "requests failed before the kill: {unexpected:?}"
    );
    let in_flight = logs
        .iter()
        .filter(|l| l.attempted.load(Ordering::SeqCst) > l.acked.load(Ordering::SeqCst))
        .count();
    eprintln!(
        "killed after {} acknowledged requests, with {in_flight} of {CLIENTS} clients waiting for an answer",
        acked_total.load(Ordering::SeqCst)
    );
    logs
}

#[test]
fn acknowledged_commits_survive_sigkill() {
    check_acknowledged_commits_survive_sigkill(NodeOptions::default());
}

#[test]
fn acknowledged_commits_survive_sigkill_during_checkpoints() {
    // Checkpoints every few KiB: the kill lands among snapshots being written, segments
    // rotating and old ones being deleted.
    let node = check_acknowledged_commits_survive_sigkill(NodeOptions {
        config_toml: Some(SMALL_CHECKPOINTS.into()),
        ..Default::default()
    });
    assert!(
        !wal_snapshots(&node.wal_dir()).is_empty(),
        "the workload took no snapshot"
    );
}

/// Client i writes its request numbers, in order, to its own key `c<i>`; after the
/// crash each key holds at least the last acknowledged number. Returns the restarted node.
fn check_acknowledged_commits_survive_sigkill(options: NodeOptions) -> NodeProcess {
    let mut node = NodeProcess::start_with(options);
    node.api().deploy_component("h", "hostile");

    let logs = run_and_kill9(&mut node, |api, client, seq| {
        let input = json!({ "key": format!("c{client}"), "value": seq.to_string() });
        api.try_invoke("h", "put", &input, Some(&format!("c{client}-{seq}")))
    });

    node.restart();
    let api = node.api();
    for (client, log) in logs.iter().enumerate() {
        let (acked, attempted) = (
            log.acked.load(Ordering::SeqCst),
            log.attempted.load(Ordering::SeqCst),
        );
        let stored = &api.ok("h", "get", json!({ "key": format!("c{client}") }))["value"];
        let stored: u64 = match stored {
            Value::Null => 0,
            v => v
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("client {client} stored {v}")),
        };
        assert!(
            (acked..=attempted).contains(&stored),
            "client {client}: stored {stored}, but {acked} was acknowledged and {attempted} was the last sent"
        );
        // The acknowledged answer itself is remembered with its commit.
        if acked > 0 {
            let input = json!({ "key": format!("c{client}"), "value": acked.to_string() });
            let retry = api
                .invoke_keyed("h", "put", &input, &format!("c{client}-{acked}"))
                .expect_status(200);
            assert!(
                retry.replayed(),
                "client {client}: the answer to acknowledged request {acked} was lost"
            );
        }
    }
    let acked: u64 = logs.iter().map(|l| l.acked.load(Ordering::SeqCst)).sum();
    assert!(acked >= ACKED_BEFORE_KILL);
    node
}

#[test]
fn state_and_answers_survive_checkpoints_and_sigkill() {
    const PUTS: usize = 300;
    let mut node = NodeProcess::start_with(NodeOptions {
        config_toml: Some(SMALL_CHECKPOINTS.into()),
        ..Default::default()
    });
    let api = node.api().clone();
    api.deploy_component("h", "hostile");
    for i in 0..PUTS {
        let input = json!({ "key": format!("k/{i:07}"), "value": i.to_string() });
        api.invoke_keyed("h", "put", &input, &format!("p{i}"))
            .expect_status(200);
    }
    let wal_dir = node.wal_dir();
    wait_until("a snapshot in the log directory", WORKLOAD_TIMEOUT, || {
        !wal_snapshots(&wal_dir).is_empty()
    });

    node.kill9();
    node.restart();
    let api = node.api();
    assert_eq!(api.describe("h").expect_status(200).body["keys"], PUTS);
    let entries = api.ok("h", "scan", json!({ "prefix": "k/", "limit": 1000 }))["entries"].clone();
    let expected: Vec<Value> = (0..PUTS)
        .map(|i| json!([format!("k/{i:07}"), i.to_string()]))
        .collect();
    assert_eq!(entries, Value::Array(expected));
    // Answers remembered in the snapshot, and in the log after it.
    for i in [0, PUTS / 2, PUTS - 1] {
        let input = json!({ "key": format!("k/{i:07}"), "value": i.to_string() });
        let retry = api
            .invoke_keyed("h", "put", &input, &format!("p{i}"))
            .expect_status(200);
        assert!(retry.replayed(), "the answer for key p{i} was lost");
    }

    // The log recovered on top of the snapshot takes new records, and a second crash
    // keeps them (and everything before).
    api.ok("h", "put", json!({ "key": "after", "value": "restart" }));
    node.kill9();
    node.restart();
    let api = node.api();
    assert_eq!(
        api.ok("h", "get", json!({ "key": "after" })),
        json!({ "value": "restart" })
    );
    assert_eq!(api.describe("h").expect_status(200).body["keys"], PUTS + 1);
}

#[test]
fn bank_total_is_conserved_across_sigkill() {
    const INITIAL: u64 = 1_000_000;
    let mut node = NodeProcess::start();
    let api = node.api().clone();
    api.deploy_component("bank", "bank");
    for client in 0..CLIENTS {
        api.ok(
            "bank",
            "open",
            json!({ "account": format!("a{client}"), "initial": INITIAL }),
        );
        api.ok("bank", "open", json!({ "account": format!("b{client}") }));
    }

    // Client i moves 1 from `a<i>` to `b<i>` per request: `b<i>` counts its commits.
    let logs = run_and_kill9(&mut node, |api, client, seq| {
        let input =
            json!({ "from": format!("a{client}"), "to": format!("b{client}"), "amount": 1 });
        api.try_invoke(
            "bank",
            "transfer",
            &input,
            Some(&format!("t{client}-{seq}")),
        )
    });

    node.restart();
    let api = node.api();
    let balance = |account: String| {
        api.ok("bank", "balance", json!({ "account": account }))["balance"]
            .as_u64()
            .expect("a number")
    };
    for (client, log) in logs.iter().enumerate() {
        let (acked, attempted) = (
            log.acked.load(Ordering::SeqCst),
            log.attempted.load(Ordering::SeqCst),
        );
        let (a, b) = (balance(format!("a{client}")), balance(format!("b{client}")));
        assert_eq!(
            a + b,
            INITIAL,
            "client {client}: half a transfer survived (a{client} = {a}, b{client} = {b})"
        );
        assert!(
            (acked..=attempted).contains(&b),
            "client {client}: {b} transfers committed, but {acked} were acknowledged and {attempted} sent"
        );
    }
    let total = api.ok("bank", "total", Value::Null);
    assert_eq!(
        total,
        json!({ "total": INITIAL * CLIENTS as u64, "accounts": 2 * CLIENTS })
    );
}
