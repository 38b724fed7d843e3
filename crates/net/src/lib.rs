//! Node-to-node links for Understudy: a cluster CA, node certificates, and QUIC with mutual
//! TLS.
//!
//! This crate owns everything between one node's bytes and another's: [`certs`] makes and
//! loads the cluster's certificates, and [`transport`] carries requests over QUIC between
//! nodes that prove their node ids to each other. It knows nothing of what the bytes mean
//! (Raft, replication, artifacts are the callers'), never runs guest code, and never touches
//! the runtime's state.
//!
//! ```no_run
//! # async fn demo(dir: &std::path::Path, peer_addr: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
//! use understudy_net::{certs, Channel, Config, Identity, Transport};
//! let identity = Identity::load(dir, 1)?;
//! let transport = Transport::bind(&identity, "0.0.0.0:7100".parse()?, Config::default())?;
//! let answer = transport.request(2, peer_addr, Channel::Control, "ping".into()).await?;
//! # let _ = (answer, certs::CA_FILE); Ok(()) }
//! ```

pub mod certs;
mod tls;
pub mod transport;

pub use certs::{Identity, NodeSpec};
pub use transport::{Channel, ChannelLimits, Config, Handler, HandlerFuture, Transport};
