//! Write Understudy functions in Rust.
//!
//! A function is a WebAssembly component that exports one entry point,
//! `handle(method, input)`, and may read and write its own ordered key-value
//! state, call other functions and log. This crate wraps the WIT world in
//! `wit/function.wit` in a typed API:
//!
//! - [`function!`] declares the methods and their handlers and generates the export.
//!   A handler takes one input parsed from JSON and returns a `Result` of something
//!   serialisable to JSON.
//! - [`state`] reads and writes the function's state; values are JSON, so state stays
//!   readable with ordinary tools. Raw-bytes variants exist for everything.
//! - [`call`] invokes another function's method, JSON in and out.
//! - [`log`] (and the [`info!`], [`warn!`], [`error!`], [`debug!`] macros) write to the
//!   node's log, tagged with the function and the transaction.
//!
//! # Example: a counter
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "counter"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! understudy-sdk = { path = "../guest-sdk" }
//! serde = { version = "1", features = ["derive"] }
//!
//! # A panic traps (and aborts the transaction); small code instantiates fast.
//! [profile.release]
//! panic = "abort"
//! opt-level = "s"
//! lto = true
//! ```
//!
//! `src/lib.rs`:
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use understudy_sdk::{state, Error, Result};
//!
//! understudy_sdk::function! {
//!     "increment" => increment,
//!     "get" => get,
//! }
//!
//! const KEY: &str = "count";
//!
//! /// `increment` accepts no body (JSON `null`), `{}` or `{"by": 5}`.
//! #[derive(Deserialize, Default)]
//! #[serde(default, deny_unknown_fields)]
//! struct IncrementArgs {
//!     by: Option<u64>,
//! }
//!
//! #[derive(Serialize)]
//! struct Count {
//!     value: u64,
//! }
//!
//! fn increment(args: Option<IncrementArgs>) -> Result<Count> {
//!     let by = args.unwrap_or_default().by.unwrap_or(1);
//!     let value = state::get::<u64>(KEY)?.unwrap_or(0);
//!     let value = value
//!         .checked_add(by)
//!         .ok_or_else(|| Error::new("overflow", "the counter would overflow"))?;
//!     state::put(KEY, &value)?;
//!     understudy_sdk::info!("counter is now {value}");
//!     Ok(Count { value })
//! }
//!
//! // `IgnoredAny` accepts any input, including none.
//! fn get(_: serde::de::IgnoredAny) -> Result<Count> {
//!     Ok(Count { value: state::get(KEY)?.unwrap_or(0) })
//! }
//! ```
//!
//! Build it for `wasm32-unknown-unknown` and turn the core module into a component with
//! `wasm-tools component new`; `scripts/build-guests.sh` does both.
//!
//! # Transactions
//!
//! Everything one invocation of a handler does is **one transaction**: every
//! [`state`] read and write, and every [`call`] to another function together with
//! everything that function does in turn (the callee runs inside the caller's
//! transaction).
//!
//! - Writes are visible to later reads in the same transaction, and to nobody else
//!   until it commits.
//! - The handler returning `Ok` commits the transaction: all its writes, and those of
//!   the functions it called, become durable together.
//! - The handler returning `Err`, panicking, or trapping in any other way (running out
//!   of time or memory) aborts it: nothing it wrote remains, in this function or in
//!   any function it called. The same holds if the node dies before the commit.
//!
//! So a handler may write as it goes and simply return an error when it finds that the
//! whole operation cannot be done: it never needs to undo its own writes. The same holds
//! when the handler was called by another function: a callee that returns an error or
//! traps leaves none of its writes behind, and its caller receives the error (code
//! `trap` or `resource-cap` for a trap) and may handle it and go on. Two things end the
//! whole transaction wherever they happen: running past its deadline, and losing a lock
//! conflict to an older transaction (the runtime then retries it from the start).
//!
//! A panic aborts the transaction (guests are built with `panic = "abort"`, so a panic
//! traps). Before it traps, the SDK logs the panic message at `error` level.
//!
//! # Input and output
//!
//! A handler's input type is any `T: DeserializeOwned`. An empty input (a request with
//! no body) is read as JSON `null`, so handlers taking `Option<T>`, `()` or
//! [`serde::de::IgnoredAny`] accept it. Input that does not parse fails with code
//! `bad-input`; an unknown method fails with `unknown-method`. A handler that needs the
//! bytes themselves takes or returns [`Raw`].

pub mod call;
mod error;
mod handler;
pub mod log;
pub mod state;

pub use error::{Error, Result};
pub use handler::{FromInput, IntoOutput, Raw};
pub use serde;
pub use serde_json;

/// Bindings generated from the WIT world `understudy:function/function` by
/// `wit-bindgen`. Use [`state`], [`call`], [`log`] and [`function!`] instead unless you
/// need the raw interface.
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "function",
        pub_export_macro: true,
        export_macro_name: "__export_function",
        default_bindings_module: "understudy_sdk::bindings",
    });
}

/// Declares the function's methods and generates its `handler` export.
///
/// Each entry maps a method name (a string literal) to a handler: any function or
/// closure taking one input `I: `[`FromInput`] (any `DeserializeOwned` type, parsed
/// from JSON, or [`Raw`]) and returning `Result<O, E>` with `O: `[`IntoOutput`] (any
/// `Serialize` type, written as JSON, or [`Raw`]) and `E: Into<`[`Error`]`>`.
///
/// ```no_run
/// # use understudy_sdk::Result;
/// # fn increment(_: Option<u64>) -> Result<u64> { Ok(0) }
/// # fn get(_: ()) -> Result<u64> { Ok(0) }
/// understudy_sdk::function! {
///     "increment" => increment,
///     "get" => get,
/// }
/// ```
///
/// The generated export dispatches on the method name. It fails with code
/// `unknown-method` for a method not listed, and `bad-input` for input that does not
/// parse as the handler's input type. Use it once per crate.
#[macro_export]
macro_rules! function {
    ($($method:literal => $handler:expr),+ $(,)?) => {
        #[doc(hidden)]
        struct __UnderstudyFunction;

        impl $crate::__private::Guest for __UnderstudyFunction {
            fn handle(
                method: $crate::__private::String,
                input: $crate::__private::Vec<u8>,
            ) -> ::core::result::Result<$crate::__private::Vec<u8>, $crate::__private::WitError> {
                $crate::__private::install_panic_hook();
                let output = match method.as_str() {
                    $($method => $crate::__private::dispatch($method, input, $handler),)+
                    _ => ::core::result::Result::Err($crate::__private::unknown_method(
                        &method,
                        &[$($method),+],
                    )),
                };
                output.map_err(::core::convert::Into::into)
            }
        }

        $crate::bindings::__export_function!(__UnderstudyFunction with_types_in $crate::bindings);
    };
}

/// Logs at `info` level, formatting like [`format!`].
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::info(&$crate::__private::format!($($arg)+)) };
}

/// Logs at `warn` level, formatting like [`format!`].
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::warn(&$crate::__private::format!($($arg)+)) };
}

/// Logs at `error` level, formatting like [`format!`].
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::error(&$crate::__private::format!($($arg)+)) };
}

/// Logs at `debug` level, formatting like [`format!`].
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::debug(&$crate::__private::format!($($arg)+)) };
}

/// What the macros expand to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::exports::understudy::function::handler::Guest;
    pub use crate::bindings::understudy::function::types::Error as WitError;
    pub use crate::handler::{dispatch, install_panic_hook, unknown_method};
    pub use std::format;
    pub use std::string::String;
    pub use std::vec::Vec;
}
