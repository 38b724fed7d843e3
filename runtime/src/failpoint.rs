//! Failpoints: named places on the two-phase-commit path where a test can make the
//! node die on the spot, as `kill -9` would (nothing more reaches the disk or the
//! network), to check recovery from every step of the protocol.
//!
//! `UNDERSTUDY_FAILPOINT=<name>` dies the first time `<name>` is reached;
//! `<name>@<n>` the n-th time. `UNDERSTUDY_FAILPOINT=file:<path>` reads that spec from
//! the file each time a failpoint is reached (none, while the file is missing or
//! empty), so that a test can arm one node of a running cluster. Without the variable,
//! `hit` is one load of a set-once cell. The names:
//!
//! | name | where |
//! |---|---|
//! | `coordinator-before-prepare` | the handler returned; no participant was asked yet |
//! | `participant-prepared` | a PREPARE record is replicated; the yes vote not sent |
//! | `coordinator-decided` | the COMMIT decision is replicated; nobody was told |
//! | `coordinator-told` | the decision was sent to the participants; the client not answered |
//! | `participant-resolved` | an outcome is written and replicated; the coordinator not told |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The exit status of a node that died at a failpoint.
pub const EXIT_CODE: i32 = 86;

enum Source {
    Fixed(String),
    File(std::path::PathBuf),
}

static SOURCE: OnceLock<Option<Source>> = OnceLock::new();
static REACHED: AtomicU64 = AtomicU64::new(0);

/// The armed failpoint and after how many times it fires, if any.
fn armed() -> Option<(String, u64)> {
    let source = SOURCE
        .get_or_init(|| {
            let spec = std::env::var("UNDERSTUDY_FAILPOINT").ok()?;
            tracing::warn!(failpoint = %spec, "failpoints are armed on this node");
            Some(match spec.strip_prefix("file:") {
                Some(path) => Source::File(path.into()),
                None => Source::Fixed(spec),
            })
        })
        .as_ref()?;
    let spec = match source {
        Source::Fixed(spec) => spec.clone(),
        Source::File(path) => std::fs::read_to_string(path).ok()?.trim().to_owned(),
    };
    if spec.is_empty() {
        return None;
    }
    Some(match spec.split_once('@') {
        Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1).max(1)),
        None => (spec, 1),
    })
}

/// Whether the failpoint `name` is the armed one (to prepare the moment it is hit).
pub fn armed_at(name: &str) -> bool {
    armed().is_some_and(|(point, _)| point == name)
}

/// Exit here if this failpoint is armed and reached for the n-th time.
pub fn hit(name: &str) {
    let Some((point, nth)) = armed() else {
        return;
    };
    if point != name {
        return;
    }
    if REACHED.fetch_add(1, Ordering::AcqRel) + 1 >= nth {
        eprintln!("failpoint {name} reached (time {nth}): exiting at once");
        std::process::exit(EXIT_CODE);
    }
}
