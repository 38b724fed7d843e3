//! `GET /metrics` exposes counters that move with the work the node does.

use serde_json::{json, Value};

use crate::support::{Api, NodeProcess};

/// The value of the sample `name` whose labels include every one of `labels`, or 0 when
/// there is none yet (a counter family has no sample before its first event).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = series_name == name
                && labels.iter().all(|(k, v)| {
                    series_labels
                        .split(',')
                        .any(|l| l == format!("{k}=\"{v}\""))
                });
            wanted.then(|| value.parse::<f64>().expect("a sample's value is a number"))
        })
        .next()
        .unwrap_or(0.0)
}

fn scrape(api: &Api) -> String {
    let reply = api.get("/metrics").expect("metrics").expect_status(200);
    assert!(
        reply.text.contains("understudy_"),
        "metric names are prefixed: {}",
        reply.text
    );
    reply.text
}

#[test]
fn metrics_count_invocations_commits_and_aborts() {
    let node = NodeProcess::start();
    let api = node.api();
    api.deploy_component("counter", "counter");
    api.deploy_component("h", "hostile");
    let before = scrape(api);
    let commit = [("function", "counter"), ("outcome", "commit")];
    let abort = [("function", "h"), ("outcome", "abort")];
    let trap = [("function", "h"), ("outcome", "trap")];

    for _ in 0..3 {
        api.ok("counter", "increment", Value::Null);
    }
    api.invoke("h", "put-then-fail", &json!({ "key": "k", "value": "v" }))
        .expect_error(422, "deliberate");
    api.invoke("h", "trap", &Value::Null)
        .expect_error(500, "trap");

    let after = scrape(api);
    let moved = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    assert_eq!(
        moved("understudy_invocations_total", &commit),
        3.0,
        "{after}"
    );
    assert_eq!(
        moved("understudy_invocations_total", &abort),
        1.0,
        "{after}"
    );
    assert_eq!(moved("understudy_invocations_total", &trap), 1.0, "{after}");
    assert_eq!(moved("understudy_commits_total", &[]), 3.0, "{after}");
    assert_eq!(moved("understudy_aborts_total", &[]), 1.0, "{after}");
    assert_eq!(moved("understudy_traps_total", &[]), 1.0, "{after}");
    assert!(moved("understudy_log_bytes_total", &[]) > 0.0, "{after}");
    assert_eq!(
        sample(&after, "understudy_functions_deployed", &[]),
        2.0,
        "{after}"
    );

    // What the state caps and the memory budget are read against.
    api.invoke_keyed("counter", "increment", &Value::Null, "once")
        .expect_status(200);
    let counter = [("function", "counter")];
    let scraped = scrape(api);
    let info = api.describe("counter").expect_status(200).body;
    assert_eq!(
        sample(&scraped, "understudy_function_state_keys", &counter),
        info["keys"].as_f64().expect("keys"),
        "{scraped}"
    );
    assert_eq!(
        sample(&scraped, "understudy_function_state_bytes", &counter),
        info["state_bytes"].as_f64().expect("state_bytes"),
        "{scraped}"
    );
    assert!(info["state_bytes"].as_u64() > Some(0), "{info}");
    assert_eq!(
        sample(&scraped, "understudy_function_idempotency_keys", &counter),
        1.0,
        "{scraped}"
    );
    assert!(
        sample(&scraped, "understudy_resident_memory_bytes", &[]) > 1e6,
        "{scraped}"
    );
}

/// The sum of `name` (with `labels`) over every node's scrape.
fn total(scrapes: &[String], name: &str, labels: &[(&str, &str)]) -> f64 {
    scrapes.iter().map(|s| sample(s, name, labels)).sum()
}

