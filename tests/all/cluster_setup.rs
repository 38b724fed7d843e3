//! Starting a cluster without writing its files by hand: `understudy cluster init
//! --nodes ... --out DIR` writes certificates, a token and configs that three
//! `understudy node --config` processes form a cluster from, and `understudy cluster
//! local` runs a cluster on loopback in one process until SIGTERM stops it and its nodes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{free_port, wait_until, Api};

const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A process the test started, SIGKILLed when dropped (a failing test leaves nothing
/// running); its log is printed then.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: `cluster local` stops its nodes then (SIGKILL would leave them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let asked = Instant::now();
        while asked.elapsed() < Duration::from_secs(15) && matches!(self.child.try_wait(), Ok(None))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} ---\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The `understudy` command, with nothing in the environment making it a member.
fn understudy() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_understudy"));
    for var in [
        "UNDERSTUDY_ADMIN_TOKEN",
        "UNDERSTUDY_INVOKE_TOKEN",
        "UNDERSTUDY_CONFIG",
        "UNDERSTUDY_NODE_ID",
        "UNDERSTUDY_PEERS",
        "UNDERSTUDY_CERTS_DIR",
        "UNDERSTUDY_PEER_LISTEN",
        "UNDERSTUDY_JOIN",
        "UNDERSTUDY_DATA_DIR",
        "UNDERSTUDY_LISTEN",
    ] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "info,wasmtime=warn,cranelift=warn");
    command
}

fn healthy(api: &Api) -> bool {
    matches!(api.get("/healthz"), Ok(r) if r.status == 200)
}

/// Every node in `apis` names the same master and knows `members` nodes.
fn agreed(apis: &[Api], members: usize) -> bool {
    let mut leaders = Vec::new();
    for api in apis {
        let Ok(reply) = api.get("/v1/cluster") else {
            return false;
        };
        if reply.body["nodes"].as_array().map(Vec::len) != Some(members) {
            return false;
        }
        leaders.push(reply.body["raft"]["leader"].as_u64());
    }
    leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0])
}

/// Deploy the bank through `apis[0]` and open an account through the last node (which
/// forwards to the primary when it is not).
fn serves_the_bank(apis: &[Api], token: &str) {
    apis[0].with_token(token).deploy_component("bank", "bank");
    let last = apis.last().expect("nodes").with_token(token);
    let opened = last.ok("bank", "open", json!({ "account": "a", "initial": 7 }));
    assert_eq!(opened["balance"], 7, "{opened}");
}

#[test]
fn three_nodes_start_from_the_configs_cluster_init_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports: Vec<(u64, u16, u16)> = (1..=3).map(|id| (id, free_port(), free_port())).collect();
    let nodes = ports
        .iter()
        .map(|(id, peer, http)| format!("{id}@127.0.0.1:{peer}/{http}"))
        .collect::<Vec<_>>()
        .join(",");
    let out = understudy()
        .args(["cluster", "init", "--nodes", &nodes, "--out"])
        .arg(dir.path())
        .output()
        .expect("run cluster init");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cluster init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in 1..=3 {
        let config = dir.path().join(format!("node-{id}.toml"));
        assert!(
            stdout.contains(&format!("understudy node --config {}", config.display())),
            "it says how to start node {id}: {stdout}"
        );
    }
    let procs: Vec<Proc> = (1..=3)
        .map(|id| {
            let log = dir.path().join(format!("node-{id}.log"));
            let child = understudy()
                .arg("node")
                .arg("--config")
                .arg(dir.path().join(format!("node-{id}.toml")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("a log file"))
                .spawn()
                .expect("start a node");
            Proc { child, log }
        })
        .collect();
    let apis: Vec<Api> = ports
        .iter()
        .map(|(_, _, http)| Api::new(&format!("http://127.0.0.1:{http}")))
        .collect();
    wait_until("the nodes answer", CONVERGE_TIMEOUT, || {
        apis.iter().all(healthy)
    });
    wait_until("the nodes agree on a master", CONVERGE_TIMEOUT, || {
        agreed(&apis, 3)
    });
    let token = std::fs::read_to_string(dir.path().join("admin-token")).expect("the token");
    // The configs ask for the token: a deploy without it is refused.
    apis[0]
        .put_bytes("/v1/functions/bank", crate::support::component("bank"))
        .expect_error(401, "unauthorized");
    serves_the_bank(&apis, token.trim());
    drop(procs);
}

