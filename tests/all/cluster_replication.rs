//! Replication over real processes: a function deployed through any node is installed on
//! every node given a copy, invocations through any node reach its primary, every
//! backup ends with the primary's state, a replica refuses a stale epoch, and two data
//! nodes plus a witness form a cluster that serves.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_form::{cluster_init, converged_leader, members3, start_cluster, status};
use crate::support::{component, free_port, NodeProcess};

const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Deploy `component_name` as `name` with `replicas` copies through `node`.
pub(crate) fn deploy(node: &NodeProcess, name: &str, component_name: &str, replicas: u8) -> Value {
    // A cluster just formed may not have heard from every node yet: the master refuses
    // (409) until enough nodes are up.
    let started = std::time::Instant::now();
    let reply = loop {
        let reply = node.api().put_bytes(
            &format!(
                "/v1/functions/{name}?replicas={replicas}&calls={}",
                crate::support::calls_granted(component_name)
            ),
            component(component_name),
        );
        if reply.status == 409 && started.elapsed() < SETTLE_TIMEOUT {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        break reply.expect_status(201);
    };
    assert_eq!(
        reply.body["ready"], true,
        "every copy installed: {}",
        reply.body
    );
    reply.body
}

/// The function as `node` holds it (its own copy), if it has one.
fn local_copy(node: &NodeProcess, name: &str) -> Option<Value> {
    let reply = node.api().get(&format!("/v1/functions/{name}")).ok()?;
    (reply.status == 200).then_some(reply.body)
}

/// Wait until every node in `holders` has the same `seq` and state digest for `name`,
/// and return them; fail with what each holds after `SETTLE_TIMEOUT`.
fn settled_copies(nodes: &[&NodeProcess], name: &str) -> (u64, String) {
    let started = Instant::now();
    loop {
        let copies: Vec<Option<(u64, String)>> = nodes
            .iter()
            .map(|n| {
                local_copy(n, name).map(|c| {
                    (
                        c["seq"].as_u64().unwrap_or(0),
                        c["state_digest"].as_str().unwrap_or("").to_owned(),
                    )
                })
            })
            .collect();
        if let Some(Some(first)) = copies.first() {
            if copies.iter().all(|c| c.as_ref() == Some(first)) {
                return first.clone();
            }
        }
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "the copies of {name} never matched: {copies:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn node_by_id(nodes: &[NodeProcess], id: u64) -> &NodeProcess {
    &nodes[(id - 1) as usize]
}

#[test]
fn deployed_through_one_node_served_through_every_node_and_every_backup_matches() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let nodes = start_cluster(certs.path(), &members3());
    converged_leader(&nodes.iter().collect::<Vec<_>>());

    let placed = deploy(&nodes[1], "bank", "bank", 3);
    let primary = placed["primary"].as_u64().expect("a primary");
    let backups: Vec<u64> = placed["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(backups.len(), 2, "three copies: {placed}");
    assert!(!backups.contains(&primary), "never two copies on one node");

    // Invoke through every node: the ones that are not primary forward to it.
    for (i, account) in ["alice", "bob", "carol"].iter().enumerate() {
        nodes[i].api().ok(
            "bank",
            "open",
            json!({ "account": account, "initial": 100 }),
        );
    }
    for round in 0..30u64 {
        let via = &nodes[(round % 3) as usize];
        let from = ["alice", "bob", "carol"][(round % 3) as usize];
        let to = ["alice", "bob", "carol"][((round + 1) % 3) as usize];
        via.api().ok(
            "bank",
            "transfer",
            json!({ "from": from, "to": to, "amount": round % 7 + 1 }),
        );
    }
    for node in &nodes {
        let total = node.api().ok("bank", "total", json!(null));
        assert_eq!(total["total"], 300, "read through every node");
    }

    let (seq, digest) = settled_copies(&nodes.iter().collect::<Vec<_>>(), "bank");
    assert_eq!(
        seq, 33,
        "3 opens and 30 transfers, each one entry of the log"
    );
    assert!(!digest.is_empty());

    // An acknowledged commit is on every backup already: check right after one.
    let via = node_by_id(&nodes, backups[0]);
    via.api().ok(
        "bank",
        "deposit",
        json!({ "account": "alice", "amount": 5 }),
    );
    for b in &backups {
        let copy = local_copy(node_by_id(&nodes, *b), "bank").expect("backup copy");
        assert_eq!(
            copy["seq"], 34,
            "node {b} holds the commit as soon as it was acknowledged"
        );
    }

    // Status shows the function, its epoch and where it lives.
    let s = status(node_by_id(&nodes, primary)).expect("status");
    let f = s["functions"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["name"] == "bank"))
        .expect("bank in status")
        .clone();
    assert_eq!(f["primary"], primary);
    assert_eq!(f["here"]["role"], "primary");
    assert_eq!(f["here"]["seq_released"], 34);
}

#[test]
fn a_replica_refuses_a_message_with_a_stale_epoch() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let members = members3();
    let nodes = start_cluster(certs.path(), &members);
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let placed = deploy(&nodes[0], "counter", "counter", 2);
    let primary = placed["primary"].as_u64().expect("primary");
    let backup = placed["backups"][0].as_u64().expect("backup");
    let epoch = placed["epoch"].as_u64().expect("epoch");
    nodes[0].api().ok("counter", "increment", json!(null));
    let (seq, digest) = settled_copies(
        &[node_by_id(&nodes, primary), node_by_id(&nodes, backup)],
        "counter",
    );

    // Speak to the backup as its primary would, but with an epoch older than its own.
    let backup_addr = members
        .iter()
        .find(|m| m.0 == backup)
        .map(|m| format!("127.0.0.1:{}", m.1).parse().expect("addr"))
        .expect("member");
    let reply = replicate_as(certs.path(), primary, backup, backup_addr, epoch - 1, seq);
    assert_eq!(
        reply,
        vec![vec![understudy::replication::Reply::Stale {
            epoch: understudy::replication::Epoch(epoch)
        }]],
        "the backup names the epoch it knows"
    );
    let after = local_copy(node_by_id(&nodes, backup), "counter").expect("copy");
    assert_eq!(
        after["seq"], seq,
        "nothing from the stale message was applied"
    );
    assert_eq!(after["state_digest"], digest.as_str());
}

