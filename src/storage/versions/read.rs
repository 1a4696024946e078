//! Reads as of the past: the store as it was at the end of a local day or
//! at a log position, built from the newest kept version (or the current
//! manifest) at or before it and the log records after that, applied by
//! the one apply function. The few most recent answers are kept, so a
//! dashboard asking about yesterday again is served from memory. Reads
//! only; the files it opens are opened under the files lock, so a
//! checkpoint moving them into the history meanwhile does it no harm.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{VersionMark, file_name, history_dir};
use crate::error::{Error, Result};
use crate::fields::time;
use crate::storage::datadir::DataDir;
use crate::storage::fs::ReadFile;
use crate::storage::manifest::{MANIFEST_FILE, Manifest};
use crate::storage::record::{Batch, KIND_BATCH};
use crate::storage::segment::{self, Segment};
use crate::storage::wal::{self, WalFile};
use crate::storage::{Shared, Snapshot, recovery};

/// How many past states are kept in memory for reads asked again.
const CACHED: usize = 4;
/// How many past states are built at once (each may replay a day of log
/// and decode what it touches); further reads of uncached moments wait.
const BUILDS: usize = 2;

/// A moment of the past to read the store at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// After the write at this log position (and before the next).
    Position(u64),
    /// At the end of this local day (days since 1970-01-01, in the store's
    /// zone): after every write made before the next day began.
    Day(i32),
}

/// The store at a moment of the past.
#[derive(Clone)]
pub struct Past {
    pub snap: Arc<Snapshot>,
    /// What "now" is for queries read at that moment (`TODAY`, `WITHIN`):
    /// the last moment of the day, or the time of the write at the
    /// position.
    pub now_ms: i64,
}

/// The past states asked for most recently (each with the newest erasure
/// it left out: one built before a later erasure is built again), and the
/// gate on building more.
#[derive(Default)]
pub struct PastCache {
    kept: Mutex<VecDeque<(AsOf, u64, Past)>>,
    building: Mutex<usize>,
    built: parking_lot::Condvar,
}

/// A place among the [`BUILDS`] builds running; freed when dropped.
struct BuildSlot<'a>(&'a PastCache);

impl Drop for BuildSlot<'_> {
    fn drop(&mut self) {
        *self.0.building.lock() -= 1;
        self.0.built.notify_one();
    }
}

impl PastCache {
    /// Waits for a place among the builds running.
    fn slot(&self) -> BuildSlot<'_> {
        let mut n = self.building.lock();
        while *n >= BUILDS {
            self.built.wait(&mut n);
        }
        *n += 1;
        BuildSlot(self)
    }

    fn get(&self, at: AsOf, erased_lsn: u64) -> Option<Past> {
        let mut c = self.kept.lock();
        let i = c
            .iter()
            .position(|(a, e, _)| *a == at && *e == erased_lsn)?;
        let hit = c.remove(i)?;
        c.push_front(hit.clone());
        Some(hit.2)
    }

    fn put(&self, at: AsOf, erased_lsn: u64, past: Past) {
        let mut c = self.kept.lock();
        c.retain(|(a, _, _)| *a != at);
        c.push_front((at, erased_lsn, past));
        c.truncate(CACHED);
    }
}

/// Where a read of the past begins.
struct Base {
    lsn: u64,
    at_ms: i64,
    /// `None`: the current `MANIFEST`; or the version of this lsn.
    version: Option<u64>,
}

