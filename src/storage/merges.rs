//! The merge log (OneID): every time two customers were found to be one
//! person and merged, which one survived, which one was absorbed, when, and
//! the identity that showed it. Kept whole in memory (a few dozen bytes a
//! merge), written by a checkpoint into its segment when it changed, and
//! read back at start-up.
//!
//! An absorbed customer is no longer live, but it is not erased: its events
//! stay in the event archive under its id (a rebuild of the survivor reads
//! them), which is why the archive asks this log which of the customers
//! that are not live were absorbed into one that is.
//!
//! A merge can be undone (unmerge): its entry stays, marked undone, the
//! absorbed customer is live again, and the two are kept apart from then on
//! (a record naming both is applied without merging them, and reported).
//! Each entry keeps what the merge changed ([`MergeUndo`]) for that.
//!
//! This room owns the log's entries and their bytes; the writer decides
//! merges and unmerges, `state::apply` records them.

use std::collections::HashMap;

use roaring::RoaringBitmap;

use crate::bitmap::Members;
use crate::storage::codec::{Dec, DecResult, Enc};
use crate::storage::record::MergeUndo;

/// Version of [`MergeLog::encode`] (1: without what each merge changed
/// and whether it was undone).
const VERSION: u8 = 2;

/// One merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeEntry {
    /// 1, 2, … in the order of the merges.
    pub id: u64,
    /// The log record that merged them.
    pub lsn: u64,
    pub at_ms: i64,
    pub survivor: u32,
    pub absorbed: u32,
    /// The identity (`type:value`) whose record named both; empty once the
    /// survivor was erased (the log keeps no personal value of an erased
    /// customer).
    pub via: String,
    /// Empty: merged. Otherwise why the guard rails refused the merge the
    /// record asked for (nothing was absorbed).
    pub refused: String,
    /// The identities that moved to the survivor with the absorbed
    /// customer; emptied, like `via`, once the survivor is erased.
    pub moved: Vec<String>,
    /// What the merge changed, for undoing it; emptied, like `via`, once
    /// either customer is erased.
    pub undo: MergeUndo,
    /// The log record that undid the merge; 0: not undone.
    pub undone_lsn: u64,
    /// When it was undone (Unix ms); 0: not undone.
    pub undone_ms: i64,
}

impl MergeEntry {
    /// A merge that absorbed a customer and was not undone.
    pub fn in_force(&self) -> bool {
        self.refused.is_empty() && self.undone_lsn == 0
    }

    /// Not a merge but an identity (`via`) taken off customer `survivor`,
    /// which made customer `absorbed` of it: logged undone by the record
    /// that logged it.
    pub fn is_split(&self) -> bool {
        self.undone_lsn != 0 && self.undone_lsn == self.lsn
    }
}

/// Every merge, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeLog {
    entries: Vec<MergeEntry>,
    /// Absorbed customer → the customer it was merged into.
    into: HashMap<u32, u32>,
    /// Survivor → the customers merged into it directly.
    absorbed: HashMap<u32, Vec<u32>>,
    /// Survivor (or, for a refused merge, the customer the record went to)
    /// → the indexes of its entries.
    by_survivor: HashMap<u32, Vec<usize>>,
    /// Customers kept apart by an undone merge, both ways: customer → (the
    /// other, the merge).
    apart: HashMap<u32, Vec<(u32, u64)>>,
}

