//! The durable mark: how far the log was known to be on disk, kept in a small file
//! beside it, so that recovery can tell a torn tail from a log cut short.
//!
//! A crash can only tear what was not yet fsynced, and nothing unsynced was ever
//! acknowledged (with `Durability::Disk`). But a segment cut short (a bad copy, a full
//! disk during a restore, a careless operator) looks exactly like a torn tail: its last
//! frame is incomplete. The mark tells them apart: after the log has grown by
//! `MARK_INTERVAL_BYTES` since the last mark, the writer records the LSN and segment
//! offset it has just fsynced; a log that recovers to an LSN below the mark lost
//! records that were durable, and the node refuses to start rather than serve without
//! them. A cut that stays within the last `MARK_INTERVAL_BYTES` goes unnoticed.
//!
//! The file is 36 bytes: `USMARK\0` and a format version byte, then the LSN, the
//! segment's first LSN and the offset in it (u64 each), and a crc32 of the 32 bytes
//! before it, little-endian. It is overwritten in place: a torn write fails the
//! checksum and the mark is ignored (with a warning).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::ids::Lsn;

pub const FILE_NAME: &str = "durable.mark";
/// How much durable log separates two marks: a cut shorter than this past the last
/// mark goes unnoticed; each mark costs one 36-byte write and an fsync.
pub const MARK_INTERVAL_BYTES: u64 = 1 << 20;
const MAGIC: &[u8; 8] = b"USMARK\0\x01";
const LEN: usize = 36;

/// A position the log held durably.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub lsn: Lsn,
    /// The first LSN of the segment holding `lsn` (its file name).
    pub segment_first: Lsn,
    /// Where that segment's durable bytes ended.
    pub offset: u64,
}

impl Mark {
    pub fn encode(&self) -> [u8; LEN] {
        let mut bytes = [0u8; LEN];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..16].copy_from_slice(&self.lsn.0.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.segment_first.0.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.offset.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..32]);
        bytes[32..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// `None` when `bytes` is not a whole mark with a good checksum.
    pub fn decode(bytes: &[u8]) -> Option<Mark> {
        if bytes.len() != LEN || &bytes[..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(bytes[32..].try_into().ok()?);
        if crc32fast::hash(&bytes[..32]) != crc {
            return None;
        }
        let u64_at = |at: usize| bytes[at..at + 8].try_into().ok().map(u64::from_le_bytes);
        Some(Mark {
            lsn: Lsn(u64_at(8)?),
            segment_first: Lsn(u64_at(16)?),
            offset: u64_at(24)?,
        })
    }
}

/// Open (or create, owner-only) the mark file in `dir` for the writer.
pub fn open(dir: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(FILE_NAME))
}

/// Overwrite the mark and make it durable. Call only once everything up to `mark`
/// is fsynced.
pub fn write(file: &File, mark: &Mark) -> std::io::Result<()> {
    file.write_all_at(&mark.encode(), 0)?;
    file.sync_data()
}

/// The mark in `dir`: `Ok(None)` when there is none (a new log, or one the operator
/// accepted as it is), `Err(why)` when it is unreadable or damaged.
pub fn read(dir: &Path) -> Result<Option<Mark>, String> {
    let path = dir.join(FILE_NAME);
    match std::fs::read(&path) {
        Ok(bytes) if bytes.is_empty() => Ok(None),
        Ok(bytes) => Mark::decode(&bytes)
            .map(Some)
            .ok_or_else(|| format!("{}: damaged durable mark ignored", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}; durable mark ignored", path.display())),
    }
}

/// Forget the mark in `dir`: the operator accepts the log as it is, records lost to a
/// cut included. Returns the mark that was there.
///
/// Fails on I/O errors other than there being no mark.
pub fn forget(dir: &Path) -> std::io::Result<Option<Mark>> {
    let mark = read(dir).ok().flatten();
    match std::fs::remove_file(dir.join(FILE_NAME)) {
        Ok(()) => Ok(mark),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_round_trips_and_damage_is_detected() {
        let mark = Mark {
            lsn: Lsn(12345),
            segment_first: Lsn(100),
            offset: 1 << 21,
        };
        let mut bytes = mark.encode();
        assert_eq!(Mark::decode(&bytes), Some(mark));
        bytes[20] ^= 1;
        assert_eq!(Mark::decode(&bytes), None);
        assert_eq!(Mark::decode(&bytes[..10]), None);
    }
}
