//! The fast-election watchdog: starts an election as soon as the leader's lease has run
//! out, instead of openraft's lease plus a random election timeout.
//!
//! openraft 0.9 lets a follower campaign only after `election_timeout_max` (the leader
//! lease, during which the other voters refuse to vote) plus its own random timeout in
//! `[min, max)`. The random part is there to keep two followers from splitting the vote;
//! here a deterministic order does that instead: the voters are ranked by id, the lost
//! leader last, and rank `r` campaigns at `lease + margin + r * stagger` (stagger: half a
//! heartbeat interval) after it last heard from a leader or granted a vote. The first one
//! wins before the next one's turn, and its first append resets everyone else's clock.
//! Before campaigning it asks the Raft core when the vote was last refreshed: the core
//! handles messages in order, so a node that was only slow (a long fsync) sees the
//! heartbeats that queued meanwhile and stays quiet. The watchdog fires once per loss of
//! contact; openraft's own timer still retries if that election fails. It never makes an
//! election unsafe (any voter may campaign at any time in Raft), only earlier; the driver
//! here is the only part of the crate that reads the clock for elections.
//!
//! # A node that is late itself waits longer
//!
//! A process starved of CPU wakes to find its leader silent for as long as it slept:
//! the silence is its own. While its local health (see `lateness`) says its timers run
//! late, the watchdog waits the lease times (1 + score) before campaigning, and
//! openraft's own election timer, which would fire the moment the process wakes, is off;
//! the watchdog then campaigns again after each such wait while no leader is heard
//! (openraft's timer would have retried a failed election). On a quiet machine the
//! score is 0 and nothing changes.
//!
//! # A node that starts stays quiet
//!
//! A node that has just started (a killed node coming back) has heard from no leader:
//! its lease has run out at once, and openraft's timer would have it campaign within
//! `election_timeout_max`, long before the leader, which backs off from a peer that was
//! unreachable, sends it anything. Its vote requests fail (its log is behind), but its
//! higher term reaches the leader in the next append's answer and deposes it: every
//! lease in the cluster lapses and every function stops for the new election (the drill
//! measured pauses of up to a second at a victim's return). openraft 0.9 has no
//! pre-vote, so the node waits instead: elections, openraft's and the watchdog's, are
//! off at start (`enable_elect: false`) until the node has heard from a leader or
//! granted a vote, or `boot_quiet` has passed without either (a whole cluster starting
//! together). Initializing a cluster campaigns regardless.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::ids::NodeId;
use crate::types::Raft;

/// Added to the lease so that the other voters' leases have surely run out too (they
/// heard the last heartbeat at about the same moment).
pub const LEASE_MARGIN: Duration = Duration::from_millis(5);

/// When this node last heard from a leader or granted a vote: a cheap first check, before
/// asking the Raft core.
#[derive(Debug)]
pub(crate) struct Contact {
    last: Mutex<Instant>,
}

impl Contact {
    pub(crate) fn new() -> Contact {
        Contact {
            last: Mutex::new(Instant::now()),
        }
    }

    pub(crate) fn touch(&self) {
        *self.last.lock() = Instant::now();
    }

    pub(crate) fn last(&self) -> Instant {
        *self.last.lock()
    }
}

/// Keep elections off from the start until this node has heard from a leader or granted
/// a vote (`contact` touched after `started`), or until `quiet` has passed; then turn
/// them on and set `armed`. Returns early when the Raft member shuts down.
pub(crate) async fn boot_quiet(
    raft: Raft,
    contact: Arc<Contact>,
    armed: Arc<AtomicBool>,
    started: Instant,
    quiet: Duration,
    poll: Duration,
) {
    let metrics = raft.metrics();
    loop {
        if metrics.has_changed().is_err() {
            return;
        }
        let heard = contact.last() > started;
        if heard || started.elapsed() >= quiet {
            tracing::debug!(heard, "elections enabled");
            break;
        }
        tokio::time::sleep(poll).await;
    }
    raft.runtime_config().elect(true);
    armed.store(true, Ordering::Release);
}

