//! The node's metrics, exported at `GET /metrics` in Prometheus text format.
//!
//! Metrics are recorded by whoever observes the event (the invocation path, the log
//! writer); this module only owns their definitions and the registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub function: String,
    /// `commit`, `abort` (the handler's own error), `trap`, `deadline`, `conflict`, `replay`.
    pub outcome: String,
}

/// The outcomes an invocation is counted under.
pub const OUTCOMES: [&str; 7] = [
    "commit", "abort", "trap", "deadline", "conflict", "replay", "error",
];

pub struct Metrics {
    registry: Registry,
    /// Counters of `invocations` by function, looked up without allocating.
    invocation_counters:
        parking_lot::RwLock<std::collections::HashMap<String, [Counter; OUTCOMES.len()]>>,
    pub invocations: Family<OutcomeLabels, Counter>,
    pub commits: Counter,
    pub aborts: Counter,
    pub traps: Counter,
    pub commit_latency_seconds: Histogram,
    pub fsync_latency_seconds: Histogram,
    pub fsync_batch_records: Histogram,
    pub log_bytes: Counter,
    pub functions_deployed: Gauge,
    /// API connections refused because `http.connections_max` were open.
    pub http_connections_refused: Counter,
    /// API connections open now.
    pub http_connections_open: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("understudy");
        let invocations = Family::<OutcomeLabels, Counter>::default();
        let commits = Counter::default();
        let aborts = Counter::default();
        let traps = Counter::default();
        // 10 us .. ~2.6 s: from an in-memory commit to a stalled disk.
        let commit_latency_seconds = Histogram::new(exponential_buckets(10e-6, 2.0, 19));
        let fsync_latency_seconds = Histogram::new(exponential_buckets(50e-6, 2.0, 16));
        let fsync_batch_records = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let log_bytes = Counter::default();
        let functions_deployed = Gauge::default();
        let http_connections_refused = Counter::default();
        let http_connections_open = Gauge::default();
        registry.register(
            "http_connections_refused",
            "API connections refused because http.connections_max were open",
            http_connections_refused.clone(),
        );
        registry.register(
            "http_connections_open",
            "API connections open now",
            http_connections_open.clone(),
        );
        registry.register(
            "invocations",
            "Invocations by function and outcome",
            invocations.clone(),
        );
        registry.register("commits", "Committed transactions", commits.clone());
        registry.register(
            "aborts",
            "Transactions aborted by the handler's own error",
            aborts.clone(),
        );
        registry.register(
            "traps",
            "Transactions aborted by a trap, deadline or limit",
            traps.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "From the start of a transaction to its durable commit",
            commit_latency_seconds.clone(),
        );
        registry.register(
            "fsync_latency_seconds",
            "Duration of each log fsync",
            fsync_latency_seconds.clone(),
        );
        registry.register(
            "fsync_batch_records",
            "Log records made durable by one fsync",
            fsync_batch_records.clone(),
        );
        registry.register(
            "log_bytes",
            "Bytes appended to the write-ahead log",
            log_bytes.clone(),
        );
        registry.register(
            "functions_deployed",
            "Functions currently deployed",
            functions_deployed.clone(),
        );
        Metrics {
            registry,
            invocation_counters: Default::default(),
            invocations,
            commits,
            aborts,
            traps,
            commit_latency_seconds,
            fsync_latency_seconds,
            fsync_batch_records,
            log_bytes,
            functions_deployed,
            http_connections_refused,
            http_connections_open,
        }
    }

    /// Count one invocation of `function` ending in `outcome` (one of `OUTCOMES`).
    pub fn invocation(&self, function: &str, outcome: &str) {
        let index = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(OUTCOMES.len() - 1);
        if let Some(counters) = self.invocation_counters.read().get(function) {
            counters[index].inc();
            return;
        }
        let counters = OUTCOMES.map(|outcome| {
            self.invocations
                .get_or_create(&OutcomeLabels {
                    function: function.to_owned(),
                    outcome: outcome.to_owned(),
                })
                .clone()
        });
        counters[index].inc();
        self.invocation_counters
            .write()
            .insert(function.to_owned(), counters);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
