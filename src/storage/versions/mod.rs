//! Versions: the store as it was on past days, for reads `AS OF` a day or a
//! log position (`read`). Owns the `history/` directory inside the data
//! directory: a manifest a day (`version-<lsn>.man`, the first checkpoint
//! of each local day, kept whole), the segment files that only those
//! manifests still name, and the log files checkpoints have covered (moved
//! there instead of deleted), all within `history_days`.
//!
//! Start-up never needs `history/`: deleting it loses the history, never
//! the store. This room never writes a file of the main directory; the
//! writer hands it what a checkpoint no longer needs, under the files lock.

pub mod read;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::storage::datadir::{DataDir, fsync_dir, numbered_name, parse_numbered};
use crate::storage::fs::Create;
use crate::storage::manifest::Manifest;
use crate::storage::{segment, wal};

/// The subdirectory of the data directory that holds the history.
pub const HISTORY_DIR: &str = "history";
const PREFIX: &str = "version-";
const SUFFIX: &str = ".man";

/// The default of `history_days`: as long as commercial tag platforms keep
/// daily versions.
pub const DEFAULT_HISTORY_DAYS: u32 = 32;

/// The default of `history_version_bytes`: a read of the past replays at
/// most about 256 MiB of log (a few seconds).
pub const DEFAULT_VERSION_BYTES: u64 = 256 << 20;

/// The history directory of `dir`, on the same file system.
pub fn history_dir(dir: &DataDir) -> DataDir {
    dir.sub(HISTORY_DIR)
}

/// The file name of the version taken at checkpoint `lsn`.
pub fn file_name(lsn: u64) -> String {
    numbered_name(PREFIX, lsn, SUFFIX)
}

/// A kept version: the checkpoint it is, and the segments it names.
#[derive(Debug, Clone)]
pub struct Version {
    /// Every write up to this lsn is in it, none after.
    pub lsn: u64,
    /// When its checkpoint began (every write in it was made before).
    pub at_ms: i64,
    pub segments: HashSet<u64>,
}

/// Where a kept version is, for readers (without its segments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionMark {
    pub lsn: u64,
    pub at_ms: i64,
}

/// The kept versions, oldest first.
#[derive(Debug, Default)]
pub struct Versions {
    list: Vec<Version>,
}

