//! Leases: a node answers as a primary only while it holds one, so that a primary that
//! was cut off or paused (a zombie) stops serving — reads included, which replication
//! cannot fence — before the master can have promoted anyone in its place.
//!
//! Every node asks the master for a lease every heartbeat (`Ping`, sent at local time
//! `t`); the master's answer (`Pong`) carries its applied log index `i`. The lease then
//! runs until `t + lease`, and counts only once this node has applied `i` itself (so it
//! knows every change of role the master knew of when it answered). The master records
//! when each ping arrived, at or after `t`, and declares a node down only after
//! `failure_timeout` of silence: `lease < failure_timeout` means the lease has run out
//! first. Only local monotonic time is compared with local monotonic time.
//!
//! The master's own lease is Raft's: it counts while a quorum of voters acknowledged its
//! leadership within `lease`, shorter than the election timeout that must pass before
//! another voter can even campaign.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use understudy_control::{Epoch, NodeId, RaftMessage, RaftReply};
use understudy_net::Channel;

use super::Cluster;

/// What this node holds.
#[derive(Debug, Default)]
pub struct Lease {
    /// Granted by the master: valid until then, once `applied` is applied here.
    granted: Option<(Instant, u64)>,
    /// As master: when a quorum last acknowledged this node's leadership.
    quorum_acked_at: Option<Instant>,
    /// When the lease task last ran its tick: after a pause of the whole process, an
    /// old Raft report must not pass for a fresh one (see `run`).
    ticked_at: Option<Instant>,
}

pub type Shared = Mutex<Lease>;

/// As master: what it knows of the other nodes' leases.
#[derive(Debug, Default)]
pub struct Grants {
    /// When each node's last ping arrived (the failure detector's evidence).
    pub pinged: std::collections::HashMap<NodeId, Instant>,
    /// When this master last granted each node a lease: the node's lease ends at most
    /// `lease_for` after it.
    pub granted: std::collections::HashMap<NodeId, Instant>,
    /// Nodes the failure detector suspects: they get no lease until judged up again.
    pub suspected: std::collections::HashSet<NodeId>,
    /// Each node's local health score, as its last ping reported it: a node whose own
    /// timers run late gets a longer timeout (see `health`).
    pub lateness: std::collections::HashMap<NodeId, u8>,
}

impl Cluster {
    /// Whether the cluster state applied here names this node primary of `function` in
    /// `epoch`.
    pub fn names_primary(&self, function: &crate::ids::FunctionName, epoch: Epoch) -> bool {
        self.control
            .state()
            .assignments
            .get(function.as_str())
            .is_some_and(|a| a.primary == self.id && a.epoch.0 == epoch.0)
    }

    /// As master: answer `from`'s ping, granting it a lease unless this master holds no
    /// lease itself (it may have been deposed) or suspects `from`. `lateness` is the
    /// sender's local health score.
    pub fn answer_ping(&self, from: NodeId, lateness: u8) -> RaftReply {
        let leader = self.control.leader();
        let holds = leader == Some(self.id) && self.lease_ok();
        let applied = self.control.last_applied();
        let mut grants = self.grants.lock();
        let now = Instant::now();
        grants.pinged.insert(from, now);
        grants.lateness.insert(from, lateness);
        let grant = holds && !grants.suspected.contains(&from);
        let applied = if grant {
            grants.granted.insert(from, now);
            applied
        } else {
            None
        };
        RaftReply::Pong { leader, applied }
    }
    pub fn lease_ok(&self) -> bool {
        // Raft's metrics are read before the lease's lock is taken, never under it: a
        // watch borrow waits behind openraft's writer, which may wait for a borrow held
        // by a task that wants this lock.
        let leading = self.control.leader() == Some(self.id);
        let applied = self.control.last_applied();
        let now = Instant::now();
        let lease = self.lease.lock();
        if leading {
            let live = lease
                .ticked_at
                .is_some_and(|t| now.duration_since(t) < self.lease_for / 2);
            return live
                && lease
                    .quorum_acked_at
                    .is_some_and(|t| now.duration_since(t) < self.master_lease_for);
        }
        match lease.granted {
            Some((until, granted_at)) => now < until && applied.is_some_and(|a| a >= granted_at),
            None => false,
        }
    }
}

/// This node's lease as status shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LeaseStatus {
    /// Whether it may serve as a primary now.
    pub held: bool,
    /// Since the lease was last renewed (the request the master granted was sent; as
    /// master, since a quorum last acknowledged it), in milliseconds.
    pub renewed_ms_ago: Option<f64>,
    /// How far the last renewal is behind its schedule (one heartbeat), in milliseconds.
    pub late_ms: Option<f64>,
    /// How long a lease lasts, in milliseconds.
    pub for_ms: f64,
    /// As master: since each node's last lease request arrived, in milliseconds.
    pub pinged_ms_ago: std::collections::BTreeMap<u64, f64>,
    /// This node's local health score (0: its timers run on time; see
    /// `understudy_control::lateness`).
    pub local_health: u8,
    /// The failure timeout this node uses now as master for a node on time, in
    /// milliseconds (the base times 1 + `local_health`).
    pub failure_timeout_ms: f64,
}

