//! Log segments on disk: the frame format, and reading a segment back with the
//! distinction between a torn tail (cut off and reported) and corruption (fatal).
//!
//! A segment is a 16-byte header (`USWAL\0`, format version u16, first LSN u64) and
//! frames: `[payload length u32][crc32 u32][lsn u64][payload]`, little-endian, the
//! checksum covering the LSN and the payload. This module does no I/O of its own:
//! it encodes into and decodes from byte slices.

use std::path::{Path, PathBuf};

use crate::ids::Lsn;
use crate::wal::record::Record;
use crate::wal::Error;

pub const MAGIC: &[u8; 6] = b"USWAL\0";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
pub const FRAME_HEADER_LEN: usize = 16;
/// A record larger than this is corruption, not data: transactions are capped far below.
pub const RECORD_LEN_MAX: usize = 256 << 20;

pub fn file_name(lsn_first: Lsn) -> String {
    format!("wal-{:020}.log", lsn_first.0)
}

/// The first LSN of a segment named by `file_name`, or `None` for other files.
pub fn parse_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    digits.parse().ok().map(Lsn)
}

pub fn encode_header(lsn_first: Lsn) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..6].copy_from_slice(MAGIC);
    header[6..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&lsn_first.0.to_le_bytes());
    header
}

pub fn encode_payload(record: &Record) -> Vec<u8> {
    rmp_serde::to_vec_named(record)
        .expect("records always encode: plain data, no maps with non-string keys")
}

/// Append one frame holding `payload` at `lsn` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, lsn: Lsn, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("record length is capped far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(lsn, payload).to_le_bytes());
    out.extend_from_slice(&lsn.0.to_le_bytes());
    out.extend_from_slice(payload);
}

