//! Bad input over HTTP is answered with a status that says whose fault it was and a
//! JSON error that says what was wrong; none of it disturbs the node.

use std::process::Command;

use serde_json::{json, Value};

use crate::support::{NodeOptions, NodeProcess};

/// `\0asm` with the component encoding's version and layer: a valid, empty component.
const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";
/// `\0asm` version 1: a valid, empty core module.
const EMPTY_CORE_MODULE: &[u8] = b"\0asm\x01\0\0\0";

#[test]
fn non_wasm_component_is_rejected() {
    let node = NodeProcess::start();
    let api = node.api();
    // Fixed "random" bytes: a test that fails must fail the same way again.
    let junk: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let reply = api.deploy("f", junk).expect_error(400, "invalid-component");
    assert!(
        reply.message().contains("not a WebAssembly binary"),
        "{}",
        reply.text
    );
    let reply = api
        .deploy("f", Vec::new())
        .expect_error(400, "invalid-component");
    assert!(
        reply.message().contains("not a WebAssembly binary"),
        "{}",
        reply.text
    );
    api.describe("f").expect_error(404, "unknown-function");
}

#[test]
fn core_module_is_rejected_as_not_a_component() {
    let node = NodeProcess::start();
    let api = node.api();
    let reply = api
        .deploy("f", EMPTY_CORE_MODULE.to_vec())
        .expect_error(400, "invalid-component");
    assert!(
        reply.message().contains("core WebAssembly module"),
        "{}",
        reply.text
    );
    api.describe("f").expect_error(404, "unknown-function");
}

#[test]
fn component_outside_the_world_is_rejected() {
    let node = NodeProcess::start();
    let api = node.api();
    let reply = api
        .deploy("f", EMPTY_COMPONENT.to_vec())
        .expect_error(400, "invalid-component");
    assert!(
        reply.message().contains("understudy:function/handler"),
        "the message names the missing export: {}",
        reply.text
    );
    api.describe("f").expect_error(404, "unknown-function");

    // The same with a component made by the usual tool from a core module that exports nothing.
    let Some(wasm_tools) = crate::support::wasm_tools() else {
        eprintln!("note: no .venv/bin/wasm-tools (scripts/build-guests.sh installs it): skipped the wasm-tools-made component");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let wat = dir.path().join("empty.wat");
    let core = dir.path().join("empty.wasm");
    let made = dir.path().join("component.wasm");
    std::fs::write(&wat, "(module)").expect("write wat");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(&wasm_tools)
            .args(args)
            .output()
            .expect("run wasm-tools");
        assert!(
            out.status.success(),
            "wasm-tools {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "parse".as_ref(),
        wat.as_os_str(),
        "-o".as_ref(),
        core.as_os_str(),
    ]);
    run(&[
        "component".as_ref(),
        "new".as_ref(),
        core.as_os_str(),
        "-o".as_ref(),
        made.as_os_str(),
    ]);
    let bytes = std::fs::read(&made).expect("read the component");
    let reply = api
        .deploy("f", bytes)
        .expect_error(400, "invalid-component");
    assert!(
        reply.message().contains("understudy:function/handler"),
        "{}",
        reply.text
    );
}

#[test]
fn malformed_json_is_rejected_with_bad_json() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("c", "counter");
    for body in [
        &b"{"[..],
        b"{\"by\": }",
        b"not json",
        b"{\"by\": 1} trailing",
    ] {
        api.invoke_raw("c", "increment", body.to_vec(), None)
            .expect("invoke")
            .expect_error(400, "bad-json");
    }
    assert_eq!(
        api.ok("c", "get", Value::Null),
        json!({ "value": 0 }),
        "a rejected body ran the handler"
    );
}

#[test]
fn oversized_body_is_rejected_with_413() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("h", "hostile");
    // A valid JSON string just over 1 MiB.
    let mut body = vec![b'"'];
    body.resize((1 << 20) + 16, b'a');
    body.push(b'"');
    api.invoke_raw("h", "echo", body, None)
        .expect("invoke")
        .expect_error(413, "too-large");
    // Just under the limit is fine.
    let mut body = vec![b'"'];
    body.resize((1 << 20) - 2, b'a');
    body.push(b'"');
    let reply = api
        .invoke_raw("h", "echo", body.clone(), None)
        .expect("invoke")
        .expect_status(200);
    assert_eq!(reply.text.len(), body.len());
}

