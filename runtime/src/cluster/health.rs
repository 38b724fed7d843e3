//! The master's failure detector: every node pings the master over the `Control`
//! channel every heartbeat (asking for its lease, see `lease`) and, when one stays
//! silent past the failure timeout, commits its verdict and the plan that
//! follows from it (`plan_failover`: promote a backup where the node was primary, drop it
//! where it was a backup, add backups on free nodes). When a node answers again it is
//! marked up, and `plan_repair` gives under-replicated functions backups again (a
//! returning node rejoins as a catching-up backup).
//!
//! Every node runs the detector; only the master acts. A new master gives every node a
//! full timeout from the moment it took over before judging it.
//!
//! # A slow node is not a dead node
//!
//! On a busy machine the silence the master measures is partly its own: pings that
//! arrived while it was starved of CPU sit unread. After Lifeguard, the timeout adapts
//! to local health (`understudy_control::lateness`, measured by `lease::measure`):
//!
//! - the timeout for node `n` is the failure timeout times (1 + the higher of the
//!   master's own score and the score `n` reported in its last ping): a master that runs
//!   late, or a node that said it does, is given longer;
//! - right after the master itself stalled (a late tick seen since its last round), it
//!   judges nobody that round, so the pings queued meanwhile are read first;
//! - a suspect heard again while its verdict waits for its last lease to run out is
//!   not declared down (the suspicion is refuted), and gets leases again.
//!
//! Leases are not scaled: they stay shorter than the base timeout, the shortest any
//! master uses, so a longer timeout only adds margin. On a quiet machine every score is
//! 0 and detection takes the base timeout.

use std::sync::Weak;
use std::time::{Duration, Instant};

use understudy_control::{
    plan_failover, plan_rebalance, plan_repair, Command, FailoverPlan, Health, NodeId, NodeStatus,
};

use super::Cluster;

/// How often the master re-checks for under-replicated functions when nothing else
/// happens.
const REPAIR_EVERY: Duration = Duration::from_secs(1);
/// A new master hands the primaries it holds over to their backups (see
/// `plan_rebalance`) once it has led this long, one function per `REBALANCE_EVERY`.
const REBALANCE_AFTER: Duration = Duration::from_millis(200);
const REBALANCE_EVERY: Duration = Duration::from_millis(50);

/// A failover or recovery the master carried out, for status and the drill.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Event {
    pub node: u64,
    /// "down" or "up".
    pub verdict: &'static str,
    /// Milliseconds since the Unix epoch when the verdict was reached (before it was
    /// committed).
    pub at_ms: f64,
    /// Silence before the verdict, in milliseconds.
    pub silent_ms: f64,
    /// Time to commit the verdict and the plan, in milliseconds.
    pub commit_ms: f64,
    /// The plan's steps as committed, each with its time since the verdict.
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Step {
    pub command: String,
    /// Milliseconds from the verdict to this step committed.
    pub ms: f64,
}

