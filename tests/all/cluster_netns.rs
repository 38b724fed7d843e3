//! Failover across a real network: three nodes, each in a network namespace of its own
//! on a bridge (see `netns`), the test process the client. The virtual address moves
//! with the master (and is announced by gratuitous ARP, so the client's ARP cache follows
//! it); a primary cut off by iptables, from the master alone or from everyone, can
//! neither commit nor answer from stale state, and rejoins as a backup once healed.
//!
//! These tests need root (CI runs as root); elsewhere they say so and pass.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_failover::{
    bank, check_nothing_lost, served_by, wait_for, Workload, ACCOUNTS, INITIAL,
};
use crate::cluster_form::converged_leader;
use crate::netns::Net;
use crate::support::{component, Api, NodeOptions, NodeProcess};

pub(crate) const TOKEN: &str = "netns-test-token";

/// `understudy cluster init` for hosts 0..n of `net` (node ids 1..=n), into `dir`.
fn cluster_init(dir: &std::path::Path, net: &Net, n: usize) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_understudy"));
    command.args(["cluster", "init", "--dir"]).arg(dir);
    for i in 0..n {
        command.args(["--node", &format!("{}={}", i + 1, net.addr(i))]);
    }
    let output = command.output().expect("run understudy cluster init");
    assert!(
        output.status.success(),
        "cluster init failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Nodes 1..=n, node `i + 1` on host `i`, QUIC on port 7000 of its host.
pub(crate) fn start_nodes(
    net: &Net,
    n: usize,
    extra_args: &[String],
) -> (tempfile::TempDir, Vec<NodeProcess>) {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), net, n);
    let members: Vec<String> = (0..n)
        .map(|i| format!("{{ id = {}, peer_addr = \"{}:7000\" }}", i + 1, net.addr(i)))
        .collect();
    let nodes = (0..n)
        .map(|i| {
            let config = format!(
                "[cluster]\nnode_id = {}\npeer_listen = \"{}:7000\"\ncerts_dir = \"{}\"\nmembers = [{}]\n",
                i + 1,
                net.addr(i),
                certs.path().display(),
                members.join(", ")
            );
            NodeProcess::start_with(NodeOptions {
                config_toml: Some(config),
                admin_token: Some(TOKEN.into()),
                netns: Some((net.ns(i).to_owned(), net.addr(i))),
                extra_args: extra_args.to_vec(),
                ..NodeOptions::default()
            })
        })
        .collect();
    (certs, nodes)
}

pub(crate) fn deploy(api: &Api, name: &str, component_name: &str, replicas: u8) -> Value {
    api.with_token(TOKEN)
        .put_bytes(
            &format!(
                "/v1/functions/{name}?replicas={replicas}&calls={}",
                crate::support::calls_granted(component_name)
            ),
            component(component_name),
        )
        .expect_status(201)
        .body
}

pub(crate) fn open_accounts(api: &Api) {
    for account in ACCOUNTS {
        api.ok(
            "bank",
            "open",
            json!({ "account": account, "initial": INITIAL }),
        );
    }
}

fn skip(what: &str) {
    eprintln!("skipped: {what} needs root and iproute2 (CI has both)");
}

