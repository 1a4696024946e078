//! The manifest: the one file that says which segment holds the current
//! version of every tag, the live set and the dictionary sections, and which
//! log sequence number the segments cover. It is replaced atomically (write a
//! temporary file, fsync, rename over `MANIFEST`, fsync the directory), so a
//! crash leaves either the old manifest or the new one.

use crate::error::{Error, Result};
use crate::fields::{FieldKind, MergeRule};
use crate::storage::codec::{Dec, Enc, le_u32, le_u64};
use crate::storage::datadir::{DataDir, fsync_dir};
use crate::storage::fs::Create;

pub const MANIFEST_FILE: &str = "MANIFEST";
pub const MANIFEST_TMP: &str = "MANIFEST.tmp";
pub const MANIFEST_MAGIC: &[u8; 8] = b"TAGSMAN\0";
/// Version written; version 1 (no fields) is still read.
pub const MANIFEST_VERSION: u32 = 13;

/// A field as the manifest records it.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestField {
    pub id: u32,
    pub name: String,
    pub description: String,
    pub category: String,
    pub kind: FieldKind,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Each non-empty slot and the segment holding it.
    pub slots: Vec<(u32, u64)>,
    /// How its values combine when customers merge (version 5).
    pub merge: MergeRule,
}

/// A tag as the manifest records it.
/// A source of ingestion (its definition is small: kept here whole).
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestSource {
    pub name: String,
    pub definition: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Where it has consumed topics to (version 10): `(topic, partition,
    /// next offset)`, sorted.
    pub positions: Vec<(String, i32, i64)>,
    /// Paused (version 10).
    pub paused: bool,
    /// The newest records it consumed and did not apply, oldest first, at
    /// most [`KEPT_REJECTS`](crate::storage::snapshot::KEPT_REJECTS)
    /// (version 11).
    pub rejects: Vec<crate::storage::snapshot::KeptReject>,
}

/// A saved audience (small: kept here whole).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ManifestAudience {
    pub name: String,
    pub query: String,
    pub description: String,
    pub owner: String,
    pub category: String,
    pub uses: Vec<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A rule (small: kept here whole): its definition, the day it is
/// evaluated at, and why it could not be evaluated the last time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ManifestRule {
    pub name: String,
    pub def: crate::storage::record::RuleDef,
    pub day: i32,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub stale: String,
}

/// An audience snapshot: what it was, and where its members are (the
/// [`BlobKind::SnapshotShard`](crate::storage::segment::BlobKind) blobs of
/// owner `blob` in `segment`; snapshots of an unchanged audience share
/// them).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ManifestSnapshot {
    pub id: u32,
    pub audience: String,
    pub query: String,
    pub taken_lsn: u64,
    pub at_ms: i64,
    pub note: String,
    pub count: u64,
    pub segment: u64,
    pub blob: u32,
}

/// One day of remembered event ids: the segment holding its blob.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ManifestSeen {
    pub day: i32,
    pub segment: u64,
    pub count: u64,
}

