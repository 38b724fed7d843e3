//! `understudy drill`: prove failover on a real cluster. It starts a three-node cluster
//! of node processes on loopback, deploys the bank example as three functions (their
//! primaries spread over the nodes), drives transfers with idempotency keys through the
//! nodes that will survive, and, run after run, kills (SIGKILL), pauses (SIGSTOP) or
//! partitions (iptables) the primary of one function or the master. For each run it reports the time from the
//! fault to detection, to the promotion committed by the master, to the first commit on
//! the new primary and to every affected function served again; then it checks every
//! acknowledged transfer (its key must replay the same answer: none lost), the total of
//! every bank (money conserved) and what happened to the transfers in flight at the
//! fault. The node comes back (restart, SIGCONT or healed) and rejoins as a backup before
//! the next run.
//!
//! `--fault none` runs the workload without faults for `--soak-seconds` and counts
//! failovers: a busy node must not be taken for a dead one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};

use crate::local::{LocalCluster, Options};
use understudy::wal::Durability;

const FUNCTIONS: [&str; 3] = ["bank-a", "bank-b", "bank-c"];
/// The function that moves money between the banks.
const CROSS: &str = "transfer";
pub(crate) const ACCOUNTS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const INITIAL: u64 = 1_000_000;
/// How long a client keeps retrying one transfer before the drill gives up.
const ANSWER_WAIT: Duration = Duration::from_secs(15);
/// How long the cluster may take to have every function fully replicated again.
const HEAL_WAIT: Duration = Duration::from_secs(30);
/// How long the workload keeps running after the cluster healed (hand-overs follow).
const SETTLE: Duration = Duration::from_millis(500);

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Faults to inject, one per run.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// kill (SIGKILL, then restart), pause (SIGSTOP past the failure timeout, then
    /// SIGCONT), partition (iptables drops every packet of the node's QUIC port, then
    /// heals; needs root) or none (a soak: the workload alone, counting false failovers).
    #[arg(long, default_value = "kill")]
    pub fault: String,
    /// Whose node to hit: primary (of one bank, in turn), coordinator (the primary of
    /// `transfer`, which coordinates the transfers between banks) or master.
    #[arg(long, default_value = "primary")]
    pub target: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// How long a paused or partitioned node stays so.
    #[arg(long, default_value_t = 500)]
    pub pause_ms: u64,
    /// With `--fault none`: how long to run.
    #[arg(long, default_value_t = 60)]
    pub soak_seconds: u64,
    /// disk or memory.
    #[arg(long, default_value = "disk")]
    pub durability: Durability,
    /// The bank example component.
    #[arg(long, default_value = "target-guests/components/bank.wasm")]
    pub bank: PathBuf,
    /// The transfer example component (transfers between the banks, across nodes).
    #[arg(long, default_value = "target-guests/components/transfer.wasm")]
    pub transfer: PathBuf,
    /// Clients moving money between the banks through `transfer` (two-phase commit
    /// when the banks' primaries are apart), beside the `--clients` within each bank.
    #[arg(long, default_value_t = 2)]
    pub cross_clients: usize,
    /// Where the nodes keep their data and logs (a fresh temporary folder by default,
    /// deleted afterwards unless `--keep`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub keep: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Keep this many busy processes (each spinning on a core) running on the machine
    /// for the whole drill: the cluster under CPU contention.
    #[arg(long, default_value_t = 0)]
    pub hog: usize,
}

/// Busy processes hogging the CPU while they live (`--hog`); killed when dropped.
struct Hogs(Vec<std::process::Child>);