pub async fn run(cluster: Weak<Cluster>, interval: Duration) {
    // The late ticks seen at the last round, and whether that round judged.
    let mut late_ticks = 0u64;
    let mut judged = true;
    let mut leading_since: Option<Instant> = None;
    // The leader this node followed: when it takes over, that one has been silent since
    // this node last heard from it (an election needs that), not since the takeover.
    let mut followed: Option<NodeId> = None;
    let mut old_leader: Option<(NodeId, Instant)> = None;
    let mut repaired_at = Instant::now();
    let mut rebalanced_at = Instant::now();
    let rebalancing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let waiting = Instant::now();
        ticker.tick().await;
        let Some(c) = cluster.upgrade() else { return };
        // Waiting longer than an interval for the tick means this process stalled: the
        // detector's own evidence, beside `lease::measure`'s (whichever wakes first).
        c.lateness
            .observe(Instant::now(), waiting.elapsed().saturating_sub(interval));
        let leader = c.control.leader();
        if leader != Some(c.id) {
            leading_since = None;
            old_leader = None;
            if leader.is_some() {
                followed = leader;
            }
            continue;
        }
        let now = Instant::now();
        let since = *leading_since.get_or_insert_with(|| {
            if let Some(old) = followed.take() {
                old_leader = Some((old, c.control.last_leader_contact().into_std()));
            }
            now
        });
        let state = c.control.state();
        // Right after this process stalled, read what queued up before judging anyone
        // (once: under a lasting load the scaled timeouts do the rest).
        let late_now = c.lateness.late_ticks();
        let stalled = late_now != late_ticks;
        late_ticks = late_now;
        if stalled && judged {
            judged = false;
            continue;
        }
        judged = true;
        let own = c.lateness.score();
        let Verdicts { down, up, .. } = {
            let mut grants = c.grants.lock();
            // Nodes ping the master they know: a new master gives each a full timeout
            // from its takeover, except the master it replaced.
            let last = |n: NodeId| {
                let floor = match old_leader {
                    Some((old, contact)) if old == n => contact,
                    _ => since,
                };
                grants
                    .pinged
                    .get(&n)
                    .copied()
                    .map_or(floor, |p| p.max(floor))
            };
            let timeout = |n: NodeId| {
                let reported = grants.lateness.get(&n).copied().unwrap_or(0);
                understudy_control::lateness::scaled(c.failure_timeout, own.max(reported))
            };
            let verdicts = verdicts(&state, c.id, last, now, timeout);
            // A suspect gets no lease from now on; the verdict waits for the last one it
            // got to run out (see `declare`).
            for (n, _) in &verdicts.down {
                grants.suspected.insert(*n);
            }
            for n in verdicts.up.iter().chain(&verdicts.heard) {
                grants.suspected.remove(n);
            }
            verdicts
        };
        for (node, silent) in down {
            c.declare(node, Health::Down, silent, now).await;
        }
        for node in up {
            c.declare(node, Health::Up, Duration::ZERO, now).await;
        }
        // Draining nodes: their copies move away, one step per tick.
        let draining: Vec<NodeId> = state
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Draining && n.health == Health::Up)
            .filter(|n| !state.functions_on(n.id).is_empty())
            .map(|n| n.id)
            .collect();
        for node in draining {
            c.drain_step(node).await;
        }
        // Announce this master, so that placement keeps primaries off it; then, while
        // every node is up, hand over the primaries it holds.
        if state.master != Some(c.id) {
            if let Err(e) = c
                .timed(c.control.propose(Command::MasterIs { node: c.id }))
                .await
            {
                tracing::warn!(error = %e, "cannot announce this master");
            }
        } else if now.duration_since(since) >= REBALANCE_AFTER
            && rebalanced_at.elapsed() >= REBALANCE_EVERY
            && state
                .nodes
                .values()
                .all(|n| n.health == Health::Up || n.status == NodeStatus::Removed)
        {
            rebalanced_at = Instant::now();
            // In a task of its own: it waits for a function's lock, which a transaction
            // may hold for a while, and the detector must not.
            if !rebalancing.swap(true, std::sync::atomic::Ordering::AcqRel) {
                let (c, rebalancing) = (c.clone(), rebalancing.clone());
                tokio::spawn(async move {
                    c.rebalance_step().await;
                    rebalancing.store(false, std::sync::atomic::Ordering::Release);
                });
            }
        }
        if repaired_at.elapsed() >= REPAIR_EVERY {
            repaired_at = Instant::now();
            let plan = plan_repair(&c.control.state());
            c.carry_out(&plan).await;
        }
    }
}

/// What the master concludes in one tick of the failure detector.
#[derive(Debug, Default, PartialEq, Eq)]
struct Verdicts {
    /// Up, and silent for at least the timeout (with how long).
    down: Vec<(NodeId, Duration)>,
    /// Down, and heard from within the timeout; or the master itself, if an earlier
    /// master declared it down (it leads: it is alive).
    up: Vec<NodeId>,
    /// Up and heard from: no longer suspects.
    heard: Vec<NodeId>,
}

/// The verdicts of master `me` at `now`, `last(n)` being when it last heard from `n`
/// and `timeout(n)` how long `n` may be silent.
fn verdicts(
    state: &understudy_control::ClusterState,
    me: NodeId,
    last: impl Fn(NodeId) -> Instant,
    now: Instant,
    timeout: impl Fn(NodeId) -> Duration,
) -> Verdicts {
    let mut verdicts = Verdicts::default();
    for n in state.nodes.values() {
        if n.status == NodeStatus::Removed {
            continue;
        }
        if n.id == me {
            if n.health == Health::Down {
                verdicts.up.push(me);
            }
            continue;
        }
        let silent = now.saturating_duration_since(last(n.id));
        match (silent >= timeout(n.id), n.health) {
            (true, Health::Up) => verdicts.down.push((n.id, silent)),
            (false, Health::Down) => verdicts.up.push(n.id),
            (false, Health::Up) => verdicts.heard.push(n.id),
            (true, Health::Down) => {}
        }
    }
    verdicts
}