impl MergeLog {
    pub fn entries(&self) -> &[MergeEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The id the next merge gets.
    pub fn next_id(&self) -> u64 {
        self.entries.last().map_or(1, |e| e.id + 1)
    }

    /// The log as it was after log record `lsn` (without the merges logged
    /// or undone after it; an identity forgotten since stays forgotten).
    pub fn upto(&self, lsn: u64) -> MergeLog {
        let mut out = MergeLog::default();
        for e in self.entries.iter().filter(|e| e.lsn <= lsn) {
            let mut e = e.clone();
            if e.undone_lsn > lsn {
                e.undone_lsn = 0;
                e.undone_ms = 0;
            }
            out.push(e);
        }
        out
    }

    /// The entry of merge `id`.
    pub fn get(&self, id: u64) -> Option<&MergeEntry> {
        let i = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        self.entries.get(i)
    }

    /// Records a merge (applying a logged batch; the writer has checked it).
    pub fn push(&mut self, entry: MergeEntry) {
        if self.entries.last().is_some_and(|e| e.id >= entry.id) {
            // Replayed over a log that already holds it.
            return;
        }
        if entry.in_force() {
            self.into.insert(entry.absorbed, entry.survivor);
            self.absorbed
                .entry(entry.survivor)
                .or_default()
                .push(entry.absorbed);
        } else if entry.refused.is_empty() {
            self.keep_apart(entry.absorbed, entry.survivor, entry.id);
        }
        self.by_survivor
            .entry(entry.survivor)
            .or_default()
            .push(self.entries.len());
        self.entries.push(entry);
    }

    /// Undoes merge `id` (applying a logged batch; the writer has checked
    /// it): its absorbed customer lives on as itself again, kept apart from
    /// the survivor. Returns false if there is no such merge in force
    /// (replayed over a log that already holds the undoing).
    pub fn undo(&mut self, id: u64, lsn: u64, at_ms: i64) -> bool {
        let Ok(i) = self.entries.binary_search_by_key(&id, |e| e.id) else {
            return false;
        };
        if !self.entries[i].in_force() {
            return false;
        }
        let e = &mut self.entries[i];
        e.undone_lsn = lsn;
        e.undone_ms = at_ms;
        let (absorbed, survivor) = (e.absorbed, e.survivor);
        self.into.remove(&absorbed);
        if let Some(list) = self.absorbed.get_mut(&survivor) {
            list.retain(|&a| a != absorbed);
        }
        self.keep_apart(absorbed, survivor, id);
        true
    }

    fn keep_apart(&mut self, a: u32, b: u32, merge: u64) {
        self.apart.entry(a).or_default().push((b, merge));
        self.apart.entry(b).or_default().push((a, merge));
    }

    /// Whether any merge was undone (so some customers are kept apart).
    pub fn keeps_any_apart(&self) -> bool {
        !self.apart.is_empty()
    }

    /// Whether live customers `a` and `b` must stay apart: the undone merge
    /// that parted them (or customers merged into them since), if so.
    pub fn kept_apart(&self, a: u32, b: u32) -> Option<u64> {
        if self.apart.is_empty() || a == b {
            return None;
        }
        for m in self.merged_into(a) {
            for &(other, merge) in self.apart.get(&m).into_iter().flatten() {
                if self.survivor_of(other) == b {
                    return Some(merge);
                }
            }
        }
        None
    }

    /// The live customers kept apart from `id` or any customer merged into
    /// it (their events may be among `id`'s in the archive, and `id`'s
    /// among theirs).
    pub fn apart_from(&self, id: u32) -> Vec<u32> {
        if self.apart.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<u32> = self
            .merged_into(id)
            .into_iter()
            .flat_map(|m| self.apart.get(&m).into_iter().flatten())
            .map(|&(other, _)| self.survivor_of(other))
            .filter(|&o| o != id)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The customer `id` lives on as: itself, or the survivor of the chain
    /// of merges that absorbed it.
    pub fn survivor_of(&self, mut id: u32) -> u32 {
        // A chain is at most as long as the log; the bound guards against a
        // damaged log that loops.
        for _ in 0..=self.entries.len() {
            match self.into.get(&id) {
                Some(&s) => id = s,
                None => return id,
            }
        }
        id
    }

    /// `id` and every customer merged into it, directly or through others.
    pub fn merged_into(&self, id: u32) -> Vec<u32> {
        let mut out = vec![id];
        let mut i = 0;
        while i < out.len() && out.len() <= self.entries.len() + 1 {
            if let Some(children) = self.absorbed.get(&out[i]) {
                out.extend(children.iter().copied());
            }
            i += 1;
        }
        out
    }

    /// The entries of merges into `id` and every customer merged into it
    /// (refused ones too), in id order, after merge `after`, at most
    /// `limit` of them, and whether more follow: without reading the rest
    /// of the log.
    pub fn entries_into(&self, id: u32, after: u64, limit: usize) -> (Vec<&MergeEntry>, bool) {
        let mut at: Vec<usize> = self
            .merged_into(id)
            .iter()
            .filter_map(|c| self.by_survivor.get(c))
            .flatten()
            .copied()
            .filter(|&i| self.entries[i].id > after)
            .collect();
        at.sort_unstable();
        let more = at.len() > limit;
        at.truncate(limit);
        (at.into_iter().map(|i| &self.entries[i]).collect(), more)
    }

    /// The customers that are not live but live on in a live survivor: the
    /// event archive keeps their events.
    pub fn absorbed_into_live(&self, live: Members<'_>) -> RoaringBitmap {
        self.into
            .keys()
            .copied()
            .filter(|&a| live.contains(self.survivor_of(a)))
            .collect()
    }

    /// Forgets the identities that named erased customers: each entry whose
    /// survivor lives on as one of `erased` loses its `via`. Returns whether
    /// anything changed.
    pub fn scrub(&mut self, erased: &RoaringBitmap) -> bool {
        let mut changed = false;
        for i in 0..self.entries.len() {
            let e = &self.entries[i];
            // A refused merge names two customers that stayed apart.
            // So does an undone one, once more.
            let hit = erased.contains(self.survivor_of(e.survivor))
                || (!e.in_force() && erased.contains(self.survivor_of(e.absorbed)));
            let e = &mut self.entries[i];
            if hit && (!e.via.is_empty() || !e.moved.is_empty() || !e.undo.is_empty()) {
                e.moved.clear();
                e.via.clear();
                // Kept, but holding nothing: the merge can no longer be
                // undone (there is no one left to give anything back to).
                e.undo = MergeUndo {
                    kept: e.undo.kept,
                    ..MergeUndo::default()
                };
                changed = true;
            }
        }
        changed
    }

    /// The log as a segment stores it (`storage-format.md`, "Merge log").
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.u8(VERSION).u64(self.entries.len() as u64);
        for m in &self.entries {
            e.u64(m.id)
                .u64(m.lsn)
                .i64(m.at_ms)
                .u32(m.survivor)
                .u32(m.absorbed)
                .str(&m.via)
                .str(&m.refused)
                .u32(m.moved.len() as u32);
            for i in &m.moved {
                e.str(i);
            }
            m.undo.encode(&mut e);
            e.u64(m.undone_lsn).i64(m.undone_ms);
        }
        e.buf
    }

    pub fn decode(bytes: &[u8]) -> DecResult<MergeLog> {
        let mut d = Dec::new(bytes);
        let version = d.u8()?;
        if !(1..=VERSION).contains(&version) {
            return d.err(format!("unsupported merge log version {version}"));
        }
        let n = d.u64()?;
        let mut log = MergeLog::default();
        for _ in 0..n {
            let entry = MergeEntry {
                id: d.u64()?,
                lsn: d.u64()?,
                at_ms: d.i64()?,
                survivor: d.u32()?,
                absorbed: d.u32()?,
                via: d.str()?.to_string(),
                refused: d.str()?.to_string(),
                moved: (0..d.u32()?)
                    .map(|_| d.str().map(str::to_string))
                    .collect::<DecResult<_>>()?,
                undo: MergeUndo::default(),
                undone_lsn: 0,
                undone_ms: 0,
            };
            let mut entry = entry;
            if version >= 2 {
                entry.undo = MergeUndo::decode(&mut d)?;
                entry.undone_lsn = d.u64()?;
                entry.undone_ms = d.i64()?;
            }
            if log.entries.last().is_some_and(|e| e.id >= entry.id) {
                return d.err(format!("merge {} out of order", entry.id));
            }
            log.push(entry);
        }
        d.finish()?;
        Ok(log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, survivor: u32, absorbed: u32) -> MergeEntry {
        MergeEntry {
            id,
            lsn: id * 10,
            at_ms: 1,
            survivor,
            absorbed,
            via: format!("phone:{id}"),
            refused: String::new(),
            moved: vec![format!("phone:{id}")],
            undo: MergeUndo::default(),
            undone_lsn: 0,
            undone_ms: 0,
        }
    }

    #[test]
    fn chains_round_trip_and_scrub() {
        let mut log = MergeLog::default();
        log.push(entry(1, 2, 5));
        log.push(entry(2, 1, 2));
        log.push(entry(2, 9, 9)); // replayed: ignored
        assert_eq!(log.len(), 2);
        assert_eq!(log.survivor_of(5), 1);
        assert_eq!(log.survivor_of(7), 7);
        let mut all = log.merged_into(1);
        all.sort();
        assert_eq!(all, [1, 2, 5]);
        let (into, more) = log.entries_into(1, 0, 10);
        assert_eq!(into.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
        assert!(!more);
        let (into, more) = log.entries_into(1, 0, 1);
        assert_eq!((into.len(), more), (1, true));
        assert_eq!(log.entries_into(1, 1, 10).0.len(), 1);
        assert!(log.entries_into(5, 0, 10).0.is_empty());
        let back = MergeLog::decode(&log.encode()).unwrap();
        assert_eq!(back, log);
        assert!(MergeLog::decode(&log.encode()[..10]).is_err());
        let erased: RoaringBitmap = [1u32].into_iter().collect();
        assert!(log.scrub(&erased));
        assert!(
            log.entries()
                .iter()
                .all(|e| e.via.is_empty() && e.moved.is_empty())
        );
        assert!(!log.scrub(&erased));
    }

    #[test]
    fn an_undone_merge_parts_its_customers_and_keeps_them_apart() {
        let mut log = MergeLog::default();
        log.push(entry(1, 2, 5));
        log.push(entry(2, 1, 2));
        log.push(entry(3, 1, 7));
        assert_eq!(log.kept_apart(1, 5), None);
        // Undo 2 (2 into 1): 2 and 5 with it live on as 2.
        assert!(log.undo(2, 40, 9));
        assert!(!log.undo(2, 40, 9), "undone twice");
        assert!(!log.undo(99, 40, 9));
        assert_eq!(log.survivor_of(5), 2);
        assert_eq!(log.survivor_of(2), 2);
        assert_eq!(log.survivor_of(7), 1);
        let mut family = log.merged_into(1);
        family.sort();
        assert_eq!(family, [1, 7]);
        assert_eq!(log.kept_apart(2, 1), Some(2));
        assert_eq!(log.kept_apart(1, 2), Some(2));
        assert_eq!(log.kept_apart(2, 7), None, "7 is not live");
        assert_eq!(log.apart_from(1), [2]);
        assert_eq!(log.apart_from(2), [1]);
        // 1 merged into 0 since: 0 and 2 stay apart.
        log.push(entry(4, 0, 1));
        assert_eq!(log.kept_apart(0, 2), Some(2));
        assert_eq!(log.kept_apart(2, 0), Some(2));
        assert_eq!(log.apart_from(0), [2]);
        let e = log.get(2).unwrap();
        assert_eq!((e.undone_lsn, e.undone_ms, e.in_force()), (40, 9, false));
        // Before the undoing, the merge was in force.
        let before = log.upto(39);
        assert_eq!(before.survivor_of(5), 1);
        assert_eq!(before.kept_apart(1, 2), None);
        assert_eq!(log.upto(40).survivor_of(5), 2);
        let back = MergeLog::decode(&log.encode()).unwrap();
        assert_eq!(back, log);
        assert_eq!(back.kept_apart(0, 2), Some(2));
        // Erasing the revived customer forgets what the merge moved.
        let erased: RoaringBitmap = [2u32].into_iter().collect();
        assert!(log.scrub(&erased));
        assert!(log.get(2).unwrap().moved.is_empty());
        assert!(!log.get(3).unwrap().moved.is_empty());
    }
}