#[test]
fn the_virtual_address_moves_with_the_master() {
    let Some(net) = Net::new(3) else {
        return skip("a virtual address in network namespaces");
    };
    let vip = net.spare();
    let flags = [
        "--vip".into(),
        format!("{vip}/24"),
        "--vip-dev".into(),
        "eth0".into(),
    ];
    let (_certs, mut nodes) = start_nodes(&net, 3, &flags);
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    let m = (master - 1) as usize;
    wait_for("the master holds the virtual address", || {
        net.has_addr(m, vip)
    });
    for i in (0..3).filter(|i| *i != m) {
        assert!(!net.has_addr(i, vip), "host {i} holds the address too");
    }

    // The client knows the virtual address and nothing else.
    let api = Api::new(&format!("http://{vip}:{}", crate::support::NETNS_PORT));
    let placed = deploy(&api, "bank", "bank", 3);
    assert_eq!(placed["ready"], true, "{placed}");
    open_accounts(&api);
    assert_eq!(
        net.neighbour(vip).as_deref(),
        Some(net.mac(m).as_str()),
        "the client reaches the virtual address at the master's MAC"
    );
    let load = Workload::start(vec![api.clone()], 4);
    wait_for("some transfers before the kill", || load.acked() >= 50);

    // The master's machine dies: its process is killed and its link goes dark (a dead
    // machine answers no ARP for the address it held).
    nodes[m].kill9();
    net.set_link(m, false);
    let killed = Instant::now();
    let mut taken = None;
    wait_for("another node holds the virtual address", || {
        taken = (0..3).find(|i| *i != m && net.has_addr(*i, vip));
        taken.is_some()
    });
    let n = taken.expect("found above");
    let took = killed.elapsed();
    let new_mac = net.mac(n);
    wait_for("the client's ARP cache follows the address", || {
        net.neighbour(vip).as_deref() == Some(new_mac.as_str())
    });
    let arp = killed.elapsed();
    let before = load.acked();
    wait_for(
        "transfers through the virtual address after the kill",
        || load.acked() >= before + 100,
    );
    let (acked, (retried, longest_ms)) = load.finish();
    println!(
        "node {} took the address {took:?} after the kill, the client's ARP entry moved after {arp:?}; \
         {} transfers acknowledged, {retried} retried, longest gap {longest_ms:.1} ms",
        n + 1,
        acked.len()
    );
    assert_eq!(
        total_through(&api)["total"],
        INITIAL * ACCOUNTS.len() as u64
    );
    check_nothing_lost(&api, &acked);

    // The dead machine comes back: the node removes the address its crash left behind
    // before it serves. (It may later become master again, and then rightly take it.)
    net.set_link(m, true);
    nodes[m].restart();
    assert!(
        nodes[m]
            .log()
            .contains("removed the virtual address left by an earlier run"),
        "the restarted node did not clear the address its crash left behind"
    );
    let holder = |nodes: &[NodeProcess]| {
        let master = converged_leader(&nodes.iter().collect::<Vec<_>>()) as usize - 1;
        let holders: Vec<usize> = (0..3).filter(|i| net.has_addr(*i, vip)).collect();
        (master, holders)
    };
    wait_for("exactly one node, the master, holds the address", || {
        let (master, holders) = holder(&nodes);
        holders == vec![master]
    });

    // A master that stops gracefully gives the address up; the next one takes it.
    let (stopping, _) = holder(&nodes);
    nodes[stopping].terminate();
    assert!(
        !net.has_addr(stopping, vip),
        "a stopped master still holds the address"
    );
    wait_for("another master holds the virtual address", || {
        (0..3).any(|i| i != stopping && net.has_addr(i, vip))
    });
    assert_eq!(
        total_through(&api)["total"],
        INITIAL * ACCOUNTS.len() as u64
    );
}

