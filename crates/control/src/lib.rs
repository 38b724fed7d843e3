//! The Understudy control plane: a Raft group (openraft 0.9) whose leader is the
//! master. It holds the cluster's state (nodes, functions, and each function's
//! assignment: epoch, primary, backups) and is the only place that decides placement and
//! epochs.
//!
//! - `state`, `command`, `placement`: the cluster state, the commands that change it and
//!   where copies go. Pure and deterministic: no I/O, no clock.
//! - `storage`: the Raft log and the snapshot on disk, behind openraft's storage traits.
//! - `wire`, `network`: the messages between control planes and the [`RaftTransport`]
//!   seam the runtime implements over QUIC. This crate does no networking of its own.
//! - `plane`, `config`, `election`: [`ControlPlane`], the runtime's handle, its settings,
//!   and the watchdog that campaigns as soon as a lost leader's lease runs out.
//! - `lateness`: local health, how late this process's own timers run; failure
//!   timeouts and the watchdog scale with it (after Lifeguard).

pub mod command;
pub mod config;
pub mod election;
pub mod ids;
pub mod lateness;
mod network;
pub mod placement;
pub mod plane;
pub mod state;
pub mod storage;
pub mod types;
pub mod wire;

pub use command::{Command, HostProblem, Rejection, Response};
pub use config::ControlConfig;
pub use ids::{Epoch, NodeId};
pub use lateness::{Lateness, LocalHealth};
pub use openraft::ServerState;
pub use placement::{
    plan_failover, plan_rebalance, plan_repair, FailoverPlan, Placement, Shortfall,
};
pub use plane::{ControlPlane, Error, Status};
pub use state::{
    Assignment, CallGrants, ClusterState, Function, Health, Load, Node, NodeStatus, Role,
};
pub use types::{Peer, TypeConfig};
pub use wire::{BoxFuture, ForwardError, RaftMessage, RaftReply, RaftTransport, TransportError};
