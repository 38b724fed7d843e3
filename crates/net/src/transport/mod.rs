//! QUIC links between nodes, with mutual TLS against the cluster CA.
//!
//! A [`Transport`] is one UDP socket and one quinn endpoint that both dials peers and accepts
//! them. It owns the links, their framing and their failure modes; what a message means is
//! left to the layers above (control plane, replication, routing), which see only
//! [`Transport::request`] and a [`Handler`].
//!
//! # Identity
//!
//! A client dialling node `N` asks for the server name `node-N.understudy.cluster` and accepts
//! only a certificate chaining to the cluster CA that carries exactly that node identity (see
//! [`crate::certs`]). A server accepts only clients whose certificate chains to the CA and
//! carries a node identity, and hands that id to its [`Handler`]. Addresses are not part of
//! the check: nodes are known by id, and addresses may move.
//!
//! # Channels
//!
//! Traffic comes in four classes, [`Channel`], each with its own ALPN
//! (`understudy-control/1`, `understudy-replication/1`, `understudy-bulk/1`,
//! `understudy-invoke/1`) and therefore
//! its own QUIC connection per peer: its own congestion window, flow control and loss
//! recovery. A snapshot streaming on `Bulk` cannot hold back a heartbeat on `Control` or a
//! batch on `Replication` behind its bytes. Connections are dialled on first use, cached per
//! (peer, channel), and dialled again when they have died.
//!
//! # Framing
//!
//! One request is one bidirectional QUIC stream: the client writes the body and finishes the
//! stream, the server reads to the end, runs the handler, writes the response and finishes.
//! No length prefix is needed: QUIC delivers the stream's end. Each channel caps messages
//! ([`CONTROL_MESSAGE_LEN_MAX`] and the like) in both directions, and caps the streams a peer
//! may have open at once on one connection ([`CONTROL_STREAMS_MAX`] and the like), which
//! bounds what one peer can make a node buffer. A stream that ends abnormally is reset with a
//! code from [`codes`], never finished, so a cut-off message is never taken for a whole one.
//!
//! # Timeouts and failover
//!
//! - [`Config::keep_alive_interval`] (100 ms): an idle connection still sends a packet this
//!   often, so the peer's idle timer never fires on a quiet but healthy link.
//! - [`Config::idle_timeout`] (1.5 s): a connection that has heard nothing from its peer for
//!   this long is dead; requests in flight on it fail with [`Error::Unreachable`] and the next
//!   request dials afresh. A dial to a peer that does not answer fails after the same time.
//!   This is the backstop that frees resources held for a dead peer; it is far too slow to
//!   drive failover (which must take under 100 ms). The failure detector should send its own
//!   heartbeats on [`Channel::Control`] with short per-request timeouts
//!   ([`Transport::request_within`]) and decide on those.
//! - [`Config::request_timeout`] (5 s): the default bound on one request, dial included; it
//!   says nothing about whether the peer ran the request.
//! - A peer that restarts on the same address with the same identity answers packets for its
//!   old connections with a QUIC stateless reset (the reset key is derived from the node's
//!   private key, so the new process computes the same tokens). Its peers then learn of the
//!   restart within a round trip instead of after the idle timeout: the request in flight
//!   fails with [`Error::Closed`] and the next one reconnects.

mod serve;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectError, Connection, ConnectionError, SendStream, VarInt};
use tracing::debug;

use crate::certs::Identity;
use crate::tls;

