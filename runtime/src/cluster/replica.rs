//! The data plane: this node's copies of functions, as primary or as backup, and the
//! links that carry their logs. It drives the I/O-free engines of `replication`: the
//! commit path feeds a primary copy every commit (under the function's lock, so in
//! order), senders batch appends per backup node into one QUIC request, and a backup
//! applies what it receives to its own log and state and acknowledges once durable.
//!
//! **Invariant:** a commit's answer waits for its `Release`: every backup of the epoch
//! holds it (fsynced with `disk` durability, in memory with `memory`).
//! **Invariant:** a primary copy's engine is stepped and its commands dispatched under
//! one lock, so appends leave for each backup in the order they were made.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};
use understudy_net::{Channel, Transport};

use super::wire::{self, Entry, Replicate, ReplicateReply};
use crate::ids::{FunctionName, Lsn};
use crate::node::Node;
use crate::replication::{
    backup, follow, primary, Append, Backup, Epoch, NodeId, Primary, Reply, Seq,
};
use crate::wal::Durability;

/// How often primaries look for backups that went silent (and resend to them).
const TICK: Duration = Duration::from_millis(10);
/// A replication request that takes longer than this is abandoned (and resent later).
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(2);
/// Appends carried in one request, at most.
const BATCH_APPENDS_MAX: usize = 4096;

/// A session number no other primary engine on this node has had, in this process or an
/// earlier one (a random base per process, then counting): see `replication::Append`.
fn new_session() -> u64 {
    use std::hash::BuildHasher;
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
    });
    match base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) {
        0 => 1,
        s => s,
    }
}

/// Why a commit's answer could not be given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReleased {
    #[error("this node was deposed as primary of {function} (a backup knows epoch {epoch}); the commit may not have been replicated")]
    Fenced { function: FunctionName, epoch: u64 },
    #[error("the configuration of {function} changed before the commit was replicated")]
    Retired { function: FunctionName },
}

/// This node's copy of a function whose primary it is, in one epoch.
pub struct PrimaryCopy {
    pub function: FunctionName,
    pub epoch: Epoch,
    engine: Mutex<Primary<Entry>>,
    released: watch::Sender<Seq>,
    /// Set when the copy must stop serving: fenced by a newer epoch, or replaced.
    ended: watch::Sender<Option<NotReleased>>,
    fenced: AtomicBool,
    senders: Arc<Senders>,
}

