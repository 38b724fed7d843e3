//! `understudy bench --what languages`: the bank in Rust, Python and JavaScript in one
//! run, each under the node's instance settings and under the previous ones
//! (`KEEP_RESIDENT_BEFORE_BYTES`), so that the gain is measured, not remembered.
//!
//! - Per call, bare wasmtime: a fresh instance per `balance`, its cost split into
//!   instantiate, run and reset (dropping the store puts the pool slot back), under
//!   several allocator settings, with the memory each leaves resident between calls.
//! - A node with `disk` durability, one client over HTTP: reads (`balance`) and commits
//!   (`deposit`) per second, the commit's own cost (a deposit's p50 less a read's), and
//!   the first call after deploy and after a restart.
//!
//! Every setting gives each transaction a fresh instance: nothing in linear memory
//! outlives a call.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Store};

use understudy::node::Node;
use understudy::wal::Durability;
use understudy::wasm::bindings;
use understudy::wasm::Options;

use crate::bench::{drive, percentile, us, Args, Bare};

/// The bank's components, by language.
const BANKS: [(&str, &str); 3] = [
    ("Rust", "bank"),
    ("Python", "bank-py"),
    ("JavaScript", "bank-js"),
];

/// What a pool slot kept resident before issue 17: the "before" of every comparison
/// here. The other setting changed since, the bound on unused warm slots (100 then, 16
/// now), does not come into play with one function called by one client.
const KEEP_RESIDENT_BEFORE_BYTES: usize = 256 << 10;

/// Fails when a component cannot be compiled or run, or a node cannot start.
pub async fn languages(args: &Args, dir: &Path) -> anyhow::Result<()> {
    println!("== languages: the bank in Rust, Python and JavaScript ==");
    let mut found = Vec::new();
    for (language, name) in BANKS {
        let path = args.components.join(format!("{name}.wasm"));
        match std::fs::read(&path) {
            Ok(bytes) => found.push((language, name, bytes)),
            Err(e) => println!("{language}: skipped ({}: {e})", path.display()),
        }
    }
    bare_table(args, &found).await?;
    http_table(args, dir, &found).await?;
    println!();
    Ok(())
}

/// Options as before issue 17: a small resident part.
fn options_before() -> Options {
    Options {
        memory_keep_resident_bytes: KEEP_RESIDENT_BEFORE_BYTES,
        ..Options::default()
    }
}

async fn bare_table(args: &Args, found: &[(&str, &str, Vec<u8>)]) -> anyhow::Result<()> {
    println!(
        "per call, bare wasmtime: `balance` in a fresh instance each call (p50 us), and the \
         memory left resident between calls"
    );
    println!(
        "{:<11} {:<34} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9}",
        "language", "instances", "inst", "run", "reset", "total", "calls/s", "resident"
    );
    let variants = engine_variants();
    for (language, _, bytes) in found {
        // Compile once (seconds for an interpreter) and load the result into each
        // engine: the allocator settings do not change the compiled code.
        let engine = wt(Engine::new(&variants[0].1))?;
        let compiled = wt(wt(Component::new(&engine, bytes))?.serialize())?;
        for (label, config) in &variants {
            let m = bare_calls(config, bytes, &compiled, args.seconds).await?;
            println!(
                "{:<11} {:<34} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>9.0} {:>7.1}MB",
                language,
                label,
                us(m.instantiate),
                us(m.run),
                us(m.reset),
                us(m.total),
                m.rate,
                m.resident_bytes as f64 / 1e6
            );
        }
    }
    Ok(())
}

/// The node's engine, the one before issue 17, and others that show what each
/// setting is worth.
fn engine_variants() -> Vec<(&'static str, Config)> {
    let node = Options::default();
    let config = understudy::wasm::engine_config;
    let mut scan = config(&node);
    let mut pool = understudy::wasm::pool_config(&node);
    pool.pagemap_scan(wasmtime::Enabled::Yes);
    scan.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let mut no_cow = config(&node);
    no_cow.memory_init_cow(false);
    let mut on_demand = config(&node);
    on_demand.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    vec![
        ("node: pool, 32 MiB resident", config(&node)),
        ("before: pool, 256 KiB resident", config(&options_before())),
        ("pool, 32 MiB resident, PAGEMAP_SCAN", scan),
        ("pool, 32 MiB resident, no cow", no_cow),
        ("on-demand (no pool)", on_demand),
    ]
}