/// Largest message on [`Channel::Control`]: Raft messages, heartbeats, two-phase commit. Big
/// payloads belong on the other channels, where they cannot delay these.
pub const CONTROL_MESSAGE_LEN_MAX: usize = 4 << 20;
/// Largest message on [`Channel::Replication`]: one batch of committed write sets.
pub const REPLICATION_MESSAGE_LEN_MAX: usize = 64 << 20;
/// Largest message on [`Channel::Bulk`]: a component artifact or a snapshot chunk.
pub const BULK_MESSAGE_LEN_MAX: usize = 256 << 20;
/// Largest message on [`Channel::Invoke`]: a forwarded invocation or its answer.
pub const INVOKE_MESSAGE_LEN_MAX: usize = 40 << 20;
/// Streams one peer may have open at once on its control connection.
pub const CONTROL_STREAMS_MAX: u32 = 256;
/// Streams one peer may have open at once on its replication connection (pipelined batches).
pub const REPLICATION_STREAMS_MAX: u32 = 64;
/// Streams one peer may have open at once on its bulk connection.
pub const BULK_STREAMS_MAX: u32 = 4;
/// Streams one peer may have open at once on its invoke connection (one per forwarded
/// invocation in flight).
pub const INVOKE_STREAMS_MAX: u32 = 1024;
/// Inbound connections served at once (peers times channels, with room for reconnects).
pub const CONNECTIONS_INBOUND_MAX: usize = 1024;
/// Default [`Config::keep_alive_interval`].
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(100);
/// Default [`Config::idle_timeout`].
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Default [`Config::request_timeout`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

// A LAN round trip is well under a millisecond; quinn's default first guess (333 ms) would
// make a lost handshake packet cost a second on every reconnect.
const INITIAL_RTT: Duration = Duration::from_millis(10);

/// Application error codes on the wire. Stream codes reset or stop one stream; connection
/// codes close a connection.
pub mod codes {
    /// The request was over the channel's cap; the server refused it.
    pub const STREAM_REQUEST_TOO_LARGE: u32 = 1;
    /// The handler's response was over the channel's cap; the server dropped it.
    pub const STREAM_RESPONSE_TOO_LARGE: u32 = 2;
    /// The handler failed (panicked) before answering.
    pub const STREAM_HANDLER_FAILED: u32 = 3;
    /// The client gave up on the request (timeout or cancellation).
    pub const STREAM_CANCELLED: u32 = 4;
    /// The node is shutting down.
    pub const CLOSE_SHUTDOWN: u32 = 0;
    /// The peer's certificate carries no node identity, or its ALPN is unknown.
    pub const CLOSE_UNIDENTIFIED: u32 = 1;
}

/// A class of traffic, carried on its own QUIC connection per peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Heartbeats, Raft, two-phase commit: small and urgent.
    Control,
    /// Log shipping from primaries to backups and its acknowledgements.
    Replication,
    /// Artifacts, snapshots and catch-up: large and patient.
    Bulk,
    /// Invocations forwarded to a function's primary, and their answers.
    Invoke,
}

/// Limits that apply to one channel, in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelLimits {
    /// Largest request or response body, in bytes.
    pub message_len_max: usize,
    /// Streams (requests in flight) one peer may have open at once on one connection.
    pub streams_max: u32,
}

/// Tuning of a [`Transport`]. The defaults suit a LAN; see the module docs for what each
/// timeout means for failover.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often an otherwise idle connection sends a packet.
    pub keep_alive_interval: Duration,
    /// Silence after which a connection (or a dial) is given up.
    pub idle_timeout: Duration,
    /// Default bound on one [`Transport::request`], dial included.
    pub request_timeout: Duration,
    /// Inbound connections served at once; more are refused.
    pub connections_inbound_max: usize,
    /// Limits on [`Channel::Control`].
    pub control: ChannelLimits,
    /// Limits on [`Channel::Replication`].
    pub replication: ChannelLimits,
    /// Limits on [`Channel::Bulk`].
    pub bulk: ChannelLimits,
    /// Limits on [`Channel::Invoke`].
    pub invoke: ChannelLimits,
}

/// Serves requests from peers. One call per request; calls run concurrently.
pub trait Handler: Send + Sync + 'static {
    /// Answers `body`, which node `peer` (proven by its certificate) sent on `channel`.
    ///
    /// If the future panics, the peer's request fails with [`Error::Aborted`] and the node
    /// goes on serving. If the peer gives up on the request, the response is discarded.
    fn handle(&self, peer: u64, channel: Channel, body: Bytes) -> HandlerFuture<'_>;
}

/// The future a [`Handler`] returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Bytes> + Send + 'a>>;

