//! `understudy bench`: the figures behind the design's claims, measured in one run so
//! that ratios compare like with like. Prints tables; asserts nothing.
//!
//! - invoke: bare wasmtime (instantiate + call, state in a plain map) against the
//!   runtime's in-process path and against HTTP, one client, no fsync.
//! - commit: `disk` and `memory` durability side by side at several client counts,
//!   beside the measured fsync time, the bound it sets on `disk` (clients / fsync time)
//!   and the CPU the process spent.
//! - memory: resident memory per deployed function and per in-flight instance.
//! - replicated: commits over HTTP against node processes on loopback: a node alone,
//!   and a three-node cluster with functions of one, two and three copies (primary plus
//!   none, one and two backups), with `disk` and `memory` durability, at each client
//!   count; then the catch-up of a new backup from a snapshot, in MB/s.
//! - languages: the bank in Rust, Python and JavaScript (`bench_languages`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use understudy::config::Config;
use understudy::node::Node;
use understudy::wal::Durability;
use understudy::wasm::bindings::{self, understudy::function as wit};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to measure: invoke, commit, memory, isolation, replicated, distributed,
    /// languages or all.
    #[arg(long, default_value = "all")]
    pub what: String,
    /// The counter example component.
    #[arg(long, default_value = "target-guests/components/counter.wasm")]
    pub counter: PathBuf,
    /// The hostile test component (for the memory and catch-up figures).
    #[arg(long, default_value = "target-guests/components/hostile.wasm")]
    pub hostile: PathBuf,
    /// The lists test component (for the distributed-transaction figures).
    #[arg(long, default_value = "target-guests/components/lists.wasm")]
    pub lists: PathBuf,
    /// Where the bank's components are (bank.wasm, bank-py.wasm, bank-js.wasm), for the
    /// languages figures.
    #[arg(long, default_value = "target-guests/components")]
    pub components: PathBuf,
    /// Concurrent clients for the commit benchmark.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    pub clients: Vec<usize>,
    /// Durabilities for the commit benchmark, measured in turn at each client count.
    #[arg(long, value_delimiter = ',', default_value = "disk,memory")]
    pub durability: Vec<Durability>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Where the benchmark nodes keep their data (a fresh temporary folder by default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Fails when a component cannot be read or deployed, or a node cannot start.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("understudy-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let result = runtime.block_on(async {
        let counter = std::fs::read(&args.counter)
            .with_context(|| format!("cannot read {}", args.counter.display()))?;
        let what = args.what.as_str();
        if what == "invoke" || what == "all" {
            invoke(&args, &dir, &counter).await?;
        }
        if what == "commit" || what == "all" {
            commit(&args, &dir, &counter).await?;
        }
        if what == "memory" || what == "all" {
            memory(&args, &dir, &counter).await?;
        }
        if what == "isolation" || what == "all" {
            isolation(&args, &dir, &counter).await?;
        }
        if what == "replicated" || what == "all" {
            replicated(&args, &dir, &counter).await?;
        }
        if what == "distributed" || what == "all" {
            distributed(&args, &dir).await?;
        }
        if what == "languages" || what == "all" {
            crate::bench_languages::languages(&args, &dir).await?;
        }
        anyhow::Ok(())
    });
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn open_node(
    dir: &std::path::Path,
    name: &str,
    durability: Durability,
) -> anyhow::Result<Node> {
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    let config = Config {
        data_dir: path,
        durability,
        ..Config::default()
    };
    Ok(tokio::task::spawn_blocking(move || Node::open(config)).await??)
}

