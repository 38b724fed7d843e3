//! A request with an `Idempotency-Key` runs at most once: a repeat gets the remembered
//! answer, marked `idempotent-replayed: true`, and the handler does not run again.

use std::sync::{Arc, Barrier};
use std::thread;

use serde_json::{json, Value};

use crate::support::{NodeOptions, NodeProcess};

#[test]
fn idempotent_retry_returns_the_stored_answer_without_running_again() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("c", "counter");

    let first = api
        .invoke_keyed("c", "increment", &Value::Null, "key-1")
        .expect_status(200);
    assert_eq!(first.body, json!({ "value": 1 }));
    assert!(!first.replayed());
    assert!(
        first.header("understudy-txn").is_some(),
        "{:?}",
        first.headers
    );

    let retry = api
        .invoke_keyed("c", "increment", &Value::Null, "key-1")
        .expect_status(200);
    assert_eq!(retry.body, json!({ "value": 1 }));
    assert!(
        retry.replayed(),
        "a repeat is marked as replayed: {:?}",
        retry.headers
    );
    assert_eq!(
        api.ok("c", "get", Value::Null),
        json!({ "value": 1 }),
        "the retry ran the handler again"
    );

    // Another key is another request.
    assert_eq!(
        api.invoke_keyed("c", "increment", &Value::Null, "key-2")
            .expect_status(200)
            .body,
        json!({ "value": 2 })
    );
    assert_eq!(api.ok("c", "get", Value::Null), json!({ "value": 2 }));
}

#[test]
fn function_error_answer_is_remembered_for_its_key() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("bank", "bank");
    api.ok("bank", "open", json!({ "account": "a", "initial": 10 }));

    let withdraw = json!({ "account": "a", "amount": 50 });
    let first = api
        .invoke_keyed("bank", "withdraw", &withdraw, "w-1")
        .expect_error(422, "overdraft");
    assert!(!first.replayed());
    // The withdrawal could succeed now; the key's answer is still the first one.
    api.ok("bank", "deposit", json!({ "account": "a", "amount": 100 }));
    let retry = api
        .invoke_keyed("bank", "withdraw", &withdraw, "w-1")
        .expect_error(422, "overdraft");
    assert!(retry.replayed(), "{:?}", retry.headers);
    assert_eq!(retry.body, first.body);
    assert_eq!(
        api.ok("bank", "balance", json!({ "account": "a" }))["balance"],
        110
    );
}

#[test]
fn concurrent_duplicates_run_once() {
    const CLIENTS: usize = 8;
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("c", "counter");

    let barrier = Arc::new(Barrier::new(CLIENTS));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let api = api.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                api.invoke_keyed("c", "increment", &json!({ "by": 7 }), "same-key")
                    .expect_status(200)
            })
        })
        .collect();
    let replies: Vec<_> = workers
        .into_iter()
        .map(|w| w.join().expect("a client thread failed"))
        .collect();

    for reply in &replies {
        assert_eq!(reply.body, json!({ "value": 7 }));
    }
    let fresh = replies.iter().filter(|r| !r.replayed()).count();
    assert_eq!(fresh, 1, "exactly one answer is fresh, the others replayed");
    assert_eq!(api.ok("c", "get", Value::Null), json!({ "value": 7 }));
}

#[test]
fn idempotent_answer_survives_a_crash() {
    let mut node = NodeProcess::start();
    node.api().deploy_component("c", "counter");
    node.api()
        .invoke_keyed("c", "increment", &Value::Null, "before-crash")
        .expect_status(200);
    node.api()
        .invoke_keyed("c", "increment", &Value::Null, "other")
        .expect_status(200);

    node.kill9();
    node.restart();
    let api = node.api();
    let retry = api
        .invoke_keyed("c", "increment", &Value::Null, "before-crash")
        .expect_status(200);
    assert!(retry.replayed(), "{:?}", retry.headers);
    assert_eq!(retry.body, json!({ "value": 1 }));
    assert_eq!(api.ok("c", "get", Value::Null), json!({ "value": 2 }));
}