/// Which side of an exchange a message was on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// Why a request failed or a transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No QUIC connection could be kept: the peer did not answer a dial, or went silent for
    /// the idle timeout. The peer may be down or cut off.
    #[error("node {peer} at {addr} is unreachable: {reason}")]
    Unreachable {
        peer: u64,
        addr: SocketAddr,
        reason: String,
    },
    /// The request's deadline passed. The peer may or may not have run it.
    #[error("request to node {peer} on the {channel} channel timed out after {timeout:?}")]
    Timeout {
        peer: u64,
        channel: Channel,
        timeout: Duration,
    },
    /// TLS refused the link, on either side: a certificate not from the cluster CA, not for
    /// the expected node, or without a node identity. Retrying will not help.
    #[error("TLS refused the link with node {peer} at {addr}: {reason}")]
    Refused {
        peer: u64,
        addr: SocketAddr,
        reason: String,
    },
    /// The peer closed or reset the connection (it shut down or restarted). The next request
    /// dials again.
    #[error("node {peer} closed the {channel} connection: {reason}")]
    Closed {
        peer: u64,
        channel: Channel,
        reason: String,
    },
    /// The peer gave up on the request without answering (its handler failed).
    #[error("node {peer} abandoned the {channel} request: {reason}")]
    Aborted {
        peer: u64,
        channel: Channel,
        reason: String,
    },
    /// A message was over its channel's cap; nothing was delivered. `len_max` is this node's
    /// cap (the peer refuses on its own, which should be the same).
    #[error("{channel} {direction} is over the cap of {len_max} bytes{}",
        len.map(|len| format!(" ({len} bytes)")).unwrap_or_default())]
    TooLarge {
        channel: Channel,
        direction: Direction,
        len: Option<usize>,
        len_max: usize,
    },
    /// A local socket operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The identity or configuration could not be turned into a QUIC endpoint.
    #[error("transport setup: {0}")]
    Setup(String),
    /// This transport has been closed.
    #[error("the transport is closed")]
    Shutdown,
}

/// A node's QUIC endpoint: dials peers and, once [`Transport::serve`] runs, accepts them.
/// Cheap to clone; clones share the endpoint and the cached links.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    endpoint: quinn::Endpoint,
    clients: [quinn::ClientConfig; 4],
    config: Config,
    // One entry per (peer, channel) ever dialled: bounded by the cluster's size.
    links: Mutex<HashMap<(u64, Channel), Arc<Link>>>,
}

/// The cached outbound connection to one peer on one channel.
#[derive(Default)]
struct Link {
    conn: Mutex<Option<Connection>>,
    // Held while dialling, so concurrent first requests share one connection.
    dialing: tokio::sync::Mutex<()>,
}

