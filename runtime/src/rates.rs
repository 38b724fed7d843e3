//! Recent throughput and latency of each function's transactions run on this node, in
//! one-second buckets over the last minute: what the console (`GET /ui`) draws. The
//! Prometheus histograms in `metrics` answer the same question over any range, but only
//! through a Prometheus server; this answers it from the node alone.
//!
//! Counted where a transaction ends (`Node::invoke`, on the function's primary), so the
//! rates of one function are those of the node that serves it.
//!
//! **Invariant:** at most `WINDOW_SECONDS` buckets per function and `FUNCTIONS_MAX`
//! functions are held; recording takes one short lock.

use std::collections::{BTreeMap, HashMap};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

/// Seconds of history kept per function.
pub const WINDOW_SECONDS: usize = 60;
/// Functions tracked at once; one that has been quiet for a whole window makes room.
pub const FUNCTIONS_MAX: usize = 4096;

/// One second of one function's transactions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Seconds since the Unix epoch.
    pub second: u64,
    /// Transactions that ran to an answer (committed, or the handler's own error).
    pub done: u32,
    /// Transactions that failed (a trap, a deadline, a conflict, the node).
    pub failed: u32,
    /// Sum and maximum of their latencies, in microseconds.
    pub latency_us_sum: u64,
    pub latency_us_max: u64,
}

/// One function's last `WINDOW_SECONDS` seconds, a ring indexed by second.
#[derive(Debug)]
struct Window {
    buckets: [Bucket; WINDOW_SECONDS],
}

impl Window {
    fn new() -> Window {
        Window {
            buckets: [Bucket::default(); WINDOW_SECONDS],
        }
    }

    fn record(&mut self, second: u64, latency_us: u64, done: bool) {
        let slot = &mut self.buckets[(second % WINDOW_SECONDS as u64) as usize];
        if slot.second != second {
            *slot = Bucket {
                second,
                ..Bucket::default()
            };
        }
        if done {
            slot.done += 1;
        } else {
            slot.failed += 1;
        }
        slot.latency_us_sum += latency_us;
        slot.latency_us_max = slot.latency_us_max.max(latency_us);
    }

    /// The buckets of the window ending at `now` (seconds), oldest first, seconds with
    /// no transaction left out.
    fn recent(&self, now: u64) -> Vec<Bucket> {
        let oldest = now.saturating_sub(WINDOW_SECONDS as u64 - 1);
        let mut out: Vec<Bucket> = self
            .buckets
            .iter()
            .filter(|b| b.second >= oldest && b.second <= now && b.done + b.failed > 0)
            .copied()
            .collect();
        out.sort_by_key(|b| b.second);
        out
    }
}

/// Every function's window.
#[derive(Debug, Default)]
pub struct Rates {
    windows: RwLock<HashMap<String, Mutex<Window>>>,
}

impl Rates {
    /// Count one transaction of `function` that ended at `second` after `latency_us`.
    pub fn record(&self, function: &str, second: u64, latency_us: u64, done: bool) {
        if let Some(w) = self.windows.read().get(function) {
            w.lock().record(second, latency_us, done);
            return;
        }
        let mut windows = self.windows.write();
        if windows.len() >= FUNCTIONS_MAX && !windows.contains_key(function) {
            windows.retain(|_, w| !w.get_mut().recent(second).is_empty());
            if windows.len() >= FUNCTIONS_MAX {
                return;
            }
        }
        windows
            .entry(function.to_owned())
            .or_insert_with(|| Mutex::new(Window::new()))
            .lock()
            .record(second, latency_us, done);
    }

    /// The window ending at `now` of every function that ran in it.
    pub fn recent(&self, now: u64) -> BTreeMap<String, Vec<Bucket>> {
        self.windows
            .read()
            .iter()
            .map(|(name, w)| (name.clone(), w.lock().recent(now)))
            .filter(|(_, buckets)| !buckets.is_empty())
            .collect()
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_second() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_per_second_and_forgets_the_old() {
        let rates = Rates::default();
        rates.record("f", 100, 10, true);
        rates.record("f", 100, 30, false);
        rates.record("f", 101, 5, true);
        let recent = rates.recent(101);
        let f = &recent["f"];
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].second, f[0].done, f[0].failed), (100, 1, 1));
        assert_eq!((f[0].latency_us_sum, f[0].latency_us_max), (40, 30));
        assert_eq!((f[1].second, f[1].done), (101, 1));
        // A minute later, second 100 is out of the window and its slot is reused.
        rates.record("f", 160, 7, true);
        let f = &rates.recent(160)["f"];
        assert_eq!(
            f.iter().map(|b| b.second).collect::<Vec<_>>(),
            vec![101, 160]
        );
        rates.record("f", 220, 7, true);
        assert_eq!(rates.recent(220)["f"].len(), 1);
        assert!(!rates.recent(400).contains_key("f"));
    }
}
