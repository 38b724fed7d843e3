//! Connections are bounded: past `http.connections_max` a new one is refused at once,
//! and the refusal logged; a client that sends its headers too slowly, or leaves its
//! connection idle, is cut off.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{wait_until, Api, NodeOptions, NodeProcess};

/// Far longer than the node's header timeout in these tests: a read that waits this
/// long means the node never closed the connection.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("read timeout");
    stream
}

/// Send `GET /healthz` and read the first bytes of the answer.
fn healthz(stream: &mut TcpStream, port: u16) -> std::io::Result<String> {
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )?;
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Read until the node closes the connection; panics if it is still open after
/// `READ_TIMEOUT`.
#[track_caller]
fn expect_closed_by_the_node(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the node kept the connection open")
            }
            Err(_) => return,
        }
    }
}

#[test]
fn connections_past_the_limit_are_refused_and_logged() {
    let limit = 4;
    let node = NodeProcess::start_with(NodeOptions {
        config_toml: Some(format!(
            "[http]\nconnections_max = {limit}\nheader_read_timeout_ms = 600000\n"
        )),
        ..Default::default()
    });
    let port = node.port();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..limit * 3 {
        let mut stream = connect(port);
        match healthz(&mut stream, port) {
            Ok(text) if text.starts_with("HTTP/1.1 200") => held.push(stream),
            Ok(text) => {
                assert!(
                    text.is_empty() || text.starts_with("HTTP/1.1 503"),
                    "unexpected answer: {text}"
                );
                if !text.is_empty() {
                    assert!(text.contains("too-many-connections"), "{text}");
                }
                refused += 1;
            }
            Err(e) => {
                assert!(
                    !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                    "a connection past the limit was left waiting: {e}"
                );
                refused += 1;
            }
        }
    }
    assert!(
        held.len() <= limit,
        "{} connections served with a limit of {limit}",
        held.len()
    );
    assert!(refused >= limit * 2, "only {refused} refused");
    wait_until(
        "the refusals in the node's log",
        Duration::from_secs(30),
        || node.log().contains("refused connections"),
    );
    // And in the metrics, read over one of the connections held.
    let mut metrics = held.pop().expect("a connection held");
    write!(
        metrics,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains("# EOF") {
        let n = metrics.read(&mut buf).expect("read the metrics");
        assert!(n > 0, "the node closed the connection: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert!(
        value("understudy_http_connections_refused_total") >= refused as f64,
        "{refused} refused: {text}"
    );
    let open = value("understudy_http_connections_open");
    assert!(
        open >= 1.0 && open <= limit as f64,
        "{open} connections open with a limit of {limit}"
    );
    drop(metrics);

    // Closing connections makes room again.
    drop(held);
    let fresh = Api::new(&node.api().url(""));
    wait_until(
        "a new client served",
        Duration::from_secs(30),
        || matches!(fresh.get("/healthz"), Ok(reply) if reply.status == 200),
    );
}

#[test]
fn slow_headers_and_idle_connections_are_cut_off() {
    let node = NodeProcess::start_with(NodeOptions {
        config_toml: Some("[http]\nheader_read_timeout_ms = 500\n".into()),
        ..Default::default()
    });
    let port = node.port();

    let mut slow = connect(port);
    write!(
        slow,
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Never-Ends: "
    )
    .expect("send part of the headers");
    expect_closed_by_the_node(&mut slow, "headers that never end");

    let mut silent = connect(port);
    expect_closed_by_the_node(&mut silent, "a connection that sends nothing");

    let mut idle = connect(port);
    let answer = healthz(&mut idle, port).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    expect_closed_by_the_node(&mut idle, "a kept-alive connection left idle");

    // The node still serves (a fresh client: the test client's kept-alive connection
    // was cut off too).
    Api::new(&node.api().url(""))
        .get("/healthz")
        .expect("healthz")
        .expect_status(200);
}
