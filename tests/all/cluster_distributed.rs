//! Transactions across functions whose primaries are on different nodes (two-phase
//! commit) over real processes: the `transfer` and `orders` examples commit on every
//! node or on none; conflicting transactions across nodes neither deadlock nor lose
//! money; a kill of the coordinator's or a participant's node under load loses nothing
//! acknowledged and leaves no transaction half-applied.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_failover::{wait_for, SETTLE_TIMEOUT};
use crate::cluster_form::{
    cluster_init, config, converged_leader, members3, start_cluster, status,
};
use crate::list_append::{ListAppends, LISTS};
use crate::support::{Api, NodeOptions, NodeProcess};

const BANKS: [&str; 2] = ["bank-east", "bank-west"];
const ACCOUNTS: [&str; 4] = ["a", "b", "c", "d"];
const INITIAL: u64 = 1000;

/// Deploy `component` as `name` with `replicas` copies through `node`; returns where
/// its primary went.
pub(crate) fn deploy(node: &NodeProcess, name: &str, component_name: &str, replicas: u8) -> u64 {
    crate::cluster_replication::deploy(node, name, component_name, replicas)["primary"]
        .as_u64()
        .expect("primary")
}

/// The primary of `function` as `node` sees it now.
pub(crate) fn primary_of(node: &NodeProcess, function: &str) -> Option<u64> {
    status(node)?["functions"]
        .as_array()?
        .iter()
        .find(|f| f["name"] == function)?["primary"]
        .as_u64()
}

/// Two banks with their primaries on different nodes, each with `ACCOUNTS` holding
/// `INITIAL`, and `transfer`; returns the nodes.
fn bank_cluster(certs: &std::path::Path) -> Vec<NodeProcess> {
    cluster_init(certs, &[1, 2, 3]);
    // Each node can be made to die at a failpoint named in its file (see `failpoint`).
    let members = members3();
    let nodes: Vec<NodeProcess> = members
        .iter()
        .map(|(id, _, _)| {
            NodeProcess::start_with(NodeOptions {
                config_toml: Some(config(*id, certs, &members)),
                env: vec![(
                    "UNDERSTUDY_FAILPOINT".into(),
                    format!("file:{}", failpoint_file(certs, *id).display()),
                )],
                ..NodeOptions::default()
            })
        })
        .collect();
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let east = deploy(&nodes[0], "bank-east", "bank", 2);
    let west = deploy(&nodes[0], "bank-west", "bank", 2);
    assert_ne!(
        east, west,
        "placement spreads primaries over the non-master nodes"
    );
    let transfer = deploy(&nodes[0], "transfer", "transfer", 2);
    println!("primaries: bank-east {east}, bank-west {west}, transfer {transfer}");
    for bank in BANKS {
        for account in ACCOUNTS {
            nodes[0].api().ok(
                bank,
                "open",
                json!({ "account": account, "initial": INITIAL }),
            );
        }
    }
    nodes
}

fn balance(api: &Api, bank: &str, account: &str) -> u64 {
    api.ok(bank, "balance", json!({ "account": account }))["balance"]
        .as_u64()
        .expect("balance")
}

fn total(api: &Api) -> u64 {
    let t = api.ok("transfer", "total", json!({ "banks": BANKS }));
    assert_eq!(t["accounts"], 8, "{t}");
    t["total"].as_u64().expect("total")
}

fn transfer_input(from: (&str, &str), to: (&str, &str), amount: u64) -> Value {
    json!({
        "from": { "bank": from.0, "account": from.1 },
        "to": { "bank": to.0, "account": to.1 },
        "amount": amount,
    })
}

