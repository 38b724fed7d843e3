//! The serving side of a transport: accepts inbound connections, learns each peer's node id
//! and channel from the handshake, and runs the handler once per stream.
//!
//! Every connection and every stream is its own task, held in a `JoinSet` so that dropping the
//! accept loop drops them all. Input from the network is bounded here (connections per node,
//! streams per connection, bytes per message) and never panics the node: a bad message costs
//! its own stream and nothing else.

use std::sync::Arc;

use bytes::Bytes;
use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

use super::{codes, Channel, ChannelLimits, Config, Handler, Outgoing};
use crate::tls;

/// Accepts connections until the endpoint closes.
pub(super) async fn run(endpoint: quinn::Endpoint, handler: Arc<dyn Handler>, config: Config) {
    let config = Arc::new(config);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if connections.len() >= config.connections_inbound_max {
                    warn!(remote = %incoming.remote_address(), "refusing a connection: too many inbound connections");
                    incoming.refuse();
                    continue;
                }
                connections.spawn(connection(incoming, handler.clone(), config.clone()));
            }
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        error!(error = %e, "a connection task panicked");
                    }
                }
            }
        }
    }
}

/// Serves one inbound connection until it closes.
async fn connection(incoming: Incoming, handler: Arc<dyn Handler>, config: Arc<Config>) {
    let remote = incoming.remote_address();
    let conn = match incoming.accept() {
        Ok(connecting) => connecting.await,
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(e) => {
            // TLS refusals land here: worth an operator's attention.
            warn!(%remote, error = %e, "inbound handshake failed");
            return;
        }
    };
    let (peer, channel) = match identify(&conn) {
        Ok(found) => found,
        Err(why) => {
            warn!(%remote, why, "closing an unidentified inbound connection");
            conn.close(VarInt::from_u32(codes::CLOSE_UNIDENTIFIED), why.as_bytes());
            return;
        }
    };
    let limits = config.limits(channel);
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(limits.streams_max));
    debug!(peer, %remote, %channel, "inbound link up");
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(stream(peer, channel, send, recv, handler.clone(), limits));
                }
                Err(e) => {
                    debug!(peer, %remote, %channel, error = %e, "inbound link closed");
                    break;
                }
            },
            Some(joined) = streams.join_next(), if !streams.is_empty() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        error!(peer, %channel, error = %e, "a handler panicked; its request was reset");
                    }
                }
            }
        }
    }
}

/// Serves one request: read to the end, handle, answer.
async fn stream(
    peer: u64,
    channel: Channel,
    send: SendStream,
    mut recv: RecvStream,
    handler: Arc<dyn Handler>,
    limits: ChannelLimits,
) {
    // Reset on every path but a complete answer, including a panicking handler.
    let mut reply = Outgoing::new(send, codes::STREAM_HANDLER_FAILED);
    let body = match recv.read_to_end(limits.message_len_max).await {
        Ok(body) => body,
        Err(quinn::ReadToEndError::TooLong) => {
            warn!(peer, %channel, len_max = limits.message_len_max, "refused a request over the cap");
            let _ = recv.stop(VarInt::from_u32(codes::STREAM_REQUEST_TOO_LARGE));
            reply.reset(codes::STREAM_REQUEST_TOO_LARGE);
            return;
        }
        Err(quinn::ReadToEndError::Read(e)) => {
            debug!(peer, %channel, error = %e, "request not received whole");
            return;
        }
    };
    let response = handler.handle(peer, channel, Bytes::from(body)).await;
    if response.len() > limits.message_len_max {
        warn!(peer, %channel, len = response.len(), len_max = limits.message_len_max,
            "dropped a response over the cap");
        reply.reset(codes::STREAM_RESPONSE_TOO_LARGE);
        return;
    }
    if let Err(e) = reply.send(response).await {
        debug!(peer, %channel, error = %e, "response not delivered");
    }
}

/// The peer's node id (from its verified certificate) and the channel (from the ALPN).
fn identify(conn: &Connection) -> Result<(u64, Channel), String> {
    let handshake = conn
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .ok_or("no TLS handshake data")?;
    let channel = handshake
        .protocol
        .as_deref()
        .and_then(Channel::from_alpn)
        .ok_or("no known ALPN protocol")?;
    let certs = conn
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("no client certificate")?;
    let end_entity = certs.first().ok_or("empty client certificate chain")?;
    let peer = tls::node_id_of(end_entity)?;
    Ok((peer, channel))
}
