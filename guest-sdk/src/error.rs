//! The error a handler returns and every SDK call fails with: the WIT `error` record
//! as an ordinary Rust error type.

use std::fmt;

use crate::bindings::understudy::function::types::Error as WitError;

/// A structured error: a short machine-readable `code` (`overdraft`, `no-account`,
/// `bad-input`) and a `message` for people.
///
/// Returned from a handler, it aborts the transaction and reaches the client with both
/// fields. Errors from the host keep the host's codes (`limit`, `unknown-function`,
/// `depth`, `trap`, ...), so `?` passes them through unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Error {
    /// A short machine-readable word, such as `overdraft`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with the given code and message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// An error with code `bad-input`: the caller sent something the handler cannot
    /// accept.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(CODE_BAD_INPUT, message)
    }
}

/// Input that does not parse, or that a handler rejects.
pub(crate) const CODE_BAD_INPUT: &str = "bad-input";

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// JSON that does not parse as the expected type is bad input.
impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Self::bad_input(error.to_string())
    }
}

impl From<WitError> for Error {
    fn from(error: WitError) -> Self {
        Self {
            code: error.code,
            message: error.message,
        }
    }
}

impl From<Error> for WitError {
    fn from(error: Error) -> Self {
        Self {
            code: error.code,
            message: error.message,
        }
    }
}
