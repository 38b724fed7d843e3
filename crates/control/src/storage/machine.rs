//! The state machine: the [`ClusterState`] in memory, the last applied log id and
//! membership, and the snapshot file; openraft's `RaftStateMachine`. Every applied batch
//! is published on a `watch` channel, which is how the runtime learns of assignment
//! changes. Snapshots are the serialized `ClusterState`; see the `storage` module for the
//! file.

use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, SnapshotId};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::command::Response;
use crate::state::ClusterState;
use crate::storage::{blocking, frame, write_atomic, Error, SNAPSHOT_FILE};
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

pub const MAGIC: &[u8; 8] = b"USCSNAP1";

/// The state machine handed to openraft.
pub struct StateMachine {
    applied: Option<LogId>,
    membership: StoredMembership,
    state: Arc<ClusterState>,
    publish: watch::Sender<Arc<ClusterState>>,
    snapshots: Arc<Snapshots>,
}

/// The latest snapshot, in memory and on disk.
struct Snapshots {
    dir: PathBuf,
    current: Mutex<Option<Stored>>,
    /// Held while the file is written: openraft may build a snapshot while it installs
    /// one received from the leader.
    writing: Mutex<()>,
    /// Counts the snapshots this node made, so that snapshot ids stay unique.
    seq: AtomicU64,
}

#[derive(Clone)]
struct Stored {
    header: SnapshotHeader,
    data: Vec<u8>,
}

/// The first frame of the snapshot file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SnapshotHeader {
    meta: SnapshotMeta,
    /// Counts the snapshots this node built, so that ids stay unique across restarts.
    seq: u64,
}

/// Builds a snapshot from the state as it was when the builder was made.
pub struct Builder {
    applied: Option<LogId>,
    membership: StoredMembership,
    state: Arc<ClusterState>,
    snapshots: Arc<Snapshots>,
}

impl StateMachine {
    /// Load the snapshot in `dir`, if any, and return the state machine and a receiver
    /// that sees the state after every applied batch.
    ///
    /// Fails when the snapshot file cannot be read or is damaged (it is written
    /// atomically, so damage is not a crash artefact).
    pub fn open(dir: &Path) -> Result<(StateMachine, watch::Receiver<Arc<ClusterState>>), Error> {
        let stored = read_snapshot(dir)?;
        let (applied, membership, state) = match &stored {
            Some(s) => (
                s.header.meta.last_log_id,
                s.header.meta.last_membership.clone(),
                decode_state(&s.data).map_err(|reason| Error::Corrupt {
                    path: dir.join(SNAPSHOT_FILE),
                    offset: 0,
                    reason,
                })?,
            ),
            None => (None, StoredMembership::default(), ClusterState::default()),
        };
        let state = Arc::new(state);
        let (publish, watch) = watch::channel(Arc::clone(&state));
        let seq = AtomicU64::new(stored.as_ref().map_or(0, |s| s.header.seq));
        let snapshots = Arc::new(Snapshots {
            dir: dir.to_path_buf(),
            current: Mutex::new(stored),
            writing: Mutex::new(()),
            seq,
        });
        Ok((
            StateMachine {
                applied,
                membership,
                state,
                publish,
                snapshots,
            },
            watch,
        ))
    }
}

impl Snapshots {
    /// Persist `stored` and make it the current snapshot, unless the current one is newer
    /// (a build that finished after an install of a later snapshot).
    async fn save(self: &Arc<Self>, stored: Stored) -> Result<(), Error> {
        let this = Arc::clone(self);
        blocking(move || {
            let _writing = this.writing.lock();
            let newer = |c: &Stored| c.header.meta.last_log_id > stored.header.meta.last_log_id;
            if this.current.lock().as_ref().is_some_and(newer) {
                return Ok(());
            }
            let mut bytes = MAGIC.to_vec();
            let header = rmp_serde::to_vec_named(&stored.header)
                .map_err(|e| Error::Encode(e.to_string()))?;
            frame::encode(&mut bytes, &header).map_err(Error::Encode)?;
            frame::encode(&mut bytes, &stored.data).map_err(Error::Encode)?;
            write_atomic(&this.dir, SNAPSHOT_FILE, &bytes)?;
            *this.current.lock() = Some(stored);
            Ok(())
        })
        .await
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }
}