/// A base port with the HTTP ports `base..base+n` and the QUIC ports 100 above them
/// free (for TCP and UDP) a moment ago.
fn free_base_port(n: u16) -> u16 {
    let free = |port: u16| {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
    };
    loop {
        let base = free_port();
        if base.checked_add(100 + n).is_some()
            && (0..n).all(|i| free(base + i) && free(base + 100 + i))
        {
            return base;
        }
    }
}

/// Whether process `pid` still exists (a zombie counts as gone).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn cluster_local_serves_until_sigterm_stops_it_and_its_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port(3);
    let log = dir.path().join("cluster-local.stderr");
    let mut proc = Proc {
        child: understudy()
            .args(["cluster", "local", "--nodes", "3", "--base-port"])
            .arg(base.to_string())
            .arg("--dir")
            .arg(dir.path().join("cluster"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .expect("start cluster local"),
        log,
    };
    // Read what it prints up to `ready` on a thread, so a hung start fails the test.
    let stdout = proc.child.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end: what it prints while stopping must find a reader.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line);
        }
    });
    let started = Instant::now();
    let mut printed = Vec::new();
    while printed.last().map(String::as_str) != Some("ready") {
        let left = Duration::from_secs(90).saturating_sub(started.elapsed());
        match lines_rx.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(e) => panic!("cluster local printed no `ready` ({e}): {printed:?}"),
        }
    }
    let text = printed.join("\n");
    // `node N  http://ADDR  quic ADDR  pid PID`
    let mut nodes: Vec<(u64, String, u32)> = Vec::new();
    for line in &printed {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["node", id, url, "quic", _, "pid", pid] = words[..] {
            nodes.push((
                id.parse().expect("a node id"),
                url.to_owned(),
                pid.parse().expect("a pid"),
            ));
        }
    }
    assert_eq!(nodes.len(), 3, "three nodes listed: {text}");
    for (id, url, _) in &nodes {
        assert_eq!(
            *url,
            format!("http://127.0.0.1:{}", base + *id as u16 - 1),
            "{text}"
        );
    }
    for what in [
        "console   http://",
        "/ui",
        "certs ",
        "log ",
        "data ",
        "understudy deploy",
        "Ctrl-C",
    ] {
        assert!(text.contains(what), "it prints {what:?}: {text}");
    }
    assert!(Path::new(&dir.path().join("cluster/certs/ca.pem")).exists());
    let apis: Vec<Api> = nodes.iter().map(|(_, url, _)| Api::new(url)).collect();
    wait_until("the nodes agree on a master", CONVERGE_TIMEOUT, || {
        agreed(&apis, 3)
    });
    apis[0].deploy_component("counter", "counter");
    let value = apis[2].ok("counter", "increment", json!({ "by": 2 }));
    assert_eq!(value["value"], 2, "{value}");

    let sent = Command::new("kill")
        .args(["-TERM", &proc.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = proc.child.try_wait().expect("poll") {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(60),
            "cluster local still runs a minute after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "cluster local exited with {status}");
    for (id, _, pid) in &nodes {
        assert!(!process_alive(*pid), "node {id} (pid {pid}) is gone");
        let log = std::fs::read_to_string(dir.path().join(format!("cluster/node-{id}/node.log")))
            .expect("the node's log");
        assert!(
            log.lines().last().is_some_and(|l| l.contains("stopped")),
            "node {id} stopped cleanly, not killed: {}",
            log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
    }
}
