//! What every test needs: a real `understudy node` process on a free port with its own
//! data directory ([`NodeProcess`]), an HTTP client for its API ([`Api`]), and the
//! prebuilt guest components ([`component`]).
//!
//! A `NodeProcess` kills its child (SIGKILL) when dropped, so a panicking test never
//! leaves a node behind; on a panic it also prints the node's log, which is usually
//! where the reason is.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::HeaderMap;
use serde_json::Value;

/// How long a node may take to answer `/healthz` after it is spawned (it recovers its
/// log and loads compiled components first).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node that is expected to refuse to start may take to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-request timeout of the test client: far above any deadline the tests set.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness and exit are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Lines of a node's log printed when a test panics.
const LOG_TAIL_LINES: usize = 60;

/// The bytes of a prebuilt guest component (`counter`, `bank`, `inventory`, `hostile`).
///
/// Panics, saying how to build them, when `scripts/build-guests.sh` has not been run.
pub fn component(name: &str) -> Vec<u8> {
    let path = components_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read guest component {}: {e}\n\
             build the guests first: run scripts/build-guests.sh from the repository root",
            path.display()
        )
    })
}

/// The repository's root (the tests belong to the `crates/cli` package).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn components_dir() -> PathBuf {
    repo_root().join("target-guests/components")
}

/// A `wasm-tools` binary, if one is installed where scripts/build-guests.sh puts it.
pub fn wasm_tools() -> Option<PathBuf> {
    let path = repo_root().join(".venv/bin/wasm-tools");
    path.is_file().then_some(path)
}

/// A port on 127.0.0.1 that was free a moment ago, for TCP and for UDP (QUIC), and never
/// handed out before in this test run. The sockets are dropped before the node binds
/// it; the kernel hands out ephemeral ports round-robin, so a clash with a parallel
/// test's node (which binds other ports the kernel chose) is very unlikely.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener
            .local_addr()
            .expect("a bound listener has an address")
            .port();
        let udp_free = std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        let mut given = GIVEN.lock().expect("ports given");
        if udp_free && !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Flags for `understudy node`, beyond the data directory and the address.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    pub durability: Option<&'static str>,
    pub deadline_ms: Option<u64>,
    pub memory_max_mib: Option<usize>,
    pub admin_token: Option<String>,
    /// A TOML config file's text, for settings without a flag (`checkpoint_log_bytes`).
    pub config_toml: Option<String>,
    /// Run in this network namespace, listening on every address (port `NETNS_PORT`),
    /// reached at this address (see `netns`).
    pub netns: Option<(String, std::net::Ipv4Addr)>,
    /// More flags for `understudy node`.
    pub extra_args: Vec<String>,
    /// Environment variables for the node (`UNDERSTUDY_FAILPOINT`).
    pub env: Vec<(String, String)>,
    /// The HTTP port on 127.0.0.1 (a free one when not given), for configs that name
    /// the members' HTTP addresses.
    pub port: Option<u16>,
}

/// The HTTP port of a node in a network namespace of its own.
pub const NETNS_PORT: u16 = 7070;

