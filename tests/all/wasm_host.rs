//! What the host gives a guest besides its state: calls to other functions (bounded in
//! depth) and a log that ends up in the node's log.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{component, wait_until, NodeProcess};

/// An input for hostile's `call` that nests `levels` calls of `h` before a `put` of `key`.
fn nested_calls(levels: usize, key: &str) -> Value {
    let mut input =
        json!({ "function": "h", "method": "put", "input": { "key": key, "value": "deep" } });
    for _ in 1..levels {
        input = json!({ "function": "h", "method": "call", "input": input });
    }
    input
}

#[test]
fn call_depth_is_capped_and_the_deep_write_vanishes() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");

    // A few levels of a function calling itself are fine, and commit.
    assert_eq!(api.ok("h", "call", nested_calls(3, "shallow")), json!({}));
    assert_eq!(
        api.ok("h", "get", json!({ "key": "shallow" })),
        json!({ "value": "deep" })
    );

    // Far past the cap (8 by default) the innermost call fails, and so does the whole.
    let reply = api.invoke("h", "call", &nested_calls(20, "too-deep"));
    assert_eq!(
        (reply.status, reply.code()),
        (422, "depth"),
        "{}",
        reply.text
    );
    assert_eq!(
        api.ok("h", "get", json!({ "key": "too-deep" })),
        json!({ "value": null })
    );
}

#[test]
fn guest_log_reaches_the_node_log() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");
    let marker = "guest-log-marker-7f3a";
    assert_eq!(api.ok("h", "log", json!({ "message": marker })), json!({}));
    wait_until(
        "the guest's message in the node's log",
        Duration::from_secs(10),
        || node.log().contains(marker),
    );
}

#[test]
fn guest_log_cannot_forge_lines() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");
    let forged = "before\n2026-01-01T00:00:00Z  WARN understudy::node: forged by a guest";
    assert_eq!(api.ok("h", "log", json!({ "message": forged })), json!({}));
    wait_until(
        "the guest's message in the node's log",
        Duration::from_secs(10),
        || node.log().contains("forged by a guest"),
    );
    let log = node.log();
    assert!(
        log.contains(r"before\n2026-01-01T00:00:00Z"),
        "the newline is not escaped:\n{log}"
    );
    assert!(
        !log.lines()
            .any(|line| line.starts_with("2026-01-01T00:00:00Z")),
        "a guest forged a line of the node's log:\n{log}"
    );
}

#[test]
fn guest_log_volume_is_capped_and_drops_are_counted() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");
    let before = node.log().len();
    // 8 MB of log asked for in one transaction.
    assert_eq!(
        api.ok("h", "log-many", json!({ "count": 2000, "len": 4000 })),
        json!({})
    );
    wait_until(
        "the count of dropped messages in the node's log",
        Duration::from_secs(10),
        || node.log().contains("dropped"),
    );
    let grown = node.log().len() - before;
    assert!(
        grown < 256 << 10,
        "one transaction wrote {grown} bytes to the node's log"
    );
}

/// A function calls only what it was granted at deploy: `transfer` deployed with no
/// grants gets `call-not-granted` from the host (and changes nothing); redeployed with
/// `calls=bank-east,bank-west` (a new version, the grants shown by describe) it moves
/// money between those two, and still may not call a third bank; `*` grants any. A
/// grant naming an invalid function is a 400.
#[test]
fn a_function_calls_only_the_functions_it_was_granted() {
    let node = NodeProcess::start();
    let api = node.api();
    for bank in ["bank-east", "bank-west", "bank-other"] {
        api.deploy_component(bank, "bank");
        api.ok(bank, "open", json!({ "account": "a", "initial": 100 }));
    }
    let move_to = |to: &str| {
        json!({
            "from": { "bank": "bank-east", "account": "a" },
            "to": { "bank": to, "account": "a" },
            "amount": 5
        })
    };
    let deploy = |calls: &str| {
        api.put_bytes(
            &format!("/v1/functions/transfer?calls={calls}"),
            component("transfer"),
        )
    };
    let first = deploy("").expect_status(201);
    assert_eq!(first.body["calls"], json!([]), "{}", first.body);
    let refused = api.invoke("transfer", "transfer", &move_to("bank-west"));
    assert_eq!(refused.code(), "call-not-granted", "{}", refused.text);
    assert!(
        refused.text.contains("--calls"),
        "the error says how to grant it: {}",
        refused.text
    );

    let granted = deploy("bank-west,bank-east").expect_status(200);
    assert_eq!(granted.body["version"], 2, "{}", granted.body);
    assert_eq!(
        api.describe("transfer").body["calls"],
        json!(["bank-east", "bank-west"])
    );
    api.ok("transfer", "transfer", move_to("bank-west"));
    let third = api.invoke("transfer", "transfer", &move_to("bank-other"));
    assert_eq!(third.code(), "call-not-granted", "{}", third.text);
    assert_eq!(
        api.ok("bank-east", "balance", json!({ "account": "a" }))["balance"],
        95,
        "only the granted transfer moved money"
    );

    deploy("*").expect_status(200);
    api.ok("transfer", "transfer", move_to("bank-other"));
    deploy("Not%20A%20Name").expect_error(400, "bad-calls");
}
