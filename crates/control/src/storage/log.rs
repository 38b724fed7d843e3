//! The Raft log and vote, in memory for reads and in `raft.log` for durability:
//! openraft's `RaftLogStorage` (and the `RaftLogReader` its replication tasks use).
//! The file is a journal of [`Record`]s; replaying it in order rebuilds the log. See the
//! `storage` module for the format and the durability rules.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, RaftLogReader};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::storage::{blocking, frame, write_atomic, Error, LOG_FILE};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

pub const MAGIC: &[u8; 8] = b"USCTLOG1";

/// One entry of the `raft.log` journal.
#[derive(Debug, Serialize, Deserialize)]
pub enum Record {
    /// Always the first record: whose log this is.
    Header {
        node_id: NodeId,
    },
    Vote(Vote),
    Entry(Entry),
    /// Entries from this index on are gone (a new leader overwrote them).
    Truncate {
        since: u64,
    },
    /// Entries up to and including this id are gone (covered by the snapshot).
    Purge {
        upto: LogId,
    },
    /// The highest committed entry known. A hint for a faster start, not fsynced on its own.
    Committed(Option<LogId>),
}

/// The log store handed to openraft; clones share the same log.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

struct Shared {
    /// What readers see. Changed only while `file` is held, after the file was written,
    /// so its order of changes is the file's.
    mem: RwLock<Mem>,
    file: Mutex<Journal>,
}

#[derive(Default)]
struct Mem {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

struct Journal {
    dir: PathBuf,
    path: PathBuf,
    node_id: NodeId,
    file: File,
    /// Where the good records end: a failed write is cut back to here, so that a later
    /// start does not find a half record in the middle of the file.
    len: u64,
}

impl LogStore {
    /// Open `dir/raft.log`, or create it for `node_id`, and replay it.
    ///
    /// Fails when the file belongs to another node, is damaged before its tail, or cannot
    /// be read or written.
    pub fn open(dir: &Path, node_id: NodeId) -> Result<LogStore, Error> {
        let path = dir.join(LOG_FILE);
        if !path.exists() {
            write_atomic(dir, LOG_FILE, &fresh_log(node_id)?)?;
        }
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| Error::io(&path, e))?;
        let (mem, len_valid) = replay(&path, &bytes, node_id)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if len_valid < bytes.len() {
            // Cut the torn tail so that new records follow the last good one.
            file.set_len(len_valid as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
        let journal = Journal {
            dir: dir.to_path_buf(),
            path,
            node_id,
            file,
            len: len_valid as u64,
        };
        Ok(LogStore {
            shared: Arc::new(Shared {
                mem: RwLock::new(mem),
                file: Mutex::new(journal),
            }),
        })
    }

    /// Run `work` on the journal off the async workers, then update memory with `then`.
    async fn write<F, M>(&self, work: F, then: M) -> Result<(), Error>
    where
        F: FnOnce(&mut Journal) -> Result<(), Error> + Send + 'static,
        M: FnOnce(&mut Mem) + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let mut journal = shared.file.lock();
            work(&mut journal)?;
            then(&mut shared.mem.write());
            Ok(())
        })
        .await
    }
}