impl std::fmt::Debug for PrimaryCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryCopy")
            .field("function", &self.function)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl PrimaryCopy {
    /// Whether it may run transactions: not fenced, not replaced.
    pub fn serving(&self) -> bool {
        self.ended.borrow().is_none()
    }

    /// Hand the engine a commit (called under the function's lock, right after the
    /// commit was appended locally, so seqs arrive in order).
    pub fn appended(self: &Arc<Self>, seq: u64, entry: Entry) {
        let now = Instant::now();
        let mut engine = self.engine.lock();
        let mut commands = engine.step(
            now,
            primary::Event::Appended {
                seq: Seq(seq),
                payload: entry,
            },
        );
        // The local log's durability is awaited by the commit path itself (it waits for
        // both), so the engine counts only the backups.
        commands.extend(engine.step(now, primary::Event::LocalDurable { seq: Seq(seq) }));
        self.dispatch(&mut engine, commands);
    }

    /// Whether every commit up to `seq` is held by every backup of the epoch already.
    pub fn is_released(&self, seq: u64) -> bool {
        self.released.borrow().0 >= seq
    }

    /// Resolves once every commit up to `seq` is held by every backup of the epoch.
    pub async fn released(&self, seq: u64) -> Result<(), NotReleased> {
        let mut released = self.released.subscribe();
        let mut ended = self.ended.subscribe();
        loop {
            if released.borrow_and_update().0 >= seq {
                return Ok(());
            }
            if let Some(why) = ended.borrow_and_update().clone() {
                return Err(why);
            }
            tokio::select! {
                r = released.changed() => if r.is_err() { return Err(self.retired()) },
                e = ended.changed() => if e.is_err() { return Err(self.retired()) },
            }
        }
    }

    fn retired(&self) -> NotReleased {
        NotReleased::Retired {
            function: self.function.clone(),
        }
    }

    /// Stop serving: a newer configuration replaces this one. Waiters whose commits
    /// were not released get an error.
    pub fn retire(&self) {
        self.ended.send_if_modified(|ended| {
            if ended.is_none() {
                *ended = Some(self.retired());
                true
            } else {
                false
            }
        });
    }

    /// Names this copy's engine among the primaries of its epoch (see `replication::Append`).
    pub fn session(&self) -> u64 {
        self.engine.lock().session()
    }

    /// What this copy does for `assigned`, which names this node primary (see
    /// `replication::follow`).
    pub fn follow(&self, stepped_down: bool, assigned: follow::Assigned<'_>) -> follow::Follow {
        let engine = self.engine.lock();
        follow::as_primary(Some(self.held(&engine)), stepped_down, false, assigned)
    }

    /// Whether it still has something to release, and may.
    pub fn draining(&self) -> bool {
        follow::draining(self.held(&self.engine.lock()))
    }

    fn held<'a>(&self, engine: &'a Primary<Entry>) -> follow::Held<'a, Entry> {
        follow::Held {
            engine,
            serving: self.serving(),
        }
    }

    /// The backups it ships to, with whether each is live (counts for commits).
    pub fn peers(&self) -> Vec<(NodeId, bool)> {
        let engine = self.engine.lock();
        engine
            .peers()
            .into_iter()
            .map(|n| (n, engine.peer_state(n) == Some(primary::PeerState::Live)))
            .collect()
    }

    /// `node` left the configuration: commits no longer wait for it.
    pub fn remove_peer(self: &Arc<Self>, node: NodeId) {
        self.step(primary::Event::PeerRemoved { node });
    }

    pub fn status(&self, backups: &[NodeId]) -> serde_json::Value {
        let engine = self.engine.lock();
        let lag: serde_json::Map<String, serde_json::Value> = backups
            .iter()
            .map(|b| (b.0.to_string(), serde_json::json!(engine.lag(*b))))
            .collect();
        serde_json::json!({
            "seq": engine.seq_last().0,
            "seq_released": engine.seq_released().0,
            "fenced": self.fenced.load(Ordering::Relaxed),
            "lag": lag,
        })
    }

    fn step(self: &Arc<Self>, event: primary::Event<Entry>) {
        let mut engine = self.engine.lock();
        let commands = engine.step(Instant::now(), event);
        self.dispatch(&mut engine, commands);
    }

    fn dispatch(
        self: &Arc<Self>,
        _engine: &mut Primary<Entry>,
        commands: Vec<primary::Command<Entry>>,
    ) {
        for command in commands {
            match command {
                primary::Command::Send { to, append } => {
                    self.senders.send(to, self.clone(), append)
                }
                primary::Command::Release { seq } => {
                    self.released.send_if_modified(|r| {
                        let advanced = seq > *r;
                        *r = (*r).max(seq);
                        advanced
                    });
                }
                primary::Command::Fenced { epoch } => {
                    // Usually this node is about to take the newer epoch itself (a backup
                    // learned of it first); otherwise it was deposed.
                    if self.serving() {
                        tracing::info!(function = %self.function, epoch = self.epoch.0, newer = epoch.0, "fenced: a backup knows a newer epoch; this configuration no longer serves");
                    }
                    self.fenced.store(true, Ordering::Relaxed);
                    self.ended.send_replace(Some(NotReleased::Fenced {
                        function: self.function.clone(),
                        epoch: epoch.0,
                    }));
                }
                primary::Command::NeedSnapshot { to } => {
                    self.senders.catch_up(self.clone(), to);
                }
                primary::Command::PeerLive { node } => {
                    tracing::info!(function = %self.function, backup = %node, "backup caught up");
                    // The cluster tells the master (see `Cluster::reconcile`).
                    self.senders.poke.notify_one();
                }
            }
        }
    }
}

/// This node's copy of a function whose backup it is.
pub struct BackupCopy {
    pub function: FunctionName,
    engine: Mutex<Backup>,
    /// Replaced (this node became primary): what arrives for it is not applied. Set under
    /// the engine's lock, so no apply is half-way when the new role reads the position.
    retired: AtomicBool,
}

impl BackupCopy {
    pub fn epoch(&self) -> Epoch {
        self.engine.lock().epoch()
    }

    /// The control plane committed `epoch` for this function.
    pub fn epoch_committed(&self, epoch: Epoch) {
        self.engine
            .lock()
            .step::<Entry>(backup::Event::EpochCommitted { epoch });
    }

