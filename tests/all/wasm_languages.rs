//! Functions written in Python and JavaScript with the SDKs in `sdk/`: the bank behaves
//! the same in all three languages, each SDK keeps its promises from inside a real
//! component, and a trap in an interpreter guest says why (the end of its stderr).

use serde_json::{json, Value};

use crate::support::{Api, NodeProcess};

/// The bank's components: Rust, Python, JavaScript.
const BANKS: [&str; 3] = ["bank", "bank-py", "bank-js"];

/// What one request of the scenario answered: the status, and the body for a success or
/// the error code for a failure (messages are each language's own).
#[derive(Debug, PartialEq)]
struct Step {
    request: String,
    status: u16,
    answer: Value,
}

/// Runs the bank scenario on `function`: opens, moves money, overdrafts, unknown
/// methods, bad input, and checks that what failed changed nothing.
fn bank_scenario(api: &Api, function: &str) -> Vec<Step> {
    let requests: Vec<(&str, Value)> = vec![
        ("total", Value::Null),
        ("open", json!({ "account": "alice", "initial": 100 })),
        ("open", json!({ "account": "bob" })),
        ("open", json!({ "account": "bob", "initial": 5 })),
        (
            "transfer",
            json!({ "from": "alice", "to": "bob", "amount": 30 }),
        ),
        (
            "transfer",
            json!({ "from": "bob", "to": "alice", "amount": 50 }),
        ),
        ("withdraw", json!({ "account": "alice", "amount": 71 })),
        ("withdraw", json!({ "account": "alice", "amount": 2 })),
        ("deposit", json!({ "account": "bob", "amount": 7 })),
        ("deposit", json!({ "account": "carol", "amount": 1 })),
        ("balance", json!({ "account": "alice" })),
        ("balance", json!({ "account": "nobody" })),
        ("total", Value::Null),
        ("total", json!({ "anything": [1, 2] })),
        ("close", json!({ "account": "alice" })),
        ("open", Value::Null),
        ("open", json!({ "account": "dave", "initial": -1 })),
        ("open", json!({ "account": "dave", "initial": 1.5 })),
        ("open", json!({ "account": "dave", "initial": true })),
        ("open", json!({ "account": "dave", "extra": 1 })),
        ("open", json!({ "account": "" })),
        ("open", json!({ "account": "x".repeat(257) })),
        ("deposit", json!({ "account": "bob" })),
        ("deposit", json!({ "account": "bob", "amount": 0 })),
        (
            "transfer",
            json!({ "from": "bob", "to": "bob", "amount": 1 }),
        ),
        // serde reads a struct from an array of its fields, in order.
        ("balance", json!(["alice"])),
        ("open", json!(["erin"])),
        ("open", json!(["frank", 4])),
        ("open", json!(["gina", 4, 5])),
        ("balance", json!([])),
        ("total", Value::Null),
    ];
    let digest = |api: &Api| api.describe(function).expect_status(200).body["state_digest"].clone();
    let mut steps = Vec::new();
    for (method, input) in requests {
        let before = digest(api);
        let reply = api.invoke(function, method, &input);
        let answer = match reply.status {
            200 => reply.body.clone(),
            _ => {
                assert_eq!(
                    digest(api),
                    before,
                    "{function}: the failed {method} {input} changed the state: {}",
                    reply.text
                );
                json!(reply.code())
            }
        };
        steps.push(Step {
            request: format!("{method} {input}"),
            status: reply.status,
            answer,
        });
    }
    steps
}