impl Journal {
    /// Append `records` and, when `sync`, fsync before returning.
    fn append(&mut self, records: &[Record], sync: bool) -> Result<(), Error> {
        let mut bytes = Vec::new();
        for record in records {
            frame::encode(&mut bytes, &encode(record)?).map_err(Error::Encode)?;
        }
        let written = self.file.write_all(&bytes).and_then(|()| {
            // Sync before acking: an unsynced ack can lose a vote or an entry on crash.
            if sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Best effort: the node stops on this error either way.
            let _ = self.file.set_len(self.len);
            return Err(Error::io(&self.path, e));
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Rewrite the file with only what `mem` holds, atomically.
    fn compact(&mut self, mem: &Mem) -> Result<(), Error> {
        let mut bytes = fresh_log(self.node_id)?;
        let mut put = |record: &Record| -> Result<(), Error> {
            frame::encode(&mut bytes, &encode(record)?).map_err(Error::Encode)?;
            Ok(())
        };
        if let Some(vote) = mem.vote {
            put(&Record::Vote(vote))?;
        }
        if let Some(upto) = mem.last_purged {
            put(&Record::Purge { upto })?;
        }
        for entry in mem.entries.values() {
            put(&Record::Entry(entry.clone()))?;
        }
        put(&Record::Committed(mem.committed))?;
        write_atomic(&self.dir, LOG_FILE, &bytes)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        self.len = bytes.len() as u64;
        Ok(())
    }
}

/// The bytes of a log that holds nothing yet.
fn fresh_log(node_id: NodeId) -> Result<Vec<u8>, Error> {
    let mut bytes = MAGIC.to_vec();
    frame::encode(&mut bytes, &encode(&Record::Header { node_id })?).map_err(Error::Encode)?;
    Ok(bytes)
}

fn encode(record: &Record) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(record).map_err(|e| Error::Encode(e.to_string()))
}

/// Rebuild the log from the journal `bytes`; also where the good frames end.
fn replay(path: &Path, bytes: &[u8], node_id: NodeId) -> Result<(Mem, usize), Error> {
    let corrupt = |offset: usize, reason: String| Error::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    if bytes.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(corrupt(0, "not a control log (bad magic)".into()));
    }
    let scan = frame::scan(bytes, MAGIC.len()).map_err(|d| corrupt(d.offset, d.reason))?;
    if let Some(torn) = &scan.torn {
        tracing::warn!(path = %path.display(), %torn, "cutting the torn tail of the control log");
    }
    let mut mem = Mem::default();
    for (i, range) in scan.payloads.iter().enumerate() {
        let record: Record = rmp_serde::from_slice(&bytes[range.clone()])
            .map_err(|e| corrupt(range.start, format!("record does not decode: {e}")))?;
        match record {
            Record::Header { node_id: found } if i == 0 => {
                if found != node_id {
                    return Err(Error::WrongNode {
                        path: path.to_path_buf(),
                        found,
                        expected: node_id,
                    });
                }
            }
            _ if i == 0 => {
                return Err(corrupt(
                    range.start,
                    "first record is not the header".into(),
                ))
            }
            Record::Header { .. } => return Err(corrupt(range.start, "a second header".into())),
            Record::Vote(vote) => mem.vote = Some(vote),
            Record::Entry(entry) => {
                let index = entry.log_id.index;
                let expected = mem.next_index();
                if expected.is_some_and(|e| e != index) {
                    return Err(corrupt(
                        range.start,
                        format!("entry {index} where {expected:?} was due"),
                    ));
                }
                mem.entries.insert(index, entry);
            }
            Record::Truncate { since } => {
                mem.entries.split_off(&since);
            }
            Record::Purge { upto } => mem.purge(upto),
            Record::Committed(committed) => mem.committed = committed,
        }
    }
    if scan.payloads.is_empty() {
        return Err(corrupt(MAGIC.len(), "no header record".into()));
    }
    Ok((mem, scan.len_valid))
}

impl Mem {
    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(self.last_purged)
    }

    /// The index the next appended entry must have, if the log constrains it.
    fn next_index(&self) -> Option<u64> {
        self.last_log_id().map(|id| id.index + 1)
    }

    fn purge(&mut self, upto: LogId) {
        self.entries = self.entries.split_off(&(upto.index.saturating_add(1)));
        if self.last_purged.is_none_or(|p| p.index < upto.index) {
            self.last_purged = Some(upto);
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        let mem = self.shared.mem.read();
        Ok(mem
            .entries
            .range(start..end)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mem = self.shared.mem.read();
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: mem.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.write(
            move |journal| journal.append(&[Record::Vote(vote)], true),
            move |mem| mem.vote = Some(vote),
        )
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.shared.mem.read().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: a lost commit mark only means re-applying later, once the leader
        // says again what is committed. It becomes durable with the next synced append.
        self.write(
            move |journal| journal.append(&[Record::Committed(committed)], false),
            move |mem| mem.committed = committed,
        )
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let mem = self.shared.mem.read();
        // A commit mark never points past the entries the journal holds, but check
        // rather than trust the file: re-applying a missing entry would stop the node.
        Ok(mem
            .committed
            .filter(|c| mem.last_log_id().is_some_and(|last| c.index <= last.index)))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let records: Vec<Record> = entries.into_iter().map(Record::Entry).collect();
        let first = records.first().and_then(|r| match r {
            Record::Entry(e) => Some(e.log_id),
            _ => None,
        });
        let shared = Arc::clone(&self.shared);
        let result = blocking(move || {
            let mut journal = shared.file.lock();
            journal.append(&records, true)?;
            let mut mem = shared.mem.write();
            for record in records {
                if let Record::Entry(entry) = record {
                    mem.entries.insert(entry.log_id.index, entry);
                }
            }
            Ok(())
        })
        .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                let subject = first.map_or(ErrorSubject::Logs, ErrorSubject::Log);
                Err(e.into_raft(subject, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let since = log_id.index;
        self.write(
            move |journal| journal.append(&[Record::Truncate { since }], true),
            move |mem| {
                mem.entries.split_off(&since);
            },
        )
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let mut journal = shared.file.lock();
            shared.mem.write().purge(log_id);
            // The purge is the moment to drop what the file no longer needs.
            journal.compact(&shared.mem.read())
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}
