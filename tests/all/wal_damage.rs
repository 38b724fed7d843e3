//! A damaged log: a torn tail (what a crash mid-write leaves) is cut with a warning and
//! the node starts; damage before the tail makes the node refuse to start, naming the
//! file and offset, rather than silently dropping committed records.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{wait_until, wal_segments, wal_snapshots, NodeOptions, NodeProcess};

/// Segment header: `USWAL\0`, u16 version, u64 first LSN.
const SEGMENT_HEADER_LEN: u64 = 16;
/// Frame header: u32 length, u32 crc32, u64 LSN.
const FRAME_HEADER_LEN: u64 = 16;
/// Puts committed before each test damages the log.
const PUTS: usize = 10;

/// A node with `PUTS` acknowledged puts (`k0`..`k9` = `v0`..`v9`) on function `h`,
/// killed with `kill -9`; returns it and its only log segment.
fn crashed_node_with_puts() -> (NodeProcess, PathBuf) {
    let mut node = NodeProcess::start();
    node.api().deploy_component("h", "hostile");
    for i in 0..PUTS {
        node.api().ok(
            "h",
            "put",
            json!({ "key": format!("k{i}"), "value": format!("v{i}") }),
        );
    }
    node.kill9();
    let segments = wal_segments(&node.wal_dir());
    assert_eq!(segments.len(), 1, "expected one log segment: {segments:?}");
    let segment = segments.into_iter().next().expect("one segment");
    (node, segment)
}

fn stored(node: &NodeProcess, key: &str) -> Value {
    node.api().ok("h", "get", json!({ "key": key }))["value"].clone()
}

#[test]
fn torn_tail_of_garbage_is_cut_and_every_commit_survives() {
    let (mut node, segment) = crashed_node_with_puts();
    let len = std::fs::metadata(&segment).expect("segment metadata").len();
    let garbage: Vec<u8> = (0u32..100)
        .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 24) as u8 | 1)
        .collect();
    OpenOptions::new()
        .append(true)
        .open(&segment)
        .expect("open segment")
        .write_all(&garbage)
        .expect("append garbage");

    node.restart();
    let log = node.log();
    assert!(
        log.contains("torn tail"),
        "no warning about the torn tail in the log:\n{log}"
    );
    assert!(log.contains("WARN"), "the torn tail is a warning:\n{log}");
    for i in 0..PUTS {
        assert_eq!(
            stored(&node, &format!("k{i}")),
            json!(format!("v{i}")),
            "k{i} was lost"
        );
    }
    assert_eq!(
        std::fs::metadata(&segment).expect("segment metadata").len(),
        len,
        "the garbage was not cut"
    );

    // The cut log takes new records, and they survive the next crash.
    node.api()
        .ok("h", "put", json!({ "key": "after", "value": "cut" }));
    node.restart();
    assert!(
        !node.log().contains("torn tail"),
        "a clean log was reported torn:\n{}",
        node.log()
    );
    assert_eq!(stored(&node, "after"), json!("cut"));
    assert_eq!(
        stored(&node, &format!("k{}", PUTS - 1)),
        json!(format!("v{}", PUTS - 1))
    );
}

#[test]
fn truncated_last_frame_is_cut_and_earlier_commits_survive() {
    let (mut node, segment) = crashed_node_with_puts();
    let len = std::fs::metadata(&segment).expect("segment metadata").len();
    // Cut a few bytes off: the last frame (the last put) is incomplete, as when the
    // crash came half-way through writing it.
    OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open segment")
        .set_len(len - 3)
        .expect("truncate");

    node.restart();
    let log = node.log();
    assert!(
        log.contains("torn tail"),
        "no warning about the torn tail in the log:\n{log}"
    );
    for i in 0..PUTS - 1 {
        assert_eq!(
            stored(&node, &format!("k{i}")),
            json!(format!("v{i}")),
            "k{i} was lost"
        );
    }
    assert_eq!(
        stored(&node, &format!("k{}", PUTS - 1)),
        Value::Null,
        "the torn record was applied"
    );

    node.api()
        .ok("h", "put", json!({ "key": "after", "value": "cut" }));
    node.restart();
    assert!(
        !node.log().contains("torn tail"),
        "a clean log was reported torn:\n{}",
        node.log()
    );
    assert_eq!(stored(&node, "after"), json!("cut"));
    assert_eq!(stored(&node, "k0"), json!("v0"));
}