impl NodeOptions {
    fn args(&self, root: &Path) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(text) = &self.config_toml {
            let path = root.join("config.toml");
            std::fs::write(&path, text).expect("write the node's config file");
            args.extend(["--config".into(), path.display().to_string()]);
        }
        if let Some(v) = self.durability {
            args.extend(["--durability".into(), v.to_owned()]);
        }
        if let Some(v) = self.deadline_ms {
            args.extend(["--deadline-ms".into(), v.to_string()]);
        }
        if let Some(v) = self.memory_max_mib {
            args.extend(["--memory-max-mib".into(), v.to_string()]);
        }
        if let Some(v) = &self.admin_token {
            args.extend(["--admin-token".into(), v.clone()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// The calls the tests grant each prebuilt component at deploy: those that call other
/// functions may call any (the tests name their functions freely); the others none.
pub fn calls_granted(component_name: &str) -> &'static str {
    match component_name {
        "transfer" | "orders" | "lists" | "hostile" | "sdk-py" | "sdk-js" => "*",
        _ => "",
    }
}

/// A running `understudy node` with a data directory of its own, which outlives the
/// process: [`NodeProcess::kill9`] and [`NodeProcess::restart`] crash it and bring it
/// back on the same directory. Each run logs to its own file next to the data directory.
pub struct NodeProcess {
    /// Holds the data directory and the log files; deleted on drop.
    root: tempfile::TempDir,
    options: NodeOptions,
    child: Option<Child>,
    port: u16,
    runs: u32,
    api: Api,
}

impl NodeProcess {
    /// Start a node with default options; see [`NodeProcess::start_with`].
    pub fn start() -> NodeProcess {
        NodeProcess::start_with(NodeOptions::default())
    }

    /// Start a node on a fresh data directory and wait until it answers `/healthz`.
    ///
    /// Panics (with the node's log) when it exits or is not ready within `START_TIMEOUT`.
    pub fn start_with(options: NodeOptions) -> NodeProcess {
        let root = tempfile::Builder::new()
            .prefix("understudy-test-")
            .tempdir()
            .expect("create a temp dir");
        let mut node = NodeProcess {
            root,
            options,
            child: None,
            port: 0,
            runs: 0,
            api: Api::new("http://127.0.0.1:1"),
        };
        node.spawn();
        node
    }

    /// The process id of the running node.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The port of the node's HTTP API.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The options of the next (re)start.
    pub fn options_mut(&mut self) -> &mut NodeOptions {
        &mut self.options
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir().join("wal")
    }

    /// The log (stderr) of the current or last run.
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join(format!("node-{}.stderr", self.runs))
    }

    /// Everything the current or last run wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the node's process has exited by itself (a failpoint, a crash); reaps it.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) => {
                self.child = None;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// `kill -9` the node and wait for it to be gone. Nothing it did not fsync survives.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop the node gracefully (SIGTERM) and wait for it to exit; returns its status.
    ///
    /// Panics when it is still running after `EXIT_TIMEOUT` (it is then killed on drop).
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().expect("the node is running").id();
        // std has no signal API and the crate avoids `unsafe`: use kill(1).
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill(1)");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().expect("the node is running");
            if let Some(status) = child.try_wait().expect("poll the node process") {
                self.child = None;
                return status;
            }
            assert!(
                started.elapsed() < EXIT_TIMEOUT,
                "the node still ran {EXIT_TIMEOUT:?} after SIGTERM; its log:\n{}",
                self.log()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Start the node again on the same data directory (on a new port), and wait until
    /// it is ready. Kills the running process first, if there is one.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Run `understudy node` on this data directory and expect it to exit without
    /// becoming ready: returns its exit status and its log.
    ///
    /// Panics when it is still running after `EXIT_TIMEOUT` (and kills it).
    pub fn restart_expecting_exit(&mut self) -> (ExitStatus, String) {
        self.kill9();
        // Held in `self.child` so that a panic here still kills it (on drop).
        self.child = Some(self.spawn_child());
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().expect("spawned above");
            if let Some(status) = child.try_wait().expect("poll the node process") {
                self.child = None;
                return (status, self.log());
            }
            assert!(
                started.elapsed() < EXIT_TIMEOUT,
                "the node was expected to exit but still ran after {EXIT_TIMEOUT:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn spawn(&mut self) {
        let child = self.spawn_child();
        self.child = Some(child);
        let host = match &self.options.netns {
            Some((_, addr)) => addr.to_string(),
            None => "127.0.0.1".into(),
        };
        self.api = Api::new(&format!("http://{host}:{}", self.port));
        self.wait_ready();
    }

    fn spawn_child(&mut self) -> Child {
        self.runs += 1;
        let stderr = File::create(self.log_path()).expect("create the node's log file");
        let exe = env!("CARGO_BIN_EXE_understudy");
        let (mut command, listen) = match &self.options.netns {
            Some((ns, _)) => {
                self.port = NETNS_PORT;
                let mut command = Command::new("ip");
                // `ip netns exec` execs the node: the child's pid is the node's.
                command.args(["netns", "exec", ns, exe]);
                (command, format!("0.0.0.0:{NETNS_PORT}"))
            }
            None => {
                self.port = self.options.port.unwrap_or_else(free_port);
                (Command::new(exe), format!("127.0.0.1:{}", self.port))
            }
        };
        command
            .arg("node")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(listen)
            .args(self.options.args(self.root.path()))
            // The test decides about the admin token, not the environment it runs in.
            .env_remove("UNDERSTUDY_ADMIN_TOKEN")
            .env_remove("UNDERSTUDY_INVOKE_TOKEN")
            // Nor does the environment make it a cluster member (`cluster_flags`).
            .env_remove("UNDERSTUDY_CONFIG")
            .env_remove("UNDERSTUDY_NODE_ID")
            .env_remove("UNDERSTUDY_PEERS")
            .env_remove("UNDERSTUDY_CERTS_DIR")
            .env_remove("UNDERSTUDY_PEER_LISTEN")
            .env_remove("UNDERSTUDY_JOIN")
            .env("RUST_LOG", "info,wasmtime=warn,cranelift=warn")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn the understudy binary")
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().expect("wait_ready follows a spawn");
            if let Some(status) = child.try_wait().expect("poll the node process") {
                self.child = None;
                panic!(
                    "the node exited with {status} before it was ready; its log:\n{}",
                    self.log()
                );
            }
            if matches!(self.api.get("/healthz"), Ok(reply) if reply.status == 200) {
                return;
            }
            if started.elapsed() > START_TIMEOUT {
                panic!(
                    "the node was not ready after {START_TIMEOUT:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- last {LOG_TAIL_LINES} lines of {} ---\n{}",
                self.log_path().display(),
                log_tail(&self.log_path())
            );
            if std::env::var_os("UNDERSTUDY_TEST_KEEP").is_some() {
                let root = std::mem::replace(
                    &mut self.root,
                    tempfile::Builder::new()
                        .prefix("understudy-test-")
                        .tempdir()
                        .expect("create a temp dir"),
                );
                eprintln!("kept {} (UNDERSTUDY_TEST_KEEP)", root.keep().display());
            }
        }
    }
}

/// The last `LOG_TAIL_LINES` lines of the file at `path` (reads at most its last 64 KiB).
fn log_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// An HTTP answer: status, headers, and the body as JSON (`Null` when empty, a JSON
/// string when it is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// The `error.code` of an error answer, or "" when there is none.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// Panics, showing the answer, unless the status is `status`.
    #[track_caller]
    pub fn expect_status(self, status: u16) -> Reply {
        assert_eq!(
            self.status, status,
            "unexpected answer: {} {}",
            self.status, self.text
        );
        self
    }

    /// Panics, showing the answer, unless it is `status` with error code `code`.
    #[track_caller]
    pub fn expect_error(self, status: u16, code: &str) -> Reply {
        assert_eq!(
            (self.status, self.code()),
            (status, code),
            "unexpected answer: {} {}",
            self.status,
            self.text
        );
        self
    }
}

/// A client for one node's HTTP API.
#[derive(Clone, Debug)]
pub struct Api {
    base: String,
    client: Client,
    token: Option<String>,
}

impl Api {
    pub fn new(base: &str) -> Api {
        let client = Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("build an HTTP client");
        Api {
            base: base.to_owned(),
            client,
            token: None,
        }
    }

    /// The same address with a client that gives up on a request after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Api {
        Api {
            client: Client::builder()
                .timeout(timeout)
                .build()
                .expect("build an HTTP client"),
            ..self.clone()
        }
    }

    /// The same client, sending `Authorization: Bearer <token>` on every request.
    pub fn with_token(&self, token: &str) -> Api {
        Api {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> reqwest::Result<Reply> {
        self.send(self.client.get(self.url(path)))
    }

    /// `PUT /v1/functions/{name}` with the component `bytes`.
    pub fn deploy(&self, name: &str, bytes: Vec<u8>) -> Reply {
        self.send(
            self.client
                .put(self.url(&format!("/v1/functions/{name}")))
                .header("content-type", "application/wasm")
                .body(bytes),
        )
        .expect("deploy request")
    }

    /// `POST path` with no body.
    pub fn post(&self, path: &str) -> Reply {
        self.send(self.client.post(self.url(path)))
            .expect("POST request")
    }

    /// `PUT path` with `bytes` as the body.
    pub fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> Reply {
        self.send(
            self.client
                .put(self.url(path))
                .header("content-type", "application/wasm")
                .body(bytes),
        )
        .expect("PUT request")
    }

    /// Deploy the prebuilt guest `component` as `name` with the calls the tests grant it
    /// (`calls_granted`); panics unless it is created.
    #[track_caller]
    pub fn deploy_component(&self, name: &str, component_name: &str) -> Reply {
        self.put_bytes(
            &format!(
                "/v1/functions/{name}?calls={}",
                calls_granted(component_name)
            ),
            component(component_name),
        )
        .expect_status(201)
    }

    pub fn delete(&self, name: &str) -> Reply {
        self.send(
            self.client
                .delete(self.url(&format!("/v1/functions/{name}"))),
        )
        .expect("delete request")
    }

    /// `POST /v1/functions/{name}/{action}` for `stop` or `start`.
    pub fn admin(&self, name: &str, action: &str) -> Reply {
        self.send(
            self.client
                .post(self.url(&format!("/v1/functions/{name}/{action}"))),
        )
        .expect("admin request")
    }

    pub fn describe(&self, name: &str) -> Reply {
        self.get(&format!("/v1/functions/{name}"))
            .expect("describe request")
    }

    /// Invoke `function.method` with `input` serialised as the body.
    pub fn invoke(&self, function: &str, method: &str, input: &Value) -> Reply {
        self.try_invoke(function, method, input, None)
            .expect("invoke request")
    }

    /// Invoke with an `Idempotency-Key`.
    pub fn invoke_keyed(&self, function: &str, method: &str, input: &Value, key: &str) -> Reply {
        self.try_invoke(function, method, input, Some(key))
            .expect("invoke request")
    }

    /// Invoke, returning transport errors (a node that was killed) instead of panicking.
    pub fn try_invoke(
        &self,
        function: &str,
        method: &str,
        input: &Value,
        key: Option<&str>,
    ) -> reqwest::Result<Reply> {
        let body = serde_json::to_vec(input).expect("JSON values serialise");
        self.invoke_raw(function, method, body, key)
    }

    /// Invoke with `body` sent as is.
    pub fn invoke_raw(
        &self,
        function: &str,
        method: &str,
        body: Vec<u8>,
        key: Option<&str>,
    ) -> reqwest::Result<Reply> {
        let mut request = self
            .client
            .post(self.url(&format!("/v1/functions/{function}/{method}")))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        self.send(request)
    }

    /// Invoke and return the output; panics, showing the answer, unless it is 200.
    #[track_caller]
    pub fn ok(&self, function: &str, method: &str, input: Value) -> Value {
        self.invoke(function, method, &input)
            .expect_status(200)
            .body
    }

    /// A request to `path`, to finish and hand to [`Api::send`].
    pub fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// Send `request` (with the token, if this client has one) and read the answer.
    pub fn send(&self, request: RequestBuilder) -> reqwest::Result<Reply> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send()?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text()?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()))
        };
        Ok(Reply {
            status,
            headers,
            body,
            text,
        })
    }
}

/// The segment files (`wal-*.log`) of the log in `wal_dir`, oldest first.
pub fn wal_segments(wal_dir: &Path) -> Vec<PathBuf> {
    wal_files(wal_dir, "wal-", ".log")
}

/// The snapshot files (`snap-*.snap`) in `wal_dir`, oldest first.
pub fn wal_snapshots(wal_dir: &Path) -> Vec<PathBuf> {
    wal_files(wal_dir, "snap-", ".snap")
}

fn wal_files(wal_dir: &Path, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(wal_dir)
        .expect("read the log directory")
        .map(|entry| entry.expect("read a log directory entry").path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(prefix) && name.ends_with(suffix)
        })
        .collect();
    // The names carry zero-padded LSNs, so name order is log order.
    files.sort();
    files
}

/// Poll `condition` every `POLL_INTERVAL` until it holds; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}
