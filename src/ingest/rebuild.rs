//! Facts rebuilt from kept events: the archived events of some customers,
//! folded by the fact rules in force now into the values those customers'
//! facts should have. Sums, minimums and maximums are folded here, one
//! value per (field, customer); behaviour events become one write each.
//! Every refund is paired with its order (the same source and source event
//! id), in whatever order the two were ingested: the order gives only its
//! sums, which the refund's subtract; its behaviours and days are left out.
//!
//! This room computes; it reads no file and writes nothing (the server
//! hands it the events the engine read, and logs what it returns).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::event::Event;
use super::facts::{Fact, FactKind, FactWrite, Facts, ORDER, REFUND};
use super::normalize::Refused;
use crate::fields::MergeRule;
use crate::storage::{EventTime, ValueWrite};

/// Most writes one rebuild may make (a value per field and customer, a
/// write per behaviour event): what it holds in memory is bounded by this.
pub const MAX_WRITES: usize = 5_000_000;

/// The facts of some customers, being rebuilt.
pub struct Rebuild<'a> {
    facts: &'a Facts,
    keys: HashMap<u32, String>,
    ints: BTreeMap<(String, u32), i64>,
    events: Vec<(String, u32, i64)>,
    /// Fields the kept events write, their kind and merge rule.
    pub kinds: BTreeMap<String, (FactKind, MergeRule)>,
    /// Per customer: events read, and events (or facts of them) the rules
    /// refuse.
    pub counts: HashMap<u32, (u64, u64)>,
    /// Why the rules refused what they refused.
    pub reasons: BTreeSet<String>,
    /// Orders' behaviours and days, by (source, source event id), folded
    /// in at the end unless a refund names the order.
    held: Vec<(u32, (String, String), Fact)>,
    /// (source, source event id) of every refund read.
    refunded: HashSet<(String, String)>,
    limit: usize,
}

/// What a rebuild writes.
pub struct Rebuilt {
    /// Fields whose values the customers lose first.
    pub erase: Vec<String>,
    /// Then these writes.
    pub writes: Vec<ValueWrite>,
}

impl<'a> Rebuild<'a> {
    /// For the customers of `keys` (id → key).
    pub fn new(facts: &'a Facts, keys: HashMap<u32, String>) -> Self {
        Self {
            facts,
            keys,
            ints: BTreeMap::new(),
            events: Vec::new(),
            kinds: BTreeMap::new(),
            counts: HashMap::new(),
            reasons: BTreeSet::new(),
            held: Vec::new(),
            refunded: HashSet::new(),
            limit: MAX_WRITES,
        }
    }

    /// With another bound than [`MAX_WRITES`].
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// True once the writes, the orders' facts held for their refunds and
    /// the refunds read pass the bound ([`MAX_WRITES`]): the caller
    /// should stop and ask for fewer customers at once.
    pub fn too_large(&self) -> bool {
        self.ints.len() + self.events.len() + self.held.len() + self.refunded.len() > self.limit
    }

    /// Folds in one archived event of `customer`. An event that does not
    /// decode is an error (the archive is damaged); one the rules refuse is
    /// counted.
    pub fn add(&mut self, customer: u32, bytes: &[u8]) -> Result<(), Refused> {
        if !self.keys.contains_key(&customer) {
            return Ok(());
        }
        let (source, event) = Event::decode(bytes)?;
        let counts = self.counts.entry(customer).or_default();
        counts.0 += 1;
        let facts = match self.facts.of(&event) {
            Ok(f) => f,
            Err(Refused(why)) => {
                counts.1 += 1;
                self.reasons.insert(why);
                return Ok(());
            }
        };
        let order = match (event.source_event_id, event.event_type.as_str()) {
            (Some(id), REFUND) => {
                self.refunded.insert((source, id));
                None
            }
            (Some(id), ORDER) => Some((source, id)),
            _ => None,
        };
        for f in facts {
            self.kinds
                .entry(f.field.clone())
                .or_insert((f.kind, f.merge_rule()));
            match &order {
                Some(o) if !f.is_sum() => self.held.push((customer, o.clone(), f)),
                _ => self.fold(customer, f),
            }
        }
        Ok(())
    }

