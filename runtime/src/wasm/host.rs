//! What an instance sees of the host: its transaction's view of state, calls to
//! other functions, logging, and WASI clocks and random (no filesystem, sockets or
//! environment). Each instance has its own `Ctx`; instances of one transaction share
//! the `Txn`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::understudy::function::{call, log, state, types};
use super::guest_log::{self, Dropped};
use super::Abort;
use crate::store::Function;
use crate::txn::Txn;

/// Bytes of stdout, and of stderr, kept per instance; more is a trap, not a memory leak.
const OUTPUT_MAX: usize = 64 << 10;

/// Bytes of the end of a guest's stderr that a trap's error carries: enough for the
/// last frames of a Python traceback or a JavaScript stack, and the exception.
pub const STDERR_TAIL_MAX: usize = 2 << 10;

/// A handler's own error, or a host error handed to the guest as a WIT `error`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestError {
    pub code: String,
    pub message: String,
}

impl GuestError {
    pub fn new(code: &str, message: impl Into<String>) -> GuestError {
        GuestError {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

impl From<types::Error> for GuestError {
    fn from(e: types::Error) -> GuestError {
        GuestError {
            code: e.code,
            message: e.message,
        }
    }
}

impl From<GuestError> for types::Error {
    fn from(e: GuestError) -> types::Error {
        types::Error {
            code: e.code,
            message: e.message,
        }
    }
}

pub type CallFuture =
    Pin<Box<dyn Future<Output = wasmtime::Result<Result<Vec<u8>, GuestError>>> + Send>>;

/// Runs a call from one function to another inside the caller's transaction. The
/// outer error aborts the whole transaction (the callee trapped, or lost a lock
/// conflict); the inner one is handed to the caller.
pub trait Calls: Send + Sync {
    fn call(
        self: Arc<Self>,
        txn: Arc<Mutex<Txn>>,
        depth: u32,
        function: String,
        method: String,
        input: Vec<u8>,
    ) -> CallFuture;
}

/// The data of one instance's store.
pub struct Ctx {
    pub txn: Arc<Mutex<Txn>>,
    pub function: Arc<Function>,
    /// 0 for the function the client invoked, 1 for a function it calls, and so on.
    pub depth: u32,
    calls: Arc<dyn Calls>,
    pub(super) limiter: Limiter,
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
    /// What this instance could not log (over its transaction's cap).
    log_dropped: Dropped,
    /// The node's runtime, where calls to other functions run (set by `Runtime::run`;
    /// without it they run on the guest's own thread).
    pub(super) links: Option<tokio::runtime::Handle>,
}

impl Ctx {
    pub fn new(
        txn: Arc<Mutex<Txn>>,
        function: Arc<Function>,
        depth: u32,
        calls: Arc<dyn Calls>,
        options: &super::Options,
    ) -> Ctx {
        Ctx {
            txn,
            function,
            depth,
            calls,
            limiter: Limiter {
                memory_max: options.memory_max_bytes,
                table_elements_max: options.table_elements_max,
            },
            wasi: None,
            table: ResourceTable::new(),
            stdout: MemoryOutputPipe::new(OUTPUT_MAX),
            stderr: MemoryOutputPipe::new(OUTPUT_MAX),
            log_dropped: Dropped::default(),
            links: None,
        }
    }

    pub(super) fn txn_id(&self) -> String {
        self.txn.lock().id.to_string()
    }

    /// Send what the guest printed to the node's log, one event per line (within the
    /// same caps as its log calls; stdout, then stderr), and report what its caps
    /// dropped. Returns the end of its stderr (at most `STDERR_TAIL_MAX` bytes, from a
    /// line's start where one is in reach), for a trap's error.
    pub(super) fn flush_output(&mut self) -> String {
        let (stdout, stderr) = match self.wasi.is_some() {
            true => (self.stdout.contents(), self.stderr.contents()),
            false => Default::default(),
        };
        for printed in [&stdout, &stderr] {
            if printed.is_empty() {
                continue;
            }
            let txn = self.txn_id();
            for line in String::from_utf8_lossy(printed).lines() {
                if let Some(line) = self.admit_log(line) {
                    tracing::info!(function = %self.function.name, %txn, "guest: {line}");
                }
            }
        }
        if self.log_dropped.any() {
            let txn = self.txn_id();
            tracing::warn!(
                function = %self.function.name,
                %txn,
                dropped_messages = self.log_dropped.messages,
                dropped_bytes = self.log_dropped.bytes,
                "guest log messages dropped: over the cap of {} bytes per transaction",
                guest_log::TXN_BYTES_MAX
            );
        }
        stderr_tail(&stderr)
    }

    /// `message` as the line to log, or `None` when it is over its transaction's cap or
    /// its function's rate (then it is counted as dropped).
    fn admit_log(&mut self, message: &str) -> Option<String> {
        let line = guest_log::escape(message);
        let logged = self.txn.lock().log_bytes;
        if logged + line.len() > guest_log::TXN_BYTES_MAX {
            self.log_dropped.add(line.len());
            return None;
        }
        // The function's bucket counts what its rate drops, and hands the count to the
        // next message it lets through.
        let dropped = self.function.log_budget.take(line.len(), Instant::now())?;
        if dropped.any() {
            tracing::warn!(
                function = %self.function.name,
                dropped_messages = dropped.messages,
                dropped_bytes = dropped.bytes,
                "guest log messages dropped: over the function's rate of {} bytes/s",
                guest_log::FUNCTION_BYTES_PER_S
            );
        }
        self.txn.lock().log_bytes += line.len();
        Some(line)
    }
}

impl WasiView for Ctx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        // Built on first use: most guests never touch WASI, and building the context
        // seeds a random generator.
        let (stdout, stderr) = (self.stdout.clone(), self.stderr.clone());
        let wasi = self.wasi.get_or_insert_with(|| {
            WasiCtx::builder()
                .stdout(stdout)
                .stderr(stderr)
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false)
                .build()
        });
        WasiCtxView {
            ctx: wasi,
            table: &mut self.table,
        }
    }
}