impl Hogs {
    fn start(n: usize) -> anyhow::Result<Hogs> {
        let mut hogs = Hogs(Vec::with_capacity(n));
        for _ in 0..n {
            let child = std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("cannot start a busy process for --hog")?;
            hogs.0.push(child);
        }
        Ok(hogs)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One transfer as the client saw it.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub function: &'static str,
    pub key: String,
    pub input: Value,
    pub sent: Instant,
    pub answered: Instant,
    pub status: u16,
    pub body: Value,
    pub replayed: bool,
    /// (node, epoch) of the primary that answered.
    pub served_by: Option<(u64, u64)>,
    /// Attempts that failed before the answer (the client retried with the same key).
    pub retries: u32,
    /// What the first failed attempt got: an HTTP status and error code, or the
    /// connection error.
    pub first_failure: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Run {
    pub run: usize,
    pub fault: String,
    pub victim: u64,
    pub victim_was_master: bool,
    pub victim_primaries: Vec<String>,
    pub detect_ms: Option<f64>,
    pub promote_ms: Option<f64>,
    pub first_commit_ms: Option<f64>,
    pub all_served_ms: Option<f64>,
    /// The longest time any function (affected or not) went without an answer across
    /// the fault: a master's death pauses every primary until a new master grants leases.
    pub longest_pause_ms: Option<f64>,
    /// Where it happened: the function, when it began (ms after the fault) and the phase
    /// (failover: until every affected function is served again; after failover: until
    /// the victim returns; return: until the cluster is healed; after heal: hand-overs).
    pub longest_pause_at: Option<String>,
    /// The longest any one transfer took to be answered (retries included), and where:
    /// with closed-loop clients, a function that stalls starves the others of requests,
    /// so this tells a stall from the gaps it causes elsewhere.
    pub slowest_ms: Option<f64>,
    pub slowest_at: Option<String>,
    pub acknowledged: usize,
    pub lost: usize,
    pub in_flight: usize,
    pub in_flight_committed: usize,
    pub in_flight_rolled_back: usize,
    pub zombie_commits: usize,
    pub client_retries: u64,
    pub totals_ok: bool,
    /// Transfers between banks (across nodes) answered in the run.
    pub cross_acknowledged: usize,
    /// In-doubt transactions the promoted copies found (prepared, outcome unknown), how
    /// many committed, and when the last was resolved (ms after the fault).
    pub in_doubt: usize,
    pub in_doubt_committed: usize,
    pub in_doubt_resolved_ms: Option<f64>,
}

/// Fails when the cluster cannot be started or a check cannot be made (a broken
/// invariant is reported in the results, not as an error).
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("understudy-drill-{}", std::process::id())),
    };
    let hogs = Hogs::start(args.hog)?;
    if args.hog > 0 && !args.json {
        println!(
            "{} busy processes hog the CPU for the whole drill ({} cores here)",
            args.hog,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
    let result = runtime.block_on(drill(&args, &dir));
    drop(hogs);
    if !args.keep && args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let runs = result?;
    let failed = runs
        .iter()
        .any(|r| r.lost > 0 || !r.totals_ok || r.zombie_commits > 0);
    if failed {
        bail!("the drill found acknowledged transactions lost, money not conserved or a zombie commit");
    }
    Ok(())
}

pub(crate) fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

async fn drill(args: &Args, dir: &std::path::Path) -> anyhow::Result<Vec<Run>> {
    let bank = std::fs::read(&args.bank).with_context(|| {
        format!(
            "cannot read {} (build the examples: scripts/build-guests.sh)",
            args.bank.display()
        )
    })?;
    let say = |s: String| {
        if !args.json {
            println!("{s}");
        }
    };
    say(format!(
        "starting a 3-node cluster on loopback in {} ...",
        dir.display()
    ));
    let mut cluster = LocalCluster::start(
        dir,
        &Options {
            nodes: 3,
            clustered: true,
            durability: args.durability,
            cluster_toml: String::new(),
        },
    )
    .await?;
    say(format!(
        "live console: {}/ui (every node serves one; it reads on through another node when its own dies)",
        cluster.node(1).url()
    ));
    if args.cross_clients > 0 {
        let transfer = std::fs::read(&args.transfer).with_context(|| {
            format!(
                "cannot read {} (build the examples: scripts/build-guests.sh)",
                args.transfer.display()
            )
        })?;
        cluster
            .deploy(1, CROSS, transfer, 2, &FUNCTIONS.join(","))
            .await?;
    }
    for f in FUNCTIONS {
        cluster.deploy(1, f, bank.clone(), 2, "").await?;
        for account in ACCOUNTS {
            let reply = cluster
                .client()
                .post(format!("{}/v1/functions/{f}/open", cluster.node(1).url()))
                .json(&json!({ "account": account, "initial": INITIAL }))
                .send()
                .await?;
            if !reply.status().is_success() {
                bail!("opening {account} in {f}: {}", reply.text().await?);
            }
        }
    }
    say(format!(
        "deployed {} (2 copies each), {} accounts of {INITIAL} each",
        FUNCTIONS.join(", "),
        ACCOUNTS.len()
    ));
    if args.fault == "none" {
        return soak(args, &cluster).await.map(|r| vec![r]);
    }
    if !matches!(args.fault.as_str(), "kill" | "pause" | "partition") {
        bail!(
            "--fault must be kill, pause, partition or none, not {:?}",
            args.fault
        );
    }
    let mut runs = Vec::new();
    if !args.json {
        println!(
            "{:>4} {:>6} {:>14} {:>9} {:>10} {:>13} {:>11} {:>6} {:>5} {:>14} {:>16}   longest pause, where",
            "run",
            "victim",
            "role",
            "detect",
            "promoted",
            "first commit",
            "all served",
            "acked",
            "lost",
            "in flight c/r",
            "in doubt c/r, by",
        );
    }
    for i in 0..args.runs {
        let r = one_run(args, &mut cluster, i).await?;
        if !args.json {
            let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} ms"));
            println!(
                "{:>4} {:>6} {:>14} {:>9} {:>10} {:>13} {:>11} {:>6} {:>5} {:>14} {:>16}   {} {}; slowest answer {} ({})",
                r.run,
                r.victim,
                match (r.victim_was_master, r.victim_primaries.is_empty()) {
                    (true, false) => "master+primary",
                    (true, true) => "master",
                    (false, false) => "primary",
                    (false, true) => "backup",
                },
                ms(r.detect_ms),
                ms(r.promote_ms),
                ms(r.first_commit_ms),
                ms(r.all_served_ms),
                r.acknowledged,
                r.lost,
                format!("{}/{}", r.in_flight_committed, r.in_flight_rolled_back),
                format!(
                    "{}/{} {}",
                    r.in_doubt_committed,
                    r.in_doubt - r.in_doubt_committed,
                    ms(r.in_doubt_resolved_ms)
                ),
                ms(r.longest_pause_ms),
                r.longest_pause_at.as_deref().unwrap_or(""),
                ms(r.slowest_ms),
                r.slowest_at.as_deref().unwrap_or("")
            );
        }
        runs.push(r);
    }
    let summary = summarize(&runs);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "runs": runs, "summary": summary }))?
        );
    } else {
        println!();
        println!("over {} runs (ms after the fault):", runs.len());
        println!(
            "{:>16} {:>8} {:>8} {:>8} {:>8} {:>4}",
            "", "min", "median", "p90", "max", "runs"
        );
        for (name, key) in [
            ("detection", "detect_ms"),
            ("promotion", "promote_ms"),
            ("first commit", "first_commit_ms"),
            ("all served", "all_served_ms"),
            ("longest pause", "longest_pause_ms"),
            ("slowest answer", "slowest_ms"),
            ("in doubt done", "in_doubt_resolved_ms"),
            ("  coordinator", "in_doubt_resolved_ms_coordinator"),
            ("  primary only", "first_commit_ms_primary_only"),
            ("  master too", "first_commit_ms_master"),
        ] {
            let d = &summary[key];
            if d.is_null() {
                continue;
            }
            println!(
                "{:>16} {:>8} {:>8} {:>8} {:>8} {:>4}",
                name,
                fmt(&d["min"]),
                fmt(&d["median"]),
                fmt(&d["p90"]),
                fmt(&d["max"]),
                d["n"]
            );
        }
        println!("(the first commit on a new primary, split by whether the victim was also the master: a master's death needs an election first; in-doubt transactions resolved, also in the runs whose victim was the coordinator of the transfers between banks)");
        println!(
            "transfers between banks (two-phase commit across nodes) acknowledged {}; in-doubt transactions found by promoted copies {} ({} committed, {} rolled back), each run's last resolved at the 'in doubt done' figure",
            summary["cross_acknowledged"],
            summary["in_doubt"],
            summary["in_doubt_committed"],
            summary["in_doubt"].as_u64().unwrap_or(0) - summary["in_doubt_committed"].as_u64().unwrap_or(0)
        );
        println!(
            "acknowledged {}, lost {}, in flight at the fault {} ({} committed, {} rolled back and run again), zombie commits {}, money conserved in every run: {}",
            summary["acknowledged"],
            summary["lost"],
            summary["in_flight"],
            summary["in_flight_committed"],
            summary["in_flight_rolled_back"],
            summary["zombie_commits"],
            if summary["totals_ok"] == true { "yes" } else { "NO" }
        );
    }
    Ok(runs)
}