/// Send `to` a replication message for `counter` from node `as_node` in `epoch`,
/// carrying one entry after `seq`; return the replies.
fn replicate_as(
    certs: &Path,
    as_node: u64,
    to: u64,
    addr: std::net::SocketAddr,
    epoch: u64,
    seq: u64,
) -> Vec<Vec<understudy::replication::Reply>> {
    use understudy::cluster::wire::{self, Entry, Replicate, ReplicateReply};
    use understudy::replication::{Append, Epoch, Seq};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let identity = understudy_net::Identity::load(certs, as_node).expect("identity");
        let transport = understudy_net::Transport::bind(
            &identity,
            "127.0.0.1:0".parse().expect("addr"),
            understudy_net::Config::default(),
        )
        .expect("bind");
        let message = Replicate {
            appends: vec![(
                understudy::ids::FunctionName::new("counter").expect("name"),
                Append {
                    epoch: Epoch(epoch),
                    session: 1,
                    seq_prev: Seq(seq),
                    epoch_prev: Epoch(epoch),
                    entries: vec![(
                        Seq(seq + 1),
                        Entry {
                            txn: understudy::ids::TxnId(1),
                            ops: vec![understudy::wal::record::Op {
                                key: b"count".to_vec(),
                                value: Some(b"999".to_vec()),
                            }],
                            idempotency: None,
                            kind: Default::default(),
                        },
                    )],
                },
            )],
        };
        let reply = transport
            .request(
                to,
                addr,
                understudy_net::Channel::Replication,
                wire::encode(&message),
            )
            .await
            .expect("the backup answers");
        transport.close().await;
        let reply: ReplicateReply = wire::decode(&reply).expect("decodes");
        reply.replies
    })
}

