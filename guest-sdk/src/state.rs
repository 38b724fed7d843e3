//! The function's own ordered key-value state.
//!
//! Keys are bytes, ordered bytewise. Values written with [`put`] are JSON, so state
//! stays readable; the `_bytes` variants store bytes as they are. Every read and write
//! belongs to the current transaction: writes are visible to later reads in the same
//! transaction and to nobody else until it commits (see the
//! [crate docs](crate#transactions)).
//!
//! Every function here fails with the host's error when the host refuses the
//! operation: code `limit` when a key or value is too large or the transaction has too
//! many writes.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::understudy::function::state as wit;
use crate::{Error, Result};

/// One entry of a scan: the key and its value.
pub type Entry<T> = (Vec<u8>, T);

/// The value at `key` decoded from JSON, or `None` if there is none.
///
/// # Errors
///
/// Fails with code `bad-state` if the stored value is not JSON of type `T`.
pub fn get<T: DeserializeOwned>(key: impl AsRef<[u8]>) -> Result<Option<T>> {
    let key = key.as_ref();
    get_bytes(key)?.map(|value| decode(key, &value)).transpose()
}

/// Stores `value` at `key` as JSON.
///
/// # Errors
///
/// Fails with code `bad-output` if `value` cannot be written as JSON.
pub fn put<T: Serialize + ?Sized>(key: impl AsRef<[u8]>, value: &T) -> Result<()> {
    let value = serde_json::to_vec(value).map_err(|e| Error::new("bad-output", e.to_string()))?;
    put_bytes(key, value)
}

/// Removes `key`; removing a missing key is not an error.
pub fn delete(key: impl AsRef<[u8]>) -> Result<()> {
    Ok(wit::delete(key.as_ref())?)
}

/// Entries with `start <= key < end` (no upper bound if `end` is `None`) in ascending
/// key order, at most `limit` of them, values decoded from JSON.
///
/// The host may cap `limit`, so a page shorter than `limit` does not prove there are
/// no more: to read everything, scan again from [`key_after`] the last key until a
/// page comes back empty.
///
/// # Errors
///
/// Fails with code `bad-state` if a value is not JSON of type `T`.
pub fn scan<T: DeserializeOwned>(
    start: impl AsRef<[u8]>,
    end: Option<&[u8]>,
    limit: u32,
) -> Result<Vec<Entry<T>>> {
    scan_bytes(start, end, limit)?
        .into_iter()
        .map(|(key, value)| {
            let value = decode(&key, &value)?;
            Ok((key, value))
        })
        .collect()
}

/// Entries whose key starts with `prefix`, in ascending key order, at most `limit`
/// of them, values decoded from JSON. See [`scan`] for paging.
///
/// # Errors
///
/// Fails with code `bad-state` if a value is not JSON of type `T`.
pub fn scan_prefix<T: DeserializeOwned>(
    prefix: impl AsRef<[u8]>,
    limit: u32,
) -> Result<Vec<Entry<T>>> {
    let prefix = prefix.as_ref();
    scan(prefix, prefix_end(prefix).as_deref(), limit)
}

/// The bytes stored at `key`, or `None` if there are none.
pub fn get_bytes(key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
    Ok(wit::get(key.as_ref())?)
}

/// Stores the bytes `value` at `key`.
pub fn put_bytes(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
    Ok(wit::put(key.as_ref(), value.as_ref())?)
}

/// Like [`scan`], with values as stored bytes.
pub fn scan_bytes(
    start: impl AsRef<[u8]>,
    end: Option<&[u8]>,
    limit: u32,
) -> Result<Vec<Entry<Vec<u8>>>> {
    let entries = wit::scan(start.as_ref(), end, limit)?;
    Ok(entries.into_iter().map(|e| (e.key, e.value)).collect())
}

/// Like [`scan_prefix`], with values as stored bytes.
pub fn scan_prefix_bytes(prefix: impl AsRef<[u8]>, limit: u32) -> Result<Vec<Entry<Vec<u8>>>> {
    let prefix = prefix.as_ref();
    scan_bytes(prefix, prefix_end(prefix).as_deref(), limit)
}

/// The exclusive upper bound of the keys that start with `prefix`: the least key
/// greater than all of them. `None` when there is no such key (the prefix is empty or
/// all `0xff`), meaning no upper bound.
///
/// Trailing `0xff` bytes cannot be incremented, so they are dropped first:
/// `prefix_end(b"a\xff") == Some(b"b")`.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&b| b != 0xff)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

/// The least key greater than `key` (`key` followed by a zero byte): where the next
/// page of a scan starts.
pub fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| {
        Error::new(
            "bad-state",
            format!("value at key {:?}: {e}", String::from_utf8_lossy(key)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"acct/"), Some(b"acct0".to_vec()));
        assert_eq!(prefix_end(b"a"), Some(b"b".to_vec()));
    }

    #[test]
    fn prefix_end_drops_trailing_ff() {
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"a\xfe\xff\xff"), Some(b"a\xff".to_vec()));
    }

    #[test]
    fn prefix_end_is_unbounded_for_empty_or_all_ff() {
        assert_eq!(prefix_end(b""), None);
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }

    #[test]
    fn key_after_appends_zero() {
        assert_eq!(key_after(b"k"), b"k\0".to_vec());
    }
}