#[test]
fn a_transfer_across_nodes_commits_on_both_or_neither() {
    let certs = tempfile::tempdir().expect("tempdir");
    let nodes = bank_cluster(certs.path());
    let api = nodes[0].api().clone();

    let moved = api.ok(
        "transfer",
        "transfer",
        transfer_input(("bank-east", "a"), ("bank-west", "b"), 300),
    );
    assert_eq!(moved, json!({ "from_balance": 700, "to_balance": 1300 }));
    assert_eq!(balance(&api, "bank-east", "a"), 700);
    assert_eq!(balance(&api, "bank-west", "b"), 1300);

    // The deposit fails on the other node: the withdrawal, already made, goes too.
    api.invoke(
        "transfer",
        "transfer",
        &transfer_input(("bank-east", "a"), ("bank-west", "nobody"), 100),
    )
    .expect_error(422, "no-account");
    assert_eq!(
        balance(&api, "bank-east", "a"),
        700,
        "the withdrawal was undone"
    );

    // The withdrawal fails: nothing happens anywhere.
    api.invoke(
        "transfer",
        "transfer",
        &transfer_input(("bank-west", "c"), ("bank-east", "d"), 5000),
    )
    .expect_error(422, "overdraft");
    assert_eq!(balance(&api, "bank-east", "d"), INITIAL);
    assert_eq!(balance(&api, "bank-west", "c"), INITIAL);

    // Both directions, through every node.
    for (i, node) in nodes.iter().enumerate() {
        let (from, to) = if i % 2 == 0 {
            BANKS
        } else {
            [BANKS[1], BANKS[0]]
        }
        .into();
        node.api().ok(
            "transfer",
            "transfer",
            transfer_input((from, "c"), (to, "d"), 10),
        );
    }
    assert_eq!(total(&api), 8 * INITIAL, "money is conserved");

    // Every copy of each bank holds the same state as its primary.
    copies_agree(&nodes);
}

#[test]
fn an_order_reserves_charges_and_records_in_one_transaction_or_not_at_all() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let nodes = start_cluster(certs.path(), &members3());
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let placed: Vec<u64> = [
        ("inventory", "inventory"),
        ("payments", "bank"),
        ("orders", "orders"),
    ]
    .iter()
    .map(|(name, component)| deploy(&nodes[0], name, component, 2))
    .collect();
    println!("primaries: inventory, payments, orders on {placed:?}");
    let api = nodes[1].api().clone();
    api.ok(
        "inventory",
        "stock",
        json!({ "item": "apple", "quantity": 10 }),
    );
    api.ok(
        "payments",
        "open",
        json!({ "account": "carol", "initial": 100 }),
    );

    let order = |id: &str, quantity: u64, amount: u64| {
        json!({
            "order": id,
            "customer": "carol",
            "items": [{ "item": "apple", "quantity": quantity }],
            "amount": amount,
        })
    };
    let placed = api.ok("orders", "place", order("o1", 3, 30));
    assert_eq!(placed["status"], "placed");
    assert_eq!(placed["balance"], 70);
    let item = api.ok("inventory", "item", json!({ "item": "apple" }));
    assert_eq!(
        (item["available"].as_u64(), item["reserved"].as_u64()),
        (Some(7), Some(3))
    );

    // Carol cannot pay: the reservation made before the charge goes with it.
    api.invoke("orders", "place", &order("o2", 2, 500))
        .expect_error(422, "overdraft");
    let item = api.ok("inventory", "item", json!({ "item": "apple" }));
    assert_eq!(
        (item["available"].as_u64(), item["reserved"].as_u64()),
        (Some(7), Some(3))
    );
    api.invoke("orders", "get", &json!({ "order": "o2" }))
        .expect_error(422, "no-order");
    api.invoke("inventory", "order-status", &json!({ "order": "o2" }))
        .expect_error(422, "no-order");

    // Not enough stock: the charge never happens.
    api.invoke("orders", "place", &order("o3", 50, 10))
        .expect_error(422, "insufficient");
    assert_eq!(
        api.ok("payments", "balance", json!({ "account": "carol" }))["balance"],
        70
    );
    // An order id used before is refused; nothing moves.
    api.invoke("orders", "place", &order("o1", 1, 10))
        .expect_error(422, "exists");
    assert_eq!(
        api.ok("payments", "balance", json!({ "account": "carol" }))["balance"],
        70
    );
    assert_eq!(
        api.ok("orders", "get", json!({ "order": "o1" }))["amount"],
        30
    );
}