fn checksum(lsn: Lsn, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.0.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// What reading a segment found.
#[derive(Debug)]
pub struct Scan {
    pub records: Vec<(Lsn, Record)>,
    /// Where the valid frames end. Shorter than the file when the tail was torn.
    pub len_valid: u64,
    /// Why the tail was cut, when it was.
    pub torn: Option<String>,
}

/// Decode the segment `bytes` read from `path`, expecting its first frame at
/// `lsn_first`. A bad frame followed by no valid frame is a torn tail when
/// `is_last` (the crash happened while it was written); anything else is corruption.
///
/// Fails when the header is wrong, when a frame in the middle is damaged, or when a
/// frame with a good checksum does not decode.
pub fn scan(path: &Path, bytes: &[u8], lsn_first: Lsn, is_last: bool) -> Result<Scan, Error> {
    let corrupt = |offset: usize, why: String| Error::Corrupt {
        path: PathBuf::from(path),
        offset: offset as u64,
        why,
    };
    if bytes.len() < HEADER_LEN {
        if is_last {
            return Ok(Scan {
                records: Vec::new(),
                len_valid: 0,
                torn: Some("segment header incomplete".into()),
            });
        }
        return Err(corrupt(
            0,
            format!("segment is {} bytes, shorter than its header", bytes.len()),
        ));
    }
    if &bytes[..6] != MAGIC {
        return Err(corrupt(0, "not a log segment (bad magic)".into()));
    }
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    if version != FORMAT_VERSION {
        return Err(corrupt(
            6,
            format!("log format version {version}, this build reads {FORMAT_VERSION}"),
        ));
    }
    let header_lsn = Lsn(u64::from_le_bytes(
        bytes[8..16].try_into().expect("8 bytes"),
    ));
    if header_lsn != lsn_first {
        return Err(corrupt(
            8,
            format!("header says first LSN {header_lsn}, file name says {lsn_first}"),
        ));
    }

    let mut records = Vec::new();
    let mut offset = HEADER_LEN;
    let mut lsn_expected = lsn_first;
    while offset < bytes.len() {
        match frame_at(bytes, offset, lsn_expected) {
            Ok((payload, next)) => {
                let record: Record = rmp_serde::from_slice(payload).map_err(|e| {
                    corrupt(
                        offset,
                        format!(
                            "record {lsn_expected} has a good checksum but does not decode: {e}"
                        ),
                    )
                })?;
                records.push((lsn_expected, record));
                lsn_expected = lsn_expected.next();
                offset = next;
            }
            Err(why) => {
                if !is_last {
                    return Err(corrupt(offset, why));
                }
                if let Some(later) = find_valid_frame_after(bytes, offset + 1, lsn_expected) {
                    return Err(corrupt(offset, format!("{why}; a valid frame follows at offset {later}, so this is not a torn tail")));
                }
                let torn = format!(
                    "{why} at offset {offset}; cut {} bytes of torn tail",
                    bytes.len() - offset
                );
                return Ok(Scan {
                    records,
                    len_valid: offset as u64,
                    torn: Some(torn),
                });
            }
        }
    }
    Ok(Scan {
        records,
        len_valid: offset as u64,
        torn: None,
    })
}

/// The payload of the frame at `offset` and the offset after it, or why it is bad.
fn frame_at(bytes: &[u8], offset: usize, lsn_expected: Lsn) -> Result<(&[u8], usize), String> {
    let rest = &bytes[offset..];
    if rest.len() < FRAME_HEADER_LEN {
        return Err(format!(
            "frame header incomplete ({} of {FRAME_HEADER_LEN} bytes)",
            rest.len()
        ));
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let lsn = Lsn(u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes")));
    if len > RECORD_LEN_MAX {
        return Err(format!(
            "frame length {len} exceeds the maximum {RECORD_LEN_MAX}"
        ));
    }
    if rest.len() < FRAME_HEADER_LEN + len {
        return Err(format!(
            "frame payload incomplete ({} of {len} bytes)",
            rest.len() - FRAME_HEADER_LEN
        ));
    }
    let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    if checksum(lsn, payload) != crc {
        return Err("frame checksum mismatch".into());
    }
    if lsn != lsn_expected {
        return Err(format!("frame has LSN {lsn}, expected {lsn_expected}"));
    }
    Ok((payload, offset + FRAME_HEADER_LEN + len))
}

/// The offset of a frame with a good checksum and a plausible LSN at or after
/// `from`, if there is one. Such a frame after a bad one means the damage is in the
/// middle of the log, not at its torn end.
fn find_valid_frame_after(bytes: &[u8], from: usize, lsn_expected: Lsn) -> Option<usize> {
    const LSN_WINDOW: u64 = 1 << 20;
    (from..bytes.len().saturating_sub(FRAME_HEADER_LEN)).find(|&offset| {
        let rest = &bytes[offset..];
        let lsn = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
        let plausible = lsn >= lsn_expected.0 && lsn < lsn_expected.0 + LSN_WINDOW;
        plausible && frame_at(bytes, offset, Lsn(lsn)).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{FunctionName, TxnId};
    use crate::wal::record::{Commit, Op, Writes};

    fn commit(n: u64) -> Record {
        Record::Commit(Commit {
            txn: TxnId(n),
            writes: vec![Writes {
                function: FunctionName::new("f").expect("valid"),
                ops: vec![Op {
                    key: b"k".to_vec(),
                    value: Some(n.to_le_bytes().to_vec()),
                }],
            }],
            idempotency: None,
            epochs: Vec::new(),
            decision: None,
        })
    }

    fn segment(n: u64) -> Vec<u8> {
        let mut bytes = encode_header(Lsn(1)).to_vec();
        for i in 1..=n {
            encode_frame(&mut bytes, Lsn(i), &encode_payload(&commit(i)));
        }
        bytes
    }

    #[test]
    fn records_round_trip() {
        let bytes = segment(5);
        let scan = scan(Path::new("x"), &bytes, Lsn(1), true).expect("valid segment");
        assert_eq!(scan.records.len(), 5);
        assert_eq!(scan.records[4], (Lsn(5), commit(5)));
        assert!(scan.torn.is_none());
        assert_eq!(scan.len_valid, bytes.len() as u64);
    }

    #[test]
    fn torn_tail_is_cut() {
        let bytes = segment(5);
        for cut in 1..30 {
            let torn = &bytes[..bytes.len() - cut];
            let scan = scan(Path::new("x"), torn, Lsn(1), true).expect("torn tail recovers");
            assert_eq!(scan.records.len(), 4, "cut {cut}");
            assert!(scan.torn.is_some());
        }
    }

    #[test]
    fn corruption_in_the_middle_is_fatal() {
        let mut bytes = segment(5);
        bytes[HEADER_LEN + FRAME_HEADER_LEN + 3] ^= 0x40;
        let err = scan(Path::new("seg"), &bytes, Lsn(1), true).expect_err("corruption detected");
        let Error::Corrupt { offset, .. } = err else {
            panic!("wrong error {err}")
        };
        assert_eq!(offset, HEADER_LEN as u64);
    }

    #[test]
    fn damage_in_an_older_segment_is_fatal_even_at_its_end() {
        let bytes = segment(5);
        let err = scan(Path::new("seg"), &bytes[..bytes.len() - 2], Lsn(1), false);
        assert!(matches!(err, Err(Error::Corrupt { .. })));
    }
}

/// Golden files: a log segment and a snapshot written by format version 1 must keep
/// decoding to exactly these records. Regenerate only when adding a format version
/// (keep the old files and their tests): `UNDERSTUDY_WRITE_GOLDEN=1 cargo test golden`.
#[cfg(test)]
mod golden {
    use super::*;
    use crate::ids::{Digest, FunctionName, TxnId};
    use crate::wal::record::{Commit, Deploy, Idempotency, Op, Outcome, Writes};
    use crate::wal::snapshot::{self, Entry, FunctionImage, Image};

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden");

    fn name(s: &str) -> FunctionName {
        FunctionName::new(s).expect("valid name")
    }

    fn deploy() -> Deploy {
        Deploy {
            function: name("bank"),
            digest: Digest([7; 32]),
            version: 3,
            at_ms: 1_790_000_000_000,
            calls: Default::default(),
        }
    }

    fn records() -> Vec<Record> {
        vec![
            Record::Deploy(deploy()),
            Record::Commit(Commit {
                txn: TxnId(42),
                writes: vec![Writes {
                    function: name("bank"),
                    ops: vec![
                        Op {
                            key: b"acct/alice".to_vec(),
                            value: Some(b"70".to_vec()),
                        },
                        Op {
                            key: b"acct/bob".to_vec(),
                            value: None,
                        },
                    ],
                }],
                idempotency: Some(Idempotency {
                    function: name("bank"),
                    request: None,
                    key: "transfer-1".into(),
                    outcome: Outcome::Ok(b"{\"ok\":true}".to_vec()),
                    at_ms: 1_790_000_000_001,
                }),
                epochs: Vec::new(),
                decision: None,
            }),
            Record::Commit(Commit {
                txn: TxnId(43),
                writes: vec![],
                idempotency: Some(Idempotency {
                    function: name("bank"),
                    request: None,
                    key: "transfer-2".into(),
                    outcome: Outcome::Err {
                        code: "overdraft".into(),
                        message: "no".into(),
                    },
                    at_ms: 1_790_000_000_002,
                }),
                epochs: Vec::new(),
                decision: None,
            }),
            Record::SetRunning {
                function: name("bank"),
                running: false,
            },
            Record::Delete {
                function: name("bank"),
            },
        ]
    }

    fn image() -> Image {
        Image {
            lsn: Lsn(5),
            functions: vec![FunctionImage {
                deploy: deploy(),
                running: true,
                entries: vec![Entry {
                    key: b"acct/alice".to_vec(),
                    value: b"70".to_vec(),
                }],
                idempotency: vec![],
                seq: 0,
                epoch_last: 0,
                prepared: vec![],
                decided: vec![],
            }],
        }
    }

    #[test]
    fn golden_log_segment_v1_decodes() {
        let path = Path::new(DIR).join(file_name(Lsn(1)));
        if std::env::var_os("UNDERSTUDY_WRITE_GOLDEN").is_some() {
            let mut bytes = encode_header(Lsn(1)).to_vec();
            for (i, record) in records().iter().enumerate() {
                encode_frame(&mut bytes, Lsn(i as u64 + 1), &encode_payload(record));
            }
            std::fs::create_dir_all(DIR).expect("golden dir");
            std::fs::write(&path, bytes).expect("write golden");
        }
        let bytes = std::fs::read(&path).expect("golden segment present");
        let scan = scan(&path, &bytes, Lsn(1), false).expect("golden segment decodes");
        let decoded: Vec<Record> = scan.records.into_iter().map(|(_, r)| r).collect();
        assert_eq!(decoded, records());
    }

    #[test]
    fn golden_snapshot_v1_decodes() {
        let path = Path::new(DIR).join(snapshot::file_name(Lsn(5)));
        if std::env::var_os("UNDERSTUDY_WRITE_GOLDEN").is_some() {
            std::fs::create_dir_all(DIR).expect("golden dir");
            snapshot::write(Path::new(DIR), &image()).expect("write golden");
        }
        assert_eq!(
            snapshot::read(&path).expect("golden snapshot decodes"),
            image()
        );
    }
}
