//! The data directory holds every function's state and remembered answers: only the
//! node's user may read it, whatever the umask, and a directory left readable by an
//! older version is tightened when the node starts.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::{json, Value};

use crate::support::{wal_segments, NodeProcess};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Every file and directory under `dir` (itself included) that others may read.
fn open_to_others(dir: &Path) -> Vec<(String, u32)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let m = mode(&path);
        if m & 0o077 != 0 {
            found.push((path.display().to_string(), m));
        }
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read dir") {
                pending.push(entry.expect("entry").path());
            }
        }
    }
    found
}

#[test]
fn data_dir_is_owner_only_and_tightened_on_start() {
    let mut node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("c", "counter");
    assert_eq!(api.ok("c", "increment", Value::Null), json!({ "value": 1 }));
    let data = node.data_dir();
    assert_eq!(mode(&data), 0o700, "the data directory");
    for segment in wal_segments(&node.wal_dir()) {
        assert_eq!(mode(&segment), 0o600, "{}", segment.display());
    }
    assert_eq!(open_to_others(&data), Vec::new());

    // What an older version left behind, readable by everyone.
    node.kill9();
    let segment = wal_segments(&node.wal_dir()).pop().expect("a segment");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&segment, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    node.restart();
    assert_eq!(open_to_others(&data), Vec::new());
    assert_eq!(
        node.api().ok("c", "get", Value::Null),
        json!({ "value": 1 })
    );
}