impl Cluster {
    /// Commit `health` for `node`, then the plan that follows from it. `judged_at` is
    /// when the verdict was reached: a suspect heard from after it is not declared down.
    async fn declare(&self, node: NodeId, health: Health, silent: Duration, judged_at: Instant) {
        if health == Health::Down {
            // The node may still hold a lease this master granted: no one takes its
            // place before that has run out.
            let granted = self.grants.lock().granted.get(&node).copied();
            if let Some(end) = granted.map(|g| g + self.lease_for) {
                let now = Instant::now();
                if end > now {
                    tokio::time::sleep(end - now).await;
                }
            }
            let refuted = {
                let mut grants = self.grants.lock();
                let heard = grants.pinged.get(&node).is_some_and(|p| *p > judged_at);
                if heard {
                    grants.suspected.remove(&node);
                }
                heard
            };
            if refuted {
                self.node.metrics().cluster.suspicions_refuted.inc();
                tracing::info!(%node, silent_ms = silent.as_secs_f64() * 1000.0, "suspicion refuted: the node was heard before its verdict was committed");
                return;
            }
        }
        let started = Instant::now();
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let verdict = match health {
            Health::Down => "down",
            Health::Up => "up",
        };
        match self
            .timed(self.control.propose(Command::SetHealth { node, health }))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%node, verdict, error = %e, "cannot commit a health verdict");
                return;
            }
        }
        let state = self.control.state();
        let plan = match health {
            // Every backup in the set holds every acknowledged commit (the primary waits
            // for all of them), so any of them may take over.
            Health::Down => plan_failover(&state, node, |_, _| true),
            Health::Up => plan_repair(&state),
        };
        let steps = self
            .carry_out(&plan)
            .await
            .into_iter()
            .map(|(command, at)| Step {
                command,
                ms: at.duration_since(started).as_secs_f64() * 1000.0,
            })
            .collect();
        let event = Event {
            node: node.0,
            verdict,
            at_ms,
            silent_ms: silent.as_secs_f64() * 1000.0,
            commit_ms: started.elapsed().as_secs_f64() * 1000.0,
            steps,
        };
        if health == Health::Down {
            let metrics = &self.node.metrics().cluster;
            metrics
                .failover_detection_seconds
                .observe(silent.as_secs_f64());
            metrics
                .failover_promotion_seconds
                .observe(event.commit_ms / 1000.0);
        }
        let commands: Vec<&str> = event.steps.iter().map(|s| s.command.as_str()).collect();
        tracing::warn!(node = %node, verdict, silent_ms = event.silent_ms, commit_ms = event.commit_ms, ?commands, "node health changed");
        let mut events = self.events.lock();
        events.push(event);
        let excess = events.len().saturating_sub(64);
        events.drain(..excess);
    }

    /// As master: hand one primary this node holds over to a backup (it steps down under
    /// the function's lock first, as a drained node does), and take a copy back as a
    /// catching-up backup.
    async fn rebalance_step(&self) {
        let plan = plan_rebalance(&self.control.state());
        let Some(Command::Promote {
            function,
            new_primary,
            expected_epoch,
        }) = plan.commands.first().cloned()
        else {
            return;
        };
        let epoch = expected_epoch;
        self.step_down_here(&function, epoch).await;
        if !self
            .finish_handover(&plan.commands[0], &function, epoch, true)
            .await
        {
            return;
        }
        let rest = FailoverPlan {
            commands: plan.commands[1..].to_vec(),
            shortfalls: plan.shortfalls.clone(),
        };
        let done = self.carry_out(&rest).await;
        tracing::info!(%function, to = %new_primary, steps = ?done, "handed a primary over: the master keeps none where a backup can serve");
    }

    /// Propose `plan`'s commands in order; returns what was applied and when, for the
    /// record.
    pub(super) async fn carry_out(&self, plan: &FailoverPlan) -> Vec<(String, Instant)> {
        let mut done = Vec::new();
        for command in &plan.commands {
            match self.timed(self.control.propose(command.clone())).await {
                Ok(understudy_control::Response::Rejected(why)) => {
                    tracing::info!(?command, %why, "plan step rejected (the state moved on)");
                }
                Ok(_) => done.push((describe(command), Instant::now())),
                Err(e) => {
                    tracing::warn!(?command, error = %e, "cannot commit a plan step");
                    break;
                }
            }
        }
        for shortfall in &plan.shortfalls {
            tracing::warn!(?shortfall, "the cluster cannot fully repair this");
        }
        done
    }
}

