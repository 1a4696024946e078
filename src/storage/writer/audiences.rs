//! Saved audiences in the write path: a named query defined, redefined or
//! dropped, and audience snapshots taken and dropped. The query layer has
//! checked the query, named the saved audiences it uses and computed a
//! snapshot's members; this room checks the name (one name space with tags
//! and fields), the limits, and that no audience comes to use itself.
//! Planning only; `state::apply` keeps the definitions and snapshots.

use std::collections::BTreeSet;

use super::plan::{Planner, check_meta};
use super::*;
use crate::error::{Error, Result};
use crate::names::check_tag_name;
use crate::storage::record::{AudienceChange, AudienceDef, Batch, SnapshotChange, TakenSnapshot};

impl Planner<'_> {
    pub(super) fn plan_put_audience(
        &self,
        name: String,
        definition: AudienceDef,
        replace: bool,
        kept_current: bool,
        mut batch: Batch,
    ) -> Result<Planned> {
        let snap = &self.state.snap;
        check_tag_name(&name)?;
        check_meta(&definition.description, &definition.category)?;
        if definition.owner.len() > MAX_OWNER_BYTES
            || definition.owner.chars().any(char::is_control)
        {
            return Err(Error::invalid(format!(
                "owner must be at most {MAX_OWNER_BYTES} bytes without control characters"
            )));
        }
        if definition.query.is_empty() || definition.query.len() > MAX_AUDIENCE_QUERY_BYTES {
            return Err(Error::invalid(format!(
                "an audience's query is 1 to {MAX_AUDIENCE_QUERY_BYTES} bytes; this one is {}",
                definition.query.len()
            )));
        }
        let exists = snap.audiences.contains_key(name.as_str());
        // The tag of a rule that keeps this audience current is the
        // audience's own.
        let kept = exists && snap.rules.get(&name).is_some();
        if snap.tag(&name).is_some() && !kept {
            return Err(Error::TagExists(name));
        }
        if snap.field(&name).is_some() {
            return Err(Error::FieldExists(name));
        }
        if exists && !replace {
            return Err(Error::AudienceExists(name));
        }
        if exists {
            // A rule reads what the audience is now; it is kept current
            // against that.
            self.refuse_if_read(&name, "saved audience")?;
        }
        if !exists && snap.audiences.len() >= MAX_AUDIENCES {
            return Err(Error::invalid(format!(
                "the store keeps at most {MAX_AUDIENCES} saved audiences; drop one first"
            )));
        }
        for used in &definition.uses {
            if !snap.audiences.contains_key(used.as_str()) && *used != name {
                return Err(Error::AudienceNotFound(used.clone()));
            }
        }
        if let Some(path) = self.cycle(&name, &definition.uses) {
            return Err(Error::invalid(format!(
                "audience {name:?} would use itself: {}",
                path.join(" → ")
            )));
        }
        let rule = kept_current.then(|| crate::rules::Definition {
            query: definition.query.clone(),
            ..Default::default()
        });
        let (description, category) = (definition.description.clone(), definition.category.clone());
        batch.audiences.push(AudienceChange {
            name: name.clone(),
            definition: Some(definition),
        });
        match rule {
            Some(rule) => {
                self.define_rule_into(name, rule, description, category, kept, true, &mut batch)
                    .map_err(|e| kept_error(e, "to keep the audience current"))?;
            }
            None if kept => self.drop_rule_into(name, &mut batch)?,
            None => {}
        }
        Ok(Planned::Write(
            batch,
            Target::SourcePut { created: !exists },
        ))
    }

    pub(super) fn plan_drop_audience(&self, name: String, mut batch: Batch) -> Result<Planned> {
        let snap = &self.state.snap;
        if !snap.audiences.contains_key(name.as_str()) {
            return Err(Error::AudienceNotFound(name));
        }
        if let Some(user) = snap.audiences.values().find(|a| a.uses.contains(&name)) {
            return Err(Error::Precondition(format!(
                "saved audience {:?} uses {name:?}: redefine or drop it first",
                user.name
            )));
        }
        self.refuse_if_read(&name, "saved audience")?;
        if snap.rules.get(&name).is_some() {
            self.drop_rule_into(name.clone(), &mut batch)?;
        }
        batch.audiences.push(AudienceChange {
            name,
            definition: None,
        });
        Ok(Planned::Write(batch, Target::Plain))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn plan_take_snapshot(
        &self,
        audience: String,
        query: String,
        taken_lsn: u64,
        note: String,
        members: roaring::RoaringBitmap,
        same_as: u32,
        mut batch: Batch,
    ) -> Result<Planned> {
        let snap = &self.state.snap;
        check_meta(&note, "")?;
        if snap.snapshots.len() >= MAX_SNAPSHOTS {
            return Err(Error::invalid(format!(
                "the store keeps at most {MAX_SNAPSHOTS} audience snapshots; drop some first"
            )));
        }
        let id = snap.next_snapshot_id;
        let members = match same_as {
            0 => Some(members),
            other if snap.snapshots.contains_key(&other) => None,
            // Dropped meanwhile: keep the members themselves.
            _ => Some(members),
        };
        let same_as = if members.is_none() { same_as } else { 0 };
        let count = match &members {
            Some(m) => m.len(),
            None => snap.snapshots.get(&same_as).map_or(0, |s| s.count),
        };
        batch.snapshots.push(SnapshotChange::Take(TakenSnapshot {
            id,
            audience,
            query,
            taken_lsn,
            note,
            members,
            same_as,
        }));
        Ok(Planned::Write(batch, Target::Snapshot { id, count }))
    }

    pub(super) fn plan_drop_snapshot(&self, id: u32, mut batch: Batch) -> Result<Planned> {
        if !self.state.snap.snapshots.contains_key(&id) {
            return Err(Error::SnapshotNotFound(id));
        }
        batch.snapshots.push(SnapshotChange::Drop { id });
        Ok(Planned::Write(batch, Target::Plain))
    }

    /// The path by which audience `name`, using `uses`, would come back to
    /// itself through the saved audiences (as they would be once it is
    /// saved), if it would.
    fn cycle(&self, name: &str, uses: &[String]) -> Option<Vec<String>> {
        let audiences = &self.state.snap.audiences;
        let uses_of = |a: &str| -> Vec<String> {
            if a == name {
                uses.to_vec()
            } else {
                audiences.get(a).map(|m| m.uses.clone()).unwrap_or_default()
            }
        };
        // Depth-first from `name`, with the path so far.
        let mut done: BTreeSet<String> = BTreeSet::new();
        let mut path = vec![name.to_string()];
        let mut stack: Vec<(Vec<String>, usize)> = vec![(uses_of(name), 0)];
        while let Some((next, i)) = stack.last_mut() {
            if *i >= next.len() {
                stack.pop();
                if let Some(p) = path.pop() {
                    done.insert(p);
                }
                continue;
            }
            let u = next[*i].clone();
            *i += 1;
            if u == name {
                path.push(u);
                return Some(path);
            }
            if done.contains(&u) || path.contains(&u) {
                continue;
            }
            path.push(u.clone());
            stack.push((uses_of(&u), 0));
        }
        None
    }
}

/// An error of the rule that would keep an audience current, saying so
/// (a query's position still points into the audience's query, which is
/// the rule's).
fn kept_error(e: Error, why: &str) -> Error {
    match e {
        Error::Query {
            kind,
            position,
            message,
        } => Error::Query {
            kind,
            position,
            message: format!("{why}: {message}"),
        },
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{why}: {m}")),
        Error::Precondition(m) => Error::Precondition(format!("{why}: {m}")),
        e => e,
    }
}
