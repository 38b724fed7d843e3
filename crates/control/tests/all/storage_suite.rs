//! openraft's own test suite for `RaftLogStorage` and `RaftStateMachine`, run against
//! the file-backed stores.

use openraft::testing::{StoreBuilder, Suite};
use understudy_control::storage::{self, LogStore, StateMachine};
use understudy_control::types::StorageError;
use understudy_control::{NodeId, TypeConfig};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let open = || -> Result<(LogStore, StateMachine), storage::Error> {
            storage::prepare_dir(dir.path())?;
            let log = LogStore::open(dir.path(), NodeId(0))?;
            let (machine, _watch) = StateMachine::open(dir.path())?;
            Ok((log, machine))
        };
        let (log, machine) = open().expect("fresh stores open");
        Ok((dir, log, machine))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft's storage suite failed: {e}");
    }
}