#[test]
fn cluster_metrics_move_with_replication_two_phase_commit_and_failover() {
    use crate::cluster_distributed::{deploy, primary_of};
    use crate::cluster_form::{cluster_init, converged_leader, members3, start_cluster};

    let certs = tempfile::tempdir().expect("tempdir");
    cluster_init(certs.path(), &[1, 2, 3]);
    let mut nodes = start_cluster(certs.path(), &members3());
    let master = converged_leader(&nodes.iter().collect::<Vec<_>>());
    let east = deploy(&nodes[0], "bank-east", "bank", 2);
    deploy(&nodes[0], "bank-west", "bank", 2);
    deploy(&nodes[0], "transfer", "transfer", 2);
    for bank in ["bank-east", "bank-west"] {
        nodes[0]
            .api()
            .ok(bank, "open", json!({ "account": "a", "initial": 100 }));
    }
    let input = json!({
        "from": { "bank": "bank-east", "account": "a" },
        "to": { "bank": "bank-west", "account": "a" },
        "amount": 5,
    });
    nodes[0].api().ok("transfer", "transfer", input);

    let scrapes: Vec<String> = nodes.iter().map(|n| scrape(n.api())).collect();
    let all = |name: &str, labels: &[(&str, &str)]| total(&scrapes, name, labels);
    for (name, labels) in [
        ("understudy_replication_shipped_entries_total", &[][..]),
        ("understudy_replication_shipped_bytes_total", &[]),
        ("understudy_replication_ack_latency_seconds_count", &[]),
        ("understudy_replication_batch_appends_count", &[]),
        ("understudy_twophase_prepared_total", &[]),
        (
            "understudy_twophase_decided_total",
            &[("outcome", "commit")],
        ),
        ("understudy_raft_commit_latency_seconds_count", &[]),
    ] {
        assert!(
            all(name, labels) >= 1.0,
            "{name} {labels:?} never moved: {scrapes:#?}"
        );
    }
    assert_eq!(all("understudy_raft_leader", &[]), 1.0, "one master");
    for s in &scrapes {
        assert!(sample(s, "understudy_raft_term", &[]) >= 1.0, "{s}");
        // At least 1: a busy machine may already have failed a node over.
        assert!(
            sample(s, "understudy_function_epoch", &[("function", "bank-east")]) >= 1.0,
            "{s}"
        );
    }
    // A lease can lapse for a moment on a busy machine: each node holds one again soon.
    for node in &nodes {
        scrape_until(node.api(), "the node holds its lease", |s| {
            sample(s, "understudy_lease_held", &[]) == 1.0
        });
    }
    every_dashboard_series_exists(&scrapes[0]);
    let east_scrape = &scrapes[(east - 1) as usize];
    assert!(
        east_scrape.contains("understudy_replication_lag_entries{function=\"bank-east\""),
        "the primary reports its backup's lag: {east_scrape}"
    );

    // Kill bank-east's primary: every survivor counts the verdict, the promotion and
    // the new epoch; the master times the detection.
    nodes[(east - 1) as usize].kill9();
    let survivor = (0..3).find(|i| *i as u64 + 1 != east).expect("a survivor");
    crate::cluster_failover::wait_for("bank-east's new primary", || {
        primary_of(&nodes[survivor], "bank-east").is_some_and(|p| p != east)
    });
    // The counters move when each node applies the new state, the master's histograms
    // once its whole plan is carried out: both a little after the new primary serves.
    let east_label = east.to_string();
    scrape_until(nodes[survivor].api(), "the failover counted", |s| {
        sample(
            s,
            "understudy_node_health_changes_total",
            &[("node", east_label.as_str()), ("health", "down")],
        ) >= 1.0
            && sample(
                s,
                "understudy_promotions_total",
                &[("function", "bank-east")],
            ) >= 1.0
            && sample(
                s,
                "understudy_epoch_changes_total",
                &[("function", "bank-east")],
            ) >= 1.0
            && sample(s, "understudy_function_epoch", &[("function", "bank-east")]) >= 2.0
    });
    if master != east {
        scrape_until(
            nodes[(master - 1) as usize].api(),
            "the master timed the failover",
            |s| {
                sample(s, "understudy_failover_detection_seconds_count", &[]) >= 1.0
                    && sample(s, "understudy_failover_promotion_seconds_count", &[]) >= 1.0
            },
        );
    }
}

/// Scrape `api` until `done` holds for the scrape; that scrape. Fails, showing the last
/// one, after the failover tests' settling time.
fn scrape_until(api: &Api, what: &str, done: impl Fn(&str) -> bool) -> String {
    let started = std::time::Instant::now();
    loop {
        let s = scrape(api);
        if done(&s) {
            return s;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "never happened: {what}; the last scrape:\n{s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every series the Grafana dashboard in `docs/` queries is one a clustered node exports
/// (its `# TYPE` line is there even before the first sample).
fn every_dashboard_series_exists(scrape: &str) {
    let path = crate::support::repo_root().join("docs/grafana-dashboard.json");
    let dashboard = std::fs::read_to_string(&path).expect("the Grafana dashboard");
    let mut names: Vec<String> = dashboard
        .match_indices("understudy_")
        .map(|(at, _)| {
            dashboard[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(
        names.len() > 20,
        "the dashboard queries the cluster's series: {names:?}"
    );
    for name in names {
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        assert!(
            scrape.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, which no node exports"
        );
    }
}
