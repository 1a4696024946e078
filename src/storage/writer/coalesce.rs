//! Small membership writes that arrive together, committed as one batch.
//!
//! A service that sends one change at a time (an `Ingest` stream of single
//! changes, many `Update` calls at once) brings the writer groups of tiny
//! writes. Each costs a plan, a log record, an apply with its feed
//! comparison and a feed entry, mostly the same fixed work again. Here a
//! run of consecutive small `Update`s of one group is planned with one
//! [`IdAssigner`], logged as one record and applied once; each request is
//! still answered on its own (its own refusal, or what its own changes
//! did), and every one of them after the one sync.
//!
//! What makes the combined batch mean exactly what the writes one after
//! another would: a run holds only updates of tags that exist (none makes
//! or drops one), and **no customer is named by two writes of a run** (the
//! first write that names a customer already named ends the run and starts
//! the next). So each customer's tags change in one write only, every rule
//! and kept-current audience sees, for each customer, the same before and
//! after as it would have, and the change feed shows every change, under
//! the run's one lsn. A refused write (a rule tag, a dead customer id)
//! is refused as it would have been and leaves nothing in the batch.
//!
//! This room plans; the writer (the module above) logs, applies and
//! answers. It must not write to the state.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use super::ids::IdAssigner;
use super::plan::Planner;
use super::*;

/// A write joins a run when it names at most this many customers: larger
/// ones gain nothing from sharing a record, and keep the sync-while-applying
/// of a group's large last write.
const MAX_IDS: usize = 64;

/// Most writes in one run.
pub(super) const MAX_RUN: usize = MAX_GROUP;

/// One request of a run that was planned into the combined batch.
pub(super) struct Part {
    pub reply: Reply<WriteResult>,
    /// Its changes among the batch's `changes`.
    pub changes: Range<usize>,
    pub new_customers: u64,
}

/// A run planned: the batch to log (`None`: nothing would change), the
/// requests in it, the refused ones, and the writes given back to be
/// committed after it (from the first that names a customer of the run).
pub(super) struct RunPlan {
    pub batch: Option<Batch>,
    pub parts: Vec<Part>,
    pub refused: Vec<(Reply<WriteResult>, Error)>,
    pub rest: Vec<(WriteOp, Reply<WriteResult>)>,
}

/// True when `op` may join a run: an update of tags that all exist, naming
/// a few customers.
pub(super) fn joins(op: &WriteOp, state: &State) -> bool {
    let WriteOp::Update { mutations, .. } = op else {
        return false;
    };
    let named: usize = mutations
        .iter()
        .map(|m| {
            m.add.len()
                + m.remove.len()
                + m.add_ids.len()
                + m.remove_ids.len()
                + m.add_resolved.len()
                + m.remove_resolved.len()
        })
        .sum();
    (1..=MAX_IDS).contains(&named) && mutations.iter().all(|m| state.snap.tag(&m.tag).is_some())
}

/// The same error again, for each further request of a run a failure
/// stops.
pub(super) fn again(e: &Error) -> Error {
    match e {
        Error::DiskFull(m) => Error::DiskFull(m.clone()),
        Error::Failed(m) => Error::Failed(m.clone()),
        other => Error::Internal(other.to_string()),
    }
}

impl Planner<'_> {
    /// Plans `run` (writes that each [`joins`]) as one batch.
    pub(super) fn plan_run(&self, run: Vec<(WriteOp, Reply<WriteResult>)>) -> RunPlan {
        let mut plan = RunPlan {
            batch: None,
            parts: Vec::with_capacity(run.len()),
            refused: Vec::new(),
            rest: Vec::new(),
        };
        let mut ids = match IdAssigner::new(self.state) {
            Ok(ids) => ids,
            Err(e) => {
                for (_, reply) in run {
                    plan.refused.push((reply, again(&e)));
                }
                return plan;
            }
        };
        let mut batch = Batch {
            at_ms: self.at_ms,
            ..Default::default()
        };
        let mut named: HashSet<u32> = HashSet::new();
        let mut run = run.into_iter();
        while let Some((op, reply)) = run.next() {
            let WriteOp::Update {
                mutations,
                create_missing_tags,
            } = &op
            else {
                // Never: only updates join. Committed on its own after the run.
                plan.rest.push((op, reply));
                plan.rest.extend(run);
                break;
            };
            let mark = ids.mark();
            let (first, created) = (batch.changes.len(), ids.new_keys.len());
            let res = if mutations.iter().all(Mutation::is_empty) {
                Err(Error::invalid(
                    "empty update: the mutations name no customers",
                ))
            } else {
                self.plan_mutations(
                    mutations,
                    *create_missing_tags,
                    &mut ids,
                    &mut HashMap::new(),
                    &mut batch,
                )
            };
            if let Err(e) = res {
                batch.changes.truncate(first);
                ids.undo(mark);
                plan.refused.push((reply, e));
                continue;
            }
            let mine: HashSet<u32> = batch.changes[first..]
                .iter()
                .flat_map(|c| c.ids.iter())
                .collect();
            if mine.iter().any(|id| named.contains(id)) {
                batch.changes.truncate(first);
                ids.undo(mark);
                plan.rest.push((op, reply));
                plan.rest.extend(run);
                break;
            }
            named.extend(mine);
            plan.parts.push(Part {
                reply,
                changes: first..batch.changes.len(),
                new_customers: (ids.new_keys.len() - created) as u64,
            });
        }
        batch.new_keys = std::mem::take(&mut ids.new_keys);
        match self.changes_nothing(&batch) {
            Ok(true) => {}
            Ok(false) => plan.batch = Some(batch),
            Err(e) => {
                for part in plan.parts.drain(..) {
                    plan.refused.push((part.reply, again(&e)));
                }
            }
        }
        plan
    }
}

impl Part {
    /// What the request is told once the combined batch is applied at `lsn`.
    pub(super) fn result(
        &self,
        lsn: u64,
        stats: &crate::storage::state::ApplyStats,
    ) -> WriteResult {
        let (added, removed) = stats.per_change[self.changes.clone()]
            .iter()
            .fold((0, 0), |(a, r), &(x, y)| (a + x, r + y));
        WriteResult {
            lsn,
            added,
            removed,
            new_customers: self.new_customers,
            ..Default::default()
        }
    }
}