impl Cluster {
    /// This node's lease now, for status, the console and the metrics.
    pub fn lease_status(&self) -> LeaseStatus {
        let leading = self.control.leader() == Some(self.id);
        let held = self.lease_ok();
        let now = Instant::now();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let renewed = {
            let lease = self.lease.lock();
            match leading {
                true => lease.quorum_acked_at,
                false => lease
                    .granted
                    .and_then(|(until, _)| until.checked_sub(self.lease_for)),
            }
        };
        let renewed_ms_ago = renewed.map(|t| ms(now.saturating_duration_since(t)));
        let pinged_ms_ago = match leading {
            true => self
                .grants
                .lock()
                .pinged
                .iter()
                .map(|(n, t)| (n.0, ms(now.saturating_duration_since(*t))))
                .collect(),
            false => Default::default(),
        };
        LeaseStatus {
            held,
            renewed_ms_ago,
            late_ms: renewed_ms_ago.map(|r| (r - ms(self.heartbeat)).max(0.0)),
            for_ms: ms(self.lease_for),
            pinged_ms_ago,
            local_health: self.lateness.score(),
            failure_timeout_ms: ms(self.lateness.scaled(self.failure_timeout)),
        }
    }
}

/// How often the lease task checks that it runs: a gap longer than half a lease means
/// the process (or this runtime) stalled.
const STALL_CHECK: Duration = Duration::from_millis(1);

/// How often `measure` sleeps and checks how late it woke.
const LATENESS_TICK: Duration = Duration::from_millis(1);

/// Measure this node's local health: sleep `LATENESS_TICK` again and again and feed how
/// late each wake-up was to the cluster's `Lateness` (see
/// `understudy_control::lateness`). A task of its own on the links runtime, doing
/// nothing else, so that what it measures is this process's starvation and not a slow
/// peer's answer. Runs until the cluster is dropped.
pub async fn measure(cluster: std::sync::Weak<Cluster>) {
    loop {
        let asleep = Instant::now();
        tokio::time::sleep(LATENESS_TICK).await;
        let Some(c) = cluster.upgrade() else { return };
        let now = Instant::now();
        // The timer wheel rounds up to the next millisecond: that much is on time.
        let late = now.duration_since(asleep).saturating_sub(LATENESS_TICK * 2);
        c.lateness.observe(now, late);
        c.node
            .metrics()
            .cluster
            .timer_lateness_seconds
            .observe(late.as_secs_f64());
    }
}

/// Pings sent and not answered yet, at most: past that, a ping is skipped.
const PINGS_IN_FLIGHT_MAX: usize = 8;

/// Ask the master for a lease every `interval`; as master, follow Raft's quorum
/// acknowledgements instead. Runs on the links runtime.
pub async fn run(cluster: std::sync::Weak<Cluster>, interval: Duration) {
    let mut ticker = tokio::time::interval(STALL_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut metrics = match cluster.upgrade() {
        Some(c) => c.control.metrics(),
        None => return,
    };
    let mut last_tick = Instant::now();
    let mut last_ping = Instant::now() - interval;
    let mut known_leader = None;
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(PINGS_IN_FLIGHT_MAX));
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let Some(c) = cluster.upgrade() else { return };
                let now = Instant::now();
                let stalled = now.duration_since(last_tick) > c.lease_for / 2;
                if stalled {
                    // This task was held up (the process paused?): a Raft report from
                    // before says nothing of now. Wait for a new one.
                    metrics.borrow_and_update();
                }
                {
                    let mut lease = c.lease.lock();
                    if stalled {
                        lease.quorum_acked_at = None;
                    }
                    lease.ticked_at = Some(now);
                }
                last_tick = now;
                if now.duration_since(last_ping) < interval {
                    continue;
                }
                last_ping = now;
            }
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                // As master: openraft reports how long ago a quorum acknowledged it, as
                // of the report; read promptly (the stall check above covers the rest),
                // the report is at most a little older than now.
                let Some(c) = cluster.upgrade() else { return };
                let (leader, acked) = {
                    let m = metrics.borrow_and_update();
                    let acked = (m.current_leader == Some(c.id))
                        .then_some(m.millis_since_quorum_ack)
                        .flatten();
                    (m.current_leader, acked)
                };
                if leader != known_leader {
                    // A new master: ask it for a lease at the next tick rather than up to
                    // a heartbeat later (a promoted primary waits for it).
                    known_leader = leader;
                    last_ping = Instant::now() - interval;
                }
                if let Some(ms) = acked {
                    let at = Instant::now()
                        .checked_sub(Duration::from_millis(ms + 1))
                        .unwrap_or_else(Instant::now);
                    c.lease.lock().quorum_acked_at = Some(at);
                }
                continue;
            }
        }
        let Some(c) = cluster.upgrade() else { return };
        let Some(leader) = c.control.leader() else {
            continue;
        };
        if leader == c.id {
            continue;
        }
        let Some(addr) = c
            .control
            .state()
            .nodes
            .get(&leader)
            .and_then(|n| n.peer_addr.parse().ok())
        else {
            continue;
        };
        let ping = RaftMessage::Ping {
            lateness: c.lateness.score(),
        };
        let Ok(body) = ping.encode() else {
            continue;
        };
        // Each ping on a task of its own: a slow answer must not hold back the next
        // ping, or the master would hear this node fall silent for its own delay.
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let sent = Instant::now();
        let (transport, lease_for, cluster) = (c.transport.clone(), c.lease_for, cluster.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let reply = transport
                .request_within(
                    leader.0,
                    addr,
                    Channel::Control,
                    bytes::Bytes::from(body),
                    lease_for,
                )
                .await;
            let Some(c) = cluster.upgrade() else { return };
            if let Ok(reply) = reply {
                if let Ok(RaftReply::Pong {
                    leader: Some(l),
                    applied: Some(applied),
                }) = RaftReply::decode(&reply)
                {
                    if l == leader {
                        // Answers may come back out of order: the latest ping's counts.
                        let mut lease = c.lease.lock();
                        let until = sent + lease_for;
                        if lease.granted.is_none_or(|(old, _)| until > old) {
                            lease.granted = Some((until, applied));
                        }
                    }
                }
            }
        });
    }
}