/// Run `f` in a loop for `seconds` from `clients` tasks; returns (ops, elapsed, latencies).
pub(crate) async fn drive<F, Fut>(
    clients: usize,
    seconds: f64,
    f: F,
) -> (u64, Duration, Vec<Duration>)
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (f, stop, ops) = (f.clone(), stop.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if let Err(e) = f().await {
                    eprintln!("bench operation failed: {e:#}");
                    break;
                }
                latencies.push(t.elapsed());
                ops.fetch_add(1, Ordering::Relaxed);
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    (ops.load(Ordering::Relaxed), elapsed, latencies)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Serve `node`'s API on a free loopback port: its address, and the server's task.
pub(crate) async fn serve_on_loopback(
    node: &Node,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(understudy::http::serve(
        node.clone(),
        listener,
        std::future::pending(),
    ));
    Ok((addr, server))
}

/// One request of an HTTP client of `drive`: POST `null` to `url`; an answer other than
/// 2xx is an error.
async fn post_null(client: reqwest::Client, url: String) -> anyhow::Result<()> {
    let r = client
        .post(&url)
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "status {}", r.status());
    r.bytes().await?;
    Ok(())
}

/// One request of a client of `drive`: `counter.increment` on `node`, in process.
async fn increment(node: Node) -> anyhow::Result<()> {
    let answer = node.invoke("counter", "increment", b"null", None).await?;
    answer
        .outcome
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    Ok(())
}

async fn invoke(args: &Args, dir: &std::path::Path, counter: &[u8]) -> anyhow::Result<()> {
    println!("== invocation cost: counter.increment, 1 client, no fsync ==");
    let bare = bare_loop(counter, args.seconds).await?;
    let node = open_node(dir, "invoke", Durability::Memory).await?;
    node.deploy("counter", counter.to_vec(), Default::default())
        .await?;
    let n = node.clone();
    let (ops, elapsed, lat) = drive(1, args.seconds, move || increment(n.clone())).await;
    let in_process = ops as f64 / elapsed.as_secs_f64();
    let in_process_p50 = percentile(&lat, 0.5);

    let (addr, server) = serve_on_loopback(&node).await?;
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/functions/counter/increment");
    let (ops, elapsed, http_lat) = drive(1, args.seconds, move || {
        post_null(client.clone(), url.clone())
    })
    .await;
    server.abort();
    let http = ops as f64 / elapsed.as_secs_f64();
    println!(
        "{:<34} {:>12} {:>10} {:>9}",
        "path", "invocations/s", "p50 us", "vs bare"
    );
    println!(
        "{:<34} {:>12.0} {:>10.1} {:>8.0}%",
        "bare wasmtime (instantiate+call)",
        bare.0,
        us(bare.1),
        100.0
    );
    println!(
        "{:<34} {:>12.0} {:>10.1} {:>8.0}%",
        "runtime in-process (transaction)",
        in_process,
        us(in_process_p50),
        100.0 * in_process / bare.0
    );
    println!(
        "{:<34} {:>12.0} {:>10.1} {:>8.0}%",
        "runtime over HTTP (loopback)",
        http,
        us(percentile(&http_lat, 0.5)),
        100.0 * http / bare.0
    );
    println!();
    Ok(())
}

