//! An invocation runs on its own task: a client that hangs up does not cancel its
//! transaction half-way; it commits or aborts as if the client had stayed.

use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{wait_until, NodeOptions, NodeProcess};

#[test]
fn client_disconnect_does_not_cancel_a_queued_transaction() {
    let node = NodeProcess::start_with(NodeOptions {
        deadline_ms: Some(1500),
        ..Default::default()
    });
    let api = node.api().clone();
    api.deploy_component("h", "hostile");

    // Hold the function's lock with a loop until the deadline.
    let blocker = {
        let api = api.clone();
        thread::spawn(move || {
            api.invoke("h", "loop", &Value::Null)
                .expect_error(504, "deadline")
        })
    };
    thread::sleep(Duration::from_millis(300));

    // A put queued behind it, whose client gives up long before the lock frees.
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let sent = impatient
        .post(api.url("/v1/functions/h/put"))
        .header("content-type", "application/json")
        .body(json!({ "key": "k", "value": "after-hangup" }).to_string())
        .send();
    let error = sent.expect_err("the put was answered while the loop held the lock");
    assert!(
        error.is_timeout(),
        "expected the client to time out: {error}"
    );

    blocker.join().expect("the blocker thread failed");
    wait_until(
        "the abandoned put to commit",
        Duration::from_secs(10),
        || api.ok("h", "get", json!({ "key": "k" })) == json!({ "value": "after-hangup" }),
    );
}