impl Transport {
    /// Binds a UDP socket at `addr` and makes an endpoint with `identity`. It dials at once;
    /// it answers peers only while [`Transport::serve`] runs.
    ///
    /// Must be called inside a tokio runtime. Fails with [`Error::Io`] if the socket cannot be
    /// bound (the address is in use, say) and [`Error::Setup`] if there is no runtime or the
    /// configuration is out of range.
    pub fn bind(identity: &Identity, addr: SocketAddr, config: Config) -> Result<Transport, Error> {
        let runtime = quinn::default_runtime()
            .ok_or_else(|| Error::Setup("not inside a tokio runtime".into()))?;
        let server = server_config(identity, &config)?;
        let clients = client_configs(identity, &config)?;
        let socket = std::net::UdpSocket::bind(addr).map_err(|source| Error::Io {
            context: format!("binding UDP {addr}"),
            source,
        })?;
        let endpoint =
            quinn::Endpoint::new(endpoint_config(identity), Some(server), socket, runtime)
                .map_err(|source| Error::Io {
                    context: format!("endpoint on {addr}"),
                    source,
                })?;
        Ok(Transport {
            inner: Arc::new(Inner {
                id: identity.id(),
                endpoint,
                clients,
                config,
                links: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The address the socket is bound to (with the real port if bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(|source| Error::Io {
                context: "local address".into(),
                source,
            })
    }

    /// Sends `body` to node `peer` at `addr` on `channel` and returns its handler's answer,
    /// within [`Config::request_timeout`]. See [`Transport::request_within`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe in the same sense as [`Transport::request_within`].
    pub async fn request(
        &self,
        peer: u64,
        addr: SocketAddr,
        channel: Channel,
        body: Bytes,
    ) -> Result<Bytes, Error> {
        self.request_within(peer, addr, channel, body, self.inner.config.request_timeout)
            .await
    }

    /// Sends `body` to node `peer` at `addr` on `channel` and returns its handler's answer,
    /// failing after `timeout`. Dials the peer first if there is no live connection.
    ///
    /// Fails with [`Error::TooLarge`] (before sending, or when the peer refuses it),
    /// [`Error::Timeout`], [`Error::Unreachable`], [`Error::Refused`] (wrong CA or node
    /// identity), [`Error::Closed`] (the peer shut down or restarted; the next request dials
    /// again), [`Error::Aborted`] or [`Error::Shutdown`]. After an error the peer may or may not
    /// have run the request.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future resets the request's stream, so the peer never takes
    /// a cut-off body for a whole one, and leaves the cached connection usable. As with a
    /// timeout, a request already fully sent may still run on the peer.
    pub async fn request_within(
        &self,
        peer: u64,
        addr: SocketAddr,
        channel: Channel,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        let len_max = self.inner.config.limits(channel).message_len_max;
        if body.len() > len_max {
            return Err(Error::TooLarge {
                channel,
                direction: Direction::Request,
                len: Some(body.len()),
                len_max,
            });
        }
        match tokio::time::timeout(timeout, self.exchange(peer, addr, channel, body, len_max)).await
        {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                peer,
                channel,
                timeout,
            }),
        }
    }

    /// Accepts peers and answers their requests with `handler` until the transport is
    /// closed, then returns. Each connection and each request runs in its own task.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops serving: inbound connections are closed and requests in
    /// progress are reset (their clients get an error). Outbound requests are unaffected.
    pub async fn serve(&self, handler: Arc<dyn Handler>) {
        serve::run(
            self.inner.endpoint.clone(),
            handler,
            self.inner.config.clone(),
        )
        .await;
    }

    /// Closes every connection (peers see [`Error::Closed`]) and waits briefly for the peers
    /// to hear of it. Requests in flight fail with [`Error::Shutdown`]; [`Transport::serve`]
    /// returns. The socket is released once every clone of this transport is dropped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the close has happened by the first poll; only the wait is cut short.
    pub async fn close(&self) {
        self.inner
            .endpoint
            .close(VarInt::from_u32(codes::CLOSE_SHUTDOWN), b"shutting down");
        self.inner.endpoint.wait_idle().await;
    }

    async fn exchange(
        &self,
        peer: u64,
        addr: SocketAddr,
        channel: Channel,
        body: Bytes,
        len_max: usize,
    ) -> Result<Bytes, Error> {
        let conn = self.link(peer, addr, channel).await?;
        let lost = |e| connection_error(peer, addr, channel, e);
        let (send, mut recv) = conn.open_bi().await.map_err(lost)?;
        let mut send = Outgoing::new(send, codes::STREAM_CANCELLED);
        let body_len = body.len();
        send.send(body).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => lost(e),
            quinn::WriteError::Stopped(code) => {
                stream_error(peer, channel, code, Some(body_len), len_max)
            }
            other => Error::Aborted {
                peer,
                channel,
                reason: other.to_string(),
            },
        })?;
        match recv.read_to_end(len_max).await {
            Ok(response) => Ok(Bytes::from(response)),
            Err(quinn::ReadToEndError::TooLong) => {
                let _ = recv.stop(VarInt::from_u32(codes::STREAM_RESPONSE_TOO_LARGE));
                Err(Error::TooLarge {
                    channel,
                    direction: Direction::Response,
                    len: None,
                    len_max,
                })
            }
            Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e))) => Err(lost(e)),
            Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                Err(stream_error(peer, channel, code, Some(body_len), len_max))
            }
            Err(quinn::ReadToEndError::Read(other)) => Err(Error::Aborted {
                peer,
                channel,
                reason: other.to_string(),
            }),
        }
    }

    /// The live connection to `peer` on `channel`, dialled if there is none.
    async fn link(
        &self,
        peer: u64,
        addr: SocketAddr,
        channel: Channel,
    ) -> Result<Connection, Error> {
        let link = {
            let mut links = self
                .inner
                .links
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            links.entry((peer, channel)).or_default().clone()
        };
        if let Some(conn) = link.live(addr) {
            return Ok(conn);
        }
        let _dialing = link.dialing.lock().await;
        if let Some(conn) = link.live(addr) {
            return Ok(conn);
        }
        let client = self.inner.clients[channel.index()].clone();
        // Dialled on a task of its own: quinn's connection driver takes the current
        // `tracing` span as its own, and the connection outlives the request that dialled
        // it (holding an invocation's span open forever would keep it from being exported).
        let endpoint = self.inner.endpoint.clone();
        let name = tls::node_name(peer);
        let connecting = tokio::spawn(async move { endpoint.connect_with(client, addr, &name) })
            .await
            .map_err(|e| Error::Unreachable {
                peer,
                addr,
                reason: format!("the dialling task failed: {e}"),
            })?
            .map_err(|e| match e {
                ConnectError::EndpointStopping => Error::Shutdown,
                other => Error::Unreachable {
                    peer,
                    addr,
                    reason: other.to_string(),
                },
            })?;
        let conn = connecting
            .await
            .map_err(|e| connection_error(peer, addr, channel, e))?;
        debug!(peer, %addr, %channel, "link up");
        *link.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("id", &self.inner.id)
            .field("local_addr", &self.inner.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// Every channel, in index order.
    pub const ALL: [Channel; 4] = [
        Channel::Control,
        Channel::Replication,
        Channel::Bulk,
        Channel::Invoke,
    ];

    /// The ALPN protocol id that selects this channel.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Channel::Control => b"understudy-control/1",
            Channel::Replication => b"understudy-replication/1",
            Channel::Bulk => b"understudy-bulk/1",
            Channel::Invoke => b"understudy-invoke/1",
        }
    }

    /// The channel an ALPN protocol id selects, if any.
    pub fn from_alpn(alpn: &[u8]) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.alpn() == alpn)
    }

    fn index(self) -> usize {
        match self {
            Channel::Control => 0,
            Channel::Replication => 1,
            Channel::Bulk => 2,
            Channel::Invoke => 3,
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Control => "control",
            Channel::Replication => "replication",
            Channel::Bulk => "bulk",
            Channel::Invoke => "invoke",
        })
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Request => "request",
            Direction::Response => "response",
        })
    }
}

