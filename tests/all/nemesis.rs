//! The fault-injection suite over real processes: three nodes, each in a network
//! namespace of its own (see `netns`), under a nemesis that, on a schedule drawn from a
//! seed, kills a node (kill -9, then restarts it), pauses it past the failure timeout
//! (SIGSTOP/SIGCONT), cuts it off from every peer, cuts one direction only (iptables DROP
//! in the `INPUT` chain of the receiving namespace), drops a share of its QUIC packets
//! (nftables `numgen random`), starves one node of CPU (SIGSTOP for 5-40 ms again and
//! again: its timers fire late, its messages are read late) or the whole machine (busy
//! threads on every core). One fault at a time, each undone before the next, every
//! loop bounded in count and time; dropping the `Net` removes every rule.
//!
//! Meanwhile clients run two workloads through every node, each request retried on the
//! next node with its idempotency key until answered:
//!
//! - list-append transactions on two `lists` functions (see `history`): the history is
//!   checked for strict serializability (per-key linearizability with it), duplicates,
//!   phantoms and lost acknowledged appends;
//! - bank transfers and reads of the bank's total: every read must show the total
//!   conserved, and every acknowledged transfer must replay its answer at the end.
//!
//! The run prints the faults by kind, the operations checked, anomalies and losses, and
//! the distribution of unavailability windows (from a request's first failed attempt to
//! its answer); it writes the history to `target/tmp/nemesis/history-<seed>.json`. A failing
//! run names its seed: `NEMESIS_SEED=<seed>` replays the same fault schedule (the timing
//! of real processes differs run to run). `NEMESIS_SECONDS` sets the length; CI runs the
//! default (40 s). For a long run: `scripts/nemesis.sh --minutes 10 --seed 7`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_failover::{bank, ACCOUNTS, INITIAL};
use crate::cluster_form::converged_leader;
use crate::cluster_netns::{deploy, open_accounts, start_nodes};
use crate::list_append::{ask, ListAppends, Rng, LISTS};
use crate::netns::Net;
use crate::support::{Api, NodeProcess};

const NODES: usize = 3;
/// A single attempt's timeout: a paused node holds requests until it is resumed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the cluster may take to heal after the last fault.
const HEAL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
enum Fault {
    Kill,
    Pause,
    Partition,
    OneWay,
    Loss,
    Stall,
    Hog,
}

const FAULTS: [Fault; 7] = [
    Fault::Kill,
    Fault::Pause,
    Fault::Partition,
    Fault::OneWay,
    Fault::Loss,
    Fault::Stall,
    Fault::Hog,
];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// What the bank clients record.
#[derive(Default)]
struct Recorded {
    /// Acknowledged transfers: key, input, answer.
    transfers: Vec<(String, Value, Value)>,
    bank_reads: usize,
    bank_anomalies: Vec<String>,
    /// Per request that needed retries: first failure to answer, in ms.
    windows: Vec<f64>,
    unanswered: usize,
}

struct Clients {
    stop: Arc<AtomicBool>,
    recorded: Arc<Mutex<Recorded>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn start_bank_clients(apis: Vec<Api>) -> Clients {
    let stop = Arc::new(AtomicBool::new(false));
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let mut threads = Vec::new();
    // Bank clients: transfers, and a read of the total after every fifth.
    for c in 0..2usize {
        let (apis, stop, recorded) = (apis.clone(), stop.clone(), recorded.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let from = ACCOUNTS[(n + c) % ACCOUNTS.len()];
                let to = ACCOUNTS[(n + c + 1) % ACCOUNTS.len()];
                let input = json!({ "from": from, "to": to, "amount": n % 5 + 1 });
                let key = format!("b{c}-{n}");
                let (answer, window) = ask(&apis, c, "bank", "transfer", &input, Some(&key));
                let mut r = recorded.lock().expect("recorded");
                if let Some(w) = window {
                    r.windows.push(w);
                }
                match answer {
                    Some((200, body)) => r.transfers.push((key, input, body)),
                    Some((422, _)) => {}
                    Some((status, body)) => {
                        panic!("the bank refused a transfer: {status} {body}")
                    }
                    None => r.unanswered += 1,
                }
                drop(r);
                if n.is_multiple_of(5) {
                    let (answer, window) = ask(&apis, c + 1, "bank", "total", &json!(null), None);
                    let mut r = recorded.lock().expect("recorded");
                    if let Some(w) = window {
                        r.windows.push(w);
                    }
                    if let Some((200, body)) = answer {
                        r.bank_reads += 1;
                        if body["total"] != INITIAL * ACCOUNTS.len() as u64 {
                            r.bank_anomalies
                                .push(format!("a read of the bank's total saw {body}"));
                        }
                    }
                }
            }
        }));
    }
    Clients {
        stop,
        recorded,
        threads,
    }
}

