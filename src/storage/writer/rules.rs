//! Rules in the write path: a rule tag or lifecycle defined, redefined or
//! dropped, and the rules' days turned. The rules layer checks the
//! definition against the writer's state (its queries, windows and cycles);
//! this room checks the name (one name space with tags, fields and saved
//! audiences), the limits, that a rule tag stays a rule tag, and refuses
//! writes to what rules own and drops of what rules read. Planning only;
//! `state::apply` keeps the definitions and evaluates them.

use super::plan::{Planner, check_meta};
use super::*;
use crate::error::{Error, Result};
use crate::fields::time;
use crate::fields::{FieldKind, MergeRule};
use crate::names::check_tag_name;
use crate::rules::{Definition, MAX_RULES};
use crate::storage::record::{Batch, NewField, NewTag, RuleChange};

impl Planner<'_> {
    pub(super) fn plan_define_rule(
        &self,
        name: String,
        definition: Definition,
        description: String,
        category: String,
        replace: bool,
        mut batch: Batch,
    ) -> Result<Planned> {
        self.refuse_audience_rule(&name)?;
        let target = self.define_rule_into(
            name,
            definition,
            description,
            category,
            replace,
            false,
            &mut batch,
        )?;
        Ok(Planned::Write(batch, target))
    }

    /// Adds rule `name`'s definition to `batch` (with its tag or field when
    /// it is new). `for_audience`: the rule keeps the saved audience of
    /// that name current (defined in the same batch), so the name is
    /// allowed to be the audience's.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn define_rule_into(
        &self,
        name: String,
        definition: Definition,
        description: String,
        category: String,
        replace: bool,
        for_audience: bool,
        batch: &mut Batch,
    ) -> Result<Target> {
        let snap = &self.state.snap;
        check_tag_name(&name)?;
        check_meta(&description, &category)?;
        let lifecycle = !definition.stages.is_empty();
        let existing = snap.rules.get(&name);
        match existing {
            Some(_) if !replace => {
                return Err(Error::Precondition(format!(
                    "rule {name:?} exists; redefine it with replace"
                )));
            }
            Some(r) if r.def.is_lifecycle() != lifecycle => {
                return Err(Error::Precondition(format!(
                    "{name:?} is a {}; drop it to define a {} of that name",
                    if r.def.is_lifecycle() {
                        "lifecycle"
                    } else {
                        "rule tag"
                    },
                    if lifecycle { "lifecycle" } else { "rule tag" },
                )));
            }
            Some(_) => {}
            None => {
                if snap.tag(&name).is_some() {
                    return Err(Error::TagExists(name));
                }
                if snap.field(&name).is_some() {
                    return Err(Error::FieldExists(name));
                }
                if !for_audience && snap.audiences.contains_key(name.as_str()) {
                    return Err(Error::AudienceExists(name));
                }
                if snap.rules.len() >= MAX_RULES {
                    return Err(Error::invalid(format!(
                        "the store keeps at most {MAX_RULES} rules; drop one first"
                    )));
                }
            }
        }
        let (def, day) = crate::rules::check(snap, &name, definition, self.at_ms, self.time_zone)?;
        if existing.is_none() {
            let id = snap.next_tag_id;
            if lifecycle {
                let values = def.stages.iter().map(|(v, _)| v.clone()).collect();
                let kind = FieldKind::Enum { values };
                kind.validate()?;
                batch.new_fields.push(NewField {
                    id,
                    name: name.clone(),
                    description,
                    category,
                    kind,
                    merge: MergeRule::Keep,
                });
            } else {
                batch.new_tags.push(NewTag {
                    id,
                    name: name.clone(),
                    description,
                    category,
                });
            }
        } else {
            self.load_target(&name)?;
        }
        self.load_reads(&def.reads)?;
        batch.rules.push(RuleChange {
            name: name.clone(),
            definition: Some(def),
            day,
        });
        Ok(match (existing.is_some(), lifecycle) {
            (true, _) => Target::Plain,
            (false, true) => Target::FieldCreated(name),
            (false, false) => Target::Created(name),
        })
    }

    pub(super) fn plan_drop_rule(&self, name: String, mut batch: Batch) -> Result<Planned> {
        if !self.state.snap.rules.by_name.contains_key(name.as_str()) {
            return Err(Error::RuleNotFound(name));
        }
        self.refuse_audience_rule(&name)?;
        self.drop_rule_into(name, &mut batch)?;
        Ok(Planned::Write(batch, Target::Plain))
    }

    /// Adds dropping rule `name` (with its tag or field) to `batch`.
    pub(super) fn drop_rule_into(&self, name: String, batch: &mut Batch) -> Result<()> {
        let snap = &self.state.snap;
        let Some(rule) = snap.rules.get(&name) else {
            return Err(Error::RuleNotFound(name));
        };
        let what = if rule.def.is_lifecycle() {
            "lifecycle"
        } else {
            "rule tag"
        };
        self.refuse_if_read(&name, what)?;
        if rule.def.is_lifecycle() {
            if let Some(f) = snap.field(&name) {
                batch.drop_fields.push(f.id);
            }
        } else if let Some(t) = snap.tag(&name) {
            batch.drop_tags.push(t.id);
        }
        batch.rules.push(RuleChange {
            name,
            definition: None,
            day: 0,
        });
        Ok(())
    }

    /// Refuses to define, redefine or drop by itself the rule that keeps
    /// a saved audience of the same name current: the audience owns it.
    pub(super) fn refuse_audience_rule(&self, name: &str) -> Result<()> {
        let snap = &self.state.snap;
        if snap.audiences.contains_key(name) && snap.rules.get(name).is_some() {
            return Err(Error::Precondition(format!(
                "{name:?} keeps saved audience {name:?} current: change it with CreateAudience (replace, kept_current) or drop the audience"
            )));
        }
        Ok(())
    }

    pub(super) fn plan_turn_rule_days(&self, mut batch: Batch) -> Result<Planned> {
        let snap = &self.state.snap;
        for r in snap.rules.by_name.values() {
            let zone = crate::rules::define::zone_of(&r.def)?;
            let today = time::day_of(self.at_ms, &zone)?;
            if today > r.day {
                self.load_target(&r.name)?;
                self.load_reads(&r.def.reads)?;
                batch.rule_days.push((r.name.to_string(), today));
            }
        }
        if batch.rule_days.is_empty() {
            return Ok(Planned::Done(WriteResult {
                lsn: snap.lsn,
                ..Default::default()
            }));
        }
        Ok(Planned::Write(batch, Target::Plain))
    }

    /// Refuses to drop or redefine `name` (a tag, field or saved audience)
    /// while rules read it.
    pub(super) fn refuse_if_read(&self, name: &str, what: &str) -> Result<()> {
        let readers: Vec<&str> = self
            .state
            .snap
            .rules
            .readers_of(name)
            .map(|r| &*r.name)
            .filter(|r| *r != name)
            .collect();
        if readers.is_empty() {
            return Ok(());
        }
        Err(Error::Precondition(format!(
            "{what} {name:?} is read by rule{} {}: redefine or drop {} first",
            if readers.len() == 1 { "" } else { "s" },
            readers
                .iter()
                .map(|r| format!("{r:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            if readers.len() == 1 { "it" } else { "them" },
        )))
    }

    /// Refuses a direct write to a rule tag.
    pub(super) fn refuse_rule_write(&self, name: &str) -> Result<()> {
        match self.state.snap.rules.get(name) {
            None => Ok(()),
            Some(r) => Err(Error::Precondition(format!(
                "tag {name:?} is a rule tag: its members follow its rule ({}) and cannot be written; redefine the rule with DefineRule to change them",
                r.def.query
            ))),
        }
    }

    /// Loads a rule's tag or field, so that applying cannot stop halfway
    /// on a file.
    fn load_target(&self, name: &str) -> Result<()> {
        let snap = &self.state.snap;
        if let Some(t) = snap.tag(name) {
            t.bitmap.get()?;
        }
        if let Some(f) = snap.field(name) {
            for b in f.slots.values() {
                b.get()?;
            }
        }
        Ok(())
    }

    /// Loads what a rule reads (see [`Self::load_target`]).
    fn load_reads(&self, reads: &[String]) -> Result<()> {
        self.state.snap.live()?;
        for r in reads {
            self.load_target(r)?;
        }
        Ok(())
    }
}