struct BareCalls {
    instantiate: Duration,
    run: Duration,
    /// Dropping the store: the pool slot's memory put back to the initial image.
    reset: Duration,
    total: Duration,
    rate: f64,
    /// Linear memory the pool keeps resident in slots not in use, after the loop.
    resident_bytes: usize,
}

/// Instantiates the component and calls `balance` in a fresh store, for `seconds`.
/// `compiled` is `bytes` serialized by a compatible engine, or compiled again if not.
async fn bare_calls(
    config: &Config,
    bytes: &[u8],
    compiled: &[u8],
    seconds: f64,
) -> anyhow::Result<BareCalls> {
    let engine = wt(Engine::new(config))?;
    // SAFETY: `compiled` was produced by `Component::serialize` in this process a
    // moment ago and has not left memory; `deserialize` checks that the engine's
    // settings are compatible and fails otherwise (then the component is compiled).
    #[allow(unsafe_code)]
    let component = match unsafe { Component::deserialize(&engine, compiled) } {
        Ok(component) => component,
        Err(_) => wt(Component::new(&engine, bytes))?,
    };
    let mut linker = Linker::<Bare>::new(&engine);
    wt(bindings::Function::add_to_linker::<Bare, HasSelf<Bare>>(
        &mut linker,
        |b| b,
    ))?;
    wt(wasmtime_wasi::p2::add_to_linker_async(&mut linker))?;
    let pre = wt(bindings::FunctionPre::new(wt(
        linker.instantiate_pre(&component)
    )?))?;
    let mut state = BTreeMap::new();
    state.insert(b"acct/alice".to_vec(), b"100".to_vec());
    let mut samples: [Vec<Duration>; 4] = Default::default();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds || samples[3].len() < 3 {
        let t0 = Instant::now();
        let bare = Bare::new(std::mem::take(&mut state));
        let mut store = Store::new(&engine, bare);
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = wt(pre.instantiate_async(&mut store).await)?;
        let t1 = Instant::now();
        let out = wt(instance
            .understudy_function_handler()
            .call_handle(&mut store, "balance", br#"{"account":"alice"}"#)
            .await)?;
        anyhow::ensure!(out.is_ok(), "balance failed: {out:?}");
        let t2 = Instant::now();
        state = std::mem::take(&mut store.data_mut().state);
        drop(store);
        let t3 = Instant::now();
        for (v, d) in samples.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t3 - t0]) {
            v.push(d);
        }
    }
    let rate = samples[3].len() as f64 / started.elapsed().as_secs_f64();
    for v in &mut samples {
        v.sort();
    }
    let p50 = |i: usize| percentile(&samples[i], 0.5);
    Ok(BareCalls {
        instantiate: p50(0),
        run: p50(1),
        reset: p50(2),
        total: p50(3),
        rate,
        resident_bytes: engine
            .pooling_allocator_metrics()
            .map_or(0, |m| m.unused_memory_bytes_resident()),
    })
}

