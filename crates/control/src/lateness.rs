//! Local health: how late this process's own timers run, and how much longer it should
//! therefore wait before it takes another node's silence for death.
//!
//! A failure detector compares silence with a timeout. When the process that judges is
//! itself starved of CPU (other processes hog the machine, a long pause), the silence it
//! measures includes its own delay: the pings were sent on time and sat unread. Lifeguard
//! (HashiCorp memberlist's extension of SWIM) answers this with a local health
//! multiplier: a node that notices it is slow raises its own timeouts before it accuses
//! anyone, which cut false positives by more than 50x under CPU exhaustion in the paper.
//!
//! Here the evidence is a timer's lateness: a ticker that should fire every few
//! milliseconds reports how long after its time it actually ran. The score rises at once
//! with a late tick, to at least the number of base timeouts the tick was late by (a
//! 100 ms stall with a 20 ms timeout gives 5), and falls by one for every `CALM` of
//! ticks on time. Timeouts in use are the base timeout times (1 + score), so a quiet
//! machine keeps the base (fast detection), and the scaling is bounded by
//! [`SCORE_MAX`]. Nothing here reads the clock: callers pass `now`.
//!
//! Only a suspicion waits longer: leases are not scaled (a node's lease stays shorter
//! than the base timeout, which is the shortest any master uses), so raising a timeout
//! never makes a stale primary possible.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The highest score: timeouts grow to at most (1 + `SCORE_MAX`) times their base.
pub const SCORE_MAX: u8 = 8;
/// How long timers must run on time for the score to fall by one.
pub const CALM: Duration = Duration::from_millis(500);

/// The local health of one process, as an I/O-free machine (see the module docs).
#[derive(Clone, Debug)]
pub struct LocalHealth {
    /// The timeout the score scales (the failure timeout).
    base: Duration,
    /// A tick this late or later counts as late: a quarter of `base`.
    late_after: Duration,
    score: u8,
    /// When the score last changed, or the last late tick: the score falls one `CALM`
    /// after it.
    changed_at: Option<Instant>,
}

impl LocalHealth {
    /// Local health that scales the timeout `base`.
    pub fn new(base: Duration) -> LocalHealth {
        LocalHealth {
            base,
            late_after: (base / 4).max(Duration::from_millis(1)),
            score: 0,
            changed_at: None,
        }
    }

    /// A timer ran `late` after its time, at `now`.
    pub fn observe(&mut self, now: Instant, late: Duration) {
        if late >= self.late_after {
            let base_ms = self.base.as_millis().max(1);
            let stalls = late.as_millis().div_ceil(base_ms);
            let target = u8::try_from(stalls).unwrap_or(u8::MAX);
            self.score = self.score.saturating_add(1).max(target).min(SCORE_MAX);
            self.changed_at = Some(now);
            return;
        }
        if self.score > 0 {
            let since = self
                .changed_at
                .map_or(CALM, |t| now.saturating_duration_since(t));
            if since >= CALM {
                self.score -= 1;
                self.changed_at = Some(now);
            }
        }
    }

    /// 0 while this process's timers run on time; up to [`SCORE_MAX`].
    pub fn score(&self) -> u8 {
        self.score
    }

    /// The timeout to use now in place of `base`.
    pub fn scaled(&self, base: Duration) -> Duration {
        scaled(base, self.score)
    }
}

/// `base` times (1 + `score`), `score` capped at [`SCORE_MAX`].
pub fn scaled(base: Duration, score: u8) -> Duration {
    base * (1 + u32::from(score.min(SCORE_MAX)))
}

/// [`LocalHealth`] shared between the task that measures it and those that read it.
#[derive(Debug)]
pub struct Lateness {
    health: Mutex<LocalHealth>,
    /// The score, readable without the lock.
    score: AtomicU8,
    /// Late ticks so far: a reader that sees it move knows this process just stalled.
    late_ticks: AtomicU64,
}

impl Lateness {
    pub fn new(base: Duration) -> Lateness {
        Lateness {
            health: Mutex::new(LocalHealth::new(base)),
            score: AtomicU8::new(0),
            late_ticks: AtomicU64::new(0),
        }
    }

    /// See [`LocalHealth::observe`].
    pub fn observe(&self, now: Instant, late: Duration) {
        let mut health = self.health.lock();
        if late >= health.late_after {
            self.late_ticks.fetch_add(1, Ordering::Relaxed);
        }
        health.observe(now, late);
        self.score.store(health.score(), Ordering::Relaxed);
    }

    /// How many late ticks were observed so far.
    pub fn late_ticks(&self) -> u64 {
        self.late_ticks.load(Ordering::Relaxed)
    }

    /// See [`LocalHealth::score`].
    pub fn score(&self) -> u8 {
        self.score.load(Ordering::Relaxed)
    }

    /// See [`LocalHealth::scaled`].
    pub fn scaled(&self, base: Duration) -> Duration {
        scaled(base, self.score())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(20);

    #[test]
    fn on_time_timers_keep_the_base_timeout() {
        let mut h = LocalHealth::new(BASE);
        let t0 = Instant::now();
        for i in 0..1000 {
            h.observe(t0 + Duration::from_millis(i), Duration::from_millis(4));
        }
        assert_eq!(h.score(), 0);
        assert_eq!(h.scaled(BASE), BASE);
    }

    #[test]
    fn a_late_tick_raises_the_score_at_least_to_the_stall_in_base_timeouts() {
        let mut h = LocalHealth::new(BASE);
        let t0 = Instant::now();
        h.observe(t0, Duration::from_millis(5));
        assert_eq!(h.score(), 1, "a quarter of the base is late");
        h.observe(t0, Duration::from_millis(100));
        assert_eq!(h.score(), 5, "a 100 ms stall outlasts 5 timeouts of 20 ms");
        assert_eq!(h.scaled(BASE), Duration::from_millis(120));
        h.observe(t0, Duration::from_secs(10));
        assert_eq!(h.score(), SCORE_MAX, "bounded");
        assert_eq!(h.scaled(BASE), BASE * 9);
    }

    #[test]
    fn the_score_falls_by_one_per_calm_period_of_ticks_on_time() {
        let mut h = LocalHealth::new(BASE);
        let t0 = Instant::now();
        h.observe(t0, Duration::from_millis(60));
        assert_eq!(h.score(), 3);
        // On time, but not for long enough.
        h.observe(t0 + CALM / 2, Duration::ZERO);
        assert_eq!(h.score(), 3);
        h.observe(t0 + CALM, Duration::ZERO);
        assert_eq!(h.score(), 2);
        // A late tick in between starts the calm period again.
        h.observe(t0 + CALM + CALM / 2, Duration::from_millis(5));
        assert_eq!(h.score(), 3);
        h.observe(t0 + CALM * 2, Duration::ZERO);
        assert_eq!(h.score(), 3);
        let later = t0 + CALM + CALM / 2;
        for k in 1..=3u32 {
            h.observe(later + CALM * k, Duration::ZERO);
        }
        assert_eq!(h.score(), 0);
    }

    #[test]
    fn shared_lateness_reads_the_same_score() {
        let l = Lateness::new(BASE);
        l.observe(Instant::now(), Duration::from_millis(1));
        assert_eq!(l.late_ticks(), 0);
        l.observe(Instant::now(), Duration::from_millis(45));
        assert_eq!(l.score(), 3);
        assert_eq!(l.late_ticks(), 1);
        assert_eq!(l.scaled(BASE), Duration::from_millis(80));
    }
}
