//! The WebAssembly host: one wasmtime engine with a pooling allocator, components
//! checked against the WIT world and compiled once (cached on disk by content digest
//! and engine configuration), and a fresh instance per transaction, bounded by an
//! epoch deadline, a memory cap and stack and table limits.
//!
//! **Invariant:** `wasm` never waits on the log or on locks itself: every host call
//! goes through `Ctx`, whose transaction and `Calls` hook belong to `node`.

pub mod guest_log;
pub mod guests;
pub mod host;

use std::hash::{Hash, Hasher};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::types::Type;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};

use crate::ids::Digest;
pub use host::{CallFuture, Calls, Ctx, GuestError};

pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "function",
        imports: {
            "understudy:function/call.invoke": async | trappable,
            default: trappable,
        },
        exports: { default: async },
    });
}

/// How long past its deadline a transaction blocked outside wasm code (in a host
/// call) may take before it is cut off.
const DEADLINE_GRACE: Duration = Duration::from_millis(20);

/// Pool slots kept warm (memory resident, see `Options::memory_keep_resident_bytes`)
/// while no instance uses them: bounds what the pool holds beyond the instances alive.
const WARM_SLOTS_UNUSED_MAX: u32 = 16;

/// How often the engine's epoch advances: the granularity of deadlines, and the longest
/// a running guest keeps a guest thread from another run waiting for one.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The export every function has, and the type of its one function.
const HANDLER_EXPORT: &str = "understudy:function/handler@0.1.0";
const HANDLER_TYPE: &str =
    "handle: func(method: string, input: list<u8>) -> result<list<u8>, error>";

/// Interfaces a component may import, by package and interface (versions aside): the
/// world's own, and the WASI ones the host links (it grants no filesystem, sockets or
/// environment through them). Checked before compiling, which can take seconds.
const IMPORTS_PROVIDED: &[&str] = &[
    "understudy:function/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:cli/",
    "wasi:filesystem/",
    "wasi:sockets/",
];

/// Bounds on every instance, whatever the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Wall-clock time a transaction may run, nested calls included.
    pub deadline_ms: u64,
    /// Linear memory per instance.
    pub memory_max_bytes: usize,
    /// WebAssembly stack per instance.
    pub stack_max_bytes: usize,
    /// Elements per table.
    pub table_elements_max: usize,
    /// Instances alive at once on the node (the pool's size).
    pub instances_max: u32,
    /// Linear memory a pool slot keeps mapped between instances, copied back from the
    /// component's initial image in place instead of being unmapped. An interpreter
    /// guest (Python, JavaScript) touches megabytes per call: kept resident, those
    /// pages cost no page fault the next time, at the price of a copy of the slot's
    /// memory (up to this bound) when the instance is dropped, and of resident memory:
    /// up to this much per warm pool slot (slots in use, plus at most
    /// `WARM_SLOTS_UNUSED_MAX` unused ones).
    pub memory_keep_resident_bytes: usize,
    /// Threads that run guests (0: one per core). Guests run on these alone, at a
    /// lower scheduling priority than the node's own threads (HTTP, replication,
    /// Raft, leases, failure detection), taking turns fairly between functions.
    pub guest_threads: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            deadline_ms: 1000,
            memory_max_bytes: 64 << 20,
            stack_max_bytes: 512 << 10,
            table_elements_max: 20_000,
            instances_max: 1000,
            memory_keep_resident_bytes: 32 << 20,
            guest_threads: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a WebAssembly binary (it does not start with \\0asm)")]
    NotWasm,
    #[error("a core WebAssembly module, not a component: turn it into one with `wasm-tools component new`")]
    CoreModule,
    #[error("invalid component: {0}")]
    Invalid(String),
    #[error("the component imports something the host does not provide: {0}")]
    UnknownImport(String),
    #[error("the component does not export understudy:function/handler@0.1.0 as the world requires: {0}")]
    MissingExport(String),
    #[error("the component's handler does not have the world's type: {0}")]
    WrongHandler(String),
    #[error("the wasm engine could not start: {0}")]
    Engine(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What stopped an instance, when it did not return.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Abort {
    #[error("the transaction ran past its deadline of {0} ms")]
    Deadline(u64),
    #[error("the instance asked for {desired} bytes of memory; the cap is {cap} bytes")]
    MemoryCap { desired: usize, cap: usize },
    #[error("a table asked for {desired} elements; the cap is {cap}")]
    TableCap { desired: usize, cap: usize },
}

/// A trap (not the deadline, nor a cap) with the end of what the guest wrote to stderr
/// before it: an interpreter (Python, JavaScript) prints its exception there, and the
/// trap alone says only `unreachable`.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{trap}{}", match stderr_tail.is_empty() {
    true => String::new(),
    false => format!("; the guest's stderr ended with: {stderr_tail}"),
})]
pub struct GuestTrap {
    pub trap: String,
    /// At most `host::STDERR_TAIL_MAX` bytes.
    pub stderr_tail: String,
}

