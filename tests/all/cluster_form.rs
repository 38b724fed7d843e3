//! A cluster's control plane over real processes: nodes linked by QUIC with mutual TLS
//! elect a master (the Raft leader), elect another when it is killed, take it back as a
//! follower, and refuse a node whose certificate comes from another CA.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{free_port, NodeOptions, NodeProcess};

const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);

/// `understudy cluster init` for nodes `ids` on loopback, into `dir`.
pub fn cluster_init(dir: &Path, ids: &[u64]) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_understudy"));
    command.args(["cluster", "init", "--dir"]).arg(dir);
    for id in ids {
        command.args(["--node", &format!("{id}=127.0.0.1")]);
    }
    let output = command.output().expect("run understudy cluster init");
    assert!(
        output.status.success(),
        "cluster init failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The config of node `id` in a cluster of `members` (id, QUIC port, role).
pub fn config(id: u64, certs: &Path, members: &[(u64, u16, &str)]) -> String {
    let port = members.iter().find(|m| m.0 == id).expect("a member").1;
    let list: Vec<String> = members
        .iter()
        .map(|(m, p, role)| {
            format!("{{ id = {m}, peer_addr = \"127.0.0.1:{p}\", role = \"{role}\" }}")
        })
        .collect();
    format!(
        "[cluster]\nnode_id = {id}\npeer_listen = \"127.0.0.1:{port}\"\ncerts_dir = \"{}\"\nrole = \"{}\"\nmembers = [{}]\n",
        certs.display(),
        members.iter().find(|m| m.0 == id).expect("a member").2,
        list.join(", ")
    )
}

pub fn start_cluster(certs: &Path, members: &[(u64, u16, &str)]) -> Vec<NodeProcess> {
    members
        .iter()
        .map(|(id, _, _)| {
            NodeProcess::start_with(NodeOptions {
                config_toml: Some(config(*id, certs, members)),
                ..NodeOptions::default()
            })
        })
        .collect()
}

pub fn status(node: &NodeProcess) -> Option<Value> {
    let reply = node.api().get("/v1/cluster").ok()?;
    (reply.status == 200).then_some(reply.body)
}

/// `node`'s status once it has applied the membership (a follower may name the leader,
/// having voted for it, before it holds the first entry).
pub fn status_with_members(node: &NodeProcess, members: usize) -> Value {
    let started = Instant::now();
    loop {
        let s = status(node).expect("status");
        if s["nodes"].as_array().map(Vec::len) == Some(members) {
            return s;
        }
        assert!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "the membership never reached this node: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn leader_of(node: &NodeProcess) -> Option<u64> {
    status(node)?["raft"]["leader"].as_u64()
}

/// Wait until every node in `nodes` names the same leader; returns it.
pub fn converged_leader(nodes: &[&NodeProcess]) -> u64 {
    converged_leader_except(nodes, None)
}

/// Wait until every node in `nodes` names the same leader, other than `dead`.
pub fn converged_leader_except(nodes: &[&NodeProcess], dead: Option<u64>) -> u64 {
    let started = Instant::now();
    loop {
        let leaders: Vec<Option<u64>> = nodes.iter().map(|n| leader_of(n)).collect();
        if let Some(Some(first)) = leaders.first() {
            if Some(*first) != dead && leaders.iter().all(|l| *l == Some(*first)) {
                return *first;
            }
        }
        assert!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "no agreed leader after {CONVERGE_TIMEOUT:?}: {leaders:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn members3() -> Vec<(u64, u16, &'static str)> {
    vec![
        (1, free_port(), "voter"),
        (2, free_port(), "voter"),
        (3, free_port(), "voter"),
    ]
}

#[test]
fn three_nodes_elect_one_master_and_agree_on_membership() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let nodes = start_cluster(certs.path(), &members3());
    let leader = converged_leader(&nodes.iter().collect::<Vec<_>>());
    for node in &nodes {
        // A follower may name the leader (it voted for it) before it has the first entry,
        // which holds the membership: wait for that too.
        let started = Instant::now();
        let s = loop {
            let s = status(node).expect("status");
            if s["raft"]["voters"] == serde_json::json!([1, 2, 3])
                && s["nodes"].as_array().map(Vec::len) == Some(3)
            {
                break s;
            }
            assert!(
                started.elapsed() < CONVERGE_TIMEOUT,
                "the membership never reached this node: {s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            s["nodes"].as_array().map(Vec::len),
            Some(3),
            "every node knows every member: {s}"
        );
        let masters: Vec<u64> = s["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter(|n| n["master"] == true)
            .filter_map(|n| n["id"].as_u64())
            .collect();
        assert_eq!(masters, vec![leader]);
    }
}

/// No config file: nodes 1 and 2 get `--id`, `--peers` and `--certs`, node 3 the same
/// in environment variables. They form one cluster whose state knows every member's
/// HTTP address (the console finds the nodes through them), and it serves a function.
#[test]
fn three_nodes_started_from_flags_and_environment_form_a_cluster() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let ports: Vec<(u64, u16, u16)> = (1..=3).map(|id| (id, free_port(), free_port())).collect();
    let peers: Vec<String> = ports
        .iter()
        .map(|(id, peer, http)| format!("{id}@127.0.0.1:{peer}/{http}"))
        .collect();
    let peers = peers.join(",");
    let certs_dir = certs.path().display().to_string();
    let nodes: Vec<NodeProcess> = ports
        .iter()
        .map(|(id, _, http)| {
            let mut options = NodeOptions {
                port: Some(*http),
                ..NodeOptions::default()
            };
            let settings = [
                ("--id", "UNDERSTUDY_NODE_ID", id.to_string()),
                ("--peers", "UNDERSTUDY_PEERS", peers.clone()),
                ("--certs", "UNDERSTUDY_CERTS_DIR", certs_dir.clone()),
            ];
            for (flag, var, value) in settings {
                if *id == 3 {
                    options.env.push((var.to_owned(), value));
                } else {
                    options.extra_args.extend([flag.to_owned(), value]);
                }
            }
            NodeProcess::start_with(options)
        })
        .collect();
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    for node in &nodes {
        let s = status_with_members(node, 3);
        let mut addrs: Vec<(u64, String)> = s["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| {
                let id = n["id"].as_u64().expect("an id");
                (id, n["http_addr"].as_str().expect("an address").to_owned())
            })
            .collect();
        addrs.sort();
        let want: Vec<(u64, String)> = ports
            .iter()
            .map(|(id, _, http)| (*id, format!("127.0.0.1:{http}")))
            .collect();
        assert_eq!(addrs, want, "{s}");
    }
    crate::cluster_distributed::deploy(&nodes[0], "bank", "bank", 3);
    nodes[2].api().ok(
        "bank",
        "open",
        serde_json::json!({ "account": "a", "initial": 7 }),
    );
}

#[test]
fn killed_master_is_replaced_and_rejoins_as_follower() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let mut nodes = start_cluster(certs.path(), &members3());
    let leader = converged_leader(&nodes.iter().collect::<Vec<_>>());
    let index = (leader - 1) as usize;
    nodes[index].kill9();
    let killed_at = Instant::now();
    let survivors: Vec<&NodeProcess> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, n)| n)
        .collect();
    let new_leader = converged_leader_except(&survivors, Some(leader));
    println!(
        "new master agreed on by the survivors {:?} after kill -9 of the old one",
        killed_at.elapsed()
    );

    nodes[index].restart();
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    assert_eq!(
        converged_leader(&all),
        new_leader,
        "the returning node follows the new master"
    );
    let s = status(&nodes[index]).expect("status");
    assert_eq!(s["raft"]["state"], "follower");
}