#[test]
fn corruption_before_the_tail_refuses_to_start() {
    let (mut node, segment) = crashed_node_with_puts();
    let mut bytes = std::fs::read(&segment).expect("read segment");
    // A bit flipped inside the first frame's payload: valid frames follow, so this is
    // not a torn tail.
    let first_frame = SEGMENT_HEADER_LEN;
    bytes[(first_frame + FRAME_HEADER_LEN + 3) as usize] ^= 0x40;
    std::fs::write(&segment, &bytes).expect("write the damaged segment");

    let (status, log) = node.restart_expecting_exit();
    assert!(
        !status.success(),
        "the node started on a corrupt log:\n{log}"
    );
    assert!(
        log.contains(&segment.display().to_string()),
        "the error does not name the file:\n{log}"
    );
    assert!(
        log.contains(&format!("offset {first_frame}")),
        "the error does not name the offset:\n{log}"
    );
    assert_eq!(
        std::fs::read(&segment).expect("read segment"),
        bytes,
        "a refused start changed the log"
    );
}

#[test]
fn corrupt_snapshot_refuses_to_start() {
    let config = "checkpoint_log_bytes = 4096\n".to_owned();
    let mut node = NodeProcess::start_with(NodeOptions {
        config_toml: Some(config),
        ..Default::default()
    });
    node.api().deploy_component("h", "hostile");
    for i in 0..100 {
        node.api().ok(
            "h",
            "put",
            json!({ "key": format!("k{i}"), "value": "v".repeat(64) }),
        );
    }
    let wal_dir = node.wal_dir();
    wait_until(
        "a snapshot in the log directory",
        Duration::from_secs(60),
        || !wal_snapshots(&wal_dir).is_empty(),
    );
    node.kill9();

    let snapshot = wal_snapshots(&wal_dir).pop().expect("a snapshot");
    let mut bytes = std::fs::read(&snapshot).expect("read snapshot");
    let at = bytes.len() - 10;
    bytes[at] ^= 0x40;
    std::fs::write(&snapshot, &bytes).expect("write the damaged snapshot");

    let (status, log) = node.restart_expecting_exit();
    assert!(
        !status.success(),
        "the node started on a corrupt snapshot:\n{log}"
    );
    assert!(
        log.contains(&snapshot.display().to_string()),
        "the error does not name the file:\n{log}"
    );
}

/// Regression: a segment cut to half its length was taken for a torn tail, and the node
/// started with one warning and most of its acknowledged commits gone. A crash tears
/// only what was never acknowledged; a log that ends before the position it is known
/// to have made durable (its durable mark) was cut short, and the node refuses to start,
/// naming the file and offset, unless the operator accepts the loss explicitly.
#[test]
fn segment_cut_to_half_refuses_to_start_unless_recovery_is_asked_for() {
    let mut node = NodeProcess::start();
    node.api().deploy_component("h", "hostile");
    // Well past the durable mark's interval (1 MiB of log).
    for _ in 0..3 {
        node.api()
            .ok("h", "put-many", json!({ "count": 300, "value_len": 5000 }));
    }
    node.api().ok(
        "h",
        "put",
        json!({ "key": "last", "value": "acknowledged" }),
    );
    node.kill9();
    let segments = wal_segments(&node.wal_dir());
    assert_eq!(segments.len(), 1, "expected one log segment: {segments:?}");
    let segment = &segments[0];
    let len = std::fs::metadata(segment).expect("segment metadata").len();
    OpenOptions::new()
        .write(true)
        .open(segment)
        .expect("open segment")
        .set_len(len / 2)
        .expect("truncate");

    let (status, log) = node.restart_expecting_exit();
    assert!(
        !status.success(),
        "the node started on a log cut in half:\n{log}"
    );
    assert!(
        log.contains(&segment.display().to_string()) && log.contains("offset"),
        "the error does not name the file and offset:\n{log}"
    );
    assert!(
        log.contains("--recover-truncated-log"),
        "the error does not say how to accept the loss:\n{log}"
    );
    assert_eq!(
        std::fs::metadata(segment).expect("segment metadata").len(),
        len / 2,
        "a refused start changed the log"
    );

    // The operator accepts the loss, once.
    node.options_mut().extra_args = vec!["--recover-truncated-log".into()];
    node.restart();
    assert!(
        node.log().contains("recover-truncated-log"),
        "accepting the loss is not logged:\n{}",
        node.log()
    );
    assert_eq!(stored(&node, "last"), Value::Null);
    node.api()
        .ok("h", "put", json!({ "key": "after", "value": "recovery" }));

    // From then on the log is whole again: an ordinary start.
    node.options_mut().extra_args.clear();
    node.restart();
    assert_eq!(stored(&node, "after"), json!("recovery"));
}
