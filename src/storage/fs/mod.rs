//! The file layer: every operation the engine performs on files and
//! directories goes through a [`FileSystem`], so the same engine runs on the
//! real disk ([`OsFs`], the server's) and in memory ([`MemFs`], for tests),
//! which can be told to fail the Nth write, sync or rename, to report a full
//! disk, or to show what a crash would leave.
//!
//! Owns the operations, never a file format or a file name (those are
//! `wal`, `segment`, `manifest` and `datadir`'s business). Errors are
//! `std::io::Error`s; the callers name the file in the engine's errors.

mod memory;
mod os;

use std::fmt::Debug;
use std::io;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

pub use memory::{MemFs, Op, SyncHold};
pub use os::OsFs;

/// The file operations the engine needs. Paths are absolute or relative
/// to the process's directory, as the data directory was given.
pub trait FileSystem: Send + Sync + Debug {
    /// Creates `dir` and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock of `dir` through its file `lock_name`
    /// (created if missing), held until the returned guard is dropped.
    /// `None` when another holder has it.
    fn lock(&self, dir: &Path, lock_name: &str) -> io::Result<Option<LockGuard>>;
    /// The entries directly in `dir`, in no particular order. A name that is
    /// not UTF-8 is given lossily (it matches none of the store's names).
    fn list(&self, dir: &Path) -> io::Result<Vec<DirEntry>>;
    /// The whole content of a file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Up to `max` bytes of a file from `offset` (fewer at its end, none
    /// past it), for files read a piece at a time while they grow (the
    /// change feed's).
    fn read_at(&self, path: &Path, offset: u64, max: usize) -> io::Result<Vec<u8>>;
    /// The content of a file that is never written again (a segment), to be
    /// read in place for as long as the returned value lives.
    fn map(&self, path: &Path) -> io::Result<Mapped>;
    /// Opens a file for reading a piece at a time. The handle keeps reading
    /// the file after its name is removed (as an open file does on POSIX),
    /// so a backup can copy a log file a checkpoint deletes meanwhile.
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadFile>>;
    /// Creates a file for writing: a new one that must not exist yet
    /// ([`Create::New`]) or one emptied if it does ([`Create::Truncate`]).
    fn create(&self, path: &Path, how: Create) -> io::Result<Arc<dyn WriteFile>>;
    /// Opens an existing file for writing, its content kept.
    fn open_write(&self, path: &Path) -> io::Result<Arc<dyn WriteFile>>;
    /// Renames `from` to `to`, replacing `to` (atomic, as POSIX `rename`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// True when something exists at `path`.
    fn exists(&self, path: &Path) -> bool;
}

/// How [`FileSystem::create`] treats an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// The file must not exist.
    New,
    /// An existing file is emptied.
    Truncate,
}

/// A file open for writing. Positioned writes, so a handle can be shared
/// (the log's sync thread syncs while the writer holds it).
pub trait WriteFile: Send + Sync {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reserves space up to `len` bytes (zeros past the end; the size grows
    /// to `len` when smaller). `ENOSPC` on a full disk; `EOPNOTSUPP` when
    /// the file system cannot.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the content durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the content and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
}

/// A file open for reading (see [`FileSystem::open_read`]).
pub trait ReadFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of
    /// the file (0 at or past it).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Fills `buf` from `offset`; `UnexpectedEof` when the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub is_file: bool,
    /// Bytes, for a file.
    pub len: u64,
}

/// Held while a data directory is locked.
pub struct LockGuard(#[allow(dead_code)] Box<dyn Send + Sync>);

impl Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockGuard")
    }
}

/// A file's bytes read in place: a memory map of a real file, or a shared
/// copy of an in-memory one.
pub struct Mapped(MappedInner);

enum MappedInner {
    Os(memmap2::Mmap),
    Memory(Arc<[u8]>),
}

impl Deref for Mapped {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            MappedInner::Os(m) => m,
            MappedInner::Memory(b) => b,
        }
    }
}

/// Sequential writing over a [`WriteFile`] from an offset, for
/// `std::io::Write` users (wrap it in a `BufWriter`).
pub struct Appender {
    file: Arc<dyn WriteFile>,
    at: u64,
}

impl Appender {
    pub fn new(file: Arc<dyn WriteFile>, at: u64) -> Self {
        Self { file, at }
    }

    /// The file, once everything is written.
    pub fn into_file(self) -> Arc<dyn WriteFile> {
        self.file
    }
}

impl io::Write for Appender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_at(buf, self.at)?;
        self.at += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The real file system, shared.
pub fn os() -> Arc<dyn FileSystem> {
    Arc::new(OsFs)
}