fn fmt(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |v| format!("{v:.1}"))
}

fn summarize(runs: &[Run]) -> Value {
    let dist_of = |runs: &[&Run], f: &dyn Fn(&Run) -> Option<f64>| {
        let mut v: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return json!(null);
        }
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        json!({ "min": v[0], "median": at(0.5), "p90": at(0.9), "max": v[v.len() - 1], "n": v.len() })
    };
    let all: Vec<&Run> = runs.iter().collect();
    let dist = |f: &dyn Fn(&Run) -> Option<f64>| dist_of(&all, f);
    // A master's death needs an election before anyone can be promoted: its runs are
    // told apart from those where only a primary died.
    let (master, primary_only): (Vec<&Run>, Vec<&Run>) =
        runs.iter().partition(|r| r.victim_was_master);
    let coordinator: Vec<&Run> = runs
        .iter()
        .filter(|r| r.victim_primaries.iter().any(|f| f == CROSS))
        .collect();
    json!({
        "first_commit_ms_primary_only": dist_of(&primary_only, &|r| r.first_commit_ms),
        "first_commit_ms_master": dist_of(&master, &|r| r.first_commit_ms),
        "detect_ms": dist(&|r| r.detect_ms),
        "promote_ms": dist(&|r| r.promote_ms),
        "first_commit_ms": dist(&|r| r.first_commit_ms),
        "all_served_ms": dist(&|r| r.all_served_ms),
        "longest_pause_ms": dist(&|r| r.longest_pause_ms),
        "slowest_ms": dist(&|r| r.slowest_ms),
        "acknowledged": runs.iter().map(|r| r.acknowledged).sum::<usize>(),
        "lost": runs.iter().map(|r| r.lost).sum::<usize>(),
        "in_flight": runs.iter().map(|r| r.in_flight).sum::<usize>(),
        "in_flight_committed": runs.iter().map(|r| r.in_flight_committed).sum::<usize>(),
        "in_flight_rolled_back": runs.iter().map(|r| r.in_flight_rolled_back).sum::<usize>(),
        "zombie_commits": runs.iter().map(|r| r.zombie_commits).sum::<usize>(),
        "totals_ok": runs.iter().all(|r| r.totals_ok),
        "cross_acknowledged": runs.iter().map(|r| r.cross_acknowledged).sum::<usize>(),
        "in_doubt": runs.iter().map(|r| r.in_doubt).sum::<usize>(),
        "in_doubt_committed": runs.iter().map(|r| r.in_doubt_committed).sum::<usize>(),
        "in_doubt_resolved_ms": dist(&|r| r.in_doubt_resolved_ms),
        "in_doubt_resolved_ms_coordinator": dist_of(&coordinator, &|r| r.in_doubt_resolved_ms),
    })
}

