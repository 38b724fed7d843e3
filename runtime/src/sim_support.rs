//! What the seeded simulations (`replication::failover_sim`, `twophase::sim`) share: a
//! deterministic random source and the seeds to run. (Public for the integration tests'
//! seeded nemesis and workloads.)

/// splitmix64: deterministic, so that a seed replays exactly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A duration between `lo` and `hi` milliseconds, both included.
    pub fn ms(&mut self, lo: u64, hi: u64) -> std::time::Duration {
        std::time::Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// `SIM_SEED=N` replays one seed; `SIM_SEEDS=N` runs seeds 1 to N (a long run); by
/// default, 60.
#[cfg(test)]
pub(crate) fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        return vec![seed.parse().expect("SIM_SEED is a number")];
    }
    let n = std::env::var("SIM_SEEDS").map_or(60, |n| n.parse().expect("SIM_SEEDS is a number"));
    (1..=n).collect()
}