#[test]
fn two_data_nodes_and_a_witness_form_a_cluster_that_serves() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let members = vec![
        (1, free_port(), "voter"),
        (2, free_port(), "voter"),
        (3, free_port(), "witness"),
    ];
    let nodes = start_cluster(certs.path(), &members);
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    // Deployed and invoked through the witness, which holds no copy itself.
    let placed = deploy(&nodes[2], "counter", "counter", 2);
    let mut copies: Vec<u64> = vec![placed["primary"].as_u64().expect("primary")];
    copies.extend(
        placed["backups"]
            .as_array()
            .expect("backups")
            .iter()
            .filter_map(Value::as_u64),
    );
    copies.sort_unstable();
    assert_eq!(
        copies,
        vec![1, 2],
        "copies only on the data nodes: {placed}"
    );
    for _ in 0..5 {
        nodes[2].api().ok("counter", "increment", json!(null));
    }
    assert!(
        local_copy(&nodes[2], "counter").is_none(),
        "the witness holds no copy"
    );
    let (seq, _) = settled_copies(&[&nodes[0], &nodes[1]], "counter");
    assert_eq!(seq, 5);
}

#[test]
fn a_backup_that_was_down_while_commits_happened_catches_up_and_then_matches() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let mut nodes = start_cluster(certs.path(), &members3());
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    let placed = deploy(&nodes[0], "bank", "bank", 3);
    let primary = placed["primary"].as_u64().expect("primary");
    // A backup that is not the master, so that the master stays to judge it.
    let backup = placed["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .filter_map(Value::as_u64)
        .find(|b| *b != master)
        .expect("a backup that is not the master");
    let p = (primary - 1) as usize;
    nodes[p].api().ok(
        "bank",
        "open",
        json!({ "account": "alice", "initial": 1000 }),
    );
    nodes[p]
        .api()
        .ok("bank", "open", json!({ "account": "bob", "initial": 0 }));

    nodes[(backup - 1) as usize].kill9();
    // Commits go on once the master has dropped the dead backup from the set.
    for _ in 0..50 {
        nodes[p].api().ok(
            "bank",
            "transfer",
            json!({ "from": "alice", "to": "bob", "amount": 3 }),
        );
    }
    let s = status(&nodes[p]).expect("status");
    let f = &s["functions"][0];
    assert!(
        !f["backups"]
            .as_array()
            .expect("backups")
            .contains(&json!(backup)),
        "the dead backup left the set: {f}"
    );

    nodes[(backup - 1) as usize].restart();
    // It comes back as a catching-up backup, installs a snapshot, follows the log and
    // then counts again.
    let started = Instant::now();
    loop {
        let s = status(&nodes[p]).expect("status");
        let f = &s["functions"][0];
        if f["backups"]
            .as_array()
            .is_some_and(|b| b.contains(&json!(backup)))
        {
            break;
        }
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "the returning backup never caught up: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nodes[p].api().ok(
        "bank",
        "transfer",
        json!({ "from": "bob", "to": "alice", "amount": 1 }),
    );
    let (seq, _) = settled_copies(&nodes.iter().collect::<Vec<_>>(), "bank");
    assert!(seq >= 53, "every commit is on every copy: #{seq}");
    let total = node_by_id(&nodes, backup)
        .api()
        .ok("bank", "total", json!(null));
    assert_eq!(total["total"], 1000);
    let s = status(&nodes[p]).expect("status");
    assert!(
        s["catch_ups"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["backup"] == backup)),
        "the catch-up is on record: {}",
        s["catch_ups"]
    );
}