/// The cluster as the master sees it (asked of every running node until one is the
/// master).
pub(crate) async fn master_status(cluster: &LocalCluster) -> Option<Value> {
    for node in cluster.nodes.iter().filter(|n| n.is_running()) {
        if let Some(s) = cluster.status(node.id).await {
            if s["raft"]["leader"].as_u64() == Some(node.id) {
                return Some(s);
            }
        }
    }
    None
}

/// Wait until every node is up and every function (the banks, and `transfer` when it is
/// deployed) has its two copies, none catching up.
async fn healed(args: &Args, cluster: &LocalCluster) -> anyhow::Result<Value> {
    let functions = FUNCTIONS.len() + usize::from(args.cross_clients > 0);
    healed_with(cluster, functions, 1).await
}

/// Wait until every node is up and each of the `functions` deployed has `backups`
/// backups, none catching up.
pub(crate) async fn healed_with(
    cluster: &LocalCluster,
    functions: usize,
    backups: usize,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut waiting_for = "a master to answer".to_owned();
    loop {
        if let Some(s) = master_status(cluster).await {
            match unhealed(&s, functions, backups) {
                None => return Ok(s),
                Some(why) => waiting_for = why,
            }
        }
        if started.elapsed() > HEAL_WAIT {
            bail!("the cluster did not heal within {HEAL_WAIT:?}: still waiting for {waiting_for}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What keeps the cluster the master describes in `status` from being healed: every
/// node up, each of the `functions` with `backups` backups, none catching up, and no
/// primary left on the master where a backup can serve (it hands them over).
fn unhealed(status: &Value, functions: usize, backups: usize) -> Option<String> {
    let down: Vec<String> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["health"] != "up")
        .map(|n| format!("node {} ({})", n["id"], n["health"]))
        .collect();
    if !down.is_empty() {
        return Some(format!("{} to be up", down.join(", ")));
    }
    let master = status["node"].as_u64();
    let fs = status["functions"].as_array().cloned().unwrap_or_default();
    if fs.len() != functions {
        return Some(format!(
            "{functions} functions (the master lists {})",
            fs.len()
        ));
    }
    for f in &fs {
        let name = &f["name"];
        if f["backups"].as_array().is_none_or(|b| b.len() != backups) {
            return Some(format!(
                "{name} to have {backups} backups (it has {})",
                f["backups"]
            ));
        }
        if f["catching_up"].as_array().is_none_or(|c| !c.is_empty()) {
            return Some(format!(
                "{name}'s catching-up backups {} to catch up",
                f["catching_up"]
            ));
        }
        if backups > 0 && f["primary"].as_u64() == master {
            return Some(format!(
                "the master (node {}) to hand its primary of {name} over",
                f["primary"]
            ));
        }
    }
    None
}

/// Clients sending transfers through `urls`, each one retried with its key until it is
/// answered.
pub(crate) struct Workload {
    stop: Arc<AtomicBool>,
    pub records: Arc<Mutex<Vec<Record>>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Workload {
    pub fn start(
        client: &reqwest::Client,
        urls: Vec<String>,
        clients: usize,
        tag: &str,
        functions: &'static [&'static str],
    ) -> Workload {
        Workload::spawn(client, urls, clients, &format!("{tag}-c"), move |c, n| {
            let from = ACCOUNTS[(n + c) % ACCOUNTS.len()];
            let to = ACCOUNTS[(n + c + 1) % ACCOUNTS.len()];
            let input = json!({ "from": from, "to": to, "amount": (n % 7 + 1) as u64 });
            (functions[(n + c) % functions.len()], input)
        })
    }

    /// Clients moving money between accounts of different banks through `transfer`.
    pub fn start_cross(
        client: &reqwest::Client,
        urls: Vec<String>,
        clients: usize,
        tag: &str,
    ) -> Workload {
        Workload::spawn(client, urls, clients, &format!("{tag}-x"), |c, n| {
            let from = FUNCTIONS[(n + c) % FUNCTIONS.len()];
            let to = FUNCTIONS[(n + c + 1) % FUNCTIONS.len()];
            let input = json!({
                "from": { "bank": from, "account": ACCOUNTS[n % ACCOUNTS.len()] },
                "to": { "bank": to, "account": ACCOUNTS[(n + 1) % ACCOUNTS.len()] },
                "amount": (n % 7 + 1) as u64,
            });
            (CROSS, input)
        })
    }

    /// `clients` tasks, client `c` sending its `n`-th transfer as `request(c, n)` (the
    /// function and the input) with key `<tag><c>-<n>`, through `urls` in turn.
    fn spawn(
        client: &reqwest::Client,
        urls: Vec<String>,
        clients: usize,
        tag: &str,
        request: impl Fn(usize, usize) -> (&'static str, Value) + Clone + Send + 'static,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|c| {
                let (client, stop, records) = (client.clone(), stop.clone(), records.clone());
                let url = urls[c % urls.len()].clone();
                let tag = format!("{tag}{c}");
                let request = request.clone();
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let (function, input) = request(c, n);
                        let key = format!("{tag}-{n}");
                        let record = transfer(&client, &url, function, &key, input).await?;
                        records.lock().push(record);
                    }
                    Ok(())
                })
            })
            .collect();
        Workload {
            stop,
            records,
            tasks,
        }
    }

    pub async fn finish(self) -> anyhow::Result<Vec<Record>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await??;
        }
        Ok(std::mem::take(&mut *self.records.lock()))
    }
}

