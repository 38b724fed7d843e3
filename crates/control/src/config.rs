//! The control plane's settings and their defaults, and their translation into
//! openraft's `Config`.
//!
//! # Why these timing defaults (heartbeat 10 ms, election timeout 30-40 ms)
//!
//! How fast a new master takes over is set by the leader lease, `election_timeout_max`:
//! while it runs, the voters refuse to vote for anyone else. openraft 0.9 then waits a
//! further random timeout in `[min, max)`, checked on a tick every 1.5 heartbeats; the
//! fast-election watchdog (see `election`, on by default) campaigns at lease + 5 ms
//! instead. Measured on this 2-core machine, three in-process voters, leader cut off
//! (`time_from_leader_loss_to_new_leader_with_defaults`): a new leader after 37-72 ms,
//! median about 43 ms; without the watchdog 85-130 ms, median 100-120 ms. openraft's own
//! defaults (50/150/300) would take about half a second. (Those figures are for the
//! earlier 20/40-60; session 2 moved to 10/30-40 so that a master's lease, 20 ms after a
//! quorum acknowledged it, stays shorter than the time before anyone can campaign.)
//!
//! The floor is set by the disk and the CPU, not by the LAN:
//!
//! - an AppendEntries must complete within one heartbeat interval (openraft's timeout
//!   for it), and it includes the follower's fsync (about 4 ms here);
//! - openraft 0.9's core waits for each log fsync on the leader, so a leader whose disk
//!   stalls sends no heartbeats meanwhile: the lease must exceed the worst fsync stall,
//!   and a lease of 3 heartbeat intervals (60 ms) leaves about 40 ms of slack;
//! - a busy two-core machine must not delay heartbeats by a lease: the runtime should run
//!   the control plane on threads that guest execution cannot starve, and keep its
//!   directory off the disk the function logs saturate if it can.
//!
//! A follower that is merely slow itself does not campaign: the watchdog asks the Raft
//! core, behind the heartbeats already queued, before it starts an election. Raise
//! `election_timeout_max_ms` (and `min`) if false elections show under load; failover time
//! grows with it one for one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::SnapshotPolicy;

use crate::ids::NodeId;
use crate::lateness::Lateness;

pub const HEARTBEAT_MS_DEFAULT: u64 = 10;
pub const ELECTION_TIMEOUT_MIN_MS_DEFAULT: u64 = 30;
pub const ELECTION_TIMEOUT_MAX_MS_DEFAULT: u64 = 40;
pub const SNAPSHOT_LOGS_SINCE_LAST_DEFAULT: u64 = 1000;
pub const LOGS_KEPT_AFTER_SNAPSHOT_DEFAULT: u64 = 200;
pub const PROPOSE_TIMEOUT_MS_DEFAULT: u64 = 2000;
pub const UNREACHABLE_BACKOFF_MS_DEFAULT: u64 = 100;
pub const BOOT_QUIET_MS_DEFAULT: u64 = 1000;
pub const SNAPSHOT_CHUNK_TIMEOUT_MS_DEFAULT: u64 = 1000;
pub const SNAPSHOT_CHUNK_BYTES_DEFAULT: u64 = 1 << 20;

/// Settings of one node's control plane.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// This node's id; the directory remembers it and refuses another.
    pub node_id: NodeId,
    /// Where the Raft log and the snapshot live.
    pub dir: PathBuf,
    /// How often the leader sends heartbeats; also openraft's timeout for one append.
    pub heartbeat_ms: u64,
    /// Lower bound of a voter's election timeout; also the timeout of a vote request.
    pub election_timeout_min_ms: u64,
    /// Upper bound of a voter's election timeout; also the leader's lease.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log behind a snapshot, so a follower slightly behind catches
    /// up from the log rather than from a snapshot.
    pub logs_kept_after_snapshot: u64,
    /// How long `propose` waits for a command to be committed and applied.
    pub propose_timeout_ms: u64,
    /// How long replication leaves a node alone after the transport said unreachable.
    pub unreachable_backoff_ms: u64,
    /// Timeout for sending one snapshot chunk.
    pub snapshot_chunk_timeout_ms: u64,
    /// Size of one snapshot chunk.
    pub snapshot_chunk_bytes: u64,
    /// Campaign as soon as the leader's lease has run out, in node-id order, rather than
    /// after openraft's extra random timeout (see the `election` module).
    pub fast_election: bool,
    /// A node that starts does not campaign until it has heard from a leader, or until
    /// this long has passed without one (see `election::boot_quiet`).
    pub boot_quiet_ms: u64,
    /// This process's local health (see `lateness`): the fast-election watchdog waits
    /// longer while it is high. The runtime shares it with its failure detector and
    /// feeds it; nothing in this crate measures it, so alone it stays 0.
    pub lateness: Arc<Lateness>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid control plane settings: {0}")]
    Invalid(String),
}

impl ControlConfig {
    /// The defaults (see the module documentation) for node `node_id` keeping its files
    /// in `dir`.
    pub fn new(node_id: NodeId, dir: impl Into<PathBuf>) -> ControlConfig {
        ControlConfig {
            node_id,
            dir: dir.into(),
            heartbeat_ms: HEARTBEAT_MS_DEFAULT,
            election_timeout_min_ms: ELECTION_TIMEOUT_MIN_MS_DEFAULT,
            election_timeout_max_ms: ELECTION_TIMEOUT_MAX_MS_DEFAULT,
            snapshot_logs_since_last: SNAPSHOT_LOGS_SINCE_LAST_DEFAULT,
            logs_kept_after_snapshot: LOGS_KEPT_AFTER_SNAPSHOT_DEFAULT,
            propose_timeout_ms: PROPOSE_TIMEOUT_MS_DEFAULT,
            unreachable_backoff_ms: UNREACHABLE_BACKOFF_MS_DEFAULT,
            snapshot_chunk_timeout_ms: SNAPSHOT_CHUNK_TIMEOUT_MS_DEFAULT,
            snapshot_chunk_bytes: SNAPSHOT_CHUNK_BYTES_DEFAULT,
            fast_election: true,
            boot_quiet_ms: BOOT_QUIET_MS_DEFAULT,
            lateness: Arc::new(Lateness::new(Duration::from_millis(
                2 * HEARTBEAT_MS_DEFAULT,
            ))),
        }
    }

    /// openraft's configuration for these settings.
    ///
    /// Fails unless `0 < heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms`
    /// and the snapshot settings are positive.
    pub fn raft_config(&self) -> Result<openraft::Config, Error> {
        if self.heartbeat_ms == 0
            || self.snapshot_logs_since_last == 0
            || self.snapshot_chunk_bytes == 0
        {
            return Err(Error::Invalid(
                "heartbeat_ms, snapshot_logs_since_last and snapshot_chunk_bytes must be positive"
                    .into(),
            ));
        }
        let config = openraft::Config {
            cluster_name: "understudy".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.snapshot_chunk_timeout_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            // Enabled once the node has heard from a leader (see `election::boot_quiet`).
            enable_elect: false,
            ..openraft::Config::default()
        };
        config.validate().map_err(|e| Error::Invalid(e.to_string()))
    }
}