/// The end of `stderr`, at most `STDERR_TAIL_MAX` bytes, starting at a line where one
/// starts within them, trimmed (the bytes as UTF-8, lossily).
fn stderr_tail(stderr: &[u8]) -> String {
    let mut start = stderr.len().saturating_sub(STDERR_TAIL_MAX);
    if start > 0 {
        if let Some(newline) = stderr[start..].iter().position(|&b| b == b'\n') {
            start += newline + 1;
        }
    }
    String::from_utf8_lossy(&stderr[start..]).trim().to_owned()
}

/// Caps on memory and tables that trap with a message saying which cap was hit.
pub(super) struct Limiter {
    memory_max: usize,
    table_elements_max: usize,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_max {
            return Err(wasmtime::Error::new(Abort::MemoryCap {
                desired,
                cap: self.memory_max,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements_max {
            return Err(wasmtime::Error::new(Abort::TableCap {
                desired,
                cap: self.table_elements_max,
            }));
        }
        Ok(true)
    }
}

fn limit_error(e: crate::txn::LimitExceeded) -> types::Error {
    types::Error {
        code: "limit".into(),
        message: e.0,
    }
}

impl types::Host for Ctx {}

impl state::Host for Ctx {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Result<Option<Vec<u8>>, types::Error>> {
        Ok(Ok(self
            .txn
            .lock()
            .get(&self.function, &key)
            .map(|v| v.to_vec())))
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<Result<(), types::Error>> {
        Ok(self
            .txn
            .lock()
            .put(&self.function, &key, &value)
            .map_err(limit_error))
    }

    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<Result<(), types::Error>> {
        Ok(self
            .txn
            .lock()
            .delete(&self.function, &key)
            .map_err(limit_error))
    }

    fn scan(
        &mut self,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<types::Entry>, types::Error>> {
        let entries = self
            .txn
            .lock()
            .scan(&self.function, &start, end.as_deref(), limit);
        Ok(Ok(entries
            .into_iter()
            .map(|(k, v)| types::Entry {
                key: k.to_vec(),
                value: v.to_vec(),
            })
            .collect()))
    }
}

impl call::Host for Ctx {
    async fn invoke(
        &mut self,
        function: String,
        method: String,
        input: Vec<u8>,
    ) -> wasmtime::Result<Result<Vec<u8>, types::Error>> {
        let caller = &self.function.name;
        if !self
            .function
            .meta()
            .deploy
            .calls
            .allows(caller.as_str(), &function)
        {
            return Ok(Err(types::Error {
                code: "call-not-granted".into(),
                message: format!(
                    "{caller} may not call {function:?}: deploy {caller} with calls granted to it (--calls {function}, or --calls '*')"
                ),
            }));
        }
        let call =
            self.calls
                .clone()
                .call(self.txn.clone(), self.depth + 1, function, method, input);
        // Locks, messages to other nodes and the callee's own run belong on the
        // node's threads; the guest's thread runs other guests while it waits.
        let result = match &self.links {
            Some(links) => {
                super::guests::OnRuntime::spawn(links, tracing::Instrument::in_current_span(call))
                    .await
                    .map_err(|e| wasmtime::Error::msg(format!("the call's task failed: {e}")))??
            }
            None => call.await?,
        };
        Ok(result.map_err(types::Error::from))
    }
}

impl log::Host for Ctx {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let Some(message) = self.admit_log(&message) else {
            return Ok(());
        };
        let function = &self.function.name;
        let txn = self.txn_id();
        match level {
            log::Level::Trace => tracing::trace!(%function, %txn, "{message}"),
            log::Level::Debug => tracing::debug!(%function, %txn, "{message}"),
            log::Level::Info => tracing::info!(%function, %txn, "{message}"),
            log::Level::Warn => tracing::warn!(%function, %txn, "{message}"),
            log::Level::Error => tracing::error!(%function, %txn, "{message}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_keeps_short_output_whole() {
        assert_eq!(stderr_tail(b"Traceback:\n  boom\n"), "Traceback:\n  boom");
        assert_eq!(stderr_tail(b""), "");
    }

    #[test]
    fn stderr_tail_is_bounded_and_starts_at_a_line() {
        let mut long = b"x".repeat(STDERR_TAIL_MAX);
        long.extend_from_slice(b"\nfirst kept\nValueError: boom\n");
        let tail = stderr_tail(&long);
        assert_eq!(tail, "first kept\nValueError: boom");
    }

    #[test]
    fn stderr_tail_of_one_long_line_is_its_end() {
        let long = b"y".repeat(3 * STDERR_TAIL_MAX);
        assert_eq!(stderr_tail(&long).len(), STDERR_TAIL_MAX);
    }
}
