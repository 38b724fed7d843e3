//! A transaction that does not commit leaves nothing behind, whatever ended it (its own
//! error, its caller's error, a trap), and harms no other transaction.

use std::thread;

use serde_json::{json, Value};

use crate::support::NodeProcess;

fn stored(api: &crate::support::Api, key: &str) -> Value {
    api.ok("h", "get", json!({ "key": key }))["value"].clone()
}

#[test]
fn aborted_transaction_leaves_no_trace() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");
    api.ok("h", "put", json!({ "key": "kept", "value": "old" }));
    let digest_before = api.describe("h").expect_status(200).body["state_digest"].clone();

    let reply = api
        .invoke(
            "h",
            "put-then-fail",
            &json!({ "key": "gone", "value": "v" }),
        )
        .expect_error(422, "deliberate");
    assert!(
        reply.header("understudy-txn").is_some(),
        "{:?}",
        reply.headers
    );
    api.invoke(
        "h",
        "put-then-fail",
        &json!({ "key": "kept", "value": "new" }),
    )
    .expect_error(422, "deliberate");

    assert_eq!(stored(api, "gone"), Value::Null);
    assert_eq!(stored(api, "kept"), json!("old"));
    let info = api.describe("h").expect_status(200).body;
    assert_eq!(info["keys"], 1, "{info}");
    assert_eq!(
        info["state_digest"], digest_before,
        "an aborted transaction changed the state digest"
    );
}

#[test]
fn callee_writes_vanish_when_the_caller_fails() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");
    api.deploy_component("counter", "counter");
    api.ok("counter", "increment", json!({ "by": 10 }));

    let call = json!({ "function": "counter", "method": "increment", "input": { "by": 5 } });
    let reply = api
        .invoke("h", "call-then-fail", &call)
        .expect_error(422, "deliberate");
    assert!(
        reply.message().contains("15"),
        "the callee ran and saw its own write: {}",
        reply.text
    );

    assert_eq!(
        api.ok("counter", "get", Value::Null),
        json!({ "value": 10 })
    );
}

#[test]
fn callee_writes_commit_with_the_caller() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");
    api.deploy_component("counter", "counter");

    let call = json!({ "function": "counter", "method": "increment", "input": { "by": 3 } });
    assert_eq!(api.ok("h", "call", call), json!({ "value": 3 }));
    assert_eq!(api.ok("counter", "get", Value::Null), json!({ "value": 3 }));
    // A callee's own error is the caller's error here (`call` passes it on): nothing commits.
    let call = json!({ "function": "counter", "method": "increment", "input": { "by": "x" } });
    api.invoke("h", "call", &call)
        .expect_error(400, "bad-input");
    assert_eq!(api.ok("counter", "get", Value::Null), json!({ "value": 3 }));
}

#[test]
fn trap_aborts_only_its_own_transaction() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");
    api.deploy_component("counter", "counter");

    let reply = api
        .invoke("h", "put-then-trap", &json!({ "key": "k", "value": "v" }))
        .expect_error(500, "trap");
    assert!(
        !reply.message().is_empty(),
        "a trap says why: {}",
        reply.text
    );
    assert_eq!(stored(api, "k"), Value::Null);

    // Traps on one function, running alongside increments on another and puts on the
    // same one: only the traps fail.
    const ROUNDS: usize = 20;
    let trapper = {
        let api = api.clone();
        thread::spawn(move || {
            for i in 0..ROUNDS {
                let key = format!("t{i}");
                api.invoke("h", "put-then-trap", &json!({ "key": key, "value": "v" }))
                    .expect_error(500, "trap");
                api.invoke("h", "trap", &Value::Null)
                    .expect_error(500, "trap");
            }
        })
    };
    let incrementer = {
        let api = api.clone();
        thread::spawn(move || {
            for _ in 0..ROUNDS {
                api.ok("counter", "increment", Value::Null);
            }
        })
    };
    let putter = {
        let api = api.clone();
        thread::spawn(move || {
            for i in 0..ROUNDS {
                api.ok("h", "put", json!({ "key": format!("p{i}"), "value": "v" }));
            }
        })
    };
    for worker in [trapper, incrementer, putter] {
        worker.join().expect("a worker thread failed");
    }

    assert_eq!(
        api.ok("counter", "get", Value::Null),
        json!({ "value": ROUNDS })
    );
    let info = api.describe("h").expect_status(200).body;
    assert_eq!(info["keys"], ROUNDS, "only the puts left keys: {info}");
    assert_eq!(stored(api, "t0"), Value::Null);
    assert_eq!(stored(api, &format!("p{}", ROUNDS - 1)), json!("v"));
}

#[test]
fn crossing_calls_do_not_deadlock() {
    // Two functions calling each other at the same time take their locks in opposite
    // orders; the younger transaction must die and retry, never wait forever.
    const ROUNDS: usize = 40;
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("left", "hostile");
    api.deploy_component("right", "hostile");
    let workers: Vec<_> = [("left", "right"), ("right", "left")]
        .into_iter()
        .map(|(caller, callee)| {
            let api = api.clone();
            thread::spawn(move || {
                for i in 0..ROUNDS {
                    let put = json!({ "key": format!("from-{caller}-{i}"), "value": "v" });
                    let call = json!({ "function": callee, "method": "put", "input": put });
                    api.invoke(caller, "call", &call).expect_status(200);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a client thread failed");
    }
    for (function, caller) in [("right", "left"), ("left", "right")] {
        let info = api.describe(function).expect_status(200).body;
        assert_eq!(info["keys"], ROUNDS, "{info}");
        let got = api.ok(
            function,
            "get",
            json!({ "key": format!("from-{caller}-{}", ROUNDS - 1) }),
        );
        assert_eq!(got, json!({ "value": "v" }));
    }
}