async fn http_table(
    args: &Args,
    dir: &Path,
    found: &[(&str, &str, Vec<u8>)],
) -> anyhow::Result<()> {
    println!(
        "a node, `disk` durability, one client over HTTP: `balance` reads, `deposit` commits \
         (commit us = deposit p50 - read p50); first call after deploy and after a restart"
    );
    println!(
        "{:<11} {:<7} {:>8} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "language",
        "node",
        "reads/s",
        "read p50",
        "commits/s",
        "commit p50",
        "commit us",
        "1st dep.",
        "1st rest.",
        "reads x"
    );
    for (language, name, bytes) in found {
        let mut reads_before = None;
        for (label, options) in [("before", options_before()), ("now", Options::default())] {
            let m = over_http(args, dir, name, bytes, options).await?;
            let ratio = match reads_before {
                None => String::new(),
                Some(before) => format!("{:.2}", m.reads_per_s / before),
            };
            reads_before.get_or_insert(m.reads_per_s);
            println!(
                "{:<11} {:<7} {:>8.0} {:>7.0}us {:>10.0} {:>8.0}us {:>9.0} {:>7.1}ms {:>7.1}ms {:>8}",
                language,
                label,
                m.reads_per_s,
                us(m.read_p50),
                m.commits_per_s,
                us(m.commit_p50),
                us(m.commit_p50.saturating_sub(m.read_p50)),
                m.first_after_deploy.as_secs_f64() * 1e3,
                m.first_after_restart.as_secs_f64() * 1e3,
                ratio
            );
        }
    }
    Ok(())
}

/// wasmtime's own error as anyhow's (wasmtime's `anyhow` feature is off).
fn wt<T>(result: wasmtime::Result<T>) -> anyhow::Result<T> {
    result.map_err(|e| anyhow::anyhow!("{e:?}"))
}

struct OverHttp {
    reads_per_s: f64,
    read_p50: Duration,
    commits_per_s: f64,
    commit_p50: Duration,
    /// The first call (`open`, a commit) of a component compiled but never instantiated.
    first_after_deploy: Duration,
    /// The first call (`balance`, a read) after the node is opened again on its data.
    first_after_restart: Duration,
}

async fn open(dir: &Path, options: Options) -> anyhow::Result<Node> {
    let config = understudy::config::Config {
        data_dir: dir.to_owned(),
        durability: Durability::Disk,
        wasm: options,
        ..understudy::config::Config::default()
    };
    Ok(tokio::task::spawn_blocking(move || Node::open(config)).await??)
}

async fn over_http(
    args: &Args,
    dir: &Path,
    name: &str,
    bytes: &[u8],
    options: Options,
) -> anyhow::Result<OverHttp> {
    let dir = dir.join(format!("languages-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    let node = open(&dir, options).await?;
    node.deploy("bank", bytes.to_vec(), Default::default())
        .await?;
    let t = Instant::now();
    let opened = node
        .invoke(
            "bank",
            "open",
            br#"{"account":"alice","initial":100}"#,
            None,
        )
        .await?;
    let first_after_deploy = t.elapsed();
    opened
        .outcome
        .map_err(|e| anyhow::anyhow!("open failed: {}", e.message))?;

    let (addr, server) = crate::bench::serve_on_loopback(&node).await?;
    let client = reqwest::Client::new();
    let post = move |method: &'static str, body: &'static str| {
        let (client, url) = (
            client.clone(),
            format!("http://{addr}/v1/functions/bank/{method}"),
        );
        move || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "status {}", r.status());
                r.bytes().await?;
                Ok(())
            }
        }
    };
    let (reads, elapsed, read_lat) =
        drive(1, args.seconds, post("balance", r#"{"account":"alice"}"#)).await;
    let reads_per_s = reads as f64 / elapsed.as_secs_f64();
    let (commits, elapsed, commit_lat) = drive(
        1,
        args.seconds,
        post("deposit", r#"{"account":"alice","amount":1}"#),
    )
    .await;
    server.abort();
    let _ = server.await;
    drop(node);

    // A restart: the component comes from the compiled cache, into a fresh engine.
    let node = open(&dir, options).await?;
    let t = Instant::now();
    let balance = node
        .invoke("bank", "balance", br#"{"account":"alice"}"#, None)
        .await?;
    let first_after_restart = t.elapsed();
    balance
        .outcome
        .map_err(|e| anyhow::anyhow!("balance after restart failed: {}", e.message))?;
    Ok(OverHttp {
        reads_per_s,
        read_p50: percentile(&read_lat, 0.5),
        commits_per_s: commits as f64 / elapsed.as_secs_f64(),
        commit_p50: percentile(&commit_lat, 0.5),
        first_after_deploy,
        first_after_restart,
    })
}
