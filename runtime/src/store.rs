//! The node's durable state, in memory: the deployed functions, each with its ordered
//! key-value state and its remembered idempotent answers. It changes only by applying
//! log records, in log order, so that recovery (replaying the log) and live commits
//! go through the same code.
//!
//! **Invariant:** `store` never touches the disk or the network; it applies records
//! and hands out consistent images for snapshots.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::ids::TxnId;
use crate::ids::{Digest, FunctionName, Lsn};
use crate::lock::TxnLock;
use crate::wal::record::{Deploy, Idempotency, Op, Prepare, Record};
use crate::wal::snapshot::{Entry, FunctionImage, Image};

/// A function's key-value state: a persistent ordered map, so a snapshot or a
/// transaction's view is a cheap clone.
pub type Map = imbl::OrdMap<Bytes, Bytes>;

/// Idempotency keys that a cluster node assigned to a forwarded invocation whose client
/// gave none (so that it can retry it on a new primary exactly once); kept for a short
/// window only.
pub const AUTO_KEY_PREFIX: &str = "auto:";

/// How long answers to keys the cluster assigned itself are kept: long enough for a
/// retry across a failover.
pub const AUTO_KEY_WINDOW_S: u64 = 30;

/// Remembered answers by idempotency key, with the LSN of the commit that stored each.
pub type Answers = imbl::HashMap<String, (Lsn, Idempotency)>;

/// A function's remembered answers, with their order of age: once there are more than
/// the store's cap, the oldest (by the commit's time, which every copy applies alike)
/// are forgotten first.
///
/// Answers to keys the cluster assigned itself (`AUTO_KEY_PREFIX`) are also forgotten
/// as each answer is remembered, once older than `AUTO_KEY_WINDOW_S` before it (the
/// commit's own time, so every copy forgets alike): in a cluster every invocation
/// without a key carries one, and they must not crowd out the clients' answers.
#[derive(Default)]
struct Table {
    answers: Answers,
    by_age: std::collections::BTreeSet<(u64, String)>,
    /// The same, for the cluster's own keys only.
    auto_by_age: std::collections::BTreeSet<(u64, String)>,
    /// How many answers the cap made it forget (not counting expiry by time).
    forgotten: u64,
}

impl Table {
    fn of(answers: Answers) -> Table {
        let mut table = Table {
            answers,
            ..Table::default()
        };
        for (key, (_, entry)) in table.answers.iter() {
            table.by_age.insert((entry.at_ms, key.clone()));
            if key.starts_with(AUTO_KEY_PREFIX) {
                table.auto_by_age.insert((entry.at_ms, key.clone()));
            }
        }
        table
    }

    fn remember(&mut self, lsn: Lsn, answer: &Idempotency, max: usize) {
        let key = &answer.key;
        if let Some((_, old)) = self.answers.insert(key.clone(), (lsn, answer.clone())) {
            self.by_age.remove(&(old.at_ms, key.clone()));
            self.auto_by_age.remove(&(old.at_ms, key.clone()));
        }
        self.by_age.insert((answer.at_ms, key.clone()));
        if key.starts_with(AUTO_KEY_PREFIX) {
            self.auto_by_age.insert((answer.at_ms, key.clone()));
        }
        let auto_expiry = answer.at_ms.saturating_sub(AUTO_KEY_WINDOW_S * 1000);
        while self
            .auto_by_age
            .first()
            .is_some_and(|(at_ms, _)| *at_ms < auto_expiry)
        {
            if let Some(oldest) = self.auto_by_age.pop_first() {
                self.answers.remove(&oldest.1);
                self.by_age.remove(&oldest);
            }
        }
        self.cap(max);
    }

    /// Forget the oldest answers beyond `max` (0: no cap).
    fn cap(&mut self, max: usize) {
        while max > 0 && self.answers.len() > max {
            let Some(oldest) = self.by_age.pop_first() else {
                break;
            };
            self.answers.remove(&oldest.1);
            self.auto_by_age.remove(&oldest);
            self.forgotten += 1;
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&str, &Idempotency) -> bool) {
        let answers = &mut self.answers;
        self.by_age.retain(|(_, key)| {
            let kept = answers.get(key).is_some_and(|(_, entry)| keep(key, entry));
            if !kept {
                answers.remove(key);
            }
            kept
        });
        let answers = &self.answers;
        self.auto_by_age
            .retain(|(_, key)| answers.contains_key(key));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "record {lsn} refers to function {function}, which does not exist at that point of the log"
    )]
    UnknownFunction { lsn: Lsn, function: FunctionName },
    #[error("record {lsn} resolves transaction {txn} of {function}, which is not prepared there")]
    NotPrepared {
        lsn: Lsn,
        function: FunctionName,
        txn: TxnId,
    },
}

