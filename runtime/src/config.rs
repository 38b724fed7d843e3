//! Node settings: defaults, a TOML file, and command-line flags on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::txn::Limits;
use crate::wal::Durability;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the log, snapshots, components and compiled code live.
    pub data_dir: PathBuf,
    /// The HTTP API's address. Anything but loopback requires `admin_token`.
    pub listen: SocketAddr,
    /// When a commit is acknowledged: `disk` (after fsync) or `memory`.
    pub durability: Durability,
    /// Required as `Authorization: Bearer <token>` for deploy, delete, stop and start.
    pub admin_token: Option<String>,
    /// A file holding the admin token (kept out of the process list); instead of
    /// `admin_token`. A trailing newline is not part of the token.
    pub admin_token_file: Option<PathBuf>,
    /// When set, required as `Authorization: Bearer <token>` for invocations (the admin
    /// token serves too).
    pub invoke_token: Option<String>,
    /// A file holding the invoke token; instead of `invoke_token`.
    pub invoke_token_file: Option<PathBuf>,
    /// How long an idempotency key's answer is kept, in seconds.
    pub idempotency_window_s: u64,
    /// How many remembered answers a function keeps at most, within the window: beyond
    /// it the oldest are forgotten first (a retry of a forgotten key runs again). Give
    /// every node of a cluster the same value, so that copies forget alike.
    pub idempotency_keys_max: usize,
    /// Largest invocation body, in bytes.
    pub body_max_bytes: usize,
    /// Largest component, in bytes.
    pub component_max_bytes: usize,
    /// How often a transaction that lost a lock conflict is retried before the client
    /// gets 409.
    pub conflict_retries_max: u32,
    /// How deep calls between functions may nest.
    pub call_depth_max: u32,
    /// Take a snapshot (and truncate the log) after this many bytes of log.
    pub checkpoint_log_bytes: u64,
    /// The HTTP edge: the hosts and origins it answers, connection limits and timeouts.
    pub http: crate::http::Options,
    pub wasm: crate::wasm::Options,
    pub limits: Limits,
    /// Where the invocations' traces are exported (OpenTelemetry), if anywhere.
    pub traces: crate::trace::Options,
    /// Present when the node is part of a cluster.
    pub cluster: Option<crate::cluster::Config>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("understudy-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            durability: Durability::Disk,
            admin_token: None,
            admin_token_file: None,
            invoke_token: None,
            invoke_token_file: None,
            idempotency_window_s: 24 * 3600,
            idempotency_keys_max: 100_000,
            body_max_bytes: 1 << 20,
            component_max_bytes: 64 << 20,
            conflict_retries_max: 32,
            call_depth_max: 8,
            checkpoint_log_bytes: 64 << 20,
            http: Default::default(),
            wasm: Default::default(),
            limits: Default::default(),
            traces: Default::default(),
            cluster: None,
        }
    }
}

/// Room in a commit record for the remembered answer beside the writes.
const OUTPUT_MARGIN_BYTES: usize = crate::node::OUTPUT_LEN_MAX;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Read a TOML config file; fields it leaves out keep their defaults.
    ///
    /// Fails when the file cannot be read, is not TOML, or names an unknown setting.
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            path: path.to_owned(),
            source: e,
        })?;
        toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Read the tokens named by `admin_token_file` and `invoke_token_file` into
    /// `admin_token` and `invoke_token`.
    ///
    /// Fails when a file cannot be read, or when a token is given both ways.
    pub fn read_token_files(&mut self) -> Result<(), Error> {
        read_token_file("admin", &mut self.admin_token, &self.admin_token_file)?;
        read_token_file("invoke", &mut self.invoke_token, &self.invoke_token_file)
    }

    /// Fails when the settings cannot work together.
    pub fn validate(&self) -> Result<(), Error> {
        for (what, token) in [("admin", &self.admin_token), ("invoke", &self.invoke_token)] {
            if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return Err(Error::Invalid(format!(
                    "the {what} token is blank: a blank token would let anyone in"
                )));
            }
            if token
                .as_deref()
                .is_some_and(|t| t.chars().any(char::is_control))
            {
                return Err(Error::Invalid(format!(
                    "the {what} token has control characters: no client could send it"
                )));
            }
        }
        if self.http.connections_max == 0 || self.http.header_read_timeout_ms == 0 {
            return Err(Error::Invalid(
                "http.connections_max and http.header_read_timeout_ms must be at least 1".into(),
            ));
        }
        if !self.listen.ip().is_loopback() && self.admin_token.as_deref().unwrap_or("").is_empty() {
            return Err(Error::Invalid(format!(
                "listening on {} (not loopback) requires an admin token (--admin-token or admin_token in the config)",
                self.listen
            )));
        }
        if self.wasm.deadline_ms == 0 || self.wasm.deadline_ms > 3_600_000 {
            return Err(Error::Invalid(
                "wasm.deadline_ms must be between 1 and 3600000 (an hour)".into(),
            ));
        }
        if self.idempotency_window_s > 365 * 24 * 3600 {
            return Err(Error::Invalid(
                "idempotency_window_s must be at most a year".into(),
            ));
        }
        if self.limits.state_keys_max == 0 || self.limits.state_bytes_max == 0 {
            return Err(Error::Invalid(
                "limits.state_keys_max and limits.state_bytes_max must be at least 1".into(),
            ));
        }
        if self.idempotency_keys_max == 0 {
            return Err(Error::Invalid(
                "idempotency_keys_max must be at least 1".into(),
            ));
        }
        if self.wasm.instances_max == 0 || self.wasm.instances_max > 100_000 {
            return Err(Error::Invalid(
                "wasm.instances_max must be between 1 and 100000".into(),
            ));
        }
        if self.limits.write_bytes_max + OUTPUT_MARGIN_BYTES
            > crate::wal::segment::RECORD_LEN_MAX / 2
        {
            return Err(Error::Invalid(format!(
                "limits.write_bytes_max must stay well below the log's record limit of {} bytes",
                crate::wal::segment::RECORD_LEN_MAX
            )));
        }
        if self.wasm.memory_max_bytes < (1 << 16) {
            return Err(Error::Invalid(
                "wasm.memory_max_bytes must be at least one page (65536)".into(),
            ));
        }
        Ok(())
    }
}

/// Set `token` from `file`, if there is one: its contents without the trailing newline.
fn read_token_file(
    what: &str,
    token: &mut Option<String>,
    file: &Option<PathBuf>,
) -> Result<(), Error> {
    let Some(path) = file else {
        return Ok(());
    };
    if token.is_some() {
        return Err(Error::Invalid(format!(
            "the {what} token is given both directly and in {}: give one",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Invalid(format!(
            "cannot read the {what} token file {}: {e}",
            path.display()
        ))
    })?;
    *token = Some(text.trim_end_matches(['\n', '\r']).to_owned());
    Ok(())
}
