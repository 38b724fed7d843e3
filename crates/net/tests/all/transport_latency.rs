//! Request/response latency on loopback, printed, never asserted (machines are shared).
//!
//! Run with `cargo test --release -p understudy-net --test all -- --ignored --nocapture latency`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use understudy_net::{Channel, Config, Transport};

use crate::{cluster, identity, loopback, serving, Echo};

const REQUESTS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints a latency figure; run on demand"]
async fn latency_of_sequential_small_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    let (server, _serve) = serving(
        &identity(dir.path(), 2),
        loopback(),
        Config::default(),
        Arc::new(Echo::default()),
    );
    let addr = server.local_addr().expect("addr");
    let client =
        Transport::bind(&identity(dir.path(), 1), loopback(), Config::default()).expect("bind");
    let body = Bytes::from(vec![42u8; 64]);
    // Warm up: dial, and let congestion control and allocators settle.
    for _ in 0..200 {
        client
            .request(2, addr, Channel::Control, body.clone())
            .await
            .expect("warm-up");
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(REQUESTS);
    let started = Instant::now();
    for _ in 0..REQUESTS {
        let t = Instant::now();
        client
            .request(2, addr, Channel::Control, body.clone())
            .await
            .expect("request");
        samples.push(t.elapsed());
    }
    let total = started.elapsed();
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{REQUESTS} sequential 64-byte requests on loopback: p50 {:?}, p99 {:?}, max {:?}, {:.0} req/s",
        at(0.50),
        at(0.99),
        samples[samples.len() - 1],
        REQUESTS as f64 / total.as_secs_f64()
    );
}
