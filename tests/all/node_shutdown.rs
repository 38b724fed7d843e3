//! A node stopped with SIGTERM finishes cleanly: it exits with success, and everything
//! it acknowledged is there when it starts again, even with `--durability memory`
//! (which acknowledges before the log is written).

use serde_json::{json, Value};

use crate::support::{NodeOptions, NodeProcess};

#[test]
fn graceful_stop_keeps_every_acknowledged_commit_with_memory_durability() {
    const INCREMENTS: u64 = 200;
    let mut node = NodeProcess::start_with(NodeOptions {
        durability: Some("memory"),
        ..Default::default()
    });
    let api = node.api().clone();
    api.deploy_component("c", "counter");
    for _ in 0..INCREMENTS {
        api.ok("c", "increment", Value::Null);
    }

    let status = node.terminate();
    assert!(
        status.success(),
        "SIGTERM ended the node with {status}; its log:\n{}",
        node.log()
    );
    assert!(
        node.log().contains("stopped"),
        "the node did not log its clean stop:\n{}",
        node.log()
    );
    node.restart();
    assert_eq!(
        node.api().ok("c", "get", Value::Null),
        json!({ "value": INCREMENTS })
    );
}
