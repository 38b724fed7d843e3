//! The data directory's component files: the compiled cache is only a cache (damage
//! costs a recompile), but a deployed component's own file is state (a node without
//! it, or with a changed one, refuses to start and says which file).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::support::NodeProcess;

fn files_in(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == extension))
        .collect();
    files.sort();
    files
}

/// A node with counter `c` at 2, killed.
fn crashed_node_with_counter() -> NodeProcess {
    let mut node = NodeProcess::start();
    node.api().deploy_component("c", "counter");
    node.api().ok("c", "increment", json!({ "by": 2 }));
    node.kill9();
    node
}

fn flip_byte_in_the_middle(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read file");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).expect("write file");
}

#[test]
fn damaged_compiled_cache_is_recompiled_on_start() {
    let mut node = crashed_node_with_counter();
    let cached = files_in(&node.data_dir().join("compiled"), "cwasm");
    assert!(!cached.is_empty(), "nothing in the compiled cache");
    for path in &cached {
        flip_byte_in_the_middle(path);
    }

    node.restart();
    assert!(
        node.log().contains("recompiling"),
        "no warning about the damaged cache:\n{}",
        node.log()
    );
    assert_eq!(
        node.api().ok("c", "increment", Value::Null),
        json!({ "value": 3 })
    );
}

#[test]
fn missing_component_file_refuses_to_start() {
    let mut node = crashed_node_with_counter();
    let artifacts = files_in(&node.data_dir().join("artifacts"), "wasm");
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    std::fs::remove_file(&artifacts[0]).expect("remove the component file");

    let (status, log) = node.restart_expecting_exit();
    assert!(
        !status.success(),
        "the node started without its component:\n{log}"
    );
    assert!(
        log.contains(&artifacts[0].display().to_string()),
        "the error does not name the file:\n{log}"
    );
}

#[test]
fn changed_component_file_refuses_to_start() {
    let mut node = crashed_node_with_counter();
    let artifacts = files_in(&node.data_dir().join("artifacts"), "wasm");
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    flip_byte_in_the_middle(&artifacts[0]);

    let (status, log) = node.restart_expecting_exit();
    assert!(
        !status.success(),
        "the node started with a changed component:\n{log}"
    );
    assert!(
        log.contains(&artifacts[0].display().to_string()),
        "the error does not name the file:\n{log}"
    );
    assert!(
        log.contains("digest"),
        "the error does not say what is wrong:\n{log}"
    );
}