impl Config {
    /// The limits of `channel`.
    pub fn limits(&self, channel: Channel) -> ChannelLimits {
        match channel {
            Channel::Control => self.control,
            Channel::Replication => self.replication,
            Channel::Bulk => self.bulk,
            Channel::Invoke => self.invoke,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keep_alive_interval: KEEP_ALIVE_INTERVAL,
            idle_timeout: IDLE_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            connections_inbound_max: CONNECTIONS_INBOUND_MAX,
            control: ChannelLimits {
                message_len_max: CONTROL_MESSAGE_LEN_MAX,
                streams_max: CONTROL_STREAMS_MAX,
            },
            replication: ChannelLimits {
                message_len_max: REPLICATION_MESSAGE_LEN_MAX,
                streams_max: REPLICATION_STREAMS_MAX,
            },
            bulk: ChannelLimits {
                message_len_max: BULK_MESSAGE_LEN_MAX,
                streams_max: BULK_STREAMS_MAX,
            },
            invoke: ChannelLimits {
                message_len_max: INVOKE_MESSAGE_LEN_MAX,
                streams_max: INVOKE_STREAMS_MAX,
            },
        }
    }
}

impl Link {
    /// The cached connection, if it is alive and goes to `addr`.
    fn live(&self, addr: SocketAddr) -> Option<Connection> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.as_ref()
            .filter(|c| c.close_reason().is_none() && c.remote_address() == addr)
            .cloned()
    }
}