/// The store as of `at`. Errors: history off (`Precondition`), a moment
/// before the history begins or after the present (`OutOfRange`), a day
/// not yet ended (`OutOfRange`), damage (`Corrupt`, naming the file).
pub(crate) fn open(shared: &Shared, dir: &DataDir, at: AsOf) -> Result<Past> {
    let current = shared.snapshot();
    let now_ms = shared.config.clock.now_ms();
    let zone = current.zone.clone();
    if shared.config.history_days == 0 {
        return Err(Error::Precondition(
            "the store keeps no history (history_days = 0): it can be read only as it is now"
                .into(),
        ));
    }
    // The last record the answer may hold, and for a day the time it ends.
    let (mut upto, day_end) = match at {
        AsOf::Position(p) if p > current.lsn => {
            return Err(Error::OutOfRange(format!(
                "position {p} is ahead of the store, whose newest write is at {}",
                current.lsn
            )));
        }
        AsOf::Position(p) if p == current.lsn => {
            return Ok(Past {
                snap: current,
                now_ms,
            });
        }
        AsOf::Position(p) => (p, None),
        AsOf::Day(d) => {
            let end = time::day_start_ms(d.saturating_add(1), &zone)?;
            if end > now_ms {
                return Err(Error::OutOfRange(format!(
                    "{} has not ended yet (in {}); read the store without AS OF for now",
                    time::format_day(d),
                    zone.iana_name().unwrap_or("the store's zone")
                )));
            }
            (current.lsn, Some(end))
        }
    };
    let erased_lsn = current.erased_lsn;
    if let Some(hit) = shared.past.get(at, erased_lsn) {
        return Ok(hit);
    }
    let _slot = shared.past.slot();
    // Another read may have built it while this one waited.
    if let Some(hit) = shared.past.get(at, erased_lsn) {
        return Ok(hit);
    }
    let started = std::time::Instant::now();
    let hist = history_dir(dir);
    // Under the files lock: the kept versions listed, the base's manifest
    // read, its segments and the log files mapped or opened (a checkpoint
    // may move or drop them just after).
    let held = shared.files.lock();
    let marks: Vec<VersionMark> = shared.versions.lock().clone();
    let main_manifest = Manifest::read(dir)?;
    let mut bases: Vec<Base> = marks
        .iter()
        .map(|m| Base {
            lsn: m.lsn,
            at_ms: m.at_ms,
            version: Some(m.lsn),
        })
        .collect();
    match &main_manifest {
        Some(m) => bases.push(Base {
            lsn: m.checkpoint_lsn,
            at_ms: m.checkpoint_at_ms,
            version: None,
        }),
        // Never checkpointed: the log holds every write from lsn 1.
        None => bases.push(Base {
            lsn: 0,
            at_ms: i64::MIN,
            version: None,
        }),
    }
    bases.sort_by_key(|b| b.lsn);
    let base = match (at, day_end) {
        (_, Some(end)) => {
            // The first base begun at or after the day's end bounds the
            // records to read: every one after it was made later.
            if let Some(next) = bases.iter().find(|b| b.at_ms >= end) {
                upto = upto.min(next.lsn);
            }
            bases.iter().rev().find(|b| b.at_ms < end)
        }
        (AsOf::Position(p), None) => bases.iter().rev().find(|b| b.lsn <= p),
        (AsOf::Day(_), None) => None,
    };
    let Some(base) = base else {
        let oldest = &bases[0];
        let when = time::day_of(oldest.at_ms, &zone)
            .map(time::format_day)
            .unwrap_or_default();
        return Err(Error::OutOfRange(format!(
            "the store's history begins at position {} ({when}); older moments are past \
             the retention of {} days or before history was kept",
            oldest.lsn, shared.config.history_days
        )));
    };
    let (manifest, manifest_path) = match base.version {
        None => (
            main_manifest.clone().unwrap_or_default(),
            dir.join(MANIFEST_FILE),
        ),
        Some(lsn) => {
            let path = hist.join(file_name(lsn));
            let data = dir.fs().read(&path).map_err(|e| Error::io(&path, e))?;
            (Manifest::parse(&path, &data)?, path)
        }
    };
    let mut segments = HashMap::new();
    for no in manifest.segments() {
        let name = segment::file_name(no);
        let home = if dir.fs().exists(&dir.join(&name)) {
            dir
        } else if dir.fs().exists(&hist.join(&name)) {
            &hist
        } else {
            return Err(Error::corrupt(
                &manifest_path,
                0,
                format!(
                    "names segment {name}, which is neither in the data directory nor in \
                     {}: the history has lost a file",
                    hist.display()
                ),
            ));
        };
        segments.insert(no, Segment::open(home, no)?);
    }
    let files = if upto > base.lsn {
        log_files(dir, &hist, base.lsn, upto)?
    } else {
        Vec::new()
    };
    let mut handles: HashMap<std::path::PathBuf, Arc<dyn ReadFile>> = HashMap::new();
    for f in &files {
        let h = dir
            .fs()
            .open_read(&f.path)
            .map_err(|e| Error::io(&f.path, e))?;
        handles.insert(f.path.clone(), h);
    }
    drop(held);
    let opened_ms = started.elapsed().as_millis();

    let mut state = recovery::state_of(&manifest, &manifest_path, &segments, false)?;
    state.snap.zone = zone;
    let built_ms = started.elapsed().as_millis();
    let mut replayed = 0u64;
    let mut last_at = base.at_ms;
    let mut ended = false;
    let read = wal::read_range(
        dir,
        &files,
        base.lsn,
        upto,
        |f| match handles.get(&f.path) {
            Some(h) => read_whole(&**h),
            None => Err(std::io::ErrorKind::NotFound.into()),
        },
        |lsn, kind, payload| {
            if ended {
                return Ok(());
            }
            if kind != KIND_BATCH {
                return Err(Error::BadRecord(format!("unknown record kind {kind}")));
            }
            let at_ms = Batch::peek_at_ms(payload).unwrap_or(i64::MIN);
            if day_end.is_some_and(|end| at_ms >= end) {
                ended = true;
                return Ok(());
            }
            let batch = Batch::from_record(kind, payload)?;
            state.apply(lsn, &batch)?;
            replayed += 1;
            state.snap.lsn = lsn;
            last_at = batch.at_ms;
            Ok(())
        },
    );
    match read {
        Ok(()) => {}
        // The log of the history stops short: a file of it is gone.
        Err(Error::Checkpoint(why)) => {
            return Err(Error::corrupt(
                hist.path(),
                0,
                format!(
                    "the log kept for reads of the past lacks records between position {} \
                     and {upto} ({why}): a log file of the history is missing",
                    base.lsn
                ),
            ));
        }
        Err(e) => return Err(e),
    }
    state.snap.lsn = state.snap.lsn.max(base.lsn);
    let erased = erase_since(&mut state, &current, last_at)?;
    state.feed.clear();
    tracing::info!(
        ?at,
        base = base.lsn,
        lsn = state.snap.lsn,
        log_files = files.len(),
        records = replayed,
        erased_since = erased,
        opened_ms,
        built_ms,
        ms = started.elapsed().as_millis(),
        "read the store as of a past moment"
    );
    let past = Past {
        snap: Arc::new(state.snap),
        now_ms: match day_end {
            Some(end) => end - 1,
            None => last_at.max(0),
        },
    };
    shared.past.put(at, erased_lsn, past.clone());
    Ok(past)
}

