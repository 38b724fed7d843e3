//! The live console. `GET /ui` serves one page whose HTML, CSS and script are in the
//! binary (nothing is fetched at run time, nothing is built); `GET /v1/console/stream`
//! serves what it shows as server-sent events: a frame every `TICK` with the cluster as
//! this node sees it (the data of `GET /v1/cluster`, this node's lease among it), the
//! recent rates of the functions this node serves (`rates`), and the events of the
//! timeline (`cluster::timeline`) it has not sent on this stream yet.
//!
//! The page opens a stream to every member it knows of (a member's page may read the
//! stream of another, see `edge`), so it shows each node's own view (its Raft term, its
//! lease, the lag of the primaries it holds) and, when the node it was opened on dies,
//! reads on through another. It is read-only unless the operator gives it the admin
//! token, which it then sends, like any client, to its own node's admin routes.
//!
//! **Invariant:** a stream ends when the server shuts down (it never holds a graceful
//! shutdown up), and its frames are built from state already in memory, under no lock
//! the data path waits on for long.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use serde_json::json;
use tokio::sync::watch;

use crate::node::Node;

/// Where the console's stream is served.
pub const STREAM_PATH: &str = "/v1/console/stream";
/// How often a stream sends a frame.
const TICK: Duration = Duration::from_millis(250);
/// How soon a browser tries a stream again after losing it.
const RECONNECT: Duration = Duration::from_millis(500);
const PAGE: &str = include_str!("console.html");

/// Tells the streams that the server is shutting down.
#[derive(Clone, Debug)]
pub struct Closing(Arc<watch::Sender<bool>>);

impl Closing {
    pub fn new() -> Closing {
        Closing(Arc::new(watch::channel(false).0))
    }

    /// End every stream (and refuse none: a new one ends at once).
    pub fn close(&self) {
        self.0.send_replace(true);
    }
}

impl Default for Closing {
    fn default() -> Self {
        Closing::new()
    }
}

/// The console's routes, for the API's router.
pub fn routes(closing: Closing) -> Router<Node> {
    Router::new()
        .route("/ui", get(page))
        .route(STREAM_PATH, get(stream))
        .layer(Extension(closing))
}

async fn page() -> Response {
    let mut r = Html(PAGE).into_response();
    let headers = r.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page needs nothing from anywhere but the nodes it reads.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src *; img-src data:; frame-ancestors 'none'",
        ),
    );
    r
}

async fn stream(State(node): State<Node>, Extension(closing): Extension<Closing>) -> Response {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = (node, 0u64, tick, closing.0.subscribe());
    let frames =
        futures_util::stream::unfold(start, |(node, mut seq, mut tick, mut closing)| async move {
            if *closing.borrow() {
                return None;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = closing.wait_for(|c| *c) => return None,
            }
            let data = frame(&node, &mut seq).to_string();
            let event = Event::default().event("frame").retry(RECONNECT).data(data);
            Some((Ok::<_, Infallible>(event), (node, seq, tick, closing)))
        });
    let mut r = Sse::new(frames)
        .keep_alive(KeepAlive::default())
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// One frame of the stream; `seq` is the last timeline event sent on it.
fn frame(node: &Node, seq: &mut u64) -> serde_json::Value {
    let cluster = node.cluster();
    let events = cluster
        .map(|c| c.timeline().since(*seq))
        .unwrap_or_default();
    if let Some(last) = events.last() {
        *seq = last.seq;
    }
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    json!({
        "node": cluster.map(|c| c.id().0),
        "at_ms": at_ms,
        "admin_token_set": node.config().admin_token.as_deref().is_some_and(|t| !t.is_empty()),
        "cluster": cluster.map(|c| c.status()),
        "functions": node.list(),
        "rates": node.metrics().rates.recent(crate::rates::now_second()),
        "events": events,
    })
}
