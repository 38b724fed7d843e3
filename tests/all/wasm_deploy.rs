//! Deploys are checked before anything is kept: a handler with the wrong type and an
//! import the host does not provide are refused with 400 saying what is wrong, the
//! import before compiling, and a refused component leaves nothing in `compiled/`.

use std::path::Path;
use std::process::Command;

use crate::support::{wasm_tools, NodeProcess};

/// A component whose handler is `handle: func(method: string) -> string`.
const WRONG_HANDLER_WAT: &str = r#"(component
  (core module $m
    (memory (export "memory") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 1024)
    (func (export "handle") (param i32 i32) (result i32) i32.const 0))
  (core instance $i (instantiate $m))
  (func $handle (param "method" string) (result string)
    (canon lift (core func $i "handle") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (instance $h (export "handle" (func $handle)))
  (export "understudy:function/handler@0.1.0" (instance $h))
)"#;

/// A component that imports `wasi:http` (as a JavaScript component built with default
/// features does).
const HTTP_IMPORT_WAT: &str = r#"(component
  (import "wasi:http/outgoing-handler@0.2.0" (instance (export "handle" (func))))
)"#;

/// A component that imports an interface the host does not provide, not `wasi:http`.
const KEYVALUE_IMPORT_WAT: &str = r#"(component
  (import "wasi:keyvalue/store@0.2.0-draft" (instance (export "get" (func))))
)"#;

/// The component a WAT text describes, made with wasm-tools; `None` (and a note) when
/// wasm-tools is not installed.
fn component_from_wat(wat: &str) -> Option<Vec<u8>> {
    let Some(wasm_tools) = wasm_tools() else {
        eprintln!("note: no .venv/bin/wasm-tools (scripts/build-guests.sh installs it): skipped");
        return None;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let (text, binary) = (dir.path().join("c.wat"), dir.path().join("c.wasm"));
    std::fs::write(&text, wat).expect("write the WAT");
    let out = Command::new(wasm_tools)
        .arg("parse")
        .arg(&text)
        .arg("-o")
        .arg(&binary)
        .output()
        .expect("run wasm-tools");
    assert!(
        out.status.success(),
        "wasm-tools parse failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(std::fs::read(&binary).expect("read the component"))
}

fn compiled_files(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("compiled"))
        .map(|entries| {
            entries
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn handler_with_the_wrong_type_is_refused_at_deploy() {
    let Some(bytes) = component_from_wat(WRONG_HANDLER_WAT) else {
        return;
    };
    let node = NodeProcess::start();
    let api = node.api();
    let reply = api
        .deploy("f", bytes)
        .expect_error(400, "invalid-component");
    assert!(
        reply.message().contains("handle") && reply.message().contains("list<u8>"),
        "the message does not say what is wrong with the handler: {}",
        reply.text
    );
    api.describe("f").expect_error(404, "unknown-function");
    assert_eq!(compiled_files(&node.data_dir()), Vec::<String>::new());
}

#[test]
fn unknown_import_is_refused_and_nothing_compiled_is_kept() {
    let Some(bytes) = component_from_wat(HTTP_IMPORT_WAT) else {
        return;
    };
    let node = NodeProcess::start();
    let api = node.api();
    let reply = api
        .deploy("f", bytes)
        .expect_error(400, "invalid-component");
    assert!(
        reply.message().contains("wasi:http/outgoing-handler"),
        "the message does not name the import: {}",
        reply.text
    );
    assert!(
        reply.message().contains("disableFeatures"),
        "the message does not say how to build JavaScript without wasi:http: {}",
        reply.text
    );
    assert_eq!(compiled_files(&node.data_dir()), Vec::<String>::new());

    // An import of another interface is named too, without the JavaScript advice.
    let Some(bytes) = component_from_wat(KEYVALUE_IMPORT_WAT) else {
        return;
    };
    let reply = api
        .deploy("g", bytes)
        .expect_error(400, "invalid-component");
    assert!(
        reply.message().contains("wasi:keyvalue/store")
            && !reply.message().contains("disableFeatures"),
        "the message does not name the import alone: {}",
        reply.text
    );

    // A good component is compiled and kept.
    api.deploy_component("c", "counter");
    assert_eq!(compiled_files(&node.data_dir()).len(), 1);
}
