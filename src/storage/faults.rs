//! Fail points: named places in the storage code where a test can make the
//! Nth operation fail with an OS error of its choosing (a failed `fsync`,
//! a full disk), for one data directory, while everything else runs for
//! real. Owns only the registry and the check; the storage modules call
//! `hit` just before the operation a point names.
//!
//! With nothing armed (always, outside tests) a check is one relaxed
//! atomic load.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// The operations a test can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// Allocating log space ahead of a write (`posix_fallocate`).
    LogAllocate,
    /// Writing log records.
    LogWrite,
    /// `fdatasync` of the log (by the writer or its sync thread).
    LogSync,
    /// Writing a segment file (a checkpoint).
    SegmentWrite,
    /// `fsync` of a finished segment file.
    SegmentSync,
    /// `fsync` of `MANIFEST.tmp`.
    ManifestSync,
    /// Renaming `MANIFEST.tmp` over `MANIFEST`.
    ManifestRename,
    /// `fsync` of the data directory after that rename.
    ManifestDirSync,
}

struct Armed {
    dir: PathBuf,
    point: FailPoint,
    /// Operations to let through first.
    skip: u64,
    /// Failures still to give (`u64::MAX`: every one from then on).
    times: u64,
    errno: i32,
}

static ANY: AtomicBool = AtomicBool::new(false);
static ARMED: Mutex<Vec<Armed>> = Mutex::new(Vec::new());

/// From the `skip + 1`-th `point` operation on a file under `dir`, fail
/// `times` of them with OS error `errno` (`libc::EIO`, `libc::ENOSPC`, …).
pub fn arm(dir: &Path, point: FailPoint, skip: u64, times: u64, errno: i32) {
    ARMED.lock().push(Armed {
        dir: dir.to_path_buf(),
        point,
        skip,
        times,
        errno,
    });
    ANY.store(true, Ordering::Release);
}

/// Removes every point armed for `dir`.
pub fn disarm(dir: &Path) {
    let mut armed = ARMED.lock();
    armed.retain(|a| a.dir != dir);
    ANY.store(!armed.is_empty(), Ordering::Release);
}

/// Called just before the operation `point` names on `path`: the error a
/// test armed for it, if this is one of the operations to fail.
pub(crate) fn hit(path: &Path, point: FailPoint) -> io::Result<()> {
    if !ANY.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut armed = ARMED.lock();
    for a in armed
        .iter_mut()
        .filter(|a| a.point == point && path.starts_with(&a.dir))
    {
        if a.skip > 0 {
            a.skip -= 1;
        } else if a.times > 0 {
            if a.times != u64::MAX {
                a.times -= 1;
            }
            return Err(io::Error::from_raw_os_error(a.errno));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_fail_the_chosen_operations_of_their_directory_only() {
        let dir = Path::new("/nonexistent/faults-unit-test");
        arm(dir, FailPoint::LogSync, 1, 2, libc::EIO);
        let file = dir.join("wal-1.log");
        assert!(hit(&file, FailPoint::LogSync).is_ok(), "skipped");
        assert!(hit(&file, FailPoint::LogWrite).is_ok(), "another point");
        assert!(hit(Path::new("/elsewhere/wal-1.log"), FailPoint::LogSync).is_ok());
        let e = hit(&file, FailPoint::LogSync).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(hit(&file, FailPoint::LogSync).is_err());
        assert!(hit(&file, FailPoint::LogSync).is_ok(), "two failures only");
        disarm(dir);
        assert!(hit(&file, FailPoint::LogSync).is_ok());
    }
}
