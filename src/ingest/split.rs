//! Whose each kept event is when a merge is undone (OneID): the events of
//! the merged customer, in the order they were logged, split between the
//! customer the merge absorbed and its survivor by the identities they
//! name. This room computes; it reads no file and writes nothing (the
//! server hands it the events the engine read and what their identities
//! name now, and logs the result).
//!
//! The rules (the README repeats them):
//! - An event kept under the absorbed customer (or a customer merged into
//!   it before) is its: it was, before the merge.
//! - The identities the merge moved are the absorbed customer's. Going
//!   through the survivor's events in log order, an event that names one
//!   of the absorbed customer's identities and none of the survivor's is
//!   the absorbed customer's, and the identities it first linked become
//!   its too; any other event is the survivor's, and so are the
//!   identities it first linked. So an event naming both (the one that
//!   merged them) stays with the survivor.
//! - Identities of types that never merge (a shared tablet) decide
//!   nothing; an event naming only identities that now name a third
//!   customer (one an earlier unmerge brought back) is that customer's, not
//!   either side's.

use std::collections::{HashMap, HashSet};

use roaring::RoaringBitmap;

use super::event::Event;
use super::normalize::Refused;

/// Whose an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The customer the merge absorbed, brought back.
    Revived,
    /// The merge's survivor.
    Survivor,
    /// Neither: a customer an earlier unmerge brought back.
    Other,
}

/// One kept event, decoded as far as the split needs.
pub struct Kept {
    /// The customer it is kept under.
    pub customer: u32,
    /// Its identities (`type:value`) of types that merge customers.
    pub identities: Vec<String>,
    /// Its bytes, for folding into facts.
    pub bytes: Vec<u8>,
}

impl Kept {
    /// Decodes `bytes` (kept under `customer`), keeping the identities not
    /// of a `never_merge` type.
    pub fn new(
        customer: u32,
        bytes: Vec<u8>,
        never_merge: &HashSet<String>,
    ) -> Result<Kept, Refused> {
        let identities = merging_identities(&bytes, never_merge)?;
        Ok(Kept {
            customer,
            identities,
            bytes,
        })
    }
}

/// The identities (`type:value`) an encoded event names, but for those of
/// a type in `never_merge`.
pub fn merging_identities(
    bytes: &[u8],
    never_merge: &HashSet<String>,
) -> Result<Vec<String>, Refused> {
    let (_source, event) = Event::decode(bytes)?;
    Ok(event
        .identities
        .iter()
        .filter(|i| !never_merge.contains(&i.kind))
        .map(|i| i.key())
        .collect())
}

/// What the split decided.
pub struct Split {
    /// Per event, in the order given.
    pub sides: Vec<Side>,
    /// The identities that name the survivor now and go back to the
    /// absorbed customer.
    pub revived: Vec<String>,
}

/// Splits `events` (in log order) between the customer a merge absorbed
/// (`absorbed`: it and the customers merged into it before, whose events
/// are kept under their ids) and `survivor`. `moved`: the identities the
/// merge moved; `naming`: the live customer each identity of the events
/// names now (absent: none).
pub fn split(
    events: &[Kept],
    absorbed: &RoaringBitmap,
    survivor: u32,
    moved: &[String],
    naming: &HashMap<String, u32>,
) -> Split {
    let names_survivor = |k: &str| naming.get(k) == Some(&survivor);
    let mut theirs: HashSet<&str> = moved
        .iter()
        .filter(|k| names_survivor(k))
        .map(String::as_str)
        .collect();
    let mut ours: HashSet<&str> = HashSet::new();
    let mut sides = Vec::with_capacity(events.len());
    for e in events {
        if absorbed.contains(e.customer) {
            sides.push(Side::Revived);
            continue;
        }
        let mine: Vec<&str> = e
            .identities
            .iter()
            .map(String::as_str)
            .filter(|k| names_survivor(k))
            .collect();
        if mine.is_empty() {
            let elsewhere = e.identities.iter().any(|k| naming.contains_key(k));
            sides.push(if elsewhere {
                Side::Other
            } else {
                Side::Survivor
            });
            continue;
        }
        let names_theirs = mine.iter().any(|k| theirs.contains(k));
        let names_ours = mine.iter().any(|k| ours.contains(k));
        if names_theirs && !names_ours {
            theirs.extend(mine);
            sides.push(Side::Revived);
        } else {
            ours.extend(mine.into_iter().filter(|k| !theirs.contains(k)));
            sides.push(Side::Survivor);
        }
    }
    let mut revived: Vec<String> = theirs.into_iter().map(str::to_string).collect();
    revived.sort();
    Split { sides, revived }
}

