//! A node: the store, the log, the wasm runtime and the transaction path that ties
//! them together. It owns the order of a commit: run the handler under the
//! function's lock, append and apply the write set, release the lock (with memory
//! durability, let the next transaction in line run), then wait for durability before
//! answering. The next transaction on the function runs while the previous one's
//! fsync is in flight (pipelining), but nobody hears of a commit before it, and
//! everything it read, is durable.
//!
//! **Invariant:** no answer leaves `invoke` before the log position of every write it
//! depends on is durable (with `Durability::Disk`).
//! **Invariant:** a transaction's locks are released on every path, including
//! cancellation (`HeldLocks` releases them on drop).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use understudy_control::CallGrants;

use crate::cluster::wire::{Entry, Kind};
use crate::config::Config;
use crate::ids::{Digest, FunctionName, Lsn, TxnId};
use crate::lock::{self, Mode};
use crate::metrics::Metrics;
use crate::store::{Captured, Function, Restored, Store};
use crate::txn::Txn;
use crate::wal::record::{
    Commit, Decision, Deploy, End, FunctionEpoch, Idempotency, Outcome, Prepare, Record, Resolved,
    Writes,
};
use crate::wal::{self, Durability, Wal};
use crate::wasm::{self, Abort, CallFuture, Calls, Ctx, GuestError, GuestTrap, Loaded, Runtime};

pub use crate::store::AUTO_KEY_WINDOW_S;

/// Longest idempotency key accepted.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 256;
/// Largest output a handler may return.
pub const OUTPUT_LEN_MAX: usize = 16 << 20;

/// The first back-off after a lost conflict, doubled each retry up to the max.
const CONFLICT_BACKOFF_US: u64 = 50;
const CONFLICT_BACKOFF_US_MAX: u64 = 20_000;
/// How long a call waits, holding its caller's locks, for a prepared part on its callee
/// to be resolved, before the whole transaction lets go of everything and waits for it
/// (see `InvokeError::PreparedElsewhere`).
const NESTED_PREPARED_WAIT: Duration = Duration::from_millis(10);
/// How often a transaction waiting, under its locks, for what it read to be replicated
/// looks again at whether the copies it read are still primaries here.
const RELEASE_POLL: Duration = Duration::from_millis(5);
/// The first pause before running a transaction again after `PreparedElsewhere`,
/// doubled each time up to the max.
const PREPARED_PAUSE_MS: u64 = 2;
const PREPARED_PAUSE_MS_MAX: u64 = 20;

/// Bits of a transaction id that hold the node it began on (see `Inner::next_txn`).
pub const TXN_NODE_BITS: u32 = 8;

/// Errors of the invocation path that are not the handler's own answer. They cross
/// the wire as they are (a forwarded invocation or a call to another node fails with the
/// same kind and message as it would have here), so a new kind needs no mapping.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InvokeError {
    #[error("no function named {0:?} is deployed")]
    UnknownFunction(String),
    #[error("function {0} is stopped")]
    Stopped(FunctionName),
    #[error("invalid idempotency key: {0}")]
    BadIdempotencyKey(String),
    /// The key was used before for another request (another method or body).
    #[error("{0}")]
    IdempotencyKeyReused(String),
    #[error("the guest trapped: {0}")]
    Trap(String),
    #[error("{0}")]
    Deadline(String),
    #[error("{0}")]
    ResourceCap(String),
    /// The transaction would grow a function's state past its cap (`Limits`).
    #[error("{0}")]
    StateFull(String),
    #[error("the transaction kept conflicting with others and gave up after {0} attempts")]
    Conflict(u32),
    /// A callee failed after calling functions on other nodes: what it did there cannot
    /// be undone apart from the rest, so the whole transaction is aborted.
    #[error("{0}")]
    CalleeFailedAcrossNodes(String),
    #[error("the node is overloaded: {0}")]
    Busy(String),
    /// The request waited its whole deadline for its function's lock: the function has
    /// more work than it can do in time. Answered with `Retry-After`.
    #[error("{0}")]
    Overloaded(String),
    /// A function the transaction called is held by a distributed transaction whose
    /// outcome is not known yet (its part there is prepared). The transaction is run
    /// again once that is resolved, without holding any lock meanwhile.
    #[error("{0}")]
    PreparedElsewhere(String),
    #[error("the handler's output of {0} bytes exceeds the limit of {OUTPUT_LEN_MAX} bytes")]
    OutputTooLarge(usize),
    #[error("storage failure: {0}")]
    Storage(String),
    /// This node is not (or no longer) the function's primary: route elsewhere.
    #[error("this node is not the primary of {0}")]
    NotPrimary(FunctionName),
    /// The cluster could not serve the function now (no primary reachable, or the
    /// commit's replication outcome is unknown).
    #[error("{0}")]
    Unavailable(String),
}

/// Errors of deploy, delete, stop and start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadName(String),
    #[error("no function named {0:?} is deployed")]
    UnknownFunction(String),
    #[error(transparent)]
    Component(#[from] wasm::Error),
    #[error("storage failure: {0}")]
    Storage(String),
    /// The master refused the change.
    #[error("the master refused: {0}")]
    Rejected(String),
    /// The master could not be reached or did not answer in time.
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
}

impl InvokeError {
    /// The HTTP API's error code for it.
    pub fn code(&self) -> &'static str {
        match self {
            InvokeError::UnknownFunction(_) => "unknown-function",
            InvokeError::Stopped(_) => "stopped",
            InvokeError::BadIdempotencyKey(_) => "bad-idempotency-key",
            InvokeError::IdempotencyKeyReused(_) => "idempotency-key-reused",
            InvokeError::Trap(_) => "trap",
            InvokeError::Deadline(_) => "deadline",
            InvokeError::ResourceCap(_) => "resource-cap",
            InvokeError::StateFull(_) => "state-full",
            InvokeError::Conflict(_) => "conflict",
            InvokeError::CalleeFailedAcrossNodes(_) => "callee-failed-across-nodes",
            InvokeError::Busy(_) | InvokeError::PreparedElsewhere(_) => "busy",
            InvokeError::Overloaded(_) => "overloaded",
            InvokeError::OutputTooLarge(_) => "output-too-large",
            InvokeError::Storage(_) => "storage",
            InvokeError::NotPrimary(_) => "not-primary",
            InvokeError::Unavailable(_) => "unavailable",
        }
    }
}

/// Errors that stop a node from opening.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Wal(#[from] wal::Error),
    #[error("recovery: {0}")]
    Recovery(String),
    #[error(transparent)]
    Wasm(#[from] wasm::Error),
}