/// A send stream that is reset, not finished, unless the whole message was written: dropping
/// a quinn `SendStream` finishes it, which would turn a cut-off body into a valid short one.
pub(crate) struct Outgoing {
    stream: Option<SendStream>,
    code_on_drop: u32,
}

impl Outgoing {
    pub(crate) fn new(stream: SendStream, code_on_drop: u32) -> Outgoing {
        Outgoing {
            stream: Some(stream),
            code_on_drop,
        }
    }

    /// Writes `body` and finishes the stream.
    pub(crate) async fn send(&mut self, body: Bytes) -> Result<(), quinn::WriteError> {
        if let Some(stream) = self.stream.as_mut() {
            stream.write_chunk(body).await?;
            stream.finish()?;
        }
        // Finished: dropping it now keeps the end of stream.
        self.stream = None;
        Ok(())
    }

    pub(crate) fn reset(&mut self, code: u32) {
        if let Some(mut stream) = self.stream.take() {
            let _ = stream.reset(VarInt::from_u32(code));
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.reset(self.code_on_drop);
    }
}

/// The serving side's QUIC configuration: every channel's ALPN.
fn server_config(identity: &Identity, config: &Config) -> Result<quinn::ServerConfig, Error> {
    let alpns = Channel::ALL.map(Channel::alpn);
    let tls = tls::server_config(identity, &alpns).map_err(Error::Setup)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(setup)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // Advertise the smallest channel's stream limit; serve raises it once the ALPN says which
    // channel a connection is.
    let streams_initial = Channel::ALL
        .map(|c| config.limits(c).streams_max)
        .into_iter()
        .min();
    let transport = transport_config(config, streams_initial.unwrap_or(0))?;
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// The dialling side's QUIC configuration, one per channel (each offers its own ALPN). A
/// client accepts no streams from the server.
fn client_configs(identity: &Identity, config: &Config) -> Result<[quinn::ClientConfig; 4], Error> {
    let transport = Arc::new(transport_config(config, 0)?);
    let mut clients = Vec::with_capacity(Channel::ALL.len());
    for channel in Channel::ALL {
        let tls = tls::client_config(identity, channel.alpn()).map_err(Error::Setup)?;
        let crypto = QuicClientConfig::try_from(tls).map_err(setup)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport.clone());
        clients.push(client);
    }
    clients
        .try_into()
        .map_err(|_| Error::Setup("one client config per channel".into()))
}

fn transport_config(config: &Config, bidi_streams: u32) -> Result<quinn::TransportConfig, Error> {
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout).map_err(|_| {
        Error::Setup(format!(
            "idle timeout {:?} out of range",
            config.idle_timeout
        ))
    })?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(config.keep_alive_interval))
        .max_idle_timeout(Some(idle))
        .initial_rtt(INITIAL_RTT)
        .max_concurrent_bidi_streams(VarInt::from_u32(bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None);
    Ok(transport)
}

/// Endpoint keys derived from the node's private key, so that the node, restarted, recognizes
/// the connection ids it issued before and resets those connections at once (see the module
/// docs): the stateless-reset key and the key that signs connection ids. Only the holder of
/// the private key can forge these resets.
fn endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    use ring::hmac;
    let secret = identity.key();
    let derivation = hmac::Key::new(hmac::HMAC_SHA256, secret.secret_der());
    let reset_key = hmac::sign(&derivation, b"understudy-net stateless reset key v1");
    let cid_tag = hmac::sign(&derivation, b"understudy-net connection id key v1");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid_tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(hmac::Key::new(
        hmac::HMAC_SHA256,
        reset_key.as_ref(),
    )));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

fn setup(e: impl fmt::Display) -> Error {
    Error::Setup(e.to_string())
}