#[test]
fn node_with_a_certificate_from_another_ca_is_refused() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let impostor_certs = tempfile::tempdir().expect("tempdir");
    cluster_init(impostor_certs.path(), &[1, 2, 3]);
    let members = members3();
    let mut nodes: Vec<NodeProcess> = members[..2]
        .iter()
        .map(|(id, _, _)| {
            NodeProcess::start_with(NodeOptions {
                config_toml: Some(config(*id, certs.path(), &members)),
                ..NodeOptions::default()
            })
        })
        .collect();
    nodes.push(NodeProcess::start_with(NodeOptions {
        config_toml: Some(config(3, impostor_certs.path(), &members)),
        ..NodeOptions::default()
    }));
    // Nodes 1 and 2 form a majority and elect a master; node 3 never hears from it.
    let leader = converged_leader(&[&nodes[0], &nodes[1]]);
    assert!(leader == 1 || leader == 2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        leader_of(&nodes[2]),
        None,
        "the impostor never joins: {:?}",
        status(&nodes[2])
    );
}

#[test]
fn two_data_nodes_and_a_witness_form_a_cluster() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let members = vec![
        (1, free_port(), "voter"),
        (2, free_port(), "voter"),
        (3, free_port(), "witness"),
    ];
    let mut nodes = start_cluster(certs.path(), &members);
    let leader = converged_leader(&nodes.iter().collect::<Vec<_>>());
    let s = status_with_members(&nodes[0], 3);
    let witness = s["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == 3)
        .expect("node 3")
        .clone();
    assert_eq!(witness["role"], "witness");
    assert_eq!(
        s["raft"]["voters"],
        serde_json::json!([1, 2, 3]),
        "a witness votes"
    );
    // Losing a data node (the master, if it is one) leaves a majority: the other data
    // node and the witness.
    let victim = if leader == 3 {
        0
    } else {
        (leader - 1) as usize
    };
    nodes[victim].kill9();
    let rest: Vec<&NodeProcess> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| n)
        .collect();
    converged_leader_except(&rest, Some(victim as u64 + 1));
}
