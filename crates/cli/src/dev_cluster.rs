//! `understudy cluster local --nodes N`: a development cluster on loopback in one
//! command. It starts the nodes as `local::LocalCluster` does for the demo and the drill
//! (real processes of this binary, on fixed ports so that a second run resumes on the
//! data the first left), prints where everything is, and stops the nodes with SIGTERM
//! when it gets SIGINT or SIGTERM itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::local::{LocalCluster, Options, PEER_PORT_OFFSET};
use understudy::wal::Durability;

/// Most nodes a local cluster may have (fixed ports leave room for 100 below the QUIC
/// ports; beyond a few nodes one machine only measures itself).
const NODES_MAX: usize = 16;

/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many nodes (at least 2: a function has a primary and a backup).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Node N serves HTTP on BASE_PORT+N-1 and QUIC on BASE_PORT+100+N-1.
    #[arg(long, default_value_t = 7201)]
    base_port: u16,
    /// Where the certificates, configs, data and logs go. A later run on the same
    /// directory resumes the cluster with its functions and state.
    #[arg(long, default_value = "understudy-local")]
    dir: PathBuf,
    /// Delete what a previous run left in the directory first.
    #[arg(long)]
    fresh: bool,
    /// disk (fsynced on every copy before an answer) or memory.
    #[arg(long, default_value = "disk")]
    durability: Durability,
}

/// Start the cluster, print where everything is and run until SIGINT or SIGTERM.
///
/// Fails when the node count is out of range, the directory holds a cluster of another
/// size, or a node does not come up (the error names its log).
pub fn run(args: Args) -> anyhow::Result<()> {
    if !(2..=NODES_MAX).contains(&args.nodes) {
        bail!("--nodes {}: give 2 to {NODES_MAX}", args.nodes);
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("cannot resolve {}", args.dir.display()))?;
    let before = previous_nodes(&dir);
    if args.fresh {
        for id in 1..=before {
            let node_dir = dir.join(format!("node-{id}"));
            std::fs::remove_dir_all(&node_dir)
                .with_context(|| format!("cannot remove {}", node_dir.display()))?;
        }
    } else if before != 0 && before != args.nodes {
        bail!(
            "{} holds a cluster of {before} nodes, not {}: use --nodes {before}, another --dir, or --fresh to start over",
            dir.display(),
            args.nodes
        );
    }
    let resumed = before != 0 && !args.fresh;
    let options = Options {
        nodes: args.nodes,
        clustered: true,
        durability: args.durability,
        cluster_toml: String::new(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut cluster = runtime
        .block_on(LocalCluster::start_on(&dir, &options, Some(args.base_port)))
        .context("starting the local cluster")?;
    say(&describe(&cluster, &dir, resumed));
    runtime.block_on(stop_signal())?;
    say("stopping the nodes\n");
    let mut clean = true;
    for node in &mut cluster.nodes {
        clean &= node.terminate(STOP_TIMEOUT);
    }
    if !clean {
        bail!("a node did not stop within {STOP_TIMEOUT:?} of SIGTERM and was killed");
    }
    say(&format!("stopped; the data stays in {}\n", dir.display()));
    Ok(())
}

/// Print `text`; a reader that went away (a closed pipe) must not stop the cluster
/// from running, nor from stopping cleanly.
fn say(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// How many nodes a previous run left in `dir` (`node-1`, `node-2`, ... in a row).
fn previous_nodes(dir: &Path) -> usize {
    let mut n = 0;
    while dir.join(format!("node-{}", n + 1)).join("data").exists() {
        n += 1;
    }
    n
}

/// Where everything is, one fact per line (`node N  http://...` lines first, which
/// scripts may read).
fn describe(cluster: &LocalCluster, dir: &Path, resumed: bool) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let first = cluster.node(1).url();
    let _ = writeln!(
        text,
        "understudy cluster of {} nodes on loopback{}",
        cluster.nodes.len(),
        if resumed {
            " (resumed on the data of the last run)"
        } else {
            ""
        }
    );
    for node in &cluster.nodes {
        let _ = writeln!(
            text,
            "node {}  {}  quic {}  pid {}",
            node.id,
            node.url(),
            node.peer,
            node.pid().unwrap_or(0)
        );
    }
    let _ = writeln!(text, "console   {first}/ui");
    let _ = writeln!(
        text,
        "metrics   {first}/metrics (every node serves its own)"
    );
    let _ = writeln!(text, "certs     {}", dir.join("certs").display());
    for node in &cluster.nodes {
        let config = node.config_path();
        let _ = writeln!(
            text,
            "node {}    config {}  data {}  log {}",
            node.id,
            config.display(),
            config.with_file_name("data").display(),
            node.log_path().display()
        );
    }
    let counter = Path::new("target-guests/components/counter.wasm");
    let _ = writeln!(text, "try it:");
    let _ = writeln!(
        text,
        "  understudy deploy counter {} --node {first}{}",
        counter.display(),
        if counter.exists() {
            ""
        } else {
            "   (build it first: ./scripts/build-guests.sh)"
        }
    );
    let last = cluster.node(cluster.nodes.len() as u64).url();
    let _ = writeln!(
        text,
        "  understudy invoke counter increment '{{\"by\": 2}}' --node {last}"
    );
    let _ = writeln!(text, "  understudy status --node {first}");
    let _ = writeln!(
        text,
        "stop with Ctrl-C (or SIGTERM to pid {}); the nodes stop with it. QUIC ports are HTTP + {PEER_PORT_OFFSET}.",
        std::process::id()
    );
    let _ = writeln!(text, "ready");
    text
}

async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
