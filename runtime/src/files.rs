//! Who may read the data directory: it holds every function's state and remembered
//! answers, so only the node's user. The directory is 0700 and what it holds 0600 (or
//! 0700 for directories), whatever the umask: the node sets its umask to 077 before it
//! creates anything, and tightens at start whatever an older version left readable.
//!
//! Leaves the files themselves to `wal`, `wasm` and `node`, which also create theirs
//! owner-only explicitly.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Modes for directories and files under the data directory.
pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// Make `dir` (created if missing) and everything in it the node's user's alone, and
/// everything the process creates from now on too.
///
/// Fails when `dir` cannot be created, or a mode cannot be set.
pub fn secure_data_dir(dir: &Path) -> std::io::Result<()> {
    restrict_umask();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    tighten(dir)
}

/// Files the process creates from now on get no permissions for group or others.
fn restrict_umask() {
    // SAFETY: umask takes a plain integer, touches no memory and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::umask(0o077);
    }
}

/// Remove group and other permissions from `path` and, for a directory, from what it
/// holds. Symbolic links are left alone (they have no modes of their own).
fn tighten(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_dir() {
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))?;
        }
        for entry in std::fs::read_dir(path)? {
            tighten(&entry?.path())?;
        }
    } else if meta.is_file() && mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tighten_removes_what_others_could_read() {
        let root = tempfile::tempdir().expect("temp dir");
        let data = root.path().join("data");
        std::fs::create_dir_all(data.join("wal")).expect("mkdir");
        std::fs::write(data.join("wal").join("seg"), b"x").expect("write");
        for (path, mode) in [(&data, 0o755), (&data.join("wal"), 0o755)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        std::fs::set_permissions(
            data.join("wal").join("seg"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        tighten(&data).expect("tighten");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("wal")), 0o700);
        assert_eq!(mode(&data.join("wal").join("seg")), 0o600);
    }
}
