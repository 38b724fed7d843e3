//! What the host gives a guest besides its state: calls to other functions (bounded in
//! depth) and a log that ends up in the node's log.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{wait_until, NodeProcess};

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
