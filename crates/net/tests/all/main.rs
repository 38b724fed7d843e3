//! Integration tests for understudy-net: real certificates on disk, real QUIC over loopback.

mod certs_files;
mod transport_failures;
mod transport_identity;
mod transport_latency;
mod transport_links;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use understudy_net::certs::{self, NodeSpec};
use understudy_net::{Channel, Config, Handler, HandlerFuture, Identity, Transport};

/// Makes a cluster CA and certificates for `ids` in `dir`.
pub fn cluster(dir: &Path, ids: &[u64]) {
    let nodes: Vec<NodeSpec> = ids
        .iter()
        .map(|&id| NodeSpec {
            id,
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
        })
        .collect();
    certs::init(dir, &nodes).expect("init");
}

pub fn identity(dir: &Path, id: u64) -> Identity {
    Identity::load(dir, id).expect("load identity")
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

/// Answers `<peer>/<channel>/<body>`; panics on the body `panic`; answers `big` with
/// `big_len` bytes. Counts calls.
#[derive(Default)]
pub struct Echo {
    pub calls: AtomicUsize,
    pub big_len: usize,
}

impl Handler for Echo {
    fn handle(&self, peer: u64, channel: Channel, body: Bytes) -> HandlerFuture<'_> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::Relaxed);
            match &body[..] {
                b"panic" => panic!("the test handler panics on request"),
                b"big" => Bytes::from(vec![7u8; self.big_len]),
                _ => {
                    let mut out = format!("{peer}/{channel}/").into_bytes();
                    out.extend_from_slice(&body);
                    Bytes::from(out)
                }
            }
        })
    }
}

/// A transport that serves `handler`, and the task serving it.
pub fn serving(
    identity: &Identity,
    addr: SocketAddr,
    config: Config,
    handler: Arc<dyn Handler>,
) -> (Transport, tokio::task::JoinHandle<()>) {
    let transport = Transport::bind(identity, addr, config).expect("bind");
    let server = transport.clone();
    let task = tokio::spawn(async move {
        server.serve(handler).await;
    });
    (transport, task)
}
