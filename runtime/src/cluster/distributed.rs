//! Distributed transactions on this node: the driver of `crate::twophase`.
//!
//! A transaction that calls a function whose primary is on another node sends it a
//! `Part` call; that node runs the callee inside a *part* of the transaction (a `Txn`
//! of its own, keyed by the transaction's id, holding the locks and write sets of the
//! functions it touched there), and answers with every function the transaction has
//! touched so far. Calls nest and may come back (a part found by id is reused), and the
//! transaction's thread of control is single, so every answer carries what the caller
//! needs to know about its callees.
//!
//! When the handler returns, the coordinator (this node's primary of the function the
//! transaction began on) runs two-phase commit with presumed abort over the functions
//! it wrote elsewhere; parts that only read are released at once. Each function this
//! node is primary of has a `Slot`: its coordinator and participant state machines,
//! tied to one `PrimaryCopy` (one epoch). A new copy gets a new slot, rebuilt from what
//! the function's log holds (PREPARE records without an outcome, COMMIT decisions
//! without an END) once that copy's backups hold it too: this is how a promoted backup
//! finishes or rolls back the transactions that were in flight.
//!
//! Isolation while prepared lives in the store (`Function::prepared_other_than`): no
//! other transaction runs on a function while a part prepared there is unresolved, on
//! whichever node is its primary. Role changes take only the function's lock, so an
//! in-doubt transaction never holds up a failover.
//!
//! **Invariant:** a part's writes enter the function's log only as a PREPARE record
//! written under the part's lock on it, and are applied only by a commit outcome.
//! **Invariant:** a commit decision is sent only once the COMMIT record is released
//! (held by every backup of the coordinator's epoch); a slot is rebuilt from the log
//! only once the copy's backups hold everything in it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::cluster::replica::PrimaryCopy;
use crate::cluster::wire::{self, Entry, Invoke, InvokeReply, Kind, PartCall};
use crate::cluster::Cluster;
use crate::ids::{FunctionName, TxnId};
use crate::node::{InvokeError, Node};
use crate::twophase::{self, coordinator, participant, records, Message};
use crate::txn::Txn;
use crate::wasm::GuestError;

/// How often the state machines' timers run and expired parts are dropped.
const TICK: Duration = Duration::from_millis(10);
/// Two-phase-commit messages in flight at once; beyond that they are dropped (every
/// message is sent again until it is answered).
const SENDS_MAX: usize = 1024;
/// How long a message may take to be taken by its peer.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// A part none of whose functions was prepared this long after its transaction's
/// deadline is dropped: by then the coordinator has aborted (its prepare timeout).
const PART_GRACE: Duration =
    Duration::from_millis(coordinator::PREPARE_TIMEOUT.as_millis() as u64 + 1000);
/// How long a coordinator waits for its function's slot to be ready.
const SLOT_WAIT: Duration = Duration::from_millis(200);
/// The longest deadline a transaction may have (`wasm.deadline_ms` is at most an hour).
const DEADLINE_MS_MAX: u64 = 3_600_000;
/// In-doubt transactions remembered for status and drills.
const IN_DOUBT_LOG_MAX: usize = 256;

/// What the prepare round decided for a waiting transaction.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every participant prepared: write the COMMIT record, then call `logged`.
    Commit,
    Abort,
}

/// An in-doubt transaction found by a promoted copy, and how it ended.
#[derive(Clone, Debug, Serialize)]
pub struct InDoubt {
    pub function: String,
    pub txn: u64,
    pub commit: bool,
    /// From the copy's promotion (its slot's opening) to the outcome.
    pub ms: f64,
    pub at_ms: u64,
}

struct Part {
    txn: Arc<Mutex<Txn>>,
    /// The coordinator's own transaction (registered while it calls out, so that calls
    /// coming back find it); never expires here.
    home: bool,
    expires: Instant,
}

struct Slot {
    copy: Arc<PrimaryCopy>,
    coordinator: twophase::Coordinator<FunctionName>,
    participant: twophase::Participant<FunctionName>,
    waiters: HashMap<TxnId, oneshot::Sender<Verdict>>,
    /// Prepared parts found in the log when the slot opened, and when.
    in_doubt: HashMap<TxnId, Instant>,
}

enum Cmd {
    C(coordinator::Command<FunctionName>),
    P(participant::Command<FunctionName>),
}

/// This node's distributed transactions.
pub struct Distributed {
    node: Node,
    cluster: Weak<Cluster>,
    parts: Mutex<HashMap<TxnId, Part>>,
    slots: Mutex<HashMap<FunctionName, Slot>>,
    opening: Mutex<HashSet<FunctionName>>,
    sends: Arc<tokio::sync::Semaphore>,
    in_doubt_log: Mutex<VecDeque<InDoubt>>,
}