/// A deployed component, checked and compiled, ready to instantiate.
pub struct Loaded {
    pub digest: Digest,
    pre: bindings::FunctionPre<Ctx>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

pub struct Runtime {
    engine: Engine,
    linker: Linker<Ctx>,
    cache_dir: PathBuf,
    engine_hash: u64,
    pub options: Options,
    ticking: Arc<AtomicBool>,
    guests: guests::Guests,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Start the engine, caching compiled components in `cache_dir`.
    ///
    /// Fails when the engine configuration is rejected (for example, a pool larger than
    /// the address space allows) or the cache directory cannot be created.
    pub fn new(options: Options, cache_dir: &Path) -> Result<Runtime, Error> {
        std::fs::create_dir_all(cache_dir).map_err(|e| Error::Io {
            path: cache_dir.to_owned(),
            source: e,
        })?;
        let engine =
            Engine::new(&engine_config(&options)).map_err(|e| Error::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        bindings::Function::add_to_linker::<Ctx, HasSelf<Ctx>>(&mut linker, |ctx| ctx)
            .map_err(|e| Error::Engine(format!("{e:#}")))?;
        // Clocks, random and stdio for guests built against WASI; `Ctx` grants no
        // filesystem, sockets or environment.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| Error::Engine(format!("{e:#}")))?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        let engine_hash = hasher.finish();

        let ticking = Arc::new(AtomicBool::new(true));
        {
            let engine = engine.clone();
            let ticking = ticking.clone();
            std::thread::Builder::new()
                .name("epoch-ticker".into())
                .spawn(move || {
                    while ticking.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| Error::Engine(format!("cannot start the epoch thread: {e}")))?;
        }
        let preempt = {
            let engine = engine.clone();
            move || engine.increment_epoch()
        };
        let guests = guests::Guests::new(options.guest_threads, preempt)
            .map_err(|e| Error::Engine(format!("cannot start the guest threads: {e}")))?;
        Ok(Runtime {
            engine,
            linker,
            cache_dir: cache_dir.to_owned(),
            engine_hash,
            options,
            ticking,
            guests,
        })
    }

    /// Check that `bytes` is a component of the world and compile it, or load the
    /// compiled form from the cache. Blocking (compilation takes milliseconds to
    /// seconds): call from a thread that may block.
    ///
    /// Fails with a message saying what is wrong: not wasm, a core module, invalid,
    /// an unknown import, a missing export or a handler of the wrong type. Only a
    /// component that passes every check is kept in the compiled cache.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Loaded>, Error> {
        let digest = Digest::of(bytes);
        check_header(bytes)?;
        check_imports(bytes)?;
        let (component, compiled) = match self.load_cached(digest) {
            Some(component) => (component, false),
            None => {
                let component = Component::new(&self.engine, bytes)
                    .map_err(|e| Error::Invalid(format!("{e:#}")))?;
                (component, true)
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| Error::UnknownImport(format!("{e:#}")))?;
        let pre =
            bindings::FunctionPre::new(pre).map_err(|e| Error::MissingExport(format!("{e:#}")))?;
        check_handler(&self.engine, &component)?;
        if compiled {
            self.store_cached(digest, &component);
        }
        Ok(Arc::new(Loaded { digest, pre }))
    }

    fn cache_path(&self, digest: Digest) -> PathBuf {
        self.cache_dir.join(format!(
            "{}-{:016x}.cwasm",
            digest.to_hex(),
            self.engine_hash
        ))
    }

    /// The compiled component from the cache, if a verified copy is there.
    fn load_cached(&self, digest: Digest) -> Option<Component> {
        let path = self.cache_path(digest);
        let file = std::fs::read(&path).ok()?;
        if file.len() < 32 || Digest::of(&file[32..]).0 != file[..32] {
            tracing::warn!(path = %path.display(), "compiled cache entry is damaged; recompiling");
            return None;
        }
        // SAFETY: the bytes after the checksum were produced by `Component::serialize`
        // on an engine with this same configuration (its hash is in the file name),
        // and the sha256 just checked proves they are unchanged since.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(&self.engine, &file[32..]) };
        component.ok()
    }

    /// Best effort: a failure to cache only costs a recompile after restart.
    fn store_cached(&self, digest: Digest, component: &Component) {
        let Ok(serialized) = component.serialize() else {
            return;
        };
        let path = self.cache_path(digest);
        let tmp = path.with_extension("tmp");
        let mut file = Digest::of(&serialized).0.to_vec();
        file.extend_from_slice(&serialized);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &file));
        if written.and_then(|()| std::fs::rename(&tmp, &path)).is_err() {
            tracing::warn!(path = %path.display(), "could not cache the compiled component");
        }
    }

