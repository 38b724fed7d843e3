//! The machinery behind [`function!`](crate::function): reading a handler's input,
//! writing its output, and reporting panics. The macro owns dispatch by method name;
//! this module owns what happens to one method's bytes.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::CODE_BAD_INPUT;
use crate::{Error, Result};

/// A handler's input or output as the bytes themselves, neither parsed nor written as
/// JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Raw(pub Vec<u8>);

/// What a handler can take as input.
///
/// Implemented for every `DeserializeOwned` type (parsed from JSON, with empty input
/// read as `null`) and for [`Raw`].
pub trait FromInput: Sized {
    /// Reads the input.
    ///
    /// # Errors
    ///
    /// Fails with code `bad-input` when the input does not parse.
    fn from_input(input: Vec<u8>) -> Result<Self>;
}

/// What a handler can return.
///
/// Implemented for every `Serialize` type (written as JSON) and for [`Raw`].
pub trait IntoOutput {
    /// Writes the output.
    ///
    /// # Errors
    ///
    /// Fails with code `bad-output` when the value cannot be written as JSON (a map
    /// with non-string keys, say).
    fn into_output(self) -> Result<Vec<u8>>;
}

impl<T: DeserializeOwned> FromInput for T {
    fn from_input(input: Vec<u8>) -> Result<Self> {
        Ok(from_json_or_null(&input)?)
    }
}

impl FromInput for Raw {
    fn from_input(input: Vec<u8>) -> Result<Self> {
        Ok(Raw(input))
    }
}

impl<T: Serialize> IntoOutput for T {
    fn into_output(self) -> Result<Vec<u8>> {
        serde_json::to_vec(&self).map_err(|e| Error::new("bad-output", e.to_string()))
    }
}

impl IntoOutput for Raw {
    fn into_output(self) -> Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Runs one handler on one input.
#[doc(hidden)]
pub fn dispatch<I, O, E>(
    method: &str,
    input: Vec<u8>,
    handler: impl FnOnce(I) -> Result<O, E>,
) -> Result<Vec<u8>>
where
    I: FromInput,
    O: IntoOutput,
    E: Into<Error>,
{
    let input = I::from_input(input).map_err(|e| {
        if e.code == CODE_BAD_INPUT {
            Error::bad_input(format!("input of `{method}`: {}", e.message))
        } else {
            e
        }
    })?;
    handler(input).map_err(Into::into)?.into_output()
}

/// The error for a method the function does not have.
#[doc(hidden)]
pub fn unknown_method(method: &str, known: &[&str]) -> Error {
    Error::new(
        "unknown-method",
        format!(
            "no method `{method}`; this function has: {}",
            known.join(", ")
        ),
    )
}

/// Parses JSON, reading empty (or all-blank) input as `null`.
pub(crate) fn from_json_or_null<T: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_slice(b"null")
    } else {
        serde_json::from_slice(bytes)
    }
}

/// Makes a panic log its message before it traps, so the node's log says why the
/// transaction aborted. Cheap after the first call.
#[doc(hidden)]
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            crate::log::error(&format!("panic: {info}"));
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_reads_as_null() {
        assert_eq!(from_json_or_null::<Option<u8>>(b"").ok(), Some(None));
        assert_eq!(from_json_or_null::<Option<u8>>(b" \n").ok(), Some(None));
        assert_eq!(from_json_or_null::<Option<u8>>(b"7").ok(), Some(Some(7)));
    }

    #[test]
    fn dispatch_writes_output_as_json() {
        let out = dispatch("m", b"{\"a\":1}".to_vec(), |v: serde_json::Value| {
            Ok::<_, Error>(v["a"].clone())
        });
        assert_eq!(out, Ok(b"1".to_vec()));
    }

    #[test]
    fn dispatch_rejects_bad_json_as_bad_input() {
        let out = dispatch("m", b"{".to_vec(), |v: u8| Ok::<_, Error>(v));
        assert_eq!(out.map_err(|e| e.code), Err("bad-input".to_string()));
    }

    #[test]
    fn dispatch_passes_raw_bytes_through() {
        let out = dispatch("m", vec![0xff, 0], |r: Raw| Ok::<_, Error>(r));
        assert_eq!(out, Ok(vec![0xff, 0]));
    }

    #[test]
    fn unknown_method_names_the_known_ones() {
        let e = unknown_method("x", &["a", "b"]);
        assert_eq!(e.code, "unknown-method");
        assert!(e.message.contains("a, b"), "{}", e.message);
    }
}