/// One fault, applied to `nodes` on `net`, and how to undo it.
struct Nemesis<'a> {
    net: &'a Net,
    nodes: &'a mut Vec<NodeProcess>,
}

impl Nemesis<'_> {
    fn signal(&self, node: usize, signal: &str) {
        if let Some(pid) = self.nodes[node].pid() {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    fn loss(&self, node: usize, percent: u64) {
        let ns = self.net.ns(node);
        let script = format!(
            "add table inet usloss\n\
             add chain inet usloss input {{ type filter hook input priority 0 ; }}\n\
             add rule inet usloss input meta l4proto udp numgen random mod 100 < {percent} drop\n"
        );
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())
            .expect("write the nft script");
        assert!(child.wait().expect("nft").success(), "nft in {ns}");
    }

    /// Apply `fault` to `node` for `hold`, then undo it. Returns what it did.
    fn run(
        &mut self,
        fault: Fault,
        node: usize,
        other: usize,
        hold: Duration,
        percent: u64,
    ) -> String {
        match fault {
            Fault::Kill => {
                self.nodes[node].kill9();
                std::thread::sleep(hold);
                self.nodes[node].restart();
                format!("kill -9 node {}, restarted after {hold:?}", node + 1)
            }
            Fault::Pause => {
                self.signal(node, "-STOP");
                std::thread::sleep(hold);
                self.signal(node, "-CONT");
                format!("SIGSTOP node {} for {hold:?}", node + 1)
            }
            Fault::Partition => {
                for i in (0..NODES).filter(|i| *i != node) {
                    self.net.cut(node, i);
                }
                std::thread::sleep(hold);
                for i in 0..NODES {
                    self.net.heal(i);
                }
                format!("node {} cut off from every peer for {hold:?}", node + 1)
            }
            Fault::OneWay => {
                self.net.drop_from(node, other);
                std::thread::sleep(hold);
                self.net.heal(node);
                format!(
                    "node {} deaf to node {} (one way) for {hold:?}",
                    node + 1,
                    other + 1
                )
            }
            Fault::Loss => {
                self.loss(node, percent);
                std::thread::sleep(hold);
                let _ = self
                    .net
                    .exec(node, "nft", &["delete", "table", "inet", "usloss"]);
                format!(
                    "node {} loses {percent}% of its QUIC packets for {hold:?}",
                    node + 1
                )
            }
            Fault::Stall => {
                // A CPU-starved process: short stops, some past the failure timeout.
                let until = Instant::now() + hold;
                let mut rng = Rng(percent * 7919 + hold.as_millis() as u64);
                let mut stops = 0;
                while Instant::now() < until {
                    self.signal(node, "-STOP");
                    std::thread::sleep(rng.ms(5, 40));
                    self.signal(node, "-CONT");
                    std::thread::sleep(rng.ms(20, 100));
                    stops += 1;
                }
                format!(
                    "node {} starved of CPU for {hold:?} ({stops} stops of 5-40 ms)",
                    node + 1
                )
            }
            Fault::Hog => {
                let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                let stop = Arc::new(AtomicBool::new(false));
                let hogs: Vec<_> = (0..cores)
                    .map(|_| {
                        let stop = stop.clone();
                        std::thread::spawn(move || {
                            let mut x = 0u64;
                            while !stop.load(Ordering::Relaxed) {
                                x = std::hint::black_box(
                                    x.wrapping_mul(6364136223846793005).wrapping_add(1),
                                );
                            }
                        })
                    })
                    .collect();
                std::thread::sleep(hold);
                stop.store(true, Ordering::Relaxed);
                for hog in hogs {
                    let _ = hog.join();
                }
                format!("{cores} busy threads hog every core for {hold:?}")
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Each node's view of the cluster, one line each (for a cluster that did not heal): its
/// Raft state, the nodes' health as it sees them, and each function's copies.
fn views(nodes: &[NodeProcess]) -> String {
    let mut lines = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let Some(s) = crate::cluster_form::status(node) else {
            lines.push(format!("node {}: no status", i + 1));
            continue;
        };
        let health: Vec<String> = s["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| format!("{}:{}", n["id"], n["health"].as_str().unwrap_or("?")))
            .collect();
        let functions: Vec<String> = s["functions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                format!(
                    "{} e{} p{} b{} c{} here {}",
                    f["name"].as_str().unwrap_or("?"),
                    f["epoch"],
                    f["primary"],
                    f["backups"],
                    f["catching_up"],
                    f["here"]
                )
            })
            .collect();
        lines.push(format!(
            "node {}: raft {} term {} leader {} log {} applied {}; health [{}]; {}",
            i + 1,
            s["raft"]["state"],
            s["raft"]["term"],
            s["raft"]["leader"],
            s["raft"]["last_log_index"],
            s["raft"]["last_applied_index"],
            health.join(" "),
            functions.join("; ")
        ));
    }
    lines.join("\n")
}

#[test]
fn a_cluster_under_a_seeded_nemesis_keeps_its_histories_consistent() {
    let Some(net) = Net::new(NODES) else {
        eprintln!("skipped: the nemesis needs root, iproute2, iptables and nftables (CI has them)");
        return;
    };
    let seed = env_u64("NEMESIS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            % 1_000_000
    });
    let seconds = env_u64("NEMESIS_SECONDS").unwrap_or(40);
    println!("nemesis: seed {seed}, {seconds} s (replay the schedule: NEMESIS_SEED={seed})");
    let (_certs, mut nodes) = start_nodes(&net, NODES, &[]);
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    deploy(nodes[0].api(), "bank", "bank", 3);
    for f in LISTS {
        deploy(nodes[0].api(), f, "lists", 3);
    }
    open_accounts(nodes[0].api());
    let apis: Vec<Api> = nodes
        .iter()
        .map(|n| n.api().with_timeout(ATTEMPT_TIMEOUT))
        .collect();
    let epoch = Instant::now();
    let lists = ListAppends::start(apis.clone(), 4, seed, epoch);
    let clients = start_bank_clients(apis.clone());
    std::thread::sleep(Duration::from_millis(500));

    let mut rng = Rng(seed);
    let mut counts: std::collections::BTreeMap<Fault, usize> = Default::default();
    let mut log = Vec::new();
    let run_for = Duration::from_secs(seconds);
    let max_faults = seconds as usize * 4;
    {
        let mut nemesis = Nemesis {
            net: &net,
            nodes: &mut nodes,
        };
        while epoch.elapsed() < run_for && log.len() < max_faults {
            let fault = FAULTS[rng.below(FAULTS.len() as u64) as usize];
            let node = rng.below(NODES as u64) as usize;
            let other = (node + 1 + rng.below(NODES as u64 - 1) as usize) % NODES;
            let hold = match fault {
                Fault::Kill => rng.ms(50, 1000),
                Fault::Pause => rng.ms(50, 600),
                Fault::Partition | Fault::OneWay => rng.ms(100, 1000),
                Fault::Loss => rng.ms(500, 2000),
                Fault::Stall | Fault::Hog => rng.ms(500, 3000),
            };
            let percent = 10 + rng.below(41);
            let settle = rng.ms(200, 1500);
            let at = epoch.elapsed();
            let what = nemesis.run(fault, node, other, hold, percent);
            println!("{:>8.1} s  {what}", at.as_secs_f64());
            log.push(what);
            *counts.entry(fault).or_default() += 1;
            std::thread::sleep(settle);
        }
    }

    // Heal everything and let the cluster recover before the final reads.
    for i in 0..NODES {
        net.heal(i);
        let _ = net.exec(i, "nft", &["delete", "table", "inet", "usloss"]);
    }
    let healed = Instant::now();
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    loop {
        let ok = ["bank", LISTS[0], LISTS[1]].iter().all(|f| {
            let s = crate::cluster_form::status(&nodes[0])
                .and_then(|s| {
                    s["functions"]
                        .as_array()
                        .and_then(|fs| fs.iter().find(|x| x["name"] == *f).cloned())
                })
                .unwrap_or(Value::Null);
            s["backups"]
                .as_array()
                .is_some_and(|b| b.len() == NODES - 1)
                && s["catching_up"].as_array().is_some_and(Vec::is_empty)
        });
        if ok {
            break;
        }
        assert!(
            healed.elapsed() < HEAL_TIMEOUT,
            "the cluster did not heal within {HEAL_TIMEOUT:?} (seed {seed}): {}\n{}",
            bank(&nodes[0]),
            views(&nodes)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    clients.stop.store(true, Ordering::Relaxed);
    for t in clients.threads {
        t.join().expect("a client thread panicked");
    }
    let recorded = std::mem::take(&mut *clients.recorded.lock().expect("recorded"));
    // Final reads of every key, once the cluster is whole; the history checked.
    let checked = lists.finish(
        &apis,
        "nemesis",
        &seed.to_string(),
        json!({ "seed": seed, "faults": log }),
    );
    let report = &checked.report;

    // The bank: nothing acknowledged lost, money conserved.
    let mut lost = Vec::new();
    for (key, input, answer) in &recorded.transfers {
        let reply = apis[0].invoke_keyed("bank", "transfer", input, key);
        if reply.status != 200 || !reply.replayed() || reply.body != *answer {
            lost.push(format!("transfer {key}: {} {}", reply.status, reply.body));
        }
    }
    let total = apis[0].ok("bank", "total", json!(null));

    let mut windows = recorded.windows.clone();
    windows.extend(&checked.recorded.windows);
    windows.sort_by(f64::total_cmp);
    println!(
        "\nnemesis seed {seed}: {} faults in {:.0} s",
        log.len(),
        epoch.elapsed().as_secs_f64()
    );
    for (fault, n) in &counts {
        println!("  {fault:?}: {n}");
    }
    println!("{}", checked.summary());
    println!(
        "bank: {} transfers acknowledged ({} unanswered), {} reads of the total checked, lost {}",
        recorded.transfers.len(),
        recorded.unanswered,
        recorded.bank_reads,
        lost.len()
    );
    println!(
        "unavailability windows ({} requests retried): p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        windows.len(),
        percentile(&windows, 0.5),
        percentile(&windows, 0.9),
        percentile(&windows, 0.99),
        percentile(&windows, 1.0)
    );
    println!(
        "anomalies: {}; history: {}",
        report.anomalies.len() + recorded.bank_anomalies.len(),
        checked.path.display()
    );
    let anomalies: Vec<&String> = report
        .anomalies
        .iter()
        .chain(&recorded.bank_anomalies)
        .chain(&lost)
        .collect();
    assert!(
        anomalies.is_empty(),
        "seed {seed}: {} anomalies (history in {}), the first: {:#?}",
        anomalies.len(),
        checked.path.display(),
        &anomalies[..anomalies.len().min(5)]
    );
    assert_eq!(
        total["total"],
        INITIAL * ACCOUNTS.len() as u64,
        "seed {seed}: money not conserved"
    );
}