#[test]
fn a_new_node_joins_a_running_cluster_and_takes_copies() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let members = members3();
    let nodes = start_cluster(certs.path(), &members);
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(["cluster", "add-node", "--dir"])
        .arg(certs.path())
        .args(["--node", "4=127.0.0.1"])
        .output()
        .expect("run add-node");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let port = free_port();
    let joiner = NodeProcess::start_with(crate::support::NodeOptions {
        config_toml: Some(format!(
            "[cluster]\nnode_id = 4\npeer_listen = \"127.0.0.1:{port}\"\ncerts_dir = \"{}\"\nmembers = []\njoin = \"2@127.0.0.1:{}\"\n",
            certs.path().display(),
            members[1].1
        )),
        ..crate::support::NodeOptions::default()
    });
    let started = Instant::now();
    loop {
        let s = status(&nodes[0]).expect("status");
        if s["raft"]["voters"] == json!([1, 2, 3, 4])
            && s["nodes"].as_array().is_some_and(|n| n.len() == 4)
        {
            break;
        }
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "node 4 never joined: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let placed = deploy(&joiner, "counter", "counter", 4);
    assert_eq!(
        placed["backups"].as_array().map(Vec::len),
        Some(3),
        "{placed}"
    );
    for _ in 0..5 {
        joiner.api().ok("counter", "increment", json!(null));
    }
    let all: Vec<&NodeProcess> = nodes.iter().chain(std::iter::once(&joiner)).collect();
    let (seq, _) = settled_copies(&all, "counter");
    assert_eq!(seq, 5);
}

#[test]
fn backups_snapshot_their_logs_and_recover_from_them() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let members = members3();
    let mut nodes: Vec<NodeProcess> = members
        .iter()
        .map(|(id, _, _)| {
            NodeProcess::start_with(crate::support::NodeOptions {
                config_toml: Some(format!(
                    "checkpoint_log_bytes = 8192\n{}",
                    crate::cluster_form::config(*id, certs.path(), &members)
                )),
                ..crate::support::NodeOptions::default()
            })
        })
        .collect();
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let placed = deploy(&nodes[0], "counter", "counter", 3);
    let primary = placed["primary"].as_u64().expect("primary");
    let backup = placed["backups"][0].as_u64().expect("backup");
    let p = (primary - 1) as usize;
    for _ in 0..300 {
        nodes[p].api().ok("counter", "increment", json!(null));
    }
    let b = (backup - 1) as usize;
    let started = Instant::now();
    while crate::support::wal_snapshots(&nodes[b].wal_dir()).is_empty() {
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "the backup never wrote a snapshot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (seq, digest) = settled_copies(&nodes.iter().collect::<Vec<_>>(), "counter");
    nodes[b].kill9();
    nodes[b].restart();
    let copy = local_copy(&nodes[b], "counter").expect("recovered copy");
    assert_eq!(
        copy["seq"], seq,
        "the backup recovered from its snapshot and log"
    );
    assert_eq!(copy["state_digest"], digest.as_str());
    // And it is a copy again (after the master dropped it while it was down and took it
    // back as a catching-up backup).
    nodes[p].api().ok("counter", "increment", json!(null));
    let (after, _) = settled_copies(&nodes.iter().collect::<Vec<_>>(), "counter");
    assert_eq!(after, seq + 1);
}

/// A forwarded invocation that fails fails with the same kind as on the primary: an
/// output over the limit once came back as `unavailable` after a forward, was retried
/// for the route wait and answered 503.
#[test]
fn a_forwarded_failure_keeps_its_kind() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let nodes = start_cluster(certs.path(), &members3());
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let placed = deploy(&nodes[0], "hostile", "hostile", 2);
    let primary = placed["primary"].as_u64().expect("a primary");
    let via = nodes
        .iter()
        .enumerate()
        .find(|(i, _)| *i as u64 + 1 != primary)
        .map(|(_, n)| n)
        .expect("a node that is not the primary");

    let too_large = via
        .api()
        .invoke("hostile", "big-output", &json!({ "bytes": 17 << 20 }));
    too_large.expect_error(500, "output-too-large");
    via.api()
        .invoke("hostile", "trap", &json!(null))
        .expect_error(500, "trap");
    via.api()
        .invoke(
            "hostile",
            "put-then-fail",
            &json!({ "key": "k", "value": "v" }),
        )
        .expect_error(422, "deliberate");
    // Still serving, and nothing of the failures was kept.
    let got = via.api().ok("hostile", "get", json!({ "key": "k" }));
    assert_eq!(got["value"], Value::Null);
}
