//! Calls to other functions.
//!
//! The callee runs inside the caller's transaction: its writes commit or abort with the
//! caller's. A callee's own error comes back as it returned it; the host's errors use
//! codes `unknown-function`, `stopped`, `depth` (calls nested too deep) and `trap` (the
//! callee trapped).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::understudy::function::call as wit;
use crate::{Error, Result};

/// Invokes `method` of `function` with `input` written as JSON, and reads its output
/// as JSON (empty output reads as `null`).
///
/// # Errors
///
/// Fails with the callee's or the host's error, with code `bad-output` if `input`
/// cannot be written as JSON, and with code `bad-output` if the callee's output does
/// not parse as `Resp`.
pub fn invoke<Req, Resp>(function: &str, method: &str, input: &Req) -> Result<Resp>
where
    Req: Serialize + ?Sized,
    Resp: DeserializeOwned,
{
    let input = serde_json::to_vec(input).map_err(|e| Error::new("bad-output", e.to_string()))?;
    let output = invoke_bytes(function, method, &input)?;
    crate::handler::from_json_or_null(&output).map_err(|e| {
        Error::new(
            "bad-output",
            format!("output of `{function}` method `{method}`: {e}"),
        )
    })
}

/// Invokes `method` of `function` with `input` as bytes and returns its output bytes.
///
/// # Errors
///
/// Fails with the callee's or the host's error.
pub fn invoke_bytes(function: &str, method: &str, input: &[u8]) -> Result<Vec<u8>> {
    Ok(wit::invoke(function, method, input)?)
}
