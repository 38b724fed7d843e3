//! The data plane: this node's copies of functions, as primary or as backup, and the
//! links that carry their logs. Each function's copy is a `replication::replica`
//! machine (its role, its engine, its role changes), stepped under one lock per
//! function; this module carries out what it commands: the commit path feeds a primary
//! every commit (under the function's lock, so in order), senders batch appends per
//! backup node into one QUIC request, and a backup applies what it receives to its own
//! log and state and acknowledges once durable.
//!
//! **Invariant:** a commit's answer waits for its `Release`: every backup of the epoch
//! holds it (fsynced with `disk` durability, in memory with `memory`).
//! **Invariant:** a copy's machine is stepped and its commands dispatched under one
//! lock, so appends leave for each backup in the order they were made, and a backup
//! applies what it received before any role change reads its position.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard, RwLock};
use tokio::sync::{mpsc, watch};
use understudy_net::{Channel, Transport};

use super::wire::{self, Entry, Replicate, ReplicateReply};
use crate::ids::{FunctionName, Lsn};
use crate::node::Node;
use crate::replication::replica::{Command, Event, Offer, Position, Replica};
use crate::replication::{Append, Epoch, NodeId, Reply, Seq};
use crate::wal::Durability;

/// How often primaries look for backups that went silent (and resend to them).
const TICK: Duration = Duration::from_millis(10);
/// A replication request that takes longer than this is abandoned (and resent later).
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(2);
/// Appends carried in one request, at most.
const BATCH_APPENDS_MAX: usize = 4096;