/// A part of a distributed transaction prepared on a function (see `Record::Prepare`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub coordinator: FunctionName,
    pub ops: Vec<Op>,
}

/// One deployed function.
pub struct Function {
    pub name: FunctionName,
    /// One transaction at a time (see `lock`).
    pub lock: TxnLock,
    meta: Mutex<Meta>,
    kv: RwLock<Map>,
    /// The bytes of every key and value in `kv` (for the state cap, `Limits`).
    kv_bytes: AtomicU64,
    /// Its answers persistent, so that a checkpoint's capture is a cheap clone.
    idempotency: Mutex<Table>,
    /// The LSN of the last commit that wrote this function: a transaction that read
    /// this state is acknowledged only once that LSN is durable.
    lsn_last_write: AtomicU64,
    /// How many commits have touched this function (writes or a remembered answer):
    /// the position in its own replicated log (`replication::Seq`).
    seq: AtomicU64,
    /// In a cluster: the epoch of the configuration its last entry was committed in
    /// (`replication::Epoch`); 0 on a single node.
    epoch_last: AtomicU64,
    /// Parts of distributed transactions prepared here and not yet resolved. While any
    /// is, no other transaction may run on the function (its writes are promised).
    prepared: Mutex<BTreeMap<TxnId, Prepared>>,
    /// As a coordinator: committed distributed transactions, with their participants,
    /// until every participant has confirmed the commit.
    decided: Mutex<BTreeMap<TxnId, Vec<FunctionName>>>,
    /// Woken whenever `prepared` loses an entry.
    resolved: tokio::sync::Notify,
    /// The LSN of the last snapshot restored into it (on a backup): the answers it
    /// brought are durable once it is.
    lsn_restored: AtomicU64,
    /// How much its guests may still log (a rate, over all its transactions).
    pub log_budget: crate::wasm::guest_log::Budget,
}

#[derive(Clone, Debug)]
pub struct Meta {
    pub deploy: Deploy,
    pub running: bool,
    pub deleted: bool,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Function {
    fn new(deploy: Deploy, running: bool) -> Function {
        Function {
            name: deploy.function.clone(),
            lock: TxnLock::default(),
            meta: Mutex::new(Meta {
                deploy,
                running,
                deleted: false,
            }),
            kv: RwLock::new(Map::new()),
            kv_bytes: AtomicU64::new(0),
            idempotency: Mutex::new(Table::default()),
            lsn_last_write: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            epoch_last: AtomicU64::new(0),
            prepared: Mutex::new(BTreeMap::new()),
            decided: Mutex::new(BTreeMap::new()),
            resolved: tokio::sync::Notify::new(),
            lsn_restored: AtomicU64::new(0),
            log_budget: Default::default(),
        }
    }

    /// The distributed transaction whose prepared part blocks this function, other
    /// than `txn`'s own, if any.
    pub fn prepared_other_than(&self, txn: TxnId) -> Option<TxnId> {
        self.prepared.lock().keys().find(|t| **t != txn).copied()
    }

    /// The parts prepared here and not yet resolved, with their coordinators.
    pub fn prepared(&self) -> Vec<(TxnId, FunctionName)> {
        self.prepared
            .lock()
            .iter()
            .map(|(t, p)| (*t, p.coordinator.clone()))
            .collect()
    }

    pub fn is_prepared(&self, txn: TxnId) -> bool {
        self.prepared.lock().contains_key(&txn)
    }

    /// As coordinator: the committed transactions not every participant has confirmed.
    pub fn decided(&self) -> Vec<(TxnId, Vec<FunctionName>)> {
        self.decided
            .lock()
            .iter()
            .map(|(t, p)| (*t, p.clone()))
            .collect()
    }

    /// Resolves after a prepared part is resolved (create it before checking
    /// `prepared_other_than`, so that no resolution is missed).
    pub fn resolution(&self) -> tokio::sync::futures::Notified<'_> {
        self.resolved.notified()
    }