impl Distributed {
    pub fn new(node: Node, cluster: Weak<Cluster>) -> Arc<Distributed> {
        let d = Arc::new(Distributed {
            node,
            cluster,
            parts: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashSet::new()),
            sends: Arc::new(tokio::sync::Semaphore::new(SENDS_MAX)),
            in_doubt_log: Mutex::new(VecDeque::new()),
        });
        let weak = Arc::downgrade(&d);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(d) => d.tick(),
                    None => return,
                }
            }
        });
        d
    }

    /// In-doubt transactions found by promoted copies here, and how each ended.
    pub fn in_doubt(&self) -> Vec<InDoubt> {
        self.in_doubt_log.lock().iter().cloned().collect()
    }

    /// The in-doubt transactions held here now: found prepared by a promoted copy, their
    /// outcome not yet known. Function, transaction and how long ago it was found, in ms.
    pub fn in_doubt_held(&self) -> Vec<(String, u64, f64)> {
        let slots = self.slots.lock();
        let mut held: Vec<(String, u64, f64)> = slots
            .iter()
            .flat_map(|(function, slot)| {
                slot.in_doubt.iter().map(move |(txn, found)| {
                    (
                        function.to_string(),
                        txn.0,
                        found.elapsed().as_secs_f64() * 1000.0,
                    )
                })
            })
            .collect();
        held.sort_by_key(|h| h.1);
        held
    }

    /// Counts for status: parts held here, slots, transactions being coordinated.
    pub fn status(&self) -> serde_json::Value {
        let held: Vec<serde_json::Value> = self
            .in_doubt_held()
            .into_iter()
            .map(|(function, txn, ms)| serde_json::json!({ "function": function, "txn": txn, "held_ms": ms }))
            .collect();
        let slots = self.slots.lock();
        serde_json::json!({
            "parts": self.parts.lock().len(),
            "coordinating": slots.values().map(|s| s.coordinator.in_flight()).sum::<usize>(),
            "prepared": slots.values().map(|s| s.participant.unresolved().count()).sum::<usize>(),
            "in_doubt": self.in_doubt(),
            "in_doubt_held": held,
        })
    }

    fn primary(&self, function: &FunctionName) -> Option<Arc<PrimaryCopy>> {
        self.cluster.upgrade()?.replicas().primary(function)
    }

    // ---- Parts ----

    /// The part of `txn` here, if any.
    pub fn part(&self, txn: TxnId) -> Option<Arc<Mutex<Txn>>> {
        self.parts.lock().get(&txn).map(|p| p.txn.clone())
    }

    /// Register the coordinator's own transaction, so that calls coming back to this
    /// node join it (until `forget_home`).
    pub fn register_home(&self, txn: &Arc<Mutex<Txn>>) {
        let id = txn.lock().id;
        self.parts.lock().entry(id).or_insert_with(|| Part {
            txn: txn.clone(),
            home: true,
            expires: Instant::now(),
        });
    }

    pub fn forget_home(&self, txn: TxnId) {
        let mut parts = self.parts.lock();
        if parts.get(&txn).is_some_and(|p| p.home) {
            parts.remove(&txn);
        }
    }

    /// The part of `call`'s transaction here, made if this is its first call here.
    pub fn join(&self, call: &PartCall, limits: crate::txn::Limits) -> Arc<Mutex<Txn>> {
        // From the network: bounded (no deadline is longer than an hour) before use.
        let deadline =
            Instant::now() + Duration::from_millis(call.deadline_ms.min(DEADLINE_MS_MAX));
        let mut parts = self.parts.lock();
        let part = parts.entry(call.txn).or_insert_with(|| {
            let mut txn = Txn::new(call.txn, call.age, deadline, limits);
            txn.coordinator = Some(call.coordinator.clone());
            Part {
                txn: Arc::new(Mutex::new(txn)),
                home: false,
                expires: deadline + PART_GRACE,
            }
        });
        part.txn.lock().note_elsewhere(call.touched.iter().cloned());
        part.txn.clone()
    }

    /// Drop `function` from `txn`'s part here: release its lock, forget its writes.
    fn discard(&self, txn: TxnId, function: &FunctionName) {
        let mut parts = self.parts.lock();
        let Some(part) = parts.get(&txn) else {
            return;
        };
        let taken = part.txn.lock().take_function(function);
        if let Some((f, _)) = taken {
            f.lock.release(txn);
        }
        if !part.home && part.txn.lock().held().is_empty() {
            parts.remove(&txn);
        }
    }

    /// Drop the parts none of whose functions was prepared once they can no longer
    /// commit: past their grace, or as soon as their coordinator's function has its
    /// primary on another node than the one the transaction began on (the coordinator
    /// died or handed over: an undecided transaction of the old one aborts). Either way
    /// no yes vote was given, so nothing can commit without them.
    fn expire_parts(&self) {
        let now = Instant::now();
        let state = self.cluster.upgrade().map(|c| c.control().state());
        let orphaned = |p: &Part, id: &TxnId| {
            let Some(state) = &state else {
                return false;
            };
            let coordinator = p.txn.lock().coordinator.clone();
            coordinator
                .and_then(|c| state.assignments.get(c.as_str()).map(|a| a.primary.0))
                // (Node ids are compared in the bits a transaction id keeps of them.)
                .is_some_and(|primary| {
                    primary & ((1 << crate::node::TXN_NODE_BITS) - 1) != crate::node::txn_node(*id)
                })
        };
        let expired: Vec<(TxnId, Arc<Mutex<Txn>>)> = {
            let mut parts = self.parts.lock();
            let ids: Vec<TxnId> = parts
                .iter()
                .filter(|(id, p)| !p.home && (p.expires <= now || orphaned(p, id)))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| parts.remove(&id).map(|p| (id, p.txn)))
                .collect()
        };
        for (id, txn) in expired {
            let held = txn.lock().take_held();
            if !held.is_empty() {
                tracing::info!(txn = %id, functions = held.len(), "dropped a part never prepared (its coordinator died, moved or went silent)");
            }
            for f in held {
                f.lock.release(id);
            }
        }
    }

    /// Tell every function in `parts` that `txn` (coordinated by `coordinator`) will not
    /// commit there: their parts drop their writes and locks. Used for parts that only
    /// read, and for every part when the transaction aborts before its prepare round.
    pub fn abandon(
        self: &Arc<Self>,
        coordinator: &FunctionName,
        txn: TxnId,
        parts: &[FunctionName],
    ) {
        for to in parts {
            self.send(
                to.clone(),
                Message::Decision {
                    txn,
                    commit: false,
                    from: coordinator.clone(),
                },
            );
        }
    }

    // ---- Calls to other nodes ----

    /// Run `method` of `function` (whose primary is elsewhere) inside `txn`.
    ///
    /// Fails (the whole transaction aborts) when the callee's primary cannot be reached
    /// before the deadline, when the part there was lost, or with the callee's
    /// transaction-wide failures (deadline, lost conflict).
    pub async fn call(
        self: &Arc<Self>,
        txn: &Arc<Mutex<Txn>>,
        depth: u32,
        function: &str,
        method: &str,
        input: Vec<u8>,
    ) -> Result<Result<Vec<u8>, GuestError>, InvokeError> {
        let span = crate::trace::inner_span!("call", function, method);
        // The callee's spans are this `call` span's children.
        let trace = span.in_scope(crate::trace::outgoing);
        self.call_traced(txn, depth, function, method, input, trace)
            .await
    }

    async fn call_traced(
        self: &Arc<Self>,
        txn: &Arc<Mutex<Txn>>,
        depth: u32,
        function: &str,
        method: &str,
        input: Vec<u8>,
        trace: Option<String>,
    ) -> Result<Result<Vec<u8>, GuestError>, InvokeError> {
        let cluster = self
            .cluster
            .upgrade()
            .ok_or_else(|| InvokeError::Unavailable("the node is stopping".into()))?;
        let (call, deadline) = {
            let mut t = txn.lock();
            t.remote_calls += 1;
            let Some(coordinator) = t.coordinator.clone() else {
                return Err(InvokeError::Unavailable(
                    "this transaction has no coordinator".into(),
                ));
            };
            let left = t.deadline.saturating_duration_since(Instant::now());
            (
                PartCall {
                    txn: t.id,
                    age: t.age,
                    coordinator,
                    depth,
                    deadline_ms: left.as_millis() as u64,
                    function: function.to_owned(),
                    method: method.to_owned(),
                    input,
                    touched: t.touched(),
                    trace,
                },
                t.deadline,
            )
        };
        if txn.lock().home {
            // The coordinator's own transaction: make it findable for calls coming back.
            self.register_home(txn);
        }
        let mut changes = cluster.control().watch();
        let body = wire::encode(&Invoke::Part(call));
        loop {
            if Instant::now() >= deadline {
                return Err(InvokeError::Deadline(format!(
                    "the deadline passed while calling {function} on another node"
                )));
            }
            let state = cluster.control().state();
            let Some(a) = state.assignments.get(function) else {
                return Ok(Err(GuestError::new(
                    "unknown-function",
                    format!("no function named {function:?}"),
                )));
            };
            let primary = a.primary;
            let addr = state
                .nodes
                .get(&primary)
                .and_then(|n| n.peer_addr.parse().ok());
            let reply = match addr {
                Some(addr) if primary != cluster.id => {
                    let wait = deadline.saturating_duration_since(Instant::now()) + SEND_TIMEOUT;
                    let request = cluster.transport.request_within(
                        primary.0,
                        addr,
                        understudy_net::Channel::Invoke,
                        body.clone(),
                        wait,
                    );
                    // A dead node answers nothing: rather than wait out the deadline
                    // (holding every lock of the transaction meanwhile), give up as soon
                    // as the cluster moves the callee's primary away from it.
                    let mut moves = cluster.control().watch();
                    let moved = async {
                        loop {
                            if moves.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                            let now = moves
                                .borrow_and_update()
                                .assignments
                                .get(function)
                                .map(|a| a.primary);
                            if now != Some(primary) {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        reply = request => reply
                            .map_err(|e| e.to_string())
                            .and_then(|b| wire::decode::<InvokeReply>(&b).map_err(|e| e.to_string())),
                        () = moved => Err(format!("its primary moved away from node {primary} during the call")),
                    }
                }
                // The cluster names this node, whose copy is not serving yet; or the
                // primary's address is unknown: wait for the state to move on.
                _ => Ok(InvokeReply::Failed(match FunctionName::new(function) {
                    Ok(name) => InvokeError::NotPrimary(name),
                    Err(e) => InvokeError::UnknownFunction(e),
                })),
            };
            match reply {
                Ok(InvokeReply::PartAnswer { outcome, touched }) => {
                    txn.lock().note_elsewhere(touched);
                    return Ok(outcome
                        .map(|b| b.0)
                        .map_err(|(code, message)| GuestError { code, message }));
                }
                Ok(InvokeReply::Failed(InvokeError::NotPrimary(_))) => {
                    // Nothing ran there: try again once the cluster state changes.
                    let _ = tokio::time::timeout(Duration::from_millis(2), changes.changed()).await;
                }
                Ok(InvokeReply::Failed(e)) => {
                    // The part there dropped itself; the transaction cannot go on.
                    return Err(e);
                }
                Ok(other) => {
                    return Err(InvokeError::Unavailable(format!(
                        "node {primary} answered a call with {other:?}"
                    )))
                }
                Err(e) => {
                    // The call may or may not have run there: the transaction cannot go on.
                    if let Ok(name) = FunctionName::new(function) {
                        txn.lock().note_elsewhere([(name, false)]);
                    }
                    return Err(InvokeError::Unavailable(format!(
                        "the call to {function} on node {primary} failed: {e}"
                    )));
                }
            }
        }
    }

    // ---- The prepare round (coordinator) ----

    /// Ask `participants` (functions elsewhere that `txn` wrote) to prepare, as the
    /// coordinator on `copy` (its function's primary copy). Resolves with the verdict;
    /// after `Commit`, the caller writes the COMMIT record and calls `logged` (or
    /// `not_logged`).
    pub async fn prepare_round(
        self: &Arc<Self>,
        copy: &Arc<PrimaryCopy>,
        txn: TxnId,
        participants: Vec<FunctionName>,
    ) -> Verdict {
        let function = copy.function.clone();
        let started = Instant::now();
        let rx = loop {
            let (tx, rx) = oneshot::channel();
            let mut tx = Some(tx);
            let begun = self.with_slot_of(copy, |slot, now| {
                slot.waiters.insert(txn, tx.take().expect("once"));
                let cmds = slot.coordinator.step(
                    now,
                    coordinator::Event::Begin {
                        txn,
                        participants: participants.clone(),
                    },
                );
                ((), cmds.into_iter().map(Cmd::C).collect())
            });
            if begun.is_some() {
                break rx;
            }
            if started.elapsed() > SLOT_WAIT || !copy.serving() {
                tracing::warn!(%function, "no two-phase-commit slot for this copy");
                return Verdict::Abort;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        rx.await.unwrap_or(Verdict::Abort)
    }

    /// The COMMIT record of `txn` is released: tell the participants.
    pub fn logged(self: &Arc<Self>, copy: &Arc<PrimaryCopy>, txn: TxnId) {
        self.with_slot_of(copy, |slot, now| {
            let cmds = slot
                .coordinator
                .step(now, coordinator::Event::Logged { txn });
            ((), cmds.into_iter().map(Cmd::C).collect())
        });
    }

    /// The COMMIT record of `txn` was not written: abort.
    pub fn not_logged(self: &Arc<Self>, copy: &Arc<PrimaryCopy>, txn: TxnId) {
        self.with_slot_of(copy, |slot, now| {
            let cmds = slot
                .coordinator
                .step(now, coordinator::Event::NotLogged { txn });
            ((), cmds.into_iter().map(Cmd::C).collect())
        });
    }

    // ---- Messages ----

    /// A two-phase-commit message for this node's primary of `to`.
    ///
    /// Fails when this node does not serve `to` as primary (now).
    pub fn receive(
        self: &Arc<Self>,
        to: FunctionName,
        message: Message<FunctionName>,
    ) -> Result<(), InvokeError> {
        let Some(copy) = self.primary(&to) else {
            return Err(InvokeError::NotPrimary(to));
        };
        let holds = match &message {
            Message::Prepare { txn, .. } => self.part(*txn).is_some_and(|t| t.lock().holds(&to)),
            _ => false,
        };
        self.with_slot_of(&copy, |slot, now| {
            let cmds = match message {
                Message::Prepare { txn, coordinator } => slot
                    .participant
                    .step(
                        now,
                        participant::Event::Prepare {
                            txn,
                            coordinator,
                            ok: holds,
                        },
                    )
                    .into_iter()
                    .map(Cmd::P)
                    .collect(),
                Message::Decision { .. } => slot
                    .participant
                    .step(now, participant::Event::Received(message))
                    .into_iter()
                    .map(Cmd::P)
                    .collect(),
                Message::Vote { .. } | Message::Ack { .. } | Message::Query { .. } => slot
                    .coordinator
                    .step(now, coordinator::Event::Received(message))
                    .into_iter()
                    .map(Cmd::C)
                    .collect(),
            };
            ((), cmds)
        })
        // The slot is being set up here: the sender tries again, as with another primary.
        .ok_or(InvokeError::NotPrimary(to))
    }

    /// Send `message` to the primary of `to`, wherever it is (best effort: the state
    /// machines send again until answered).
    fn send(self: &Arc<Self>, to: FunctionName, message: Message<FunctionName>) {
        let Some(cluster) = self.cluster.upgrade() else {
            return;
        };
        let state = cluster.control().state();
        let Some(primary) = state.assignments.get(to.as_str()).map(|a| a.primary) else {
            return;
        };
        let Ok(permit) = self.sends.clone().try_acquire_owned() else {
            tracing::debug!(%to, "too many two-phase-commit messages in flight; dropped one");
            return;
        };
        if primary == cluster.id {
            let me = self.clone();
            tokio::spawn(tracing::Instrument::in_current_span(async move {
                let _permit = permit;
                let _ = me.receive(to, message);
            }));
            return;
        }
        // Sent on behalf of a traced transaction (not by a timer's resend): its trace.
        let trace = crate::trace::outgoing();
        let Some(addr) = state
            .nodes
            .get(&primary)
            .and_then(|n| n.peer_addr.parse().ok())
        else {
            return;
        };
        let transport = cluster.transport.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let body = wire::encode(&Invoke::TwoPhase { to, message, trace });
            let _ = transport
                .request_within(
                    primary.0,
                    addr,
                    understudy_net::Channel::Invoke,
                    body,
                    SEND_TIMEOUT,
                )
                .await;
        });
    }

    // ---- Slots ----

    /// Run `f` on the slot of `copy`'s function, if it is `copy`'s and ready, then carry
    /// out the commands it returns. Opens a slot for `copy` if it has none.
    fn with_slot_of<R>(
        self: &Arc<Self>,
        copy: &Arc<PrimaryCopy>,
        f: impl FnOnce(&mut Slot, Instant) -> (R, Vec<Cmd>),
    ) -> Option<R> {
        let function = &copy.function;
        let (r, cmds) = {
            let mut slots = self.slots.lock();
            let current = slots
                .get(function)
                .is_some_and(|s| Arc::ptr_eq(&s.copy, copy));
            if !current {
                // `copy` itself may be the old one (a task that outlived its copy): then
                // nothing happens. Else the slot is an older copy's: its waiters learn
                // that their transactions abort (nothing was written for them: the copy
                // changed under them), and `copy` gets its own.
                if self.serves(copy) {
                    slots.remove(function);
                    drop(slots);
                    self.open_slot(copy.clone());
                }
                return None;
            }
            let slot = slots.get_mut(function).expect("checked above");
            let now = Instant::now();
            let (r, mut cmds) = f(slot, now);
            let mut i = 0;
            while i < cmds.len() {
                let mut more = Vec::new();
                let metrics = &self.node.metrics().cluster;
                match &cmds[i] {
                    Cmd::C(coordinator::Command::Decided { commit, .. }) => {
                        metrics
                            .twophase_decided
                            .get_or_create(&decision(*commit))
                            .inc();
                    }
                    Cmd::P(participant::Command::LogPrepare { .. }) => {
                        metrics.twophase_prepared.inc();
                    }
                    _ => {}
                }
                match &cmds[i] {
                    Cmd::C(coordinator::Command::LogCommit { txn, .. }) => {
                        let told = slot
                            .waiters
                            .remove(txn)
                            .is_some_and(|w| w.send(Verdict::Commit).is_ok());
                        if !told {
                            // Nobody to write the record: abort (nothing was written).
                            more.extend(
                                slot.coordinator
                                    .step(now, coordinator::Event::NotLogged { txn: *txn })
                                    .into_iter()
                                    .map(Cmd::C),
                            );
                        }
                    }
                    Cmd::C(coordinator::Command::Decided { txn, commit: false }) => {
                        if let Some(w) = slot.waiters.remove(txn) {
                            let _ = w.send(Verdict::Abort);
                        }
                    }
                    Cmd::P(participant::Command::Finish { txn, commit }) => {
                        if let Some(found) = slot.in_doubt.remove(txn) {
                            let ms = found.elapsed().as_secs_f64() * 1000.0;
                            tracing::info!(%function, txn = %*txn, commit, ms, "resolved an in-doubt transaction");
                            metrics
                                .twophase_in_doubt_resolved
                                .get_or_create(&decision(*commit))
                                .inc();
                            metrics
                                .twophase_in_doubt_resolution_seconds
                                .observe(ms / 1000.0);
                            if let Some(cluster) = self.cluster.upgrade() {
                                cluster.timeline().record(super::timeline::Change {
                                    kind: super::timeline::Kind::InDoubtResolved,
                                    node: Some(cluster.id().0),
                                    function: Some(function.to_string()),
                                    text: format!(
                                        "in-doubt transaction {} of {function} {} after {ms:.1} ms",
                                        txn.0,
                                        if *commit { "committed" } else { "aborted" }
                                    ),
                                });
                            }
                            let mut log = self.in_doubt_log.lock();
                            if log.len() == IN_DOUBT_LOG_MAX {
                                log.pop_front();
                            }
                            log.push_back(InDoubt {
                                function: function.to_string(),
                                txn: txn.0,
                                commit: *commit,
                                ms,
                                at_ms: crate::node::now_ms(),
                            });
                        }
                    }
                    _ => {}
                }
                cmds.extend(more);
                i += 1;
            }
            (r, cmds)
        };
        self.execute(copy, cmds);
        Some(r)
    }

    /// Open a slot for `copy` once its backups hold everything in its log, rebuilt from
    /// the PREPARE and COMMIT records in it.
    fn open_slot(self: &Arc<Self>, copy: Arc<PrimaryCopy>) {
        let function = copy.function.clone();
        if !self.opening.lock().insert(function.clone()) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let f = me.node.store().get(&function);
            let ready = match &f {
                Some(f) => me.released_while_current(&copy, f.seq()).await,
                None => false,
            };
            me.opening.lock().remove(&function);
            let Some(f) = f.filter(|_| ready && copy.serving()) else {
                return;
            };
            let now = Instant::now();
            let mut slot = Slot {
                copy: copy.clone(),
                coordinator: twophase::Coordinator::new(function.clone()),
                participant: twophase::Participant::new(function.clone()),
                waiters: HashMap::new(),
                in_doubt: HashMap::new(),
            };
            let (as_participant, as_coordinator) = records::recovered(&f);
            if let (
                participant::Event::Recovered { prepared, .. },
                coordinator::Event::Recovered { committed },
            ) = (&as_participant, &as_coordinator)
            {
                if !prepared.is_empty() || !committed.is_empty() {
                    tracing::info!(%function, epoch = copy.epoch.0, prepared = prepared.len(), decided = committed.len(), "recovering distributed transactions from the log");
                }
                for (txn, _) in prepared {
                    slot.in_doubt.insert(*txn, now);
                }
                me.node
                    .metrics()
                    .cluster
                    .twophase_in_doubt_found
                    .inc_by(prepared.len() as u64);
            }
            let mut cmds: Vec<Cmd> = slot
                .participant
                .step(now, as_participant)
                .into_iter()
                .map(Cmd::P)
                .collect();
            cmds.extend(
                slot.coordinator
                    .step(now, as_coordinator)
                    .into_iter()
                    .map(Cmd::C),
            );
            {
                let mut slots = me.slots.lock();
                let still = me
                    .primary(&function)
                    .is_some_and(|c| Arc::ptr_eq(&c, &copy));
                if !still || slots.contains_key(&function) {
                    return;
                }
                slots.insert(function.clone(), slot);
            }
            me.execute(&copy, cmds);
        });
    }

    /// Wait until `copy` has released `seq`, as long as it is the copy this node serves
    /// its function with (a replaced copy may never release; its successor opens its
    /// own slot). Returns whether it was released.
    async fn released_while_current(&self, copy: &Arc<PrimaryCopy>, seq: u64) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_millis(50), copy.released(seq)).await {
                Ok(released) => return released.is_ok(),
                Err(_) if self.serves(copy) => continue,
                Err(_) => return false,
            }
        }
    }

    fn tick(self: &Arc<Self>) {
        self.expire_parts();
        let Some(cluster) = self.cluster.upgrade() else {
            return;
        };
        // Slots of copies that no longer serve go; every serving copy gets (or keeps) one.
        let primaries = cluster.replicas().primaries();
        self.slots.lock().retain(|name, slot| {
            slot.copy.serving()
                && primaries
                    .iter()
                    .any(|p| &p.function == name && Arc::ptr_eq(p, &slot.copy))
        });
        for copy in primaries {
            self.with_slot_of(&copy, |slot, now| {
                let mut cmds: Vec<Cmd> = slot
                    .coordinator
                    .step(now, coordinator::Event::Tick)
                    .into_iter()
                    .map(Cmd::C)
                    .collect();
                cmds.extend(
                    slot.participant
                        .step(now, participant::Event::Tick)
                        .into_iter()
                        .map(Cmd::P),
                );
                ((), cmds)
            });
        }
    }

    // ---- Commands ----

    fn execute(self: &Arc<Self>, copy: &Arc<PrimaryCopy>, cmds: Vec<Cmd>) {
        for cmd in cmds {
            match cmd {
                Cmd::C(coordinator::Command::Send { to, message })
                | Cmd::P(participant::Command::Send { to, message }) => self.send(to, message),
                // Handled under the slot's lock (`with_slot_of`).
                Cmd::C(coordinator::Command::LogCommit { .. })
                | Cmd::C(coordinator::Command::Decided { .. })
                | Cmd::P(participant::Command::Finish { .. }) => {}
                Cmd::C(coordinator::Command::LogEnd { txn }) => {
                    let (me, copy) = (self.clone(), copy.clone());
                    tokio::spawn(async move { me.log_end(&copy, txn).await });
                }
                Cmd::P(participant::Command::LogPrepare { txn }) => {
                    let (me, copy) = (self.clone(), copy.clone());
                    tokio::spawn(async move { me.log_prepare(&copy, txn).await });
                }
                Cmd::P(participant::Command::LogOutcome { txn, commit }) => {
                    let (me, copy) = (self.clone(), copy.clone());
                    tokio::spawn(async move { me.log_outcome(&copy, txn, commit).await });
                }
                Cmd::P(participant::Command::Discard { txn }) => self.discard(txn, &copy.function),
            }
        }
    }

    /// Write `function`'s part of `txn` as a PREPARE record (under the part's lock on
    /// it), then vote yes once the copy's backups hold it.
    async fn log_prepare(self: &Arc<Self>, copy: &Arc<PrimaryCopy>, txn: TxnId) {
        let function = &copy.function;
        let Some(part) = self.part(txn) else {
            return;
        };
        let Some((f, ops)) = part.lock().take_function(function) else {
            return;
        };
        let coordinator = part.lock().coordinator.clone();
        let written = match coordinator {
            Some(coordinator) if copy.serving() && self.serves(copy) => {
                let record = records::prepare(
                    function,
                    txn,
                    coordinator.clone(),
                    ops.clone(),
                    copy.epoch.0,
                );
                let entry = Entry {
                    txn,
                    ops,
                    idempotency: None,
                    kind: Kind::Prepare { coordinator },
                };
                self.node.log_step(&f, copy, &record, entry)
            }
            _ => Err(crate::node::LogError::NotServed(function.clone())),
        };
        // Its writes are promised in the log (or dropped): isolation is the store's now.
        f.lock.release(txn);
        self.drop_part_if_empty(txn);
        let done = match written {
            Ok((lsn, seq)) => {
                self.node.wait_lsn_durable(lsn).await.is_ok()
                    && self.released_while_current(copy, seq).await
            }
            Err(e) => {
                tracing::debug!(%function, %txn, error = %e, "not prepared");
                false
            }
        };
        if done {
            crate::failpoint::hit("participant-prepared");
            self.with_slot_of(copy, |slot, now| {
                let cmds = slot
                    .participant
                    .step(now, participant::Event::PrepareLogged { txn });
                ((), cmds.into_iter().map(Cmd::P).collect())
            });
        }
    }

    /// Write the outcome of `txn`'s prepared part of the copy's function (applying its
    /// writes on commit), then report it once the copy's backups hold it.
    async fn log_outcome(self: &Arc<Self>, copy: &Arc<PrimaryCopy>, txn: TxnId, commit: bool) {
        let function = &copy.function;
        // Under the function's lock: after a PREPARE still being written, and apart from
        // commits and role changes.
        let Some(locked) = self.node.lock_function(function).await else {
            return;
        };
        let Some(f) = self.node.store().get(function) else {
            return;
        };
        let written = match records::outcome(&f, txn, commit, copy.epoch.0) {
            // Never prepared here (or already resolved): nothing to write.
            None => Ok(None),
            Some(record) if copy.serving() && self.serves(copy) => {
                let entry = Entry {
                    txn,
                    ops: Vec::new(),
                    idempotency: None,
                    kind: Kind::Resolved { commit },
                };
                self.node.log_step(&f, copy, &record, entry).map(Some)
            }
            Some(_) => Err(crate::node::LogError::NotServed(function.clone())),
        };
        drop(locked);
        let done = match written {
            Ok(None) => true,
            Ok(Some((lsn, seq))) => {
                self.node.wait_lsn_durable(lsn).await.is_ok()
                    && self.released_while_current(copy, seq).await
            }
            Err(e) => {
                tracing::debug!(%function, %txn, error = %e, "outcome not written; the next primary resolves it");
                false
            }
        };
        if done {
            crate::failpoint::hit("participant-resolved");
            self.with_slot_of(copy, |slot, now| {
                let cmds = slot
                    .participant
                    .step(now, participant::Event::OutcomeLogged { txn });
                ((), cmds.into_iter().map(Cmd::P).collect())
            });
        }
    }

    /// Every participant holds `txn`'s commit: write END, so the coordinator's log
    /// forgets it (best effort: without it, a promoted copy delivers the commit again).
    async fn log_end(self: &Arc<Self>, copy: &Arc<PrimaryCopy>, txn: TxnId) {
        let function = &copy.function;
        let Some(_locked) = self.node.lock_function(function).await else {
            return;
        };
        let Some(f) = self.node.store().get(function) else {
            return;
        };
        let Some(record) = records::end(&f, txn, copy.epoch.0) else {
            return;
        };
        if !copy.serving() || !self.serves(copy) {
            return;
        }
        let entry = Entry {
            txn,
            ops: Vec::new(),
            idempotency: None,
            kind: Kind::End,
        };
        if let Err(e) = self.node.log_step(&f, copy, &record, entry) {
            tracing::warn!(%function, %txn, error = %e, "cannot write END");
        }
    }

    /// Whether `copy` is still the copy this node serves its function with.
    fn serves(&self, copy: &Arc<PrimaryCopy>) -> bool {
        self.primary(&copy.function)
            .is_some_and(|c| Arc::ptr_eq(&c, copy))
    }

    /// Drop `txn`'s part here (not the coordinator's own) with all it holds: the
    /// transaction failed as a whole.
    pub fn drop_part(&self, txn: TxnId) {
        let part = {
            let mut parts = self.parts.lock();
            match parts.get(&txn) {
                Some(p) if !p.home => parts.remove(&txn),
                _ => None,
            }
        };
        if let Some(part) = part {
            let held = part.txn.lock().take_held();
            for f in held {
                f.lock.release(txn);
            }
        }
    }

    fn drop_part_if_empty(&self, txn: TxnId) {
        let mut parts = self.parts.lock();
        if parts
            .get(&txn)
            .is_some_and(|p| !p.home && p.txn.lock().held().is_empty())
        {
            parts.remove(&txn);
        }
    }
}

fn decision(commit: bool) -> crate::metrics::DecisionLabels {
    crate::metrics::DecisionLabels {
        outcome: if commit { "commit" } else { "abort" }.to_owned(),
    }
}