/// A session number no other primary engine on this node has had, in this process or an
/// earlier one (a random base per process, then counting): see `replication::Append`.
pub fn new_session() -> u64 {
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

/// One primary session of a function on this node (one engine, in one epoch): what the
/// commit path and its waiters hold.
pub struct PrimaryCopy {
    pub function: FunctionName,
    pub epoch: Epoch,
    session: u64,
    copy: Weak<FunctionCopy>,
    released: watch::Sender<Seq>,
    /// Set when the session must stop serving: fenced by a newer epoch, or retired.
    ended: watch::Sender<Option<NotReleased>>,
    fenced: AtomicBool,
}

impl std::fmt::Debug for PrimaryCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryCopy")
            .field("function", &self.function)
            .field("epoch", &self.epoch)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl PrimaryCopy {
    /// Whether it may run transactions: not fenced, not retired.
    pub fn serving(&self) -> bool {
        self.ended.borrow().is_none()
    }

    /// Hand the engine a commit (called under the function's lock, right after the
    /// commit was appended locally, so seqs arrive in order).
    pub fn appended(&self, seq: u64, entry: Entry) {
        let Some(copy) = self.copy.upgrade() else {
            return;
        };
        let seq = Seq(seq);
        let mut core = copy.core.lock();
        let now = Instant::now();
        let mut commands = core.step(
            now,
            Event::Appended {
                session: self.session,
                seq,
                payload: entry,
            },
        );
        // The local log's durability is awaited by the commit path itself (it waits for
        // both), so the engine counts only the backups.
        commands.extend(core.step(now, Event::Durable { seq }));
        copy.dispatch(&core, commands);
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
    fn retire(&self) {
        self.ended.send_if_modified(|ended| {
            if ended.is_none() {
                *ended = Some(self.retired());
                true
            } else {
                false
            }
        });
    }

    /// Names this session's engine among the primaries of its epoch (see
    /// `replication::Append`).
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Step the function's copy (events of the senders and catch-ups).
    fn step(&self, event: Event<Entry>) {
        if let Some(copy) = self.copy.upgrade() {
            copy.step(event);
        }
    }

    /// Read this session's engine, if it is still the copy's.
    fn with_engine<T>(&self, read: impl FnOnce(&Replica<Entry>) -> T) -> Option<T> {
        let copy = self.copy.upgrade()?;
        let core = copy.core.lock();
        core.primary()
            .is_some_and(|e| e.session() == self.session)
            .then(|| read(&core))
    }

    pub fn status(&self, backups: &[NodeId]) -> serde_json::Value {
        let (seq, seq_released, lag) = self
            .with_engine(|core| {
                let engine = core.primary().expect("checked");
                let lag: serde_json::Map<String, serde_json::Value> = backups
                    .iter()
                    .map(|b| (b.0.to_string(), serde_json::json!(engine.lag(*b))))
                    .collect();
                (engine.seq_last().0, engine.seq_released().0, lag)
            })
            .unwrap_or_default();
        serde_json::json!({
            "seq": seq,
            "seq_released": seq_released,
            "fenced": self.fenced.load(Ordering::Relaxed),
            "lag": lag,
        })
    }
}

/// One function's copy on this node: its replica machine, stepped under one lock, and
/// the handle of its primary session, if it has one.
pub struct FunctionCopy {
    pub function: FunctionName,
    core: Mutex<Replica<Entry>>,
    current: Mutex<Option<Arc<PrimaryCopy>>>,
    senders: Arc<Senders>,
}

impl FunctionCopy {
    /// Step the machine and carry out what needs no waiting; return what only the
    /// caller can do (the lock, proposals to the master, a backup's applies and
    /// replies).
    pub fn step(self: &Arc<Self>, event: Event<Entry>) -> Vec<Command<Entry>> {
        self.step_with(|| event)
    }

    /// As `step`, with the event made under the machine's lock: a position read there
    /// is final (a backup applies what it receives under the same lock).
    pub fn step_with(
        self: &Arc<Self>,
        event: impl FnOnce() -> Event<Entry>,
    ) -> Vec<Command<Entry>> {
        let mut core = self.core.lock();
        let commands = core.step(Instant::now(), event());
        self.dispatch(&core, commands)
    }

    /// The machine, locked (a backup applies what it received under it).
    fn lock(&self) -> MutexGuard<'_, Replica<Entry>> {
        self.core.lock()
    }

    /// The primary session, serving or not.
    pub fn primary_any(&self) -> Option<Arc<PrimaryCopy>> {
        self.current.lock().clone()
    }

    /// The primary session, if it serves.
    pub fn primary(&self) -> Option<Arc<PrimaryCopy>> {
        self.current.lock().clone().filter(|p| p.serving())
    }

    fn session(&self, session: u64) -> Option<Arc<PrimaryCopy>> {
        self.current.lock().clone().filter(|p| p.session == session)
    }

    fn dispatch(
        self: &Arc<Self>,
        core: &Replica<Entry>,
        commands: Vec<Command<Entry>>,
    ) -> Vec<Command<Entry>> {
        let mut rest = Vec::new();
        for command in commands {
            match command {
                Command::Serve {
                    epoch,
                    session,
                    seq,
                    backups,
                } => {
                    let copy = Arc::new(PrimaryCopy {
                        function: self.function.clone(),
                        epoch,
                        session,
                        copy: Arc::downgrade(self),
                        released: watch::channel(Seq(0)).0,
                        ended: watch::channel(None).0,
                        fenced: AtomicBool::new(false),
                    });
                    if let Some(old) = self.current.lock().replace(copy) {
                        old.retire();
                    }
                    tracing::info!(function = %self.function, epoch = epoch.0, seq = seq.0, ?backups, "primary");
                }
                Command::Retire { session } => {
                    if let Some(p) = self.session(session) {
                        p.retire();
                    }
                }
                Command::Fenced { session, epoch } => {
                    if let Some(p) = self.session(session) {
                        // Usually this node is about to take the newer epoch itself (a
                        // backup learned of it first); otherwise it was deposed.
                        if p.serving() {
                            tracing::info!(function = %self.function, epoch = p.epoch.0, newer = epoch.0, "fenced: a backup knows a newer epoch; this configuration no longer serves");
                        }
                        p.fenced.store(true, Ordering::Relaxed);
                        p.ended.send_replace(Some(NotReleased::Fenced {
                            function: self.function.clone(),
                            epoch: epoch.0,
                        }));
                    }
                }
                Command::Release { session, seq } => {
                    if let Some(p) = self.session(session) {
                        p.released.send_if_modified(|r| {
                            let advanced = seq > *r;
                            *r = (*r).max(seq);
                            advanced
                        });
                    }
                }
                Command::Send { to, append } => {
                    if let Some(p) = self.session(append.session) {
                        self.senders.send(to, p, append);
                    }
                }
                Command::CatchUp { session, to } => {
                    if let Some(p) = self.session(session) {
                        self.senders.catch_up(p, to);
                    }
                }
                Command::CaughtUp { node } => {
                    tracing::info!(function = %self.function, backup = %node, "backup caught up");
                    // The cluster tells the master (see `Cluster::follow`).
                    self.senders.poke.notify_one();
                }
                Command::DrainGaveUp {
                    epoch,
                    seq_last,
                    seq_released,
                } => {
                    tracing::warn!(function = %self.function, epoch = epoch.0, seq_last = seq_last.0, seq_released = seq_released.0, peers = ?core.peers(), "the old configuration did not release everything it had sent within {:?}; its waiters are told to retry", crate::replication::follow::DRAIN_WAIT);
                }
                Command::Follow { epoch, seq } => {
                    tracing::info!(function = %self.function, epoch = epoch.0, seq = seq.0, "backup");
                }
                Command::Resync { from } => {
                    tracing::warn!(function = %self.function, primary = %from, "this copy diverged from the primary's log; it waits for the primary's snapshot");
                }
                other => rest.push(other),
            }
        }
        rest
    }
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
        copy.step(Event::Installing {
            session: copy.session(),
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
                copy.step(Event::Resynced {
                    session: copy.session(),
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
                copy.step(Event::Replied {
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
                    copy.step(Event::Replied { from: to, reply });
                }
            }
        }
    }
}

/// Every copy on this node.
pub struct Replicas {
    me: NodeId,
    node: Node,
    copies: RwLock<HashMap<FunctionName, Arc<FunctionCopy>>>,
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
                let copies: Vec<Arc<FunctionCopy>> =
                    replicas.copies.read().values().cloned().collect();
                for copy in copies {
                    copy.step(Event::Tick);
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

    /// The copy of `function` here, if there is one.
    pub fn get(&self, function: &FunctionName) -> Option<Arc<FunctionCopy>> {
        self.copies.read().get(function).cloned()
    }

    /// The copy of `function` here, made (holding no role) if there was none.
    pub fn copy(&self, function: &FunctionName) -> Arc<FunctionCopy> {
        if let Some(copy) = self.get(function) {
            return copy;
        }
        self.copies
            .write()
            .entry(function.clone())
            .or_insert_with(|| {
                Arc::new(FunctionCopy {
                    function: function.clone(),
                    core: Mutex::new(Replica::new(self.me)),
                    current: Mutex::new(None),
                    senders: self.senders.clone(),
                })
            })
            .clone()
    }

    /// Whether this node holds a role (primary or backup) in `function`'s copies.
    pub fn holds(&self, function: &FunctionName) -> bool {
        self.get(function).is_some_and(|c| c.lock().holds())
    }

    /// Where `function`'s log ends here.
    pub fn position(&self, function: &FunctionName) -> Position {
        self.node
            .store()
            .get(function)
            .map_or_else(Position::default, |f| Position {
                seq: Seq(f.seq()),
                epoch_last: Epoch(f.epoch_last()),
            })
    }

    /// The primary copy of `function` here, if this node serves it now.
    pub fn primary(&self, function: &FunctionName) -> Option<Arc<PrimaryCopy>> {
        self.get(function)?.primary()
    }

    /// Every primary copy this node serves now.
    pub fn primaries(&self) -> Vec<Arc<PrimaryCopy>> {
        self.copies
            .read()
            .values()
            .filter_map(|c| c.primary())
            .collect()
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
        let not_backup = || {
            wire::BulkReply::Error(format!(
                "node {} is not (yet) a backup of {function}",
                self.me
            ))
        };
        let Some(copy) = self.get(&function) else {
            return not_backup();
        };
        let (seq, epoch_last) = (image.seq, image.epoch_last);
        let lsn = {
            let mut core = copy.lock();
            match core.offered(from, Epoch(epoch), session, Seq(seq)) {
                Offer::Refuse => return not_backup(),
                Offer::Stale { epoch } => return wire::BulkReply::Stale { epoch: epoch.0 },
                Offer::Held { seq: held } => {
                    // An older install that arrived late: this copy already follows the
                    // primary past it, and may have acknowledged what came after.
                    tracing::info!(%function, primary = %from, seq, held = held.0, "ignored a snapshot older than this copy");
                    return wire::BulkReply::Installed { seq: held.0 };
                }
                Offer::Install => {}
            }
            // Copying and logging a large image takes milliseconds: other tasks move
            // off this thread meanwhile.
            let lsn = match tokio::task::block_in_place(|| self.node.restore(image)) {
                Ok(lsn) => lsn,
                Err(e) => return wire::BulkReply::Error(e.to_string()),
            };
            core.installed(
                from,
                Epoch(epoch),
                session,
                Position {
                    seq: Seq(seq),
                    epoch_last: Epoch(epoch_last),
                },
            );
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
    /// another copy). Waiters whose commits were not released are told to retry. The
    /// caller holds the function's lock.
    pub fn step_down(&self, function: &FunctionName, epoch: Epoch) {
        self.copy(function).step(Event::StepDown { epoch });
        tracing::info!(%function, epoch = epoch.0, "stepped down as primary");
    }

    /// The promotion `step_down` made way for was refused (nobody took over in
    /// `epoch`): this node may serve `function` in it again (a new copy, when it next
    /// follows the cluster state).
    pub fn undo_step_down(&self, function: &FunctionName, epoch: Epoch) {
        self.copy(function).step(Event::UndoStepDown { epoch });
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

    /// Hold no role in `function` any more. The caller holds the function's lock.
    pub fn forget(&self, function: &FunctionName) {
        if let Some(copy) = self.get(function) {
            copy.step(Event::Dropped);
        }
    }

    /// Serve a `Replicate` request from `from`: apply what follows each backup's log,
    /// make it durable, and answer each append.
    pub async fn handle_replicate(&self, from: NodeId, request: Replicate) -> ReplicateReply {
        let mut replies: Vec<Vec<Reply>> = Vec::with_capacity(request.appends.len());
        // (index, copy, last seq applied) for the appends that applied something.
        let mut applied: Vec<(usize, Arc<FunctionCopy>, Seq)> = Vec::new();
        let mut lsn_wait = Lsn::ZERO;
        for (i, (function, append)) in request.appends.into_iter().enumerate() {
            let Some(copy) = self.get(&function) else {
                // Not (yet) a backup here: the primary resends after silence.
                replies.push(Vec::new());
                continue;
            };
            // Applied under the machine's lock: no role change reads the position
            // half-way through.
            let mut core = copy.lock();
            let commands = core.step(Instant::now(), Event::Received { from, append });
            let mut out = Vec::new();
            for command in copy.dispatch(&core, commands) {
                match command {
                    Command::Apply { epoch, entries } => {
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
                    Command::Reply { reply, .. } => out.push(reply),
                    other => {
                        tracing::debug!(%function, command = ?other, "unexpected command of a received append")
                    }
                }
            }
            drop(core);
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
                let mut core = copy.lock();
                let commands = core.step(Instant::now(), Event::Durable { seq });
                let mut acks: Vec<Reply> = copy
                    .dispatch(&core, commands)
                    .into_iter()
                    .filter_map(|c| match c {
                        Command::Reply { reply, .. } => Some(reply),
                        _ => None,
                    })
                    .collect();
                // Every request gets an answer: what is durable now, if a concurrent
                // request's acknowledgement already said it.
                if acks.is_empty() {
                    if let Some(b) = core.backup() {
                        acks.push(Reply::Ack {
                            epoch: b.epoch(),
                            session: b.session(),
                            seq: b.seq_durable(),
                        });
                    }
                }
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
            let Some(a) = state.assignments.get(name.as_str()) else {
                continue;
            };
            let core = copy.lock();
            let Some(engine) = core.primary() else {
                continue;
            };
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
        let copies: Vec<(FunctionName, Arc<FunctionCopy>)> = self
            .copies
            .read()
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        let mut out = serde_json::Map::new();
        for (name, copy) in copies {
            let backup = copy
                .lock()
                .backup()
                .map(|b| (b.epoch().0, b.seq_durable().0));
            let value = match (copy.primary_any(), backup) {
                (_, Some((epoch, seq))) => serde_json::json!({
                    "role": "backup",
                    "epoch": epoch,
                    "seq": seq,
                }),
                (Some(p), None) if copy.lock().primary().is_some() => {
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
                    v["catch_up"] = self.catch_up_progress(&name, &copy, &catching_up);
                    v
                }
                _ => continue,
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
        copy: &FunctionCopy,
        catching_up: &[NodeId],
    ) -> serde_json::Value {
        let core = copy.lock();
        let Some(engine) = core.primary() else {
            return serde_json::json!({});
        };
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
