//! Snapshots: the whole durable state of a node at one LSN, so that the log before
//! it can be deleted. Written to a temporary file, fsynced, then renamed into place,
//! so a crash leaves either the old snapshot or the new one, never half of one.
//!
//! File: `USSNAP\0\0`, format version u16, two zero bytes, crc32 u32 of the payload,
//! payload length u64, then the payload (an `Image` in rmp-serde, named fields).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::Lsn;
use crate::wal::record::{Deploy, Idempotency};
use crate::wal::Error;

const MAGIC: &[u8; 8] = b"USSNAP\0\0";
const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 24;

/// Everything a node holds, as of `lsn`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub lsn: Lsn,
    pub functions: Vec<FunctionImage>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionImage {
    pub deploy: Deploy,
    pub running: bool,
    pub entries: Vec<Entry>,
    pub idempotency: Vec<Idempotency>,
    /// The function's own log position (see `store::Function::seq`). Added after format
    /// version 1's first files: absent means 0.
    #[serde(default)]
    pub seq: u64,
    /// The epoch of the entry at `seq` (see `store::Function::epoch_last`); absent on a
    /// single node, which means 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch_last: u64,
    /// Parts of distributed transactions prepared and not yet resolved (two-phase commit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prepared: Vec<crate::wal::record::Prepare>,
    /// As coordinator: committed distributed transactions not every participant has
    /// confirmed, with their participants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decided: Vec<(crate::ids::TxnId, Vec<crate::ids::FunctionName>)>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

pub fn file_name(lsn: Lsn) -> String {
    format!("snap-{:020}.snap", lsn.0)
}

pub fn parse_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_prefix("snap-")?.strip_suffix(".snap")?;
    digits.parse().ok().map(Lsn)
}

/// Write `image` durably into `dir`. Fails on any I/O error; the previous snapshot
/// stays valid in that case.
pub fn write(dir: &Path, image: &Image) -> Result<PathBuf, Error> {
    let payload = rmp_serde::to_vec_named(image).expect("images always encode");
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&[0, 0]);
    bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);

    let path = dir.join(file_name(image.lsn));
    let tmp = dir.join(format!("{}.tmp", file_name(image.lsn)));
    let io = |e| Error::Io {
        path: tmp.clone(),
        source: e,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    // Sync before renaming: a rename that reaches the disk before the data would
    // leave an empty snapshot in place of the log it replaces.
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, &path).map_err(io)?;
    sync_dir(dir)?;
    Ok(path)
}

/// Read and verify the snapshot at `path`. Fails with `Error::Corrupt` naming the
/// file when its header, length or checksum is wrong.
pub fn read(path: &Path) -> Result<Image, Error> {
    let bytes = fs::read(path).map_err(|e| Error::Io {
        path: path.to_owned(),
        source: e,
    })?;
    let corrupt = |offset: u64, why: String| Error::Corrupt {
        path: path.to_owned(),
        offset,
        why,
    };
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(corrupt(0, "not a snapshot (bad magic or too short)".into()));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(corrupt(
            8,
            format!("snapshot format version {version}, this build reads {FORMAT_VERSION}"),
        ));
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(corrupt(
            16,
            format!("payload is {} bytes, header says {len}", payload.len()),
        ));
    }
    if crc32fast::hash(payload) != crc {
        return Err(corrupt(
            HEADER_LEN as u64,
            "snapshot checksum mismatch".into(),
        ));
    }
    rmp_serde::from_slice(payload)
        .map_err(|e| corrupt(HEADER_LEN as u64, format!("snapshot does not decode: {e}")))
}

/// Make a directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::Io {
            path: dir.to_owned(),
            source: e,
        })
}
