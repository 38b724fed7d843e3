//! A cluster of `understudy node` processes on this machine, on loopback: what the demo,
//! `understudy drill` and the replication benchmarks run against. Each node is a real
//! process of this same binary with its own data directory, config and log file, so
//! killing one (SIGKILL), pausing it (SIGSTOP) or restarting it is the real thing.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use understudy::wal::Durability;

/// How long a node may take to answer `/healthz` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One node process.
pub struct LocalNode {
    pub id: u64,
    pub http: SocketAddr,
    pub peer: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Cut off by `partition` and not yet healed.
    cut: std::sync::atomic::AtomicBool,
}

impl LocalNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The node's log file (its stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The node's config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// SIGTERM, and wait up to `timeout` for the node to stop by itself (it finishes
    /// what it answers and leaves its log clean); SIGKILL after that. Returns whether it
    /// stopped by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // std has no signal API and the crate avoids `unsafe`: use kill(1).
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let started = Instant::now();
        while sent && started.elapsed() < timeout {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let child = Command::new(exe)
            .arg("node")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start a node process")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`pause = true`) or SIGCONT.
    pub fn pause(&self, pause: bool) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else {
            bail!("node {} is not running", self.id)
        };
        let signal = if pause { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }
}

impl LocalNode {
    /// Cut the node off from its peers (`cut = true`), or heal it: iptables rules in
    /// the `INPUT` chain drop every packet to or from its QUIC port (a DROP in `OUTPUT`
    /// would make the sender's own send fail instead of losing the packet). Its HTTP API
    /// stays reachable. Needs root and iptables.
    pub fn partition(&self, cut: bool) -> anyhow::Result<()> {
        let port = self.peer.port().to_string();
        let tag = format!("understudy-drill-{}-{port}", std::process::id());
        for direction in ["--dport", "--sport"] {
            let status = Command::new("iptables")
                .arg(if cut { "-I" } else { "-D" })
                .args(["INPUT", "-p", "udp", direction, &port])
                .args(["-m", "comment", "--comment", &tag, "-j", "DROP"])
                .stderr(Stdio::null())
                .status()
                .context("cannot run iptables (a partition needs root and iptables)")?;
            if !status.success() && cut {
                bail!(
                    "iptables refused to cut node {} off (a partition needs root)",
                    self.id
                );
            }
        }
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The nodes of a local cluster (or one node alone).
pub struct LocalCluster {
    pub nodes: Vec<LocalNode>,
    http: reqwest::Client,
}

/// A free port on loopback (bound and released: another process may take it meanwhile,
/// which on a quiet machine does not happen).
fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The HTTP and QUIC ports of node `id` (from 1) when ports are counted from `base`.
fn fixed_ports(base: u16, id: u64) -> anyhow::Result<(u16, u16)> {
    let http = u64::from(base) + id - 1;
    let peer = http + PEER_PORT_OFFSET;
    match (u16::try_from(http), u16::try_from(peer)) {
        (Ok(http), Ok(peer)) => Ok((http, peer)),
        _ => bail!("--base-port {base}: node {id}'s ports ({http}, {peer}) are past 65535"),
    }
}

/// How far above its HTTP port a node's QUIC port is when ports are fixed.
pub const PEER_PORT_OFFSET: u64 = 100;

/// Settings of a local cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Nodes, numbered from 1. With 1 and `clustered = false`, a single node alone.
    pub nodes: usize,
    pub clustered: bool,
    pub durability: Durability,
    /// Extra lines for every node's `[cluster]` section (timeouts, say).
    pub cluster_toml: String,
}

impl LocalCluster {
    /// Write certificates and configs under `dir` and start the nodes; returns once every
    /// node answers `/healthz` (and, in a cluster, agrees on a master).
    ///
    /// Fails when a port, a file or a process cannot be had, or a node does not come up
    /// (the error names its log).
    pub async fn start(dir: &Path, options: &Options) -> anyhow::Result<LocalCluster> {
        LocalCluster::start_on(dir, options, None).await
    }