/// One file of the event archive: the events ingested by log records
/// `from_lsn + 1 ..= to_lsn`, at times `first_ms ..= last_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestArchive {
    /// The file's number ([`archive::file_name`](crate::storage::archive::file_name)).
    pub no: u64,
    pub from_lsn: u64,
    pub to_lsn: u64,
    /// When the first and the last of its events were ingested, Unix ms.
    pub first_ms: i64,
    pub last_ms: i64,
    pub events: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManifestTag {
    pub id: u32,
    /// Segment holding the bitmap; 0 when the tag is empty.
    pub segment: u64,
    pub count: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub name: String,
    pub description: String,
    pub category: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifest {
    /// Incremented by every checkpoint.
    pub generation: u64,
    /// Every record up to and including this lsn is reflected in the segments.
    pub checkpoint_lsn: u64,
    pub checkpoint_at_ms: i64,
    pub next_customer_id: u32,
    pub next_tag_id: u32,
    /// The next segment file number to use.
    pub next_segment_no: u64,
    /// Segment holding the live-customer bitmap; 0 when there are no customers.
    pub live_segment: u64,
    /// Segments holding dictionary sections, oldest first.
    pub dict_segments: Vec<u64>,
    pub tags: Vec<ManifestTag>,
    pub fields: Vec<ManifestField>,
    pub sources: Vec<ManifestSource>,
    /// Saved audiences (version 6).
    pub audiences: Vec<ManifestAudience>,
    /// Audience snapshots, and the id the next one gets (version 7).
    pub snapshots: Vec<ManifestSnapshot>,
    pub next_snapshot_id: u32,
    /// Segment holding the member-count history (version 8; 0: none).
    pub history_segment: u64,
    /// Rule tags and lifecycles (version 9).
    pub rules: Vec<ManifestRule>,
    pub seen: Vec<ManifestSeen>,
    /// The event archive's files, oldest first.
    pub archives: Vec<ManifestArchive>,
    /// Events ingested at or before this time (Unix ms) were dropped from
    /// the archive by its retention; 0 when none ever were.
    pub archive_dropped_to_ms: i64,
    /// Segments holding identity sections, oldest first.
    pub ident_segments: Vec<u64>,
    /// Segment holding the merge log; 0 when nothing was ever merged.
    pub merge_log_segment: u64,
    /// Customers whose facts are due a rebuild (version 12).
    pub rebuild_due: roaring::RoaringBitmap,
    /// Customers some of whose kept events retention dropped (version 13):
    /// a rebuild of their facts from the archive would lose what those
    /// events made.
    pub archive_partial: roaring::RoaringBitmap,
    /// Events were dropped before the store kept track of whose (a store
    /// of version 12 or older with `archive_dropped_to_ms` set), or from an
    /// archive file that could not be read: every customer counts as one
    /// of `archive_partial`.
    pub archive_partial_unknown: bool,
}

impl Manifest {
    /// Every segment the manifest refers to.
    pub fn segments(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .tags
            .iter()
            .map(|t| t.segment)
            .chain(self.dict_segments.iter().copied())
            .chain(self.ident_segments.iter().copied())
            .chain(std::iter::once(self.merge_log_segment))
            .chain(std::iter::once(self.history_segment))
            .chain(
                self.fields
                    .iter()
                    .flat_map(|f| f.slots.iter().map(|(_, seg)| *seg)),
            )
            .chain(self.seen.iter().map(|s| s.segment))
            .chain(self.snapshots.iter().map(|s| s.segment))
            .chain(std::iter::once(self.live_segment))
            .filter(|&s| s != 0)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    fn encode_body(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.u64(self.generation)
            .u64(self.checkpoint_lsn)
            .i64(self.checkpoint_at_ms)
            .u32(self.next_customer_id)
            .u32(self.next_tag_id)
            .u64(self.next_segment_no)
            .u64(self.live_segment)
            .u32(self.dict_segments.len() as u32);
        for s in &self.dict_segments {
            e.u64(*s);
        }
        e.u32(self.tags.len() as u32);
        for t in &self.tags {
            e.u32(t.id)
                .u64(t.segment)
                .u64(t.count)
                .i64(t.created_ms)
                .i64(t.updated_ms)
                .str(&t.name)
                .str(&t.description)
                .str(&t.category);
        }
        e.u32(self.fields.len() as u32);
        for f in &self.fields {
            e.u32(f.id)
                .str(&f.name)
                .str(&f.description)
                .str(&f.category);
            f.kind.encode(&mut e);
            e.i64(f.created_ms)
                .i64(f.updated_ms)
                .u32(f.slots.len() as u32);
            for (slot, seg) in &f.slots {
                e.u32(*slot).u64(*seg);
            }
            e.u8(f.merge.code());
        }
        e.u32(self.sources.len() as u32);
        for s in &self.sources {
            e.str(&s.name)
                .str(&s.definition)
                .i64(s.created_ms)
                .i64(s.updated_ms);
        }
        e.u32(self.seen.len() as u32);
        for s in &self.seen {
            e.i64(i64::from(s.day)).u64(s.segment).u64(s.count);
        }
        e.u32(self.archives.len() as u32);
        for a in &self.archives {
            e.u64(a.no)
                .u64(a.from_lsn)
                .u64(a.to_lsn)
                .i64(a.first_ms)
                .i64(a.last_ms)
                .u64(a.events)
                .u64(a.bytes);
        }
        e.i64(self.archive_dropped_to_ms);
        e.u32(self.ident_segments.len() as u32);
        for s in &self.ident_segments {
            e.u64(*s);
        }
        e.u64(self.merge_log_segment);
        e.u32(self.audiences.len() as u32);
        for a in &self.audiences {
            e.str(&a.name)
                .str(&a.query)
                .str(&a.description)
                .str(&a.owner)
                .str(&a.category)
                .u32(a.uses.len() as u32);
            for u in &a.uses {
                e.str(u);
            }
            e.i64(a.created_ms).i64(a.updated_ms);
        }
        e.u32(self.snapshots.len() as u32);
        for s in &self.snapshots {
            e.u32(s.id)
                .str(&s.audience)
                .str(&s.query)
                .u64(s.taken_lsn)
                .i64(s.at_ms)
                .str(&s.note)
                .u64(s.count)
                .u64(s.segment)
                .u32(s.blob);
        }
        e.u32(self.next_snapshot_id);
        e.u64(self.history_segment);
        e.u32(self.rules.len() as u32);
        for r in &self.rules {
            e.str(&r.name);
            r.def.encode(&mut e);
            e.i64(i64::from(r.day))
                .i64(r.created_ms)
                .i64(r.updated_ms)
                .str(&r.stale);
        }
        for s in &self.sources {
            e.u32(s.positions.len() as u32);
            for (topic, partition, next) in &s.positions {
                e.str(topic).i64(i64::from(*partition)).i64(*next);
            }
            e.u8(u8::from(s.paused));
        }
        for s in &self.sources {
            e.u32(s.rejects.len() as u32);
            for r in &s.rejects {
                crate::storage::record::encode_reject_place(
                    &mut e,
                    r.skipped,
                    &r.topic,
                    r.partition,
                    r.offset,
                );
                e.i64(r.at_ms).str(&r.reason);
            }
        }
        e.bitmap(&self.rebuild_due);
        e.u8(u8::from(self.archive_partial_unknown));
        e.bitmap(&self.archive_partial);
        e.buf
    }

    fn decode_body(
        body: &[u8],
        version: u32,
    ) -> std::result::Result<Self, crate::storage::codec::DecodeError> {
        let mut d = Dec::new(body);
        let mut m = Manifest {
            generation: d.u64()?,
            checkpoint_lsn: d.u64()?,
            checkpoint_at_ms: d.i64()?,
            next_customer_id: d.u32()?,
            next_tag_id: d.u32()?,
            next_segment_no: d.u64()?,
            live_segment: d.u64()?,
            ..Default::default()
        };
        let n = d.u32()? as usize;
        for _ in 0..n {
            m.dict_segments.push(d.u64()?);
        }
        let n = d.u32()? as usize;
        for _ in 0..n {
            m.tags.push(ManifestTag {
                id: d.u32()?,
                segment: d.u64()?,
                count: d.u64()?,
                created_ms: d.i64()?,
                updated_ms: d.i64()?,
                name: d.str()?.to_string(),
                description: d.str()?.to_string(),
                category: d.str()?.to_string(),
            });
        }
        if version >= 2 {
            let n = d.u32()? as usize;
            for _ in 0..n {
                let mut f = ManifestField {
                    id: d.u32()?,
                    name: d.str()?.to_string(),
                    description: d.str()?.to_string(),
                    category: d.str()?.to_string(),
                    kind: FieldKind::decode(&mut d)?,
                    created_ms: d.i64()?,
                    updated_ms: d.i64()?,
                    slots: Vec::new(),
                    merge: MergeRule::Keep,
                };
                for _ in 0..d.u32()? {
                    f.slots.push((d.u32()?, d.u64()?));
                }
                if version >= 5 {
                    let code = d.u8()?;
                    f.merge = MergeRule::from_code(code)
                        .map_or_else(|| d.err(format!("unknown merge rule {code}")), Ok)?;
                }
                m.fields.push(f);
            }
        }
        if version >= 3 {
            for _ in 0..d.u32()? {
                m.sources.push(ManifestSource {
                    name: d.str()?.to_string(),
                    definition: d.str()?.to_string(),
                    created_ms: d.i64()?,
                    updated_ms: d.i64()?,
                    positions: Vec::new(),
                    paused: false,
                    rejects: Vec::new(),
                });
            }
            for _ in 0..d.u32()? {
                let day = d.i64()?;
                let day =
                    i32::try_from(day).or_else(|_| d.err(format!("day {day} out of range")))?;
                m.seen.push(ManifestSeen {
                    day,
                    segment: d.u64()?,
                    count: d.u64()?,
                });
            }
        }
        if version >= 4 {
            for _ in 0..d.u32()? {
                m.archives.push(ManifestArchive {
                    no: d.u64()?,
                    from_lsn: d.u64()?,
                    to_lsn: d.u64()?,
                    first_ms: d.i64()?,
                    last_ms: d.i64()?,
                    events: d.u64()?,
                    bytes: d.u64()?,
                });
            }
            m.archive_dropped_to_ms = d.i64()?;
        }
        if version >= 5 {
            for _ in 0..d.u32()? {
                m.ident_segments.push(d.u64()?);
            }
            m.merge_log_segment = d.u64()?;
        }
        if version >= 6 {
            for _ in 0..d.u32()? {
                m.audiences.push(ManifestAudience {
                    name: d.str()?.to_string(),
                    query: d.str()?.to_string(),
                    description: d.str()?.to_string(),
                    owner: d.str()?.to_string(),
                    category: d.str()?.to_string(),
                    uses: (0..d.u32()?)
                        .map(|_| d.str().map(str::to_string))
                        .collect::<crate::storage::codec::DecResult<_>>()?,
                    created_ms: d.i64()?,
                    updated_ms: d.i64()?,
                });
            }
        }
        if version >= 7 {
            for _ in 0..d.u32()? {
                m.snapshots.push(ManifestSnapshot {
                    id: d.u32()?,
                    audience: d.str()?.to_string(),
                    query: d.str()?.to_string(),
                    taken_lsn: d.u64()?,
                    at_ms: d.i64()?,
                    note: d.str()?.to_string(),
                    count: d.u64()?,
                    segment: d.u64()?,
                    blob: d.u32()?,
                });
            }
            m.next_snapshot_id = d.u32()?;
        }
        if version >= 8 {
            m.history_segment = d.u64()?;
        }
        if version >= 9 {
            for _ in 0..d.u32()? {
                let name = d.str()?.to_string();
                let def = crate::storage::record::RuleDef::decode(&mut d)?;
                let day = d.i64()?;
                let day =
                    i32::try_from(day).or_else(|_| d.err(format!("day {day} out of range")))?;
                m.rules.push(ManifestRule {
                    name,
                    def,
                    day,
                    created_ms: d.i64()?,
                    updated_ms: d.i64()?,
                    stale: d.str()?.to_string(),
                });
            }
        }
        if version >= 10 {
            for s in m.sources.iter_mut() {
                for _ in 0..d.u32()? {
                    let topic = d.str()?.to_string();
                    let partition = d.i64()?;
                    let partition = i32::try_from(partition)
                        .or_else(|_| d.err(format!("partition {partition} out of range")))?;
                    s.positions.push((topic, partition, d.i64()?));
                }
                s.paused = match d.u8()? {
                    0 => false,
                    1 => true,
                    other => return d.err(format!("unknown pause flag {other}")),
                };
            }
        }
        if version >= 11 {
            for s in m.sources.iter_mut() {
                for _ in 0..d.u32()? {
                    let (skipped, topic, partition, offset) =
                        crate::storage::record::decode_reject_place(&mut d)?;
                    s.rejects.push(crate::storage::snapshot::KeptReject {
                        skipped,
                        topic,
                        partition,
                        offset,
                        at_ms: d.i64()?,
                        reason: d.str()?.to_string(),
                    });
                }
            }
        }
        if version >= 12 {
            m.rebuild_due = d.bitmap()?;
        }
        if version >= 13 {
            m.archive_partial_unknown = match d.u8()? {
                0 => false,
                1 => true,
                other => return d.err(format!("unknown archive_partial_unknown flag {other}")),
            };
            m.archive_partial = d.bitmap()?;
        } else {
            m.archive_partial_unknown = m.archive_dropped_to_ms > 0;
        }
        d.finish()?;
        Ok(m)
    }

    /// Reads `MANIFEST` from `dir`; `None` when the store has never checkpointed.
    pub fn read(dir: &DataDir) -> Result<Option<Manifest>> {
        let path = dir.join(MANIFEST_FILE);
        let data = match dir.fs().read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        Manifest::parse(&path, &data).map(Some)
    }

    /// A manifest's bytes as read from `path` (named in errors).
    pub fn parse(path: &std::path::Path, data: &[u8]) -> Result<Manifest> {
        let corrupt = |off: usize, why: String| Error::corrupt(path, off as u64, why);
        if data.len() < 24 || &data[..8] != MANIFEST_MAGIC {
            return Err(corrupt(
                0,
                "bad magic or file too short: not a tagstore manifest".into(),
            ));
        }
        let version = le_u32(data, 8).unwrap_or(0);
        if !(1..=MANIFEST_VERSION).contains(&version) {
            return Err(corrupt(
                8,
                format!("unsupported manifest version {version}"),
            ));
        }
        let len = le_u64(data, 12).unwrap_or(u64::MAX) as usize;
        if data.len() != 20usize.saturating_add(len).saturating_add(4) {
            return Err(corrupt(
                12,
                format!(
                    "body length {len} does not match the file size {}",
                    data.len()
                ),
            ));
        }
        let body = &data[20..20 + len];
        let crc = le_u32(data, 20 + len).unwrap_or(0);
        if crc32fast::hash(body) != crc {
            return Err(corrupt(20, "manifest checksum mismatch".into()));
        }
        Manifest::decode_body(body, version).map_err(|e| corrupt(20 + e.offset, e.reason))
    }

    /// The manifest as its file holds it: magic, version, length, body, CRC.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self.encode_body();
        let mut data = Vec::with_capacity(body.len() + 24);
        data.extend_from_slice(MANIFEST_MAGIC);
        data.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        data.extend_from_slice(&(body.len() as u64).to_le_bytes());
        data.extend_from_slice(&body);
        data.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        data
    }

    /// Replaces `MANIFEST` in `dir` atomically and durably.
    pub fn write(&self, dir: &DataDir) -> Result<()> {
        let data = self.to_bytes();
        let tmp = dir.join(MANIFEST_TMP);
        let f = dir
            .fs()
            .create(&tmp, Create::Truncate)
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_at(&data, 0)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        let path = dir.join(MANIFEST_FILE);
        dir.fs()
            .rename(&tmp, &path)
            .map_err(|e| Error::io(&path, e))?;
        fsync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn sample() -> Manifest {
        Manifest {
            generation: 3,
            checkpoint_lsn: 99,
            checkpoint_at_ms: 1_700_000_000_000,
            next_customer_id: 10,
            next_tag_id: 4,
            next_segment_no: 5,
            live_segment: 4,
            dict_segments: vec![2, 4],
            tags: vec![ManifestTag {
                id: 1,
                segment: 2,
                count: 7,
                created_ms: 1,
                updated_ms: 2,
                name: "高价值用户".into(),
                description: "high value".into(),
                category: "价值".into(),
            }],
            fields: vec![ManifestField {
                id: 3,
                name: "total_spend".into(),
                description: String::new(),
                category: "money".into(),
                kind: FieldKind::Int,
                created_ms: 5,
                updated_ms: 6,
                slots: vec![(0, 4), (1, 6)],
                merge: MergeRule::Sum,
            }],
            sources: vec![ManifestSource {
                name: "jd_orders".into(),
                definition: "format = \"csv\"".into(),
                created_ms: 7,
                updated_ms: 8,
                positions: vec![("orders".into(), 0, 12), ("orders".into(), 3, 1 << 35)],
                paused: true,
                rejects: vec![crate::storage::snapshot::KeptReject {
                    skipped: true,
                    topic: "orders".into(),
                    partition: 3,
                    offset: 1 << 35,
                    at_ms: 14,
                    reason: "第 1 行".into(),
                }],
            }],
            audiences: vec![ManifestAudience {
                name: "高价值".into(),
                query: "vip AND spenders".into(),
                description: "d".into(),
                owner: "marketing".into(),
                category: "c".into(),
                uses: vec!["spenders".into()],
                created_ms: 9,
                updated_ms: 10,
            }],
            snapshots: vec![ManifestSnapshot {
                id: 3,
                audience: "高价值".into(),
                query: "vip".into(),
                taken_lsn: 11,
                at_ms: 12,
                note: "11.11".into(),
                count: 13,
                segment: 4,
                blob: 2,
            }],
            next_snapshot_id: 4,
            history_segment: 5,
            rules: vec![ManifestRule {
                name: "潜在流失".into(),
                def: crate::storage::record::RuleDef {
                    query: "last_order_day < TODAY - 90 AND order_count >= 2".into(),
                    time_zone: "Asia/Shanghai".into(),
                    reads: vec!["last_order_day".into(), "order_count".into()],
                    ..Default::default()
                },
                day: 20_788,
                created_ms: 14,
                updated_ms: 15,
                stale: String::new(),
            }],
            rebuild_due: [5, 1 << 21].into_iter().collect(),
            archive_partial: [7, 1 << 22].into_iter().collect(),
            archive_partial_unknown: true,
            seen: vec![ManifestSeen {
                day: 20_769,
                segment: 6,
                count: 3,
            }],
            archives: vec![ManifestArchive {
                no: 6,
                from_lsn: 50,
                to_lsn: 99,
                first_ms: 1_700_000_000_000,
                last_ms: 1_700_000_500_000,
                events: 1234,
                bytes: 56_789,
            }],
            archive_dropped_to_ms: 1_600_000_000_000,
            ident_segments: vec![4],
            merge_log_segment: 6,
        }
    }

    /// A manifest of version 12 (no record of whose archived events were
    /// dropped) reads as every customer's archive thinned when events were
    /// dropped, and as none when none were.
    #[test]
    fn version_12_knows_no_customer_whose_events_were_dropped() {
        for dropped_to_ms in [1_600_000_000_000, 0] {
            let mut m = sample();
            m.archive_dropped_to_ms = dropped_to_ms;
            m.archive_partial = roaring::RoaringBitmap::new();
            m.archive_partial_unknown = false;
            let body = m.encode_body();
            let mut tail = Enc::default();
            tail.u8(0).bitmap(&m.archive_partial);
            let v12 = &body[..body.len() - tail.buf.len()];
            let read = Manifest::decode_body(v12, 12).unwrap();
            assert_eq!(read.archive_partial_unknown, dropped_to_ms > 0);
            assert!(read.archive_partial.is_empty());
            assert_eq!(read.rebuild_due, m.rebuild_due);
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::os(tmp.path());
        assert_eq!(Manifest::read(&dir).unwrap(), None);
        let m = sample();
        m.write(&dir).unwrap();
        assert_eq!(Manifest::read(&dir).unwrap(), Some(m.clone()));
        assert_eq!(m.segments(), vec![2, 4, 5, 6]);
        let path = dir.join(MANIFEST_FILE);
        let mut data = fs::read(&path).unwrap();
        data[30] ^= 4;
        fs::write(&path, &data).unwrap();
        let err = Manifest::read(&dir).unwrap_err().to_string();
        assert!(
            err.contains("MANIFEST") && err.contains("checksum"),
            "{err}"
        );
    }
}
