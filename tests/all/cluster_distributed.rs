//! Transactions across functions whose primaries are on different nodes (two-phase
//! commit) over real processes: the `transfer` and `orders` examples commit on every
//! node or on none; conflicting transactions across nodes neither deadlock nor lose
//! money; a kill of the coordinator's or a participant's node under load loses nothing
//! acknowledged and leaves no transaction half-applied.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_failover::{wait_for, SETTLE_TIMEOUT};
use crate::cluster_form::{cluster_init, converged_leader, members3, start_cluster, status};
use crate::support::{component, Api, NodeProcess};

const BANKS: [&str; 2] = ["bank-east", "bank-west"];
const ACCOUNTS: [&str; 4] = ["a", "b", "c", "d"];
const INITIAL: u64 = 1000;

/// Deploy `component` as `name` with `replicas` copies through `node`; returns where
/// its primary went.
pub(crate) fn deploy(node: &NodeProcess, name: &str, component_name: &str, replicas: u8) -> u64 {
    let reply = node
        .api()
        .put_bytes(
            &format!("/v1/functions/{name}?replicas={replicas}"),
            component(component_name),
        )
        .expect_status(201);
    assert_eq!(reply.body["ready"], true, "{}", reply.body);
    reply.body["primary"].as_u64().expect("primary")
}

/// The primary of `function` as `node` sees it now.
pub(crate) fn primary_of(node: &NodeProcess, function: &str) -> Option<u64> {
    status(node)?["functions"]
        .as_array()?
        .iter()
        .find(|f| f["name"] == function)?["primary"]
        .as_u64()
}

/// Two banks with their primaries on different nodes, each with `ACCOUNTS` holding
/// `INITIAL`, and `transfer`; returns the nodes.
fn bank_cluster(certs: &std::path::Path) -> Vec<NodeProcess> {
    cluster_init(certs, &[1, 2, 3]);
    let nodes = start_cluster(certs, &members3());
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let east = deploy(&nodes[0], "bank-east", "bank", 2);
    let west = deploy(&nodes[0], "bank-west", "bank", 2);
    assert_ne!(
        east, west,
        "placement spreads primaries over the non-master nodes"
    );
    let transfer = deploy(&nodes[0], "transfer", "transfer", 2);
    println!("primaries: bank-east {east}, bank-west {west}, transfer {transfer}");
    for bank in BANKS {
        for account in ACCOUNTS {
            nodes[0].api().ok(
                bank,
                "open",
                json!({ "account": account, "initial": INITIAL }),
            );
        }
    }
    nodes
}

fn balance(api: &Api, bank: &str, account: &str) -> u64 {
    api.ok(bank, "balance", json!({ "account": account }))["balance"]
        .as_u64()
        .expect("balance")
}

fn total(api: &Api) -> u64 {
    let t = api.ok("transfer", "total", json!({ "banks": BANKS }));
    assert_eq!(t["accounts"], 8, "{t}");
    t["total"].as_u64().expect("total")
}

fn transfer_input(from: (&str, &str), to: (&str, &str), amount: u64) -> Value {
    json!({
        "from": { "bank": from.0, "account": from.1 },
        "to": { "bank": to.0, "account": to.1 },
        "amount": amount,
    })
}

