//! Every example under `examples/` deployed to a node and exercised over HTTP, including
//! the failures that must abort as a whole.

use serde_json::{json, Value};

use crate::support::{Api, NodeProcess};

fn total(api: &Api) -> Value {
    api.ok("bank", "total", Value::Null)
}

fn balance(api: &Api, account: &str) -> u64 {
    api.ok("bank", "balance", json!({ "account": account }))["balance"]
        .as_u64()
        .expect("balance is a number")
}

fn item(api: &Api, item: &str) -> Value {
    api.ok("inventory", "item", json!({ "item": item }))
}

#[test]
fn counter_increments_and_reads_back() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("counter", "counter");

    assert_eq!(api.ok("counter", "get", Value::Null), json!({ "value": 0 }));
    assert_eq!(
        api.ok("counter", "increment", Value::Null),
        json!({ "value": 1 })
    );
    assert_eq!(
        api.ok("counter", "increment", json!({})),
        json!({ "value": 2 })
    );
    assert_eq!(
        api.ok("counter", "increment", json!({ "by": 5 })),
        json!({ "value": 7 })
    );
    // An empty body is `null`.
    let reply = api
        .invoke_raw("counter", "increment", Vec::new(), None)
        .expect("invoke")
        .expect_status(200);
    assert_eq!(reply.body, json!({ "value": 8 }));
    assert!(
        reply.header("understudy-txn").is_some(),
        "a fresh answer names its transaction"
    );
    // The unambiguous route runs the same method.
    let reply = api
        .invoke("counter", "invoke/get", &Value::Null)
        .expect_status(200);
    assert_eq!(reply.body, json!({ "value": 8 }));

    let info = api.describe("counter").expect_status(200).body;
    assert_eq!(info["keys"], json!(1), "{info}");
    assert_eq!(info["version"], json!(1), "{info}");
    assert_eq!(info["running"], json!(true), "{info}");
}

#[test]
fn bank_overdraft_aborts_leaving_balances_unchanged() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("bank", "bank");
    assert_eq!(
        api.ok(
            "bank",
            "open",
            json!({ "account": "alice", "initial": 100 })
        ),
        json!({ "account": "alice", "balance": 100 })
    );
    api.ok("bank", "open", json!({ "account": "bob", "initial": 20 }));
    let state_before = api.describe("bank").expect_status(200).body["state_digest"].clone();

    let reply = api.invoke(
        "bank",
        "transfer",
        &json!({ "from": "bob", "to": "alice", "amount": 50 }),
    );
    reply.expect_error(422, "overdraft");
    let reply = api.invoke(
        "bank",
        "withdraw",
        &json!({ "account": "alice", "amount": 101 }),
    );
    reply.expect_error(422, "overdraft");

    assert_eq!(balance(api, "alice"), 100);
    assert_eq!(balance(api, "bob"), 20);
    let state_after = api.describe("bank").expect_status(200).body["state_digest"].clone();
    assert_eq!(
        state_before, state_after,
        "a failed transfer changed the function's state"
    );
}

#[test]
fn bank_total_is_conserved_by_transfers() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("bank", "bank");
    api.ok(
        "bank",
        "open",
        json!({ "account": "alice", "initial": 100 }),
    );
    api.ok("bank", "open", json!({ "account": "bob" }));
    api.invoke("bank", "open", &json!({ "account": "bob", "initial": 5 }))
        .expect_error(422, "exists");

    assert_eq!(
        api.ok(
            "bank",
            "transfer",
            json!({ "from": "alice", "to": "bob", "amount": 30 })
        ),
        json!({ "from_balance": 70, "to_balance": 30 })
    );
    api.ok(
        "bank",
        "transfer",
        json!({ "from": "bob", "to": "alice", "amount": 10 }),
    );
    assert_eq!(total(api), json!({ "total": 100, "accounts": 2 }));

    assert_eq!(
        api.ok("bank", "deposit", json!({ "account": "bob", "amount": 7 })),
        json!({ "account": "bob", "balance": 27 })
    );
    assert_eq!(
        api.ok(
            "bank",
            "withdraw",
            json!({ "account": "alice", "amount": 2 })
        ),
        json!({ "account": "alice", "balance": 78 })
    );
    assert_eq!(total(api), json!({ "total": 105, "accounts": 2 }));
    api.invoke(
        "bank",
        "deposit",
        &json!({ "account": "carol", "amount": 1 }),
    )
    .expect_error(422, "no-account");
    assert_eq!(total(api), json!({ "total": 105, "accounts": 2 }));
}

