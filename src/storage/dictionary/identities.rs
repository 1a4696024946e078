//! The identity index: the identities a customer has beside the key it was
//! created with (`phone:13812345678`, `wechat_unionid:o6_bmjrPTl…`), each
//! with where and when it was first seen.
//!
//! Like the dictionary, identities added since the last checkpoint live in
//! memory and older ones in identity sections of segment files, read in
//! place. Unlike it, a customer has many identities, and an identity can
//! move from one customer to another (a merge moves the absorbed customer's
//! identities to the survivor): the newest entry of an identity decides,
//! so a look-up consults the recent entries first, then the sections from
//! the newest.
//!
//! What a look-up means is [`Resolver`]'s business (an identity whose
//! newest entry names a deleted customer falls back to the dictionary).
//! This file does not decide whether a customer is alive.

use std::sync::Arc;

use hashbrown::HashMap;
use parking_lot::RwLock;

use super::section::{DictLayer, LOOKUP_GROUP};
use crate::bitmap::Members;
use crate::error::Result;
use crate::storage::codec::fnv1a64;

/// The customer an identity entry names when the identity was taken away
/// from its customer: the identity names no one.
pub const UNLINKED: u32 = u32::MAX;

/// The newest entry of an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No entry: the dictionary decides.
    Absent,
    /// Taken away from its customer: it names no one.
    Unlinked,
    /// It names this customer (who may have been deleted since).
    Customer(u32),
}

/// Where and when an identity was first seen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirstSeen {
    /// Unix milliseconds.
    pub first_ms: i64,
    /// The channel (or the call) that first named it.
    pub place: String,
}

impl FirstSeen {
    /// The entry information as a section stores it: `first_ms`, a space,
    /// `place`.
    pub fn encode(&self) -> String {
        format!("{} {}", self.first_ms, self.place)
    }

    /// Reads [`FirstSeen::encode`]'s form; anything else reads as unknown (time
    /// 0, the text as the place) rather than failing a profile.
    pub fn decode(info: &str) -> FirstSeen {
        match info.split_once(' ') {
            Some((ms, place)) => match ms.parse() {
                Ok(first_ms) => FirstSeen {
                    first_ms,
                    place: place.to_string(),
                },
                Err(_) => FirstSeen {
                    first_ms: 0,
                    place: info.to_string(),
                },
            },
            None => FirstSeen {
                first_ms: 0,
                place: info.to_string(),
            },
        }
    }
}

/// An entry added since the last checkpoint.
#[derive(Debug, Clone)]
struct Recent {
    customer: u32,
    info: Box<str>,
    /// The log record that made it.
    lsn: u64,
}

struct Inner {
    /// Identity sections, oldest first.
    layers: Vec<Arc<DictLayer>>,
    recent: HashMap<Box<str>, Recent>,
    /// The identities whose recent entry named each customer when it was
    /// made (an identity moved on since is filtered out by its look-up).
    by_customer: HashMap<u32, Vec<Box<str>>>,
}

/// The identity index shared by the writer and every reader.
pub struct Identities {
    inner: RwLock<Inner>,
}

/// One entry as a checkpoint writes it.
pub type SectionEntry = (u32, Box<str>, Box<str>);

impl Identities {
    pub fn new(layers: Vec<Arc<DictLayer>>) -> Self {
        Identities {
            inner: RwLock::new(Inner {
                layers,
                recent: HashMap::new(),
                by_customer: HashMap::new(),
            }),
        }
    }

    /// The newest entry of `key`.
    pub fn lookup(&self, key: &str) -> Result<Found> {
        let inner = self.inner.read();
        Self::lookup_in(&inner, key)
    }

    fn lookup_in(inner: &Inner, key: &str) -> Result<Found> {
        if let Some(r) = inner.recent.get(key) {
            return Ok(found(r.customer));
        }
        for layer in inner.layers.iter().rev() {
            if let Some(id) = layer.find(key)? {
                return Ok(found(id));
            }
        }
        Ok(Found::Absent)
    }