    pub fn seq(&self) -> Seq {
        self.engine.lock().seq_durable()
    }
}

#[derive(Clone)]
pub enum Copy {
    Primary(Arc<PrimaryCopy>),
    Backup(Arc<BackupCopy>),
}

/// An append waiting to leave, with the copy that answers go back to.
type Outgoing = (Arc<PrimaryCopy>, Append<Entry>);

/// One queue per backup node; a task per queue sends what accumulated as one request.
/// Also runs catch-ups (snapshots over `Bulk`).
pub struct Senders {
    transport: Transport,
    node: Node,
    /// Catch-ups under way, by function and backup.
    catching_up: Mutex<std::collections::HashSet<(FunctionName, NodeId)>>,
    /// Wakes the cluster's reconciliation (a backup caught up).
    pub poke: Arc<tokio::sync::Notify>,
    /// Figures of the last catch-ups, for status.
    pub catch_up_log: Mutex<Vec<CatchUpRecord>>,
    queues: Mutex<HashMap<NodeId, mpsc::UnboundedSender<Outgoing>>>,
    addrs: RwLock<HashMap<NodeId, SocketAddr>>,
}

/// One finished catch-up.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CatchUpRecord {
    pub function: String,
    pub backup: u64,
    pub seq: u64,
    pub bytes: usize,
    pub ms: f64,
    pub mb_per_s: f64,
}

/// Why one attempt at a catch-up failed (it is tried again while the copy serves).
#[derive(Debug, thiserror::Error)]
enum CatchUpError {
    #[error("no address for node {0}")]
    NoAddress(NodeId),
    #[error("function {0} is gone")]
    Gone(FunctionName),
    #[error("encoding the snapshot failed: {0}")]
    Encode(String),
    #[error(transparent)]
    Transport(#[from] understudy_net::transport::Error),
    #[error(transparent)]
    Decode(#[from] wire::DecodeError),
    #[error("node {node}: {why}")]
    Refused { node: NodeId, why: String },
    #[error("node {node} answered an install with {reply}")]
    Unexpected { node: NodeId, reply: String },
}

/// How long a catch-up waits before trying again after a failure.
const CATCH_UP_RETRY: Duration = Duration::from_millis(200);
/// A snapshot transfer that takes longer than this is abandoned (and retried).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

impl Senders {
    /// Bring `to` up to date with a snapshot of `copy`'s function, in the background
    /// (once per function and backup at a time), retrying while `copy` serves.
    pub fn catch_up(self: &Arc<Self>, copy: Arc<PrimaryCopy>, to: NodeId) {
        if !self.catching_up.lock().insert((copy.function.clone(), to)) {
            return;
        }
        let senders = self.clone();
        tokio::spawn(async move {
            while copy.serving() {
                match senders.install_once(&copy, to).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(function = %copy.function, backup = %to, error = %e, "catch-up failed; retrying");
                        tokio::time::sleep(CATCH_UP_RETRY).await;
                    }
                }
            }
            senders
                .catching_up
                .lock()
                .remove(&(copy.function.clone(), to));
        });
    }

