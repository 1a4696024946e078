//! A file system in memory, for tests. It keeps, for every file, what was
//! written and what was last synced, and for every directory, which names a
//! sync of the directory made durable. So it can show what a crash at this
//! moment would leave ([`MemFs::crash_image`]: unsynced bytes and unsynced
//! creations, renames and removals are gone), fail chosen operations
//! ([`MemFs::fail`]), and run out of space ([`MemFs::set_capacity`]).
//!
//! Simplifications, each on the safe side for the engine's tests: creating
//! a directory is durable at once; a sync of a file makes all of it durable
//! (content and size); the space an unlinked file still holds open is not
//! counted.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Create, DirEntry, FileSystem, LockGuard, Mapped, MappedInner, ReadFile, WriteFile};

/// The operations [`MemFs::fail`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Creating or opening a file for writing.
    Create,
    /// Writing into a file.
    Write,
    /// Allocating space ahead (`posix_fallocate`).
    Allocate,
    /// Cutting or extending a file.
    SetLen,
    /// Syncing a file (`fdatasync` or `fsync`).
    Sync,
    /// Renaming; matched on the new name.
    Rename,
    /// Removing a file.
    Remove,
    /// Syncing a directory; matched on the directory's own name.
    SyncDir,
}

/// An in-memory file system; clones share it.
#[derive(Clone, Default)]
pub struct MemFs(Arc<Mutex<Inner>>);

impl std::fmt::Debug for MemFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.0.lock();
        f.debug_struct("MemFs")
            .field("entries", &inner.names.len())
            .field("capacity", &inner.capacity)
            .finish()
    }
}

#[derive(Default)]
struct Inner {
    /// Every file and directory, as a process sees them now.
    names: BTreeMap<PathBuf, Node>,
    /// The entries a crash would leave: as of the last sync of each
    /// directory.
    durable: BTreeMap<PathBuf, Node>,
    locks: HashSet<PathBuf>,
    faults: Vec<Fault>,
    capacity: Option<u64>,
    /// Syncs held back until released ([`MemFs::hold_syncs`]).
    holds: Vec<(String, Arc<Gate>)>,
}

/// A gate syncs wait at while it is closed.
#[derive(Default)]
struct Gate {
    /// (released, syncs waiting now)
    state: Mutex<(bool, usize)>,
    opened: parking_lot::Condvar,
}

impl Gate {
    fn pass(&self) {
        let mut st = self.state.lock();
        st.1 += 1;
        while !st.0 {
            self.opened.wait(&mut st);
        }
        st.1 -= 1;
    }
}

/// Syncs of some files held back: a disk that takes its time, at the
/// moment a test chooses ([`MemFs::hold_syncs`]). Dropped, it lets them go.
pub struct SyncHold(Arc<Gate>);

impl SyncHold {
    /// Syncs waiting at the gate now.
    pub fn waiting(&self) -> usize {
        self.0.state.lock().1
    }
}

impl Drop for SyncHold {
    fn drop(&mut self) {
        self.0.state.lock().0 = true;
        self.0.opened.notify_all();
    }
}

#[derive(Clone)]
enum Node {
    Dir,
    File(Arc<Mutex<FileState>>),
}

#[derive(Default)]
struct FileState {
    data: Vec<u8>,
    /// What a crash would leave of `data`.
    synced: Vec<u8>,
    /// Bytes written since the last sync, as `start..end`; `Some` also when
    /// only the size changed.
    dirty: Option<(usize, usize)>,
}