    /// [`Identities::lookup`] of many keys under one lock, the look-ups of
    /// each section overlapped in groups as the dictionary's are
    /// (`Dictionary::lookup_many`).
    pub fn lookup_many(&self, keys: &[&str]) -> Result<Vec<Found>> {
        let inner = self.inner.read();
        let mut out = vec![Found::Absent; keys.len()];
        let mut pending = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            match inner.recent.get(*key) {
                Some(r) => out[k] = found(r.customer),
                None => pending.push(k),
            }
        }
        if pending.is_empty() || inner.layers.is_empty() {
            return Ok(out);
        }
        let hashes: Vec<u64> = keys.iter().map(|k| fnv1a64(k.as_bytes())).collect();
        let mut ids: Vec<Option<u32>> = vec![None; keys.len()];
        let (mut group, mut left) = (Vec::new(), Vec::new());
        for chunk in pending.chunks(LOOKUP_GROUP) {
            for layer in inner.layers.iter().rev() {
                layer.prefetch_slots(&hashes, chunk);
            }
            group.clear();
            group.extend_from_slice(chunk);
            // Newest section first: an identity found there is not looked
            // for in older ones.
            for layer in inner.layers.iter().rev() {
                if group.is_empty() {
                    break;
                }
                left.clear();
                layer.find_group(keys, &hashes, &group, &mut ids, &mut left)?;
                std::mem::swap(&mut group, &mut left);
            }
        }
        for k in pending {
            if let Some(id) = ids[k] {
                out[k] = found(id);
            }
        }
        Ok(out)
    }

    /// True when no identity was ever recorded (look-ups can be skipped).
    pub fn is_empty(&self) -> bool {
        let inner = self.inner.read();
        inner.recent.is_empty() && inner.layers.iter().all(|l| l.is_empty())
    }

    /// Every identity whose newest entry names `customer`, with where and
    /// when it was first seen, ordered by identity.
    pub fn of(&self, customer: u32) -> Result<Vec<(String, FirstSeen)>> {
        let inner = self.inner.read();
        let mut out: Vec<(String, FirstSeen)> = Vec::new();
        if let Some(keys) = inner.by_customer.get(&customer) {
            for key in keys {
                if let Some(r) = inner.recent.get(key)
                    && r.customer == customer
                {
                    out.push((key.to_string(), FirstSeen::decode(&r.info)));
                }
            }
        }
        for layer in inner.layers.iter().rev() {
            for (key, info) in layer.entries_of(customer)? {
                if Self::lookup_in(&inner, key)? == Found::Customer(customer) {
                    out.push((key.to_string(), FirstSeen::decode(info)));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        // An identity moved away and back has entries in two places; the
        // newest (first pushed) was kept first, and a stable sort keeps it
        // first among equals.
        out.dedup_by(|a, b| a.0 == b.0);
        Ok(out)
    }

    /// The identity of type `kind` of `customer` (`kind:value`), the one
    /// first seen earliest when it has several; `None` when it has none.
    pub fn of_type(&self, customer: u32, kind: &str) -> Result<Option<String>> {
        let inner = self.inner.read();
        let prefix = format!("{kind}:");
        let mut best: Option<(i64, String)> = None;
        let mut consider = |key: &str, info: &str| {
            let ms = FirstSeen::decode(info).first_ms;
            if best
                .as_ref()
                .is_none_or(|(b_ms, b_key)| (ms, key) < (*b_ms, b_key.as_str()))
            {
                best = Some((ms, key.to_string()));
            }
        };
        if let Some(keys) = inner.by_customer.get(&customer) {
            for key in keys.iter().filter(|k| k.starts_with(&prefix)) {
                if let Some(r) = inner.recent.get(key)
                    && r.customer == customer
                {
                    consider(key, &r.info);
                }
            }
        }
        for layer in &inner.layers {
            for (key, info) in layer.entries_of(customer)? {
                if key.starts_with(&prefix)
                    && Self::lookup_in(&inner, key)? == Found::Customer(customer)
                {
                    consider(key, info);
                }
            }
        }
        Ok(best.map(|(_, key)| key))
    }

    /// Records that `key` now names `customer` ([`UNLINKED`]: no one), at
    /// log record `lsn`. An identity already known keeps its first sighting
    /// (`seen` is used only for a new one).
    pub(crate) fn insert(
        &self,
        customer: u32,
        key: &str,
        seen: &FirstSeen,
        lsn: u64,
    ) -> Result<()> {
        let mut inner = self.inner.write();
        let info: Box<str> = match inner.recent.get(key) {
            Some(r) => r.info.clone(),
            None => {
                let mut old = None;
                for layer in inner.layers.iter().rev() {
                    if layer.find(key)?.is_some() {
                        old = layer.info_of(key)?.map(Box::<str>::from);
                        break;
                    }
                }
                old.unwrap_or_else(|| seen.encode().into())
            }
        };
        let before = inner.recent.insert(
            key.into(),
            Recent {
                customer,
                info,
                lsn,
            },
        );
        if customer != UNLINKED && before.is_none_or(|b| b.customer != customer) {
            inner
                .by_customer
                .entry(customer)
                .or_default()
                .push(key.into());
        }
        Ok(())
    }

    /// Identity sections, oldest first.
    pub fn layers(&self) -> Vec<Arc<DictLayer>> {
        self.inner.read().layers.clone()
    }

    /// The recent entries made at or before `upto_lsn`, in `(customer,
    /// identity)` order, for a checkpoint: those of live customers, those
    /// taken away, and those of deleted customers only where an identity
    /// section has the identity (the entry hides the older one until a merge
    /// of all sections drops both).
    pub(crate) fn recent_entries(
        &self,
        upto_lsn: u64,
        live: Members<'_>,
    ) -> Result<Vec<SectionEntry>> {
        let inner = self.inner.read();
        let mut out = Vec::new();
        for (key, r) in &inner.recent {
            if r.lsn > upto_lsn {
                continue;
            }
            let keep = r.customer == UNLINKED
                || live.contains(r.customer)
                || inner
                    .layers
                    .iter()
                    .map(|l| l.find(key))
                    .collect::<Result<Vec<_>>>()?
                    .iter()
                    .any(Option::is_some);
            if keep {
                out.push((r.customer, key.clone(), r.info.clone()));
            }
        }
        out.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(out)
    }

    /// After a checkpoint: the index of the snapshots to come, made of
    /// `layers`, with the recent entries made after `upto_lsn` (those at or
    /// before it are now in a section). This one is left as it is for the
    /// snapshots that share it.
    pub(crate) fn successor(&self, layers: Vec<Arc<DictLayer>>, upto_lsn: u64) -> Identities {
        let inner = self.inner.read();
        let recent: HashMap<Box<str>, Recent> = inner
            .recent
            .iter()
            .filter(|(_, r)| r.lsn > upto_lsn)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        let mut by_customer: HashMap<u32, Vec<Box<str>>> = HashMap::new();
        for (k, r) in &recent {
            if r.customer != UNLINKED {
                by_customer.entry(r.customer).or_default().push(k.clone());
            }
        }
        Identities {
            inner: RwLock::new(Inner {
                layers,
                recent,
                by_customer,
            }),
        }
    }

    /// Entries held in memory (not yet in a section).
    pub fn recent_len(&self) -> usize {
        self.inner.read().recent.len()
    }
}

fn found(id: u32) -> Found {
    if id == UNLINKED {
        Found::Unlinked
    } else {
        Found::Customer(id)
    }
}