/// Whose a kept event is once merges were undone, by what its identities
/// name now: the one live customer they name; the customer it is kept
/// under (`kept_as`: the one it lives on as) when they name several of
/// which that is one, or none; `None` when they name several others.
pub fn owner(identities: &[String], kept_as: u32, naming: &HashMap<String, u32>) -> Option<u32> {
    let mut named: Vec<u32> = identities
        .iter()
        .filter_map(|k| naming.get(k).copied())
        .collect();
    named.sort_unstable();
    named.dedup();
    match named.as_slice() {
        [] => Some(kept_as),
        [one] => Some(*one),
        many if many.contains(&kept_as) => Some(kept_as),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(customer: u32, ids: &[&str]) -> Kept {
        Kept {
            customer,
            identities: ids.iter().map(|s| s.to_string()).collect(),
            bytes: Vec::new(),
        }
    }

    #[test]
    fn events_follow_the_identities_they_name() {
        // Customer 5 (phone:a, pin:a) was absorbed into 1 (phone:s) by an
        // event naming phone:s and pin:a; then 1's events: pin:a alone,
        // pin:a with a new unionid:a, the unionid alone, phone:s with a new
        // unionid:s, and one naming phone:r, which an earlier unmerge gave
        // back to customer 9.
        let naming: HashMap<String, u32> = [
            ("phone:a", 1),
            ("pin:a", 1),
            ("phone:s", 1),
            ("unionid:a", 1),
            ("unionid:s", 1),
            ("phone:r", 9),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let events = [
            kept(5, &["phone:a"]),
            kept(5, &["pin:a", "phone:a"]),
            kept(1, &["phone:s"]),
            kept(1, &["phone:s", "pin:a"]),
            kept(1, &["pin:a"]),
            kept(1, &["pin:a", "unionid:a"]),
            kept(1, &["unionid:a"]),
            kept(1, &["phone:s", "unionid:s"]),
            kept(1, &["phone:r"]),
            kept(1, &["phone:r", "phone:s"]),
            kept(1, &[]),
        ];
        let absorbed: RoaringBitmap = [5u32].into_iter().collect();
        let moved = ["phone:a".to_string(), "pin:a".to_string()];
        let out = split(&events, &absorbed, 1, &moved, &naming);
        use Side::*;
        assert_eq!(
            out.sides,
            [
                Revived, Revived, Survivor, Survivor, Revived, Revived, Revived, Survivor, Other,
                Survivor, Survivor
            ]
        );
        assert_eq!(out.revived, ["phone:a", "pin:a", "unionid:a"]);
    }

    #[test]
    fn the_owner_is_the_one_customer_named() {
        let naming: HashMap<String, u32> = [("phone:a", 1), ("phone:b", 2)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(owner(&ids(&["phone:a"]), 2, &naming), Some(1));
        assert_eq!(owner(&ids(&["phone:a", "phone:b"]), 2, &naming), Some(2));
        assert_eq!(owner(&ids(&["phone:a", "phone:b"]), 3, &naming), None);
        assert_eq!(owner(&ids(&["phone:x"]), 3, &naming), Some(3));
    }
}