/// Whether a QUIC error code is a TLS alert (RFC 9001: 0x100 plus the alert).
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

fn connection_error(peer: u64, addr: SocketAddr, channel: Channel, e: ConnectionError) -> Error {
    match e {
        ConnectionError::LocallyClosed => Error::Shutdown,
        ConnectionError::TimedOut => Error::Unreachable {
            peer,
            addr,
            reason: "no answer within the idle timeout".into(),
        },
        ConnectionError::TransportError(te) if is_tls_alert(te.code) => Error::Refused {
            peer,
            addr,
            reason: format!("this node refused the peer: {}", te.reason),
        },
        ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => {
            let reason = String::from_utf8_lossy(&close.reason);
            Error::Refused {
                peer,
                addr,
                reason: format!("the peer refused this node: {reason}"),
            }
        }
        ConnectionError::Reset => Error::Closed {
            peer,
            channel,
            reason: "connection reset: the peer restarted or forgot the connection".into(),
        },
        ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            Error::Closed {
                peer,
                channel,
                reason,
            }
        }
        ConnectionError::VersionMismatch | ConnectionError::CidsExhausted => Error::Unreachable {
            peer,
            addr,
            reason: e.to_string(),
        },
        other => Error::Closed {
            peer,
            channel,
            reason: other.to_string(),
        },
    }
}

/// The error for a stream the peer reset or stopped with `code`.
fn stream_error(
    peer: u64,
    channel: Channel,
    code: VarInt,
    len: Option<usize>,
    len_max: usize,
) -> Error {
    let code = u32::try_from(code.into_inner()).unwrap_or(u32::MAX);
    match code {
        codes::STREAM_REQUEST_TOO_LARGE => Error::TooLarge {
            channel,
            direction: Direction::Request,
            len,
            len_max,
        },
        codes::STREAM_RESPONSE_TOO_LARGE => Error::TooLarge {
            channel,
            direction: Direction::Response,
            len: None,
            len_max,
        },
        codes::STREAM_HANDLER_FAILED => Error::Aborted {
            peer,
            channel,
            reason: "its handler failed".into(),
        },
        other => Error::Aborted {
            peer,
            channel,
            reason: format!("stream reset with code {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The ALPN ids and error codes are the wire contract between nodes of different builds:
    // changing one splits a cluster during a rolling upgrade (adding one, as `invoke/1`
    // was, only means older nodes do not serve it).
    #[test]
    fn wire_identifiers_are_stable() {
        let alpns: Vec<&[u8]> = Channel::ALL.iter().map(|c| c.alpn()).collect();
        assert_eq!(
            alpns,
            [
                &b"understudy-control/1"[..],
                b"understudy-replication/1",
                b"understudy-bulk/1",
                b"understudy-invoke/1"
            ]
        );
        for channel in Channel::ALL {
            assert_eq!(Channel::from_alpn(channel.alpn()), Some(channel));
        }
        assert_eq!(Channel::from_alpn(b"understudy-control/2"), None);
        assert_eq!(
            [
                codes::STREAM_REQUEST_TOO_LARGE,
                codes::STREAM_RESPONSE_TOO_LARGE,
                codes::STREAM_HANDLER_FAILED,
                codes::STREAM_CANCELLED
            ],
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn stream_codes_map_to_errors() {
        let code = |c: u32| VarInt::from_u32(c);
        let err = stream_error(
            2,
            Channel::Bulk,
            code(codes::STREAM_REQUEST_TOO_LARGE),
            Some(9),
            8,
        );
        assert!(matches!(
            err,
            Error::TooLarge {
                direction: Direction::Request,
                len: Some(9),
                ..
            }
        ));
        let err = stream_error(
            2,
            Channel::Bulk,
            code(codes::STREAM_HANDLER_FAILED),
            None,
            8,
        );
        assert!(matches!(err, Error::Aborted { peer: 2, .. }));
        let err = stream_error(2, Channel::Bulk, VarInt::MAX, None, 8);
        assert!(
            matches!(err, Error::Aborted { .. }),
            "unknown codes do not panic"
        );
    }
}
