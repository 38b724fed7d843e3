//! Managing functions over HTTP: list, describe, upgrade, stop and start, delete, and
//! the admin token that guards them.

use serde_json::{json, Value};

use crate::support::{component, NodeOptions, NodeProcess};

#[test]
fn upgrade_keeps_state_and_delete_removes_it() {
    let node = NodeProcess::start();
    let api = node.api();
    let created = api.deploy_component("c", "counter").body;
    assert_eq!(created["name"], "c");
    assert_eq!(created["version"], 1);
    api.ok("c", "increment", json!({ "by": 41 }));

    // Redeploying is an upgrade: 200, a new version, the same state.
    let upgraded = api
        .deploy("c", component("counter"))
        .expect_status(200)
        .body;
    assert_eq!(upgraded["version"], 2);
    assert_eq!(
        api.ok("c", "increment", Value::Null),
        json!({ "value": 42 })
    );

    let listed = api
        .get("/v1/functions")
        .expect("list")
        .expect_status(200)
        .body;
    let names: Vec<&str> = listed["functions"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["c"]);

    api.delete("c").expect_status(204);
    api.describe("c").expect_error(404, "unknown-function");
    api.invoke("c", "get", &Value::Null)
        .expect_error(404, "unknown-function");
    let listed = api
        .get("/v1/functions")
        .expect("list")
        .expect_status(200)
        .body;
    assert_eq!(listed["functions"], json!([]));

    // A function deployed again under the deleted name starts from nothing.
    api.deploy_component("c", "counter");
    assert_eq!(api.ok("c", "get", Value::Null), json!({ "value": 0 }));
}

#[test]
fn stopped_function_answers_503_until_started() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("c", "counter");
    api.ok("c", "increment", Value::Null);

    let stopped = api.admin("c", "stop").expect_status(200).body;
    assert_eq!(stopped["running"], false);
    api.invoke("c", "increment", &Value::Null)
        .expect_error(503, "stopped");
    api.invoke("c", "get", &Value::Null)
        .expect_error(503, "stopped");
    assert_eq!(api.describe("c").expect_status(200).body["running"], false);

    let started = api.admin("c", "start").expect_status(200).body;
    assert_eq!(started["running"], true);
    assert_eq!(
        api.ok("c", "increment", Value::Null),
        json!({ "value": 2 }),
        "a stopped function keeps its state"
    );
    api.admin("nope", "stop")
        .expect_error(404, "unknown-function");
}

#[test]
fn admin_token_is_required_when_set() {
    let node = NodeProcess::start_with(NodeOptions {
        admin_token: Some("s3cret".into()),
        ..Default::default()
    });
    let anonymous = node.api();
    let wrong = anonymous.with_token("guess");
    let admin = anonymous.with_token("s3cret");

    anonymous
        .deploy("c", component("counter"))
        .expect_error(401, "unauthorized");
    wrong
        .deploy("c", component("counter"))
        .expect_error(401, "unauthorized");
    anonymous
        .describe("c")
        .expect_error(404, "unknown-function");
    admin.deploy("c", component("counter")).expect_status(201);

    anonymous
        .admin("c", "stop")
        .expect_error(401, "unauthorized");
    anonymous
        .admin("c", "start")
        .expect_error(401, "unauthorized");
    anonymous.delete("c").expect_error(401, "unauthorized");
    assert_eq!(
        anonymous.describe("c").expect_status(200).body["running"],
        true
    );

    // Invoking and reading need no token.
    assert_eq!(
        anonymous.ok("c", "increment", Value::Null),
        json!({ "value": 1 })
    );
    anonymous
        .get("/v1/functions")
        .expect("list")
        .expect_status(200);

    admin.admin("c", "stop").expect_status(200);
    admin.admin("c", "start").expect_status(200);
    admin.delete("c").expect_status(204);
}

#[test]
fn admin_changes_survive_restart() {
    let mut node = NodeProcess::start();
    let api = node.api().clone();
    api.deploy_component("upgraded", "counter");
    api.ok("upgraded", "increment", json!({ "by": 3 }));
    api.deploy("upgraded", component("counter"))
        .expect_status(200);
    api.deploy_component("stopped", "counter");
    api.admin("stopped", "stop").expect_status(200);
    api.deploy_component("deleted", "counter");
    api.ok("deleted", "increment", Value::Null);
    api.delete("deleted").expect_status(204);

    node.kill9();
    node.restart();
    let api = node.api();
    let upgraded = api.describe("upgraded").expect_status(200).body;
    assert_eq!(
        (upgraded["version"].clone(), upgraded["running"].clone()),
        (json!(2), json!(true)),
        "{upgraded}"
    );
    assert_eq!(
        api.ok("upgraded", "get", Value::Null),
        json!({ "value": 3 })
    );
    api.invoke("stopped", "get", &Value::Null)
        .expect_error(503, "stopped");
    api.describe("deleted")
        .expect_error(404, "unknown-function");
    api.invoke("deleted", "get", &Value::Null)
        .expect_error(404, "unknown-function");
}

#[test]
fn redeployed_name_starts_empty_after_restart() {
    let mut node = NodeProcess::start();
    let api = node.api().clone();
    api.deploy_component("c", "counter");
    api.ok("c", "increment", json!({ "by": 5 }));
    api.delete("c").expect_status(204);
    api.deploy_component("c", "counter");
    api.ok("c", "increment", Value::Null);

    node.kill9();
    node.restart();
    assert_eq!(
        node.api().ok("c", "get", Value::Null),
        json!({ "value": 1 }),
        "the deleted function's state came back"
    );
    assert_eq!(
        node.api().describe("c").expect_status(200).body["version"],
        1
    );
}

#[test]
fn failed_upgrade_keeps_the_running_version() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("c", "counter");
    api.ok("c", "increment", Value::Null);
    let before = api.describe("c").expect_status(200).body;

    api.deploy("c", b"\0asm\x01\0\0\0".to_vec())
        .expect_error(400, "invalid-component");
    let after = api.describe("c").expect_status(200).body;
    assert_eq!(
        (after["version"].clone(), after["digest"].clone()),
        (before["version"].clone(), before["digest"].clone())
    );
    assert_eq!(api.ok("c", "increment", Value::Null), json!({ "value": 2 }));
}
