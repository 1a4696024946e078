//! The data directory as a place: which file system it is on, its lock,
//! syncing it, the size of what it holds, and moving aside files the store
//! does not name. Knows file and folder names, never what is inside a file
//! (that is `wal`, `segment` and `manifest`'s business), and never deletes
//! anything on its own.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::storage::fs::{self, FileSystem, LockGuard};

/// An empty file whose exclusive `flock` keeps a second server off the directory.
pub const LOCK_FILE: &str = "LOCK";
/// Where start-up moves files of the data directory that the store does not
/// name (a segment of a checkpoint that did not finish, or one copied in by
/// hand): a subdirectory of the data directory.
pub const ORPHANS_DIR: &str = "orphaned";

/// A data directory on its file system. Dereferences to its path, so
/// `dir.join(name)` names a file in it; every operation on those files goes
/// through [`DataDir::fs`].
#[derive(Clone, Debug)]
pub struct DataDir {
    fs: Arc<dyn FileSystem>,
    path: PathBuf,
}

impl DataDir {
    pub fn new(fs: Arc<dyn FileSystem>, path: impl Into<PathBuf>) -> Self {
        Self {
            fs,
            path: path.into(),
        }
    }

    /// A directory on the real disk.
    pub fn os(path: impl Into<PathBuf>) -> Self {
        Self::new(fs::os(), path)
    }

    pub fn fs(&self) -> &dyn FileSystem {
        &*self.fs
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The subdirectory `name` of this directory, on the same file system.
    pub fn sub(&self, name: &str) -> DataDir {
        DataDir::new(self.fs.clone(), self.path.join(name))
    }
}

impl Deref for DataDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

/// Creates the directory if missing and takes its lock, held as long as the
/// returned guard lives. Another process holding it: [`Error::Locked`].
pub fn lock(dir: &DataDir) -> Result<LockGuard> {
    dir.fs()
        .create_dir_all(dir)
        .map_err(|e| Error::io(dir.path(), e))?;
    match dir.fs().lock(dir, LOCK_FILE) {
        Ok(Some(guard)) => Ok(guard),
        Ok(None) => Err(Error::Locked(dir.to_path_buf())),
        Err(e) => Err(Error::io(dir.join(LOCK_FILE), e)),
    }
}

/// Syncs a directory, so that file creations, renames and deletions in it are durable.
pub fn fsync_dir(dir: &DataDir) -> Result<()> {
    sync(dir, dir)
}

fn sync(dir: &DataDir, path: &Path) -> Result<()> {
    dir.fs().sync_dir(path).map_err(|e| Error::io(path, e))
}

/// Bytes of the files directly in the directory (what the store keeps on disk).
pub fn disk_bytes(dir: &DataDir) -> u64 {
    dir.fs()
        .list(dir)
        .map(|entries| entries.iter().filter(|e| e.is_file).map(|e| e.len).sum())
        .unwrap_or(0)
}

/// Moves `name` (a file of the data directory) into [`ORPHANS_DIR`], under a
/// name not taken there yet, and syncs both directories. Returns where it is.
pub fn move_aside(dir: &DataDir, name: &str) -> Result<PathBuf> {
    let from = dir.join(name);
    let aside = dir.join(ORPHANS_DIR);
    dir.fs()
        .create_dir_all(&aside)
        .map_err(|e| Error::io(&aside, e))?;
    let mut to = aside.join(name);
    let mut n = 1;
    while dir.fs().exists(&to) {
        to = aside.join(format!("{name}.{n}"));
        n += 1;
    }
    dir.fs()
        .rename(&from, &to)
        .map_err(|e| Error::io(&from, e))?;
    sync(dir, &aside)?;
    fsync_dir(dir)?;
    tracing::warn!(
        from = %from.display(),
        to = %to.display(),
        "moved aside a file the manifest does not name (left by a checkpoint that \
         did not finish, or copied in); delete it once you know it is not needed"
    );
    Ok(to)
}

/// The name of a numbered file: `prefix`, the number as 16 lower-case hex
/// digits, `suffix` (`wal-…log`, `feed-…log`, `events-…tev`).
pub fn numbered_name(prefix: &str, no: u64, suffix: &str) -> String {
    format!("{prefix}{no:016x}{suffix}")
}

/// The number in a name [`numbered_name`] made with `prefix` and `suffix`.
pub fn parse_numbered(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

/// The numbers of the files of `dir` named with `prefix` and `suffix`,
/// ascending.
pub fn list_numbered(dir: &DataDir, prefix: &str, suffix: &str) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = dir
        .fs()
        .list(dir)
        .map_err(|e| Error::io(dir.path(), e))?
        .iter()
        .filter_map(|e| parse_numbered(&e.name, prefix, suffix))
        .collect();
    out.sort_unstable();
    Ok(out)
}
