//! A guest that runs away (forever, or out of memory, or off its stack) is stopped at
//! its limit, its transaction aborts, and the node keeps serving everyone else.

use serde_json::{json, Value};

use crate::support::{NodeOptions, NodeProcess};

fn node_with_limits() -> NodeProcess {
    let node = NodeProcess::start_with(NodeOptions {
        deadline_ms: Some(300),
        memory_max_mib: Some(32),
        ..Default::default()
    });
    node.api().deploy_component("h", "hostile");
    node.api().deploy_component("counter", "counter");
    node
}

/// The node still runs transactions on the misbehaving function and on others.
fn assert_still_serving(node: &NodeProcess) {
    let api = node.api();
    api.ok("h", "put", json!({ "key": "after", "value": "yes" }));
    assert_eq!(
        api.ok("h", "get", json!({ "key": "after" })),
        json!({ "value": "yes" })
    );
    api.ok("counter", "increment", Value::Null);
    api.get("/healthz").expect("healthz").expect_status(200);
}

#[test]
fn infinite_loop_is_stopped_at_the_deadline() {
    let node = node_with_limits();
    let api = node.api();
    let reply = api
        .invoke("h", "loop", &Value::Null)
        .expect_error(504, "deadline");
    assert!(
        reply.message().contains("300 ms"),
        "the message names the deadline: {}",
        reply.text
    );
    // The lock it held is released: the same function runs again at once.
    api.invoke("h", "loop", &Value::Null)
        .expect_error(504, "deadline");
    assert_still_serving(&node);
}

#[test]
fn memory_bomb_hits_the_cap() {
    let node = node_with_limits();
    let api = node.api();
    let reply = api
        .invoke("h", "bomb", &Value::Null)
        .expect_error(500, "resource-cap");
    assert!(reply.message().contains("cap"), "{}", reply.text);
    api.invoke("h", "bomb", &Value::Null)
        .expect_error(500, "resource-cap");
    assert_still_serving(&node);
}

#[test]
fn stack_overflow_traps_and_node_keeps_serving() {
    let node = node_with_limits();
    let api = node.api();
    api.invoke("h", "stack-overflow", &Value::Null)
        .expect_error(500, "trap");
    assert_still_serving(&node);
}

#[test]
fn write_flood_is_capped_and_leaves_no_writes() {
    let node = node_with_limits();
    let api = node.api();
    // `put-many` with a huge count writes until the writes-per-transaction limit (10000)
    // fails it, as an error the guest passes on; on a very slow machine the deadline
    // may come first. Either way none of its writes may stay.
    let reply = api.invoke(
        "h",
        "put-many",
        &json!({ "count": 100_000_000u32, "value_len": 8 }),
    );
    assert!(
        matches!(
            (reply.status, reply.code()),
            (422, "limit") | (504, "deadline")
        ),
        "unexpected answer: {} {}",
        reply.status,
        reply.text
    );
    assert_eq!(api.describe("h").expect_status(200).body["keys"], 0);
    assert_eq!(
        api.ok("h", "scan", json!({ "prefix": "k/", "limit": 10 })),
        json!({ "entries": [] })
    );
    assert_still_serving(&node);
}

#[test]
fn deadline_in_a_callee_releases_both_functions() {
    let node = node_with_limits();
    let api = node.api();
    api.deploy_component("callee", "hostile");
    let call = json!({ "function": "callee", "method": "loop" });
    api.invoke("h", "call", &call).expect_error(504, "deadline");
    // Both locks were released: each function runs again, alone and nested.
    api.ok("callee", "put", json!({ "key": "k", "value": "v" }));
    let call = json!({ "function": "callee", "method": "get", "input": { "key": "k" } });
    assert_eq!(api.ok("h", "call", call), json!({ "value": "v" }));
    assert_still_serving(&node);
}

