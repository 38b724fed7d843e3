//! Identities: small newtypes so that a log position is never confused with a
//! transaction id, and a function name is checked once, where it enters.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A position in the node's write-ahead log. Positions start at 1; 0 means "nothing".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A transaction's identity, unique on this node for its lifetime. Its order is the
/// transaction's age: a smaller id is an older transaction (used by wait-die).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct TxnId(pub u64);

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// A deployed function's name: 1 to 64 characters of `a-z`, `0-9`, `-` and `_`,
/// starting with a letter, so it is safe in a URL path, a file name and a log line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FunctionName(String);

pub const FUNCTION_NAME_LEN_MAX: usize = 64;

impl FunctionName {
    /// Fails when `name` is empty, too long, or has a character outside the allowed set.
    pub fn new(name: &str) -> Result<FunctionName, String> {
        let valid_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
        if name.is_empty() || name.len() > FUNCTION_NAME_LEN_MAX {
            return Err(format!(
                "function name must be 1 to {FUNCTION_NAME_LEN_MAX} characters, got {}",
                name.len()
            ));
        }
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) || !name.chars().all(valid_char) {
            return Err(format!(
                "function name {name:?} must start with a-z and use only a-z, 0-9, '-' and '_'"
            ));
        }
        Ok(FunctionName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for FunctionName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        FunctionName::new(&s)
    }
}

impl From<FunctionName> for String {
    fn from(n: FunctionName) -> String {
        n.0
    }
}

impl fmt::Display for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sha256 of a component's bytes: its content address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_checked() {
        assert!(FunctionName::new("bank").is_ok());
        assert!(FunctionName::new("bank-2_x").is_ok());
        assert!(FunctionName::new("").is_err());
        assert!(FunctionName::new("Bank").is_err());
        assert!(FunctionName::new("2bank").is_err());
        assert!(FunctionName::new("../etc").is_err());
        assert!(FunctionName::new(&"a".repeat(65)).is_err());
    }
}