#[test]
fn unknown_function_is_404() {
    let node = NodeProcess::start();
    let api = node.api();
    api.invoke("nope", "get", &Value::Null)
        .expect_error(404, "unknown-function");
    api.describe("nope").expect_error(404, "unknown-function");
    api.delete("nope").expect_error(404, "unknown-function");
}

#[test]
fn handler_errors_map_to_422_and_bad_input_to_400() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("bank", "bank");
    api.ok("bank", "open", json!({ "account": "a", "initial": 1 }));
    api.invoke("bank", "deposit", &json!({ "account": "a", "amount": 0 }))
        .expect_error(400, "bad-input");
    api.invoke("bank", "deposit", &json!({ "account": "a" }))
        .expect_error(400, "bad-input");
    api.invoke("bank", "deposit", &json!({ "account": "a", "amount": -1 }))
        .expect_error(400, "bad-input");
    api.invoke("bank", "balance", &json!({ "account": "zz" }))
        .expect_error(422, "no-account");
    api.invoke("bank", "no-such-method", &Value::Null)
        .expect_error(422, "unknown-method");
    assert_eq!(
        api.ok("bank", "total", Value::Null),
        json!({ "total": 1, "accounts": 1 })
    );
}

#[test]
fn bad_function_name_is_rejected() {
    let node = NodeProcess::start();
    let api = node.api();
    for name in ["Upper", "1digit", "has.dot", &"x".repeat(200)] {
        let reply = api.deploy(name, crate::support::component("counter"));
        assert_eq!(
            (reply.status, reply.code()),
            (400, "bad-name"),
            "deploying {name:?}: {}",
            reply.text
        );
    }
    let listed = api
        .get("/v1/functions")
        .expect("list")
        .expect_status(200)
        .body;
    assert_eq!(listed["functions"], json!([]));
}

/// `limits.state_keys_max` and `limits.state_bytes_max`: a transaction that would grow a
/// function's state past either is aborted with 507 `state-full` and leaves nothing;
/// one that does not grow it commits; a cap lowered below the state (at a restart)
/// refuses growth only.
#[test]
fn a_transaction_that_would_grow_a_state_past_its_cap_is_refused_and_leaves_nothing() {
    let mut node = NodeProcess::start_with(NodeOptions {
        config_toml: Some("[limits]\nstate_keys_max = 3\n".into()),
        ..NodeOptions::default()
    });
    node.api().deploy_component("bank", "bank");
    for account in ["a", "b", "c"] {
        node.api().ok(
            "bank",
            "open",
            json!({ "account": account, "initial": 100 }),
        );
    }
    let full = node
        .api()
        .invoke("bank", "open", &json!({ "account": "d", "initial": 100 }))
        .expect_status(507);
    assert_eq!(full.code(), "state-full", "{:?}", full.body);
    let message = full.message().to_owned();
    assert!(
        message.contains("keys") && message.contains('3'),
        "{message}"
    );
    let info = node.api().describe("bank").expect_status(200).body;
    assert_eq!(
        info["keys"],
        json!(3),
        "the refused open left nothing: {info}"
    );
    // Not growing: commits.
    node.api()
        .ok("bank", "deposit", json!({ "account": "a", "amount": 5 }));

    let bytes = info["state_bytes"].as_u64().expect("state_bytes");
    assert!(bytes > 0, "{info}");
    node.kill9();
    node.options_mut().config_toml = Some(format!(
        "[limits]\nstate_keys_max = 100\nstate_bytes_max = {}\n",
        bytes - 1
    ));
    node.restart();
    let full = node
        .api()
        .invoke("bank", "open", &json!({ "account": "e", "initial": 100 }))
        .expect_status(507);
    let message = full.message().to_owned();
    assert!(message.contains("bytes"), "{message}");
    // Under a cap lowered below the state, what does not grow it still commits.
    node.api()
        .ok("bank", "withdraw", json!({ "account": "a", "amount": 5 }));
    assert_eq!(
        node.api().ok("bank", "balance", json!({ "account": "a" }))["balance"],
        json!(100)
    );
}
