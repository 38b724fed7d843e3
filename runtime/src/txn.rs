//! A transaction in progress: the functions it has locked and what it has written to
//! each, read through the write set onto the committed state. Shared by every store
//! (instance) that takes part in it, so a callee sees its caller's writes to shared
//! functions and commits or aborts with it.
//!
//! **Invariant:** `txn` never touches the network or the disk, and never blocks: the
//! waiting (for locks, for durability) is done by `node`.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::ids::{FunctionName, TxnId};
use crate::store::Function;
use crate::wal::record::{Op, Writes};

/// Bounds on what one transaction may do, checked at every write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub key_len_max: usize,
    pub value_len_max: usize,
    pub writes_max: usize,
    pub write_bytes_max: usize,
    pub scan_limit_max: u32,
    /// A function's state: at most this many keys, and this many bytes of keys and
    /// values. A transaction that would grow it past either is aborted (`state-full`);
    /// one that shrinks it or keeps its size commits, even over a lowered cap.
    pub state_keys_max: usize,
    pub state_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            key_len_max: 4 << 10,
            value_len_max: 1 << 20,
            writes_max: 10_000,
            write_bytes_max: 16 << 20,
            scan_limit_max: 10_000,
            state_keys_max: 5_000_000,
            state_bytes_max: 512 << 20,
        }
    }
}

/// A function whose state a transaction would grow past its cap (see `Limits`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct StateFull(pub String);

/// A limit a guest ran into: answered to the guest as an error it can handle.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct LimitExceeded(pub String);

type WriteSet = BTreeMap<Bytes, Option<Bytes>>;

/// A transaction's writes at one moment (see `Txn::savepoint`).
#[derive(Debug)]
pub struct Savepoint {
    writes: BTreeMap<FunctionName, WriteSet>,
    write_count: usize,
    write_bytes: usize,
}

pub struct Txn {
    pub id: TxnId,
    /// The id of the transaction's first attempt: its age for wait-die.
    pub age: TxnId,
    pub deadline: Instant,
    /// In a cluster: the function whose primary coordinates the transaction (the one
    /// it began on).
    pub coordinator: Option<FunctionName>,
    /// Whether this is the coordinator's own transaction (not a part of one run for a
    /// caller on another node).
    pub home: bool,
    /// In a cluster: functions this transaction touched anywhere (on other primaries,
    /// as their answers reported; or before this part, as the caller reported), and
    /// whether it wrote to them.
    elsewhere: BTreeMap<FunctionName, bool>,
    /// Calls made to functions on other nodes so far (a callee that fails after one
    /// cannot be undone alone).
    pub remote_calls: u64,
    limits: Limits,
    /// Functions locked by this transaction, in the order they were locked.
    held: Vec<Arc<Function>>,
    writes: BTreeMap<FunctionName, WriteSet>,
    write_count: usize,
    write_bytes: usize,
    /// Bytes its guests have logged on this node (capped by `wasm::guest_log`).
    pub log_bytes: usize,
    /// Set when the transaction has ended (its locks released): a straggling callee must
    /// not take new locks in its name.
    finished: bool,
}

impl std::fmt::Debug for Txn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("id", &self.id)
            .field("writes", &self.write_count)
            .finish_non_exhaustive()
    }
}

