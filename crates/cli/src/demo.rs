//! `understudy demo`: the main job, for a newcomer. A three-node cluster of node
//! processes on loopback, the bank example deployed with two copies, transfers from
//! several clients, the primary's node killed with SIGKILL, the failover timeline, the
//! checks (nothing acknowledged lost, money conserved), and the killed node back as a
//! backup holding the same state as the new primary.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::drill::{healed_with, master_status, transfer, wall_ms, Workload, ACCOUNTS};
use crate::local::{LocalCluster, Options};
use understudy::wal::Durability;

const FUNCTION: [&str; 1] = ["bank"];
const INITIAL: u64 = 500;
const CLIENTS: usize = 8;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The bank example component.
    #[arg(long, default_value = "target-guests/components/bank.wasm")]
    pub bank: PathBuf,
    /// Where the nodes keep their data and logs (a fresh temporary folder by default,
    /// kept afterwards so that the logs can be read).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn step(n: usize, text: &str) {
    println!("\n\x1b[1m== {n}/7 {text}\x1b[0m");
}

/// Fails when the cluster does not start or a check fails (the message says which).
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("understudy-demo-{}", std::process::id()))
    });
    runtime.block_on(demo(&args, &dir))
}

async fn demo(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let bank = std::fs::read(&args.bank)
        .with_context(|| format!("cannot read {}", args.bank.display()))?;

    step(
        1,
        "Starting a three-node cluster on loopback (separate processes, QUIC with mutual TLS)",
    );
    let mut cluster = LocalCluster::start(
        dir,
        &Options {
            nodes: 3,
            clustered: true,
            durability: Durability::Disk,
            cluster_toml: String::new(),
        },
    )
    .await?;
    let master = cluster.wait_master(Duration::from_secs(10)).await?;
    for n in &cluster.nodes {
        println!(
            "node {}  pid {:>7}  {}  {}",
            n.id,
            n.pid().unwrap_or(0),
            n.url(),
            if n.id == master {
                "master (Raft leader)"
            } else {
                ""
            }
        );
    }
    println!("data and logs: {}", dir.display());
    println!(
        "live console: {}/ui (open it now: it shows the failover as it happens, and reads on through another node when its own dies)",
        cluster.node(1).url()
    );

    step(
        2,
        "Deploying the bank example through node 3, with three copies",
    );
    let placed = cluster.deploy(3, "bank", bank, 3, "").await?;
    let primary = placed["primary"].as_u64().context("no primary")?;
    let epoch = placed["epoch"].as_u64().unwrap_or(0);
    println!(
        "bank {}: primary node {primary}, backups {}, epoch {epoch}; every commit is on all three before it is acknowledged",
        placed["digest"].as_str().unwrap_or(""),
        placed["backups"]
    );
    for account in ACCOUNTS {
        let reply = cluster
            .client()
            .post(format!("{}/v1/functions/bank/open", cluster.node(3).url()))
            .json(&json!({ "account": account, "initial": INITIAL }))
            .send()
            .await?;
        if !reply.status().is_success() {
            bail!("opening {account}: {}", reply.text().await?);
        }
    }
    println!(
        "opened {} accounts of {INITIAL}: the total is {}",
        ACCOUNTS.len(),
        INITIAL * ACCOUNTS.len() as u64
    );

    let survivors: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != primary)
        .collect();
    step(
        3,
        &format!(
            "Transfers from {CLIENTS} clients through nodes {} (they forward to the primary), each with an idempotency key",
            survivors
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    );
    let urls: Vec<String> = survivors.iter().map(|id| cluster.node(*id).url()).collect();
    let load = Workload::start(cluster.client(), urls, CLIENTS, "demo", &FUNCTION);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        println!("  {} transfers acknowledged", load.records.lock().len());
    }

    step(
        4,
        &format!(
            "kill -9 node {primary}, the bank's primary{}",
            if primary == master {
                " (and the master)"
            } else {
                ""
            }
        ),
    );
    let t0 = Instant::now();
    let t0_ms = wall_ms();
    cluster.node_mut(primary).kill9();
    // Until the bank answers from a new epoch, and a little more.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10)
        && !load
            .records
            .lock()
            .iter()
            .any(|r| r.served_by.is_some_and(|(_, e)| e > epoch))
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = load.finish().await?;
    let after = master_status(&cluster).await.unwrap_or_default();
    let event = after["failovers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e["node"] == primary && e["verdict"] == "down" && e["at_ms"].as_f64() >= Some(t0_ms)
        })
        .cloned()
        .unwrap_or(Value::Null);
    let first = records
        .iter()
        .filter(|r| r.served_by.is_some_and(|(_, e)| e > epoch))
        .min_by_key(|r| r.answered);
    println!("timeline, in ms after the kill:");
    if let Some(at) = event["at_ms"].as_f64() {
        println!(
            "  {:>7.1}  the master (node {}) declares node {primary} down: silent for {:.1} ms (pings every 5 ms, timeout 20 ms)",
            at - t0_ms,
            after["node"],
            event["silent_ms"].as_f64().unwrap_or(0.0)
        );
        for s in event["steps"].as_array().into_iter().flatten() {
            println!(
                "  {:>7.1}  committed through Raft: {}",
                at - t0_ms + s["ms"].as_f64().unwrap_or(0.0),
                s["command"].as_str().unwrap_or("")
            );
        }
    }
    if let Some(r) = first {
        let (node, e) = r.served_by.unwrap_or_default();
        println!(
            "  {:>7.1}  first transfer committed by the new primary, node {node} (epoch {e})",
            r.answered.duration_since(t0).as_secs_f64() * 1000.0
        );
    }
    let in_flight: Vec<_> = records
        .iter()
        .filter(|r| r.sent < t0 && r.answered > t0)
        .collect();
    let committed = in_flight
        .iter()
        .filter(|r| r.replayed || r.served_by.is_some_and(|(n, _)| n == primary))
        .count();
    println!(
        "in flight at the kill: {} transfers: {committed} had committed (their retry got the remembered answer), {} had not (they ran once, on the new primary)",
        in_flight.len(),
        in_flight.len() - committed
    );
    let slowest = records
        .iter()
        .map(|r| r.answered.duration_since(r.sent))
        .max()
        .unwrap_or_default();
    println!(
        "the clients saw no errors: the longest wait for an answer was {:.1} ms",
        slowest.as_secs_f64() * 1000.0
    );

    step(5, "Checking every acknowledged transfer and the money");
    let acked: Vec<_> = records.iter().filter(|r| r.status == 200).collect();
    let url = cluster.node(survivors[0]).url();
    let mut lost = 0;
    for r in &acked {
        let again = transfer(cluster.client(), &url, r.function, &r.key, r.input.clone()).await?;
        if again.status != 200 || !again.replayed || again.body != r.body {
            lost += 1;
        }
    }
    println!(
        "{} transfers were acknowledged; replaying each one's key returns its original answer: {lost} lost",
        acked.len()
    );
    let total: Value = cluster
        .client()
        .post(format!("{url}/v1/functions/bank/total"))
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await?
        .json()
        .await?;
    let expected = INITIAL * ACCOUNTS.len() as u64;
    println!("bank total: {} (expected {expected})", total["total"]);
    if lost > 0 || total["total"].as_u64() != Some(expected) {
        bail!(
            "FAILED: {lost} acknowledged transfers lost, total {}",
            total["total"]
        );
    }

    step(
        6,
        &format!("Restarting node {primary}: it rejoins as a backup"),
    );
    cluster.restart(primary).await?;
    let healed = healed_with(&cluster, 1, 2).await?;
    let f = healed["functions"][0].clone();
    println!(
        "bank: primary node {}, backups {}, epoch {}",
        f["primary"], f["backups"], f["epoch"]
    );
    if let Some(c) = healed["catch_ups"]
        .as_array()
        .and_then(|c| c.iter().rev().find(|c| c["backup"] == primary))
    {
        println!(
            "node {primary} was brought up to date with a snapshot of {} bytes in {:.1} ms, then the log",
            c["bytes"],
            c["ms"].as_f64().unwrap_or(0.0)
        );
    }
    let digest = |id: u64| {
        let client = cluster.client().clone();
        let url = format!("{}/v1/functions/bank", cluster.node(id).url());
        async move {
            let v: Value = client.get(url).send().await.ok()?.json().await.ok()?;
            Some((v["seq"].as_u64()?, v["state_digest"].as_str()?.to_owned()))
        }
    };
    let new_primary = f["primary"].as_u64().unwrap_or(0);
    let started = Instant::now();
    loop {
        let (a, b) = (digest(new_primary).await, digest(primary).await);
        if a.is_some() && a == b {
            let (seq, d) = a.unwrap_or_default();
            println!(
                "node {primary}'s copy equals the primary's: {} commits, state {}",
                seq,
                &d[..d.len().min(23)]
            );
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("node {primary}'s copy never matched the primary's: {b:?} vs {a:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    step(7, "The cluster now (understudy status)");
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new(exe)
        .args(["status", "--node", &url])
        .output()?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    println!(
        "\n\x1b[1mOK\x1b[0m: failover in {} ms, no acknowledged transfer lost, money conserved, node {primary} back as a backup.",
        first.map_or("?".into(), |r| format!(
            "{:.1}",
            r.answered.duration_since(t0).as_secs_f64() * 1000.0
        ))
    );
    println!(
        "more: `understudy drill --runs 20` measures this over many kills; logs are in {}",
        dir.display()
    );
    Ok(())
}