/// Erases from the past state the customers erased since (an erasure is
/// not undone by reading the past): those live then and not now, unless a
/// merge took them into a customer still live (merged, not erased; one
/// absorbed into a customer erased since is that person's, and goes too).
/// Applied as a batch of deletes by the one apply function, never logged.
/// Returns how many.
fn erase_since(
    state: &mut crate::storage::state::State,
    current: &Snapshot,
    at_ms: i64,
) -> Result<u64> {
    let now_live = current.live()?;
    let merges = current.merges.read();
    let mut gone = state.snap.live()?.clone();
    gone.difference_sharded(now_live);
    let mut deletes = roaring::RoaringBitmap::new();
    for id in gone.iter() {
        let survivor = merges.survivor_of(id);
        if survivor != id && now_live.contains(survivor) {
            continue;
        }
        deletes.insert(id);
    }
    drop(merges);
    let n = deletes.len();
    if n > 0 {
        let batch = Batch {
            at_ms,
            deletes,
            ..Default::default()
        };
        let lsn = state.snap.lsn;
        state.apply(lsn, &batch)?;
        state.snap.lsn = lsn;
    }
    Ok(n)
}

/// The log files, in the history and the main directory, that hold the
/// records `after + 1 ..= upto`, in order.
fn log_files(dir: &DataDir, hist: &DataDir, after: u64, upto: u64) -> Result<Vec<WalFile>> {
    let mut all = match wal::list(hist) {
        Ok(f) => f,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    all.extend(wal::list(dir)?);
    all.sort_by_key(|f| f.first_lsn);
    // From the last file beginning at or before the first record wanted.
    let start = all
        .iter()
        .rposition(|f| f.first_lsn <= after + 1)
        .unwrap_or(0);
    Ok(all
        .into_iter()
        .skip(start)
        .take_while(|f| f.first_lsn <= upto.max(after + 1))
        .collect())
}

/// The whole content of an open file.
fn read_whole(h: &dyn ReadFile) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = h.read_at(&mut buf, out.len() as u64)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}