    async fn install_once(&self, copy: &Arc<PrimaryCopy>, to: NodeId) -> Result<(), CatchUpError> {
        let started = Instant::now();
        let addr = self
            .addrs
            .read()
            .get(&to)
            .copied()
            .ok_or(CatchUpError::NoAddress(to))?;
        let gone = || CatchUpError::Gone(copy.function.clone());
        // The capture and its position agree (taken between two appends to the log), and
        // the engine keeps every entry after it for this backup (an entry it appended
        // before hearing of the install is still in its log, or the backup asks for a
        // snapshot again). Not under the function's lock: a transaction holding it may
        // wait, through a prepared part elsewhere, for an outcome that only this
        // catch-up lets the coordinator's new copy give (the drill found transfers
        // stalled for a whole deadline that way). Copying the capture out and encoding
        // it, which take milliseconds for a large function, run after, off the async
        // threads.
        if !copy.serving() {
            return Ok(());
        }
        let (captured, seq) = self
            .node
            .capture_function(&copy.function)
            .ok_or_else(gone)?;
        copy.step(primary::Event::Installing {
            node: to,
            seq: Seq(seq),
        });
        let (node, function, epoch) = (self.node.clone(), copy.function.clone(), copy.epoch.0);
        let session = copy.session();
        let body = tokio::task::spawn_blocking(move || {
            let image = node.image_of(captured)?;
            Some(wire::encode(&wire::Bulk::Install {
                function,
                epoch,
                session,
                image: Box::new(image),
            }))
        })
        .await
        .map_err(|e| CatchUpError::Encode(e.to_string()))?
        .ok_or_else(gone)?;
        let bytes = body.len();
        let reply = self
            .transport
            .request_within(to.0, addr, Channel::Bulk, body, INSTALL_TIMEOUT)
            .await?;
        match wire::decode::<wire::BulkReply>(&reply)? {
            wire::BulkReply::Installed { seq: installed } => {
                copy.step(primary::Event::Resynced {
                    node: to,
                    seq: Seq(installed),
                });
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let mb_per_s = bytes as f64 / 1e6 / (ms / 1000.0).max(1e-9);
                tracing::info!(function = %copy.function, backup = %to, seq, bytes, ms, mb_per_s, "backup installed a snapshot");
                let metrics = &self.node.metrics().cluster;
                metrics.catchups.inc();
                metrics.catchup_bytes.inc_by(bytes as u64);
                metrics.catchup_duration_seconds.observe(ms / 1000.0);
                let mut log = self.catch_up_log.lock();
                log.push(CatchUpRecord {
                    function: copy.function.to_string(),
                    backup: to.0,
                    seq,
                    bytes,
                    ms,
                    mb_per_s,
                });
                let excess = log.len().saturating_sub(16);
                log.drain(..excess);
                Ok(())
            }
            wire::BulkReply::Stale { epoch } => {
                copy.step(primary::Event::Replied {
                    from: to,
                    reply: Reply::Stale {
                        epoch: Epoch(epoch),
                    },
                });
                Ok(())
            }
            wire::BulkReply::Error(why) => Err(CatchUpError::Refused { node: to, why }),
            other => Err(CatchUpError::Unexpected {
                node: to,
                reply: format!("{other:?}"),
            }),
        }
    }

    fn send(self: &Arc<Self>, to: NodeId, copy: Arc<PrimaryCopy>, append: Append<Entry>) {
        let mut queues = self.queues.lock();
        let queue = queues.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(self.clone().run(to, rx));
            tx
        });
        // The receiver lives as long as the task, which lives as long as the sender.
        let _ = queue.send((copy, append));
    }

    async fn run(self: Arc<Self>, to: NodeId, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
        let mut batch = Vec::new();
        while let Some(first) = queue.recv().await {
            batch.clear();
            batch.push(first);
            while batch.len() < BATCH_APPENDS_MAX {
                match queue.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            // A replaced configuration's appends are moot: its successor sends its own.
            batch.retain(|(copy, _)| copy.serving());
            if batch.is_empty() {
                continue;
            }
            let Some(addr) = self.addrs.read().get(&to).copied() else {
                tracing::warn!(backup = %to, "no address for a backup; its appends wait for a resend");
                continue;
            };
            let request = Replicate {
                appends: batch
                    .iter()
                    .map(|(copy, append)| (copy.function.clone(), append.clone()))
                    .collect(),
            };
            let body = wire::encode(&request);
            let metrics = &self.node.metrics().cluster;
            let backup = crate::metrics::BackupLabels {
                backup: to.0.to_string(),
            };
            let entries: usize = request.appends.iter().map(|(_, a)| a.entries.len()).sum();
            metrics
                .replication_shipped_entries
                .get_or_create(&backup)
                .inc_by(entries as u64);
            metrics
                .replication_shipped_bytes
                .get_or_create(&backup)
                .inc_by(body.len() as u64);
            metrics
                .replication_batch_appends
                .observe(request.appends.len() as f64);
            let sent = Instant::now();
            let reply = self
                .transport
                .request_within(to.0, addr, Channel::Replication, body, REPLICATE_TIMEOUT)
                .await;
            let reply: ReplicateReply = match reply
                .map_err(|e| e.to_string())
                .and_then(|bytes| wire::decode(&bytes).map_err(|e| e.to_string()))
            {
                Ok(reply) => {
                    metrics
                        .replication_ack_latency_seconds
                        .observe(sent.elapsed().as_secs_f64());
                    reply
                }
                Err(e) => {
                    metrics
                        .replication_requests_failed
                        .get_or_create(&backup)
                        .inc();
                    // Lost: the engines resend what stays unacknowledged.
                    tracing::debug!(backup = %to, error = %e, "replication request failed");
                    continue;
                }
            };
            for ((copy, _), replies) in batch.iter().zip(reply.replies) {
                for reply in replies {
                    copy.step(primary::Event::Replied { from: to, reply });
                }
            }
        }
    }
}

