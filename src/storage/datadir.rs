//! The data directory as a place: its lock, syncing it, the size of what it
//! holds, and moving aside files the store does not name. Knows file and
//! folder names, never what is inside a file (that is `wal`, `segment` and
//! `manifest`'s business), and never deletes anything on its own.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An empty file whose exclusive `flock` keeps a second server off the directory.
pub const LOCK_FILE: &str = "LOCK";
/// Where start-up moves files of the data directory that the store does not
/// name (a segment of a checkpoint that did not finish, or one copied in by
/// hand): a subdirectory of the data directory.
pub const ORPHANS_DIR: &str = "orphaned";

/// Creates `dir` if missing and takes its lock, held as long as the
/// returned file is open. Another process holding it: [`Error::Locked`].
pub fn lock(dir: &Path) -> Result<File> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(Error::Locked(dir.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

/// Syncs a directory, so that file creations, renames and deletions in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Bytes of the files directly in `dir` (what the store keeps on disk).
pub fn disk_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Moves `name` (a file of the data directory) into [`ORPHANS_DIR`], under a
/// name not taken there yet, and syncs both directories. Returns where it is.
pub fn move_aside(dir: &Path, name: &str) -> Result<PathBuf> {
    let from = dir.join(name);
    let aside = dir.join(ORPHANS_DIR);
    fs::create_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
    let mut to = aside.join(name);
    let mut n = 1;
    while to.exists() {
        to = aside.join(format!("{name}.{n}"));
        n += 1;
    }
    fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
    fsync_dir(&aside)?;
    fsync_dir(dir)?;
    tracing::warn!(
        from = %from.display(),
        to = %to.display(),
        "moved aside a file the manifest does not name (left by a checkpoint that \
         did not finish, or copied in); delete it once you know it is not needed"
    );
    Ok(to)
}
