//! Working links: every channel answers, many requests run at once, links come back after a
//! peer restarts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use understudy_net::transport::Error;
use understudy_net::{Channel, Config, Identity, Transport};

use crate::{cluster, identity, loopback, serving, Echo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_on_every_channel_with_the_callers_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    let (one, _serve_one) = serving(
        &identity(dir.path(), 1),
        loopback(),
        Config::default(),
        Arc::new(Echo::default()),
    );
    let (two, _serve_two) = serving(
        &identity(dir.path(), 2),
        loopback(),
        Config::default(),
        Arc::new(Echo::default()),
    );
    let addr_one = one.local_addr().expect("addr");
    let addr_two = two.local_addr().expect("addr");
    for channel in Channel::ALL {
        let answer = one
            .request(2, addr_two, channel, Bytes::from_static(b"hi"))
            .await
            .expect("1 -> 2");
        assert_eq!(answer, format!("1/{channel}/hi").as_bytes());
        let answer = two
            .request(1, addr_one, channel, Bytes::from_static(b"yo"))
            .await
            .expect("2 -> 1");
        assert_eq!(answer, format!("2/{channel}/yo").as_bytes());
    }
    let empty = one
        .request(2, addr_two, Channel::Control, Bytes::new())
        .await
        .expect("empty body");
    assert_eq!(empty, &b"1/control/"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_succeed() {
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
    let client =
        Transport::bind(&identity(dir.path(), 1), loopback(), Config::default()).expect("bind");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let client = client.clone();
        let channel = Channel::ALL[i as usize % 3];
        tasks.spawn(async move {
            let answer = client
                .request(2, addr, channel, Bytes::from(i.to_string()))
                .await;
            (i, channel, answer)
        });
    }
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        let (i, channel, answer) = joined.expect("task");
        assert_eq!(
            answer.expect("request"),
            format!("1/{channel}/{i}").as_bytes()
        );
        done += 1;
    }
    assert_eq!(done, 200);
    assert_eq!(echo.calls.load(std::sync::atomic::Ordering::Relaxed), 200);
}

/// Binds `identity` at `addr`, retrying while the old socket there is being released.
async fn rebind(identity: &Identity, addr: SocketAddr) -> (Transport, tokio::task::JoinHandle<()>) {
    for _ in 0..100 {
        match Transport::bind(identity, addr, Config::default()) {
            Ok(transport) => {
                let server = transport.clone();
                let task = tokio::spawn(async move {
                    server.serve(Arc::new(Echo::default())).await;
                });
                return (transport, task);
            }
            Err(Error::Io { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("rebind: {e}"),
        }
    }
    panic!("{addr} was not released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_peer_is_reachable_again_by_the_same_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    let two_id = identity(dir.path(), 2);
    let (server, serve) = serving(
        &two_id,
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
        .expect("before restart");

    server.close().await;
    serve.await.expect("serve returns once closed");
    drop(server);
    let failed = client
        .request(2, addr, Channel::Control, Bytes::from_static(b"b"))
        .await;
    assert!(failed.is_err(), "a closed peer cannot answer");

    let (_server, _serve) = rebind(&two_id, addr).await;
    let mut answer = client
        .request(2, addr, Channel::Control, Bytes::from_static(b"c"))
        .await;
    if let Err(Error::Closed { .. } | Error::Unreachable { .. }) = answer {
        // A request may still meet the old connection's end; the next one dials afresh.
        answer = client
            .request(2, addr, Channel::Control, Bytes::from_static(b"c"))
            .await;
    }
    assert_eq!(answer.expect("after restart"), &b"1/control/c"[..]);
}

/// Runs node 2 on its own runtime and thread until `crash` fires, then drops the runtime:
/// no task runs again, so no CONNECTION_CLOSE is sent, as with `kill -9`.
fn crashable_server(
    identity: Identity,
    addr_tx: std::sync::mpsc::Sender<SocketAddr>,
    crash: tokio::sync::oneshot::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let transport =
                Transport::bind(&identity, crate::loopback(), Config::default()).expect("bind");
            addr_tx
                .send(transport.local_addr().expect("addr"))
                .expect("send addr");
            let server = transport.clone();
            tokio::spawn(async move { server.serve(Arc::new(Echo::default())).await });
            let _ = crash.await;
            // Leak nothing past the runtime: the transport dies with it.
            drop(transport);
        });
        drop(runtime);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_peer_restarted_on_its_port_resets_the_stale_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    cluster(dir.path(), &[1, 2]);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (crash_tx, crash_rx) = tokio::sync::oneshot::channel();
    let thread = crashable_server(identity(dir.path(), 2), addr_tx, crash_rx);
    let addr = addr_rx.recv().expect("server address");
    let client =
        Transport::bind(&identity(dir.path(), 1), loopback(), Config::default()).expect("bind");
    client
        .request(2, addr, Channel::Replication, Bytes::from_static(b"a"))
        .await
        .expect("before crash");

    crash_tx.send(()).expect("crash");
    thread.join().expect("server thread");
    let (_server, _serve) = rebind(&identity(dir.path(), 2), addr).await;

    // The stale connection is reset by the new process (same identity, same reset key), so
    // the client hears of the restart at once: an error other than a timeout, or, if a
    // keep-alive already drew the reset, a fresh connection and an answer.
    let first = client
        .request_within(
            2,
            addr,
            Channel::Replication,
            Bytes::from(vec![1u8; 200]),
            Duration::from_secs(10),
        )
        .await;
    match first {
        Ok(_) => {}
        Err(Error::Closed { .. }) => {}
        Err(other) => panic!("stale link should be reset, got: {other}"),
    }
    let answer = client
        .request(2, addr, Channel::Replication, Bytes::from_static(b"b"))
        .await;
    assert_eq!(answer.expect("after restart"), &b"1/replication/b"[..]);
}