/// Every copy on this node.
pub struct Replicas {
    me: NodeId,
    node: Node,
    copies: RwLock<HashMap<FunctionName, Copy>>,
    /// Primary roles this node gave up on the master's request (a drain), by epoch: not
    /// to be taken again in that epoch.
    stepped_down: Mutex<std::collections::HashSet<(FunctionName, Epoch)>>,
    /// The functions this node was primary of when the process started, with the epoch
    /// (see `note_boot`); `None` until the first pass over the cluster state.
    boot: Mutex<Option<HashMap<FunctionName, Epoch>>>,
    senders: Arc<Senders>,
}

impl Replicas {
    pub fn new(me: NodeId, node: Node, transport: Transport) -> Arc<Replicas> {
        let replicas = Arc::new(Replicas {
            me,
            node: node.clone(),
            copies: RwLock::new(HashMap::new()),
            stepped_down: Mutex::new(std::collections::HashSet::new()),
            boot: Mutex::new(None),
            senders: Arc::new(Senders {
                transport,
                node: node.clone(),
                catching_up: Mutex::new(std::collections::HashSet::new()),
                poke: Arc::new(tokio::sync::Notify::new()),
                catch_up_log: Mutex::new(Vec::new()),
                queues: Mutex::new(HashMap::new()),
                addrs: RwLock::new(HashMap::new()),
            }),
        });
        let weak = Arc::downgrade(&replicas);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(replicas) = weak.upgrade() else {
                    return;
                };
                let primaries: Vec<Arc<PrimaryCopy>> = replicas
                    .copies
                    .read()
                    .values()
                    .filter_map(|c| match c {
                        Copy::Primary(p) => Some(p.clone()),
                        Copy::Backup(_) => None,
                    })
                    .collect();
                for p in primaries {
                    p.step(primary::Event::Tick);
                }
            }
        });
        replicas
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn set_addr(&self, node: NodeId, addr: SocketAddr) {
        self.senders.addrs.write().insert(node, addr);
    }

    pub fn get(&self, function: &FunctionName) -> Option<Copy> {
        self.copies.read().get(function).cloned()
    }

    /// The primary copy of `function` here, if this node serves it now.
    pub fn primary(&self, function: &FunctionName) -> Option<Arc<PrimaryCopy>> {
        match self.copies.read().get(function) {
            Some(Copy::Primary(p)) if p.serving() => Some(p.clone()),
            _ => None,
        }
    }

    /// The primary copy of `function` here, serving or not (fenced, or replaced and
    /// still draining).
    pub fn primary_any(&self, function: &FunctionName) -> Option<Arc<PrimaryCopy>> {
        match self.copies.read().get(function) {
            Some(Copy::Primary(p)) => Some(p.clone()),
            _ => None,
        }
    }

    /// Every primary copy this node serves now.
    pub fn primaries(&self) -> Vec<Arc<PrimaryCopy>> {
        self.copies
            .read()
            .values()
            .filter_map(|c| match c {
                Copy::Primary(p) if p.serving() => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Become (or stay) primary of `function` in `epoch` with `backups`. The caller holds
    /// the function's lock, so no commit is half-way; the previous primary copy, if any,
    /// has released everything (see `drained`).
    pub fn become_primary(&self, function: &FunctionName, epoch: Epoch, backups: &[NodeId]) {
        // A backup copy may be applying what the old primary sent: stop it first, under
        // its engine's lock, so the position read below is final.
        let old_backup = match self.get(function) {
            Some(Copy::Backup(b)) => Some(b),
            _ => None,
        };
        let applying = old_backup.as_ref().map(|b| {
            let engine = b.engine.lock();
            b.retired.store(true, Ordering::Release);
            engine
        });
        let f = self.node.store().get(function);
        let (seq, epoch_last) = f.map_or((0, 0), |f| (f.seq(), f.epoch_last()));
        // Released before `copies` is locked (`status` takes them the other way round).
        drop(applying);
        let (engine, commands) = Primary::new(
            Instant::now(),
            epoch,
            new_session(),
            Seq(seq),
            Epoch(epoch_last),
            backups,
        );
        let copy = Arc::new(PrimaryCopy {
            function: function.clone(),
            epoch,
            engine: Mutex::new(engine),
            // Nothing counts as released until the backups confirm it (see `Primary::new`).
            released: watch::channel(Seq(0)).0,
            ended: watch::channel(None).0,
            fenced: AtomicBool::new(false),
            senders: self.senders.clone(),
        });
        {
            let mut engine = copy.engine.lock();
            copy.dispatch(&mut engine, commands);
        }
        let old = self
            .copies
            .write()
            .insert(function.clone(), Copy::Primary(copy));
        if let Some(Copy::Primary(old)) = old {
            old.retire();
        }
        tracing::info!(%function, epoch = epoch.0, seq, ?backups, "primary");
    }

    /// Become (or stay) a backup of `function`, knowing `epoch`.
    pub fn become_backup(&self, function: &FunctionName, epoch: Epoch) {
        let mut copies = self.copies.write();
        match copies.get(function) {
            Some(Copy::Backup(b)) => {
                b.epoch_committed(epoch);
                return;
            }
            Some(Copy::Primary(p)) => p.retire(),
            None => {}
        }
        let f = self.node.store().get(function);
        let (seq, epoch_last) = f.map_or((0, 0), |f| (f.seq(), f.epoch_last()));
        copies.insert(
            function.clone(),
            Copy::Backup(Arc::new(BackupCopy {
                function: function.clone(),
                engine: Mutex::new(Backup::new(epoch, Seq(seq), Epoch(epoch_last))),
                retired: AtomicBool::new(false),
            })),
        );
        tracing::info!(%function, epoch = epoch.0, seq, "backup");
    }

    pub fn senders(&self) -> &Arc<Senders> {
        &self.senders
    }

    /// Serve an `Install` from `from`, the primary of `epoch`: replace this backup's copy
    /// of `function` with `image`, durably, and follow the log after it.
    pub async fn handle_install(
        &self,
        from: NodeId,
        function: FunctionName,
        epoch: u64,
        session: u64,
        image: crate::wal::snapshot::FunctionImage,
    ) -> wire::BulkReply {
        if image.deploy.function != function {
            return wire::BulkReply::Error(format!(
                "the snapshot is of {}, not {function}",
                image.deploy.function
            ));
        }
        let copy = match self.get(&function) {
            Some(Copy::Backup(b)) => b,
            Some(Copy::Primary(p)) if p.epoch.0 >= epoch => {
                return wire::BulkReply::Stale { epoch: p.epoch.0 }
            }
            _ => {
                return wire::BulkReply::Error(format!(
                    "node {} is not (yet) a backup of {function}",
                    self.me
                ))
            }
        };
        let (seq, epoch_last) = (image.seq, image.epoch_last);
        let lsn = {
            let mut engine = copy.engine.lock();
            if copy.retired.load(Ordering::Acquire) {
                return wire::BulkReply::Error(format!(
                    "node {} is no longer a backup of {function}",
                    self.me
                ));
            }
            if epoch < engine.epoch().0 {
                return wire::BulkReply::Stale {
                    epoch: engine.epoch().0,
                };
            }
            let primary = from;
            if engine.snapshot_is_behind(primary, Epoch(epoch), session, Seq(seq)) {
                // An older install that arrived late: this copy already follows the
                // primary past it, and may have acknowledged what came after.
                tracing::info!(%function, primary = %from, seq, applied = engine.seq_applied().0, "ignored a snapshot older than this copy");
                // Claim no more than is durable here: the primary counts it as held.
                return wire::BulkReply::Installed {
                    seq: seq.min(engine.seq_durable().0),
                };
            }
            // Copying and logging a large image takes milliseconds: other tasks move
            // off this thread meanwhile.
            let lsn = match tokio::task::block_in_place(|| self.node.restore(image)) {
                Ok(lsn) => lsn,
                Err(e) => return wire::BulkReply::Error(e.to_string()),
            };
            engine.install(primary, Epoch(epoch), session, Seq(seq), Epoch(epoch_last));
            lsn
        };
        if self.node.wal_durability() == Durability::Disk {
            if let Err(e) = self.node.wait_lsn_durable(lsn).await {
                return wire::BulkReply::Error(e.to_string());
            }
        }
        tracing::info!(%function, primary = %from, seq, "installed the primary's snapshot");
        wire::BulkReply::Installed { seq }
    }

    /// Stop serving `function` as its primary in `epoch` (the master is about to promote
    /// another copy). Waiters whose commits were not released are told to retry.
    pub fn step_down(&self, function: &FunctionName, epoch: Epoch) {
        self.stepped_down.lock().insert((function.clone(), epoch));
        if let Some(Copy::Primary(p)) = self.copies.read().get(function) {
            if p.epoch <= epoch {
                p.retire();
            }
        }
        tracing::info!(%function, epoch = epoch.0, "stepped down as primary");
    }

    /// The promotion `step_down` made way for was refused (nobody took over in
    /// `epoch`): this node may serve `function` in it again (a new copy, when it next
    /// follows the cluster state).
    pub fn undo_step_down(&self, function: &FunctionName, epoch: Epoch) {
        self.stepped_down.lock().remove(&(function.clone(), epoch));
        tracing::info!(%function, epoch = epoch.0, "serves again after a refused hand-over");
    }

    /// On the first pass over the cluster state after the process started: remember the
    /// functions this node was primary of then, and in which epoch (see
    /// `replication::follow`: a restarted primary asks for a new epoch before it serves).
    pub fn note_boot(&self, state: &understudy_control::ClusterState) {
        let mut boot = self.boot.lock();
        if boot.is_none() {
            *boot = Some(
                state
                    .assignments
                    .iter()
                    .filter(|(_, a)| a.primary == self.me)
                    .filter_map(|(name, a)| Some((FunctionName::new(name).ok()?, a.epoch)))
                    .collect(),
            );
        }
    }

    /// Whether this process found itself primary of `function` in `epoch` when it started.
    pub fn restarted_as_primary(&self, function: &FunctionName, epoch: Epoch) -> bool {
        self.boot
            .lock()
            .as_ref()
            .is_some_and(|boot| boot.get(function) == Some(&epoch))
    }

    pub fn stepped_down(&self, function: &FunctionName, epoch: Epoch) -> bool {
        self.stepped_down
            .lock()
            .contains(&(function.clone(), epoch))
    }

    /// Hold no copy of `function` any more.
    pub fn forget(&self, function: &FunctionName) {
        if let Some(Copy::Primary(p)) = self.copies.write().remove(function) {
            p.retire();
        }
    }

    /// Serve a `Replicate` request from `from`: apply what follows each backup's log,
    /// make it durable, and answer each append.
    pub async fn handle_replicate(&self, from: NodeId, request: Replicate) -> ReplicateReply {
        let mut replies: Vec<Vec<Reply>> = Vec::with_capacity(request.appends.len());
        // (index, copy, last seq applied) for the appends that applied something.
        let mut applied: Vec<(usize, Arc<BackupCopy>, Seq)> = Vec::new();
        let mut lsn_wait = Lsn::ZERO;
        for (i, (function, append)) in request.appends.into_iter().enumerate() {
            let copy = match self.get(&function) {
                Some(Copy::Backup(b)) => b,
                Some(Copy::Primary(p)) if p.epoch < append.epoch => {
                    // A newer primary: this node was deposed and has not heard yet.
                    replies.push(Vec::new());
                    continue;
                }
                Some(Copy::Primary(p)) => {
                    // Two primaries of one epoch cannot exist; an older one is stale.
                    replies.push(vec![Reply::Stale { epoch: p.epoch }]);
                    continue;
                }
                None => {
                    // Not (yet) a backup here: the primary resends after silence.
                    replies.push(Vec::new());
                    continue;
                }
            };
            let epoch = append.epoch;
            let mut engine = copy.engine.lock();
            if copy.retired.load(Ordering::Acquire) {
                // This node has just become the primary: the old primary's entries are moot.
                replies.push(Vec::new());
                continue;
            }
            let commands = engine.step(backup::Event::Received { from, append });
            let mut out = Vec::new();
            for command in commands {
                match command {
                    backup::Command::Apply { entries } => {
                        let last = entries.last().map(|(s, _)| *s).unwrap_or_default();
                        match self.node.apply_replicated(&function, epoch.0, entries) {
                            Ok(lsn) => {
                                lsn_wait = lsn_wait.max(lsn);
                                applied.push((i, copy.clone(), last));
                            }
                            Err(e) => {
                                // The state is no longer a copy of the primary's: stop
                                // acknowledging (the primary's commits wait, nothing
                                // wrong is confirmed) and say why loudly.
                                tracing::error!(%function, error = %e, "cannot apply replicated entries; this copy stops acknowledging");
                            }
                        }
                    }
                    backup::Command::Reply { reply, .. } => out.push(reply),
                    backup::Command::Resync { from } => {
                        tracing::warn!(%function, primary = %from, "this copy diverged from the primary's log; it waits for the primary's snapshot");
                    }
                }
            }
            drop(engine);
            replies.push(out);
        }
        if !applied.is_empty() {
            let durable = match self.node.wal_durability() {
                Durability::Memory => Ok(()),
                Durability::Disk => self.node.wait_lsn_durable(lsn_wait).await,
            };
            if let Err(e) = durable {
                tracing::error!(error = %e, "replicated entries did not become durable");
                return ReplicateReply { replies };
            }
            for (i, copy, seq) in applied {
                let mut engine = copy.engine.lock();
                let acks: Vec<Reply> = engine
                    .step::<Entry>(backup::Event::Durable { seq })
                    .into_iter()
                    .filter_map(|c| match c {
                        backup::Command::Reply { reply, .. } => Some(reply),
                        _ => None,
                    })
                    .collect();
                let acks = if acks.is_empty() {
                    vec![Reply::Ack {
                        epoch: engine.epoch(),
                        session: engine.session(),
                        seq: engine.seq_durable(),
                    }]
                } else {
                    acks
                };
                replies[i].extend(acks);
            }
        }
        ReplicateReply { replies }
    }

    /// How far each backup (caught up or catching up) of this node's primaries is
    /// behind, in entries.
    pub fn lags(
        &self,
        state: &understudy_control::ClusterState,
    ) -> Vec<(FunctionName, NodeId, u64)> {
        let copies = self.copies.read();
        let mut out = Vec::new();
        for (name, copy) in copies.iter() {
            let (Copy::Primary(p), Some(a)) = (copy, state.assignments.get(name.as_str())) else {
                continue;
            };
            let engine = p.engine.lock();
            for b in a.backups.iter().chain(&a.catching_up) {
                if let Some(lag) = engine.lag(*b) {
                    out.push((name.clone(), *b, lag));
                }
            }
        }
        out
    }

    /// What `GET /v1/cluster` shows of this node's copies.
    pub fn status(&self, assignments: &understudy_control::ClusterState) -> serde_json::Value {
        let copies = self.copies.read();
        let mut out = serde_json::Map::new();
        for (name, copy) in copies.iter() {
            let value = match copy {
                Copy::Primary(p) => {
                    let assignment = assignments.assignments.get(name.as_str());
                    let backups: Vec<NodeId> = assignment
                        .map(|a| a.backups.iter().chain(&a.catching_up).copied().collect())
                        .unwrap_or_default();
                    let mut v = p.status(&backups);
                    v["role"] = "primary".into();
                    v["epoch"] = p.epoch.0.into();
                    let catching_up = assignment
                        .map(|a| a.catching_up.clone())
                        .unwrap_or_default();
                    v["catch_up"] = self.catch_up_progress(name, p, &catching_up);
                    v
                }
                Copy::Backup(b) => serde_json::json!({
                    "role": "backup",
                    "epoch": b.epoch().0,
                    "seq": b.seq().0,
                }),
            };
            out.insert(name.to_string(), value);
        }
        serde_json::Value::Object(out)
    }

    /// For each backup of `copy` still catching up: whether its snapshot is on the way,
    /// and how much of the primary's log it holds (a percentage of the entries).
    fn catch_up_progress(
        &self,
        function: &FunctionName,
        copy: &PrimaryCopy,
        catching_up: &[NodeId],
    ) -> serde_json::Value {
        let engine = copy.engine.lock();
        let last = engine.seq_last().0;
        let installing = self.senders.catching_up.lock();
        let progress: serde_json::Map<String, serde_json::Value> = catching_up
            .iter()
            .map(|b| {
                let lag = engine.lag(*b).unwrap_or(last);
                let held = last.saturating_sub(lag);
                let percent = match last {
                    0 => 100.0,
                    _ => held as f64 * 100.0 / last as f64,
                };
                let snapshot = installing.contains(&(function.clone(), *b));
                (
                    b.0.to_string(),
                    serde_json::json!({ "percent": percent, "snapshot": snapshot, "lag": lag }),
                )
            })
            .collect();
        serde_json::Value::Object(progress)
    }
}