/// The limit of this design: instantiate the component and call it, with state in a
/// plain map and nothing else. Returns (calls/s, p50).
async fn bare_loop(counter: &[u8], seconds: f64) -> anyhow::Result<(f64, Duration)> {
    // The same engine configuration as a node's: pooling, epoch interruption, bounds.
    let config = understudy::wasm::engine_config(&understudy::wasm::Options::default());
    let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let component = Component::new(&engine, counter).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut linker = Linker::<Bare>::new(&engine);
    bindings::Function::add_to_linker::<Bare, HasSelf<Bare>>(&mut linker, |b| b)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pre = bindings::FunctionPre::new(
        linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    {
        let mut state = BTreeMap::new();
        let mut latencies = Vec::new();
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < seconds {
            let t = Instant::now();
            let mut store = Store::new(&engine, Bare::new(std::mem::take(&mut state)));
            store.set_epoch_deadline(u64::MAX / 2);
            let instance = pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let out = instance
                .understudy_function_handler()
                .call_handle(&mut store, "increment", b"null")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::ensure!(out.is_ok(), "counter failed");
            state = std::mem::take(&mut store.data_mut().state);
            latencies.push(t.elapsed());
        }
        let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
        latencies.sort();
        Ok((rate, percentile(&latencies, 0.5)))
    }
}

/// A bare host for guests run outside a node: state in a map, calls refused, logs
/// dropped, and WASI with nothing granted (as the node's), built on first use as the
/// node builds it (most guests never touch it).
pub(crate) struct Bare {
    pub(crate) state: BTreeMap<Vec<u8>, Vec<u8>>,
    wasi: Option<WasiCtx>,
    table: ResourceTable,
}

impl Bare {
    pub(crate) fn new(state: BTreeMap<Vec<u8>, Vec<u8>>) -> Bare {
        Bare {
            state,
            wasi: None,
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: self.wasi.get_or_insert_with(|| WasiCtx::builder().build()),
            table: &mut self.table,
        }
    }
}

impl wit::types::Host for Bare {}

impl wit::state::Host for Bare {
    fn get(
        &mut self,
        key: Vec<u8>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, wit::types::Error>> {
        Ok(Ok(self.state.get(&key).cloned()))
    }
    fn put(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), wit::types::Error>> {
        self.state.insert(key, value);
        Ok(Ok(()))
    }
    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<Result<(), wit::types::Error>> {
        self.state.remove(&key);
        Ok(Ok(()))
    }
    fn scan(
        &mut self,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<wit::types::Entry>, wit::types::Error>> {
        Ok(Ok(self
            .state
            .range(start..)
            .take_while(|(k, _)| end.as_ref().is_none_or(|end| *k < end))
            .take(limit as usize)
            .map(|(k, v)| wit::types::Entry {
                key: k.clone(),
                value: v.clone(),
            })
            .collect()))
    }
}

impl wit::call::Host for Bare {
    async fn invoke(
        &mut self,
        _function: String,
        _method: String,
        _input: Vec<u8>,
    ) -> wasmtime::Result<Result<Vec<u8>, wit::types::Error>> {
        Ok(Err(wit::types::Error {
            code: "unsupported".into(),
            message: "no calls in the bare loop".into(),
        }))
    }
}

impl wit::log::Host for Bare {
    fn log(&mut self, _level: wit::log::Level, _message: String) -> wasmtime::Result<()> {
        Ok(())
    }
}

/// Time of a 4 KiB write plus fdatasync in `dir`, 200 times: the floor under every
/// durable commit on this disk. Returns the sorted samples.
fn fsync_times(dir: &std::path::Path) -> anyhow::Result<Vec<Duration>> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        file.write_all(&[7u8; 4096])?;
        file.sync_data()?;
        times.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    times.sort();
    Ok(times)
}

async fn commit(args: &Args, dir: &std::path::Path, counter: &[u8]) -> anyhow::Result<()> {
    let times = fsync_times(dir)?;
    let fsync_mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!("== commits: counter.increment on one function, in process ==");
    println!(
        "fsync probe (4 KiB write + fdatasync, 200 runs): p50 {:.0} us, mean {:.0} us, p99 {:.0} us",
        us(percentile(&times, 0.5)),
        us(fsync_mean),
        us(percentile(&times, 0.99))
    );
    println!("bound = clients / (mean fsync of the log during that run): one commit per client per fsync (disk only)");
    println!("cpu us = CPU time (user + system) of this process per commit; cores = CPU time / wall time");
    println!(
        "{:>10} {:>8} {:>12} {:>10} {:>10} {:>11} {:>14} {:>9} {:>13} {:>7} {:>6}",
        "durability",
        "clients",
        "commits/s",
        "p50 us",
        "p99 us",
        "fsync us",
        "fsync bound/s",
        "of bound",
        "commits/fsync",
        "cpu us",
        "cores"
    );
    let pids = [std::process::id()];
    for &clients in &args.clients {
        for &durability in &args.durability {
            let name = match durability {
                Durability::Disk => "disk",
                Durability::Memory => "memory",
            };
            let node = open_node(dir, &format!("commit-{name}-{clients}"), durability).await?;
            node.deploy("counter", counter.to_vec(), Default::default())
                .await?;
            let n = node.clone();
            let cpu_before = cpu_us(&pids);
            let (ops, elapsed, lat) =
                drive(clients, args.seconds, move || increment(n.clone())).await;
            let cpu = cpu_before
                .zip(cpu_us(&pids))
                .map(|(before, after)| after - before);
            let rate = ops as f64 / elapsed.as_secs_f64();
            let stats = node.wal_stats();
            let fsyncs = stats.fsyncs.max(1);
            let fsync_us = stats.fsync_ns as f64 / fsyncs as f64 / 1000.0;
            let (bound, of_bound) = match durability {
                Durability::Disk => {
                    let bound = clients as f64 / (fsync_us / 1e6);
                    (
                        format!("{bound:.0}"),
                        format!("{:.0}%", 100.0 * rate / bound),
                    )
                }
                Durability::Memory => ("-".to_owned(), "-".to_owned()),
            };
            println!(
                "{:>10} {:>8} {:>12.0} {:>10.0} {:>10.0} {:>11.0} {:>14} {:>9} {:>13.1} {:>7} {:>6}",
                name,
                clients,
                rate,
                us(percentile(&lat, 0.5)),
                us(percentile(&lat, 0.99)),
                fsync_us,
                bound,
                of_bound,
                stats.records as f64 / fsyncs as f64,
                cpu_cell(cpu.filter(|_| ops > 0).map(|c| c / ops as f64)),
                cpu.map_or_else(
                    || "-".to_owned(),
                    |c| format!("{:.2}", c / 1e6 / elapsed.as_secs_f64())
                ),
            );
        }
    }
    println!();
    Ok(())
}

/// One line of the replicated table.
struct Measured {
    rate: f64,
    ops: u64,
    p50: Duration,
    p99: Duration,
}

/// CPU time (user + system) used so far by the processes `pids`, in microseconds, from
/// `/proc/PID/stat`; `None` where that cannot be read (not Linux, a process gone).
fn cpu_us(pids: &[u32]) -> Option<f64> {
    // SAFETY: sysconf only reads a configuration value.
    #[allow(unsafe_code)]
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_s <= 0 {
        return None;
    }
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start at field 3.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        ticks += utime + stime;
    }
    Some(ticks as f64 * 1e6 / ticks_per_s as f64)
}

/// `measure`, with the CPU time the processes `pids` spent per operation meanwhile.
async fn with_cpu<F: std::future::Future<Output = Measured>>(
    pids: &[u32],
    measure: F,
) -> (Measured, Option<f64>) {
    let before = cpu_us(pids);
    let m = measure.await;
    let after = cpu_us(pids);
    let per_op = match (before, after) {
        (Some(b), Some(a)) if m.ops > 0 => Some((a - b) / m.ops as f64),
        _ => None,
    };
    (m, per_op)
}

fn cpu_cell(cpu_us_per_op: Option<f64>) -> String {
    cpu_us_per_op.map_or_else(|| "-".to_owned(), |c| format!("{c:.0}"))
}

/// `counter.increment` over HTTP at `url`, from `clients` tasks for `seconds`.
async fn http_commits(
    client: &reqwest::Client,
    url: &str,
    clients: usize,
    seconds: f64,
) -> Measured {
    http_bodies(
        client,
        url,
        clients,
        seconds,
        Arc::new(|_| "null".to_owned()),
    )
    .await
}

/// POST to `url` from `clients` tasks for `seconds`, the n-th body made by `body(n)`.
async fn http_bodies(
    client: &reqwest::Client,
    url: &str,
    clients: usize,
    seconds: f64,
    body: Arc<dyn Fn(u64) -> String + Send + Sync>,
) -> Measured {
    let (client, url) = (client.clone(), url.to_owned());
    let n = Arc::new(AtomicU64::new(0));
    let (ops, elapsed, lat) = drive(clients, seconds, move || {
        let (client, url, body, n) = (client.clone(), url.clone(), body.clone(), n.clone());
        async move {
            let body = body(n.fetch_add(1, Ordering::Relaxed));
            let reply = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            if !reply.status().is_success() {
                anyhow::bail!("{}: {}", reply.status(), reply.text().await?);
            }
            reply.bytes().await?;
            Ok(())
        }
    })
    .await;
    Measured {
        rate: ops as f64 / elapsed.as_secs_f64(),
        ops,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    }
}

/// Transactions across functions whose primaries are on different nodes (two-phase
/// commit) against transactions on one function, in the same 3-node cluster.
async fn distributed(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    use crate::local::{LocalCluster, Options};
    const KEYS: u64 = 1000;
    let lists = std::fs::read(&args.lists)
        .with_context(|| format!("cannot read {}", args.lists.display()))?;
    println!("== distributed transactions: list appends over HTTP, 3 node processes on loopback, disk durability, 2 copies of each function ==");
    let cluster = LocalCluster::start(
        &dir.join("distributed"),
        &Options {
            nodes: 3,
            clustered: true,
            durability: Durability::Disk,
            cluster_toml: String::new(),
        },
    )
    .await?;
    let mut primaries = Vec::new();
    for name in ["lists-a", "lists-b", "lists-c"] {
        let placed = cluster.deploy(1, name, lists.clone(), 2, "*").await?;
        primaries.push(placed["primary"].as_u64().context("no primary")?);
    }
    println!(
        "primaries: lists-a on node {}, lists-b on node {}, lists-c on node {}; every transaction enters through lists-a's primary",
        primaries[0], primaries[1], primaries[2]
    );
    if primaries[0] == primaries[1] {
        println!("(lists-a and lists-b share a node: the 2-function rows are not across nodes)");
    }
    println!(
        "{:>30} {:>8} {:>12} {:>10} {:>10} {:>14}",
        "transaction", "clients", "txns/s", "p50 us", "p99 us", "vs 1 function"
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()?;
    let node = cluster.node(primaries[0]).url();
    let append = |n: u64| format!(r#"["append","k{}",{n}]"#, n % KEYS);
    for &clients in &args.clients {
        let single: Arc<dyn Fn(u64) -> String + Send + Sync> =
            Arc::new(move |n| format!("[{}]", append(n)));
        let two: Arc<dyn Fn(u64) -> String + Send + Sync> =
            Arc::new(move |n| format!(r#"[["lists-a",[{a}]],["lists-b",[{a}]]]"#, a = append(n)));
        let three: Arc<dyn Fn(u64) -> String + Send + Sync> = Arc::new(move |n| {
            format!(
                r#"[["lists-a",[{a}]],["lists-b",[{a}]],["lists-c",[{a}]]]"#,
                a = append(n)
            )
        });
        let base = http_bodies(
            &client,
            &format!("{node}/v1/functions/lists-a/txn"),
            clients,
            args.seconds,
            single,
        )
        .await;
        let row = |what: &str, m: &Measured| {
            println!(
                "{:>30} {:>8} {:>12.0} {:>10.0} {:>10.0} {:>14.2}",
                what,
                clients,
                m.rate,
                us(m.p50),
                us(m.p99),
                m.rate / base.rate
            );
        };
        row("1 function (lists-a)", &base);
        for (what, body) in [
            ("2 functions (a, b)", two),
            ("3 functions (a, b, c)", three),
        ] {
            let m = http_bodies(
                &client,
                &format!("{node}/v1/functions/lists-a/across"),
                clients,
                args.seconds,
                body,
            )
            .await;
            row(what, &m);
        }
    }
    println!();
    Ok(())
}

async fn replicated(args: &Args, dir: &std::path::Path, counter: &[u8]) -> anyhow::Result<()> {
    use crate::local::{LocalCluster, Options};
    println!("== replicated commits: counter.increment over HTTP to the primary, node processes on loopback ==");
    println!("copies 1* = a node alone (no cluster), the baseline; 1/2/3 = primary plus 0/1/2 backups in a 3-node cluster");
    println!("cpu us = CPU time (user + system) of all the node processes per commit, from /proc/PID/stat");
    println!(
        "{:>10} {:>7} {:>8} {:>12} {:>10} {:>10} {:>13} {:>8}",
        "durability", "copies", "clients", "commits/s", "p50 us", "p99 us", "vs alone", "cpu us"
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()?;
    for durability in [Durability::Disk, Durability::Memory] {
        let name = match durability {
            Durability::Disk => "disk",
            Durability::Memory => "memory",
        };
        let mut baseline: BTreeMap<usize, f64> = BTreeMap::new();
        {
            let alone = LocalCluster::start(
                &dir.join(format!("alone-{name}")),
                &Options {
                    nodes: 1,
                    clustered: false,
                    durability,
                    cluster_toml: String::new(),
                },
            )
            .await?;
            alone.deploy(1, "counter", counter.to_vec(), 0, "").await?;
            let url = format!("{}/v1/functions/counter/increment", alone.node(1).url());
            let pids: Vec<u32> = alone.node(1).pid().into_iter().collect();
            for &clients in &args.clients {
                let (m, cpu) =
                    with_cpu(&pids, http_commits(&client, &url, clients, args.seconds)).await;
                baseline.insert(clients, m.rate);
                println!(
                    "{:>10} {:>7} {:>8} {:>12.0} {:>10.0} {:>10.0} {:>13} {:>8}",
                    name,
                    "1*",
                    clients,
                    m.rate,
                    us(m.p50),
                    us(m.p99),
                    "1.00",
                    cpu_cell(cpu)
                );
            }
        }
        let cluster = LocalCluster::start(
            &dir.join(format!("cluster-{name}")),
            &Options {
                nodes: 3,
                clustered: true,
                durability,
                cluster_toml: String::new(),
            },
        )
        .await?;
        for copies in 1..=3u8 {
            let function = format!("counter{copies}");
            let placed = cluster
                .deploy(1, &function, counter.to_vec(), copies, "")
                .await?;
            let primary = placed["primary"]
                .as_u64()
                .context("the deploy names no primary")?;
            let url = format!(
                "{}/v1/functions/{function}/increment",
                cluster.node(primary).url()
            );
            let pids: Vec<u32> = (1..=3).filter_map(|id| cluster.node(id).pid()).collect();
            for &clients in &args.clients {
                let (m, cpu) =
                    with_cpu(&pids, http_commits(&client, &url, clients, args.seconds)).await;
                let ratio = m.rate / baseline.get(&clients).copied().unwrap_or(f64::NAN);
                println!(
                    "{:>10} {:>7} {:>8} {:>12.0} {:>10.0} {:>10.0} {:>13.2} {:>8}",
                    name,
                    copies,
                    clients,
                    m.rate,
                    us(m.p50),
                    us(m.p99),
                    ratio,
                    cpu_cell(cpu)
                );
            }
        }
        if durability == Durability::Disk {
            catch_up(args, &cluster).await?;
        }
    }
    println!();
    Ok(())
}

/// A function with a large state gets one more copy: the new backup is brought up to
/// date from a snapshot streamed over QUIC (`Bulk`); the primary records the transfer.
async fn catch_up(args: &Args, cluster: &crate::local::LocalCluster) -> anyhow::Result<()> {
    let hostile = std::fs::read(&args.hostile)
        .with_context(|| format!("cannot read {}", args.hostile.display()))?;
    let placed = cluster.deploy(1, "big", hostile.clone(), 2, "").await?;
    let primary = placed["primary"].as_u64().context("no primary")?;
    let url = format!("{}/v1/functions/big/put-many", cluster.node(primary).url());
    // 10,000 keys of 1,500 bytes: 15 MB of state.
    let reply = cluster
        .client()
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"count": 10000, "value_len": 1500}"#)
        .send()
        .await?;
    if !reply.status().is_success() {
        anyhow::bail!("filling the state: {}", reply.text().await?);
    }
    cluster.deploy(1, "big", hostile, 3, "").await?;
    let started = Instant::now();
    let record = loop {
        let status = cluster.status(primary).await.unwrap_or_default();
        let done = status["catch_ups"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["function"] == "big").cloned());
        if let Some(record) = done {
            break record;
        }
        if started.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("the new backup of `big` did not catch up within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "catch-up of a new backup (disk): {:.1} MB snapshot installed in {:.0} ms = {:.0} MB/s (capture, encode, QUIC, restore, fsync)",
        record["bytes"].as_f64().unwrap_or(0.0) / 1e6,
        record["ms"].as_f64().unwrap_or(0.0),
        record["mb_per_s"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}

/// Spinning guests beside a well-behaved function: `counter.increment` (one client) and
/// `/healthz` (one poller) over HTTP, measured alone and then while `SPINNERS` guests of
/// other functions run until their deadline, side by side in one run.
async fn isolation(args: &Args, dir: &std::path::Path, counter: &[u8]) -> anyhow::Result<()> {
    const SPINNERS: usize = 8;
    println!("== isolation: counter.increment (disk durability) and /healthz over HTTP, alone and beside {SPINNERS} spinning guests ==");
    let hostile = std::fs::read(&args.hostile)
        .with_context(|| format!("cannot read {}", args.hostile.display()))?;
    let node = open_node(dir, "isolation", Durability::Disk).await?;
    node.deploy("counter", counter.to_vec(), Default::default())
        .await?;
    // Distinct functions: one function runs one transaction at a time.
    for i in 0..SPINNERS {
        node.deploy(&format!("spin-{i}"), hostile.clone(), Default::default())
            .await?;
    }
    let (addr, server) = serve_on_loopback(&node).await?;
    let client = reqwest::Client::new();
    let seconds = args.seconds;
    let measure = |client: reqwest::Client| async move {
        let url = format!("http://{addr}/v1/functions/counter/increment");
        let health = format!("http://{addr}/healthz");
        let c = client.clone();
        let polls = tokio::spawn(async move {
            drive(1, seconds, move || {
                let (c, health) = (c.clone(), health.clone());
                async move {
                    let r = c.get(&health).send().await?;
                    anyhow::ensure!(r.status().is_success(), "healthz: {}", r.status());
                    r.bytes().await?;
                    // A poller, not a load: a few hundred probes a second.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok(())
                }
            })
            .await
        });
        let (_, _, increments) =
            drive(1, seconds, move || post_null(client.clone(), url.clone())).await;
        // The poller's latencies include its 2 ms pause: take it off.
        let (_, _, probes) = polls.await.unwrap_or_default();
        let probes: Vec<Duration> = probes
            .into_iter()
            .map(|d| d.saturating_sub(Duration::from_millis(2)))
            .collect();
        (increments, probes)
    };
    let (alone, alone_health) = measure(client.clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut spinners = Vec::new();
    for i in 0..SPINNERS {
        let (n, stop) = (node.clone(), stop.clone());
        spinners.push(tokio::spawn(async move {
            let mut runs = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = n.invoke(&format!("spin-{i}"), "loop", b"null", None).await;
                runs += 1;
            }
            runs
        }));
    }
    // Let every spinner start.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (beside, beside_health) = measure(client).await;
    stop.store(true, Ordering::Relaxed);
    let mut spins = 0;
    for s in spinners {
        spins += s.await.unwrap_or(0);
    }
    server.abort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:<44} {:>8} {:>9} {:>9} {:>9}",
        "", "count", "p50 ms", "p99 ms", "max ms"
    );
    let row = |what: &str, lat: &[Duration]| {
        println!(
            "{:<44} {:>8} {:>9.2} {:>9.2} {:>9.2}",
            what,
            lat.len(),
            ms(percentile(lat, 0.5)),
            ms(percentile(lat, 0.99)),
            ms(lat.last().copied().unwrap_or_default())
        );
    };
    row("counter.increment, alone", &alone);
    row(
        &format!("counter.increment, beside {SPINNERS} spinners"),
        &beside,
    );
    row("/healthz, alone", &alone_health);
    row(
        &format!("/healthz, beside {SPINNERS} spinners"),
        &beside_health,
    );
    let ratio = |a: &[Duration], b: &[Duration]| {
        let base = percentile(a, 0.99).as_secs_f64();
        if base > 0.0 {
            percentile(b, 0.99).as_secs_f64() / base
        } else {
            f64::NAN
        }
    };
    println!(
        "p99 beside / alone: counter.increment {:.1}x, /healthz {:.1}x ({spins} spinning runs to their deadline)",
        ratio(&alone, &beside),
        ratio(&alone_health, &beside_health)
    );
    println!();
    Ok(())
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn memory(args: &Args, dir: &std::path::Path, counter: &[u8]) -> anyhow::Result<()> {
    const FUNCTIONS: usize = 100;
    println!("== memory ==");
    let node = open_node(dir, "memory", Durability::Memory).await?;
    // Distinct components (one byte of custom section differs), so each is compiled.
    let before = rss_bytes();
    for i in 0..FUNCTIONS {
        let mut bytes = counter.to_vec();
        bytes.extend_from_slice(&custom_section(i));
        node.deploy(&format!("counter-{i}"), bytes, Default::default())
            .await?;
        node.invoke(&format!("counter-{i}"), "increment", b"null", None)
            .await?;
    }
    let per_function = (rss_bytes().saturating_sub(before)) as f64 / FUNCTIONS as f64;
    println!(
        "per deployed function (distinct component, invoked once): {:.0} KiB",
        per_function / 1024.0
    );

    remembered_answers(dir, counter).await?;

    let Ok(hostile) = std::fs::read(&args.hostile) else {
        println!(
            "per in-flight instance: skipped ({} not found)",
            args.hostile.display()
        );
        return Ok(());
    };
    // Instances that stay alive until their deadline: spinning guests on distinct
    // functions (one transaction at a time runs per function).
    const INSTANCES: usize = 100;
    for i in 0..INSTANCES {
        node.deploy(&format!("spin-{i}"), hostile.clone(), Default::default())
            .await?;
    }
    let before = rss_bytes();
    let mut tasks = Vec::new();
    for i in 0..INSTANCES {
        let n = node.clone();
        tasks.push(tokio::spawn(async move {
            n.invoke(&format!("spin-{i}"), "loop", b"null", None).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss_bytes();
    for t in tasks {
        let _ = t.await;
    }
    println!(
        "per in-flight instance (spinning guest): {:.0} KiB",
        (during.saturating_sub(before)) as f64 / INSTANCES as f64 / 1024.0
    );
    println!();
    Ok(())
}

/// Distinct idempotency keys on one function, with the answers capped
/// (`idempotency_keys_max`) and with a cap above the load: the answers remembered and
/// the memory they took. Both nodes stay open, so that neither reuses what the other
/// freed.
async fn remembered_answers(dir: &std::path::Path, counter: &[u8]) -> anyhow::Result<()> {
    const KEYS: usize = 200_000;
    const CAP: usize = 10_000;
    let mut nodes = Vec::new();
    for (name, cap) in [("answers-capped", CAP), ("answers-uncapped", KEYS * 10)] {
        let path = dir.join(name);
        let _ = std::fs::remove_dir_all(&path);
        let config = Config {
            data_dir: path,
            durability: Durability::Memory,
            idempotency_keys_max: cap,
            ..Config::default()
        };
        let node = tokio::task::spawn_blocking(move || Node::open(config)).await??;
        node.deploy("counter", counter.to_vec(), Default::default())
            .await?;
        let before = rss_bytes();
        let started = Instant::now();
        for i in 0..KEYS {
            let key = format!("client-request-{i:012}");
            node.invoke("counter", "increment", b"null", Some(&key))
                .await?;
        }
        let elapsed = started.elapsed();
        let info = node.describe("counter")?;
        println!(
            "{KEYS} distinct idempotency keys, idempotency_keys_max {cap:>9}: {:>7} answers kept, {:>7} forgotten, memory +{:.1} MiB ({:.0} commits/s)",
            info.idempotency_keys,
            info.idempotency_keys_forgotten,
            rss_bytes().saturating_sub(before) as f64 / (1 << 20) as f64,
            KEYS as f64 / elapsed.as_secs_f64()
        );
        nodes.push(node);
    }
    Ok(())
}

/// A custom section named `bench` holding `i`: changes the digest, not the behaviour.
fn custom_section(i: usize) -> Vec<u8> {
    let name = b"bench";
    let payload = (i as u64).to_le_bytes();
    let mut section = vec![0u8]; // custom section id
    let len = 1 + name.len() + payload.len();
    section.push(len as u8);
    section.push(name.len() as u8);
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    section
}
