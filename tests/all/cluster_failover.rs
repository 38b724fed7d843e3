//! Failover over real processes: kill -9 of a function's primary (and of the master)
//! under load; a backup takes over under a new epoch, nothing acknowledged is lost, the
//! bank's total is conserved, and the dead node comes back as a backup.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_form::{cluster_init, converged_leader, members3, start_cluster, status};
use crate::support::{component, Api, NodeProcess};

pub(crate) const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
pub(crate) const ACCOUNTS: [&str; 4] = ["a", "b", "c", "d"];
pub(crate) const INITIAL: u64 = 1000;

/// Placement puts the first function's primary on the node with the lowest id, the next
/// one elsewhere: a filler deployed first moves the bank's primary off the founder, the
/// likely master.
pub(crate) fn deploy_filler(node: &NodeProcess) {
    node.api()
        .put_bytes("/v1/functions/filler?replicas=2", component("counter"))
        .expect_status(201);
}

/// The indexes of the nodes other than node `id`, and their APIs.
pub(crate) fn others(nodes: &[NodeProcess], id: u64) -> (Vec<usize>, Vec<Api>) {
    let indexes: Vec<usize> = (0..nodes.len()).filter(|i| *i as u64 + 1 != id).collect();
    let apis = indexes.iter().map(|i| nodes[*i].api().clone()).collect();
    (indexes, apis)
}

fn deploy_bank(node: &NodeProcess, replicas: u8) -> Value {
    let reply = node
        .api()
        .put_bytes(
            &format!("/v1/functions/bank?replicas={replicas}"),
            component("bank"),
        )
        .expect_status(201);
    assert_eq!(reply.body["ready"], true, "{}", reply.body);
    for account in ACCOUNTS {
        node.api().ok(
            "bank",
            "open",
            json!({ "account": account, "initial": INITIAL }),
        );
    }
    reply.body
}

/// One acknowledged transfer: its idempotency key and the answer.
#[derive(Clone, Debug)]
pub(crate) struct Acked {
    key: String,
    input: Value,
    answer: Value,
}

/// Clients that transfer money through `apis` until stopped, each request with its own
/// idempotency key, retried with the same key until it gets an answer (a failover may
/// cut a request off); returns every acknowledged transfer.
pub(crate) struct Workload {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    /// Requests that had to be retried, and the longest run of failures, in ms.
    retries: Arc<Mutex<(u64, f64)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workload {
    pub(crate) fn start(apis: Vec<Api>, clients: usize) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let retries = Arc::new(Mutex::new((0u64, 0.0f64)));
        let threads = (0..clients)
            .map(|c| {
                let api = apis[c % apis.len()].clone();
                let (stop, acked, retries) = (stop.clone(), acked.clone(), retries.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let from = ACCOUNTS[(n as usize + c) % ACCOUNTS.len()];
                        let to = ACCOUNTS[(n as usize + c + 1) % ACCOUNTS.len()];
                        let input = json!({ "from": from, "to": to, "amount": n % 5 + 1 });
                        let key = format!("c{c}-t{n}");
                        let started = Instant::now();
                        let mut failed = false;
                        loop {
                            let reply = api.try_invoke("bank", "transfer", &input, Some(&key));
                            match reply {
                                Ok(r) if r.status == 200 => {
                                    acked.lock().expect("acked").push(Acked {
                                        key: key.clone(),
                                        input: input.clone(),
                                        answer: r.body,
                                    });
                                    break;
                                }
                                // The bank's own refusal (insufficient funds): an answer.
                                Ok(r) if r.status == 422 => break,
                                _ => {
                                    failed = true;
                                    assert!(
                                        started.elapsed() < SETTLE_TIMEOUT,
                                        "transfer {key} got no answer for {SETTLE_TIMEOUT:?}: {reply:?}"
                                    );
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                            }
                        }
                        if failed {
                            let mut r = retries.lock().expect("retries");
                            r.0 += 1;
                            r.1 = r.1.max(started.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                })
            })
            .collect();
        Workload {
            stop,
            acked,
            retries,
            threads,
        }
    }

    pub(crate) fn acked(&self) -> usize {
        self.acked.lock().expect("acked").len()
    }

    pub(crate) fn finish(self) -> (Vec<Acked>, (u64, f64)) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("client thread");
        }
        let acked = self.acked.lock().expect("acked").clone();
        let retries = *self.retries.lock().expect("retries");
        (acked, retries)
    }
}

