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
}