/// Errors of writing to this node's log what a copy receives (replicated entries, a
/// snapshot) or a step of two-phase commit. The copy that hits one no longer matches its
/// primary's, or this node's log has failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("function {0} is not deployed here")]
    NotDeployed(FunctionName),
    #[error("{0} is no longer served here")]
    NotServed(FunctionName),
    #[error("entry {seq} does not follow this copy's position #{position}")]
    NotNext {
        seq: crate::replication::Seq,
        position: u64,
    },
    #[error("entry {0} carries another function's answer")]
    ForeignAnswer(crate::replication::Seq),
    #[error("entry {seq} resolves transaction {txn}, which is not prepared here")]
    NotPrepared {
        seq: crate::replication::Seq,
        txn: TxnId,
    },
    #[error(transparent)]
    Log(#[from] wal::Error),
    #[error(transparent)]
    Apply(#[from] crate::store::Error),
}

/// A handler's answer.
#[derive(Debug)]
pub struct Answer {
    pub outcome: Result<Vec<u8>, GuestError>,
    pub txn: TxnId,
    /// True when the answer was remembered for the idempotency key, not computed now.
    pub replayed: bool,
    /// In a cluster: the node that answered as the function's primary, and its epoch.
    pub served_by: Option<(u64, u64)>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct FunctionInfo {
    pub name: String,
    pub digest: String,
    pub version: u64,
    pub running: bool,
    /// The functions it may call (`*`: any), as granted at deploy.
    pub calls: CallGrants,
    pub deployed_at_ms: u64,
    pub keys: usize,
    /// The bytes of its keys and values (what `limits.state_bytes_max` caps).
    #[serde(default)]
    pub state_bytes: u64,
    pub idempotency_keys: usize,
    /// Answers forgotten (oldest first) to stay within `idempotency_keys_max`, since
    /// this node loaded the function.
    #[serde(default)]
    pub idempotency_keys_forgotten: u64,
    pub lsn_last_write: u64,
    /// Commits in the function's own log (its replication position).
    pub seq: u64,
    pub state_digest: String,
}

#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Store,
    wal: Wal,
    runtime: Runtime,
    metrics: Arc<Metrics>,
    loaded: RwLock<HashMap<Digest, Arc<Loaded>>>,
    artifacts_dir: PathBuf,
    /// The counter part of the next transaction id (see `next_txn`).
    txn_next: AtomicU64,
    /// The low bits of every transaction id made here: the cluster node id (0 alone).
    txn_node: u64,
    admin: tokio::sync::Mutex<()>,
    checkpointing: AtomicBool,
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("data_dir", &self.inner.config.data_dir)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    /// Open the node's data directory, recover its state from the snapshot and the log,
    /// and load every deployed component (from the compiled cache when possible).
    ///
    /// Fails when the log or a snapshot is corrupt (the error names the file and
    /// offset), when a deployed component's file is missing, or on I/O errors.
    pub fn open(config: Config) -> Result<Node, OpenError> {
        let started = Instant::now();
        let metrics = Arc::new(Metrics::new());
        let data = &config.data_dir;
        let artifacts_dir = data.join("artifacts");
        std::fs::create_dir_all(&artifacts_dir).map_err(|e| wal::Error::Io {
            path: artifacts_dir.clone(),
            source: e,
        })?;
        let runtime = Runtime::new(config.wasm, &data.join("compiled"))?;
        let (wal, recovered) = Wal::open(&data.join("wal"), config.durability, metrics.clone())?;
        for warning in &recovered.warnings {
            tracing::warn!("log recovery: {warning}");
        }
        let store = match recovered.snapshot {
            Some(image) => Store::from_image(image),
            None => Store::default(),
        };
        // Before the replay, so that it forgets what the live node forgot.
        store.set_answers_max(config.idempotency_keys_max);
        let replayed = recovered.records.len();
        let mut txn_max = 0;
        for (lsn, record) in &recovered.records {
            store
                .apply(*lsn, record)
                .map_err(|e| OpenError::Recovery(e.to_string()))?;
            if let Record::Commit(c) = record {
                txn_max = txn_max.max(c.txn.0 >> TXN_NODE_BITS);
            }
        }
        let mut loaded = HashMap::new();
        for f in store.list() {
            let digest = f.digest();
            if loaded.contains_key(&digest) {
                continue;
            }
            let path = artifacts_dir.join(format!("{}.wasm", digest.to_hex()));
            let bytes = std::fs::read(&path).map_err(|e| {
                OpenError::Recovery(format!(
                    "function {} needs component {}: {e}",
                    f.name,
                    path.display()
                ))
            })?;
            if Digest::of(&bytes) != digest {
                return Err(OpenError::Recovery(format!(
                    "{} does not match its digest {digest}",
                    path.display()
                )));
            }
            loaded.insert(digest, runtime.load(&bytes)?);
        }
        metrics.functions_deployed.set(store.list().len() as i64);
        tracing::info!(
            functions = loaded.len(),
            records = replayed,
            lsn = %wal.lsn_last(),
            ms = started.elapsed().as_millis() as u64,
            "recovered {}",
            config.data_dir.display()
        );
        // Transaction ids only need to grow within a run and stay unique in the log
        // (and, with the node id in their low bits, in the cluster); they start near
        // the clock so that ages compare across nodes (wait-die).
        let txn_next = txn_max.max(now_ms() * 1000) + 1;
        let txn_node = config
            .cluster
            .as_ref()
            .map_or(0, |c| c.node_id & ((1 << TXN_NODE_BITS) - 1));
        Ok(Node {
            inner: Arc::new(Inner {
                config,
                store,
                wal,
                runtime,
                metrics,
                loaded: RwLock::new(loaded),
                artifacts_dir,
                txn_next: AtomicU64::new(txn_next),
                txn_node,
                admin: tokio::sync::Mutex::new(()),
                checkpointing: AtomicBool::new(false),
                cluster: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Attach this node's cluster membership (once, at start).
    pub fn set_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.inner.cluster.set(cluster);
    }

    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.inner.cluster.get()
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Set the gauges read at a scrape: each function's state and remembered answers,
    /// and the process's resident memory.
    pub fn sample_metrics(&self) {
        let m = &self.inner.metrics;
        m.function_state_keys.clear();
        m.function_state_bytes.clear();
        m.function_idempotency_keys.clear();
        for f in self.inner.store.list() {
            let labels = crate::metrics::FunctionLabels {
                function: f.name.to_string(),
            };
            let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            m.function_state_keys
                .get_or_create(&labels)
                .set(gauge(f.len() as u64));
            m.function_state_bytes
                .get_or_create(&labels)
                .set(gauge(f.state_bytes()));
            m.function_idempotency_keys
                .get_or_create(&labels)
                .set(gauge(f.idempotency_keys() as u64));
        }
        if let Some(bytes) = resident_memory_bytes() {
            m.resident_memory_bytes.set(bytes);
        }
        let (busy, waiting) = self.inner.runtime.guest_load();
        m.guest_threads_busy.set(busy as i64);
        m.guest_runs_waiting.set(waiting as i64);
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Resolves when the node hits a fatal error (its log writer failed), with the reason.
    /// Cancel safe.
    pub async fn fatal(&self) -> String {
        match self.inner.wal.wait_durable(Lsn(u64::MAX)).await {
            Err(e) => e.to_string(),
            // No log reaches that position.
            Ok(()) => std::future::pending().await,
        }
    }

    /// The log writer's counters (fsyncs, their total time, records written).
    pub fn wal_stats(&self) -> wal::Stats {
        self.inner.wal.stats()
    }

    pub fn lsn_durable(&self) -> Lsn {
        self.inner.wal.lsn_durable()
    }

    /// Run `method` of `function` with `input` as one transaction.
    ///
    /// With an idempotency key, a repeat gets the remembered answer without running the
    /// handler. Fails (with an `InvokeError`) when the function is unknown or stopped,
    /// the guest trapped or hit a cap, or conflicts never resolved; the transaction then
    /// left nothing behind.
    ///
    /// # Cancel safety
    /// Not cancel safe as to the outcome: a cancelled call may still commit (its locks
    /// are released either way). Callers that must always answer spawn it.
    pub async fn invoke(
        &self,
        function: &str,
        method: &str,
        input: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Answer, InvokeError> {
        let inner = &self.inner;
        let started = Instant::now();
        let f = FunctionName::new(function)
            .ok()
            .and_then(|name| inner.store.get(&name))
            .ok_or_else(|| InvokeError::UnknownFunction(function.to_owned()))?;
        if !f.meta().running {
            return Err(InvokeError::Stopped(f.name.clone()));
        }
        if let Some(key) = idempotency_key {
            check_idempotency_key(key)?;
            if let Some(answer) = self.replay(&f, key, method, input).await? {
                inner.metrics.invocation(f.name.as_str(), "replay");
                return Ok(answer);
            }
        }
        // Each attempt is a transaction of its own (a part an aborted attempt left on
        // another node must not be taken for the next one's), as old as the first.
        let age = inner.next_txn();
        let mut id = age;
        let mut attempt = 0;
        let mut prepared_waits = 0u32;
        let gate = Duration::from_millis(inner.config.wasm.deadline_ms);
        let result = loop {
            attempt += 1;
            if attempt > 1 {
                id = inner.next_txn();
            }
            match self
                .attempt(
                    &f,
                    id,
                    age,
                    Request {
                        method,
                        input,
                        idempotency_key,
                        queue_until: started + gate,
                    },
                )
                .await
            {
                Err(InvokeError::Conflict(_)) if attempt <= inner.config.conflict_retries_max => {
                    // Back off, twice as long each time up to a bound (a transaction that
                    // won may hold its locks through a two-phase commit, milliseconds),
                    // staggered by transaction so that two conflicting transactions do
                    // not retry in lockstep.
                    let backoff_us =
                        (CONFLICT_BACKOFF_US << attempt.min(16)).min(CONFLICT_BACKOFF_US_MAX);
                    let jitter_us = (age.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % backoff_us;
                    tokio::time::sleep(Duration::from_micros(backoff_us + jitter_us)).await;
                }
                Err(InvokeError::Conflict(_)) => break Err(InvokeError::Conflict(attempt)),
                Err(InvokeError::PreparedElsewhere(_)) if started.elapsed() < gate => {
                    // A function it called waits for an in-doubt outcome. Waiting for it
                    // here holds no lock: held, they would stop every transaction on the
                    // caller's functions (and a hand-over of them) for as long. Within the
                    // same bound as a transaction waiting at its own function's gate.
                    let pause =
                        (PREPARED_PAUSE_MS << prepared_waits.min(8)).min(PREPARED_PAUSE_MS_MAX);
                    prepared_waits += 1;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                other => break other,
            }
        };
        let outcome = match &result {
            Ok(Answer { outcome: Ok(_), .. }) => "commit",
            Ok(Answer {
                outcome: Err(_), ..
            }) => "abort",
            Err(InvokeError::Deadline(_)) => "deadline",
            Err(InvokeError::Conflict(_)) => "conflict",
            Err(InvokeError::Trap(_) | InvokeError::ResourceCap(_)) => "trap",
            Err(_) => "error",
        };
        inner.metrics.invocation(f.name.as_str(), outcome);
        inner.metrics.rates.record(
            f.name.as_str(),
            crate::rates::now_second(),
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            matches!(outcome, "commit" | "abort"),
        );
        match outcome {
            "commit" => {
                inner.metrics.commits.inc();
                inner
                    .metrics
                    .commit_latency_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            "abort" => {
                inner.metrics.aborts.inc();
            }
            "trap" | "deadline" => {
                inner.metrics.traps.inc();
            }
            _ => {}
        }
        self.maybe_checkpoint();
        result
    }

    /// The remembered answer for `key`, once the commit that remembered it is durable;
    /// an error if the key was used for another request.
    async fn replay(
        &self,
        f: &Function,
        key: &str,
        method: &str,
        input: &[u8],
    ) -> Result<Option<Answer>, InvokeError> {
        match self.remembered(f, key) {
            Some(found) => {
                check_same_request(&found.1, method, input)?;
                self.replay_found(f, found).await.map(Some)
            }
            None => Ok(None),
        }
    }

    /// The answer remembered for `key`, with the position that must be durable first.
    fn remembered(&self, f: &Function, key: &str) -> Option<(Lsn, Idempotency)> {
        let expiry = now_ms().saturating_sub(self.inner.config.idempotency_window_s * 1000);
        f.idempotent_answer(key, expiry)
    }

    async fn replay_found(
        &self,
        f: &Function,
        (lsn, entry): (Lsn, Idempotency),
    ) -> Result<Answer, InvokeError> {
        self.wait_durable(lsn).await?;
        let mut served_by = None;
        if let Some(cluster) = self.inner.cluster.get() {
            // The commit that stored it may still be on its way to the backups.
            let copy = cluster
                .replicas()
                .primary(&f.name)
                .ok_or_else(|| InvokeError::NotPrimary(f.name.clone()))?;
            copy.released(f.seq())
                .await
                .map_err(|e| InvokeError::Unavailable(e.to_string()))?;
            check_lease(cluster, Some(&copy))?;
            served_by = Some((cluster.replicas().me().0, copy.epoch.0));
        }
        let outcome = match entry.outcome {
            Outcome::Ok(output) => Ok(output),
            Outcome::Err { code, message } => Err(GuestError { code, message }),
        };
        Ok(Answer {
            outcome,
            txn: TxnId(0),
            replayed: true,
            served_by,
        })
    }

    async fn attempt(
        &self,
        f: &Arc<Function>,
        id: TxnId,
        age: TxnId,
        request: Request<'_>,
    ) -> Result<Answer, InvokeError> {
        let Request {
            method,
            input,
            idempotency_key,
            queue_until,
        } = request;
        let inner = &self.inner;
        // Waiting for the function (in line for its lock, or for a prepared part on it
        // to be resolved) ends at the request's deadline, counted from its arrival, or,
        // in a cluster, once this node is no longer the function's primary: a copy that
        // lost its role may never learn the prepared part's outcome (the new primary
        // resolves it), and the router sends the request to the new primary.
        let primary_here = || match inner.cluster.get() {
            Some(cluster) => cluster.replicas().primary(&f.name).is_some(),
            None => true,
        };
        // A request that would wait in line past its deadline is refused now, not at
        // its deadline: the line ahead is too long even at the function's fastest
        // recent pace.
        if let Some(wait) = f.lock.expected_wait() {
            let left = queue_until.saturating_duration_since(Instant::now());
            if wait > left {
                return Err(InvokeError::Overloaded(format!(
                    "function {} is busy: at least {} ms of work is ahead of this request ({} waiting; the fastest of its last transactions held it {} ms) and its deadline leaves {} ms; try again later",
                    f.name,
                    wait.as_millis(),
                    f.lock.waiters(),
                    f.lock.fastest_hold().unwrap_or_default().as_millis(),
                    left.as_millis()
                )));
            }
        }
        lock_unprepared(f, id, age, Mode::First, queue_until, &primary_here)
            .await
            .map_err(|blocked| match blocked {
                Blocked::NotPrimary => InvokeError::NotPrimary(f.name.clone()),
                Blocked::Lock(e) => lock_error(e),
                Blocked::Prepared(other) => InvokeError::Busy(format!(
                    "function {} is held by distributed transaction {other}, whose outcome is not known yet",
                    f.name
                )),
                Blocked::Queued => InvokeError::Overloaded(format!(
                    "function {} was busy for this request's whole deadline ({} ms), {} more waiting; try again later",
                    f.name,
                    inner.config.wasm.deadline_ms,
                    f.lock.waiters()
                )),
            })?;
        // Running gets a whole deadline once the lock is ours, so a request is
        // answered within two deadlines of its arrival.
        let deadline = Instant::now() + Duration::from_millis(inner.config.wasm.deadline_ms);
        let txn = Arc::new(Mutex::new(Txn::new(id, age, deadline, inner.config.limits)));
        txn.lock().add_held(f.clone());
        let held = HeldLocks { txn: txn.clone() };

        // Checked again under the lock: the function may have been stopped or deleted,
        // or a duplicate of this request committed, while we waited.
        let meta = f.meta();
        if meta.deleted {
            return Err(InvokeError::UnknownFunction(f.name.to_string()));
        }
        if !meta.running {
            return Err(InvokeError::Stopped(f.name.clone()));
        }
        // In a cluster, only the primary runs transactions (checked under the lock: a
        // change of role takes it).
        let copy = match inner.cluster.get() {
            Some(cluster) => {
                let copy = cluster
                    .replicas()
                    .primary(&f.name)
                    .ok_or_else(|| InvokeError::NotPrimary(f.name.clone()))?;
                check_lease(cluster, Some(&copy))?;
                Some(copy)
            }
            None => None,
        };
        if let Some(key) = idempotency_key {
            if let Some(found) = self.remembered(f, key) {
                check_same_request(&found.1, method, input)?;
                // Waiting for it to be durable and replicated must not hold the lock (a
                // catch-up that would release it needs the lock).
                held.hand_on(inner.wal.durability()).await;
                return self.replay_found(f, found).await;
            }
        }
        // In a cluster the transaction may call functions on other nodes: it coordinates.
        let mut parts = inner.cluster.get().map(|cluster| {
            let mut t = txn.lock();
            t.coordinator = Some(f.name.clone());
            t.home = true;
            drop(t);
            PartsGuard {
                distributed: cluster.distributed().clone(),
                coordinator: f.name.clone(),
                txn: txn.clone(),
                armed: true,
            }
        });
        let loaded = self.loaded(meta.deploy.digest)?;
        let ctx = Ctx::new(txn.clone(), f.clone(), 0, inner.clone(), &inner.config.wasm);
        let result = tracing::Instrument::instrument(
            inner.runtime.run(&loaded, ctx, deadline, method, input),
            crate::trace::inner_span!("guest.run", function = %f.name, method, txn = %id),
        )
        .await;
        let outcome = match result {
            Err(abort) => return Err(classify(abort)),
            Ok(Ok(output)) if output.len() > OUTPUT_LEN_MAX => {
                return Err(InvokeError::OutputTooLarge(output.len()))
            }
            Ok(outcome) => outcome,
        };
        if outcome.is_ok() {
            txn.lock()
                .check_state_caps()
                .map_err(|e| InvokeError::StateFull(e.0))?;
        }

        // In a cluster, every function the transaction wrote other than its own takes
        // part in two-phase commit (unless the handler's error aborts everything): the
        // ones elsewhere, and the ones here too, since each function's log may fail over
        // to a different node. Parts elsewhere that only read are released now.
        let elsewhere = txn.lock().parts_elsewhere();
        let mut participants: Vec<FunctionName> = Vec::new();
        if let (Some(guard), true) = (parts.as_ref(), outcome.is_ok()) {
            let t = txn.lock();
            participants.extend(
                t.writes()
                    .into_iter()
                    .map(|w| w.function)
                    .filter(|name| name != &f.name),
            );
            let here = !participants.is_empty();
            participants.extend(
                elsewhere
                    .iter()
                    .filter(|(_, wrote)| *wrote)
                    .map(|(name, _)| name.clone()),
            );
            drop(t);
            if here {
                // So that their PREPARE finds their writes.
                guard.distributed.register_home(&txn);
            }
        }
        if let Some(guard) = parts.as_mut() {
            let released: Vec<FunctionName> = elsewhere
                .iter()
                .map(|(name, _)| name.clone())
                .filter(|name| !participants.contains(name))
                .collect();
            guard.distributed.abandon(&f.name, id, &released);
            guard.armed = false;
        }

        let writes = match &outcome {
            // The participants' writes go through their own PREPARE records.
            Ok(_) if !participants.is_empty() => {
                let mut writes = txn.lock().writes();
                writes.retain(|w| w.function == f.name);
                writes
            }
            Ok(_) => txn.lock().writes(),
            Err(_) => Vec::new(),
        };
        // An answer is remembered for the key, except for keys the cluster assigned
        // itself to a transaction that changed nothing: running that again is harmless,
        // and remembering it would turn every forwarded read into a write.
        let idempotency_key = idempotency_key.filter(|key| {
            !(key.starts_with(crate::store::AUTO_KEY_PREFIX)
                && writes.is_empty()
                && participants.is_empty())
        });
        let idempotency = idempotency_key.map(|key| Idempotency {
            request: Some(request_digest(&f.name, method, input)),
            function: f.name.clone(),
            key: key.to_owned(),
            outcome: match &outcome {
                Ok(output) => Outcome::Ok(output.clone()),
                Err(e) => Outcome::Err {
                    code: e.code.clone(),
                    message: e.message.clone(),
                },
            },
            at_ms: now_ms(),
        });
        // What this answer depends on: everything it read, and its own commit.
        let lsn_read = txn
            .lock()
            .held()
            .iter()
            .map(|f| f.lsn_last_write())
            .max()
            .unwrap_or(Lsn::ZERO);
        // In a cluster, the primary copies of the functions it touched, each with the
        // position in its log this answer waits for.
        let copies: Vec<(Arc<crate::cluster::replica::PrimaryCopy>, Arc<Function>)> =
            match inner.cluster.get() {
                Some(cluster) => {
                    let held = txn.lock().held().to_vec();
                    let mut copies = Vec::with_capacity(held.len());
                    for g in held {
                        let c = if Arc::ptr_eq(&g, f) {
                            copy.clone()
                        } else {
                            cluster.replicas().primary(&g.name)
                        };
                        match c {
                            Some(c) => copies.push((c, g)),
                            None => return Err(InvokeError::NotPrimary(g.name.clone())),
                        }
                    }
                    copies
                }
                None => Vec::new(),
            };
        // A commit enters the logs of the functions it writes (and of its own function,
        // for the remembered answer or the decision); a function it only read is in
        // none of them. Before the commit can be replicated, what it read there must be:
        // otherwise a failover of that function alone could lose a write this commit
        // depended on, and keep the commit (and the answer remembered for its key).
        if let Some(cluster) = inner.cluster.get() {
            let own = idempotency.is_some() || !participants.is_empty();
            if own || !writes.is_empty() {
                let read_only: Vec<&(Arc<crate::cluster::replica::PrimaryCopy>, Arc<Function>)> =
                    copies
                        .iter()
                        .filter(|(_, g)| {
                            !(own && g.name == f.name
                                || writes.iter().any(|w| w.function == g.name)
                                || participants.contains(&g.name))
                        })
                        .collect();
                if !read_only.is_empty() {
                    let lsn = read_only
                        .iter()
                        .map(|(_, g)| g.lsn_last_write())
                        .max()
                        .unwrap_or(Lsn::ZERO);
                    let positions = read_only
                        .iter()
                        .map(|(c, g)| (c.clone(), g.seq()))
                        .collect();
                    self.reads_released(cluster, lsn, positions, deadline)
                        .await?;
                }
            }
        }
        let commit = Commit {
            txn: id,
            writes,
            idempotency,
            epochs: Vec::new(),
            decision: None,
        };
        if !participants.is_empty() {
            let copy = copy.expect("a transaction with parts elsewhere runs in a cluster");
            let node = self.clone();
            let f = f.clone();
            // On its own task: once the prepare round has begun, the transaction must
            // reach its end even if the client goes away.
            let run = tokio::spawn(tracing::Instrument::in_current_span(async move {
                node.commit_distributed(Distributed {
                    f,
                    copy,
                    held,
                    _parts: parts,
                    commit,
                    participants,
                    copies,
                    outcome,
                })
                .await
            }));
            return run
                .await
                .map_err(|e| InvokeError::Storage(format!("commit task failed: {e}")))?;
        }
        drop(parts);
        let commit_span = crate::trace::inner_span!("commit", txn = %id);
        let (lsn_wait, seqs) =
            commit_span.in_scope(|| self.log_commit(commit, &copies, lsn_read))?;
        held.hand_on(inner.wal.durability()).await;
        tracing::Instrument::instrument(
            self.wait_released(lsn_wait, seqs),
            crate::trace::inner_span!("replication.wait"),
        )
        .await?;
        if let Some(cluster) = inner.cluster.get() {
            check_lease(cluster, copy.as_deref())?;
        }
        let served_by = copy.as_ref().and_then(|c| {
            let me = inner.cluster.get()?.replicas().me().0;
            Some((me, c.epoch.0))
        });
        Ok(Answer {
            outcome,
            txn: id,
            replayed: false,
            served_by,
        })
    }

    /// Log and apply `commit` (if it changes anything) and feed it to the primary
    /// copies; the caller holds every lock. Returns the position the answer waits for
    /// (the commit's, or `lsn_read`) and each copy's position after it.
    fn log_commit(
        &self,
        mut commit: Commit,
        copies: &[(Arc<crate::cluster::replica::PrimaryCopy>, Arc<Function>)],
        lsn_read: Lsn,
    ) -> Result<(Lsn, Positions), InvokeError> {
        let inner = &self.inner;
        let mut lsn_wait = lsn_read;
        if !commit.writes.is_empty() || commit.idempotency.is_some() || commit.decision.is_some() {
            // Only the functions this commit enters the log of (not those it only read).
            commit.epochs = copies
                .iter()
                .filter(|(_, g)| {
                    commit.writes.iter().any(|w| w.function == g.name)
                        || commit
                            .idempotency
                            .as_ref()
                            .is_some_and(|i| i.function == g.name)
                        || commit
                            .decision
                            .as_ref()
                            .is_some_and(|d| d.coordinator == g.name)
                })
                .map(|(c, g)| FunctionEpoch {
                    function: g.name.clone(),
                    epoch: c.epoch.0,
                })
                .collect();
            let record = Record::Commit(commit);
            let (lsn, applied) = inner
                .wal
                .append(&record, |lsn| inner.store.apply(lsn, &record))
                .map_err(|e| InvokeError::Storage(e.to_string()))?;
            applied.map_err(|e| InvokeError::Storage(e.to_string()))?;
            lsn_wait = lsn;
            if let Record::Commit(commit) = record {
                feed_copies(copies, commit);
            }
        }
        // Still under the locks: each function's position includes this commit.
        let seqs = copies.iter().map(|(c, g)| (c.clone(), g.seq())).collect();
        Ok((lsn_wait, seqs))
    }

    /// Wait until `lsn` is durable and every copy has released its position.
    async fn wait_released(&self, lsn: Lsn, seqs: Positions) -> Result<(), InvokeError> {
        self.wait_durable(lsn).await?;
        for (copy, seq) in seqs {
            copy.released(seq)
                .await
                .map_err(|e| InvokeError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// Commit a transaction that wrote functions whose primaries are on other nodes:
    /// the prepare round (under this node's locks), then the COMMIT record (the
    /// decision, with this node's writes), then the answer once it is released; the
    /// participants hear of the decision only then.
    async fn commit_distributed(self, t: Distributed) -> Result<Answer, InvokeError> {
        let inner = &self.inner;
        let cluster = inner.cluster.get().expect("in a cluster");
        let d = cluster.distributed().clone();
        let id = t.commit.txn;
        crate::failpoint::hit("coordinator-before-prepare");
        let verdict = tracing::Instrument::instrument(
            d.prepare_round(&t.copy, id, t.participants.clone()),
            crate::trace::inner_span!("twophase.prepare", txn = %id, participants = t.participants.len()),
        )
        .await;
        if verdict == crate::cluster::distributed::Verdict::Abort {
            // The coordinator told every participant; the runtime tries again.
            return Err(InvokeError::Conflict(1));
        }
        // Still under the locks: a change of role waits for them.
        if let Err(e) = check_lease(cluster, Some(&t.copy)) {
            d.not_logged(&t.copy, id);
            return Err(e);
        }
        let commit_span = crate::trace::inner_span!("twophase.commit", txn = %id);
        tracing::Instrument::instrument(self.decide(t, id), commit_span).await
    }

    /// The second half of `commit_distributed`, once every participant voted to
    /// commit: the COMMIT record (the decision), released, then the participants told.
    async fn decide(&self, t: Distributed, id: TxnId) -> Result<Answer, InvokeError> {
        let cluster = self.inner.cluster.get().expect("in a cluster");
        let d = cluster.distributed().clone();
        let mut commit = t.commit;
        commit.decision = Some(Decision {
            coordinator: t.f.name.clone(),
            participants: t.participants,
        });
        let participants = commit
            .decision
            .as_ref()
            .map(|d| d.participants.clone())
            .unwrap_or_default();
        let (lsn, seqs) = match self.log_commit(commit, &t.copies, Lsn::ZERO) {
            Ok(logged) => logged,
            Err(e) => {
                d.not_logged(&t.copy, id);
                return Err(e);
            }
        };
        drop(t.held);
        // The decision first: once the coordinator's copy holds it everywhere, the
        // participants are told. If this fails the outcome is unknown here: the copy's
        // successor holds the decision if it was replicated, and delivers it (a new copy's
        // slot is rebuilt from the log); the client retries with its key.
        let (decision, others): (Positions, Positions) =
            seqs.into_iter().partition(|(c, _)| Arc::ptr_eq(c, &t.copy));
        tracing::Instrument::instrument(
            self.wait_released(lsn, decision),
            crate::trace::inner_span!("replication.wait"),
        )
        .await?;
        crate::failpoint::hit("coordinator-decided");
        d.logged(&t.copy, id);
        // Then what the answer read. (The participants' positions were released before
        // they voted; their copies may have changed since, as their locks are gone.)
        let others = others
            .into_iter()
            .filter(|(c, _)| !participants.contains(&c.function))
            .collect();
        self.wait_released(lsn, others).await?;
        if crate::failpoint::armed_at("coordinator-told") {
            // Let the decisions leave first.
            tokio::time::sleep(Duration::from_millis(5)).await;
            crate::failpoint::hit("coordinator-told");
        }
        check_lease(cluster, Some(&t.copy))?;
        Ok(Answer {
            outcome: t.outcome,
            txn: id,
            replayed: false,
            served_by: Some((cluster.replicas().me().0, t.copy.epoch.0)),
        })
    }

    async fn wait_durable(&self, lsn: Lsn) -> Result<(), InvokeError> {
        if self.inner.wal.durability() == Durability::Memory {
            return Ok(());
        }
        self.inner
            .wal
            .wait_durable(lsn)
            .await
            .map_err(|e| InvokeError::Storage(e.to_string()))
    }

    pub fn wal_durability(&self) -> Durability {
        self.inner.wal.durability()
    }

    /// Resolves once the log is durable up to `lsn` (whatever the durability setting).
    ///
    /// Fails when the log writer has failed.
    pub async fn wait_lsn_durable(&self, lsn: Lsn) -> Result<(), LogError> {
        Ok(self.inner.wal.wait_durable(lsn).await?)
    }

    /// On a backup: append `entries` of `function`'s replicated log (from the primary of
    /// `epoch`) to this node's log and apply them. Returns the last position written.
    ///
    /// Fails when the function is not here or an entry's position is not the next one
    /// of the function's log (the copy no longer matches the primary's).
    pub fn apply_replicated(
        &self,
        function: &FunctionName,
        epoch: u64,
        entries: Vec<(crate::replication::Seq, Entry)>,
    ) -> Result<Lsn, LogError> {
        let inner = &self.inner;
        let f = inner
            .store
            .get(function)
            .ok_or_else(|| LogError::NotDeployed(function.clone()))?;
        let mut lsn_last = Lsn::ZERO;
        for (seq, entry) in entries {
            if seq.0 != f.seq() + 1 {
                return Err(LogError::NotNext {
                    seq,
                    position: f.seq(),
                });
            }
            if entry
                .idempotency
                .as_ref()
                .is_some_and(|i| &i.function != function)
            {
                return Err(LogError::ForeignAnswer(seq));
            }
            if entry.kind == (Kind::Resolved { commit: true })
                || entry.kind == (Kind::Resolved { commit: false })
            {
                // Checked before it is logged: a record that cannot be applied would stop
                // recovery.
                if !f.is_prepared(entry.txn) {
                    return Err(LogError::NotPrepared {
                        seq,
                        txn: entry.txn,
                    });
                }
            }
            let record = replicated_record(function, epoch, entry);
            let (lsn, applied) = inner
                .wal
                .append(&record, |lsn| inner.store.apply(lsn, &record))?;
            applied?;
            lsn_last = lsn;
        }
        // A backup's log grows with what it receives: it needs snapshots as a primary does.
        self.maybe_checkpoint();
        Ok(lsn_last)
    }

    /// Log and apply `record`, a step of two-phase commit on `f` (PREPARE, outcome or
    /// END), and hand `entry` (the same step) to its primary copy. The caller holds
    /// `f`'s lock, so entries reach the copy in order. Returns the record's position and
    /// `f`'s position after it.
    ///
    /// Fails when the log fails or the record does not apply.
    pub(crate) fn log_step(
        &self,
        f: &Function,
        copy: &Arc<crate::cluster::replica::PrimaryCopy>,
        record: &Record,
        entry: Entry,
    ) -> Result<(Lsn, u64), LogError> {
        let inner = &self.inner;
        let (lsn, applied) = inner
            .wal
            .append(record, |lsn| inner.store.apply(lsn, record))?;
        applied?;
        let seq = f.seq();
        copy.appended(seq, entry);
        Ok((lsn, seq))
    }

    /// Run a call from a transaction on another node (`Invoke::Part`) here, as the
    /// callee's primary, inside that transaction's part on this node.
    pub async fn run_part(
        &self,
        call: crate::cluster::wire::PartCall,
    ) -> crate::cluster::wire::InvokeReply {
        use crate::cluster::wire::{ByteBuf, InvokeReply};
        let inner = &self.inner;
        let failed = InvokeReply::Failed;
        let Some(cluster) = inner.cluster.get() else {
            return failed(InvokeError::Unavailable(
                "this node is not in a cluster".into(),
            ));
        };
        let Ok(name) = FunctionName::new(&call.function) else {
            return failed(InvokeError::UnknownFunction(call.function));
        };
        // Only the primary runs it (with its lease); otherwise the caller looks again.
        match cluster.replicas().primary(&name) {
            Some(copy) if check_lease(cluster, Some(&copy)).is_ok() => {}
            _ => return failed(InvokeError::NotPrimary(name)),
        }
        if call.deadline_ms == 0 {
            return failed(InvokeError::Deadline(
                "the transaction's deadline passed before the call arrived".into(),
            ));
        }
        let d = cluster.distributed().clone();
        let txn = d.join(&call, inner.config.limits);
        let id = call.txn;
        let result = Calls::call(
            inner.clone(),
            txn.clone(),
            call.depth,
            call.function,
            call.method,
            call.input,
        )
        .await;
        let result = match result {
            Ok(Ok(output)) => match txn.lock().check_state_caps() {
                Ok(()) => Ok(Ok(output)),
                Err(e) => Err(InvokeError::StateFull(e.0)),
            },
            Ok(outcome) => Ok(outcome),
            Err(e) => Err(classify(e)),
        };
        let result = match result {
            Ok(outcome) => self
                .part_reads_released(cluster, &txn)
                .await
                .map(|()| outcome),
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => InvokeReply::PartAnswer {
                outcome: outcome.map(ByteBuf).map_err(|e| (e.code, e.message)),
                touched: txn.lock().touched(),
            },
            Err(e) => {
                // The whole transaction fails: nothing of its part here will commit.
                d.drop_part(id);
                failed(e)
            }
        }
    }

    /// Wait until everything the part `txn` saw here is released: durable here and held
    /// by the backups of each function it locked, and this node still their primary.
    ///
    /// A part that only read is let go without a PREPARE record (which would have put it
    /// in the log after what it saw), and its caller answers the client at once; so an
    /// earlier commit still in flight here must be released before its effects leave
    /// this node, or a failover could lose it after a client was shown it. A part that
    /// wrote waits too: telling the two apart is not worth it, its PREPARE waits anyway.
    async fn part_reads_released(
        &self,
        cluster: &crate::cluster::Cluster,
        txn: &Arc<Mutex<Txn>>,
    ) -> Result<(), InvokeError> {
        let (held, deadline) = {
            let t = txn.lock();
            (t.held().to_vec(), t.deadline)
        };
        let lsn = held
            .iter()
            .map(|f| f.lsn_last_write())
            .max()
            .unwrap_or(Lsn::ZERO);
        let mut seqs: Positions = Vec::with_capacity(held.len());
        for g in &held {
            let Some(copy) = cluster.replicas().primary(&g.name) else {
                return Err(InvokeError::Unavailable(format!(
                    "this node stopped being the primary of {} during the call",
                    g.name
                )));
            };
            seqs.push((copy, g.seq()));
        }
        self.reads_released(cluster, lsn, seqs, deadline).await
    }

    /// Wait, holding the caller's locks, until what it read is durable here up to `lsn`
    /// and each copy has released its position, or `deadline`. Ends early, with an
    /// error, once a copy is no longer its function's primary here or the lease has run
    /// out: what such a copy had not released may be lost in its failover, and a change
    /// of role waits for these very locks.
    async fn reads_released(
        &self,
        cluster: &crate::cluster::Cluster,
        lsn: Lsn,
        positions: Positions,
        deadline: Instant,
    ) -> Result<(), InvokeError> {
        let late = || {
            InvokeError::Deadline(
                "the deadline passed while what the transaction read was being replicated".into(),
            )
        };
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, self.wait_durable(lsn))
            .await
            .map_err(|_| late())??;
        for (copy, seq) in positions {
            loop {
                check_lease(cluster, Some(&copy))?;
                if copy.is_released(seq) {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(late());
                }
                match tokio::time::timeout(left.min(RELEASE_POLL), copy.released(seq)).await {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) => return Err(InvokeError::Unavailable(e.to_string())),
                    // Look at the role and the lease again.
                    Err(_) => {}
                }
            }
        }
        Ok(())
    }

    /// `function` captured for a backup's catch-up, with its position (microseconds:
    /// clones of persistent maps). Taken between two appends to the log, so the state
    /// and the position agree without the function's lock: a catch-up never waits for a
    /// transaction (which may itself wait, through a prepared part, for a resolution that
    /// needs this very catch-up); `image_of` makes the image, after.
    pub fn capture_function(&self, function: &FunctionName) -> Option<(Captured, u64)> {
        let captured = self
            .inner
            .wal
            .between_appends(|| self.inner.store.capture_function(function))?;
        let seq = captured.seq()?;
        Some((captured, seq))
    }

    /// The snapshot image of what `capture_function` captured (copies everything: run
    /// it off the async threads).
    pub fn image_of(&self, captured: Captured) -> Option<crate::wal::snapshot::FunctionImage> {
        let expiry = now_ms().saturating_sub(self.inner.config.idempotency_window_s * 1000);
        captured.into_function_image(expiry)
    }

    /// On a backup: replace `function`'s copy with its primary's snapshot `image` (log
    /// and apply). Returns the position to wait for before acknowledging.
    ///
    /// Fails when the function is not deployed here or the log fails.
    pub fn restore(&self, image: crate::wal::snapshot::FunctionImage) -> Result<Lsn, LogError> {
        let inner = &self.inner;
        if inner.store.get(&image.deploy.function).is_none() {
            return Err(LogError::NotDeployed(image.deploy.function.clone()));
        }
        // The copy is built before the log's lock is taken: every commit on this node
        // appends under it, and a large function takes milliseconds to copy.
        let function = image.deploy.function.clone();
        let restored = Restored::of(&image);
        let record = Record::Restore(Box::new(image));
        let (lsn, applied) = inner.wal.append(&record, |lsn| {
            inner.store.put_restored(lsn, &function, restored)
        })?;
        applied?;
        self.maybe_checkpoint();
        Ok(lsn)
    }

    /// Take `function`'s transaction lock (after the transaction running on it), for a
    /// change of role. Released when the guard drops.
    pub async fn lock_function(&self, function: &FunctionName) -> Option<impl Drop> {
        let f = self.inner.store.get(function)?;
        let id = self.inner.next_txn();
        // A full queue is no reason to change a role without the lock: wait for room.
        while f.lock.acquire(id, Mode::First).await.is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Some(FunctionLock {
            function: f,
            txn: id,
        })
    }

    /// The component with `digest`, if this node has it.
    pub fn artifact(&self, digest: Digest) -> Option<Vec<u8>> {
        let path = self
            .inner
            .artifacts_dir
            .join(format!("{}.wasm", digest.to_hex()));
        let bytes = std::fs::read(path).ok()?;
        (Digest::of(&bytes) == digest).then_some(bytes)
    }

    /// Check and compile `bytes` and keep the file, without deploying anything: what a
    /// node does before it asks the master to deploy a component.
    pub async fn prepare(&self, bytes: Vec<u8>) -> Result<Digest, AdminError> {
        Ok(self.compile_and_keep(bytes).await?.digest)
    }

    /// Check and compile `bytes` (off the async threads) and keep the file under its digest.
    async fn compile_and_keep(&self, bytes: Vec<u8>) -> Result<Arc<Loaded>, AdminError> {
        let node = self.clone();
        let (loaded, bytes) = tokio::task::spawn_blocking(move || {
            let loaded = node.inner.runtime.load(&bytes);
            (loaded, bytes)
        })
        .await
        .map_err(|e| AdminError::Storage(format!("compilation task failed: {e}")))?;
        let loaded = loaded?;
        self.save_artifact(loaded.digest, &bytes)?;
        Ok(loaded)
    }

    /// Log (durably) and apply the deploy of `loaded` as `function` at `version`; the
    /// caller holds the admin lock.
    async fn log_deploy(
        &self,
        function: &FunctionName,
        loaded: &Arc<Loaded>,
        version: u64,
        calls: CallGrants,
    ) -> Result<(), AdminError> {
        let inner = &self.inner;
        inner.loaded.write().insert(loaded.digest, loaded.clone());
        let record = Record::Deploy(Deploy {
            function: function.clone(),
            digest: loaded.digest,
            version,
            at_ms: now_ms(),
            calls,
        });
        self.log_admin(&record).await?;
        inner
            .metrics
            .functions_deployed
            .set(inner.store.list().len() as i64);
        self.prune_loaded();
        Ok(())
    }

    /// Deploy `bytes` as `function` at `version`, allowed to call `calls`, as the master
    /// decided (in a cluster). Does nothing when that version is already deployed here.
    pub async fn install(
        &self,
        function: &FunctionName,
        bytes: Vec<u8>,
        version: u64,
        running: bool,
        calls: CallGrants,
    ) -> Result<(), AdminError> {
        let inner = &self.inner;
        let loaded = self.compile_and_keep(bytes).await?;
        let _admin = inner.admin.lock().await;
        if let Some(f) = inner.store.get(function) {
            let meta = f.meta();
            if meta.deploy.digest == loaded.digest && meta.deploy.version == version {
                return Ok(());
            }
        }
        self.log_deploy(function, &loaded, version, calls).await?;
        if !running {
            self.log_admin(&Record::SetRunning {
                function: function.clone(),
                running,
            })
            .await?;
        }
        tracing::info!(function = %function, digest = %loaded.digest, version, "installed");
        Ok(())
    }

    fn loaded(&self, digest: Digest) -> Result<Arc<Loaded>, InvokeError> {
        self.inner
            .loaded
            .read()
            .get(&digest)
            .cloned()
            .ok_or_else(|| InvokeError::Storage(format!("component {digest} is not loaded")))
    }

    /// Deploy `bytes` as `function`, allowed to call `calls`, or upgrade it: state is
    /// kept, new transactions run the new component. Returns the function's new
    /// description.
    ///
    /// Fails when the name is invalid, the component is not one of the world (the error
    /// says what is wrong), or on storage errors.
    pub async fn deploy(
        &self,
        function: &str,
        bytes: Vec<u8>,
        calls: CallGrants,
    ) -> Result<FunctionInfo, AdminError> {
        let inner = &self.inner;
        let name = FunctionName::new(function).map_err(AdminError::BadName)?;
        let loaded = self.compile_and_keep(bytes).await?;
        let _admin = inner.admin.lock().await;
        let version = inner
            .store
            .get(&name)
            .map_or(0, |f| f.meta().deploy.version)
            + 1;
        self.log_deploy(&name, &loaded, version, calls).await?;
        tracing::info!(function = %name, digest = %loaded.digest, version, "deployed");
        self.describe(name.as_str())
    }

    /// Delete `function` and all of its state, after the transaction running on it.
    pub async fn delete(&self, function: &str) -> Result<(), AdminError> {
        // Resolved under the admin lock: a record is logged only if applying it will
        // succeed (a concurrent delete must not leave an unreplayable record behind).
        let _admin = self.inner.admin.lock().await;
        let f = self.function(function)?;
        // Take the function's lock so no transaction is half-way through it.
        let id = self.inner.next_txn();
        f.lock
            .acquire(id, Mode::First)
            .await
            .map_err(|e| AdminError::Storage(e.to_string()))?;
        let _locked = FunctionLock {
            function: f.clone(),
            txn: id,
        };
        if f.meta().deleted {
            return Err(AdminError::UnknownFunction(function.to_owned()));
        }
        self.log_admin(&Record::Delete {
            function: f.name.clone(),
        })
        .await?;
        self.inner
            .metrics
            .functions_deployed
            .set(self.inner.store.list().len() as i64);
        self.prune_loaded();
        tracing::info!(function = %f.name, "deleted");
        Ok(())
    }

    /// Stop (`running = false`) or start `function`. A stopped function answers 503
    /// and keeps its state.
    pub async fn set_running(
        &self,
        function: &str,
        running: bool,
    ) -> Result<FunctionInfo, AdminError> {
        let _admin = self.inner.admin.lock().await;
        let f = self.function(function)?;
        self.log_admin(&Record::SetRunning {
            function: f.name.clone(),
            running,
        })
        .await?;
        tracing::info!(function = %f.name, running, "set running");
        self.describe(function)
    }

    async fn log_admin(&self, record: &Record) -> Result<(), AdminError> {
        let inner = &self.inner;
        let (lsn, applied) = inner
            .wal
            .append(record, |lsn| inner.store.apply(lsn, record))
            .map_err(|e| AdminError::Storage(e.to_string()))?;
        applied.map_err(|e| AdminError::Storage(e.to_string()))?;
        // Admin changes are always made durable before they are answered.
        inner
            .wal
            .wait_durable(lsn)
            .await
            .map_err(|e| AdminError::Storage(e.to_string()))
    }

    /// Drop compiled components no function uses any more (after an upgrade or delete).
    /// A transaction still running an old one holds its own reference.
    fn prune_loaded(&self) {
        let used: std::collections::HashSet<Digest> =
            self.inner.store.list().iter().map(|f| f.digest()).collect();
        self.inner
            .loaded
            .write()
            .retain(|digest, _| used.contains(digest));
    }

    fn save_artifact(&self, digest: Digest, bytes: &[u8]) -> Result<(), AdminError> {
        let path = self
            .inner
            .artifacts_dir
            .join(format!("{}.wasm", digest.to_hex()));
        if path.exists() {
            return Ok(());
        }
        // A name of its own: two deploys of the same component may race here.
        static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = path.with_extension(format!("{}.tmp", TMP_SEQ.fetch_add(1, Ordering::Relaxed)));
        let io = |e: std::io::Error| AdminError::Storage(format!("{}: {e}", tmp.display()));
        // Owner only, whatever the umask: components are the operator's code.
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?
        };
        std::io::Write::write_all(&mut file, bytes).map_err(io)?;
        // The log will refer to this file: it must be on disk before the record is.
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        wal::snapshot::sync_dir(&self.inner.artifacts_dir)
            .map_err(|e| AdminError::Storage(e.to_string()))
    }

    fn function(&self, function: &str) -> Result<Arc<Function>, AdminError> {
        FunctionName::new(function)
            .ok()
            .and_then(|name| self.inner.store.get(&name))
            .ok_or_else(|| AdminError::UnknownFunction(function.to_owned()))
    }

    /// Whether `function` is deployed (a lookup; unlike `describe`, it does not hash the state).
    pub fn is_deployed(&self, function: &str) -> bool {
        self.function(function).is_ok()
    }

    pub fn describe(&self, function: &str) -> Result<FunctionInfo, AdminError> {
        let f = self.function(function)?;
        Ok(self.info(&f))
    }

    pub fn list(&self) -> Vec<FunctionInfo> {
        self.inner
            .store
            .list()
            .iter()
            .map(|f| self.info(f))
            .collect()
    }

    fn info(&self, f: &Function) -> FunctionInfo {
        let meta = f.meta();
        FunctionInfo {
            name: f.name.to_string(),
            digest: meta.deploy.digest.to_string(),
            version: meta.deploy.version,
            running: meta.running,
            calls: meta.deploy.calls.clone(),
            deployed_at_ms: meta.deploy.at_ms,
            keys: f.len(),
            state_bytes: f.state_bytes(),
            idempotency_keys: f.idempotency_keys(),
            idempotency_keys_forgotten: f.idempotency_keys_forgotten(),
            lsn_last_write: f.lsn_last_write().0,
            seq: f.seq(),
            state_digest: self
                .inner
                .store
                .state_digest(&f.name)
                .map(|d| d.to_string())
                .unwrap_or_default(),
        }
    }

    /// Snapshot and truncate the log in the background once it has grown enough.
    fn maybe_checkpoint(&self) {
        let inner = &self.inner;
        if inner.wal.bytes_since_checkpoint() < inner.config.checkpoint_log_bytes
            || inner.checkpointing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = node.checkpoint() {
                tracing::error!(error = %e, "checkpoint failed; the log keeps growing until one succeeds");
            }
            node.inner.checkpointing.store(false, Ordering::Release);
        });
    }

    /// Write a snapshot now and truncate the log before it. Blocking.
    ///
    /// Fails on I/O errors; the log stays valid.
    pub fn checkpoint(&self) -> Result<Lsn, wal::Error> {
        let inner = &self.inner;
        let expiry = now_ms().saturating_sub(inner.config.idempotency_window_s * 1000);
        let started = Instant::now();
        let lsn = inner.wal.checkpoint(
            |lsn| (lsn, inner.store.capture()),
            |(lsn, captured)| captured.into_image(lsn, expiry),
        )?;
        for f in inner.store.list() {
            f.expire_idempotency(expiry, now_ms().saturating_sub(AUTO_KEY_WINDOW_S * 1000));
        }
        tracing::info!(%lsn, ms = started.elapsed().as_millis() as u64, "checkpoint written");
        Ok(lsn)
    }
}

/// A primary answers only while it holds its lease and its copy still serves (not
/// fenced, not replaced): otherwise a deposed primary could answer from stale state.
fn check_lease(
    cluster: &crate::cluster::Cluster,
    copy: Option<&crate::cluster::replica::PrimaryCopy>,
) -> Result<(), InvokeError> {
    if let Some(copy) = copy {
        // The cluster state as applied here must still name this copy: after a pause the
        // lease may be renewed (the demotion applied) before the copy is retired.
        if !copy.serving() || !cluster.names_primary(&copy.function, copy.epoch) {
            return Err(InvokeError::Unavailable(format!(
                "this node no longer serves {} as primary",
                copy.function
            )));
        }
    }
    if !cluster.lease_ok() {
        return Err(InvokeError::Unavailable(
            "this node holds no lease from the master right now (cut off, or paused)".into(),
        ));
    }
    Ok(())
}

/// The record a backup logs for `entry` of `function`'s replicated log, from `epoch`.
fn replicated_record(function: &FunctionName, epoch: u64, entry: Entry) -> Record {
    let Entry {
        txn,
        ops,
        idempotency,
        kind,
    } = entry;
    let function = function.clone();
    let commit = |decision| {
        Record::Commit(Commit {
            txn,
            writes: vec![Writes {
                function: function.clone(),
                ops: ops.clone(),
            }],
            idempotency: idempotency.clone(),
            epochs: vec![FunctionEpoch {
                function: function.clone(),
                epoch,
            }],
            decision,
        })
    };
    match kind {
        Kind::Commit => commit(None),
        Kind::Decision { participants } => commit(Some(Decision {
            coordinator: function.clone(),
            participants,
        })),
        Kind::Prepare { coordinator } => Record::Prepare(Prepare {
            function,
            txn,
            coordinator,
            ops,
            epoch,
        }),
        Kind::Resolved { commit } => Record::Resolved(Resolved {
            function,
            txn,
            commit,
            epoch,
        }),
        Kind::End => Record::End(End {
            function,
            txn,
            epoch,
        }),
    }
}

/// Give each primary copy its function's part of `commit` (under the locks, in order).
fn feed_copies(
    copies: &[(Arc<crate::cluster::replica::PrimaryCopy>, Arc<Function>)],
    commit: Commit,
) {
    let Commit {
        txn,
        writes,
        mut idempotency,
        mut decision,
        ..
    } = commit;
    let mut writes: HashMap<FunctionName, Vec<crate::wal::record::Op>> =
        writes.into_iter().map(|w| (w.function, w.ops)).collect();
    for (copy, g) in copies {
        let ops = writes.remove(&g.name);
        let answer = idempotency.take_if(|i| i.function == g.name);
        let decided = decision.take_if(|d| d.coordinator == g.name);
        if ops.is_none() && answer.is_none() && decided.is_none() {
            // Read only: nothing of this commit enters its log.
            continue;
        }
        copy.appended(
            g.seq(),
            Entry {
                txn,
                ops: ops.unwrap_or_default(),
                idempotency: answer,
                kind: match decided {
                    Some(d) => Kind::Decision {
                        participants: d.participants,
                    },
                    None => Kind::Commit,
                },
            },
        );
    }
}

/// Primary copies, each with the position in its log an answer waits for.
type Positions = Vec<(Arc<crate::cluster::replica::PrimaryCopy>, u64)>;

/// What a distributed commit needs from its transaction (see `Node::commit_distributed`).
struct Distributed {
    f: Arc<Function>,
    copy: Arc<crate::cluster::replica::PrimaryCopy>,
    held: HeldLocks,
    _parts: Option<PartsGuard>,
    commit: Commit,
    participants: Vec<FunctionName>,
    copies: Vec<(Arc<crate::cluster::replica::PrimaryCopy>, Arc<Function>)>,
    outcome: Result<Vec<u8>, GuestError>,
}

/// The coordinator's hold on its transaction's parts elsewhere: when the transaction
/// ends before its parts were handed to commit (or released), they are told to drop
/// everything; calls coming back stop finding the transaction.
struct PartsGuard {
    distributed: Arc<crate::cluster::distributed::Distributed>,
    coordinator: FunctionName,
    txn: Arc<Mutex<Txn>>,
    armed: bool,
}

impl Drop for PartsGuard {
    fn drop(&mut self) {
        let (id, elsewhere) = {
            let t = self.txn.lock();
            (t.id, t.parts_elsewhere())
        };
        self.distributed.forget_home(id);
        if self.armed && !elsewhere.is_empty() {
            let names: Vec<FunctionName> = elsewhere.into_iter().map(|(n, _)| n).collect();
            self.distributed.abandon(&self.coordinator, id, &names);
        }
    }
}

/// Why `lock_unprepared` gave up.
/// What one attempt of an invocation runs: the client's request, and until when it
/// may wait for its function (its deadline, counted from its arrival).
struct Request<'a> {
    method: &'a str,
    input: &'a [u8],
    idempotency_key: Option<&'a str>,
    queue_until: Instant,
}

enum Blocked {
    Lock(lock::Error),
    /// Another distributed transaction's part is still prepared on the function.
    Prepared(TxnId),
    /// In line for the first lock until `until`.
    Queued,
    /// Waiting for a prepared part on a function this node is no longer primary of.
    NotPrimary,
}

/// Take `f`'s lock for `txn` (as old as `age`) once no part of another distributed
/// transaction is prepared on it: those writes are promised, so nothing may read or
/// overwrite them until their outcome is known. Gives up at `until`.
///
/// Waiting for a prepared part cannot deadlock: it waits for messages, never for locks.
async fn lock_unprepared(
    f: &Function,
    txn: TxnId,
    age: TxnId,
    mode: Mode,
    until: Instant,
    primary_here: &(dyn Fn() -> bool + Sync),
) -> Result<(), Blocked> {
    loop {
        match mode {
            // Cancel safe: a waiter that gives up leaves the line.
            Mode::First => tokio::time::timeout_at(
                tokio::time::Instant::from_std(until),
                f.lock.acquire_aged(txn, age, mode),
            )
            .await
            .map_err(|_| Blocked::Queued)?
            .map_err(Blocked::Lock)?,
            Mode::Nested => f
                .lock
                .acquire_aged(txn, age, mode)
                .await
                .map_err(Blocked::Lock)?,
        }
        let resolution = f.resolution();
        let Some(other) = f.prepared_other_than(txn) else {
            return Ok(());
        };
        f.lock.release(txn);
        if !primary_here() {
            return Err(Blocked::NotPrimary);
        }
        let now = Instant::now();
        if now >= until {
            return Err(Blocked::Prepared(other));
        }
        // Woken by the resolution; the timeout guards against a missed wake-up.
        let _ =
            tokio::time::timeout((until - now).min(Duration::from_millis(20)), resolution).await;
    }
}

/// Releases one function's lock when dropped (an admin operation holding it).
struct FunctionLock {
    function: Arc<Function>,
    txn: TxnId,
}

impl Drop for FunctionLock {
    fn drop(&mut self) {
        self.function.lock.release(self.txn);
    }
}

/// Releases a transaction's locks when it ends, however it ends.
struct HeldLocks {
    txn: Arc<Mutex<Txn>>,
}

impl HeldLocks {
    /// Release the locks, and with `Durability::Memory`, if one went to a transaction
    /// waiting for it, let that transaction run before this one goes on to answer.
    ///
    /// Tokio runs a task woken from a worker thread next on that same thread, from a
    /// slot no other thread may steal (its LIFO slot), and only once the waking task
    /// yields: until then the function's lock belongs to a transaction that cannot run.
    /// With `Durability::Disk` the wait for the fsync that follows yields at once, and
    /// a yield here would only add a wake-up of another thread per commit. With
    /// `Durability::Memory` nothing after the release waits, so without this yield the
    /// lock sat idle while this task wrote its whole answer (the HTTP response
    /// included): about 20 us a hand-over against 5 us, and fewer commits per second
    /// than with `disk`.
    ///
    /// Not `tokio::task::yield_now`: it defers the wake-up until the thread has nothing
    /// else to run, so the waiters' queue drained, and a caller that never waits (the
    /// in-process bench) took the free lock again and again while the deferred ones
    /// starved (p99 14 ms against 1.3 ms).
    ///
    /// Cancel safe: dropping the future, polled or not, releases the locks.
    async fn hand_on(self, durability: Durability) {
        if self.release() && durability == Durability::Memory {
            YieldNow { yielded: false }.await;
        }
    }

    /// Release every lock the transaction holds; returns whether one of them was
    /// handed to a waiting transaction.
    fn release(&self) -> bool {
        let mut txn = self.txn.lock();
        let id = txn.id;
        let mut handed = false;
        for f in txn.take_held() {
            handed |= f.lock.release(id);
        }
        handed
    }
}

impl Drop for HeldLocks {
    fn drop(&mut self) {
        self.release();
    }
}

/// Pending once, having woken itself: tokio puts a task woken while it runs at the back
/// of its thread's run queue, where another thread may take it, and runs what is ahead
/// of it (the LIFO slot first).
struct YieldNow {
    yielded: bool,
}

impl std::future::Future for YieldNow {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.yielded {
            return std::task::Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

fn lock_error(e: lock::Error) -> InvokeError {
    match e {
        lock::Error::Die { .. } => InvokeError::Conflict(1),
        lock::Error::Busy => InvokeError::Busy(e.to_string()),
    }
}

/// What an idempotency key is remembered with: the sha256 of the function, the method
/// and the body, each length-prefixed.
pub fn request_digest(function: &FunctionName, method: &str, input: &[u8]) -> Digest {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for part in [function.as_str().as_bytes(), method.as_bytes(), input] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    Digest(hasher.finalize().into())
}

/// Refuse to replay an answer remembered for another request under the same key (as
/// payment APIs do): answering it would tell the client its request ran when it did not.
fn check_same_request(found: &Idempotency, method: &str, input: &[u8]) -> Result<(), InvokeError> {
    match found.request {
        Some(request) if request != request_digest(&found.function, method, input) => {
            Err(InvokeError::IdempotencyKeyReused(format!(
                "idempotency key {:?} was used for another request to {} (another method or body); use a new key for a new request",
                found.key, found.function
            )))
        }
        _ => Ok(()),
    }
}

fn check_idempotency_key(key: &str) -> Result<(), InvokeError> {
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_LEN_MAX {
        return Err(InvokeError::BadIdempotencyKey(format!(
            "must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} characters, got {}",
            key.len()
        )));
    }
    if !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(InvokeError::BadIdempotencyKey(
            "must be printable ASCII without spaces".into(),
        ));
    }
    Ok(())
}

/// An abort of a callee that ends the whole transaction, carried up through the caller.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Propagated(InvokeError);

/// Say why an instance stopped without answering.
fn classify(error: wasmtime::Error) -> InvokeError {
    let error = match error.downcast::<Propagated>() {
        Ok(Propagated(inner)) => return inner,
        Err(error) => error,
    };
    if let Some(abort) = error.downcast_ref::<Abort>() {
        return match abort {
            Abort::Deadline(_) => InvokeError::Deadline(abort.to_string()),
            Abort::MemoryCap { .. } | Abort::TableCap { .. } => {
                InvokeError::ResourceCap(abort.to_string())
            }
        };
    }
    if let Some(e) = error.downcast_ref::<lock::Error>() {
        return lock_error(e.clone());
    }
    // Logged, with the end of the guest's stderr, where it trapped (`wasm::Runtime::run`).
    if let Some(trap) = error.downcast_ref::<GuestTrap>() {
        return InvokeError::Trap(trap.to_string());
    }
    let text = format!("{error:#}");
    if text.contains("maximum concurrent") || text.contains("pooling allocator") {
        return InvokeError::Busy(text);
    }
    // The trap itself says what happened; the wasm backtrace goes to the node's log.
    tracing::debug!(error = ?error, "guest trapped");
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => InvokeError::Trap(trap.to_string()),
        None => InvokeError::Trap(error.root_cause().to_string()),
    }
}

/// The node a transaction began on (its coordinator's, in a cluster), from its id.
pub fn txn_node(txn: TxnId) -> u64 {
    txn.0 & ((1 << TXN_NODE_BITS) - 1)
}

impl Inner {
    /// A new transaction id: a counter that starts near the clock (in microseconds), with
    /// the node id in the low bits, so that it is unique in the cluster and its order is
    /// the transaction's age across nodes. (Nodes whose ids agree in the low 8 bits
    /// could collide; cluster node ids are small.)
    pub(crate) fn next_txn(&self) -> TxnId {
        TxnId(self.txn_next.fetch_add(1, Ordering::Relaxed) << TXN_NODE_BITS | self.txn_node)
    }
}

impl Calls for Inner {
    fn call(
        self: Arc<Self>,
        txn: Arc<Mutex<Txn>>,
        depth: u32,
        function: String,
        method: String,
        input: Vec<u8>,
    ) -> CallFuture {
        Box::pin(async move {
            if depth > self.config.call_depth_max {
                return Ok(Err(GuestError::new(
                    "depth",
                    format!("calls may nest at most {} deep", self.config.call_depth_max),
                )));
            }
            let local = FunctionName::new(&function)
                .ok()
                .and_then(|name| self.store.get(&name));
            let cluster = self.cluster.get();
            let remote = match (&local, cluster) {
                (None, Some(cluster)) => cluster.is_deployed(&function),
                (Some(f), Some(cluster)) => cluster.replicas().primary(&f.name).is_none(),
                (_, None) => false,
            };
            if remote {
                let cluster = cluster.expect("remote only in a cluster");
                let d = cluster.distributed().clone();
                return match d.call(&txn, depth, &function, &method, input).await {
                    Ok(outcome) => Ok(outcome),
                    Err(InvokeError::Deadline(_)) => Err(wasmtime::Error::new(Abort::Deadline(
                        self.config.wasm.deadline_ms,
                    ))),
                    Err(e) => Err(wasmtime::Error::new(Propagated(e))),
                };
            }
            let Some(f) = local else {
                return Ok(Err(GuestError::new(
                    "unknown-function",
                    format!("no function named {function:?}"),
                )));
            };
            let (id, age, holds, lost, deadline) = {
                let t = txn.lock();
                let holds = t.holds(&f.name);
                (
                    t.id,
                    t.age,
                    holds,
                    !holds && t.touched_before(&f.name),
                    t.deadline,
                )
            };
            if lost {
                // The transaction touched this function before, in a part that is gone
                // (its node failed over, or the part expired): its writes are lost.
                return Err(wasmtime::Error::new(Propagated(InvokeError::Conflict(1))));
            }
            if !holds {
                // Waiting for a lock counts against the transaction's deadline. A
                // prepared part is waited for only briefly: this transaction holds its
                // caller's locks meanwhile.
                let gate = deadline.min(Instant::now() + NESTED_PREPARED_WAIT);
                let acquired = tokio::time::timeout_at(
                    tokio::time::Instant::from_std(deadline),
                    lock_unprepared(&f, id, age, Mode::Nested, gate, &|| true),
                )
                .await;
                match acquired {
                    Ok(Ok(())) => {}
                    Ok(Err(Blocked::Lock(e))) => return Err(wasmtime::Error::new(e)),
                    Ok(Err(Blocked::Prepared(other))) if Instant::now() < deadline => {
                        return Err(wasmtime::Error::new(Propagated(
                            InvokeError::PreparedElsewhere(format!(
                                "function {function} is held by distributed transaction {other}, whose outcome is not known yet"
                            )),
                        )))
                    }
                    // (A nested wait is not `Queued`: the deadline bounds it here.)
                    Err(_) | Ok(Err(Blocked::Prepared(_) | Blocked::Queued | Blocked::NotPrimary)) => {
                        return Err(wasmtime::Error::new(Abort::Deadline(
                            self.config.wasm.deadline_ms,
                        )))
                    }
                }
                let mut t = txn.lock();
                if t.is_finished() {
                    // The transaction ended while we waited (its caller was cut off).
                    drop(t);
                    f.lock.release(id);
                    return Err(wasmtime::Error::msg("the transaction has already ended"));
                }
                t.add_held(f.clone());
            }
            let meta = f.meta();
            if meta.deleted {
                return Ok(Err(GuestError::new(
                    "unknown-function",
                    format!("no function named {function:?}"),
                )));
            }

            if !meta.running {
                return Ok(Err(GuestError::new(
                    "stopped",
                    format!("function {function} is stopped"),
                )));
            }
            let loaded = self
                .loaded
                .read()
                .get(&meta.deploy.digest)
                .cloned()
                .ok_or_else(|| {
                    wasmtime::Error::msg(format!("component {} is not loaded", meta.deploy.digest))
                })?;
            let (savepoint, remote_calls) = {
                let t = txn.lock();
                (t.savepoint(), t.remote_calls)
            };
            // A failed callee's part is undone from the savepoint; what it did on other
            // nodes cannot be undone apart from the rest: then the whole transaction goes.
            let across = |txn: &Mutex<Txn>| {
                (txn.lock().remote_calls != remote_calls).then(|| {
                    wasmtime::Error::new(Propagated(InvokeError::CalleeFailedAcrossNodes(
                        format!(
                            "function {function} failed after calling functions on other nodes; a part of a transaction done there cannot be undone alone, so the whole transaction was aborted"
                        ),
                    )))
                })
            };
            let ctx = Ctx::new(txn.clone(), f, depth, self.clone(), &self.config.wasm);
            // The callee runs on a task of its own (a guest thread's), with its own
            // fiber and stack.
            let result = self
                .runtime
                .run(&loaded, ctx, deadline, &method, &input)
                .await;
            match result {
                Ok(Ok(output)) => Ok(Ok(output)),
                Ok(Err(own)) => {
                    if let Some(abort) = across(&txn) {
                        return Err(abort);
                    }
                    // The callee's own error aborts the callee's part only.
                    txn.lock().rollback_to(savepoint);
                    Ok(Err(own))
                }
                Err(abort) => match classify(abort) {
                    InvokeError::Trap(_) | InvokeError::ResourceCap(_)
                        if across(&txn).is_some() =>
                    {
                        Err(across(&txn).expect("checked"))
                    }
                    // A trap or a cap hit inside the callee: undo its part, tell the caller.
                    InvokeError::Trap(why) => {
                        txn.lock().rollback_to(savepoint);
                        Ok(Err(GuestError::new(
                            "trap",
                            format!("function {function} trapped: {why}"),
                        )))
                    }
                    InvokeError::ResourceCap(why) => {
                        txn.lock().rollback_to(savepoint);
                        Ok(Err(GuestError::new(
                            "resource-cap",
                            format!("function {function}: {why}"),
                        )))
                    }
                    // The deadline and lost conflicts belong to the whole transaction.
                    other => Err(wasmtime::Error::new(Propagated(other))),
                },
            }
        })
    }
}

/// The process's resident memory, from `/proc/self/statm` (Linux); `None` elsewhere.
fn resident_memory_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then(|| pages * page)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::wal::record::{Deploy, Prepare, Record};

    /// A store holding function `f` with a part of distributed transaction 7 prepared
    /// on it (its outcome not known here).
    fn prepared() -> Arc<Function> {
        let store = Store::default();
        let f = FunctionName::new("f").expect("valid");
        store
            .apply(
                Lsn(1),
                &Record::Deploy(Deploy {
                    function: f.clone(),
                    digest: Digest([1; 32]),
                    version: 1,
                    at_ms: 0,
                    calls: Default::default(),
                }),
            )
            .expect("deploy");
        store
            .apply(
                Lsn(2),
                &Record::Prepare(Prepare {
                    function: f.clone(),
                    txn: TxnId(7),
                    coordinator: FunctionName::new("g").expect("valid"),
                    ops: Vec::new(),
                    epoch: 1,
                }),
            )
            .expect("prepare");
        store.get(&f).expect("deployed")
    }

    #[tokio::test]
    async fn a_wait_for_a_prepared_part_ends_when_the_node_stops_being_primary() {
        let f = prepared();
        // Still primary: the wait lasts until the request's deadline.
        let until = Instant::now() + Duration::from_millis(60);
        let blocked = lock_unprepared(&f, TxnId(9), TxnId(9), Mode::First, until, &|| true).await;
        assert!(matches!(blocked, Err(Blocked::Prepared(TxnId(7)))));
        // The role goes meanwhile (a hand-over; the outcome will reach the new primary,
        // not this copy): the wait ends as not primary, long before its deadline, which
        // would have answered `Prepared`.
        let primary = Arc::new(AtomicBool::new(true));
        let flip = primary.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flip.store(false, Ordering::Relaxed);
        });
        let until = Instant::now() + Duration::from_secs(30);
        let still = || primary.load(Ordering::Relaxed);
        let blocked = lock_unprepared(&f, TxnId(9), TxnId(9), Mode::First, until, &still).await;
        assert!(matches!(blocked, Err(Blocked::NotPrimary)));
        // It gave the function's lock back: another transaction can take it.
        let taken = tokio::time::timeout(
            Duration::from_secs(5),
            f.lock.acquire_aged(TxnId(10), TxnId(10), Mode::First),
        )
        .await;
        assert!(matches!(taken, Ok(Ok(()))));
    }
}
