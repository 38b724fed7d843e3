//! The node's metrics, exported at `GET /metrics` in Prometheus text format.
//!
//! Metrics are recorded by whoever observes the event (the invocation path, the log
//! writer, the replication senders, the failure detector, two-phase commit); gauges of
//! the cluster's state (lag, epochs, the Raft term, the lease) are sampled when
//! `/metrics` is read (`Cluster::sample_metrics`). This module only owns their
//! definitions and the registry; `cluster` the cluster's (`ClusterMetrics`).

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
pub struct BackupLabels {
    pub backup: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionBackupLabels {
    pub function: String,
    pub backup: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeHealthLabels {
    pub node: String,
    /// `up` or `down`.
    pub health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `commit` or `abort`.
    pub outcome: String,
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
    /// Per function, set at each scrape: its keys, the bytes of its keys and values,
    /// and its remembered answers (what `limits.state_*_max` and
    /// `idempotency_keys_max` cap).
    pub function_state_keys: Family<FunctionLabels, Gauge>,
    pub function_state_bytes: Family<FunctionLabels, Gauge>,
    pub function_idempotency_keys: Family<FunctionLabels, Gauge>,
    /// The node process's resident memory, set at each scrape.
    pub resident_memory_bytes: Gauge,
    /// Guest threads running a guest, and guests' runs waiting for a thread, set at
    /// each scrape.
    pub guest_threads_busy: Gauge,
    pub guest_runs_waiting: Gauge,
    /// Recent throughput and latency per function, for the console.
    pub rates: crate::rates::Rates,
    pub cluster: ClusterMetrics,
}

/// The cluster's series: replication, failover, leases and Raft, catch-ups, two-phase
/// commit. They stay absent (no samples) on a node that runs alone.
pub struct ClusterMetrics {
    /// Entries a primary shipped to each backup node (resends included).
    pub replication_shipped_entries: Family<BackupLabels, Counter>,
    /// Bytes of replication requests sent to each backup node.
    pub replication_shipped_bytes: Family<BackupLabels, Counter>,
    /// Appends batched into one request.
    pub replication_batch_appends: Histogram,
    /// From a replication request sent to its answer.
    pub replication_ack_latency_seconds: Histogram,
    /// Replication requests that got no answer (the engines resend).
    pub replication_requests_failed: Family<BackupLabels, Counter>,
    /// How far each backup is behind its primary here, in entries (sampled).
    pub replication_lag_entries: Family<FunctionBackupLabels, Gauge>,
    /// Health verdicts as this node applied them.
    pub node_health_changes: Family<NodeHealthLabels, Counter>,
    /// Backups promoted because their primary's node was declared down.
    pub promotions: Family<FunctionLabels, Counter>,
    /// Primaries moved off a live node (drain, rebalance, restart).
    pub handovers: Family<FunctionLabels, Counter>,
    /// New epochs of each function's configuration.
    pub epoch_changes: Family<FunctionLabels, Counter>,
    /// Each function's epoch (sampled).
    pub function_epoch: Family<FunctionLabels, Gauge>,
    /// As master: silence before a node was declared down.
    pub failover_detection_seconds: Histogram,
    /// As master: from a down verdict to its plan (the promotions) committed.
    pub failover_promotion_seconds: Histogram,
    /// Raft term as this node knows it (sampled).
    pub raft_term: Gauge,
    /// 1 while this node leads the Raft group (is master), else 0 (sampled).
    pub raft_leader: Gauge,
    /// Changes of Raft leader this node saw.
    pub raft_leader_changes: Counter,
    /// Raft log entries applied here (sampled).
    pub raft_applied_index: Gauge,
    /// From a command proposed here to its being applied (deploys, verdicts, promotions).
    pub raft_commit_latency_seconds: Histogram,
    /// 1 while this node holds its lease, else 0 (sampled).
    pub lease_held: Gauge,
    /// Since this node's lease was last renewed (sampled; the lateness of the lease).
    pub lease_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// How late the links runtime's 1 ms timer ran, each tick (its own lateness: CPU
    /// starvation of the threads that carry heartbeats, leases and Raft).
    pub timer_lateness_seconds: Histogram,
    /// This node's local health score (0: its timers run on time; up to 8).
    pub local_health_score: Gauge,
    /// The failure timeout this node would use now as master, for a node whose own score
    /// is 0 (the base times 1 + its local health score).
    pub failure_timeout_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// As master: each node's local health score as its last ping reported it, and the
    /// failure timeout in use for it (sampled).
    pub peer_local_health_score: Family<NodeLabels, Gauge>,
    pub peer_failure_timeout_seconds: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// As master: suspicions dropped because the suspect was heard before the verdict
    /// was committed (it was slow, not dead).
    pub suspicions_refuted: Counter,
    /// Snapshot catch-ups of a backup that completed, their bytes and durations.
    pub catchups: Counter,
    pub catchup_bytes: Counter,
    pub catchup_duration_seconds: Histogram,
    /// Two-phase commit: parts prepared here, decisions taken here as coordinator.
    pub twophase_prepared: Counter,
    pub twophase_decided: Family<DecisionLabels, Counter>,
    /// In-doubt transactions a promoted copy found, and how each was resolved.
    pub twophase_in_doubt_found: Counter,
    pub twophase_in_doubt_resolved: Family<DecisionLabels, Counter>,
    pub twophase_in_doubt_resolution_seconds: Histogram,
    /// In-doubt transactions held here now (sampled).
    pub twophase_in_doubt: Gauge,
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
        let function_state_keys = Family::<FunctionLabels, Gauge>::default();
        let function_state_bytes = Family::<FunctionLabels, Gauge>::default();
        let function_idempotency_keys = Family::<FunctionLabels, Gauge>::default();
        let resident_memory_bytes = Gauge::default();
        let guest_threads_busy = Gauge::default();
        let guest_runs_waiting = Gauge::default();
        registry.register(
            "guest_threads_busy",
            "Guest threads running a guest (each function gets a fair share of them)",
            guest_threads_busy.clone(),
        );
        registry.register(
            "guest_runs_waiting",
            "Runs of guests waiting for a guest thread",
            guest_runs_waiting.clone(),
        );
        registry.register(
            "function_state_keys",
            "Keys in each function's state",
            function_state_keys.clone(),
        );
        registry.register(
            "function_state_bytes",
            "Bytes of keys and values in each function's state",
            function_state_bytes.clone(),
        );
        registry.register(
            "function_idempotency_keys",
            "Answers each function remembers for idempotency keys",
            function_idempotency_keys.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Resident memory of the node process",
            resident_memory_bytes.clone(),
        );
        let rates = crate::rates::Rates::default();
        let cluster = ClusterMetrics::register(&mut registry);
        Metrics {
            function_state_keys,
            function_state_bytes,
            function_idempotency_keys,
            resident_memory_bytes,
            guest_threads_busy,
            guest_runs_waiting,
            rates,
            cluster,
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

impl ClusterMetrics {
    fn register(registry: &mut Registry) -> ClusterMetrics {
        // 50 us .. ~1.6 s: a loopback round trip to a stalled peer.
        let round_trip = || Histogram::new(exponential_buckets(50e-6, 2.0, 16));
        let m = ClusterMetrics {
            replication_shipped_entries: Family::default(),
            replication_shipped_bytes: Family::default(),
            replication_batch_appends: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            replication_ack_latency_seconds: round_trip(),
            replication_requests_failed: Family::default(),
            replication_lag_entries: Family::default(),
            node_health_changes: Family::default(),
            promotions: Family::default(),
            handovers: Family::default(),
            epoch_changes: Family::default(),
            function_epoch: Family::default(),
            failover_detection_seconds: round_trip(),
            failover_promotion_seconds: round_trip(),
            raft_term: Gauge::default(),
            raft_leader: Gauge::default(),
            raft_leader_changes: Counter::default(),
            raft_applied_index: Gauge::default(),
            raft_commit_latency_seconds: round_trip(),
            lease_held: Gauge::default(),
            lease_age_seconds: Gauge::default(),
            // 0.5 ms .. ~1 s.
            timer_lateness_seconds: Histogram::new(exponential_buckets(5e-4, 2.0, 12)),
            local_health_score: Gauge::default(),
            failure_timeout_seconds: Gauge::default(),
            suspicions_refuted: Counter::default(),
            peer_local_health_score: Family::default(),
            peer_failure_timeout_seconds: Family::default(),
            catchups: Counter::default(),
            catchup_bytes: Counter::default(),
            // 1 ms .. ~65 s.
            catchup_duration_seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 17)),
            twophase_prepared: Counter::default(),
            twophase_decided: Family::default(),
            twophase_in_doubt_found: Counter::default(),
            twophase_in_doubt_resolved: Family::default(),
            twophase_in_doubt_resolution_seconds: round_trip(),
            twophase_in_doubt: Gauge::default(),
        };
        let r = registry;
        r.register(
            "replication_shipped_entries",
            "Log entries shipped to each backup node, resends included",
            m.replication_shipped_entries.clone(),
        );
        r.register(
            "replication_shipped_bytes",
            "Bytes of replication requests sent to each backup node",
            m.replication_shipped_bytes.clone(),
        );
        r.register(
            "replication_batch_appends",
            "Appends (of one function each) batched into one replication request",
            m.replication_batch_appends.clone(),
        );
        r.register(
            "replication_ack_latency_seconds",
            "From a replication request sent to its acknowledgement",
            m.replication_ack_latency_seconds.clone(),
        );
        r.register(
            "replication_requests_failed",
            "Replication requests that got no answer (resent)",
            m.replication_requests_failed.clone(),
        );
        r.register(
            "replication_lag_entries",
            "How far each backup is behind this node's primary copy, in entries",
            m.replication_lag_entries.clone(),
        );
        r.register(
            "node_health_changes",
            "Health verdicts on nodes, as this node applied them",
            m.node_health_changes.clone(),
        );
        r.register("promotions", "Backups promoted because their primary's node was declared down, as this node applied them", m.promotions.clone());
        r.register(
            "handovers",
            "Primaries moved off a live node, as this node applied them",
            m.handovers.clone(),
        );
        r.register(
            "epoch_changes",
            "New epochs of each function's configuration, as this node applied them",
            m.epoch_changes.clone(),
        );
        r.register(
            "function_epoch",
            "Each function's epoch as this node knows it",
            m.function_epoch.clone(),
        );
        r.register(
            "failover_detection_seconds",
            "As master: silence of a node before it was declared down",
            m.failover_detection_seconds.clone(),
        );
        r.register(
            "failover_promotion_seconds",
            "As master: from a down verdict to its failover plan committed",
            m.failover_promotion_seconds.clone(),
        );
        r.register(
            "raft_term",
            "Raft term as this node knows it",
            m.raft_term.clone(),
        );
        r.register(
            "raft_leader",
            "1 while this node leads the Raft group (is master)",
            m.raft_leader.clone(),
        );
        r.register(
            "raft_leader_changes",
            "Changes of Raft leader this node saw",
            m.raft_leader_changes.clone(),
        );
        r.register(
            "raft_applied_index",
            "Raft log index applied on this node",
            m.raft_applied_index.clone(),
        );
        r.register(
            "raft_commit_latency_seconds",
            "From a control-plane command proposed on this node to its being applied",
            m.raft_commit_latency_seconds.clone(),
        );
        r.register(
            "lease_held",
            "1 while this node holds its lease (may serve as primary)",
            m.lease_held.clone(),
        );
        r.register(
            "lease_age_seconds",
            "Since this node's lease was last renewed",
            m.lease_age_seconds.clone(),
        );
        r.register(
            "timer_lateness_seconds",
            "How late the links runtime's 1 ms timer ran (CPU starvation of heartbeats, leases and Raft)",
            m.timer_lateness_seconds.clone(),
        );
        r.register(
            "local_health_score",
            "Local health score: 0 while this node's timers run on time, up to 8 (timeouts scale by 1 + score)",
            m.local_health_score.clone(),
        );
        r.register(
            "failure_timeout_seconds",
            "The failure timeout this node uses now as master for a node on time (base times 1 + local health score)",
            m.failure_timeout_seconds.clone(),
        );
        r.register(
            "peer_local_health_score",
            "As master: each node's local health score, as its last lease request reported it",
            m.peer_local_health_score.clone(),
        );
        r.register(
            "peer_failure_timeout_seconds",
            "As master: the failure timeout in use for each node (base times 1 + the higher score)",
            m.peer_failure_timeout_seconds.clone(),
        );
        r.register(
            "suspicions_refuted",
            "As master: suspects heard again before their down verdict was committed",
            m.suspicions_refuted.clone(),
        );
        r.register(
            "catchups",
            "Snapshot catch-ups of a backup completed by this node's primaries",
            m.catchups.clone(),
        );
        r.register(
            "catchup_bytes",
            "Bytes of snapshots sent to catching-up backups",
            m.catchup_bytes.clone(),
        );
        r.register(
            "catchup_duration_seconds",
            "Duration of each completed snapshot catch-up",
            m.catchup_duration_seconds.clone(),
        );
        r.register(
            "twophase_prepared",
            "Parts of distributed transactions prepared on this node",
            m.twophase_prepared.clone(),
        );
        r.register(
            "twophase_decided",
            "Distributed transactions decided by a coordinator on this node, by outcome",
            m.twophase_decided.clone(),
        );
        r.register(
            "twophase_in_doubt_found",
            "Prepared transactions a promoted copy found without an outcome",
            m.twophase_in_doubt_found.clone(),
        );
        r.register(
            "twophase_in_doubt_resolved",
            "In-doubt transactions resolved, by outcome",
            m.twophase_in_doubt_resolved.clone(),
        );
        r.register(
            "twophase_in_doubt_resolution_seconds",
            "From an in-doubt transaction found to its outcome applied",
            m.twophase_in_doubt_resolution_seconds.clone(),
        );
        r.register(
            "twophase_in_doubt",
            "In-doubt transactions held on this node now",
            m.twophase_in_doubt.clone(),
        );
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