impl FileState {
    fn touch(&mut self, start: usize, end: usize) {
        self.dirty = Some(match self.dirty {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
    }

    fn sync(&mut self) {
        if let Some((start, end)) = self.dirty.take() {
            self.synced.resize(self.data.len(), 0);
            let end = end.min(self.data.len());
            if start < end {
                self.synced[start..end].copy_from_slice(&self.data[start..end]);
            }
        }
    }

    fn resize(&mut self, len: usize) {
        let old = self.data.len();
        self.data.resize(len, 0);
        self.touch(old.min(len), old.max(len));
    }
}

struct Fault {
    op: Op,
    prefix: String,
    skip: u64,
    times: u64,
    errno: i32,
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

impl Inner {
    /// The error a fault armed for `op` on `path` gives now, if any.
    fn check(&mut self, op: Op, path: &Path) -> io::Result<()> {
        let name = name_of(path);
        for f in self
            .faults
            .iter_mut()
            .filter(|f| f.op == op && name.starts_with(&f.prefix))
        {
            if f.skip > 0 {
                f.skip -= 1;
            } else if f.times > 0 {
                if f.times != u64::MAX {
                    f.times -= 1;
                }
                return Err(io::Error::from_raw_os_error(f.errno));
            }
        }
        Ok(())
    }

    fn used(&self) -> u64 {
        self.names
            .values()
            .map(|n| match n {
                Node::File(f) => f.lock().data.len() as u64,
                Node::Dir => 0,
            })
            .sum()
    }

    /// `ENOSPC` when `file` growing to `len` bytes does not fit.
    fn room(&self, file: &Mutex<FileState>, len: u64) -> io::Result<()> {
        let Some(cap) = self.capacity else {
            return Ok(());
        };
        let current = file.lock().data.len() as u64;
        if len > current && self.used() + (len - current) > cap {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    fn parent_is_dir(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(p) if p.as_os_str().is_empty() => Ok(()),
            Some(p) if matches!(self.names.get(p), Some(Node::Dir)) => Ok(()),
            Some(p) => Err(not_found(p)),
            None => Err(not_found(path)),
        }
    }

    fn file(&self, path: &Path) -> io::Result<Arc<Mutex<FileState>>> {
        match self.names.get(path) {
            Some(Node::File(f)) => Ok(f.clone()),
            Some(Node::Dir) => Err(io::Error::from_raw_os_error(libc::EISDIR)),
            None => Err(not_found(path)),
        }
    }
}

impl MemFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// From the `skip + 1`-th `op` on a file whose name starts with
    /// `name_prefix` (`""`: any file) on, fail `times` of them (`u64::MAX`:
    /// all) with OS error `errno` (`libc::EIO`, `libc::ENOSPC`, …).
    pub fn fail(&self, op: Op, name_prefix: &str, skip: u64, times: u64, errno: i32) {
        self.0.lock().faults.push(Fault {
            op,
            prefix: name_prefix.to_string(),
            skip,
            times,
            errno,
        });
    }

    /// Failures armed and not yet given (a test that walks every step
    /// knows it has passed the last one when its failure was never given).
    pub fn faults_pending(&self) -> u64 {
        self.0.lock().faults.iter().map(|f| f.times).sum()
    }

    /// Holds back every sync of a file whose name starts with `name_prefix`
    /// from now until the returned hold is dropped (the syncing thread
    /// waits; nothing fails).
    pub fn hold_syncs(&self, name_prefix: &str) -> SyncHold {
        let gate = Arc::new(Gate::default());
        let mut inner = self.0.lock();
        inner.holds.retain(|(_, g)| !g.state.lock().0);
        inner.holds.push((name_prefix.to_string(), gate.clone()));
        SyncHold(gate)
    }

    /// Removes every armed failure.
    pub fn clear_faults(&self) {
        self.0.lock().faults.clear();
    }

    /// The disk's size in bytes of file content (`None`: unbounded): a write,
    /// allocation or extension beyond it fails with `ENOSPC`.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.0.lock().capacity = bytes;
    }

    /// Bytes of file content now.
    pub fn used_bytes(&self) -> u64 {
        self.0.lock().used()
    }

    /// What a crash (of the machine, not just the process) at this moment
    /// would leave: a new file system with the entries made durable by
    /// directory syncs, each file holding what was last synced of it. No
    /// locks, no armed failures; the same capacity.
    pub fn crash_image(&self) -> MemFs {
        self.image(None)
    }

    /// [`MemFs::crash_image`], except that files whose name starts with
    /// `name_prefix` keep everything written to them, synced or not: the
    /// kernel happened to write their pages back before the crash, and
    /// those of every other file not.
    pub fn crash_image_written_back(&self, name_prefix: &str) -> MemFs {
        self.image(Some(name_prefix))
    }

    fn image(&self, written_back: Option<&str>) -> MemFs {
        let inner = self.0.lock();
        let names: BTreeMap<PathBuf, Node> = inner
            .durable
            .iter()
            .map(|(p, n)| {
                let n = match n {
                    Node::Dir => Node::Dir,
                    Node::File(f) => {
                        let f = f.lock();
                        let kept = if written_back.is_some_and(|w| name_of(p).starts_with(w)) {
                            f.data.clone()
                        } else {
                            f.synced.clone()
                        };
                        Node::File(Arc::new(Mutex::new(FileState {
                            data: kept.clone(),
                            synced: kept,
                            dirty: None,
                        })))
                    }
                };
                (p.clone(), n)
            })
            .collect();
        MemFs(Arc::new(Mutex::new(Inner {
            durable: names.clone(),
            names,
            capacity: inner.capacity,
            ..Default::default()
        })))
    }
}

impl FileSystem for MemFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut inner = self.0.lock();
        for d in dir.ancestors().filter(|d| !d.as_os_str().is_empty()) {
            match inner.names.get(d) {
                Some(Node::Dir) => {}
                Some(Node::File(_)) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                None => {
                    inner.names.insert(d.to_path_buf(), Node::Dir);
                    inner.durable.insert(d.to_path_buf(), Node::Dir);
                }
            }
        }
        Ok(())
    }

