//! Regressions found in review, one line each on what went wrong.

use std::thread;

use crate::support::{component, NodeProcess};

/// Two concurrent deletes of one function logged two Delete records; the second could
/// not be applied, and the node then refused to restart from its own log.
#[test]
fn concurrent_deletes_leave_a_log_that_replays() {
    let mut node = NodeProcess::start();
    for round in 0..5 {
        let name = format!("c{round}");
        node.api()
            .deploy(&name, component("counter"))
            .expect_status(201);
        let statuses: Vec<u16> = thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| node.api().delete(&name).status))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("delete thread"))
                .collect()
        });
        assert_eq!(
            statuses.iter().filter(|s| **s == 204).count(),
            1,
            "exactly one delete wins: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| *s == 204 || *s == 404),
            "the others see 404: {statuses:?}"
        );
    }
    node.restart();
    node.api()
        .deploy("c0", component("counter"))
        .expect_status(201);
}