#[test]
fn bad_idempotency_key_is_rejected() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("c", "counter");
    let long = "k".repeat(257);
    api.invoke_keyed("c", "increment", &Value::Null, &long)
        .expect_error(400, "bad-idempotency-key");
    api.invoke_keyed("c", "increment", &Value::Null, "has space")
        .expect_error(400, "bad-idempotency-key");
    assert_eq!(api.ok("c", "get", Value::Null), json!({ "value": 0 }));
}

/// A key reused for another request (another method or body) is refused with 422
/// `idempotency-key-reused`, as payment APIs do: answering with the first request's
/// answer would tell the client that its request ran. The same request with the key is
/// still replayed, nothing runs twice, and the check survives a crash (what the key
/// was used for is in the log with the answer).
#[test]
fn a_key_reused_for_another_request_is_refused() {
    let mut node = NodeProcess::start();
    node.api().deploy_component("c", "counter");
    let first = node
        .api()
        .invoke_keyed("c", "increment", &json!({ "by": 1 }), "k")
        .expect_status(200);
    assert_eq!(first.body, json!({ "value": 1 }));
    let check = |api: &crate::support::Api| {
        let other_body = api
            .invoke_keyed("c", "increment", &json!({ "by": 1000 }), "k")
            .expect_error(422, "idempotency-key-reused");
        let message = other_body.body["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("\"k\""),
            "the error names the key: {message}"
        );
        api.invoke_keyed("c", "get", &Value::Null, "k")
            .expect_error(422, "idempotency-key-reused");
        let same = api
            .invoke_keyed("c", "increment", &json!({ "by": 1 }), "k")
            .expect_status(200);
        assert!(same.replayed(), "{:?}", same.headers);
        assert_eq!(same.body, json!({ "value": 1 }));
        assert_eq!(api.ok("c", "get", Value::Null), json!({ "value": 1 }));
    };
    check(node.api());
    node.kill9();
    node.restart();
    check(node.api());
}

/// `idempotency_keys_max`: a function remembers at most that many answers, forgetting
/// the oldest first; a retry of a forgotten key runs again, a retry of a kept one is
/// replayed, and a restart (the log replayed) forgets the same ones.
#[test]
fn answers_beyond_the_cap_are_forgotten_oldest_first_and_stay_forgotten_after_a_restart() {
    let mut node = NodeProcess::start_with(NodeOptions {
        config_toml: Some("idempotency_keys_max = 3\n".into()),
        ..NodeOptions::default()
    });
    node.api().deploy_component("c", "counter");
    for key in ["k1", "k2", "k3", "k4", "k5"] {
        node.api()
            .invoke_keyed("c", "increment", &Value::Null, key)
            .expect_status(200);
    }
    let info = node.api().describe("c").expect_status(200).body;
    assert_eq!(info["idempotency_keys"], json!(3), "{info}");
    assert_eq!(info["idempotency_keys_forgotten"], json!(2), "{info}");

    node.kill9();
    node.restart();
    let api = node.api();
    for (key, value) in [("k3", 3), ("k4", 4), ("k5", 5)] {
        let retry = api
            .invoke_keyed("c", "increment", &Value::Null, key)
            .expect_status(200);
        assert!(retry.replayed(), "{key} is kept: {:?}", retry.headers);
        assert_eq!(retry.body, json!({ "value": value }));
    }
    let again = api
        .invoke_keyed("c", "increment", &Value::Null, "k1")
        .expect_status(200);
    assert!(
        !again.replayed(),
        "k1 was the oldest, forgotten: it runs again"
    );
    assert_eq!(again.body, json!({ "value": 6 }));
    assert_eq!(api.ok("c", "get", Value::Null), json!({ "value": 6 }));
}