#[test]
fn bank_behaves_the_same_in_rust_python_and_javascript() {
    let node = NodeProcess::start();
    let api = node.api();
    for bank in BANKS {
        api.deploy_component(bank, bank);
    }
    let rust = bank_scenario(api, "bank");
    // The Rust bank's answers are the reference; pin the ones that matter most.
    let answer = |request: &str| {
        let step = rust
            .iter()
            .find(|s| s.request == request)
            .expect("a step of the scenario");
        (step.status, step.answer.clone())
    };
    assert_eq!(
        answer(r#"transfer {"amount":50,"from":"bob","to":"alice"}"#),
        (422, json!("overdraft"))
    );
    assert_eq!(
        answer(r#"close {"account":"alice"}"#),
        (422, json!("unknown-method"))
    );
    assert_eq!(
        answer(r#"open {"account":"dave","initial":-1}"#),
        (400, json!("bad-input"))
    );
    assert_eq!(
        rust.last().map(|s| (s.status, s.answer.clone())),
        Some((200, json!({ "total": 109, "accounts": 4 })))
    );
    for bank in &BANKS[1..] {
        let other = bank_scenario(api, bank);
        for (reference, step) in rust.iter().zip(&other) {
            assert_eq!(
                step, reference,
                "{bank} answered differently from the Rust bank"
            );
        }
        assert_eq!(other.len(), rust.len());
    }
}

/// The promises each SDK makes, checked on its test guest (`tests/guests/sdk-py`,
/// `tests/guests/sdk-js`), deployed as `sdk` beside the Rust bank it calls.
fn sdk_keeps_its_promises(component: &str) {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("sdk", component);
    api.deploy_component("bank", "bank");

    // JSON in and out; an empty body is null; bytes pass as they are.
    let value = json!({ "a": [1, "two", null, true], "b": { "c": 1.5 } });
    assert_eq!(api.ok("sdk", "echo", value.clone()), value);
    let reply = api
        .invoke_raw("sdk", "echo", Vec::new(), None)
        .expect("invoke")
        .expect_status(200);
    assert_eq!(reply.text, "null");
    assert_eq!(api.ok("sdk", "raw", Value::Null), json!({ "raw": true }));
    assert_eq!(api.ok("sdk", "nothing", Value::Null), Value::Null);

    // Every transaction gets a fresh instance: a module-level counter never passes 1,
    // however often the pool slot (its memory kept resident) is used again.
    for _ in 0..3 {
        assert_eq!(
            api.ok("sdk", "count", Value::Null),
            json!(1),
            "linear memory outlived a transaction"
        );
    }

    // Dispatch: an unknown method names the known ones.
    let reply = api
        .invoke("sdk", "nope", &Value::Null)
        .expect_error(422, "unknown-method");
    assert!(reply.message().contains("echo"), "{}", reply.text);

    // A value JSON cannot carry is caught in the SDK, naming the method, and rolls back.
    let reply = api
        .invoke("sdk", "not-json", &Value::Null)
        .expect_error(422, "bad-output");
    assert!(reply.message().contains("not-json"), "{}", reply.text);
    api.invoke("sdk", "put-not-json", &json!({ "key": "n" }))
        .expect_error(422, "bad-output");

    // Typed state: put, get, scan, delete.
    api.ok("sdk", "put", json!({ "key": "k/1", "value": { "n": 1 } }));
    api.ok("sdk", "put", json!({ "key": "k/2", "value": [2] }));
    api.ok(
        "sdk",
        "put",
        json!({ "key": "l/1", "value": "other prefix" }),
    );
    assert_eq!(
        api.ok("sdk", "get", json!({ "key": "k/1" })),
        json!({ "n": 1 })
    );
    assert_eq!(
        api.ok("sdk", "get", json!({ "key": "missing" })),
        Value::Null
    );
    assert_eq!(
        api.ok("sdk", "scan", json!({ "prefix": "k/" })),
        json!([["k/1", { "n": 1 }], ["k/2", [2]]])
    );
    api.ok("sdk", "delete", json!({ "key": "k/1" }));
    assert_eq!(api.ok("sdk", "get", json!({ "key": "k/1" })), Value::Null);
    api.invoke("sdk", "put-bad-state", &json!({ "key": "b" }))
        .expect_error(422, "bad-state");

    // Fail(code, message) reaches the client with both, and rolls the writes back.
    let reply = api
        .invoke(
            "sdk",
            "put-then-fail",
            &json!({ "key": "f", "value": 1, "code": "overdraft", "message": "not enough" }),
        )
        .expect_error(422, "overdraft");
    assert_eq!(reply.message(), "not enough");
    assert_eq!(api.ok("sdk", "get", json!({ "key": "f" })), Value::Null);
    api.invoke(
        "sdk",
        "put-then-fail",
        &json!({ "key": "f", "value": 1, "code": "bad-input", "message": "no" }),
    )
    .expect_error(400, "bad-input");

    // Calls: inside the transaction; the callee's error passes through or is caught.
    api.ok("bank", "open", json!({ "account": "alice", "initial": 10 }));
    let input = json!({ "account": "alice", "amount": 3 });
    assert_eq!(
        api.ok(
            "sdk",
            "call",
            json!({ "function": "bank", "method": "withdraw", "input": input })
        ),
        json!({ "account": "alice", "balance": 7 })
    );
    let overdraft = json!({ "account": "alice", "amount": 100 });
    api.invoke(
        "sdk",
        "call",
        &json!({ "function": "bank", "method": "withdraw", "input": overdraft }),
    )
    .expect_error(422, "overdraft");
    assert_eq!(
        api.ok(
            "sdk",
            "call-caught",
            json!({ "function": "nowhere", "method": "m" })
        ),
        json!({ "caught": "unknown-function" })
    );

    // Logging reaches the node's log, tagged with the function.
    api.ok(
        "sdk",
        "log",
        json!({ "message": "hello from the sdk test" }),
    );

    // A bug traps: 500 with the exception's text from stderr, nothing kept, and a WARN
    // naming the function and the transaction.
    let reply = api
        .invoke("sdk", "crash", &json!({ "why": "on purpose" }))
        .expect_error(500, "trap");
    assert!(
        reply.message().contains("boom: on purpose"),
        "the trap does not carry the guest's stderr: {}",
        reply.text
    );
    assert_eq!(
        api.ok("sdk", "get", json!({ "key": "crashed" })),
        Value::Null
    );
    let log = without_colours(&node.log());
    assert!(
        log.lines()
            .any(|l| l.contains("hello from the sdk test") && l.contains("function=sdk")),
        "the guest's log message is not in the node's log"
    );
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("guest trapped")
            && l.contains("boom: on purpose")
            && l.contains("function=sdk")
            && l.contains("txn=")),
        "no WARN for the trap with the function, the transaction and stderr"
    );
}

#[test]
fn python_sdk_keeps_its_promises() {
    sdk_keeps_its_promises("sdk-py");
}

#[test]
fn javascript_sdk_keeps_its_promises() {
    sdk_keeps_its_promises("sdk-js");
}

/// `text` without ANSI escape sequences (the node's text log colours field names).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC '[' parameters, ending with a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