fn describe(command: &Command) -> String {
    match command {
        Command::Promote {
            function,
            new_primary,
            expected_epoch,
        } => format!(
            "promote {new_primary} for {function} (epoch {} -> {})",
            expected_epoch.0,
            expected_epoch.0 + 1
        ),
        Command::RemoveBackup { function, node, .. } => {
            format!("drop backup {node} of {function}")
        }
        Command::Renew {
            function,
            primary,
            expected_epoch,
        } => format!(
            "renew {primary} as primary of {function} after a restart (epoch {} -> {})",
            expected_epoch.0,
            expected_epoch.0 + 1
        ),
        Command::AddBackup { function, node, .. } => {
            format!("add backup {node} to {function} (catching up)")
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use understudy_control::{ClusterState, Command, Role};

    use super::*;

    fn cluster() -> ClusterState {
        let mut state = ClusterState::default();
        for id in 1..=3 {
            state.apply(&Command::RegisterNode {
                id: NodeId(id),
                peer_addr: format!("127.0.0.1:{id}"),
                http_addr: String::new(),
                role: Role::Voter,
            });
        }
        state
    }

    #[test]
    fn silent_nodes_go_down_and_heard_ones_come_back() {
        let mut state = cluster();
        state.apply(&Command::SetHealth {
            node: NodeId(3),
            health: Health::Down,
        });
        let now = Instant::now();
        let timeout = Duration::from_millis(20);
        let last = |n: NodeId| match n.0 {
            2 => now - Duration::from_millis(50),
            _ => now - Duration::from_millis(5),
        };
        let v = verdicts(&state, NodeId(1), last, now, |_| timeout);
        assert_eq!(v.down, vec![(NodeId(2), Duration::from_millis(50))]);
        assert_eq!(v.up, vec![NodeId(3)]);
        assert!(v.heard.is_empty());
    }

    #[test]
    fn a_node_that_reported_running_late_gets_a_longer_timeout() {
        // Both silent 50 ms; node 3 said its timers ran late (score 3: 4 x 20 ms).
        let state = cluster();
        let now = Instant::now();
        let base = Duration::from_millis(20);
        let reported = |n: NodeId| if n.0 == 3 { 3 } else { 0 };
        let timeout = |n: NodeId| understudy_control::lateness::scaled(base, reported(n));
        let last = |_| now - Duration::from_millis(50);
        let v = verdicts(&state, NodeId(1), last, now, timeout);
        assert_eq!(v.down, vec![(NodeId(2), Duration::from_millis(50))]);
        assert_eq!(v.heard, vec![NodeId(3)]);
        // The same silence past the scaled timeout is a verdict.
        let last = |_| now - Duration::from_millis(80);
        let v = verdicts(&state, NodeId(1), last, now, timeout);
        assert_eq!(v.down.len(), 2);
    }

    #[test]
    fn a_master_that_an_earlier_master_declared_down_declares_itself_up() {
        // Node 2 was declared down (paused, cut off), then won an election: nothing else
        // would ever mark it up (no master pings itself), and its copies would never come
        // back (the nemesis saw a cluster that never healed that way).
        let mut state = cluster();
        state.apply(&Command::SetHealth {
            node: NodeId(2),
            health: Health::Down,
        });
        let now = Instant::now();
        let v = verdicts(
            &state,
            NodeId(2),
            |_| now,
            now,
            |_| Duration::from_millis(20),
        );
        assert_eq!(v.up, vec![NodeId(2)]);
        assert!(v.down.is_empty());
        let healthy = verdicts(
            &cluster(),
            NodeId(2),
            |_| now,
            now,
            |_| Duration::from_millis(20),
        );
        assert!(healthy.up.is_empty(), "an up master has nothing to declare");
    }
}