pub(crate) fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < SETTLE_TIMEOUT, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn bank(node: &NodeProcess) -> Value {
    status(node)
        .and_then(|s| {
            s["functions"]
                .as_array()
                .and_then(|f| f.iter().find(|f| f["name"] == "bank").cloned())
        })
        .unwrap_or(Value::Null)
}

/// Every acknowledged transfer is still there: its key replays the same answer.
/// Every acknowledged transfer, sent again with its key, is a replay of the same answer.
/// A request that gets no answer (a connection reset: after a failover of the virtual
/// address, a kept-alive connection still leads to the old holder) or a 503 is sent
/// again with the same key, as a real client would.
pub(crate) fn check_nothing_lost(api: &Api, acked: &[Acked]) {
    for a in acked {
        let started = Instant::now();
        let reply = loop {
            match api.try_invoke("bank", "transfer", &a.input, Some(&a.key)) {
                Ok(reply) if reply.status != 503 => break reply,
                other => assert!(
                    started.elapsed() < SETTLE_TIMEOUT,
                    "transfer {} got no answer for {SETTLE_TIMEOUT:?}: {other:?}",
                    a.key
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(reply.status, 200, "{}: {:?}", a.key, reply.body);
        assert!(
            reply.replayed(),
            "transfer {} was lost: it ran again",
            a.key
        );
        assert_eq!(
            reply.body, a.answer,
            "transfer {} changed its answer",
            a.key
        );
    }
}

fn kill_primary_under_load(kill_master_too: bool) {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let mut nodes = start_cluster(certs.path(), &members3());
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    if !kill_master_too {
        deploy_filler(&nodes[0]);
    }
    let placed = deploy_bank(&nodes[0], 3);
    let primary = placed["primary"].as_u64().expect("primary");
    let victim = if kill_master_too { master } else { primary };
    println!(
        "master {master}, bank's primary {primary}: killing node {victim} ({})",
        match (victim == master, victim == primary) {
            (true, true) => "master and primary",
            (true, false) => "master only",
            (false, true) => "primary only",
            (false, false) => unreachable!(),
        }
    );
    let (survivors, apis) = others(&nodes, victim);
    let load = Workload::start(apis, 4);
    wait_for("some transfers before the kill", || load.acked() >= 50);

    let epoch_before = placed["epoch"].as_u64().expect("epoch");
    nodes[(victim - 1) as usize].kill9();
    let killed_at = Instant::now();
    let before = load.acked();
    wait_for("transfers after the kill", || load.acked() >= before + 100);
    println!(
        "kill -9 of node {victim}: 100 transfers acknowledged afterwards within {:?}",
        killed_at.elapsed()
    );
    let (acked, (retried, longest_ms)) = load.finish();
    println!(
        "{} transfers acknowledged; {retried} needed retries, the longest gap {longest_ms:.1} ms",
        acked.len()
    );

    let o = survivors[0];
    let f = bank(&nodes[o]);
    if victim == primary {
        assert_ne!(f["primary"], victim, "a backup took over: {f}");
        assert!(f["epoch"].as_u64().expect("epoch") > epoch_before, "{f}");
    }
    let total = nodes[o].api().ok("bank", "total", json!(null));
    assert_eq!(
        total["total"],
        INITIAL * ACCOUNTS.len() as u64,
        "money is conserved"
    );
    check_nothing_lost(nodes[o].api(), &acked);

    // The dead node returns as a backup and catches up.
    nodes[(victim - 1) as usize].restart();
    wait_for("the returning node is a backup again", || {
        bank(&nodes[o])["backups"]
            .as_array()
            .is_some_and(|b| b.contains(&json!(victim)))
    });
    // (It may be handed the primary back later: a new master hands its own primaries
    // over to backups.) Its copy equals the primary's.
    let f = bank(&nodes[o]);
    let copy = nodes[(victim - 1) as usize]
        .api()
        .get("/v1/functions/bank")
        .expect("describe");
    let primary_copy = nodes[(f["primary"].as_u64().expect("primary") - 1) as usize]
        .api()
        .get("/v1/functions/bank")
        .expect("describe");
    assert_eq!(
        copy.body["state_digest"], primary_copy.body["state_digest"],
        "the returning node holds the new primary's state"
    );
}

#[test]
fn killed_primary_under_load_loses_nothing_acknowledged() {
    kill_primary_under_load(false);
}

#[test]
fn killed_master_under_load_loses_nothing_acknowledged() {
    kill_primary_under_load(true);
}

/// The node and epoch that answered, from the `understudy-served-by` header.
pub(crate) fn served_by(reply: &crate::support::Reply) -> Option<(u64, u64)> {
    let (n, e) = reply.header("understudy-served-by")?.split_once(' ')?;
    Some((n.parse().ok()?, e.parse().ok()?))
}

#[test]
fn paused_primary_cannot_commit_and_its_clients_are_answered_by_the_new_primary() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let nodes = start_cluster(certs.path(), &members3());
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    deploy_filler(&nodes[0]);
    let placed = deploy_bank(&nodes[0], 3);
    let primary = placed["primary"].as_u64().expect("primary");
    let epoch_before = placed["epoch"].as_u64().expect("epoch");
    assert_ne!(primary, master, "the filler moved the bank off the master");
    let zombie = &nodes[(primary - 1) as usize];
    let (survivors, apis) = others(&nodes, primary);
    let load = Workload::start(apis, 4);
    wait_for("some transfers before the pause", || load.acked() >= 50);

    let pid = zombie.pid().expect("running");
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    wait_for("a new primary while the old one is paused", || {
        let f = bank(&nodes[survivors[0]]);
        f["primary"].as_u64().is_some_and(|p| p != primary)
            && f["epoch"].as_u64().is_some_and(|e| e > epoch_before)
    });
    let before = load.acked();
    wait_for("transfers on the new primary", || {
        load.acked() >= before + 100
    });
    signal("-CONT");

    // The zombie's own clients: it must not answer from its stale state, nor commit;
    // their requests are served by the new primary.
    for i in 0..20u64 {
        let reply = zombie.api().invoke_keyed(
            "bank",
            "transfer",
            &json!({ "from": "a", "to": "b", "amount": 1 }),
            &format!("zombie-{i}"),
        );
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let (node, epoch) = served_by(&reply).expect("served-by header");
        assert_ne!(node, primary, "answered by the paused primary itself");
        assert!(epoch > epoch_before);
        let read = zombie.api().invoke("bank", "total", &json!(null));
        assert_eq!(read.status, 200);
        assert_ne!(served_by(&read).map(|s| s.0), Some(primary), "a stale read");
        assert_eq!(read.body["total"], INITIAL * ACCOUNTS.len() as u64);
    }
    let (acked, _) = load.finish();
    let o = survivors[0];
    check_nothing_lost(nodes[o].api(), &acked);
    let total = nodes[o].api().ok("bank", "total", json!(null));
    assert_eq!(total["total"], INITIAL * ACCOUNTS.len() as u64);
    wait_for("the paused node is a backup again", || {
        bank(&nodes[o])["backups"]
            .as_array()
            .is_some_and(|b| b.contains(&json!(primary)))
    });
}

#[test]
fn a_drained_node_hands_its_copies_over_under_load_and_is_removed() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let nodes = start_cluster(certs.path(), &members3());
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    deploy_filler(&nodes[0]);
    let placed = deploy_bank(&nodes[0], 2);
    let drained = placed["primary"].as_u64().expect("primary");
    assert_ne!(drained, master);
    let (others, apis) = others(&nodes, drained);
    let load = Workload::start(apis, 4);
    wait_for("some transfers before the drain", || load.acked() >= 50);

    nodes[others[0]]
        .api()
        .post(&format!("/v1/cluster/nodes/{drained}/drain"))
        .expect_status(200);
    wait_for("every copy off the drained node", || {
        let s = status(&nodes[others[0]]).unwrap_or_default();
        s["functions"].as_array().is_some_and(|fs| {
            fs.iter().all(|f| {
                f["primary"] != drained
                    && !f["backups"]
                        .as_array()
                        .is_some_and(|b| b.contains(&json!(drained)))
                    && !f["catching_up"]
                        .as_array()
                        .is_some_and(|b| b.contains(&json!(drained)))
            })
        })
    });
    let before = load.acked();
    wait_for("transfers after the handover", || {
        load.acked() >= before + 50
    });
    let (acked, (retried, longest_ms)) = load.finish();
    println!(
        "drain under load: {} acknowledged, {retried} retried, longest wait {longest_ms:.1} ms",
        acked.len()
    );
    let o = others[0];
    check_nothing_lost(nodes[o].api(), &acked);
    let total = nodes[o].api().ok("bank", "total", json!(null));
    assert_eq!(total["total"], INITIAL * ACCOUNTS.len() as u64);

    nodes[(master - 1) as usize]
        .api()
        .post(&format!("/v1/cluster/nodes/{drained}/remove"))
        .expect_status(200);
    wait_for("the removed node out of the voters", || {
        let s = status(&nodes[o]).unwrap_or_default();
        s["raft"]["voters"]
            .as_array()
            .is_some_and(|v| !v.contains(&json!(drained)))
            && s["nodes"]
                .as_array()
                .and_then(|n| n.iter().find(|n| n["id"] == drained).cloned())
                .is_some_and(|n| n["status"] == "removed")
    });
}

/// A master starved of CPU for a moment (SIGSTOP shorter than an election) wakes to find
/// every node silent for longer than the failure timeout: the pings sat unread. It must
/// know the silence is its own and accuse no one (see `cluster::health`).
#[test]
fn a_master_paused_for_a_moment_accuses_no_one_when_it_resumes() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let nodes = start_cluster(certs.path(), &members3());
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    deploy_filler(&nodes[0]);
    let m = &nodes[(master - 1) as usize];
    wait_for("every node up", || {
        status(m).is_some_and(|s| {
            s["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["health"] == "up"))
        })
    });
    let downs = || -> Vec<Value> {
        nodes
            .iter()
            .filter_map(status)
            .flat_map(|s| s["failovers"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["verdict"] == "down")
            .collect()
    };
    let before = downs().len();
    let pid = i32::try_from(m.pid().expect("running")).expect("pid");
    let signal = |sig: i32| {
        // SAFETY: kill takes plain integers; the pid is the node's, which this test owns.
        #[allow(unsafe_code)]
        let result = unsafe { libc::kill(pid, sig) };
        assert_eq!(result, 0, "kill {sig} {pid}");
    };
    // Each pause is longer than the failure timeout (20 ms) and shorter than the time
    // before another voter may campaign (45 ms).
    for _ in 0..5 {
        signal(libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(25));
        signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(400));
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = downs();
    let leader = converged_leader(&nodes.iter().collect::<Vec<_>>());
    assert_eq!(
        after.len(),
        before,
        "a live node was declared down after the master's pauses (master before {master}, after {leader}): {after:?}"
    );
}
