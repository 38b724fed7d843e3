//! Tokens: read from files (so they stay out of the process list), never blank, and an
//! invoke token that invocations then need (the admin token serves as well).

use serde_json::{json, Value};

use crate::support::{component, NodeOptions, NodeProcess};

#[test]
fn invoke_token_guards_invocations_and_tokens_come_from_files() {
    let secrets = tempfile::tempdir().expect("temp dir");
    let admin_file = secrets.path().join("admin-token");
    let invoke_file = secrets.path().join("invoke-token");
    std::fs::write(&admin_file, "adm1n-t0ken-from-a-file\n").expect("write the admin token");
    std::fs::write(&invoke_file, "inv0ke-t0ken-from-a-file\n").expect("write the invoke token");
    let node = NodeProcess::start_with(NodeOptions {
        extra_args: vec![
            "--admin-token-file".into(),
            admin_file.display().to_string(),
            "--invoke-token-file".into(),
            invoke_file.display().to_string(),
        ],
        ..Default::default()
    });
    let anonymous = node.api();
    // The file's trailing newline is not part of the token.
    let admin = anonymous.with_token("adm1n-t0ken-from-a-file");
    let invoker = anonymous.with_token("inv0ke-t0ken-from-a-file");

    anonymous
        .deploy("c", component("counter"))
        .expect_error(401, "unauthorized");
    invoker
        .deploy("c", component("counter"))
        .expect_error(401, "unauthorized");
    admin.deploy("c", component("counter")).expect_status(201);

    anonymous
        .invoke("c", "increment", &Value::Null)
        .expect_error(401, "unauthorized");
    anonymous
        .with_token("inv0ke-t0ken-from-a-fil")
        .invoke("c", "increment", &Value::Null)
        .expect_error(401, "unauthorized");
    assert_eq!(
        invoker.ok("c", "increment", Value::Null),
        json!({ "value": 1 })
    );
    assert_eq!(
        admin.ok("c", "increment", Value::Null),
        json!({ "value": 2 })
    );
    // Reads are not guarded (the README says so).
    anonymous.describe("c").expect_status(200);

    let pid = node.pid().expect("running");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("read the command line");
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(
        !cmdline.contains("t0ken-from-a-file"),
        "a token shows in the process list: {cmdline}"
    );
}

#[test]
fn blank_tokens_refuse_to_start() {
    let mut node = NodeProcess::start();
    node.options_mut().admin_token = Some("  ".into());
    let (status, log) = node.restart_expecting_exit();
    assert!(
        !status.success(),
        "started with a blank admin token:\n{log}"
    );
    assert!(log.contains("blank"), "the error does not say why:\n{log}");

    let secrets = tempfile::tempdir().expect("temp dir");
    let blank = secrets.path().join("token");
    std::fs::write(&blank, "\n").expect("write the token file");
    node.options_mut().admin_token = None;
    node.options_mut().extra_args = vec!["--invoke-token-file".into(), blank.display().to_string()];
    let (status, log) = node.restart_expecting_exit();
    assert!(
        !status.success(),
        "started with a blank invoke token:\n{log}"
    );
    assert!(log.contains("blank"), "the error does not say why:\n{log}");
}
