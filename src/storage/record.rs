//! What the write-ahead log records: one [`Batch`] per acknowledged request,
//! holding everything the request changed with ids already assigned, so that
//! replay is deterministic and applying a record twice changes nothing more.
//!
//! Later column kinds (integer fields, enumerations, time buckets, identity
//! merges) add record kinds or batch fields under a new version byte; a
//! reader refuses versions it does not know instead of guessing.

use roaring::RoaringBitmap;

use crate::storage::codec::{Dec, DecResult, Enc};

/// Record kind of a [`Batch`] in the log framing.
pub const KIND_BATCH: u8 = 1;
/// Version byte at the start of a batch payload.
pub const BATCH_VERSION: u8 = 1;

/// A tag created by a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTag {
    pub id: u32,
    pub name: String,
    pub description: String,
    pub category: String,
}

/// How a [`Change`] affects a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChangeOp {
    Add = 1,
    Remove = 2,
    Replace = 3,
}

/// A change to one tag's members.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub tag: u32,
    pub op: ChangeOp,
    pub ids: RoaringBitmap,
}

/// Everything one request changed. Applied in this order: new tags, new
/// customers, changes (in order), customer deletions, dropped tags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Wall-clock time of the request, Unix milliseconds (becomes `updated_at`).
    pub at_ms: i64,
    pub new_tags: Vec<NewTag>,
    /// Customers seen for the first time, with the ids they were given.
    pub new_keys: Vec<(u32, String)>,
    pub changes: Vec<Change>,
    /// Customers erased: removed from every tag and from the live set.
    pub deletes: RoaringBitmap,
    pub drop_tags: Vec<u32>,
}

impl Batch {
    /// True when applying the batch would change nothing.
    pub fn is_empty(&self) -> bool {
        self.new_tags.is_empty()
            && self.new_keys.is_empty()
            && self.changes.is_empty()
            && self.deletes.is_empty()
            && self.drop_tags.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.u8(BATCH_VERSION).i64(self.at_ms);
        e.u32(self.new_tags.len() as u32);
        for t in &self.new_tags {
            e.u32(t.id)
                .str(&t.name)
                .str(&t.description)
                .str(&t.category);
        }
        e.u32(self.new_keys.len() as u32);
        for (id, key) in &self.new_keys {
            e.u32(*id).str(key);
        }
        e.u32(self.changes.len() as u32);
        for c in &self.changes {
            e.u32(c.tag).u8(c.op as u8).bitmap(&c.ids);
        }
        e.bitmap(&self.deletes);
        e.u32(self.drop_tags.len() as u32);
        for t in &self.drop_tags {
            e.u32(*t);
        }
        e.buf
    }

    pub fn decode(payload: &[u8]) -> DecResult<Self> {
        let mut d = Dec::new(payload);
        let version = d.u8()?;
        if version != BATCH_VERSION {
            return d.err(format!("unsupported batch version {version}"));
        }
        let mut b = Batch {
            at_ms: d.i64()?,
            ..Default::default()
        };
        for _ in 0..d.u32()? {
            b.new_tags.push(NewTag {
                id: d.u32()?,
                name: d.str()?.to_string(),
                description: d.str()?.to_string(),
                category: d.str()?.to_string(),
            });
        }
        for _ in 0..d.u32()? {
            b.new_keys.push((d.u32()?, d.str()?.to_string()));
        }
        for _ in 0..d.u32()? {
            let tag = d.u32()?;
            let op = match d.u8()? {
                1 => ChangeOp::Add,
                2 => ChangeOp::Remove,
                3 => ChangeOp::Replace,
                other => return d.err(format!("unknown change op {other}")),
            };
            b.changes.push(Change {
                tag,
                op,
                ids: d.bitmap()?,
            });
        }
        b.deletes = d.bitmap()?;
        for _ in 0..d.u32()? {
            b.drop_tags.push(d.u32()?);
        }
        d.finish()?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip() {
        let b = Batch {
            at_ms: 42,
            new_tags: vec![NewTag {
                id: 3,
                name: "常购护肤品".into(),
                description: "d".into(),
                category: "c".into(),
            }],
            new_keys: vec![(10, "phone:1".into()), (11, "wechat:x".into())],
            changes: vec![Change {
                tag: 3,
                op: ChangeOp::Add,
                ids: [10u32, 11].into_iter().collect(),
            }],
            deletes: [4u32].into_iter().collect(),
            drop_tags: vec![2],
        };
        let bytes = b.encode();
        assert_eq!(Batch::decode(&bytes).unwrap(), b);
        assert!(Batch::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(Batch::decode(&bad).is_err());
    }
}