    fn apply_ops(&self, ops: &[Op], lsn: Lsn) {
        let mut kv = self.kv.write();
        let (mut added, mut removed) = (0u64, 0u64);
        for op in ops {
            let old = match &op.value {
                Some(value) => {
                    added += (op.key.len() + value.len()) as u64;
                    kv.insert(
                        Bytes::copy_from_slice(&op.key),
                        Bytes::copy_from_slice(value),
                    )
                }
                None => kv.remove(op.key.as_slice()),
            };
            if let Some(old) = old {
                removed += (op.key.len() + old.len()) as u64;
            }
        }
        self.kv_bytes.fetch_add(added, Ordering::AcqRel);
        self.kv_bytes.fetch_sub(removed, Ordering::AcqRel);
        drop(kv);
        self.lsn_last_write.store(lsn.0, Ordering::Release);
    }

    /// One more entry in the function's own log, from `epoch`.
    fn count_entry(&self, epoch: u64) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.epoch_last.store(epoch, Ordering::Release);
    }

    fn capture(&self) -> FunctionCapture {
        FunctionCapture {
            meta: self.meta(),
            view: self.view(),
            idempotency: self.idempotency.lock().answers.clone(),
            seq: self.seq(),
            epoch_last: self.epoch_last(),
            prepared: self
                .prepared
                .lock()
                .iter()
                .map(|(txn, p)| Prepare {
                    function: self.name.clone(),
                    txn: *txn,
                    coordinator: p.coordinator.clone(),
                    ops: p.ops.clone(),
                    epoch: 0,
                })
                .collect(),
            decided: self.decided(),
        }
    }

    pub fn meta(&self) -> Meta {
        self.meta.lock().clone()
    }

    pub fn digest(&self) -> Digest {
        self.meta.lock().deploy.digest
    }

    /// A consistent view of the committed state (cheap: structural sharing).
    pub fn view(&self) -> Map {
        self.kv.read().clone()
    }

    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.kv.read().get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.kv.read().len()
    }

    /// The bytes of its keys and values.
    pub fn state_bytes(&self) -> u64 {
        self.kv_bytes.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last position of this function's own log (see `seq`).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// The epoch of the entry at `seq` (see `epoch_last`).
    pub fn epoch_last(&self) -> u64 {
        self.epoch_last.load(Ordering::Acquire)
    }

    pub fn lsn_last_write(&self) -> Lsn {
        Lsn(self.lsn_last_write.load(Ordering::Acquire))
    }

    /// The remembered answer for `key`, and the LSN that must be durable before it is
    /// given out, unless it is older than `expiry_ms`.
    pub fn idempotent_answer(&self, key: &str, expiry_ms: u64) -> Option<(Lsn, Idempotency)> {
        let table = self.idempotency.lock();
        let restored = Lsn(self.lsn_restored.load(Ordering::Acquire));
        table
            .answers
            .get(key)
            .filter(|(_, entry)| entry.at_ms >= expiry_ms)
            .map(|(lsn, entry)| ((*lsn).max(restored), entry.clone()))
    }

    pub fn idempotency_keys(&self) -> usize {
        self.idempotency.lock().answers.len()
    }

    /// How many answers this copy forgot, oldest first, to stay within the store's cap
    /// on answers per function (`Store::set_answers_max`) since it was loaded.
    pub fn idempotency_keys_forgotten(&self) -> u64 {
        self.idempotency.lock().forgotten
    }

    /// Forget answers older than `expiry_ms`, and answers to keys the cluster assigned
    /// itself (`AUTO_KEY_PREFIX`) older than `auto_expiry_ms`.
    pub fn expire_idempotency(&self, expiry_ms: u64, auto_expiry_ms: u64) {
        self.idempotency.lock().retain(|key, entry| {
            let expiry = if key.starts_with(AUTO_KEY_PREFIX) {
                auto_expiry_ms
            } else {
                expiry_ms
            };
            entry.at_ms >= expiry
        });
    }
}

/// A consistent capture of the store (see `Store::capture`).
pub struct Captured {
    functions: Vec<FunctionCapture>,
}

struct FunctionCapture {
    meta: Meta,
    view: Map,
    idempotency: Answers,
    seq: u64,
    epoch_last: u64,
    prepared: Vec<Prepare>,
    decided: Vec<(TxnId, Vec<FunctionName>)>,
}

impl Captured {
    /// The image of the one function captured by `Store::capture_function`, leaving
    /// out answers older than `expiry_ms` (copies everything: call it outside the
    /// function's lock, off the async threads).
    pub fn into_function_image(self, expiry_ms: u64) -> Option<FunctionImage> {
        self.into_image(Lsn::ZERO, expiry_ms)
            .functions
            .into_iter()
            .next()
    }

    /// The log position of the first function captured.
    pub fn seq(&self) -> Option<u64> {
        self.functions.first().map(|c| c.seq)
    }

