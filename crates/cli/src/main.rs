//! The `understudy` command: run a node, talk to one, and the tools that run a local
//! cluster of node processes (`bench`, `drill`, `demo`). The runtime itself is the
//! `understudy` library; this crate holds only what a command line needs.

mod bench;
mod bench_languages;
mod cluster_flags;
mod cluster_init;
mod demo;
mod dev_cluster;
mod drill;
mod local;
mod otel;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

use understudy::config::Config;
use understudy::wal::Durability;

#[derive(Parser)]
#[command(
    name = "understudy",
    version,
    about = "A WebAssembly function runtime where every invocation is a transaction"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Remote {
    /// The node's HTTP address.
    #[arg(
        long,
        env = "UNDERSTUDY_NODE",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    node: String,
    /// Admin token, for deploy, delete, stop and start on a node that requires one.
    #[arg(
        long,
        env = "UNDERSTUDY_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    token: Option<String>,
    /// Invoke token, for invocations on a node that requires one (the admin token is
    /// sent when there is none).
    #[arg(
        long,
        env = "UNDERSTUDY_INVOKE_TOKEN",
        global = true,
        hide_env_values = true
    )]
    invoke_token: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Node {
        /// TOML config file; flags override it.
        #[arg(long, env = "UNDERSTUDY_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "UNDERSTUDY_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Address of the HTTP API (default 127.0.0.1:7070).
        #[arg(long, env = "UNDERSTUDY_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// disk (fsynced on every copy before an answer) or memory.
        #[arg(long)]
        durability: Option<Durability>,
        /// Required for deploy/delete/stop/start; mandatory when not on loopback.
        #[arg(long, env = "UNDERSTUDY_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Read the admin token from this file (it then stays out of the process list).
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// Required as `Authorization: Bearer <token>` for invocations.
        #[arg(long, env = "UNDERSTUDY_INVOKE_TOKEN", hide_env_values = true)]
        invoke_token: Option<String>,
        /// Read the invoke token from this file.
        #[arg(long)]
        invoke_token_file: Option<PathBuf>,
        /// Start on a log that ends before the position it had made durable (a segment
        /// cut short), accepting that the commits it no longer holds are lost. For this
        /// start only.
        #[arg(long)]
        recover_truncated_log: bool,
        /// Per-transaction deadline in milliseconds (default 1000).
        #[arg(long)]
        deadline_ms: Option<u64>,
        /// Memory cap per instance in MiB (default 64).
        #[arg(long)]
        memory_max_mib: Option<usize>,
        /// Join a running cluster through a member: `ID@HOST:PORT` (its id and peer
        /// address). Overrides `join` in the config's `[cluster]` section.
        #[arg(long, env = "UNDERSTUDY_JOIN")]
        join: Option<String>,
        #[command(flatten)]
        cluster: Box<cluster_flags::ClusterFlags>,
        /// A virtual address the master holds and a new master takes over (with
        /// gratuitous ARP), `ADDR/PREFIX`. Needs --vip-dev, root (or CAP_NET_ADMIN and
        /// CAP_NET_RAW) and a `[cluster]` section.
        #[arg(long, requires = "vip_dev")]
        vip: Option<String>,
        /// The interface for --vip.
        #[arg(long, requires = "vip")]
        vip_dev: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Deploy (or upgrade) a function from a component file.
    Deploy {
        name: String,
        file: PathBuf,
        /// In a cluster: copies of the function, the primary included (default 2).
        #[arg(long)]
        replicas: Option<u8>,
        /// The functions it may call, comma-separated, or '*' for any (default: none).
        #[arg(long)]
        calls: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Invoke a function's method with a JSON input and print its JSON output.
    Invoke {
        name: String,
        method: String,
        /// JSON input (default: null).
        json: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List deployed functions.
    Functions {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// The cluster as the node sees it: nodes, the master, Raft's view.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stop a function: it keeps its state and answers 503 until started.
    Stop {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Start a stopped function.
    Start {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a function and all its state.
    Delete {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Measure invocation and commit throughput in-process and print a table.
    Bench(crate::bench::Args),
    /// Prove failover: a local 3-node cluster under load, nodes killed or paused run
    /// after run; prints the failover timeline and checks that nothing acknowledged
    /// was lost.
    Drill(crate::drill::Args),
    /// The main demo: a local 3-node cluster, the bank example under load, its primary
    /// killed with SIGKILL, the failover timeline, the checks, the node back as a backup.
    Demo(crate::demo::Args),
    /// Set up and run clusters: certificates and configs (`init`), a development
    /// cluster on loopback (`local`), draining and removing nodes.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Create the cluster CA and a certificate for each node; with --nodes, also an
    /// admin token and each node's config file.
    #[command(group = clap::ArgGroup::new("members").required(true).args(["nodes", "node"]))]
    Init {
        /// The founding members, `ID@IP:PORT` (QUIC address) with `/HTTP_PORT` or
        /// `/IP:HTTP_PORT` where the HTTP API is not on --http-port, comma-separated:
        /// writes `certs/`, `admin-token` and `node-<id>.toml` into --out.
        #[arg(long, requires = "out", conflicts_with = "dir")]
        nodes: Option<String>,
        /// Where --nodes writes everything.
        #[arg(long, requires = "nodes")]
        out: Option<PathBuf>,
        /// The members' HTTP port where --nodes does not give one.
        #[arg(long, default_value_t = 7201, requires = "nodes")]
        http_port: u16,
        /// Where the files will be on every machine (absolute; default: --out), as the
        /// configs name them.
        #[arg(long, requires = "nodes")]
        install_dir: Option<PathBuf>,
        /// Each node's data directory on its machine (absolute; default:
        /// `<install dir>/data-<id>`).
        #[arg(long, requires = "nodes")]
        data_dir: Option<PathBuf>,
        /// Listen on every interface (0.0.0.0, the members' ports) rather than on each
        /// member's own address.
        #[arg(long, requires = "nodes")]
        listen_any: bool,
        /// Certificates only: where to write `ca.pem`, `ca-key.pem` and `node-<id>.pem`
        /// / `node-<id>-key.pem`.
        #[arg(long, default_value = "cluster-certs")]
        dir: PathBuf,
        /// Certificates only: a node as `ID=HOST[,HOST...]` (the addresses peers reach
        /// it at); repeat per node.
        #[arg(long = "node", value_parser = parse_node_spec)]
        node: Vec<understudy_net::NodeSpec>,
        /// Replace an existing CA (every node then needs its new certificate).
        #[arg(long)]
        force: bool,
    },
    /// A development cluster on loopback: starts the nodes, prints where everything
    /// is, and stops them on Ctrl-C or SIGTERM.
    Local(crate::dev_cluster::Args),
    /// Sign a certificate for a node joining later, with the existing CA.
    AddNode {
        #[arg(long, default_value = "cluster-certs")]
        dir: PathBuf,
        #[arg(long = "node", value_parser = parse_node_spec)]
        node: understudy_net::NodeSpec,
    },
    /// Drain a node: no new copies go there, and its copies move away (its primaries
    /// handed over first).
    Drain {
        id: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a drained node from the cluster and its Raft group (ask the master).
    Remove {
        id: u64,
        #[command(flatten)]
        remote: Remote,
    },
}

fn parse_node_spec(text: &str) -> Result<understudy_net::NodeSpec, String> {
    let (id, hosts) = text
        .split_once('=')
        .ok_or_else(|| format!("expected ID=HOST[,HOST...], got {text:?}"))?;
    let id = id
        .trim()
        .parse::<u64>()
        .map_err(|e| format!("node id {id:?}: {e}"))?;
    let hosts: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(String::from)
        .collect();
    if hosts.is_empty() {
        return Err(format!("node {id} needs at least one host"));
    }
    Ok(understudy_net::NodeSpec { id, hosts })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node {
            config,
            data_dir,
            listen,
            durability,
            admin_token,
            admin_token_file,
            invoke_token,
            invoke_token_file,
            recover_truncated_log,
            deadline_ms,
            memory_max_mib,
            join,
            cluster,
            vip,
            vip_dev,
            log_format,
        } => {
            let mut cfg = match config {
                Some(path) => Config::from_file(&path)?,
                None => Config::default(),
            };
            if let Some(v) = data_dir {
                cfg.data_dir = v;
            }
            if let Some(v) = listen {
                cfg.listen = v;
            }
            if let Some(v) = durability {
                cfg.durability = v;
            }
            override_token(
                (&mut cfg.admin_token, &mut cfg.admin_token_file),
                admin_token,
                admin_token_file,
            );
            override_token(
                (&mut cfg.invoke_token, &mut cfg.invoke_token_file),
                invoke_token,
                invoke_token_file,
            );
            if let Some(v) = deadline_ms {
                cfg.wasm.deadline_ms = v;
            }
            if let Some(v) = memory_max_mib {
                cfg.wasm.memory_max_bytes = v << 20;
            }
            cluster_flags::apply(&mut cfg, *cluster, join.is_some())?;
            if let Some(target) = join {
                match cfg.cluster.as_mut() {
                    Some(cluster) => cluster.join = Some(target),
                    None => bail!("--join needs a [cluster] section in the config, or --id and --certs (node id, peer address, certificates)"),
                }
            }
            if vip.is_some() {
                match cfg.cluster.as_mut() {
                    Some(cluster) => {
                        cluster.vip = vip;
                        cluster.vip_dev = vip_dev;
                    }
                    None => bail!("--vip needs a [cluster] section in the config: only a cluster's master holds a virtual address"),
                }
            }
            cfg.read_token_files()?;
            cfg.validate()?;
            let instance = match &cfg.cluster {
                Some(cluster) => format!("node-{}", cluster.node_id),
                None => cfg.listen.to_string(),
            };
            let exporter =
                init_tracing(log_format, cfg.traces.otlp_endpoint.as_deref(), &instance)?;
            let ran = run_node(cfg, recover_truncated_log);
            if let Some(exporter) = exporter {
                exporter.shutdown();
            }
            ran
        }
        Command::Deploy {
            name,
            file,
            replicas,
            calls,
            remote,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let url = format!("{}/v1/functions/{name}", remote.node);
            let mut query: Vec<(&str, String)> = Vec::new();
            if let Some(replicas) = replicas {
                query.push(("replicas", replicas.to_string()));
            }
            if let Some(calls) = calls {
                query.push(("calls", calls));
            }
            let request = client()?
                .put(url)
                .query(&query)
                .header("content-type", "application/wasm")
                .body(bytes);
            let body = send(remote.authorized(request))?;
            println!(
                "deployed {name} version {} ({})",
                body["version"].as_u64().unwrap_or(0),
                body["digest"].as_str().unwrap_or("?")
            );
            if let Some(primary) = body["primary"].as_u64() {
                println!(
                    "epoch {}, primary node {primary}, backups {}{}",
                    body["epoch"],
                    body["backups"],
                    if body["ready"] == false {
                        format!(" (not installed yet on {})", body["not_ready"])
                    } else {
                        String::new()
                    }
                );
            }
            Ok(())
        }
        Command::Invoke {
            name,
            method,
            json,
            idempotency_key,
            remote,
        } => {
            let url = format!("{}/v1/functions/{name}/invoke/{method}", remote.node);
            let mut request = client()?
                .post(url)
                .header("content-type", "application/json")
                .body(json.unwrap_or_default());
            if let Some(key) = idempotency_key {
                request = request.header("idempotency-key", key);
            }
            let body = send(remote.invoke_authorized(request))?;
            println!("{body}");
            Ok(())
        }
        Command::Functions { json, remote } => {
            let body = send(client()?.get(format!("{}/v1/functions", remote.node)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            println!(
                "{:<24} {:>7} {:<8} {:>8}  {:<19}  CALLS",
                "NAME", "VERSION", "STATE", "KEYS", "DIGEST"
            );
            for f in body["functions"].as_array().into_iter().flatten() {
                let calls: Vec<&str> = f["calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.as_str())
                    .collect();
                println!(
                    "{:<24} {:>7} {:<8} {:>8}  {:<19}  {}",
                    f["name"].as_str().unwrap_or("?"),
                    f["version"].to_string(),
                    if f["running"].as_bool() == Some(true) {
                        "running"
                    } else {
                        "stopped"
                    },
                    f["keys"].to_string(),
                    f["digest"]
                        .as_str()
                        .unwrap_or("?")
                        .chars()
                        .take(19)
                        .collect::<String>(),
                    if calls.is_empty() {
                        "-".to_owned()
                    } else {
                        calls.join(",")
                    },
                );
            }
            Ok(())
        }
        Command::Status { json, remote } => {
            let body = send(client()?.get(format!("{}/v1/cluster", remote.node)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            let raft = &body["raft"];
            println!(
                "node {} ({}), raft {} in term {}, master: {}",
                body["node"],
                body["role"].as_str().unwrap_or("?"),
                raft["state"].as_str().unwrap_or("?"),
                raft["term"],
                raft["leader"]
                    .as_u64()
                    .map_or("none".to_owned(), |l| format!("node {l}")),
            );
            println!(
                "{:<6} {:<8} {:<7} {:<8} {:<8} {:<22} HTTP",
                "NODE", "ROLE", "MASTER", "STATUS", "HEALTH", "PEER"
            );
            for n in body["nodes"].as_array().into_iter().flatten() {
                println!(
                    "{:<6} {:<8} {:<7} {:<8} {:<8} {:<22} {}",
                    n["id"].to_string(),
                    n["role"].as_str().unwrap_or("?"),
                    if n["master"] == true { "yes" } else { "" },
                    n["status"].as_str().unwrap_or("?"),
                    n["health"].as_str().unwrap_or("?"),
                    n["peer_addr"].as_str().unwrap_or("?"),
                    n["http_addr"].as_str().unwrap_or(""),
                );
            }
            let functions = body["functions"].as_array().cloned().unwrap_or_default();
            if !functions.is_empty() {
                println!();
                println!(
                    "{:<20} {:<8} {:<6} {:<8} {:<10} {:<12} HERE",
                    "FUNCTION", "VERSION", "EPOCH", "PRIMARY", "BACKUPS", "RUNNING"
                );
                for f in &functions {
                    let list = |v: &serde_json::Value| {
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let here = &f["here"];
                    let here = match here["role"].as_str() {
                        Some("primary") => format!(
                            "primary at #{} (released #{}), lag {}",
                            here["seq"], here["seq_released"], here["lag"]
                        ),
                        Some(role) => format!("{role} at #{}", here["seq"]),
                        None => String::new(),
                    };
                    println!(
                        "{:<20} {:<8} {:<6} {:<8} {:<10} {:<12} {}",
                        f["name"].as_str().unwrap_or("?"),
                        f["version"].to_string(),
                        f["epoch"].to_string(),
                        f["primary"].to_string(),
                        list(&f["backups"]),
                        if f["running"] == true { "yes" } else { "no" },
                        here,
                    );
                }
            }
            Ok(())
        }
        Command::Stop { name, remote } => admin_post(&remote, &name, "stop"),
        Command::Start { name, remote } => admin_post(&remote, &name, "start"),
        Command::Delete { name, remote } => {
            send(
                remote.authorized(client()?.delete(format!("{}/v1/functions/{name}", remote.node))),
            )?;
            println!("deleted {name}");
            Ok(())
        }
        Command::Cluster {
            command:
                ClusterCommand::Init {
                    nodes: Some(list),
                    out: Some(out),
                    http_port,
                    install_dir,
                    data_dir,
                    listen_any,
                    force,
                    ..
                },
        } => {
            let plan = cluster_init::Plan {
                out,
                install_dir,
                data_dir,
                listen_any,
                members: cluster_flags::parse_peers(&list, http_port).map_err(|e| {
                    anyhow::anyhow!("{}", e.to_string().replace("--peers", "--nodes"))
                })?,
                force,
            };
            let written = cluster_init::write(&plan)?;
            print!("{}", cluster_init::instructions(&plan, &written));
            Ok(())
        }
        Command::Cluster {
            command: ClusterCommand::Local(args),
        } => crate::dev_cluster::run(args),
        Command::Cluster {
            command:
                ClusterCommand::Init {
                    dir,
                    node: nodes,
                    force,
                    ..
                },
        } => {
            if force {
                understudy_net::certs::init_replacing(&dir, &nodes)?;
            } else {
                understudy_net::certs::init(&dir, &nodes)?;
            }
            let ids: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
            println!(
                "wrote the cluster CA and certificates for nodes {} to {}",
                ids.join(", "),
                dir.display()
            );
            println!("keep ca-key.pem safe: it signs new nodes (understudy cluster add-node)");
            Ok(())
        }
        Command::Cluster {
            command: ClusterCommand::AddNode { dir, node },
        } => {
            understudy_net::certs::add_node(&dir, &node)?;
            println!(
                "wrote the certificate for node {} to {}",
                node.id,
                dir.display()
            );
            Ok(())
        }
        Command::Cluster {
            command: ClusterCommand::Drain { id, remote },
        } => {
            send(remote.authorized(
                client()?.post(format!("{}/v1/cluster/nodes/{id}/drain", remote.node)),
            ))?;
            println!("node {id} is draining: its copies move to other nodes");
            Ok(())
        }
        Command::Cluster {
            command: ClusterCommand::Remove { id, remote },
        } => {
            send(remote.authorized(
                client()?.post(format!("{}/v1/cluster/nodes/{id}/remove", remote.node)),
            ))?;
            println!("node {id} removed");
            Ok(())
        }
        Command::Bench(args) => {
            init_tracing_quiet();
            crate::bench::run(args)
        }
        Command::Drill(args) => {
            init_tracing_quiet();
            crate::drill::run(args)
        }
        Command::Demo(args) => {
            init_tracing_quiet();
            crate::demo::run(args)
        }
    }
}

/// Flags override the config file's token settings: a token given on the command line
/// replaces a token file named in the config, and the other way round.
fn override_token(
    (token, file): (&mut Option<String>, &mut Option<PathBuf>),
    flag: Option<String>,
    flag_file: Option<PathBuf>,
) {
    let from_flag = flag.is_some();
    if from_flag {
        *token = flag;
        *file = None;
    }
    if flag_file.is_some() {
        if !from_flag {
            *token = None;
        }
        *file = flag_file;
    }
}

fn run_node(cfg: Config, recover_truncated_log: bool) -> anyhow::Result<()> {
    understudy::files::secure_data_dir(&cfg.data_dir).with_context(|| {
        format!(
            "cannot make the data directory {} private",
            cfg.data_dir.display()
        )
    })?;
    if recover_truncated_log {
        // The node's log lives in `wal` under the data directory (see `Node::open`).
        let wal_dir = cfg.data_dir.join("wal");
        let forgotten = understudy::wal::mark::forget(&wal_dir)
            .with_context(|| format!("cannot reset the durable mark in {}", wal_dir.display()))?;
        match forgotten {
            Some(mark) => tracing::warn!(
                "--recover-truncated-log: the log was durable up to LSN {} (offset {} of {}); whatever it no longer holds of that is accepted as lost",
                mark.lsn,
                mark.offset,
                understudy::wal::segment::file_name(mark.segment_first)
            ),
            None => tracing::warn!("--recover-truncated-log: the log has no durable mark; nothing to accept"),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listen = cfg.listen;
        let node = tokio::task::spawn_blocking(move || understudy::node::Node::open(cfg)).await??;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let http_addr = listener.local_addr()?;
        if let Some(cluster_config) = node.config().cluster.clone() {
            understudy::cluster::Cluster::start(&cluster_config, &node, http_addr).await?;
        }
        tracing::info!(address = %http_addr, "understudy node listening");
        let fatal = node.clone();
        tokio::select! {
            served = understudy::http::serve(node, listener, shutdown_signal()) => served?,
            why = fatal.fatal() => bail!("fatal: {why}"),
        }
        if let Some(cluster) = fatal.cluster() {
            cluster.shutdown().await;
        }
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The node's logs (stderr, `text` or `json`), with each invocation's spans (and its
/// trace id) always on, and the exporter of its traces when one is configured.
///
/// Fails when the trace exporter cannot be built from its endpoint.
fn init_tracing(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    instance: &str,
) -> anyhow::Result<Option<otel::Exporter>> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // openraft reports every failed heartbeat to a down node as an error, 50 times a
        // second; the failure detector reports the node once.
        tracing_subscriber::EnvFilter::new(
            "info,wasmtime=warn,cranelift=warn,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=error",
        )
    });
    // An invocation's spans put its trace id in every line about it, and carry its
    // trace context to other nodes: on whatever else RUST_LOG says.
    let filter = filter.add_directive(
        format!("{}=info", understudy::trace::TARGET)
            .parse()
            .expect("a valid directive"),
    );
    // Colours only for a terminal: a log file or journald gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    match otel::layer(otlp_endpoint, instance)? {
        Some((layer, exporter)) => {
            registry.with(layer).init();
            Ok(Some(exporter))
        }
        None => {
            registry.init();
            Ok(None)
        }
    }
}

fn init_tracing_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn client() -> anyhow::Result<reqwest::blocking::Client> {
    Ok(reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()?)
}

impl Remote {
    /// `request` with the invoke token, or the admin token when there is none.
    fn invoke_authorized(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        match self.invoke_token.as_ref().or(self.token.as_ref()) {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn authorized(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

fn admin_post(remote: &Remote, name: &str, action: &str) -> anyhow::Result<()> {
    send(
        remote.authorized(client()?.post(format!("{}/v1/functions/{name}/{action}", remote.node))),
    )?;
    let past = if action == "stop" {
        "stopped"
    } else {
        "started"
    };
    println!("{past} {name}");
    Ok(())
}

/// Send `request`; a non-2xx answer becomes an error with the server's own message.
fn send(request: reqwest::blocking::RequestBuilder) -> anyhow::Result<serde_json::Value> {
    let response = request
        .send()
        .map_err(|e| anyhow::anyhow!("cannot reach the node: {e}"))?;
    let status = response.status();
    let text = response.text()?;
    let body: serde_json::Value = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.clone()))
    };
    if !status.is_success() {
        let code = body["error"]["code"].as_str().unwrap_or("error");
        let message = body["error"]["message"].as_str().unwrap_or(&text);
        bail!("{} {code}: {message}", status.as_u16());
    }
    Ok(body)
}
