//! Rules: tags and lifecycle stages defined by queries, kept current by the
//! store.
//!
//! A **rule tag** is a tag whose members are a query's (`高价值用户` =
//! `total_spend_fen >= 500000`); a **lifecycle** is an enumerated field
//! whose value is the first of its ordered stages whose query a customer
//! matches. Both are stored as a tag and a field are; what is new is that
//! the store keeps them equal to their queries:
//! - in every write: the one apply function (`storage::state`) evaluates
//!   each rule that reads what the write changed, for the customers it
//!   touched only, in the same atomic, logged change ([`order`] says in
//!   which order: a rule after the rules it reads);
//! - as the days turn: a rule is evaluated at a local day of its own (in its
//!   time zone), which a logged day turn advances; only the customers in
//!   the day buckets that entered or left its windows, or whose day values
//!   crossed a `TODAY` bound, are evaluated again ([`day`]).
//!
//! This room owns checking a definition against a snapshot ([`define`]),
//! the evaluation order, and evaluating a rule for some customers
//! ([`eval`]). It reads snapshots and changes nothing: `storage::state`
//! writes what it returns. It knows nothing of gRPC or of files.

pub mod day;
pub mod define;
pub mod eval;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::storage::snapshot::Rule;

pub use define::{
    Definition, MAX_RULE_DEFINITION_BYTES, MAX_RULE_QUERY_BYTES, MAX_RULES, MAX_STAGES, check,
};
pub use eval::{Among, Members, evaluate};

/// The order rules are evaluated in: every rule after the rules it reads,
/// otherwise by name. (Definitions that would make a cycle are refused, so
/// every rule has a place; should one not, it goes last.)
pub fn order(rules: &BTreeMap<Arc<str>, Arc<Rule>>) -> Vec<Arc<str>> {
    // Edges: rule → the rules it reads.
    let reads: BTreeMap<&Arc<str>, Vec<&str>> = rules
        .iter()
        .map(|(name, r)| {
            let deps = r
                .def
                .reads
                .iter()
                .map(String::as_str)
                .filter(|n| rules.contains_key(*n) && *n != &**name)
                .collect();
            (name, deps)
        })
        .collect();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::with_capacity(rules.len());
    loop {
        let ready: Vec<&Arc<str>> = reads
            .iter()
            .filter(|(name, deps)| {
                !done.contains(&****name) && deps.iter().all(|d| done.contains(*d))
            })
            .map(|(name, _)| *name)
            .collect();
        if ready.is_empty() {
            break;
        }
        for name in ready {
            done.insert(&**name);
            out.push(name.clone());
        }
    }
    out.extend(rules.keys().filter(|n| !done.contains(&***n)).cloned());
    out
}