    /// Guest threads running a guest, and runs waiting for one.
    pub fn guest_load(&self) -> (usize, usize) {
        self.guests.load()
    }

    /// Instantiate `loaded` in a fresh store holding `ctx` and run its handler, on a
    /// guest thread (see [`guests`]).
    ///
    /// The outer error is an abort: a trap, the deadline, a resource cap, or an error
    /// raised by a host call (a lost lock conflict, say); the inner result is the
    /// handler's own answer. Cancel safe: dropping the future drops the instance.
    pub async fn run(
        &self,
        loaded: &Loaded,
        mut ctx: Ctx,
        deadline: Instant,
        method: &str,
        input: &[u8],
    ) -> wasmtime::Result<Result<Vec<u8>, GuestError>> {
        let deadline_ms = self.options.deadline_ms;
        // Calls to other functions run on the caller's (the node's) threads.
        ctx.links = Some(tokio::runtime::Handle::current());
        let function: Arc<str> = ctx.function.name.as_str().into();
        let contention = self.guests.contention();
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|ctx| &mut ctx.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Err(wasmtime::Error::new(Abort::Deadline(deadline_ms)))
            } else if contention.contended() {
                // Give the guest thread to a run waiting for one.
                Ok(UpdateDeadline::Yield(1))
            } else {
                Ok(UpdateDeadline::Continue(1))
            }
        });
        let (pre, method, input) = (loaded.pre.clone(), method.to_owned(), input.to_vec());
        let task = async move {
            // The epoch callback stops wasm code at the deadline; this stops a guest
            // that waits inside a host call (a WASI sleep, say) instead of running.
            let overall = tokio::time::Instant::from_std(deadline + DEADLINE_GRACE);
            let run = async {
                let instance = pre.instantiate_async(&mut store).await?;
                instance
                    .understudy_function_handler()
                    .call_handle(&mut store, &method, &input)
                    .await
            };
            let result = match tokio::time::timeout_at(overall, run).await {
                Ok(result) => result,
                Err(_) => Err(wasmtime::Error::new(Abort::Deadline(deadline_ms))),
            };
            let stderr_tail = store.data_mut().flush_output();
            match result {
                Ok(answer) => Ok(answer.map_err(GuestError::from)),
                Err(error) => Err(with_stderr(store.data(), error, stderr_tail)),
            }
        };
        self.guests
            .spawn(function, tracing::Instrument::in_current_span(task))
            .await
            .map_err(|e| wasmtime::Error::msg(e.to_string()))?
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

/// A trap becomes a `GuestTrap` carrying the end of the guest's stderr, logged at WARN
/// with the function and the transaction (the wasm backtrace at DEBUG). Other errors
/// (the deadline, caps, errors of host calls) pass unchanged.
fn with_stderr(ctx: &Ctx, error: wasmtime::Error, stderr_tail: String) -> wasmtime::Error {
    let Some(trap) = error.downcast_ref::<wasmtime::Trap>() else {
        return error;
    };
    let trap = GuestTrap {
        trap: trap.to_string(),
        stderr_tail,
    };
    let txn = ctx.txn_id();
    tracing::debug!(function = %ctx.function.name, %txn, error = ?error, "guest trapped");
    tracing::warn!(
        function = %ctx.function.name,
        %txn,
        stderr = %guest_log::escape(&trap.stderr_tail),
        "guest trapped: {}",
        trap.trap
    );
    wasmtime::Error::new(trap)
}

/// The engine configuration every node uses: pooled instances, epoch interruption for
/// deadlines, and the stack, memory and table bounds of `options`.
pub fn engine_config(options: &Options) -> Config {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(options.stack_max_bytes)
        .async_stack_size(options.stack_max_bytes + (1 << 20))
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(options)));
    config
}

/// The pooling allocator's configuration in `engine_config` (public for `understudy
/// bench`, which compares it with others).
pub fn pool_config(options: &Options) -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(options.instances_max)
        .total_core_instances(options.instances_max * 2)
        .total_memories(options.instances_max * 2)
        .total_tables(options.instances_max * 2)
        .total_stacks(options.instances_max)
        .max_memory_size(options.memory_max_bytes)
        .table_elements(options.table_elements_max)
        // Keeping memory resident between uses of a slot saves the page faults that
        // dominate a fresh instance (see TOOLCHAIN.md); the next instance still sees
        // the component's initial memory, nothing of the last transaction. Not
        // PAGEMAP_SCAN: wasmtime 48 resets at most 32 written regions that way and
        // unmaps the rest, and an interpreter writes more (`understudy bench --what
        // languages` compares).
        .linear_memory_keep_resident(options.memory_keep_resident_bytes)
        .table_keep_resident(16 << 10)
        .max_unused_warm_slots(WARM_SLOTS_UNUSED_MAX);
    pool
}

