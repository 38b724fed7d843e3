//! Logging into the node's log, tagged by the host with the function and the
//! transaction. Logging never fails. Log lines are not state: the host writes them as
//! they come, whether or not the transaction later commits.
//!
//! The [`info!`](crate::info), [`warn!`](crate::warn), [`error!`](crate::error) and
//! [`debug!`](crate::debug) macros format like `format!`.

pub use crate::bindings::understudy::function::log::Level;

use crate::bindings::understudy::function::log as wit;

/// Logs `message` at `level`.
pub fn log(level: Level, message: &str) {
    wit::log(level, message);
}

/// Logs `message` at `trace` level.
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Logs `message` at `debug` level.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Logs `message` at `info` level.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Logs `message` at `warn` level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Logs `message` at `error` level.
pub fn error(message: &str) {
    log(Level::Error, message);
}