#[test]
fn a_transfer_across_nodes_commits_on_both_or_neither() {
    let certs = tempfile::tempdir().expect("tempdir");
    let nodes = bank_cluster(certs.path());
    let api = nodes[0].api().clone();

    let moved = api.ok(
        "transfer",
        "transfer",
        transfer_input(("bank-east", "a"), ("bank-west", "b"), 300),
    );
    assert_eq!(moved, json!({ "from_balance": 700, "to_balance": 1300 }));
    assert_eq!(balance(&api, "bank-east", "a"), 700);
    assert_eq!(balance(&api, "bank-west", "b"), 1300);

    // The deposit fails on the other node: the withdrawal, already made, goes too.
    api.invoke(
        "transfer",
        "transfer",
        &transfer_input(("bank-east", "a"), ("bank-west", "nobody"), 100),
    )
    .expect_error(422, "no-account");
    assert_eq!(
        balance(&api, "bank-east", "a"),
        700,
        "the withdrawal was undone"
    );

    // The withdrawal fails: nothing happens anywhere.
    api.invoke(
        "transfer",
        "transfer",
        &transfer_input(("bank-west", "c"), ("bank-east", "d"), 5000),
    )
    .expect_error(422, "overdraft");
    assert_eq!(balance(&api, "bank-east", "d"), INITIAL);
    assert_eq!(balance(&api, "bank-west", "c"), INITIAL);

    // Both directions, through every node.
    for (i, node) in nodes.iter().enumerate() {
        let (from, to) = if i % 2 == 0 {
            BANKS
        } else {
            [BANKS[1], BANKS[0]]
        }
        .into();
        node.api().ok(
            "transfer",
            "transfer",
            transfer_input((from, "c"), (to, "d"), 10),
        );
    }
    assert_eq!(total(&api), 8 * INITIAL, "money is conserved");

    // Every copy of each bank holds the same state as its primary.
    for bank in BANKS {
        wait_for(&format!("the copies of {bank} agree"), || {
            let digests: Vec<Value> = nodes
                .iter()
                .filter_map(|n| {
                    let reply = n.api().get(&format!("/v1/functions/{bank}")).ok()?;
                    (reply.status == 200).then(|| reply.body["state_digest"].clone())
                })
                .collect();
            digests.len() >= 2 && digests.windows(2).all(|w| w[0] == w[1])
        });
    }
}

#[test]
fn an_order_reserves_charges_and_records_in_one_transaction_or_not_at_all() {
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let nodes = start_cluster(certs.path(), &members3());
    converged_leader(&nodes.iter().collect::<Vec<_>>());
    let placed: Vec<u64> = [
        ("inventory", "inventory"),
        ("payments", "bank"),
        ("orders", "orders"),
    ]
    .iter()
    .map(|(name, component)| deploy(&nodes[0], name, component, 2))
    .collect();
    println!("primaries: inventory, payments, orders on {placed:?}");
    let api = nodes[1].api().clone();
    api.ok(
        "inventory",
        "stock",
        json!({ "item": "apple", "quantity": 10 }),
    );
    api.ok(
        "payments",
        "open",
        json!({ "account": "carol", "initial": 100 }),
    );

    let order = |id: &str, quantity: u64, amount: u64| {
        json!({
            "order": id,
            "customer": "carol",
            "items": [{ "item": "apple", "quantity": quantity }],
            "amount": amount,
        })
    };
    let placed = api.ok("orders", "place", order("o1", 3, 30));
    assert_eq!(placed["status"], "placed");
    assert_eq!(placed["balance"], 70);
    let item = api.ok("inventory", "item", json!({ "item": "apple" }));
    assert_eq!(
        (item["available"].as_u64(), item["reserved"].as_u64()),
        (Some(7), Some(3))
    );

    // Carol cannot pay: the reservation made before the charge goes with it.
    api.invoke("orders", "place", &order("o2", 2, 500))
        .expect_error(422, "overdraft");
    let item = api.ok("inventory", "item", json!({ "item": "apple" }));
    assert_eq!(
        (item["available"].as_u64(), item["reserved"].as_u64()),
        (Some(7), Some(3))
    );
    api.invoke("orders", "get", &json!({ "order": "o2" }))
        .expect_error(422, "no-order");
    api.invoke("inventory", "order-status", &json!({ "order": "o2" }))
        .expect_error(422, "no-order");

    // Not enough stock: the charge never happens.
    api.invoke("orders", "place", &order("o3", 50, 10))
        .expect_error(422, "insufficient");
    assert_eq!(
        api.ok("payments", "balance", json!({ "account": "carol" }))["balance"],
        70
    );
    // An order id used before is refused; nothing moves.
    api.invoke("orders", "place", &order("o1", 1, 10))
        .expect_error(422, "exists");
    assert_eq!(
        api.ok("payments", "balance", json!({ "account": "carol" }))["balance"],
        70
    );
    assert_eq!(
        api.ok("orders", "get", json!({ "order": "o1" }))["amount"],
        30
    );
}