/// Requests queued behind guests that spin to their deadline wait no longer than their
/// own deadline for the function: the k-th of 8 concurrent ones could get the lock
/// only after (k-1) deadlines, so all but the first two (at most) are refused with 503
/// `overloaded` and `Retry-After` instead of being answered seconds late, and the
/// function serves again right after.
#[test]
fn requests_queued_past_their_deadline_are_refused_as_overloaded() {
    let node = NodeProcess::start_with(NodeOptions {
        deadline_ms: Some(1000),
        ..Default::default()
    });
    node.api().deploy_component("h", "hostile");
    let replies: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| node.api().invoke("h", "loop", &Value::Null)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let mut overloaded = 0;
    for reply in &replies {
        match reply.status {
            504 => assert_eq!(reply.code(), "deadline", "{}", reply.text),
            503 => {
                assert_eq!(reply.code(), "overloaded", "{}", reply.text);
                assert_eq!(
                    reply.header("retry-after"),
                    Some("1"),
                    "{:?}",
                    reply.headers
                );
                overloaded += 1;
            }
            other => panic!("unexpected answer {other}: {}", reply.text),
        }
    }
    assert!(
        overloaded >= 5,
        "{overloaded} of 8 refused as overloaded: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    node.api()
        .ok("h", "put", json!({ "key": "k", "value": "v" }));
    assert_eq!(
        node.api().ok("h", "get", json!({ "key": "k" })),
        json!({ "value": "v" })
    );
}

/// With a single guest thread, guests spinning to their deadline on other functions do
/// not keep it from a function with work waiting: the counter is answered, again and
/// again, while both spinners still run (they yield the thread at each epoch tick and
/// the function with the least guest time goes first), and `/metrics` shows the guest
/// thread busy and runs waiting for it. An order, not a timing: the spinners run for
/// 3 s.
#[test]
fn spinning_guests_do_not_keep_another_function_from_the_guest_thread() {
    let node = NodeProcess::start_with(NodeOptions {
        config_toml: Some("[wasm]\nguest_threads = 1\ndeadline_ms = 3000\n".into()),
        ..Default::default()
    });
    let api = node.api();
    api.deploy_component("spin-a", "hostile");
    api.deploy_component("spin-b", "hostile");
    api.deploy_component("counter", "counter");
    std::thread::scope(|scope| {
        let spinners: Vec<_> = ["spin-a", "spin-b"]
            .into_iter()
            .map(|f| {
                let api = node.api();
                scope.spawn(move || api.invoke(f, "loop", &Value::Null))
            })
            .collect();
        // Both spinning: the one guest thread is busy, and one of them waits for it.
        let started = std::time::Instant::now();
        loop {
            let metrics = api.get("/metrics").expect("metrics").text;
            let busy = metrics.contains("understudy_guest_threads_busy 1");
            let waiting = metrics.contains("understudy_guest_runs_waiting 1");
            if busy && waiting {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "the spinners never both ran: {metrics}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for _ in 0..20 {
            api.ok("counter", "increment", Value::Null);
        }
        assert!(
            spinners.iter().all(|s| !s.is_finished()),
            "the counter was served only after a spinner's deadline"
        );
        for s in spinners {
            s.join()
                .expect("client thread")
                .expect_error(504, "deadline");
        }
    });
    api.get("/healthz").expect("healthz").expect_status(200);
}

/// Once the function's pace is known (its last transactions, four at least, each took
/// its whole deadline), a request that would wait in line past its own deadline is
/// refused at once with 503 `overloaded` and `Retry-After`, saying how much work is
/// ahead, while the transaction holding the function still runs, rather than when its
/// deadline has passed.
#[test]
fn a_request_that_cannot_be_served_before_its_deadline_is_refused_at_once() {
    let node = NodeProcess::start_with(NodeOptions {
        deadline_ms: Some(500),
        ..Default::default()
    });
    let api = node.api();
    api.deploy_component("h", "hostile");
    // The pace: transactions hold the function for their whole deadline.
    for _ in 0..4 {
        api.invoke("h", "loop", &Value::Null)
            .expect_error(504, "deadline");
    }
    std::thread::scope(|scope| {
        let holder = scope.spawn(|| node.api().invoke("h", "loop", &Value::Null));
        // Let it take the function, and another line up behind it (admitted: the line
        // ahead of it is shorter than a deadline when it arrives).
        std::thread::sleep(std::time::Duration::from_millis(100));
        let queued = scope.spawn(|| node.api().invoke("h", "loop", &Value::Null));
        std::thread::sleep(std::time::Duration::from_millis(100));
        let refused = api.invoke("h", "get", &json!({ "key": "k" }));
        assert!(
            !holder.is_finished(),
            "the refusal came only after the holder's deadline"
        );
        assert_eq!(refused.status, 503, "{}", refused.text);
        assert_eq!(refused.code(), "overloaded", "{}", refused.text);
        assert_eq!(
            refused.header("retry-after"),
            Some("1"),
            "{:?}",
            refused.headers
        );
        assert!(
            refused.message().contains("ahead of this request"),
            "it says why: {}",
            refused.text
        );
        holder.join().expect("client").expect_error(504, "deadline");
        let _ = queued.join().expect("client");
    });
}
