//! The per-function transaction lock: one transaction at a time runs on a function,
//! which makes committed transactions serializable in the order they took the lock.
//!
//! A transaction's first lock (its own function) waits its turn in FIFO order: it
//! holds nothing yet, so it cannot be part of a deadlock. A further lock, taken when
//! a handler calls another function, follows wait-die: the caller waits only if it is
//! older than the holder and everyone queued; otherwise it dies (aborts and is retried
//! with its original age, so it eventually becomes the oldest and wins). Waits thus
//! always point from older to younger transactions, and no cycle can form.
//!
//! A transaction's identity and its age are apart: each attempt of a retried
//! transaction is a new identity (so that a lock a dead attempt still holds on another
//! node is not mistaken for the new attempt's), with the age of its first attempt.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::ids::TxnId;

/// Waiters allowed to queue on one function before new arrivals are turned away.
pub const WAITERS_MAX: usize = 4096;

/// Holds of the lock remembered, for estimating a wait in line.
const HOLDS_KEPT: usize = 8;
/// Holds needed before a wait is estimated at all.
const HOLDS_NEEDED: usize = 4;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("transaction {txn} lost a lock conflict to an older transaction and must retry")]
    Die { txn: TxnId },
    #[error("too many transactions are waiting for this function ({WAITERS_MAX})")]
    Busy,
}

#[derive(Debug, Default)]
pub struct TxnLock {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The holder, and its age.
    holder: Option<(TxnId, TxnId)>,
    waiters: VecDeque<(TxnId, TxnId, oneshot::Sender<()>)>,
    /// When the holder took the lock.
    held_since: Option<Instant>,
    /// How long the last `HOLDS_KEPT` transactions held the lock, in seconds.
    holds: VecDeque<f64>,
}

impl State {
    fn take(&mut self, txn: TxnId, age: TxnId) {
        self.holder = Some((txn, age));
        self.held_since = Some(Instant::now());
    }
}

/// How a lock is being asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The transaction holds no lock yet: wait in line.
    First,
    /// The transaction already holds locks: wait-die.
    Nested,
}

impl TxnLock {
    /// Take the lock for `txn`, whose age is its own id. Returns at once if `txn`
    /// already holds it. See `acquire_aged`.
    pub async fn acquire(&self, txn: TxnId, mode: Mode) -> Result<(), Error> {
        self.acquire_aged(txn, txn, mode).await
    }

    /// Take the lock for `txn`, which is as old as `age` (the id of its first attempt).
    /// Returns at once if `txn` already holds it.
    ///
    /// Fails with `Die` when a nested request would wait for an older transaction, and
    /// with `Busy` when the queue is full.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled waiter's turn passes to the next in line.
    pub async fn acquire_aged(&self, txn: TxnId, age: TxnId, mode: Mode) -> Result<(), Error> {
        let rx = {
            let mut state = self.state.lock();
            match state.holder {
                None => {
                    state.take(txn, age);
                    return Ok(());
                }
                Some((holder, _)) if holder == txn => return Ok(()),
                Some((_, holder_age)) => {
                    if mode == Mode::Nested {
                        let oldest_ahead = state
                            .waiters
                            .iter()
                            .map(|(_, a, _)| *a)
                            .chain([holder_age])
                            .min();
                        if oldest_ahead.is_some_and(|oldest| oldest < age) {
                            return Err(Error::Die { txn });
                        }
                    }
                    if state.waiters.len() >= WAITERS_MAX {
                        return Err(Error::Busy);
                    }
                    let (tx, rx) = oneshot::channel();
                    state.waiters.push_back((txn, age, tx));
                    rx
                }
            }
        };
        let mut guard = CancelGuard {
            lock: self,
            txn,
            armed: true,
        };
        // The releaser hands the lock over before sending, so receiving means holding.
        let _ = rx.await;
        guard.armed = false;
        Ok(())
    }

    /// Release the lock held by `txn` and hand it to the next waiter still waiting.
    /// Returns whether it was handed over: the new holder has been woken but has not
    /// run yet.
    pub fn release(&self, txn: TxnId) -> bool {
        let mut state = self.state.lock();
        if state.holder.map(|(holder, _)| holder) != Some(txn) {
            // Not the holder: a cancelled waiter; remove it from the queue if present.
            state.waiters.retain(|(t, _, _)| *t != txn);
            return false;
        }
        state.holder = None;
        if let Some(since) = state.held_since.take() {
            if state.holds.len() == HOLDS_KEPT {
                state.holds.pop_front();
            }
            state.holds.push_back(since.elapsed().as_secs_f64());
        }
        while let Some((next, age, tx)) = state.waiters.pop_front() {
            state.take(next, age);
            if tx.send(()).is_ok() {
                return true;
            }
            state.holder = None;
            state.held_since = None;
        }
        false
    }

    /// How long a transaction arriving now would wait in line at least, estimated
    /// from the fastest of the recent holds (an estimate that errs short: a request
    /// refused on it could not have been served in time): what the holder has left of
    /// one, and one for each waiter ahead. `Some(0)` when the lock is free; `None` while
    /// too few holds are known to go by.
    pub fn expected_wait(&self) -> Option<Duration> {
        let state = self.state.lock();
        let Some(since) = state.held_since else {
            return Some(Duration::ZERO);
        };
        let fastest = fastest_hold(&state.holds)?;
        let left = (fastest - since.elapsed().as_secs_f64()).max(0.0);
        Some(Duration::from_secs_f64(
            left + fastest * state.waiters.len() as f64,
        ))
    }

    /// The fastest of the recent holds (`None` while too few are known).
    pub fn fastest_hold(&self) -> Option<Duration> {
        fastest_hold(&self.state.lock().holds).map(Duration::from_secs_f64)
    }

