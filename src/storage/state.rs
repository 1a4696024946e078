//! The writer's working state and the one function that changes it:
//! [`State::apply`], used both for new writes and for replaying the log, so
//! the two can never disagree.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::bitmap::ShardedBitmap;
use crate::error::{Error, Result};
use crate::storage::record::{Batch, ChangeOp};
use crate::storage::snapshot::{LazyBitmap, Snapshot, Tag, TagMeta};

/// What applying a batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub added: u64,
    pub removed: u64,
    pub new_customers: u64,
    pub deleted: u64,
    pub dropped_members: u64,
}

/// The writer's copy of the store: the next snapshot, plus what changed since
/// the last checkpoint.
pub struct State {
    pub snap: Snapshot,
    pub tag_names: HashMap<u32, Arc<str>>,
    /// Tags created or changed since the last checkpoint began.
    pub dirty_tags: HashSet<u32>,
    /// Whether the live set changed since the last checkpoint began.
    pub dirty_live: bool,
}

fn unknown_tag(id: u32) -> Error {
    Error::corrupt(
        "write-ahead log",
        0,
        format!("record refers to tag id {id}, which does not exist"),
    )
}

impl State {
    pub fn new(snap: Snapshot) -> Self {
        let tag_names = snap
            .tags
            .values()
            .map(|t| (t.id, t.meta.name.clone()))
            .collect();
        Self {
            snap,
            tag_names,
            dirty_tags: HashSet::new(),
            dirty_live: false,
        }
    }

    pub fn tag_by_id(&self, id: u32) -> Option<&Arc<Tag>> {
        self.snap.tags.get(self.tag_names.get(&id)?)
    }

    fn tag_mut(&mut self, id: u32) -> Result<&mut Tag> {
        let name = self.tag_names.get(&id).ok_or_else(|| unknown_tag(id))?;
        let tag = self
            .snap
            .tags
            .get_mut(name)
            .ok_or_else(|| unknown_tag(id))?;
        Ok(Arc::make_mut(tag))
    }

    /// Applies one logged batch. Applying a batch that is already reflected
    /// changes nothing further.
    pub fn apply(&mut self, lsn: u64, b: &Batch) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        for t in &b.new_tags {
            if self.tag_names.contains_key(&t.id) {
                continue;
            }
            let name: Arc<str> = Arc::from(t.name.as_str());
            let tag = Tag {
                id: t.id,
                meta: TagMeta {
                    name: name.clone(),
                    description: t.description.clone(),
                    category: t.category.clone(),
                    created_ms: b.at_ms,
                    updated_ms: b.at_ms,
                    count: 0,
                },
                bitmap: LazyBitmap::empty(),
            };
            self.snap.tags.insert(name.clone(), Arc::new(tag));
            self.tag_names.insert(t.id, name);
            self.snap.next_tag_id = self.snap.next_tag_id.max(t.id + 1);
            self.dirty_tags.insert(t.id);
        }
        if !b.new_keys.is_empty() {
            let live = self.snap.live.make_mut()?;
            for (id, key) in &b.new_keys {
                stats.new_customers += live.insert(*id) as u64;
                self.snap.dict.insert(*id, key);
                self.snap.next_customer_id = self.snap.next_customer_id.max(id + 1);
            }
            self.dirty_live = true;
        }
        for c in &b.changes {
            let tag = self.tag_mut(c.tag)?;
            let bm = tag.bitmap.make_mut()?;
            match c.op {
                ChangeOp::Add => stats.added += bm.union_with(&c.ids),
                ChangeOp::Remove => stats.removed += bm.difference_with(&c.ids),
                ChangeOp::Replace => {
                    let new = ShardedBitmap::from_roaring(&c.ids);
                    let both = bm.intersection_len(&new);
                    stats.added += new.len() - both;
                    stats.removed += bm.len() - both;
                    *bm = new;
                }
            }
            tag.meta.count = bm.len();
            tag.meta.updated_ms = b.at_ms;
            self.dirty_tags.insert(c.tag);
        }
        if !b.deletes.is_empty() {
            let ids: Vec<u32> = self.tag_names.keys().copied().collect();
            for id in ids {
                let touched = match self.tag_by_id(id) {
                    Some(t) => t.bitmap.get()?.intersects(&b.deletes),
                    None => false,
                };
                if touched {
                    let tag = self.tag_mut(id)?;
                    let bm = tag.bitmap.make_mut()?;
                    bm.difference_with(&b.deletes);
                    tag.meta.count = bm.len();
                    tag.meta.updated_ms = b.at_ms;
                    self.dirty_tags.insert(id);
                }
            }
            stats.deleted = self.snap.live.make_mut()?.difference_with(&b.deletes);
            self.snap.dict.forget(b.deletes.iter());
            self.dirty_live = true;
        }
        for id in &b.drop_tags {
            if let Some(name) = self.tag_names.remove(id) {
                if let Some(t) = self.snap.tags.remove(&name) {
                    stats.dropped_members += t.meta.count;
                }
                self.dirty_tags.remove(id);
            }
        }
        self.snap.lsn = lsn;
        Ok(stats)
    }
}