/// This node's turn among the voters that may replace `leader`: how many of the others
/// have a smaller id. The lost leader itself goes last (after a whole-cluster restart it
/// still names itself, and should not race the others).
pub fn rank(me: NodeId, voters: impl IntoIterator<Item = NodeId>, leader: Option<NodeId>) -> u32 {
    let voters: Vec<NodeId> = voters.into_iter().collect();
    let before = if Some(me) == leader {
        voters.len().saturating_sub(1)
    } else {
        voters
            .iter()
            .filter(|v| **v < me && Some(**v) != leader)
            .count()
    };
    u32::try_from(before).unwrap_or(u32::MAX)
}

/// How long after the last contact a voter of rank `rank` campaigns.
pub fn delay(lease: Duration, stagger: Duration, rank: u32) -> Duration {
    lease + LEASE_MARGIN + stagger.saturating_mul(rank)
}

pub(crate) struct Watchdog {
    pub(crate) id: NodeId,
    pub(crate) raft: Raft,
    pub(crate) contact: Arc<Contact>,
    /// Set by `boot_quiet`: until then this node does not campaign.
    pub(crate) armed: Arc<AtomicBool>,
    pub(crate) lease: Duration,
    pub(crate) stagger: Duration,
    pub(crate) poll: Duration,
    pub(crate) lateness: Arc<crate::lateness::Lateness>,
}

impl Watchdog {
    /// Watch until the Raft member shuts down.
    pub(crate) async fn run(self) {
        let metrics = self.raft.metrics();
        let mut seen = self.contact.last();
        let mut fired_at: Option<Instant> = None;
        // Whether openraft's own election timer is on (`boot_quiet` turns it on when it
        // arms the watchdog).
        let mut own_timer = true;
        loop {
            tokio::time::sleep(self.poll).await;
            if metrics.has_changed().is_err() {
                return;
            }
            let (state, is_voter, rank) = {
                let m = metrics.borrow();
                let membership = m.membership_config.membership();
                let is_voter = membership.voter_ids().any(|v| v == self.id);
                (
                    m.state,
                    is_voter,
                    rank(self.id, membership.voter_ids(), m.current_leader),
                )
            };
            if state == ServerState::Shutdown {
                return;
            }
            let last = self.contact.last();
            if last != seen {
                seen = last;
                fired_at = None;
            }
            if !self.armed.load(Ordering::Acquire) {
                continue;
            }
            let score = self.lateness.score();
            if own_timer != (score == 0) {
                own_timer = score == 0;
                tracing::debug!(
                    score,
                    own_timer,
                    "local health changed: openraft's election timer follows"
                );
                self.raft.runtime_config().elect(own_timer);
            }
            if !is_voter || state == ServerState::Leader {
                continue;
            }
            let wait = delay(
                crate::lateness::scaled(self.lease, score),
                self.stagger,
                rank,
            );
            // Once per loss of contact while openraft's timer retries; otherwise again
            // after each wait.
            if last.elapsed() <= wait || fired_at.is_some_and(|t| own_timer || t.elapsed() <= wait)
            {
                continue;
            }
            // Confirm with the Raft core, which handles messages in order: when this node
            // is merely slow (a long fsync), the heartbeats queued before this question
            // refresh the vote's time, and no needless election disrupts a live leader.
            let lost = self
                .raft
                .with_raft_state(move |st| {
                    st.vote_last_modified().is_none_or(|t| t.elapsed() > wait)
                })
                .await;
            match lost {
                Err(_) => return,
                Ok(false) => continue,
                Ok(true) => {}
            }
            fired_at = Some(Instant::now());
            tracing::info!(id = %self.id, rank, score, "leader lease ran out: starting an election");
            if self.raft.trigger().elect().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_skip_the_lost_leader_and_are_unique() {
        let voters = [NodeId(1), NodeId(2), NodeId(3)];
        let ranks = |leader| voters.map(|me| rank(me, voters, leader));
        assert_eq!(ranks(Some(NodeId(1))), [2, 0, 1]);
        assert_eq!(ranks(Some(NodeId(2))), [0, 2, 1]);
        assert_eq!(ranks(Some(NodeId(3))), [0, 1, 2]);
        assert_eq!(ranks(None), [0, 1, 2]);
    }

    #[test]
    fn later_ranks_wait_a_stagger_longer() {
        let lease = Duration::from_millis(100);
        let stagger = Duration::from_millis(10);
        assert_eq!(delay(lease, stagger, 0), Duration::from_millis(105));
        assert_eq!(delay(lease, stagger, 2), Duration::from_millis(125));
    }
}