    fn lock(&self, dir: &Path, lock_name: &str) -> io::Result<Option<LockGuard>> {
        self.create(&dir.join(lock_name), Create::Truncate)?;
        let mut inner = self.0.lock();
        if !inner.locks.insert(dir.to_path_buf()) {
            return Ok(None);
        }
        Ok(Some(LockGuard(Box::new(MemLock {
            fs: self.clone(),
            dir: dir.to_path_buf(),
        }))))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let inner = self.0.lock();
        if !matches!(inner.names.get(dir), Some(Node::Dir)) {
            return Err(not_found(dir));
        }
        Ok(inner
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, n)| DirEntry {
                name: name_of(p),
                is_file: matches!(n, Node::File(_)),
                len: match n {
                    Node::File(f) => f.lock().data.len() as u64,
                    Node::Dir => 0,
                },
            })
            .collect())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.0.lock().file(path)?;
        let data = file.lock().data.clone();
        Ok(data)
    }

    fn read_at(&self, path: &Path, offset: u64, max: usize) -> io::Result<Vec<u8>> {
        let file = self.0.lock().file(path)?;
        let f = file.lock();
        let from = (offset as usize).min(f.data.len());
        let to = from.saturating_add(max).min(f.data.len());
        Ok(f.data[from..to].to_vec())
    }

    fn map(&self, path: &Path) -> io::Result<Mapped> {
        let data = self.read(path)?;
        Ok(Mapped(MappedInner::Memory(data.into())))
    }

    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadFile>> {
        let node = self.0.lock().file(path)?;
        Ok(Arc::new(MemReader(node)))
    }

    fn create(&self, path: &Path, how: Create) -> io::Result<Arc<dyn WriteFile>> {
        let mut inner = self.0.lock();
        inner.check(Op::Create, path)?;
        inner.parent_is_dir(path)?;
        let node = match (inner.names.get(path), how) {
            (Some(_), Create::New) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ));
            }
            (Some(_), Create::Truncate) => {
                let f = inner.file(path)?;
                f.lock().resize(0);
                f
            }
            (None, _) => {
                let f = Arc::new(Mutex::new(FileState::default()));
                inner
                    .names
                    .insert(path.to_path_buf(), Node::File(f.clone()));
                f
            }
        };
        Ok(Arc::new(MemFile {
            fs: self.clone(),
            path: path.to_path_buf(),
            node,
        }))
    }

    fn open_write(&self, path: &Path) -> io::Result<Arc<dyn WriteFile>> {
        let mut inner = self.0.lock();
        inner.check(Op::Create, path)?;
        let node = inner.file(path)?;
        Ok(Arc::new(MemFile {
            fs: self.clone(),
            path: path.to_path_buf(),
            node,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut inner = self.0.lock();
        inner.check(Op::Rename, to)?;
        inner.parent_is_dir(to)?;
        if matches!(inner.names.get(to), Some(Node::Dir)) {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        let node = inner.names.remove(from).ok_or_else(|| not_found(from))?;
        inner.names.insert(to.to_path_buf(), node);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.0.lock();
        inner.check(Op::Remove, path)?;
        inner.file(path)?;
        inner.names.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut inner = self.0.lock();
        inner.check(Op::SyncDir, dir)?;
        if !matches!(inner.names.get(dir), Some(Node::Dir)) {
            return Err(not_found(dir));
        }
        let Inner { names, durable, .. } = &mut *inner;
        durable.retain(|p, _| p.parent() != Some(dir) || names.contains_key(p));
        for (p, n) in names.iter().filter(|(p, _)| p.parent() == Some(dir)) {
            durable.insert(p.clone(), n.clone());
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.0.lock().names.contains_key(path)
    }
}

struct MemLock {
    fs: MemFs,
    dir: PathBuf,
}

impl Drop for MemLock {
    fn drop(&mut self) {
        self.fs.0.lock().locks.remove(&self.dir);
    }
}

/// A handle on an in-memory file. It keeps writing to the file after the
/// file's name is removed or the file system is crash-imaged, as a real
/// handle would.
struct MemFile {
    fs: MemFs,
    path: PathBuf,
    node: Arc<Mutex<FileState>>,
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

impl WriteFile for MemFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut inner = self.fs.0.lock();
        inner.check(Op::Write, &self.path)?;
        let start = to_usize(offset)?;
        let end = start + buf.len();
        inner.room(&self.node, end as u64)?;
        let mut f = self.node.lock();
        if f.data.len() < end {
            f.resize(end);
        }
        f.data[start..end].copy_from_slice(buf);
        f.touch(start, end);
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut inner = self.fs.0.lock();
        inner.check(Op::Allocate, &self.path)?;
        inner.room(&self.node, len)?;
        let mut f = self.node.lock();
        let len = to_usize(len)?;
        if f.data.len() < len {
            f.resize(len);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut inner = self.fs.0.lock();
        inner.check(Op::SetLen, &self.path)?;
        inner.room(&self.node, len)?;
        self.node.lock().resize(to_usize(len)?);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let name = name_of(&self.path);
        let held: Vec<Arc<Gate>> = (self.fs.0.lock().holds.iter())
            .filter(|(prefix, _)| name.starts_with(prefix.as_str()))
            .map(|(_, g)| g.clone())
            .collect();
        for gate in held {
            gate.pass();
        }
        let mut inner = self.fs.0.lock();
        inner.check(Op::Sync, &self.path)?;
        self.node.lock().sync();
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// An in-memory file open for reading: it reads the file's content as
/// writes leave it, also after its name is removed.
struct MemReader(Arc<Mutex<FileState>>);

impl ReadFile for MemReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let f = self.0.lock();
        let from = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(f.data.len());
        let n = buf.len().min(f.data.len() - from);
        buf[..n].copy_from_slice(&f.data[from..from + n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (MemFs, PathBuf) {
        let fs = MemFs::new();
        let d = PathBuf::from("/mem/store");
        fs.create_dir_all(&d).unwrap();
        (fs, d)
    }

    #[test]
    fn a_crash_keeps_synced_bytes_and_entries_of_synced_directories_only() {
        let (fs, d) = dir();
        let a = fs.create(&d.join("a"), Create::New).unwrap();
        a.write_at(b"hello", 0).unwrap();
        a.sync_data().unwrap();
        a.write_at(b" world", 5).unwrap();
        // Not in the directory yet: the creation was never synced.
        assert!(!fs.crash_image().exists(&d.join("a")));
        fs.sync_dir(&d).unwrap();
        let img = fs.crash_image();
        assert_eq!(img.read(&d.join("a")).unwrap(), b"hello");
        assert_eq!(fs.read(&d.join("a")).unwrap(), b"hello world");
        // A rename is durable only once the directory is synced.
        fs.rename(&d.join("a"), &d.join("b")).unwrap();
        let img = fs.crash_image();
        assert!(img.exists(&d.join("a")) && !img.exists(&d.join("b")));
        fs.sync_dir(&d).unwrap();
        let img = fs.crash_image();
        assert!(!img.exists(&d.join("a")) && img.exists(&d.join("b")));
        // Truncation is the file's content: durable with its sync.
        a.set_len(2).unwrap();
        assert_eq!(fs.crash_image().read(&d.join("b")).unwrap(), b"hello");
        a.sync_all().unwrap();
        assert_eq!(fs.crash_image().read(&d.join("b")).unwrap(), b"he");
    }

    #[test]
    fn faults_fail_the_chosen_operations_of_the_chosen_files() {
        let (fs, d) = dir();
        fs.fail(Op::Sync, "wal-", 1, 2, libc::EIO);
        let w = fs.create(&d.join("wal-1.log"), Create::New).unwrap();
        let s = fs.create(&d.join("seg-1.seg"), Create::New).unwrap();
        assert!(w.sync_data().is_ok(), "skipped");
        assert!(s.sync_data().is_ok(), "another file");
        assert_eq!(w.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(w.sync_all().is_err());
        assert!(w.sync_data().is_ok(), "two failures only");
        fs.fail(Op::Rename, "MANIFEST", 0, u64::MAX, libc::EIO);
        assert!(
            fs.rename(&d.join("seg-1.seg"), &d.join("MANIFEST"))
                .is_err()
        );
        fs.clear_faults();
        fs.rename(&d.join("seg-1.seg"), &d.join("MANIFEST"))
            .unwrap();
    }

    #[test]
    fn a_full_disk_refuses_growth_and_writes_nothing() {
        let (fs, d) = dir();
        fs.set_capacity(Some(10));
        let f = fs.create(&d.join("f"), Create::New).unwrap();
        f.write_at(b"12345678", 0).unwrap();
        let e = f.write_at(b"abc", 8).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(fs.read(&d.join("f")).unwrap(), b"12345678");
        assert!(f.allocate(11).is_err());
        f.write_at(b"ab", 2).unwrap();
        f.allocate(10).unwrap();
        assert_eq!(fs.used_bytes(), 10);
        fs.remove(&d.join("f")).unwrap();
        assert_eq!(fs.used_bytes(), 0);
    }

    #[test]
    fn create_new_refuses_an_existing_file_and_a_missing_directory() {
        let (fs, d) = dir();
        fs.create(&d.join("x"), Create::New).unwrap();
        assert!(fs.create(&d.join("x"), Create::New).is_err());
        assert!(fs.create(&d.join("nope/x"), Create::New).is_err());
        let g = fs.lock(&d, "LOCK").unwrap();
        assert!(g.is_some());
        assert!(fs.lock(&d, "LOCK").unwrap().is_none());
        drop(g);
        assert!(fs.lock(&d, "LOCK").unwrap().is_some());
    }
}