/// The bank's total read through `api` (the virtual address), as a client would: a
/// request that finds no answer (a connection made towards the old holder of the address
/// before the neighbour cache moved) is sent again.
fn total_through(api: &Api) -> serde_json::Value {
    let quick = api.with_timeout(Duration::from_secs(3));
    let started = std::time::Instant::now();
    loop {
        match quick.try_invoke("bank", "total", &json!(null), None) {
            Ok(reply) if reply.status == 200 => return reply.body,
            other => assert!(
                started.elapsed() < Duration::from_secs(60),
                "no total through the virtual address: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cut the bank's primary off (from the master alone, or from every peer) by iptables
/// DROP rules inside the namespaces; its clients keep asking it over HTTP.
fn cut_off_primary(from_everyone: bool) {
    let Some(net) = Net::new(3) else {
        return skip("cutting a node off in network namespaces");
    };
    let (_certs, nodes) = start_nodes(&net, 3, &[]);
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    let m = (master - 1) as usize;
    // Placement puts the first function's primary on the lowest id: a filler first
    // moves the bank's primary elsewhere; if that is still the master, another one.
    deploy(nodes[0].api(), "filler", "counter", 2);
    let mut placed = deploy(nodes[0].api(), "bank", "bank", 3);
    if placed["primary"] == master {
        nodes[0]
            .api()
            .with_token(TOKEN)
            .delete("bank")
            .expect_status(204);
        deploy(nodes[0].api(), "filler2", "counter", 2);
        placed = deploy(nodes[0].api(), "bank", "bank", 3);
    }
    let primary = placed["primary"].as_u64().expect("primary");
    assert_ne!(
        primary, master,
        "the bank's primary is not the master: {placed}"
    );
    let p = (primary - 1) as usize;
    let epoch_before = placed["epoch"].as_u64().expect("epoch");
    open_accounts(nodes[m].api());
    let apis: Vec<Api> = (0..3)
        .filter(|i| *i != p)
        .map(|i| nodes[i].api().clone())
        .collect();
    let load = Workload::start(apis, 4);
    wait_for("some transfers before the cut", || load.acked() >= 50);

    let cut_at = Instant::now();
    for i in (0..3).filter(|i| *i != p && (from_everyone || *i == m)) {
        net.cut(p, i);
    }
    wait_for("a new primary while the old one is cut off", || {
        let f = bank(&nodes[m]);
        f["primary"].as_u64().is_some_and(|x| x != primary)
            && f["epoch"].as_u64().is_some_and(|e| e > epoch_before)
    });
    println!("a new primary {:?} after the cut", cut_at.elapsed());
    let before = load.acked();
    wait_for("transfers on the new primary", || {
        load.acked() >= before + 100
    });

    // The cut-off node still takes HTTP requests: it must neither commit nor answer from
    // its stale state; what it answers comes from the new primary (when it can reach it).
    let cut_off = nodes[p].api();
    for i in 0..3u64 {
        let reply = cut_off.invoke_keyed(
            "bank",
            "transfer",
            &json!({ "from": "a", "to": "b", "amount": 1 }),
            &format!("cut-{i}"),
        );
        assert!(
            reply.status != 200 || served_by(&reply).is_some_and(|(n, _)| n != primary),
            "the cut-off primary answered itself: {} {:?}",
            reply.status,
            reply.body
        );
        let read = cut_off.invoke("bank", "total", &json!(null));
        assert!(
            read.status != 200 || served_by(&read).is_some_and(|(n, _)| n != primary),
            "a stale read from the cut-off primary: {:?}",
            read.body
        );
        println!(
            "the cut-off node answered {} {} and {} {}",
            reply.status, reply.body, read.status, read.body
        );
    }
    let healed = Instant::now();
    for i in 0..3 {
        net.heal(i);
    }
    // A backup again (or already primary again, in a newer epoch: a new master hands the
    // primaries it holds over to caught-up backups).
    wait_for("the healed node holds a copy again", || {
        let b = bank(&nodes[m]);
        b["backups"]
            .as_array()
            .is_some_and(|b| b.contains(&json!(primary)))
            || (b["primary"] == json!(primary) && b["epoch"].as_u64() > Some(epoch_before))
    });
    println!(
        "rejoined as a backup {:?} after the cut was healed",
        healed.elapsed()
    );
    let reply = cut_off.invoke_keyed(
        "bank",
        "transfer",
        &json!({ "from": "a", "to": "b", "amount": 1 }),
        "after-heal",
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    // Answered in a newer configuration (the healed node itself may be primary again by
    // then: a new master hands its primaries over to backups).
    let (_, epoch) = served_by(&reply).expect("served-by header");
    assert!(
        epoch > epoch_before,
        "answered in epoch {epoch}, not after {epoch_before}"
    );
    let (acked, _) = load.finish();
    let any = nodes[m].api();
    check_nothing_lost(any, &acked);
    let total = any.ok("bank", "total", json!(null));
    assert_eq!(total["total"], INITIAL * ACCOUNTS.len() as u64);
}

#[test]
fn primary_cut_off_from_the_master_cannot_commit_and_rejoins_as_a_backup() {
    cut_off_primary(false);
}

#[test]
fn primary_cut_off_from_everyone_cannot_commit_and_rejoins_as_a_backup() {
    cut_off_primary(true);
}

/// The README's recipe for three machines, from flags, on three hosts of their own
/// (network namespaces with their own addresses): `cluster init --nodes ... --out DIR`
/// on one machine, then on host N `understudy node --id N --peers ... --certs DIR/certs
/// --listen 0.0.0.0:PORT --admin-token-file DIR/admin-token`. The hosts form one
/// cluster, `understudy status` from the client machine lists them, the bank deploys
/// with the token written and is served through every host, and when the bank's
/// primary's host dies, the others serve it on.
#[test]
fn the_readmes_three_machine_recipe_forms_a_cluster_across_hosts() {
    let Some(net) = Net::new(3) else {
        return skip("the three-machine recipe in network namespaces");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let peers: Vec<String> = (0..3)
        .map(|i| format!("{}@{}:7301", i + 1, net.addr(i)))
        .collect();
    let peers = peers.join(",");
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(["cluster", "init", "--nodes", &peers, "--out"])
        .arg(dir.path())
        .output()
        .expect("run cluster init");
    assert!(
        init.status.success(),
        "cluster init failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let (certs, token_file) = (dir.path().join("certs"), dir.path().join("admin-token"));
    let token = std::fs::read_to_string(&token_file).expect("cluster init wrote a token");
    let token = token.trim();
    let mut nodes: Vec<NodeProcess> = (0..3)
        .map(|i| {
            NodeProcess::start_with(NodeOptions {
                netns: Some((net.ns(i).to_owned(), net.addr(i))),
                extra_args: vec![
                    "--id".into(),
                    (i + 1).to_string(),
                    "--peers".into(),
                    peers.clone(),
                    "--certs".into(),
                    certs.display().to_string(),
                    "--admin-token-file".into(),
                    token_file.display().to_string(),
                ],
                ..NodeOptions::default()
            })
        })
        .collect();
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let status = |i: usize| {
        std::process::Command::new(env!("CARGO_BIN_EXE_understudy"))
            .args([
                "status",
                "--node",
                &format!("http://{}:{}", net.addr(i), crate::support::NETNS_PORT),
            ])
            .output()
            .expect("run understudy status")
    };
    let listed = status(0);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "status failed: {text}");
    for i in 0..3 {
        assert!(
            text.contains(&net.addr(i).to_string()),
            "status lists host {i} ({}): {text}",
            net.addr(i)
        );
    }
    // The configs' token guards the admin routes.
    nodes[0]
        .api()
        .put_bytes("/v1/functions/bank?replicas=2", component("bank"))
        .expect_error(401, "unauthorized");
    nodes[0]
        .api()
        .with_token(token)
        .put_bytes("/v1/functions/bank?replicas=2", component("bank"))
        .expect_status(201);
    open_accounts(nodes[1].api());
    for node in &nodes {
        let total = node.api().ok("bank", "total", Value::Null);
        assert_eq!(
            total["total"].as_u64(),
            Some(ACCOUNTS.len() as u64 * INITIAL as u64),
            "{total}"
        );
    }
    let primary = crate::cluster_distributed::primary_of(&nodes[0], "bank").expect("a primary");
    let p = (primary - 1) as usize;
    nodes[p].kill9();
    net.set_link(p, false);
    let survivor = (0..3).find(|i| *i != p).expect("a survivor");
    wait_for(
        "the bank served again after its primary's host died",
        || {
            let reply = nodes[survivor].api().invoke("bank", "total", &Value::Null);
            reply.status == 200
        },
    );
    let after = status(survivor);
    let text = String::from_utf8_lossy(&after.stdout);
    assert!(after.status.success(), "status failed: {text}");
    println!("{text}");
}