/// One answered transfer: its idempotency key, input, status and answer.
#[derive(Clone, Debug)]
struct Answered {
    key: String,
    input: Value,
    status: u16,
    body: Value,
}

/// Clients moving money between accounts of both banks through `transfer` (so every
/// transfer between the banks is a transaction across nodes), each request with its own
/// idempotency key and retried with it, through any node, until answered; and a reader
/// summing both banks in one transaction, which must see the whole amount every time.
struct Transfers {
    stop: Arc<AtomicBool>,
    apis: Arc<Mutex<Vec<Api>>>,
    answered: Arc<Mutex<Vec<Answered>>>,
    totals_read: Arc<AtomicU64>,
    wrong_totals: Arc<Mutex<Vec<u64>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Transfers {
    fn start(apis: Vec<Api>, clients: usize) -> Transfers {
        let stop = Arc::new(AtomicBool::new(false));
        let apis = Arc::new(Mutex::new(apis));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let totals_read = Arc::new(AtomicU64::new(0));
        let wrong_totals = Arc::new(Mutex::new(Vec::new()));
        let mut threads: Vec<std::thread::JoinHandle<()>> = (0..clients)
            .map(|c| {
                let (stop, apis, answered) = (stop.clone(), apis.clone(), answered.clone());
                std::thread::spawn(move || {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let from_bank = BANKS[(n + c) % 2];
                        let to_bank = BANKS[(n / 2 + c) % 2];
                        let from = ACCOUNTS[(n + c) % ACCOUNTS.len()];
                        let mut to = ACCOUNTS[(n + 3 * c + 1) % ACCOUNTS.len()];
                        if from_bank == to_bank && from == to {
                            to = ACCOUNTS[(n + c + 1) % ACCOUNTS.len()];
                        }
                        let input =
                            transfer_input((from_bank, from), (to_bank, to), n as u64 % 7 + 1);
                        let key = format!("c{c}-t{n}");
                        let started = Instant::now();
                        let mut tries = 0usize;
                        loop {
                            let api = {
                                let apis = apis.lock().expect("apis");
                                apis[(c + tries) % apis.len()].clone()
                            };
                            tries += 1;
                            match api.try_invoke("transfer", "transfer", &input, Some(&key)) {
                                Ok(r) if r.status == 200 || r.status == 422 => {
                                    answered.lock().expect("answered").push(Answered {
                                        key: key.clone(),
                                        input: input.clone(),
                                        status: r.status,
                                        body: r.body,
                                    });
                                    break;
                                }
                                other => {
                                    if started.elapsed() > 2 * SETTLE_TIMEOUT {
                                        panic!("transfer {key} got no answer: {other:?}");
                                    }
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        {
            let (stop, apis, read, wrong) = (
                stop.clone(),
                apis.clone(),
                totals_read.clone(),
                wrong_totals.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let api = {
                        let apis = apis.lock().expect("apis");
                        apis[n % apis.len()].clone()
                    };
                    if let Ok(r) =
                        api.try_invoke("transfer", "total", &json!({ "banks": BANKS }), None)
                    {
                        if r.status == 200 {
                            read.fetch_add(1, Ordering::Relaxed);
                            let total = r.body["total"].as_u64().unwrap_or(0);
                            if total != 8 * INITIAL {
                                wrong.lock().expect("wrong").push(total);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        Transfers {
            stop,
            apis,
            answered,
            totals_read,
            wrong_totals,
            threads,
        }
    }

    fn set_apis(&self, apis: Vec<Api>) {
        *self.apis.lock().expect("apis") = apis;
    }

    fn committed(&self) -> usize {
        self.answered
            .lock()
            .expect("answered")
            .iter()
            .filter(|a| a.status == 200)
            .count()
    }

    /// Stop; returns what was answered. Panics if any read of the total was wrong, or a
    /// client got no answer (showing the nodes' state and logs).
    fn finish(self, nodes: &[NodeProcess]) -> Vec<Answered> {
        self.stop.store(true, Ordering::Relaxed);
        let mut panicked = 0;
        for t in self.threads {
            panicked += usize::from(t.join().is_err());
        }
        if panicked > 0 {
            wait_or_dump(nodes, &format!("{panicked} clients got answers"), || false);
        }
        let wrong = self.wrong_totals.lock().expect("wrong").clone();
        let read = self.totals_read.load(Ordering::Relaxed);
        assert!(read > 0, "the total was never read");
        assert!(
            wrong.is_empty(),
            "{} of {read} reads of the total across both banks saw money created or lost: {wrong:?}",
            wrong.len()
        );
        println!("totals read: {read}, all {}", 8 * INITIAL);
        let answered = self.answered.lock().expect("answered").clone();
        answered
    }
}

fn apis(nodes: &[NodeProcess]) -> Vec<Api> {
    nodes.iter().map(|n| n.api().clone()).collect()
}

/// After the faults: the total is whole, every answered transfer replays its answer
/// (so each happened exactly once, as answered), and every copy of each bank agrees.
fn check_whole(nodes: &[NodeProcess], answered: &[Answered]) {
    let api = nodes[0].api().with_timeout(Duration::from_secs(30));
    assert_eq!(total(&api), 8 * INITIAL, "money was created or lost");
    for a in answered {
        let reply = api.invoke_keyed("transfer", "transfer", &a.input, &a.key);
        assert_eq!(
            (reply.status, &reply.body),
            (a.status, &a.body),
            "transfer {} changed its answer",
            a.key
        );
        assert!(
            reply.replayed(),
            "transfer {} ran again: it was lost",
            a.key
        );
    }
    copies_agree(nodes);
}

/// Every copy of each bank holds the same state (once replication has settled).
fn copies_agree(nodes: &[NodeProcess]) {
    for bank in BANKS {
        let started = Instant::now();
        loop {
            // The copies of the current assignment (a node dropped from it may keep an
            // old copy it no longer follows).
            let copies: Vec<Value> = nodes
                .iter()
                .filter(|n| {
                    status(n)
                        .and_then(|s| {
                            s["functions"]
                                .as_array()?
                                .iter()
                                .find(|f| f["name"] == bank)
                                .map(|f| !f["here"].is_null())
                        })
                        .unwrap_or(false)
                })
                .filter_map(|n| {
                    let reply = n.api().get(&format!("/v1/functions/{bank}")).ok()?;
                    (reply.status == 200).then_some(reply.body)
                })
                .collect();
            if copies.len() >= 2
                && copies
                    .windows(2)
                    .all(|w| w[0]["state_digest"] == w[1]["state_digest"])
            {
                break;
            }
            if started.elapsed() > SETTLE_TIMEOUT {
                for n in nodes {
                    println!("--- status: {:?}", status(n));
                }
                panic!("the copies of {bank} never agreed: {copies:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Nodes by id (1-based) in a 3-node cluster.
fn index(id: u64) -> usize {
    id as usize - 1
}

fn done_waiting(started: Instant) -> bool {
    started.elapsed() > SETTLE_TIMEOUT
}

/// Wait until `done`; shows the cluster and the nodes' logs if it never happens.
fn wait_or_dump(nodes: &[NodeProcess], what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        if done_waiting(started) {
            let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("distributed");
            let _ = std::fs::create_dir_all(&dir);
            for (i, n) in nodes.iter().enumerate() {
                println!("--- node {}: {:?}", i + 1, status(n));
                let path = dir.join(format!("{}-node{}.log", std::process::id(), i + 1));
                let _ = std::fs::write(&path, n.log());
                println!("--- its log: {}", path.display());
            }
            panic!("never happened: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every function's primary is ready again on a live node and `transfer` answers.
fn wait_served(nodes: &[NodeProcess], api: &Api) {
    wait_or_dump(
        nodes,
        "transfers are served again",
        || matches!(api.try_invoke("transfer", "total", &json!({ "banks": BANKS }), None), Ok(r) if r.status == 200),
    );
}

/// With node `victim` gone: `load` goes through the others, which serve transfers again
/// and go on committing.
fn survivors_take_over(nodes: &[NodeProcess], load: &Transfers, victim: u64) {
    let live: Vec<Api> = apis(nodes)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != index(victim))
        .map(|(_, a)| a)
        .collect();
    load.set_apis(live.clone());
    wait_served(nodes, &live[0]);
    let before = load.committed();
    wait_or_dump(nodes, "transfers go on", || load.committed() > before + 30);
}

/// Kill -9 node `victim` under `load`, wait until transfers are served by the others
/// and go on, then bring it back.
fn kill_and_restart(nodes: &mut [NodeProcess], load: &Transfers, victim: u64) {
    nodes[index(victim)].kill9();
    survivors_take_over(nodes, load, victim);
    nodes[index(victim)].restart();
    load.set_apis(apis(nodes));
    // Before anything else fails: every function has its backup again, for a second
    // (a node just back may still be taken for dead once, and lose its copies).
    let mut settled_since: Option<Instant> = None;
    wait_or_dump(nodes, "every function has a caught-up backup again", || {
        let settled = status(&nodes[0]).is_some_and(|s| {
            s["functions"].as_array().is_some_and(|fs| {
                fs.iter().all(|f| {
                    f["backups"].as_array().map(Vec::len) == Some(1)
                        && f["catching_up"].as_array().is_some_and(Vec::is_empty)
                })
            })
        });
        match (settled, settled_since) {
            (false, _) => settled_since = None,
            (true, None) => settled_since = Some(Instant::now()),
            (true, Some(_)) => {}
        }
        settled_since.is_some_and(|t| t.elapsed() > Duration::from_secs(1))
    });
}

#[test]
fn killing_a_participant_then_the_coordinator_under_load_leaves_every_transfer_whole() {
    let certs = tempfile::tempdir().expect("tempdir");
    let mut nodes = bank_cluster(certs.path());
    let load = Transfers::start(apis(&nodes), 6);
    wait_for("some transfers commit", || load.committed() > 30);

    // A participant: the primary of a bank on another node than transfer's.
    let coordinator = primary_of(&nodes[0], "transfer").expect("transfer's primary");
    let participant = BANKS
        .iter()
        .filter_map(|b| primary_of(&nodes[0], b))
        .find(|p| *p != coordinator)
        .expect("placement puts the banks' primaries on two nodes");
    println!("killing node {participant}, a participant's (the coordinator is on {coordinator})");
    kill_and_restart(&mut nodes, &load, participant);

    let before = load.committed();
    wait_for("transfers go on", || load.committed() > before + 30);
    let coordinator = primary_of(&nodes[0], "transfer").expect("transfer's primary");
    println!("killing node {coordinator}, the coordinator's");
    kill_and_restart(&mut nodes, &load, coordinator);
    std::thread::sleep(Duration::from_millis(500));
    let answered = load.finish(&nodes);
    println!(
        "answered {}, committed {}",
        answered.len(),
        answered.iter().filter(|a| a.status == 200).count()
    );
    check_whole(&nodes, &answered);
}

#[test]
fn conflicting_transfers_across_nodes_neither_deadlock_nor_lose_money() {
    let certs = tempfile::tempdir().expect("tempdir");
    let nodes = bank_cluster(certs.path());
    // Transfers in both directions between the same few accounts: each takes the two
    // banks' locks in opposite orders on different nodes.
    let load = Transfers::start(apis(&nodes), 8);
    std::thread::sleep(Duration::from_secs(3));
    let committed = load.committed();
    let answered = load.finish(&nodes);
    println!("answered {}, committed {committed}", answered.len());
    assert!(
        committed > 50,
        "transfers made little progress: {committed}"
    );
    check_whole(&nodes, &answered);
}

/// A call that only reads a function on another node must not carry out a commit that
/// node has not yet replicated: with the bank's only backup paused (and failure detection
/// slowed so it stays a backup), a deposit there is applied but never released, and a
/// `transfer/total` through the coordinator's node must not show it (it waits, or fails)
/// until the backup holds it. Found by the nemesis under load: the caller answered the
/// client with a read part's unreleased state, the commit was then lost in a failover
/// and retried after another, and the history had two orders for one list.
#[test]
fn a_read_through_another_node_never_shows_an_unreplicated_commit() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let members = members3();
    let nodes: Vec<NodeProcess> = members
        .iter()
        .map(|(id, _, _)| {
            let mut toml = config(*id, certs.path(), &members);
            toml.push_str("failure_timeout_ms = 60000\n");
            NodeProcess::start_with(NodeOptions {
                config_toml: Some(toml),
                ..NodeOptions::default()
            })
        })
        .collect();
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    for bank in BANKS {
        deploy(&nodes[0], bank, "bank", 2);
        nodes[0]
            .api()
            .ok(bank, "open", json!({ "account": "a", "initial": INITIAL }));
    }
    let coordinator = deploy(&nodes[0], "transfer", "transfer", 1);
    // A bank whose primary and backup are both away from the coordinator's node.
    let functions = status(&nodes[0]).expect("status")["functions"].clone();
    let copies = |bank: &str| -> (u64, u64) {
        let f = functions
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["name"] == bank))
            .expect("the bank is deployed");
        (
            f["primary"].as_u64().expect("primary"),
            f["backups"][0].as_u64().expect("one backup"),
        )
    };
    let (bank, (primary, backup)) = BANKS
        .iter()
        .map(|b| (*b, copies(b)))
        .filter(|(_, (p, b))| *p != coordinator && *b != coordinator)
        .min_by_key(|(_, (_, b))| *b == master)
        .expect("one bank has both copies away from transfer's primary");
    println!(
        "{bank}: primary {primary}, backup {backup}; transfer on {coordinator}; master {master}"
    );

    let paused = &nodes[(backup - 1) as usize];
    let signal = |sig: &str| {
        let pid = paused.pid().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let deposit = {
        let api = nodes[(primary - 1) as usize].api().clone();
        std::thread::spawn(move || {
            api.try_invoke(
                bank,
                "deposit",
                &json!({ "account": "a", "amount": 5 }),
                Some("dep-1"),
            )
        })
    };
    // The deposit is applied on the primary and waits for the paused backup.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !deposit.is_finished(),
        "the deposit was answered while the bank's only backup was paused"
    );
    let read = nodes[(coordinator - 1) as usize].api().invoke(
        "transfer",
        "total",
        &json!({ "banks": [bank] }),
    );
    println!(
        "the read while the backup is paused: {} {}",
        read.status, read.body
    );
    assert!(
        read.status != 200 || read.body["total"] == INITIAL,
        "a read through node {coordinator} showed a deposit node {primary} had not replicated: {}",
        read.body
    );
    assert!(
        !deposit.is_finished(),
        "the deposit was answered while the bank's only backup was paused"
    );
    signal("-CONT");
    let answered = deposit
        .join()
        .expect("the deposit thread")
        .expect("the deposit's answer");
    assert_eq!(answered.status, 200, "the deposit: {}", answered.body);
    let total =
        nodes[(coordinator - 1) as usize]
            .api()
            .ok("transfer", "total", json!({ "banks": [bank] }));
    assert_eq!(total["total"], INITIAL + 5, "the deposit once replicated");
}

/// A transaction that reads one function and writes another, both with their primary
/// on one node, commits only once what it read is replicated. The write enters only the
/// written function's log: if it were replicated (and answered) while the read function's
/// last commit was still on its way to that function's backup, a failover of the read
/// function alone would lose that commit and keep a write that depended on it, and the
/// answer remembered for the key. (The nemesis found this as two reads of one list that
/// disagreed on its order.) The read function's only backup is paused, with failure
/// detection slowed so it stays in the set: the transaction must not be answered 200
/// showing the unreplicated append; once the backup resumes, both go through.
#[test]
fn a_commit_never_depends_on_an_unreplicated_read_of_another_function() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let members = members3();
    let nodes: Vec<NodeProcess> = members
        .iter()
        .map(|(id, _, _)| {
            let mut toml = config(*id, certs.path(), &members);
            toml.push_str("failure_timeout_ms = 60000\n");
            NodeProcess::start_with(NodeOptions {
                config_toml: Some(toml),
                ..NodeOptions::default()
            })
        })
        .collect();
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    // The written function has no backup: its commits are released as soon as they
    // are logged.
    let writer = deploy(&nodes[0], "lists-w", "lists", 1);
    // A function with one backup, not the master, and its primary on the writer's node.
    let backup_of = |name: &str| -> u64 {
        status(&nodes[0]).expect("status")["functions"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["name"] == name))
            .and_then(|f| f["backups"][0].as_u64())
            .expect("one backup")
    };
    let (read, backup) = (0..9)
        .find_map(|i| {
            let name = format!("lists-r{i}");
            let primary = deploy(&nodes[0], &name, "lists", 2);
            let backup = backup_of(&name);
            (primary == writer && backup != master).then_some((name, backup))
        })
        .expect("a function with its primary on the writer's node and its backup off the master");
    println!("{read}: primary {writer}, backup {backup}; lists-w on {writer}; master {master}");
    let api = nodes[(writer - 1) as usize].api().clone();

    let paused = &nodes[(backup - 1) as usize];
    let signal = |sig: &str| {
        let pid = paused.pid().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let append = {
        let (api, read) = (api.clone(), read.clone());
        std::thread::spawn(move || {
            api.try_invoke(&read, "txn", &json!([["append", "k", 7]]), Some("append-7"))
        })
    };
    // The append is applied on the primary and waits for the paused backup.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !append.is_finished(),
        "the append was answered while its function's only backup was paused"
    );
    let across = json!([
        [read, [["read", "k", null]]],
        ["lists-w", [["append", "k", 1]]]
    ]);
    let seen = |reply: &Value| reply[0][1][0][2].clone();
    let first = api
        .try_invoke("lists-w", "across", &across, Some("across-1"))
        .expect("an answer");
    println!(
        "the transaction while the backup is paused: {} {}",
        first.status, first.body
    );
    assert!(
        first.status != 200 || seen(&first.body) == json!([]),
        "a commit on lists-w depended on an append to {read} that its backup did not hold: {}",
        first.body
    );
    assert!(
        !append.is_finished(),
        "the append was answered while its function's only backup was paused"
    );
    signal("-CONT");
    let appended = append
        .join()
        .expect("the append thread")
        .expect("the append's answer");
    assert_eq!(appended.status, 200, "the append: {}", appended.body);
    let second = api
        .try_invoke("lists-w", "across", &across, Some("across-2"))
        .expect("an answer");
    assert_eq!(
        second.status, 200,
        "the transaction once replicated: {}",
        second.body
    );
    assert_eq!(seen(&second.body), json!([7]), "{}", second.body);
}

/// The file naming the failpoint node `id` dies at (see `understudy::failpoint`).
fn failpoint_file(certs: &std::path::Path, id: u64) -> std::path::PathBuf {
    certs.join(format!("failpoint-{id}"))
}

/// Transfers and list-append transactions across both `lists` functions under load
/// while the node that plays `role` in the transfers dies at `failpoint` (its 20th time
/// there, in either workload), as kill -9 would: the transactions in flight are
/// finished or rolled back by the understudies, no answered transfer is lost or
/// changed, every read of the total across both banks sees all the money, the copies
/// agree, and the recorded list-append history is strictly serializable with nothing
/// acknowledged lost.
fn dies_at(failpoint: &str, role: &str) {
    let certs = tempfile::tempdir().expect("tempdir");
    let mut nodes = bank_cluster(certs.path());
    for f in LISTS {
        deploy(&nodes[0], f, "lists", 2);
    }
    let coordinator = primary_of(&nodes[0], "transfer").expect("transfer's primary");
    let victim = match role {
        "coordinator" => coordinator,
        _ => BANKS
            .iter()
            .filter_map(|b| primary_of(&nodes[0], b))
            .find(|p| *p != coordinator)
            .expect("placement puts the banks' primaries on two nodes"),
    };
    println!(
        "primaries: lists-a {:?}, lists-b {:?}",
        primary_of(&nodes[0], LISTS[0]),
        primary_of(&nodes[0], LISTS[1])
    );
    let load = Transfers::start(apis(&nodes), 4);
    let list_apis: Vec<Api> = apis(&nodes)
        .iter()
        .map(|a| a.with_timeout(Duration::from_secs(3)))
        .collect();
    let seed = wall_ms() % 1_000_000;
    let lists = ListAppends::start(list_apis.clone(), 3, seed, Instant::now());
    wait_for("some transfers commit", || load.committed() > 20);
    wait_for("some list transactions commit", || lists.answered() > 20);
    println!("node {victim} ({role}) dies at {failpoint}");
    std::fs::write(
        failpoint_file(certs.path(), victim),
        format!("{failpoint}@20"),
    )
    .expect("arm the failpoint");
    let exited = Instant::now();
    while !nodes[index(victim)].exited() {
        assert!(
            exited.elapsed() < SETTLE_TIMEOUT,
            "node {victim} never reached {failpoint}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let died_ms = wall_ms();
    std::fs::remove_file(failpoint_file(certs.path(), victim)).expect("disarm");
    survivors_take_over(&nodes, &load, victim);
    let in_doubt: Vec<Value> = nodes
        .iter()
        .filter_map(status)
        .flat_map(|s| {
            s["transactions"]["in_doubt"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let last_ms = in_doubt
        .iter()
        .filter_map(|t| t["at_ms"].as_u64())
        .max()
        .map(|at| at.saturating_sub(died_ms));
    println!(
        "in-doubt transactions found by the understudies: {} ({} committed, {} rolled back); all resolved {} ms after the death was seen",
        in_doubt.len(),
        in_doubt.iter().filter(|t| t["commit"] == true).count(),
        in_doubt.iter().filter(|t| t["commit"] == false).count(),
        last_ms.map_or("-".into(), |ms| ms.to_string()),
    );
    nodes[index(victim)].restart();
    load.set_apis(apis(&nodes));
    std::thread::sleep(Duration::from_millis(300));
    let answered = load.finish(&nodes);
    println!(
        "answered {}, committed {}",
        answered.len(),
        answered.iter().filter(|a| a.status == 200).count()
    );
    check_whole(&nodes, &answered);
    let checked = lists.finish(
        &list_apis,
        "distributed",
        &format!("{failpoint}-{seed}"),
        json!({ "failpoint": failpoint, "victim": victim, "role": role }),
    );
    println!("{}", checked.summary());
    assert!(
        checked.recorded.across_answered > 0,
        "no list transaction across both functions was answered"
    );
    assert!(
        checked.report.anomalies.is_empty(),
        "{} anomalies in the list-append history ({}), the first: {:#?}",
        checked.report.anomalies.len(),
        checked.path.display(),
        &checked.report.anomalies[..checked.report.anomalies.len().min(5)]
    );
}

#[test]
fn coordinator_dies_before_asking_anyone_to_prepare() {
    dies_at("coordinator-before-prepare", "coordinator");
}

#[test]
fn participant_dies_after_its_prepare_is_replicated() {
    dies_at("participant-prepared", "participant");
}

#[test]
fn coordinator_dies_after_its_decision_is_replicated() {
    dies_at("coordinator-decided", "coordinator");
}

#[test]
fn coordinator_dies_after_telling_the_participants() {
    dies_at("coordinator-told", "coordinator");
}

#[test]
fn participant_dies_after_its_outcome_is_replicated() {
    dies_at("participant-resolved", "participant");
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
