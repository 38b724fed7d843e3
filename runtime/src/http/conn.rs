//! Connections to the API: a bounded number open at once, the rest refused at once and
//! logged (rather than left to time out in the kernel's backlog, or to take the file
//! descriptors the log needs); a deadline for a request's headers, which also closes
//! kept-alive connections left idle; and a bound that fits the process's open-files
//! limit, checked when serving starts.
//!
//! Leaves requests to the router it is given.

use std::future::Future;
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// File descriptors kept for everything but connections: the log's segments, snapshots,
/// components being written, QUIC sockets, the process's own.
const FDS_RESERVED: u64 = 256;
/// Below this open-files limit the node warns when it starts.
const FDS_LOW: u64 = 4096;
/// The soft open-files limit is raised towards the hard one, but no further than this
/// (the hard limit may be "unlimited").
const FDS_WANTED: u64 = 1 << 16;
/// Refused connections are reported at most this often.
const REFUSALS_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How long accepting pauses after the listener fails (out of file descriptors, say).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// What a refused connection is told, when its socket takes it at once.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
connection: close\r\n\
content-length: 95\r\n\r\n\
{\"error\":{\"code\":\"too-many-connections\",\"message\":\"the node has all the connections it takes\"}}";

/// Bounds on the connections one listener serves.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections_max: usize,
    pub header_read_timeout: Duration,
}

/// Where the connections are counted (`understudy_http_connections_*`).
#[derive(Clone)]
pub struct Counters {
    pub refused: prometheus_client::metrics::counter::Counter,
    pub open: prometheus_client::metrics::gauge::Gauge,
}

/// `configured` connections, or fewer when the open-files limit (raised first to the
/// hard limit where the soft one is lower) leaves no room for them; warns when it had
/// to lower them and when the limit is low.
pub fn connections_max(configured: usize) -> usize {
    let Some(fds) = open_files_limit() else {
        tracing::warn!("cannot read the open-files limit (RLIMIT_NOFILE); keeping http.connections_max = {configured}");
        return configured;
    };
    if fds < FDS_LOW {
        tracing::warn!(
            limit = fds,
            "the open-files limit is low: raise it (ulimit -n, or LimitNOFILE= in a systemd unit) for more connections"
        );
    }
    let room = fds.saturating_sub(FDS_RESERVED).max(fds / 2).max(1);
    if configured as u64 > room {
        tracing::warn!(
            limit = fds,
            "http.connections_max lowered from {configured} to {room} to stay below the open-files limit"
        );
        return room as usize;
    }
    configured
}

/// Serve `app` on `listener` within `limits` until `shutdown` resolves; then close idle
/// connections, let requests in flight finish, and return once every connection closed.
///
/// Never fails: a failing `accept` (out of file descriptors) is logged and retried.
pub async fn serve(
    app: Router,
    listener: TcpListener,
    limits: Limits,
    counters: Counters,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits_max = u32::try_from(limits.connections_max)
        .unwrap_or(u32::MAX)
        .min(Semaphore::MAX_PERMITS as u32)
        .max(1);
    let permits = std::sync::Arc::new(Semaphore::new(permits_max as usize));
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut refusals = Refusals::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                refusals.accept_failed(&e);
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            counters.refused.inc();
            refusals.refused(permits_max);
            // Best effort: a client whose socket takes it reads why; it is closed anyway.
            let _ = stream.try_write(REFUSAL);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut closing = closing_rx.clone();
        let header_read_timeout = limits.header_read_timeout;
        let open = counters.open.clone();
        open.inc();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = OpenConnection(open);
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = closing.wait_for(|closing| *closing) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection holds a permit: with all of them back, every connection closed.
    let _ = permits.acquire_many(permits_max).await;
    Ok(())
}

/// Counts a connection open for as long as it lives.
struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts refused connections and reports them, at most once per
/// `REFUSALS_REPORT_INTERVAL`, with how many there were since the last report.
#[derive(Default)]
struct Refusals {
    unreported: u64,
    reported_at: Option<Instant>,
}

impl Refusals {
    fn refused(&mut self, limit: u32) {
        self.unreported += 1;
        if self.due() {
            tracing::warn!(
                refused = self.unreported,
                limit,
                "refused connections: {limit} are open already (http.connections_max)"
            );
            self.unreported = 0;
        }
    }

    fn accept_failed(&mut self, e: &std::io::Error) {
        if self.due() {
            tracing::warn!(error = %e, "cannot accept connections");
        }
    }

    fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .reported_at
            .is_none_or(|at| now.duration_since(at) >= REFUSALS_REPORT_INTERVAL);
        if due {
            self.reported_at = Some(now);
        }
        due
    }
}

/// The soft open-files limit, raised to the hard limit (at most `FDS_WANTED`) first when
/// it is lower; `None` when it cannot be read.
fn open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through the pointer, which points at a live
    // local of that type.
    #[allow(unsafe_code)]
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if read != 0 {
        return None;
    }
    let wanted = limit.rlim_max.min(FDS_WANTED);
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the `rlimit` the pointer points at, a live local.
        #[allow(unsafe_code)]
        let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
        if set == 0 {
            return Some(wanted);
        }
    }
    Some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_answer() {
        let text = std::str::from_utf8(REFUSAL).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(json["error"]["code"], "too-many-connections");
    }
}