#[test]
fn inventory_failed_order_reserves_nothing() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("inventory", "inventory");
    assert_eq!(
        api.ok(
            "inventory",
            "stock",
            json!({ "item": "apple", "quantity": 10 })
        ),
        json!({ "item": "apple", "available": 10, "reserved": 0 })
    );
    api.ok(
        "inventory",
        "stock",
        json!({ "item": "pear", "quantity": 1 }),
    );

    // The first line reserves, the second cannot: the whole order must vanish.
    let order = json!({ "order": "o1", "items": [
        { "item": "apple", "quantity": 3 },
        { "item": "pear", "quantity": 2 },
    ] });
    let reply = api
        .invoke("inventory", "order", &order)
        .expect_error(422, "insufficient");
    assert!(
        reply.message().contains("pear"),
        "the message names the item: {}",
        reply.text
    );
    let order = json!({ "order": "o2", "items": [
        { "item": "apple", "quantity": 3 },
        { "item": "plum", "quantity": 1 },
    ] });
    api.invoke("inventory", "order", &order)
        .expect_error(422, "no-item");

    assert_eq!(
        item(api, "apple"),
        json!({ "item": "apple", "available": 10, "reserved": 0 })
    );
    assert_eq!(
        item(api, "pear"),
        json!({ "item": "pear", "available": 1, "reserved": 0 })
    );
    api.invoke("inventory", "order-status", &json!({ "order": "o1" }))
        .expect_error(422, "no-order");
    api.invoke("inventory", "order-status", &json!({ "order": "o2" }))
        .expect_error(422, "no-order");
}

#[test]
fn inventory_cancel_releases_the_reservation() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("inventory", "inventory");
    api.ok(
        "inventory",
        "stock",
        json!({ "item": "apple", "quantity": 10 }),
    );
    api.ok(
        "inventory",
        "stock",
        json!({ "item": "pear", "quantity": 4 }),
    );

    let order = json!({ "order": "o1", "items": [
        { "item": "apple", "quantity": 2 },
        { "item": "pear", "quantity": 4 },
        { "item": "apple", "quantity": 1 },
    ] });
    let placed = api.ok("inventory", "order", order.clone());
    assert_eq!(placed["order"], "o1");
    assert_eq!(placed["status"], "placed");
    assert_eq!(
        item(api, "apple"),
        json!({ "item": "apple", "available": 7, "reserved": 3 })
    );
    assert_eq!(
        item(api, "pear"),
        json!({ "item": "pear", "available": 0, "reserved": 4 })
    );
    assert_eq!(
        api.ok("inventory", "order-status", json!({ "order": "o1" }))["status"],
        "placed"
    );
    api.invoke("inventory", "order", &order)
        .expect_error(422, "exists");

    assert_eq!(
        api.ok("inventory", "cancel", json!({ "order": "o1" })),
        json!({ "order": "o1", "status": "cancelled" })
    );
    assert_eq!(
        item(api, "apple"),
        json!({ "item": "apple", "available": 10, "reserved": 0 })
    );
    assert_eq!(
        item(api, "pear"),
        json!({ "item": "pear", "available": 4, "reserved": 0 })
    );
    assert_eq!(
        api.ok("inventory", "order-status", json!({ "order": "o1" }))["status"],
        "cancelled"
    );
    api.invoke("inventory", "cancel", &json!({ "order": "o1" }))
        .expect_error(422, "not-placed");
    api.invoke("inventory", "cancel", &json!({ "order": "nope" }))
        .expect_error(422, "no-order");
    api.invoke("inventory", "order", &json!({ "order": "o3", "items": [] }))
        .expect_error(400, "bad-input");
}