impl Versions {
    /// The versions in `dir`'s history. A version file that cannot be read
    /// is logged and passed over (the store does not need it; reads as of
    /// its days then begin from an older version, or say history begins
    /// later); it is left where it is for the operator to look at.
    pub fn load(dir: &DataDir) -> Result<Versions> {
        let hist = history_dir(dir);
        let entries = match dir.fs().list(&hist) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Versions::default()),
            Err(e) => return Err(Error::io(hist.path(), e)),
        };
        let mut list = Vec::new();
        for e in entries.iter().filter(|e| e.is_file) {
            let Some(lsn) = parse_numbered(&e.name, PREFIX, SUFFIX) else {
                continue;
            };
            let path = hist.join(&e.name);
            let parsed = dir
                .fs()
                .read(&path)
                .map_err(|err| Error::io(&path, err))
                .and_then(|data| Manifest::parse(&path, &data));
            match parsed {
                Ok(m) if m.checkpoint_lsn == lsn => list.push(Version {
                    lsn,
                    at_ms: m.checkpoint_at_ms,
                    segments: m.segments().into_iter().collect(),
                }),
                Ok(m) => tracing::error!(
                    path = %path.display(),
                    "a version file holds the manifest of lsn {}, not {lsn}; it is passed over",
                    m.checkpoint_lsn
                ),
                Err(err) => tracing::error!(
                    error = %err,
                    "a version of the store's history cannot be read; it is passed over"
                ),
            }
        }
        list.sort_by_key(|v| v.lsn);
        Ok(Versions { list })
    }

    pub fn marks(&self) -> Vec<VersionMark> {
        self.list
            .iter()
            .map(|v| VersionMark {
                lsn: v.lsn,
                at_ms: v.at_ms,
            })
            .collect()
    }

    pub fn newest(&self) -> Option<VersionMark> {
        self.list.last().map(|v| VersionMark {
            lsn: v.lsn,
            at_ms: v.at_ms,
        })
    }

    /// Bytes of the history's log files after the newest version (all of
    /// them when none is kept).
    pub fn log_bytes_since_newest(&self, dir: &DataDir) -> u64 {
        let after = self.newest().map_or(0, |v| v.lsn);
        wal::list(&history_dir(dir))
            .map(|files| {
                files
                    .iter()
                    .filter(|f| f.first_lsn > after)
                    .map(|f| f.len)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Whether a kept version names segment `no`.
    pub fn names(&self, no: u64) -> bool {
        self.list.iter().any(|v| v.segments.contains(&no))
    }

    /// Keeps `manifest` (just made current) as a version: written whole to
    /// `history/version-<lsn>.man` (through a `.tmp` file, synced, renamed,
    /// the directory synced), before anything it names could be moved.
    pub fn keep(&mut self, dir: &DataDir, manifest: &Manifest) -> Result<()> {
        let hist = history_dir(dir);
        dir.fs()
            .create_dir_all(&hist)
            .map_err(|e| Error::io(hist.path(), e))?;
        let name = file_name(manifest.checkpoint_lsn);
        let tmp = hist.join(format!("{name}.tmp"));
        let f = dir
            .fs()
            .create(&tmp, Create::Truncate)
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_at(&manifest.to_bytes(), 0)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        let path = hist.join(&name);
        dir.fs()
            .rename(&tmp, &path)
            .map_err(|e| Error::io(&path, e))?;
        // Once the file has its name, a restart may find it: what it names
        // is kept from here on, even if syncing the directory fails.
        self.list.retain(|v| v.lsn != manifest.checkpoint_lsn);
        self.list.push(Version {
            lsn: manifest.checkpoint_lsn,
            at_ms: manifest.checkpoint_at_ms,
            segments: manifest.segments().into_iter().collect(),
        });
        self.list.sort_by_key(|v| v.lsn);
        fsync_dir(&hist)?;
        fsync_dir(dir)
    }

    /// Drops the versions begun before `cutoff_ms` but the newest of them
    /// (all of them when `cutoff_ms` is `None`: history is off), and then
    /// the history's segments no kept version names and its log files
    /// whose every record is at or below the oldest kept version (whose
    /// records no read as of a kept version can need). Returns the files
    /// deleted. A file that cannot be deleted is logged and tried again at
    /// the next checkpoint.
    pub fn prune(&mut self, dir: &DataDir, cutoff_ms: Option<i64>) -> Vec<PathBuf> {
        let hist = history_dir(dir);
        let mut gone = Vec::new();
        let mut remove = |path: PathBuf| match dir.fs().remove(&path) {
            Ok(()) => gone.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not delete a file of the history")
            }
        };
        // A version is dropped once the next one also began before the
        // cutoff: the newest begun before it stays, the base for moments
        // just after the cutoff.
        let next_at: Vec<Option<i64>> = (0..self.list.len())
            .map(|i| self.list.get(i + 1).map(|v| v.at_ms))
            .collect();
        let drop_version = |i: usize| match cutoff_ms {
            None => true,
            Some(cutoff) => next_at[i].is_some_and(|next| next <= cutoff),
        };
        let mut kept = Vec::with_capacity(self.list.len());
        for (i, v) in std::mem::take(&mut self.list).into_iter().enumerate() {
            if drop_version(i) {
                remove(hist.join(file_name(v.lsn)));
            } else {
                kept.push(v);
            }
        }
        self.list = kept;
        if !dir.fs().exists(&hist) {
            return gone;
        }
        if let Ok(nos) = segment::list(&hist) {
            for no in nos.into_iter().filter(|&no| !self.names(no)) {
                remove(hist.join(segment::file_name(no)));
            }
        }
        // A history log file is needed while a record after the oldest
        // version's lsn is in it: while the next file (here or in the main
        // directory) begins after that lsn + 1.
        let oldest = self.list.first().map(|v| v.lsn);
        if let (Ok(old), Ok(new)) = (wal::list(&hist), wal::list(dir)) {
            for (i, f) in old.iter().enumerate() {
                let next_first = old
                    .get(i + 1)
                    .or(new.first())
                    .map(|n| n.first_lsn)
                    .unwrap_or(u64::MAX);
                let unneeded = match oldest {
                    None => true,
                    Some(lsn) => next_first <= lsn.saturating_add(1),
                };
                if unneeded {
                    remove(f.path.clone());
                }
            }
        }
        if !gone.is_empty()
            && let Err(e) = fsync_dir(&hist)
        {
            tracing::warn!(error = %e, "could not sync the history directory");
        }
        gone
    }
}

/// Moves `path`, a file of the main directory a checkpoint no longer
/// needs, into the history (same name). The caller syncs both directories.
pub fn retire(dir: &DataDir, path: &Path) -> Result<()> {
    let hist = history_dir(dir);
    dir.fs()
        .create_dir_all(&hist)
        .map_err(|e| Error::io(hist.path(), e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Internal(format!("{} has no file name", path.display())))?;
    let to = hist.join(name);
    dir.fs().rename(path, &to).map_err(|e| Error::io(path, e))
}

/// Bytes the history holds on disk.
pub fn disk_bytes(dir: &DataDir) -> u64 {
    crate::storage::datadir::disk_bytes(&history_dir(dir))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::fs::{FileSystem, MemFs};

    fn version_at(dir: &DataDir, v: &mut Versions, lsn: u64, at_ms: i64) {
        let m = Manifest {
            checkpoint_lsn: lsn,
            checkpoint_at_ms: at_ms,
            ..Default::default()
        };
        v.keep(dir, &m).unwrap();
    }

    #[test]
    fn prune_keeps_the_newest_version_begun_before_the_cutoff() {
        let fs = MemFs::new();
        fs.create_dir_all(Path::new("/d")).unwrap();
        let dir = DataDir::new(Arc::new(fs), "/d");
        let mut v = Versions::default();
        for (lsn, at) in [(10, 100), (20, 200), (30, 300)] {
            version_at(&dir, &mut v, lsn, at);
        }
        // 250: the version of 200 is the base for moments from 250 to 300.
        v.prune(&dir, Some(250));
        let lsns: Vec<u64> = v.marks().iter().map(|m| m.lsn).collect();
        assert_eq!(lsns, [20, 30]);
        assert!(!dir.fs().exists(&history_dir(&dir).join(file_name(10))));
        // Reloaded from the files: the same.
        let again: Vec<u64> = Versions::load(&dir)
            .unwrap()
            .marks()
            .iter()
            .map(|m| m.lsn)
            .collect();
        assert_eq!(again, [20, 30]);
        // A cutoff past every version keeps the newest; history off keeps none.
        v.prune(&dir, Some(1_000));
        assert_eq!(v.marks().len(), 1);
        v.prune(&dir, None);
        assert!(v.marks().is_empty());
        assert!(Versions::load(&dir).unwrap().marks().is_empty());
    }
}