fn read_snapshot(dir: &Path) -> Result<Option<Stored>, Error> {
    let path = dir.join(SNAPSHOT_FILE);
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut f) => f.read_to_end(&mut bytes).map_err(|e| Error::io(&path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let corrupt = |offset: usize, reason: String| Error::Corrupt {
        path: path.clone(),
        offset: offset as u64,
        reason,
    };
    if bytes.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(corrupt(0, "not a control snapshot (bad magic)".into()));
    }
    let scan = frame::scan(&bytes, MAGIC.len()).map_err(|d| corrupt(d.offset, d.reason))?;
    if scan.torn.is_some() || scan.payloads.len() != 2 {
        return Err(corrupt(
            scan.len_valid,
            "expected a header frame and a data frame".into(),
        ));
    }
    let header_range = scan.payloads[0].clone();
    let header: SnapshotHeader = rmp_serde::from_slice(&bytes[header_range.clone()])
        .map_err(|e| corrupt(header_range.start, format!("header does not decode: {e}")))?;
    let data = bytes[scan.payloads[1].clone()].to_vec();
    Ok(Some(Stored { header, data }))
}

fn encode_state(state: &ClusterState) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(state).map_err(|e| Error::Encode(e.to_string()))
}

fn decode_state(data: &[u8]) -> Result<ClusterState, String> {
    rmp_serde::from_slice(data).map_err(|e| format!("cluster state does not decode: {e}"))
}

fn snapshot_of(stored: &Stored) -> Snapshot {
    Snapshot {
        meta: stored.header.meta.clone(),
        snapshot: Box::new(Cursor::new(stored.data.clone())),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let subject = || ErrorSubject::Snapshot(None);
        let data =
            encode_state(&self.state).map_err(|e| e.into_raft(subject(), ErrorVerb::Write))?;
        let seq = self.snapshots.next_seq();
        let snapshot_id: SnapshotId = match self.applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, seq),
            None => format!("0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let stored = Stored {
            header: SnapshotHeader { meta, seq },
            data,
        };
        let snapshot = snapshot_of(&stored);
        self.snapshots
            .save(stored)
            .await
            .map_err(|e| e.into_raft(subject(), ErrorVerb::Write))?;
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut next: Option<ClusterState> = None;
        let mut responses = Vec::new();
        for entry in entries {
            self.applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response::Done,
                EntryPayload::Normal(command) => next
                    .get_or_insert_with(|| (*self.state).clone())
                    .apply(&command),
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Response::Done
                }
            };
            responses.push(response);
        }
        if let Some(next) = next {
            self.state = Arc::new(next);
            self.publish.send_replace(Arc::clone(&self.state));
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Builder {
        Builder {
            applied: self.applied,
            membership: self.membership.clone(),
            state: Arc::clone(&self.state),
            snapshots: Arc::clone(&self.snapshots),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let subject = || ErrorSubject::Snapshot(Some(meta.signature()));
        let data = snapshot.into_inner();
        let state = decode_state(&data).map_err(|reason| {
            Error::Corrupt {
                path: PathBuf::from("<received snapshot>"),
                offset: 0,
                reason,
            }
            .into_raft(subject(), ErrorVerb::Read)
        })?;
        let seq = self.snapshots.next_seq();
        let stored = Stored {
            header: SnapshotHeader {
                meta: meta.clone(),
                seq,
            },
            data,
        };
        self.snapshots
            .save(stored)
            .await
            .map_err(|e| e.into_raft(subject(), ErrorVerb::Write))?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.state = Arc::new(state);
        self.publish.send_replace(Arc::clone(&self.state));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.snapshots.current.lock().as_ref().map(snapshot_of))
    }
}
