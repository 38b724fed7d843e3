//! Failures stay contained: dead peers give clear errors in time, oversized messages and
//! failing handlers cost one request and nothing more.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use understudy_net::transport::{Direction, Error, CONTROL_MESSAGE_LEN_MAX};
use understudy_net::{Channel, Config, Transport};

use crate::{cluster, identity, loopback, serving, Echo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_gives_a_clear_error_within_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    // A bound socket that never answers: packets vanish, as with a dead or cut-off machine.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("silent socket");
    let addr = silent.local_addr().expect("addr");
    let client =
        Transport::bind(&identity(dir.path(), 1), loopback(), Config::default()).expect("bind");

    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = client
        .request_within(2, addr, Channel::Control, Bytes::from_static(b"x"), timeout)
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::Timeout { peer: 2, .. }), "{err}");
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    // With a long deadline, the idle timeout gives up on the dial first.
    let started = Instant::now();
    let err = client
        .request_within(
            2,
            addr,
            Channel::Control,
            Bytes::from_static(b"x"),
            Duration::from_secs(30),
        )
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::Unreachable { peer: 2, .. }), "{err}");
    assert!(
        started.elapsed() < Config::default().idle_timeout + Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    let echo = Arc::new(Echo::default());
    let (server, _serve) = serving(
        &identity(dir.path(), 2),
        loopback(),
        Config::default(),
        echo.clone(),
    );
    let addr = server.local_addr().expect("addr");
    let over = Bytes::from(vec![0u8; CONTROL_MESSAGE_LEN_MAX + 1]);

    // A well-configured client refuses before sending.
    let client =
        Transport::bind(&identity(dir.path(), 1), loopback(), Config::default()).expect("bind");
    let err = client
        .request(2, addr, Channel::Control, over.clone())
        .await
        .expect_err("must fail");
    assert!(
        matches!(
            err,
            Error::TooLarge {
                direction: Direction::Request,
                ..
            }
        ),
        "{err}"
    );

    // A client with a larger cap sends it; the server refuses it on its own cap.
    let mut lax = Config::default();
    lax.control.message_len_max = 2 * CONTROL_MESSAGE_LEN_MAX;
    let lax = Transport::bind(&identity(dir.path(), 1), loopback(), lax).expect("bind");
    let err = lax
        .request(2, addr, Channel::Control, over)
        .await
        .expect_err("must fail");
    assert!(
        matches!(
            err,
            Error::TooLarge {
                direction: Direction::Request,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        echo.calls.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the handler never saw it"
    );

    // Same connection, next request: served.
    let answer = lax
        .request(2, addr, Channel::Control, Bytes::from_static(b"fine"))
        .await
        .expect("next");
    assert_eq!(answer, &b"1/control/fine"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_response_is_dropped_not_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    let echo = Arc::new(Echo {
        big_len: CONTROL_MESSAGE_LEN_MAX + 1,
        ..Echo::default()
    });
    let (server, _serve) = serving(
        &identity(dir.path(), 2),
        loopback(),
        Config::default(),
        echo,
    );
    let addr = server.local_addr().expect("addr");
    let client =
        Transport::bind(&identity(dir.path(), 1), loopback(), Config::default()).expect("bind");
    let err = client
        .request(2, addr, Channel::Control, Bytes::from_static(b"big"))
        .await
        .expect_err("must fail");
    assert!(
        matches!(
            err,
            Error::TooLarge {
                direction: Direction::Response,
                ..
            }
        ),
        "{err}"
    );
    // Bulk allows it.
    let answer = client
        .request(2, addr, Channel::Bulk, Bytes::from_static(b"big"))
        .await
        .expect("bulk");
    assert_eq!(answer.len(), CONTROL_MESSAGE_LEN_MAX + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_aborts_only_its_request() {
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
    let err = client
        .request(2, addr, Channel::Control, Bytes::from_static(b"panic"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::Aborted { peer: 2, .. }), "{err}");
    let answer = client
        .request(2, addr, Channel::Control, Bytes::from_static(b"after"))
        .await
        .expect("after");
    assert_eq!(answer, &b"1/control/after"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_transport_fails_requests_with_shutdown() {
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
    client
        .request(2, addr, Channel::Control, Bytes::from_static(b"a"))
        .await
        .expect("before close");
    client.close().await;
    let err = client
        .request(2, addr, Channel::Control, Bytes::from_static(b"b"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::Shutdown), "{err}");
}