/// Tell apart the common mistakes before handing the bytes to the compiler, whose
/// messages are less direct.
fn check_header(bytes: &[u8]) -> Result<(), Error> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(Error::NotWasm);
    }
    // A core module is version 1, layer 0; a component has layer 1.
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(Error::CoreModule);
    }
    Ok(())
}

/// Refuse a component that imports what the host does not provide, before compiling it
/// (seconds for a large one). The linker checks the exact types after compiling.
fn check_imports(bytes: &[u8]) -> Result<(), Error> {
    use wasmparser::{Parser, Payload};
    let invalid = |e: wasmparser::BinaryReaderError| Error::Invalid(e.to_string());
    // Only the outer component's imports: nested modules and components are satisfied
    // inside it.
    let mut depth = 0usize;
    let mut unknown = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            Payload::Version { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(imports) if depth == 1 => {
                for import in imports {
                    let name = import.map_err(invalid)?.name.name;
                    if !IMPORTS_PROVIDED.iter().any(|p| name.starts_with(p)) {
                        unknown.push(name.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    let mut message = format!(
        "{} (the node provides understudy:function's state, call and log, and WASI 0.2's io, \
         clocks, random and cli, with filesystem and sockets linked but nothing granted)",
        unknown.join(", ")
    );
    if unknown.iter().any(|name| name.starts_with("wasi:http/")) {
        message.push_str(
            ". The node does not provide wasi:http: a JavaScript function built with \
             componentize-js imports it unless built with \
             disableFeatures: ['http', 'fetch-event'] (as scripts/componentize-js.mjs does; \
             see docs/guide-js.md)",
        );
    }
    Err(Error::UnknownImport(message))
}

/// Refuse a component whose handler has another type than the world's: its every call
/// would trap.
fn check_handler(engine: &Engine, component: &Component) -> Result<(), Error> {
    use wasmtime::component::types::ComponentItem;
    let wrong =
        |why: String| Error::WrongHandler(format!("{why}; the world requires {HANDLER_TYPE}"));
    let ty = component.component_type();
    let export = ty
        .get_export(engine, HANDLER_EXPORT)
        .ok_or_else(|| Error::MissingExport(format!("no export named {HANDLER_EXPORT}")))?;
    let ComponentItem::ComponentInstance(instance) = export.ty else {
        return Err(wrong(format!("{HANDLER_EXPORT} is not an instance")));
    };
    let Some(handle) = instance.get_export(engine, "handle") else {
        return Err(wrong("it exports no `handle`".into()));
    };
    let ComponentItem::ComponentFunc(func) = handle.ty else {
        return Err(wrong("its `handle` is not a function".into()));
    };
    let params: Vec<_> = func.params().map(|(_, t)| t).collect();
    let results: Vec<_> = func.results().collect();
    let params_ok = matches!(params.as_slice(), [method, input] if matches!(method, Type::String) && is_bytes(input));
    let results_ok = matches!(results.as_slice(), [Type::Result(r)]
        if r.ok().is_some_and(|t| is_bytes(&t)) && r.err().is_some_and(|t| is_error_record(&t)));
    if params_ok && results_ok {
        return Ok(());
    }
    let list = |types: &[Type]| types.iter().map(type_name).collect::<Vec<_>>().join(", ");
    Err(wrong(format!(
        "its `handle` takes ({}) and returns ({})",
        list(&params),
        list(&results)
    )))
}

fn is_bytes(ty: &Type) -> bool {
    matches!(ty, Type::List(l) if matches!(l.ty(), Type::U8))
}

/// The world's `error`: `record { code: string, message: string }`.
fn is_error_record(ty: &Type) -> bool {
    let Type::Record(record) = ty else {
        return false;
    };
    let fields: Vec<_> = record.fields().map(|f| (f.name.to_owned(), f.ty)).collect();
    matches!(fields.as_slice(), [(code, c), (message, m)]
        if code == "code" && message == "message" && matches!(c, Type::String) && matches!(m, Type::String))
}

/// A short WIT-like name of `ty`, for error messages.
fn type_name(ty: &Type) -> String {
    match ty {
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::List(l) => format!("list<{}>", type_name(&l.ty())),
        Type::Option(o) => format!("option<{}>", type_name(&o.ty())),
        Type::Result(r) => format!(
            "result<{}, {}>",
            r.ok().map_or("_".into(), |t| type_name(&t)),
            r.err().map_or("_".into(), |t| type_name(&t))
        ),
        Type::Record(r) => format!(
            "record {{ {} }}",
            r.fields()
                .map(|f| format!("{}: {}", f.name, type_name(&f.ty)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => "another type".into(),
    }
}