    /// The snapshot image of what was captured at `lsn` (copies everything: call it
    /// outside the log's lock).
    pub fn into_image(self, lsn: Lsn, expiry_ms: u64) -> Image {
        Image {
            lsn,
            functions: self
                .functions
                .into_iter()
                .map(|c| FunctionImage {
                    deploy: c.meta.deploy,
                    running: c.meta.running,
                    entries: c
                        .view
                        .iter()
                        .map(|(k, v)| Entry {
                            key: k.to_vec(),
                            value: v.to_vec(),
                        })
                        .collect(),
                    idempotency: c
                        .idempotency
                        .values()
                        .filter(|(_, entry)| entry.at_ms >= expiry_ms)
                        .map(|(_, entry)| entry.clone())
                        .collect(),
                    seq: c.seq,
                    epoch_last: c.epoch_last,
                    prepared: c.prepared,
                    decided: c.decided,
                })
                .collect(),
        }
    }
}

/// A function's state built from a snapshot image, to be put in place by
/// `Store::put_restored`.
pub struct Restored {
    kv: Map,
    kv_bytes: u64,
    /// Answers restored with no LSN of their own: `lsn_restored` stands for them.
    idempotency: Answers,
    seq: u64,
    epoch_last: u64,
    prepared: BTreeMap<TxnId, Prepared>,
    decided: BTreeMap<TxnId, Vec<FunctionName>>,
}

impl Restored {
    /// Copies everything in `image` (for a large function, milliseconds: keep it out
    /// of the log's lock).
    pub fn of(image: &FunctionImage) -> Restored {
        Restored {
            kv: image
                .entries
                .iter()
                .map(|e| {
                    (
                        Bytes::copy_from_slice(&e.key),
                        Bytes::copy_from_slice(&e.value),
                    )
                })
                .collect(),
            kv_bytes: image
                .entries
                .iter()
                .map(|e| (e.key.len() + e.value.len()) as u64)
                .sum(),
            idempotency: image
                .idempotency
                .iter()
                .map(|entry| (entry.key.clone(), (Lsn::ZERO, entry.clone())))
                .collect(),
            seq: image.seq,
            epoch_last: image.epoch_last,
            prepared: prepared_map(&image.prepared),
            decided: image.decided.iter().cloned().collect(),
        }
    }
}

/// The bytes of the keys and values of `map`.
fn map_bytes(map: &Map) -> u64 {
    map.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
}

fn prepared_map(prepared: &[Prepare]) -> BTreeMap<TxnId, Prepared> {
    prepared
        .iter()
        .map(|p| {
            (
                p.txn,
                Prepared {
                    coordinator: p.coordinator.clone(),
                    ops: p.ops.clone(),
                },
            )
        })
        .collect()
}

/// All functions of the node.
#[derive(Debug, Default)]
pub struct Store {
    functions: RwLock<BTreeMap<FunctionName, Arc<Function>>>,
    /// At most this many remembered answers per function, the oldest forgotten first
    /// (0: no cap).
    answers_max: AtomicUsize,
}

impl Store {
    /// Cap every function's remembered answers at `max` (0: no cap), forgetting the
    /// oldest beyond it now and from now on. Every copy applies the same commits in the
    /// same order, so copies with the same cap forget the same answers.
    pub fn set_answers_max(&self, max: usize) {
        self.answers_max.store(max, Ordering::Release);
        for f in self.list() {
            f.idempotency.lock().cap(max);
        }
    }

