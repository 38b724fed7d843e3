//! Golden files guard the on-disk and on-wire formats: a control directory and messages
//! written by format version 1 must keep decoding. `UNDERSTUDY_BLESS=1` rewrites them
//! (only when a format change is intended, with a new version in the file names).

use std::path::{Path, PathBuf};

use understudy_control::storage::{LOG_FILE, SNAPSHOT_FILE};
use understudy_control::{
    Assignment, ClusterState, Command, Epoch, ForwardError, NodeId, RaftMessage, RaftReply,
    Response, Role,
};

use crate::support::{member, within, Cluster};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn blessing() -> bool {
    std::env::var_os("UNDERSTUDY_BLESS").is_some()
}

/// What the golden directory's node applied: registration by `initialize`, then these.
fn history() -> (Vec<Command>, Vec<Command>) {
    let deploy = |name: &str| Command::Deploy {
        name: name.into(),
        digest: [0xab; 32],
        replicas: 1,
        calls: Default::default(),
    };
    let before_snapshot = vec![
        deploy("bank"),
        deploy("ledger"),
        Command::SetRunning {
            name: "ledger".into(),
            running: false,
        },
    ];
    let after_snapshot = vec![
        deploy("audit"),
        Command::Delete {
            name: "bank".into(),
        },
    ];
    (before_snapshot, after_snapshot)
}

fn expected_state() -> ClusterState {
    let (node_id, node) = member(1, Role::Voter);
    let mut state = ClusterState::default();
    let register = Command::RegisterNode {
        id: node_id,
        peer_addr: node.peer_addr,
        http_addr: node.http_addr,
        role: node.role,
    };
    let (before, after) = history();
    for command in std::iter::once(&register).chain(&before).chain(&after) {
        state.apply(command);
    }
    state
}

async fn bless_directory(target: &Path) -> anyhow::Result<()> {
    let cluster = Cluster::new();
    let planes = cluster.form(&[(1, Role::Voter)]).await?;
    let (before, after) = history();
    for command in before {
        within(5, planes[0].propose(command)).await??;
    }
    within(5, planes[0].snapshot_now()).await??;
    let snapshot = cluster.dir(NodeId(1)).join(SNAPSHOT_FILE);
    crate::support::eventually(
        std::time::Duration::from_secs(5),
        "the snapshot is written",
        || snapshot.exists(),
    )
    .await?;
    for command in after {
        within(5, planes[0].propose(command)).await??;
    }
    cluster.crash(&planes[0]).await;
    std::fs::create_dir_all(target)?;
    for file in [LOG_FILE, SNAPSHOT_FILE] {
        std::fs::copy(cluster.dir(NodeId(1)).join(file), target.join(file))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_control_directory_still_starts() -> anyhow::Result<()> {
    let source = golden("control-v1");
    if blessing() {
        bless_directory(&source).await?;
    }
    let cluster = Cluster::new();
    let dir = cluster.dir(NodeId(1));
    std::fs::create_dir_all(&dir)?;
    for file in [LOG_FILE, SNAPSHOT_FILE] {
        std::fs::copy(source.join(file), dir.join(file))?;
    }
    let plane = cluster.start(1).await?;
    assert_eq!(*plane.state(), expected_state());
    crate::support::eventually(
        std::time::Duration::from_secs(5),
        "the loaded snapshot shows in the metrics",
        || plane.metrics().borrow().snapshot.is_some(),
    )
    .await?;
    Ok(())
}

fn golden_messages() -> (RaftMessage, RaftReply, RaftReply) {
    let propose = RaftMessage::Propose(Command::Promote {
        function: "bank".into(),
        new_primary: NodeId(2),
        expected_epoch: Epoch(7),
    });
    let applied = RaftReply::Propose(Ok(Response::Assigned {
        function: "bank".into(),
        assignment: Assignment {
            epoch: Epoch(8),
            primary: NodeId(2),
            backups: vec![NodeId(3)],
            catching_up: vec![NodeId(4)],
        },
    }));
    let refused = RaftReply::Propose(Err(ForwardError::NotLeader {
        leader: Some(NodeId(1)),
        leader_addr: Some("10.0.0.1:7000".into()),
    }));
    (propose, applied, refused)
}

#[test]
fn version_1_wire_messages_still_decode() -> anyhow::Result<()> {
    let (propose, applied, refused) = golden_messages();
    let files = [
        ("wire-v1-propose.bin", propose.encode()?),
        ("wire-v1-reply-applied.bin", applied.encode()?),
        ("wire-v1-reply-not-leader.bin", refused.encode()?),
    ];
    for (name, bytes) in &files {
        if blessing() {
            std::fs::write(golden(name), bytes)?;
        }
        let old = std::fs::read(golden(name))?;
        assert_eq!(&old, bytes, "{name}: the encoding changed");
    }
    let decoded = RaftMessage::decode(&std::fs::read(golden(files[0].0))?)?;
    assert_eq!(format!("{decoded:?}"), format!("{propose:?}"));
    let decoded = RaftReply::decode(&std::fs::read(golden(files[1].0))?)?;
    assert_eq!(format!("{decoded:?}"), format!("{applied:?}"));
    let decoded = RaftReply::decode(&std::fs::read(golden(files[2].0))?)?;
    assert_eq!(format!("{decoded:?}"), format!("{refused:?}"));
    Ok(())
}