    /// [`LocalCluster::start`] on fixed ports when `base_port` is given: node `i` (from 1)
    /// serves HTTP on `base_port + i - 1` and QUIC on `base_port + 100 + i - 1`; free
    /// ports otherwise. Fixed ports let a cluster restart on the data it left (its
    /// members' addresses are in its state).
    ///
    /// Fails as `start` does, and when a fixed port is out of range.
    pub async fn start_on(
        dir: &Path,
        options: &Options,
        base_port: Option<u16>,
    ) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(dir)?;
        let certs = dir.join("certs");
        let ids: Vec<u64> = (1..=options.nodes as u64).collect();
        if options.clustered {
            let specs: Vec<understudy_net::certs::NodeSpec> = ids
                .iter()
                .map(|id| understudy_net::certs::NodeSpec {
                    id: *id,
                    hosts: vec!["127.0.0.1".into()],
                })
                .collect();
            understudy_net::certs::init_replacing(&certs, &specs)?;
        }
        let mut ports = Vec::new();
        for id in &ids {
            ports.push(match base_port {
                Some(base) => fixed_ports(base, *id)?,
                None => (free_tcp_port()?, free_udp_port()?),
            });
        }
        let members: Vec<String> = ids
            .iter()
            .zip(&ports)
            .map(|(id, (http, peer))| {
                format!(
                    "{{ id = {id}, peer_addr = \"127.0.0.1:{peer}\", http_addr = \"127.0.0.1:{http}\" }}"
                )
            })
            .collect();
        let mut nodes = Vec::new();
        for (id, (http, peer)) in ids.iter().zip(&ports) {
            let node_dir = dir.join(format!("node-{id}"));
            std::fs::create_dir_all(&node_dir)?;
            let data_dir = node_dir.join("data");
            let durability = match options.durability {
                Durability::Disk => "disk",
                Durability::Memory => "memory",
            };
            let mut toml = format!(
                "data_dir = \"{}\"\nlisten = \"127.0.0.1:{http}\"\ndurability = \"{durability}\"\n",
                data_dir.display()
            );
            if options.clustered {
                toml.push_str(&format!(
                    "\n[cluster]\nnode_id = {id}\npeer_listen = \"127.0.0.1:{peer}\"\ncerts_dir = \"{}\"\nmembers = [{}]\n{}\n",
                    certs.display(),
                    members.join(", "),
                    options.cluster_toml
                ));
            }
            let config = node_dir.join("node.toml");
            std::fs::write(&config, toml)?;
            let mut node = LocalNode {
                id: *id,
                http: format!("127.0.0.1:{http}").parse()?,
                peer: format!("127.0.0.1:{peer}").parse()?,
                config,
                log: node_dir.join("node.log"),
                child: None,
                cut: std::sync::atomic::AtomicBool::new(false),
            };
            node.spawn()?;
            nodes.push(node);
        }
        let cluster = LocalCluster {
            nodes,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        };
        for node in &cluster.nodes {
            cluster.wait_healthy(node.id).await?;
        }
        if options.clustered {
            cluster.wait_master(START_TIMEOUT).await?;
        }
        Ok(cluster)
    }

    pub fn node(&self, id: u64) -> &LocalNode {
        &self.nodes[(id - 1) as usize]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut LocalNode {
        &mut self.nodes[(id - 1) as usize]
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.http
    }

    async fn wait_healthy(&self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id);
        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            let healthy = self
                .http
                .get(format!("{}/healthz", node.url()))
                .timeout(Duration::from_millis(500))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if healthy {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "node {id} did not come up within {START_TIMEOUT:?}; see {}",
            node.log.display()
        )
    }

    /// The cluster as node `id` sees it (`GET /v1/cluster`).
    pub async fn status(&self, id: u64) -> Option<Value> {
        let reply = self
            .http
            .get(format!("{}/v1/cluster", self.node(id).url()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        reply.json().await.ok()
    }

    /// The master every running node agrees on.
    pub async fn wait_master(&self, timeout: Duration) -> anyhow::Result<u64> {
        let started = Instant::now();
        loop {
            let mut leaders = Vec::new();
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                leaders.push(
                    self.status(node.id)
                        .await
                        .and_then(|s| s["raft"]["leader"].as_u64()),
                );
            }
            if let Some(Some(first)) = leaders.first() {
                if leaders.iter().all(|l| *l == Some(*first)) {
                    return Ok(*first);
                }
            }
            if started.elapsed() > timeout {
                bail!("the nodes do not agree on a master after {timeout:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Deploy `bytes` as `name` with `replicas` copies, allowed to call `calls` (`a,b`,
    /// `*`, or blank for none), through node `via`; returns the answer (primary, backups,
    /// epoch).
    pub async fn deploy(
        &self,
        via: u64,
        name: &str,
        bytes: Vec<u8>,
        replicas: u8,
        calls: &str,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/v1/functions/{name}", self.node(via).url());
        let mut query = vec![("calls", calls.to_owned())];
        if replicas > 0 {
            query.push(("replicas", replicas.to_string()));
        }
        let reply = self
            .http
            .put(url)
            .query(&query)
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await?;
        let status = reply.status();
        let body: Value = reply.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("deploying {name}: {status} {body}");
        }
        Ok(body)
    }

    /// Start a killed node again, on its data directory.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.node_mut(id).spawn()?;
        self.wait_healthy(id).await
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // A paused process must be resumed to die promptly (SIGKILL works anyway,
            // but its sockets linger less).
            let _ = node.pause(false);
            if node.cut.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = node.partition(false);
            }
            node.kill9();
        }
    }
}