    pub fn get(&self, name: &FunctionName) -> Option<Arc<Function>> {
        self.functions.read().get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Function>> {
        self.functions.read().values().cloned().collect()
    }

    /// Apply one logged record. Live commits call this inside `Wal::append`, recovery
    /// calls it for every replayed record: both see the same state afterwards.
    ///
    /// Fails when a record refers to a function that does not exist, which a correct
    /// log never does (a function is locked by every transaction that writes it, and
    /// deleting it takes that lock).
    pub fn apply(&self, lsn: Lsn, record: &Record) -> Result<(), Error> {
        let unknown = |function: &FunctionName| Error::UnknownFunction {
            lsn,
            function: function.clone(),
        };
        match record {
            Record::Deploy(deploy) => {
                let mut functions = self.functions.write();
                match functions.get(&deploy.function) {
                    Some(existing) => existing.meta.lock().deploy = deploy.clone(),
                    None => {
                        functions.insert(
                            deploy.function.clone(),
                            Arc::new(Function::new(deploy.clone(), true)),
                        );
                    }
                }
            }
            Record::Delete { function } => {
                let removed = self
                    .functions
                    .write()
                    .remove(function)
                    .ok_or_else(|| unknown(function))?;
                removed.meta.lock().deleted = true;
            }
            Record::SetRunning { function, running } => {
                let f = self.get(function).ok_or_else(|| unknown(function))?;
                f.meta.lock().running = *running;
            }
            Record::Restore(image) => {
                self.put_restored(lsn, &image.deploy.function, Restored::of(image))?;
            }
            Record::Prepare(p) => {
                let f = self.get(&p.function).ok_or_else(|| unknown(&p.function))?;
                f.prepared.lock().insert(
                    p.txn,
                    Prepared {
                        coordinator: p.coordinator.clone(),
                        ops: p.ops.clone(),
                    },
                );
                f.count_entry(p.epoch);
            }
            Record::Resolved(r) => {
                let f = self.get(&r.function).ok_or_else(|| unknown(&r.function))?;
                let prepared = f.prepared.lock().remove(&r.txn).ok_or(Error::NotPrepared {
                    lsn,
                    function: r.function.clone(),
                    txn: r.txn,
                })?;
                if r.commit {
                    f.apply_ops(&prepared.ops, lsn);
                }
                f.count_entry(r.epoch);
                f.resolved.notify_waiters();
            }
            Record::End(e) => {
                let f = self.get(&e.function).ok_or_else(|| unknown(&e.function))?;
                f.decided.lock().remove(&e.txn);
                f.count_entry(e.epoch);
            }
            Record::Commit(commit) => {
                for writes in &commit.writes {
                    let f = self
                        .get(&writes.function)
                        .ok_or_else(|| unknown(&writes.function))?;
                    f.apply_ops(&writes.ops, lsn);
                }
                if let Some(decision) = &commit.decision {
                    let f = self
                        .get(&decision.coordinator)
                        .ok_or_else(|| unknown(&decision.coordinator))?;
                    f.decided
                        .lock()
                        .insert(commit.txn, decision.participants.clone());
                }
                if let Some(idem) = &commit.idempotency {
                    let f = self
                        .get(&idem.function)
                        .ok_or_else(|| unknown(&idem.function))?;
                    let max = self.answers_max.load(Ordering::Acquire);
                    f.idempotency.lock().remember(lsn, idem, max);
                }
                // Each function touched gets one more entry in its own log.
                let touched = commit
                    .writes
                    .iter()
                    .map(|w| &w.function)
                    .chain(commit.idempotency.as_ref().map(|i| &i.function))
                    .chain(commit.decision.as_ref().map(|d| &d.coordinator));
                let mut counted: Vec<&FunctionName> = Vec::with_capacity(commit.writes.len() + 2);
                for name in touched {
                    if counted.contains(&name) {
                        continue;
                    }
                    counted.push(name);
                    if let Some(f) = self.get(name) {
                        f.seq.fetch_add(1, Ordering::AcqRel);
                    }
                }
                for e in &commit.epochs {
                    if let Some(f) = self.get(&e.function) {
                        f.epoch_last.store(e.epoch, Ordering::Release);
                    }
                }
            }
        }
        Ok(())
    }

    /// One function, captured for a backup's catch-up (clones of persistent maps:
    /// microseconds). Consistent only if no commit to it runs meanwhile: the caller
    /// holds its lock. `Captured::into_function_image` makes the image, outside it.
    pub fn capture_function(&self, name: &FunctionName) -> Option<Captured> {
        let f = self.get(name)?;
        Some(Captured {
            functions: vec![f.capture()],
        })
    }

    /// Put `state` (restored from a snapshot) in place as `function`'s, at `lsn` (the
    /// `Restore` record's): only swaps, so it can run under the log's lock while
    /// `Restored::of`, which copies everything, does not.
    pub fn put_restored(
        &self,
        lsn: Lsn,
        function: &FunctionName,
        state: Restored,
    ) -> Result<(), Error> {
        let f = self.get(function).ok_or_else(|| Error::UnknownFunction {
            lsn,
            function: function.clone(),
        })?;
        f.kv_bytes.store(state.kv_bytes, Ordering::Release);
        *f.kv.write() = state.kv;
        let mut table = Table::of(state.idempotency);
        table.cap(self.answers_max.load(Ordering::Acquire));
        *f.idempotency.lock() = table;
        f.lsn_restored.store(lsn.0, Ordering::Release);
        f.lsn_last_write.store(lsn.0, Ordering::Release);
        f.seq.store(state.seq, Ordering::Release);
        f.epoch_last.store(state.epoch_last, Ordering::Release);
        *f.prepared.lock() = state.prepared;
        *f.decided.lock() = state.decided;
        f.resolved.notify_waiters();
        Ok(())
    }

    /// What a snapshot needs, captured while the log holds appends off: only clones of
    /// persistent maps, so it takes microseconds whatever the size of the state.
    pub fn capture(&self) -> Captured {
        let functions = self.functions.read();
        Captured {
            functions: functions.values().map(|f| f.capture()).collect(),
        }
    }

    /// Everything, as of `lsn`, leaving out answers older than `expiry_ms`.
    pub fn image(&self, lsn: Lsn, expiry_ms: u64) -> Image {
        self.capture().into_image(lsn, expiry_ms)
    }

    /// A store holding what `image` holds.
    pub fn from_image(image: Image) -> Store {
        let store = Store::default();
        for fi in image.functions {
            let mut f = Function::new(fi.deploy, fi.running);
            *f.kv.get_mut() = fi
                .entries
                .into_iter()
                .map(|e| (Bytes::from(e.key), Bytes::from(e.value)))
                .collect();
            *f.kv_bytes.get_mut() = map_bytes(f.kv.get_mut());
            *f.idempotency.get_mut() = Table::of(
                fi.idempotency
                    .into_iter()
                    .map(|entry| (entry.key.clone(), (image.lsn, entry)))
                    .collect(),
            );
            f.lsn_last_write.store(image.lsn.0, Ordering::Release);
            *f.seq.get_mut() = fi.seq;
            *f.epoch_last.get_mut() = fi.epoch_last;
            *f.prepared.get_mut() = prepared_map(&fi.prepared);
            *f.decided.get_mut() = fi.decided.into_iter().collect();
            store.functions.write().insert(f.name.clone(), Arc::new(f));
        }
        store
    }

    /// A digest of one function's state, for comparing replicas and checking recovery.
    pub fn state_digest(&self, name: &FunctionName) -> Option<Digest> {
        use sha2::Digest as _;
        let f = self.get(name)?;
        let mut hasher = sha2::Sha256::new();
        for (k, v) in f.view().iter() {
            hasher.update((k.len() as u64).to_le_bytes());
            hasher.update(k);
            hasher.update((v.len() as u64).to_le_bytes());
            hasher.update(v);
        }
        Some(Digest(hasher.finalize().into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TxnId;
    use crate::wal::record::{Commit, Idempotency, Op, Outcome, Writes};

    fn name(s: &str) -> FunctionName {
        FunctionName::new(s).expect("valid")
    }

    fn deploy(s: &str) -> Record {
        Record::Deploy(Deploy {
            function: name(s),
            digest: Digest([1; 32]),
            version: 1,
            at_ms: 0,
            calls: Default::default(),
        })
    }

    fn writes(f: &str, key: &[u8]) -> Writes {
        Writes {
            function: name(f),
            ops: vec![Op {
                key: key.to_vec(),
                value: Some(b"v".to_vec()),
            }],
        }
    }

    #[test]
    fn each_commit_advances_the_seq_of_every_function_it_touches_once() {
        let store = Store::default();
        store.apply(Lsn(1), &deploy("a")).expect("deploy");
        store.apply(Lsn(2), &deploy("b")).expect("deploy");
        let both = Record::Commit(Commit {
            txn: TxnId(1),
            writes: vec![writes("a", b"x"), writes("b", b"y")],
            idempotency: None,
            epochs: Vec::new(),
            decision: None,
        });
        store.apply(Lsn(3), &both).expect("commit");
        let answer_only = Record::Commit(Commit {
            txn: TxnId(2),
            writes: vec![],
            idempotency: Some(Idempotency {
                function: name("a"),
                request: None,
                key: "k".into(),
                outcome: Outcome::Ok(vec![]),
                at_ms: 0,
            }),
            epochs: Vec::new(),
            decision: None,
        });
        store.apply(Lsn(4), &answer_only).expect("commit");
        let a = store.get(&name("a")).expect("a");
        let b = store.get(&name("b")).expect("b");
        assert_eq!((a.seq(), b.seq()), (2, 1));

        let restored = Store::from_image(store.image(Lsn(4), 0));
        assert_eq!(
            restored.get(&name("a")).expect("a").seq(),
            2,
            "the seq survives a snapshot"
        );
        assert_eq!(
            restored.state_digest(&name("b")),
            store.state_digest(&name("b"))
        );
    }

    /// A backup's catch-up: the image of one function restored into another store
    /// holds its state and answers, and an answer it brought is given out only once the
    /// `Restore` record is durable (not at the LSN it had on the primary).
    #[test]
    fn a_restored_function_holds_the_image_and_its_answers_wait_for_the_restore() {
        let primary = Store::default();
        primary.apply(Lsn(1), &deploy("a")).expect("deploy");
        let commit = Record::Commit(Commit {
            txn: TxnId(1),
            writes: vec![writes("a", b"x")],
            idempotency: Some(Idempotency {
                function: name("a"),
                request: None,
                key: "k".into(),
                outcome: Outcome::Ok(b"done".to_vec()),
                at_ms: 10,
            }),
            epochs: Vec::new(),
            decision: None,
        });
        primary.apply(Lsn(2), &commit).expect("commit");
        let image = primary
            .capture_function(&name("a"))
            .expect("a")
            .into_function_image(0)
            .expect("one function");

        let backup = Store::default();
        backup.apply(Lsn(1), &deploy("a")).expect("deploy");
        backup
            .apply(Lsn(7), &Record::Restore(Box::new(image)))
            .expect("restore");
        assert_eq!(
            backup.state_digest(&name("a")),
            primary.state_digest(&name("a"))
        );
        let a = backup.get(&name("a")).expect("a");
        assert_eq!(a.seq(), 1);
        let (lsn, answer) = a.idempotent_answer("k", 0).expect("the answer came along");
        assert_eq!(answer.outcome, Outcome::Ok(b"done".to_vec()));
        assert_eq!(lsn, Lsn(7), "durable with the Restore record, not before");
        assert!(a.idempotent_answer("k", 11).is_none(), "expired by then");
    }

    fn answered(txn: u64, key: &str, at_ms: u64) -> Record {
        Record::Commit(Commit {
            txn: TxnId(txn),
            writes: vec![],
            idempotency: Some(Idempotency {
                function: name("a"),
                request: None,
                key: key.into(),
                outcome: Outcome::Ok(key.as_bytes().to_vec()),
                at_ms,
            }),
            epochs: Vec::new(),
            decision: None,
        })
    }

    /// The cap on remembered answers: beyond it the oldest are forgotten first, a copy
    /// that applies the same commits forgets the same ones, and a snapshot restored
    /// where the cap is lower keeps only the newest.
    #[test]
    fn answers_beyond_the_cap_are_forgotten_oldest_first_alike_on_every_copy() {
        let keys = |store: &Store| {
            let a = store.get(&name("a")).expect("a");
            let mut kept: Vec<String> = ["k1", "k2", "k3", "k4", "k5", "k6"]
                .iter()
                .filter(|k| a.idempotent_answer(k, 0).is_some())
                .map(|k| k.to_string())
                .collect();
            kept.sort();
            kept
        };
        let primary = Store::default();
        let backup = Store::default();
        for store in [&primary, &backup] {
            store.set_answers_max(3);
            store.apply(Lsn(1), &deploy("a")).expect("deploy");
        }
        // Out of order in time once (k3 before k2): age is the commit's time.
        let commits = [("k1", 10), ("k3", 30), ("k2", 20), ("k4", 40), ("k5", 50)];
        for (i, (key, at_ms)) in commits.iter().enumerate() {
            for store in [&primary, &backup] {
                store
                    .apply(Lsn(2 + i as u64), &answered(1 + i as u64, key, *at_ms))
                    .expect("commit");
            }
        }
        assert_eq!(keys(&primary), ["k3", "k4", "k5"]);
        assert_eq!(keys(&backup), keys(&primary));
        let a = primary.get(&name("a")).expect("a");
        assert_eq!(
            (a.idempotency_keys(), a.idempotency_keys_forgotten()),
            (3, 2)
        );
        assert_eq!(
            primary.state_digest(&name("a")),
            backup.state_digest(&name("a"))
        );

        // A key answered again (after its answer expired) is one answer, now young.
        primary
            .apply(Lsn(9), &answered(9, "k3", 60))
            .expect("commit");
        primary
            .apply(Lsn(10), &answered(10, "k6", 70))
            .expect("commit");
        assert_eq!(keys(&primary), ["k3", "k5", "k6"]);

        let image = primary
            .capture_function(&name("a"))
            .expect("a")
            .into_function_image(0)
            .expect("one function");
        let smaller = Store::default();
        smaller.set_answers_max(2);
        smaller.apply(Lsn(1), &deploy("a")).expect("deploy");
        smaller
            .apply(Lsn(2), &Record::Restore(Box::new(image)))
            .expect("restore");
        assert_eq!(keys(&smaller), ["k3", "k6"]);

        // The cluster's own keys go once older than their window before the newest
        // answer, whatever the cap.
        let auto = Store::default();
        auto.apply(Lsn(1), &deploy("a")).expect("deploy");
        let window = AUTO_KEY_WINDOW_S * 1000;
        auto.apply(Lsn(2), &answered(1, "auto:1", 1_000))
            .expect("commit");
        auto.apply(Lsn(3), &answered(2, "client", 1_001))
            .expect("commit");
        auto.apply(Lsn(4), &answered(3, "auto:2", 1_000 + window))
            .expect("commit");
        let a = auto.get(&name("a")).expect("a");
        assert!(
            a.idempotent_answer("auto:1", 0).is_some(),
            "not older than its window yet"
        );
        auto.apply(Lsn(5), &answered(4, "auto:3", 1_001 + window))
            .expect("commit");
        assert!(
            a.idempotent_answer("auto:1", 0).is_none(),
            "older than its window"
        );
        assert!(
            a.idempotent_answer("client", 0).is_some(),
            "a client's key stays"
        );
        assert_eq!(
            (a.idempotency_keys(), a.idempotency_keys_forgotten()),
            (3, 0)
        );

        // Expiry by time still applies, and keeps the order consistent.
        primary
            .get(&name("a"))
            .expect("a")
            .expire_idempotency(65, 0);
        assert_eq!(keys(&primary), ["k6"]);
        primary
            .apply(Lsn(11), &answered(11, "k1", 80))
            .expect("commit");
        primary
            .apply(Lsn(12), &answered(12, "k2", 90))
            .expect("commit");
        primary
            .apply(Lsn(13), &answered(13, "k4", 100))
            .expect("commit");
        assert_eq!(keys(&primary), ["k1", "k2", "k4"]);
    }

    /// The bytes of a function's state (what `limits.state_bytes_max` caps) follow
    /// inserts, overwrites and deletes, and survive a snapshot and a restore.
    #[test]
    fn state_bytes_follow_every_write_and_survive_a_snapshot() {
        let store = Store::default();
        store.apply(Lsn(1), &deploy("a")).expect("deploy");
        let commit = |txn: u64, ops: Vec<Op>| {
            Record::Commit(Commit {
                txn: TxnId(txn),
                writes: vec![Writes {
                    function: name("a"),
                    ops,
                }],
                idempotency: None,
                epochs: Vec::new(),
                decision: None,
            })
        };
        let put = |k: &[u8], v: &[u8]| Op {
            key: k.to_vec(),
            value: Some(v.to_vec()),
        };
        let a = store.get(&name("a")).expect("a");
        store
            .apply(
                Lsn(2),
                &commit(1, vec![put(b"k1", b"12345"), put(b"k2", b"1")]),
            )
            .expect("commit");
        assert_eq!(a.state_bytes(), 2 + 5 + 2 + 1);
        store
            .apply(Lsn(3), &commit(2, vec![put(b"k1", b"12")]))
            .expect("commit");
        assert_eq!(
            a.state_bytes(),
            2 + 2 + 2 + 1,
            "an overwrite counts the new value"
        );
        let delete = Op {
            key: b"k2".to_vec(),
            value: None,
        };
        let absent = Op {
            key: b"nope".to_vec(),
            value: None,
        };
        store
            .apply(Lsn(4), &commit(3, vec![delete, absent]))
            .expect("commit");
        assert_eq!(a.state_bytes(), 4);
        let restored = Store::from_image(store.image(Lsn(4), 0));
        assert_eq!(restored.get(&name("a")).expect("a").state_bytes(), 4);
        let image = store
            .capture_function(&name("a"))
            .expect("a")
            .into_function_image(0)
            .expect("one function");
        let backup = Store::default();
        backup.apply(Lsn(1), &deploy("a")).expect("deploy");
        backup
            .apply(Lsn(2), &Record::Restore(Box::new(image)))
            .expect("restore");
        assert_eq!(backup.get(&name("a")).expect("a").state_bytes(), 4);
    }

    #[test]
    fn a_commit_for_an_unknown_function_is_an_error_not_a_panic() {
        let store = Store::default();
        let record = Record::Commit(Commit {
            txn: TxnId(1),
            writes: vec![writes("ghost", b"x")],
            idempotency: None,
            epochs: Vec::new(),
            decision: None,
        });
        assert!(matches!(
            store.apply(Lsn(1), &record),
            Err(Error::UnknownFunction { .. })
        ));
    }
}
