//! Understudy: a WebAssembly function runtime in which every invocation is a
//! transaction on the function's own key-value state. See ARCHITECTURE.md for the map.

pub mod cluster;
pub mod config;
pub mod failpoint;
pub mod files;
pub mod http;
pub mod ids;
pub mod lock;
pub mod metrics;
pub mod node;
pub mod rates;
pub mod replication;
#[doc(hidden)]
pub mod sim_support;
pub mod store;
pub mod trace;
pub mod twophase;
pub mod txn;
pub mod wal;
pub mod wasm;
