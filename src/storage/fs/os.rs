//! The real file system: `std::fs`, `posix_fallocate`, `fdatasync` and
//! memory maps. No fail points: what fails here is the disk.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::{Create, DirEntry, FileSystem, LockGuard, Mapped, MappedInner, ReadFile, WriteFile};

/// The disk, through the operating system.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsFs;

impl FileSystem for OsFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn lock(&self, dir: &Path, lock_name: &str) -> io::Result<Option<LockGuard>> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(lock_name))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(LockGuard(Box::new(file)))),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            // A file removed while we list is simply not there.
            let Ok(meta) = entry.metadata() else { continue };
            out.push(DirEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                is_file: meta.is_file(),
                len: meta.len(),
            });
        }
        Ok(out)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn read_at(&self, path: &Path, offset: u64, max: usize) -> io::Result<Vec<u8>> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let n = len.saturating_sub(offset).min(max as u64) as usize;
        let mut buf = vec![0; n];
        let mut got = 0;
        while got < n {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn map(&self, path: &Path) -> io::Result<Mapped> {
        let file = File::open(path)?;
        // SAFETY: the engine maps only files it never writes again (segments),
        // so the mapped bytes do not change under the map.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        Ok(Mapped(MappedInner::Os(map)))
    }

    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadFile>> {
        Ok(Arc::new(OsReader(File::open(path)?)))
    }

    fn create(&self, path: &Path, how: Create) -> io::Result<Arc<dyn WriteFile>> {
        let mut o = OpenOptions::new();
        o.write(true);
        match how {
            Create::New => o.create_new(true),
            Create::Truncate => o.create(true).truncate(true),
        };
        Ok(Arc::new(OsFile(o.open(path)?)))
    }

    fn open_write(&self, path: &Path) -> io::Result<Arc<dyn WriteFile>> {
        Ok(Arc::new(OsFile(OpenOptions::new().write(true).open(path)?)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

struct OsFile(File);

impl WriteFile for OsFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: posix_fallocate on an open file descriptor we own.
        match unsafe { libc::posix_fallocate(self.0.as_raw_fd(), 0, len) } {
            0 => Ok(()),
            rc => Err(io::Error::from_raw_os_error(rc)),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
}

/// A real file open for reading.
struct OsReader(File);

impl ReadFile for OsReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(&self.0, buf, offset)
    }
}
