//! The control plane's directory: the Raft log (with the vote) and the state machine's
//! snapshot, behind openraft's `RaftLogStorage` and `RaftStateMachine`.
//!
//! Layout of the directory:
//!
//! - `raft.log`: the magic `USCTLOG1`, then frames (see `frame`) each holding one
//!   rmp-serde [`log::Record`]: first a header naming the node, then votes, entries,
//!   truncations, purges and commit marks in the order they happened. Replaying it
//!   rebuilds the log. Appends and votes are fsynced before openraft hears they are done;
//!   a purge rewrites the file (temp file, fsync, rename, fsync of the directory).
//! - `snapshot`: the magic `USCSNAP1`, a frame holding the snapshot's meta, a frame
//!   holding the data (the rmp-serde [`ClusterState`](crate::ClusterState)). Written to a
//!   temp file, fsynced and renamed over the old one.
//!
//! The state machine itself lives in memory: on start it is the snapshot plus the
//! committed entries after it, re-applied by openraft. **Invariant:** nothing is reported
//! durable before it was fsynced; a torn tail of `raft.log` (a crash mid-append) is cut
//! off, any other damage stops the node with the file and offset.

pub mod frame;
pub mod log;
pub mod machine;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use log::LogStore;
pub use machine::StateMachine;

use crate::ids::NodeId;
use crate::types::StorageError;

pub const LOG_FILE: &str = "raft.log";
pub const SNAPSHOT_FILE: &str = "snapshot";
const TMP_SUFFIX: &str = ".tmp";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path} belongs to node {found}, not to this node {expected}: wrong directory?")]
    WrongNode {
        path: PathBuf,
        found: NodeId,
        expected: NodeId,
    },
    #[error("cannot encode a record: {0}")]
    Encode(String),
    #[error("the storage task stopped: {0}")]
    Task(String),
}

impl Error {
    fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// As openraft's storage error, which stops Raft: storage failures are fatal.
    pub(crate) fn into_raft(
        self,
        subject: openraft::ErrorSubject<NodeId>,
        verb: openraft::ErrorVerb,
    ) -> StorageError {
        openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&self)).into()
    }
}

/// Create `dir` if needed and delete temp files a crash left behind.
pub fn prepare_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for item in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let item = item.map_err(|e| Error::io(dir, e))?;
        if item.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
            let path = item.path();
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Replace `dir/name` with `bytes` so that a crash leaves either the old file or the new
/// one: write a temp file, fsync it, rename it over, fsync the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let path = dir.join(name);
    let mut file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)
}

/// Make a rename or a file creation in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Run blocking file work off the async workers (an fsync takes milliseconds).
pub(crate) async fn blocking<T, F>(work: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Error> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}