    /// One fact of `customer` into the values.
    fn fold(&mut self, customer: u32, f: Fact) {
        match f.write {
            FactWrite::Combine(with) => {
                let key = (f.field, customer);
                let current = self.ints.get(&key).copied();
                match with.apply(current) {
                    Some(v) => {
                        self.ints.insert(key, v);
                    }
                    None => {
                        self.counts.entry(customer).or_default().1 += 1;
                        self.reasons
                            .insert(format!("the sum of {:?} leaves the 64-bit range", key.0));
                    }
                }
            }
            FactWrite::Event(ms) => self.events.push((f.field, customer, ms)),
        }
    }

    /// The writes, with the fields to erase first: every field of `fields`
    /// (the store's, with their kinds) that a rule could write.
    pub fn finish<'f>(mut self, fields: impl Iterator<Item = (&'f str, FactKind)>) -> Rebuilt {
        for (customer, order, f) in std::mem::take(&mut self.held) {
            if !self.refunded.contains(&order) {
                self.fold(customer, f);
            }
        }
        let erase = fields
            .filter(|(name, kind)| self.facts.may_write(name) == Some(*kind))
            .map(|(name, _)| name.to_string())
            .collect();
        let key = |id: &u32| self.keys.get(id).cloned().unwrap_or_default();
        let mut writes: Vec<ValueWrite> = self
            .ints
            .iter()
            .map(|((field, id), v)| ValueWrite::Int {
                field: field.clone(),
                customer: key(id),
                value: Some(*v),
            })
            .collect();
        writes.extend(self.events.iter().map(|(field, id, ms)| ValueWrite::Event {
            field: field.clone(),
            customer: key(id),
            at: EventTime::Ms(*ms),
        }));
        Rebuilt { erase, writes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::Identity;

    fn event(kind: &str, amount: i64, at_ms: i64) -> Vec<u8> {
        Event {
            source_event_id: None,
            identities: vec![Identity {
                kind: "phone".into(),
                value: "13800000000".into(),
            }],
            channel: "jd".into(),
            event_type: kind.into(),
            at_ms,
            amount_fen: Some(amount),
            item: None,
            category: Some("skincare".into()),
            brand: None,
            store: None,
            attributes: BTreeMap::new(),
        }
        .encode("jd_orders")
    }

    #[test]
    fn orders_and_refunds_fold_into_values() {
        let facts = Facts::standard();
        let keys: HashMap<u32, String> = [(7, "phone:13800000000".to_string())].into();
        let mut r = Rebuild::new(&facts, keys);
        // 2026-11-11 and 2026-11-12, Shanghai.
        let (d1, d2) = (1_794_326_400_000, 1_794_412_800_000);
        r.add(7, &event("order", 10_000, d1)).unwrap();
        r.add(7, &event("order", 5_000, d2)).unwrap();
        r.add(7, &event("refund", 5_000, d2)).unwrap();
        // Another customer's event, passed by mistake: ignored.
        r.add(8, &event("order", 1, d1)).unwrap();
        assert!(r.add(7, b"not an event").is_err());
        assert_eq!(r.counts[&7], (3, 0));
        assert!(!r.counts.contains_key(&8));
        let fields = [
            ("order_count", FactKind::Integer),
            ("bought:skincare", FactKind::Behaviour),
            ("vip_level", FactKind::Integer),
            ("order_count:jd", FactKind::Behaviour),
        ];
        let out = r.finish(fields.into_iter());
        assert_eq!(out.erase, ["order_count", "bought:skincare"]);
        let int = |name: &str| {
            out.writes.iter().find_map(|w| match w {
                ValueWrite::Int {
                    field,
                    value,
                    customer,
                } if field == name => {
                    assert_eq!(customer, "phone:13800000000");
                    *value
                }
                _ => None,
            })
        };
        assert_eq!(int("order_count"), Some(1));
        assert_eq!(int("total_spend_fen"), Some(10_000));
        assert_eq!(int("spend_fen:jd"), Some(10_000));
        let first = int("first_order_day").unwrap();
        assert_eq!(int("last_order_day"), Some(first + 1));
        let bought = out
            .writes
            .iter()
            .filter(|w| matches!(w, ValueWrite::Event { field, .. } if field == "bought:skincare"))
            .count();
        assert_eq!(bought, 2);
    }

    #[test]
    fn a_refund_takes_back_its_orders_behaviours_and_days_whichever_came_first() {
        let facts = Facts::standard();
        let keys: HashMap<u32, String> = [(7, "phone:13800000000".to_string())].into();
        let with_id = |kind: &str, id: &str, amount: i64, at_ms: i64| {
            let mut e = Event::decode(&event(kind, amount, at_ms)).unwrap().1;
            e.source_event_id = Some(id.into());
            e.encode("jd_orders")
        };
        // 2026-11-10, -11 and -12, Shanghai.
        let (d0, d1, d2) = (1_794_240_000_000, 1_794_326_400_000, 1_794_412_800_000);
        for refund_first in [false, true] {
            let mut r = Rebuild::new(&facts, keys.clone());
            // The refund of the last order, before or after it.
            let refund = with_id("refund", "J2", 5_000, d2);
            if refund_first {
                r.add(7, &refund).unwrap();
            }
            r.add(7, &with_id("order", "J1", 10_000, d1)).unwrap();
            r.add(7, &with_id("order", "J2", 5_000, d2)).unwrap();
            if !refund_first {
                r.add(7, &refund).unwrap();
            }
            // A refund of another source's J1 takes back no order here.
            let mut other = Event::decode(&with_id("refund", "J1", 1, d2)).unwrap().1;
            other.source_event_id = Some("J1".into());
            r.add(7, &other.encode("pos_orders")).unwrap();
            // An order without an id: nothing can name it.
            r.add(7, &event("order", 300, d0)).unwrap();
            let out = r.finish(std::iter::empty());
            let int = |name: &str| {
                out.writes.iter().find_map(|w| match w {
                    ValueWrite::Int { field, value, .. } if field == name => *value,
                    _ => None,
                })
            };
            assert_eq!(int("order_count"), Some(1), "refund first: {refund_first}");
            assert_eq!(int("total_spend_fen"), Some(10_000 + 300 - 1));
            let day0 = int("first_order_day").unwrap();
            // J2's day is gone; J1's is the last.
            assert_eq!(int("last_order_day"), Some(day0 + 1));
            let mut bought: Vec<i64> = out
                .writes
                .iter()
                .filter_map(|w| match w {
                    ValueWrite::Event {
                        field,
                        at: EventTime::Ms(ms),
                        ..
                    } if field == "bought:skincare" => Some(*ms),
                    _ => None,
                })
                .collect();
            bought.sort();
            assert_eq!(bought, [d0, d1]);
        }
    }

    #[test]
    fn the_writes_a_rebuild_holds_are_bounded() {
        let facts = Facts::standard();
        let keys: HashMap<u32, String> = [(7, "phone:13800000000".to_string())].into();
        let mut r = Rebuild::new(&facts, keys.clone()).with_limit(20);
        let mut n = 0;
        while !r.too_large() {
            // Each order on a new day: one more behaviour write or two.
            r.add(7, &event("order", 100, 1_794_326_400_000 + n * 86_400_000))
                .unwrap();
            n += 1;
        }
        assert!(n < 20, "{n} events");

        // Orders held for their refunds, and refunds of orders not read,
        // count too: neither makes a write of its own until the end.
        for kind in ["order", "refund"] {
            let mut r = Rebuild::new(&facts, keys.clone()).with_limit(20);
            let mut n = 0;
            while !r.too_large() && n < 1_000 {
                let mut e = Event::decode(&event(kind, 100, 1_794_326_400_000))
                    .unwrap()
                    .1;
                e.source_event_id = Some(format!("J{n}"));
                r.add(7, &e.encode("jd_orders")).unwrap();
                n += 1;
            }
            assert!(n < 20, "{kind}: {n} events");
        }
    }
}
