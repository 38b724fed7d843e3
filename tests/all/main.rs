//! Understudy's integration tests: one binary (as wasmtime and tokio do), one module per
//! area and topic. Every test starts real `understudy node` processes on their own port
//! and data directory, so tests run in parallel, and kills them for real.
//!
//! The guest components must be built first: `scripts/build-guests.sh`.
//! Run: `cargo test --release --test all`.

mod history;
mod list_append;
mod netns;
mod support;

mod cluster_distributed;
mod cluster_failover;
mod cluster_form;
mod cluster_netns;
mod cluster_replication;
mod cluster_setup;
mod cluster_traces;
mod console_browser;
mod crash_recovery;
mod http_admin;
mod http_connections;
mod http_disconnect;
mod http_edge;
mod http_errors;
mod http_examples;
mod http_idempotency;
mod http_metrics;
mod http_tokens;
mod nemesis;
mod node_shutdown;
mod regressions;
mod storage_artifacts;
mod storage_modes;
mod txn_isolation;
mod wal_damage;
mod wasm_deploy;
mod wasm_host;
mod wasm_languages;
mod wasm_limits;