    pub fn holder(&self) -> Option<TxnId> {
        self.state.lock().holder.map(|(holder, _)| holder)
    }

    pub fn waiters(&self) -> usize {
        self.state.lock().waiters.len()
    }
}

fn fastest_hold(holds: &VecDeque<f64>) -> Option<f64> {
    if holds.len() < HOLDS_NEEDED {
        return None;
    }
    holds.iter().copied().reduce(f64::min)
}

/// Gives up a place in line (or a lock handed over just as the wait was cancelled).
struct CancelGuard<'a> {
    lock: &'a TxnLock,
    txn: TxnId,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.lock.release(self.txn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_expected_wait_is_the_holders_rest_and_a_fastest_hold_per_waiter() {
        let lock = std::sync::Arc::new(TxnLock::default());
        assert_eq!(lock.expected_wait(), Some(Duration::ZERO), "a free lock");
        for (i, ms) in [150u64, 20, 150, 150].into_iter().enumerate() {
            let txn = TxnId(i as u64 + 1);
            lock.acquire(txn, Mode::First).await.expect("free");
            assert_eq!(lock.expected_wait(), None, "too few holds to go by");
            std::thread::sleep(Duration::from_millis(ms));
            lock.release(txn);
        }
        let fastest = lock.fastest_hold().expect("four holds");
        assert!(
            fastest >= Duration::from_millis(20) && fastest < Duration::from_millis(150),
            "the 20 ms hold: {fastest:?}"
        );
        lock.acquire(TxnId(10), Mode::First).await.expect("free");
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move { l2.acquire(TxnId(11), Mode::First).await });
        while lock.waiters() == 0 {
            tokio::task::yield_now().await;
        }
        // What the holder has left of the fastest hold (at most one), and one per waiter.
        let wait = lock.expected_wait().expect("enough holds");
        assert!(
            wait >= fastest && wait <= 2 * fastest,
            "{wait:?} for a fastest hold of {fastest:?}"
        );
        lock.release(TxnId(10));
        waiter.await.expect("task").expect("handed over");
        lock.release(TxnId(11));
    }

    #[tokio::test]
    async fn first_locks_queue_in_order() {
        let lock = std::sync::Arc::new(TxnLock::default());
        lock.acquire(TxnId(1), Mode::First)
            .await
            .expect("free lock");
        let l2 = lock.clone();
        let second = tokio::spawn(async move { l2.acquire(TxnId(2), Mode::First).await });
        tokio::task::yield_now().await;
        assert_eq!(lock.waiters(), 1);
        lock.release(TxnId(1));
        second.await.expect("join").expect("acquired");
        assert_eq!(lock.holder(), Some(TxnId(2)));
    }

    #[tokio::test]
    async fn release_says_whether_it_handed_the_lock_over() {
        let lock = std::sync::Arc::new(TxnLock::default());
        lock.acquire(TxnId(1), Mode::First)
            .await
            .expect("free lock");
        let l2 = lock.clone();
        let second = tokio::spawn(async move { l2.acquire(TxnId(2), Mode::First).await });
        tokio::task::yield_now().await;
        assert!(lock.release(TxnId(1)), "handed to the waiter");
        second.await.expect("join").expect("acquired");
        assert!(!lock.release(TxnId(2)), "nobody was waiting");
        assert_eq!(lock.holder(), None);
    }

    #[tokio::test]
    async fn younger_nested_request_dies() {
        let lock = TxnLock::default();
        lock.acquire(TxnId(5), Mode::First)
            .await
            .expect("free lock");
        assert_eq!(
            lock.acquire(TxnId(9), Mode::Nested).await,
            Err(Error::Die { txn: TxnId(9) })
        );
        assert_eq!(
            lock.acquire(TxnId(5), Mode::Nested).await,
            Ok(()),
            "re-entrant"
        );
    }

    #[tokio::test]
    async fn a_retry_is_as_old_as_its_first_attempt() {
        let lock = TxnLock::default();
        lock.acquire(TxnId(5), Mode::First)
            .await
            .expect("free lock");
        // By age, attempt 12 of a transaction first tried as 9 is younger than 5.
        assert_eq!(
            lock.acquire_aged(TxnId(12), TxnId(9), Mode::Nested).await,
            Err(Error::Die { txn: TxnId(12) }),
            "younger by age dies"
        );
        let lock = std::sync::Arc::new(lock);
        let l2 = lock.clone();
        let older =
            tokio::spawn(async move { l2.acquire_aged(TxnId(12), TxnId(3), Mode::Nested).await });
        tokio::task::yield_now().await;
        assert_eq!(lock.waiters(), 1, "older by age waits");
        lock.release(TxnId(5));
        older.await.expect("join").expect("acquired");
        assert_eq!(lock.holder(), Some(TxnId(12)));
    }

    #[tokio::test]
    async fn cancelled_waiter_passes_its_turn() {
        let lock = std::sync::Arc::new(TxnLock::default());
        lock.acquire(TxnId(1), Mode::First)
            .await
            .expect("free lock");
        let l2 = lock.clone();
        let cancelled = tokio::spawn(async move { l2.acquire(TxnId(2), Mode::First).await });
        let l3 = lock.clone();
        let third = tokio::spawn(async move { l3.acquire(TxnId(3), Mode::First).await });
        tokio::task::yield_now().await;
        cancelled.abort();
        let _ = cancelled.await;
        lock.release(TxnId(1));
        third.await.expect("join").expect("acquired");
        assert_eq!(lock.holder(), Some(TxnId(3)));
    }
}