pub(crate) async fn transfer(
    client: &reqwest::Client,
    base: &str,
    function: &'static str,
    key: &str,
    input: Value,
) -> anyhow::Result<Record> {
    let sent = Instant::now();
    let mut retries = 0;
    let mut first_failure = None;
    loop {
        let reply = client
            .post(format!("{base}/v1/functions/{function}/transfer"))
            .header("idempotency-key", key)
            .json(&input)
            .send()
            .await;
        if let Ok(reply) = reply {
            let status = reply.status().as_u16();
            let replayed = reply.headers().contains_key("idempotent-replayed");
            let served_by = reply
                .headers()
                .get(understudy::http::SERVED_BY_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let (n, e) = v.split_once(' ')?;
                    Some((n.parse().ok()?, e.parse().ok()?))
                });
            if status == 200 || status == 422 {
                let body = reply.json().await.unwrap_or(Value::Null);
                return Ok(Record {
                    function,
                    key: key.to_owned(),
                    input,
                    sent,
                    answered: Instant::now(),
                    status,
                    body,
                    replayed,
                    served_by,
                    retries,
                    first_failure,
                });
            }
            if first_failure.is_none() {
                let body: Value = reply.json().await.unwrap_or(Value::Null);
                // The message says which kind of wait it was (a lock, a prepared part).
                let message: String = body["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(100)
                    .collect();
                first_failure = Some(format!(
                    "{status} {} after {:.0} ms: {message}",
                    body["error"]["code"].as_str().unwrap_or("?"),
                    sent.elapsed().as_secs_f64() * 1000.0
                ));
            }
        } else if let Err(e) = &reply {
            first_failure.get_or_insert_with(|| {
                format!("{e} after {:.0} ms", sent.elapsed().as_secs_f64() * 1000.0)
            });
        }
        retries += 1;
        if sent.elapsed() > ANSWER_WAIT {
            bail!("transfer {key} on {function} got no answer within {ANSWER_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn one_run(args: &Args, cluster: &mut LocalCluster, i: usize) -> anyhow::Result<Run> {
    let before = healed(args, cluster).await?;
    let master = before["node"].as_u64().context("no master")?;
    let assignments: BTreeMap<String, (u64, u64, Vec<u64>)> = before["functions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let copies: Vec<u64> = std::iter::once(&f["primary"])
                .chain(f["backups"].as_array().into_iter().flatten())
                .filter_map(Value::as_u64)
                .collect();
            (
                f["name"].as_str().unwrap_or_default().to_owned(),
                (
                    f["primary"].as_u64().unwrap_or(0),
                    f["epoch"].as_u64().unwrap_or(0),
                    copies,
                ),
            )
        })
        .collect();
    let victim = match args.target.as_str() {
        "master" => master,
        "primary" => assignments[FUNCTIONS[i % FUNCTIONS.len()]].0,
        "coordinator" => match assignments.get(CROSS) {
            Some(a) if args.cross_clients > 0 => a.0,
            _ => bail!("--target coordinator needs transfers between banks (--cross-clients)"),
        },
        other => bail!("--target must be primary, coordinator or master, not {other:?}"),
    };
    let survivors: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.id != victim)
        .map(|n| n.url())
        .collect();
    let load = Workload::start(
        cluster.client(),
        survivors.clone(),
        args.clients,
        &format!("r{i}"),
        &FUNCTIONS,
    );
    let cross = (args.cross_clients > 0).then(|| {
        Workload::start_cross(
            cluster.client(),
            survivors,
            args.cross_clients,
            &format!("r{i}"),
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t0 = Instant::now();
    let t0_ms = wall_ms();
    match args.fault.as_str() {
        "kill" => cluster.node_mut(victim).kill9(),
        "partition" => cluster.node(victim).partition(true)?,
        _ => cluster.node(victim).pause(true)?,
    }
    // Until every function with a copy on the victim has answered in a newer epoch.
    let affected: Vec<&String> = assignments
        .iter()
        .filter(|(_, (_, _, copies))| copies.contains(&victim))
        .map(|(name, _)| name)
        .collect();
    let started = Instant::now();
    loop {
        // The banks' answers are in `load`, transfer's in `cross`.
        let done = {
            let banks = load.records.lock();
            let transfers = cross.as_ref().map(|c| c.records.lock());
            affected.iter().all(|f| {
                let epoch = assignments[*f].1;
                banks
                    .iter()
                    .chain(transfers.iter().flat_map(|t| t.iter()))
                    .any(|r| {
                        r.function == f.as_str() && r.served_by.is_some_and(|(_, e)| e > epoch)
                    })
            })
        };
        if done || started.elapsed() > HEAL_WAIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    if args.fault == "pause" || args.fault == "partition" {
        let stopped = Duration::from_millis(args.pause_ms).saturating_sub(t0.elapsed());
        tokio::time::sleep(stopped).await;
        if args.fault == "pause" {
            cluster.node(victim).pause(false)?;
        } else {
            cluster.node(victim).partition(false)?;
        }
        // Give the zombie the time to try.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Back to full strength, under load: the killed node restarts, the paused or
    // cut-off one already runs; its copies catch up and the master hands primaries back.
    let returned_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if args.fault == "kill" {
        cluster.restart(victim).await?;
    }
    healed(args, cluster).await?;
    let healed_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // Hand-overs follow the heal: give them time to show in the pauses.
    tokio::time::sleep(SETTLE).await;
    let mut records = load.finish().await?;
    if let Some(cross) = cross {
        records.extend(cross.finish().await?);
    }
    let after = master_status(cluster).await.unwrap_or_default();
    let event = after["failovers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e["node"] == victim && e["verdict"] == "down" && e["at_ms"].as_f64() >= Some(t0_ms)
        })
        .cloned();
    let detect_ms = event
        .as_ref()
        .and_then(|e| e["at_ms"].as_f64())
        .map(|at| at - t0_ms);
    // The first promotion committed (a victim that was only a backup has none).
    let promote_ms = event.as_ref().and_then(|e| {
        let step = e["steps"]
            .as_array()?
            .iter()
            .filter(|s| {
                s["command"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("promote"))
            })
            .filter_map(|s| s["ms"].as_f64())
            .reduce(f64::min)?;
        Some(e["at_ms"].as_f64()? + step - t0_ms)
    });
    let first_new = |f: &str| {
        let epoch = assignments[f].1;
        records
            .iter()
            .filter(|r| r.function == f && r.served_by.is_some_and(|(_, e)| e > epoch))
            .map(|r| r.answered.duration_since(t0).as_secs_f64() * 1000.0)
            .reduce(f64::min)
    };
    let victim_primaries: Vec<String> = assignments
        .iter()
        .filter(|(_, (p, _, _))| *p == victim)
        .map(|(n, _)| n.clone())
        .collect();
    let first_commit_ms = victim_primaries
        .iter()
        .filter_map(|f| first_new(f))
        .reduce(f64::min);
    let all_served_ms = affected
        .iter()
        .map(|f| first_new(f))
        .collect::<Option<Vec<f64>>>()
        .and_then(|v| v.into_iter().reduce(f64::max));
    let in_flight: Vec<&Record> = records
        .iter()
        .filter(|r| r.sent < t0 && r.answered > t0)
        .collect();
    let in_flight_committed = in_flight
        .iter()
        .filter(|r| r.replayed || r.served_by.is_some_and(|(n, _)| n == victim))
        .count();
    // A zombie commit: an answer from the victim in its old epoch that was given after
    // the master had promoted another node.
    let promoted_at = promote_ms.map(|ms| t0 + Duration::from_secs_f64(ms / 1000.0));
    let zombie_commits = records
        .iter()
        .filter(|r| {
            r.served_by.is_some_and(|(n, e)| {
                n == victim && assignments[r.function].0 == victim && e <= assignments[r.function].1
            }) && promoted_at.is_some_and(|p| r.answered > p + Duration::from_millis(50))
        })
        .count();

    let longest_pause = longest_pause(&records, t0);
    let longest_pause_ms = longest_pause.as_ref().map(|p| p.ms);
    let longest_pause_at = longest_pause.map(|p| {
        let phase = match p.from_ms {
            at if all_served_ms.is_none_or(|s| at < s) => "failover",
            at if at < returned_ms => "after failover",
            at if at < healed_ms => "return",
            _ => "after heal",
        };
        format!("{} from +{:.0} ms ({phase})", p.function, p.from_ms)
    });
    let acked: Vec<&Record> = records.iter().filter(|r| r.status == 200).collect();
    let slowest = acked
        .iter()
        .max_by_key(|r| r.answered.duration_since(r.sent));
    let slowest_ms = slowest.map(|r| r.answered.duration_since(r.sent).as_secs_f64() * 1000.0);
    let slowest_at = slowest.map(|r| {
        let from_ms = ms_after(t0, r.sent);
        format!(
            "{} sent at +{from_ms:.0} ms, {} retries{}",
            r.function,
            r.retries,
            r.first_failure
                .as_deref()
                .map_or(String::new(), |f| format!(", first: {f}"))
        )
    });
    let mut lost = 0;
    let url = cluster
        .nodes
        .iter()
        .find(|n| n.id != victim)
        .map(|n| n.url())
        .context("a survivor")?;
    for r in &acked {
        let again = transfer(cluster.client(), &url, r.function, &r.key, r.input.clone()).await?;
        if again.status != 200 || !again.replayed || again.body != r.body {
            lost += 1;
        }
    }
    // Transfers between banks move money between their totals: the sum is what is kept.
    let mut sum = 0;
    for f in FUNCTIONS {
        let reply = cluster
            .client()
            .post(format!("{url}/v1/functions/{f}/total"))
            .header("content-type", "application/json")
            .body("null")
            .send()
            .await?;
        let total: Value = reply.json().await?;
        sum += total["total"].as_u64().unwrap_or(0);
    }
    let totals_ok = sum == INITIAL * (ACCOUNTS.len() * FUNCTIONS.len()) as u64;
    // In-doubt transactions the promoted copies found, and how they ended.
    let mut in_doubt: Vec<Value> = Vec::new();
    for node in &cluster.nodes {
        if let Some(status) = cluster.status(node.id).await {
            in_doubt.extend(
                status["transactions"]["in_doubt"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|t| t["at_ms"].as_f64().is_some_and(|at| at >= t0_ms))
                    .cloned(),
            );
        }
    }
    Ok(Run {
        run: i + 1,
        fault: args.fault.clone(),
        victim,
        victim_was_master: victim == master,
        victim_primaries,
        detect_ms,
        promote_ms,
        first_commit_ms,
        all_served_ms,
        longest_pause_ms,
        longest_pause_at,
        slowest_ms,
        slowest_at,
        acknowledged: acked.len(),
        lost,
        in_flight: in_flight.len(),
        in_flight_committed,
        in_flight_rolled_back: in_flight.len() - in_flight_committed,
        zombie_commits,
        client_retries: records.iter().map(|r| u64::from(r.retries)).sum(),
        totals_ok,
        cross_acknowledged: acked.iter().filter(|r| r.function == CROSS).count(),
        in_doubt: in_doubt.len(),
        in_doubt_committed: in_doubt.iter().filter(|t| t["commit"] == true).count(),
        in_doubt_resolved_ms: in_doubt
            .iter()
            .filter_map(|t| t["at_ms"].as_f64())
            .reduce(f64::max)
            .map(|at| at - t0_ms),
    })
}

/// The longest gap between two answers of one function that ended after `t0`.
struct Pause {
    function: &'static str,
    ms: f64,
    /// When the gap began, in ms after `t0` (negative: before it).
    from_ms: f64,
}

/// Milliseconds from `t0` to `at` (negative when `at` is earlier).
fn ms_after(t0: Instant, at: Instant) -> f64 {
    if at >= t0 {
        at.duration_since(t0).as_secs_f64() * 1000.0
    } else {
        -(t0.duration_since(at).as_secs_f64() * 1000.0)
    }
}

fn longest_pause(records: &[Record], t0: Instant) -> Option<Pause> {
    // Every function, `transfer` (answered by the cross workload) included.
    FUNCTIONS
        .iter()
        .chain(&[CROSS])
        .filter_map(|f| {
            let mut answered: Vec<Instant> = records
                .iter()
                .filter(|r| r.function == *f && r.status == 200)
                .map(|r| r.answered)
                .collect();
            answered.sort();
            answered
                .windows(2)
                .filter(|w| w[1] > t0)
                .map(|w| Pause {
                    function: f,
                    ms: w[1].duration_since(w[0]).as_secs_f64() * 1000.0,
                    from_ms: ms_after(t0, w[0]),
                })
                .max_by(|a, b| a.ms.total_cmp(&b.ms))
        })
        .max_by(|a, b| a.ms.total_cmp(&b.ms))
}

async fn soak(args: &Args, cluster: &LocalCluster) -> anyhow::Result<Run> {
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    if !args.json {
        println!(
            "soak: {} clients through every node for {} s, no faults",
            args.clients, args.soak_seconds
        );
    }
    let load = Workload::start(cluster.client(), urls, args.clients, "soak", &FUNCTIONS);
    tokio::time::sleep(Duration::from_secs(args.soak_seconds)).await;
    let records = load.finish().await?;
    let status = master_status(cluster).await.unwrap_or_default();
    let failovers = status["failovers"].as_array().map_or(0, Vec::len);
    let acked = records.iter().filter(|r| r.status == 200).count();
    let retries: u64 = records.iter().map(|r| u64::from(r.retries)).sum();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "seconds": args.soak_seconds,
                "acknowledged": acked,
                "per_second": acked as f64 / args.soak_seconds as f64,
                "false_failovers": failovers,
                "client_retries": retries,
            }))?
        );
    } else {
        println!(
            "{acked} transfers acknowledged ({:.0}/s), {retries} client retries, false failovers: {failovers}",
            acked as f64 / args.soak_seconds as f64
        );
    }
    if failovers > 0 {
        bail!(
            "{failovers} false failovers under load: {}",
            status["failovers"]
        );
    }
    Ok(Run {
        fault: "none".into(),
        acknowledged: acked,
        client_retries: retries,
        totals_ok: true,
        ..Run::default()
    })
}