impl Txn {
    pub fn new(id: TxnId, age: TxnId, deadline: Instant, limits: Limits) -> Txn {
        Txn {
            id,
            age,
            deadline,
            coordinator: None,
            home: false,
            elsewhere: BTreeMap::new(),
            remote_calls: 0,
            limits,
            held: Vec::new(),
            writes: BTreeMap::new(),
            write_count: 0,
            write_bytes: 0,
            log_bytes: 0,
            finished: false,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn holds(&self, name: &FunctionName) -> bool {
        self.held.iter().any(|f| &f.name == name)
    }

    /// Record that this transaction now holds `function`'s lock.
    pub fn add_held(&mut self, function: Arc<Function>) {
        if !self.holds(&function.name) {
            self.held.push(function);
        }
    }

    /// The functions whose locks must be released when the transaction ends.
    pub fn take_held(&mut self) -> Vec<Arc<Function>> {
        self.finished = true;
        std::mem::take(&mut self.held)
    }

    pub fn held(&self) -> &[Arc<Function>] {
        &self.held
    }

    /// Note functions the transaction touched elsewhere (see `elsewhere`): a write
    /// reported once stays reported.
    pub fn note_elsewhere(&mut self, touched: impl IntoIterator<Item = (FunctionName, bool)>) {
        for (name, wrote) in touched {
            *self.elsewhere.entry(name).or_default() |= wrote;
        }
    }

    /// Whether the transaction touched `name` before, somewhere: if it does not hold it
    /// here, the part that did was lost (a failover, or it expired).
    pub fn touched_before(&self, name: &FunctionName) -> bool {
        self.elsewhere.contains_key(name)
    }

    /// Every function the transaction has touched, here and elsewhere, and whether it
    /// wrote to it: what a part reports to its caller, and passes to its callees.
    pub fn touched(&self) -> Vec<(FunctionName, bool)> {
        let mut all = self.elsewhere.clone();
        for f in &self.held {
            let wrote = self.writes.get(&f.name).is_some_and(|ws| !ws.is_empty());
            *all.entry(f.name.clone()).or_default() |= wrote;
        }
        all.into_iter().collect()
    }

    /// Functions touched on other primaries and not held here, and whether it wrote to
    /// them: the other parts of the transaction.
    pub fn parts_elsewhere(&self) -> Vec<(FunctionName, bool)> {
        self.elsewhere
            .iter()
            .filter(|(name, _)| !self.holds(name))
            .map(|(name, wrote)| (name.clone(), *wrote))
            .collect()
    }

    /// Give up `name`: its lock (returned, for the caller to release) and its writes,
    /// as log ops in key order. None if this transaction does not hold it.
    pub fn take_function(&mut self, name: &FunctionName) -> Option<(Arc<Function>, Vec<Op>)> {
        let at = self.held.iter().position(|f| &f.name == name)?;
        let f = self.held.remove(at);
        let ops = self
            .writes
            .remove(name)
            .map(|ws| {
                ws.into_iter()
                    .map(|(k, v)| Op {
                        key: k.to_vec(),
                        value: v.map(|v| v.to_vec()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some((f, ops))
    }

    pub fn get(&self, function: &Function, key: &[u8]) -> Option<Bytes> {
        match self.writes.get(&function.name).and_then(|ws| ws.get(key)) {
            Some(written) => written.clone(),
            None => function.get(key),
        }
    }

    /// Fails when the key or value is too large or the transaction wrote too much.
    pub fn put(
        &mut self,
        function: &Function,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), LimitExceeded> {
        if value.len() > self.limits.value_len_max {
            return Err(LimitExceeded(format!(
                "value of {} bytes exceeds the limit of {} bytes",
                value.len(),
                self.limits.value_len_max
            )));
        }
        self.write(function, key, Some(Bytes::copy_from_slice(value)))
    }

    pub fn delete(&mut self, function: &Function, key: &[u8]) -> Result<(), LimitExceeded> {
        self.write(function, key, None)
    }

    fn write(
        &mut self,
        function: &Function,
        key: &[u8],
        value: Option<Bytes>,
    ) -> Result<(), LimitExceeded> {
        let limits = self.limits;
        if key.len() > limits.key_len_max {
            return Err(LimitExceeded(format!(
                "key of {} bytes exceeds the limit of {} bytes",
                key.len(),
                limits.key_len_max
            )));
        }
        if self.write_count >= limits.writes_max {
            return Err(LimitExceeded(format!(
                "a transaction may make at most {} writes",
                limits.writes_max
            )));
        }
        let size = key.len() + value.as_ref().map_or(0, |v| v.len());
        if self.write_bytes + size > limits.write_bytes_max {
            return Err(LimitExceeded(format!(
                "a transaction may write at most {} bytes",
                limits.write_bytes_max
            )));
        }
        self.write_count += 1;
        self.write_bytes += size;
        self.writes
            .entry(function.name.clone())
            .or_default()
            .insert(Bytes::copy_from_slice(key), value);
        Ok(())
    }

    /// Entries of `function` with `start <= key < end` in key order, at most `limit`
    /// (itself capped by `Limits::scan_limit_max`), as this transaction sees them.
    pub fn scan(
        &self,
        function: &Function,
        start: &[u8],
        end: Option<&[u8]>,
        limit: u32,
    ) -> Vec<(Bytes, Bytes)> {
        let limit = limit.min(self.limits.scan_limit_max) as usize;
        let upper = match end {
            Some(end) if end <= start => return Vec::new(),
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        let range = (Bound::Included(start), upper);
        let view = function.view();
        let mut committed = view.range::<_, [u8]>(range).peekable();
        let empty = WriteSet::new();
        let ws = self.writes.get(&function.name).unwrap_or(&empty);
        let mut written = ws.range::<[u8], _>(range).peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let order = match (committed.peek(), written.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((ck, _)), Some((wk, _))) => ck.as_ref().cmp(wk.as_ref()),
            };
            if order == std::cmp::Ordering::Less {
                let (k, v) = committed.next().expect("peeked");
                out.push((k.clone(), v.clone()));
                continue;
            }
            if order == std::cmp::Ordering::Equal {
                committed.next(); // Overwritten or deleted by this transaction.
            }
            let (k, v) = written.next().expect("peeked");
            if let Some(v) = v {
                out.push((k.clone(), v.clone()));
            }
        }
        out
    }

    /// The write state now, to return to if a callee aborts.
    pub fn savepoint(&self) -> Savepoint {
        Savepoint {
            writes: self.writes.clone(),
            write_count: self.write_count,
            write_bytes: self.write_bytes,
        }
    }

    /// Forget every write made since `savepoint` (a callee returned its own error).
    pub fn rollback_to(&mut self, savepoint: Savepoint) {
        self.writes = savepoint.writes;
        self.write_count = savepoint.write_count;
        self.write_bytes = savepoint.write_bytes;
    }

    /// Whether committing would grow the state of a function it wrote here past
    /// `Limits::state_keys_max` or `state_bytes_max` (call it holding the locks, so
    /// that the committed state it compares with does not move).
    pub fn check_state_caps(&self) -> Result<(), StateFull> {
        let size = |k: &Bytes, v: Option<&Bytes>| v.map_or(0, |v| (k.len() + v.len()) as i64);
        for f in &self.held {
            let Some(ws) = self.writes.get(&f.name) else {
                continue;
            };
            let (mut keys, mut bytes) = (0i64, 0i64);
            for (k, v) in ws {
                let old = f.get(k);
                keys += i64::from(v.is_some()) - i64::from(old.is_some());
                bytes += size(k, v.as_ref()) - size(k, old.as_ref());
            }
            let keys_after = f.len() as i64 + keys;
            let bytes_after = f.state_bytes() as i64 + bytes;
            if keys > 0 && keys_after > self.limits.state_keys_max as i64 {
                return Err(StateFull(format!(
                    "the state of {} would hold {keys_after} keys, over its cap of {} (limits.state_keys_max)",
                    f.name, self.limits.state_keys_max
                )));
            }
            if bytes > 0 && bytes_after > self.limits.state_bytes_max as i64 {
                return Err(StateFull(format!(
                    "the state of {} would hold {bytes_after} bytes, over its cap of {} (limits.state_bytes_max)",
                    f.name, self.limits.state_bytes_max
                )));
            }
        }
        Ok(())
    }

    /// The write sets as log records, one per function, in key order.
    pub fn writes(&self) -> Vec<Writes> {
        self.writes
            .iter()
            .map(|(function, ws)| Writes {
                function: function.clone(),
                ops: ws
                    .iter()
                    .map(|(k, v)| Op {
                        key: k.to_vec(),
                        value: v.as_ref().map(|v| v.to_vec()),
                    })
                    .collect(),
            })
            .collect()
    }
}
