//! Customer keys to ids for one request, with new ids for new keys. The
//! keys were checked at the engine's door ([`WriteOp::check_keys`]); this
//! room trusts them.

use super::*;
use crate::error::{Error, Result};
use crate::storage::snapshot::resolve_identities;

/// Looks up customer keys for one request, giving new ids to new keys.
pub(super) struct IdAssigner<'a> {
    state: &'a State,
    /// The live customers of the writer's state.
    pub(super) live: crate::bitmap::Members<'a>,
    /// Keys given ids by this request: customers it creates, and
    /// identities it links to customers.
    /// (hashbrown: foldhash, seeded at random per map.)
    fresh: hashbrown::HashMap<Box<str>, u32>,
    /// Customers created for this request, to be logged with it.
    pub(super) new_keys: Vec<(u32, String)>,
    next: u32,
}

/// Where an [`IdAssigner`] stood, to go back to ([`IdAssigner::undo`]).
#[derive(Clone, Copy)]
pub(super) struct Mark {
    next: u32,
    new_keys: usize,
}

impl<'a> IdAssigner<'a> {
    pub(super) fn new(state: &'a State) -> Result<Self> {
        Ok(Self {
            state,
            live: state.snap.live()?.members(),
            fresh: hashbrown::HashMap::new(),
            new_keys: Vec::new(),
            next: state.snap.next_customer_id,
        })
    }

    /// True when `id` names a live customer, or one this request created.
    pub(super) fn is_live(&self, id: u32) -> bool {
        self.live.contains(id) || (self.state.snap.next_customer_id..self.next).contains(&id)
    }

    /// Where the assigner stands now.
    pub(super) fn mark(&self) -> Mark {
        Mark {
            next: self.next,
            new_keys: self.new_keys.len(),
        }
    }

    /// Forgets the customers created since `mark` (a write refused after
    /// its keys were looked up). Only for requests that link no identities.
    pub(super) fn undo(&mut self, mark: Mark) {
        for (_, key) in self.new_keys.drain(mark.new_keys..) {
            self.fresh.remove(key.as_str());
        }
        self.next = mark.next;
    }

    /// The id of a live customer, if the key names one.
    pub(super) fn get(&self, key: &str) -> Result<Option<u32>> {
        if let Some(&id) = self.fresh.get(key) {
            return Ok(Some(id));
        }
        self.state.snap.customer_id(key)
    }

    /// [`IdAssigner::get`] of many keys, with the dictionary look-ups
    /// overlapped: the ids of live customers, in order.
    pub(super) fn get_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<Vec<Option<u32>>> {
        let refs: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        let snap = &self.state.snap;
        let mut ids = snap.dict.lookup_many(&refs)?;
        resolve_identities(&snap.idents, self.live, &refs, &mut ids)?;
        for (id, key) in ids.iter_mut().zip(refs) {
            if let Some(&fresh) = self.fresh.get(key) {
                *id = Some(fresh);
            }
        }
        Ok(ids)
    }

    /// The ids of `keys`, new ids for keys no live customer has.
    pub(super) fn get_or_create_many(&mut self, keys: &[String]) -> Result<Vec<u32>> {
        let found = self.get_many(keys)?;
        keys.iter()
            .zip(found)
            .map(|(key, id)| match id {
                Some(id) => Ok(id),
                // A key named twice in one request is new only the first time.
                None => match self.fresh.get(key.as_str()) {
                    Some(&id) => Ok(id),
                    None => self.create(key),
                },
            })
            .collect()
    }

    pub(super) fn get_or_create(&mut self, key: &str) -> Result<u32> {
        if let Some(id) = self.get(key)? {
            return Ok(id);
        }
        self.create(key)
    }

    /// A new id for `key`, which no live customer has.
    pub(super) fn create(&mut self, key: &str) -> Result<u32> {
        let id = self.next;
        self.next = self
            .next
            .checked_add(1)
            .ok_or_else(|| Error::invalid("the store has used every customer id (2^32)"))?;
        self.fresh.insert(key.into(), id);
        self.new_keys.push((id, key.to_string()));
        Ok(id)
    }

    /// Records that this request links identity `key` to customer `id`:
    /// later look-ups of the request find it.
    pub(super) fn link(&mut self, key: &str, id: u32) {
        self.fresh.insert(key.into(), id);
    }
}
