//! Rules over gRPC: `DefineRule`, `DropRule`, `ListRules`, `TurnRuleDays`,
//! and the day turner, the task that turns the rules' days by itself
//! within seconds of each local midnight (and at start, for days that
//! passed while the server was down). The rules layer checks definitions
//! and the engine keeps rules current; this room turns proto into write
//! operations and rules back into proto.

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::error::Error;
use crate::fields::time;
use crate::proto;
use crate::rules::{Definition, MAX_STAGES};
use crate::server::service::blocking;
use crate::server::status::to_status;
use crate::storage::snapshot::Rule;
use crate::storage::{Engine, Field, Snapshot, WriteOp};

/// Longest the day turner sleeps between looks at the clock.
const LOOK_EVERY: Duration = Duration::from_secs(60);
/// How long after a local midnight the day turner turns the day (clocks
/// of the machine and of the zone database agree to well within this).
const AFTER_MIDNIGHT: Duration = Duration::from_secs(1);

/// A lifecycle's stages with the customers at each.
pub(super) fn stages(f: &Field, r: &Rule) -> Result<Vec<proto::RuleStage>, Error> {
    let mut out = Vec::with_capacity(r.def.stages.len());
    for (i, (value, query)) in r.def.stages.iter().enumerate() {
        let member_count = match f.slots.get(&(i as u32)) {
            Some(b) => b.get()?.len(),
            None => 0,
        };
        out.push(proto::RuleStage {
            value: value.clone(),
            query: query.clone(),
            member_count,
        });
    }
    Ok(out)
}

fn rule_info(snap: &Snapshot, r: &Rule) -> Result<proto::RuleInfo, Error> {
    let mut info = proto::RuleInfo {
        name: r.name.to_string(),
        time_zone: r.def.time_zone.clone(),
        day: time::format_day(r.day),
        reads: r.def.reads.clone(),
        audiences: r.def.audiences.clone(),
        created_at_ms: r.created_ms,
        updated_at_ms: r.updated_ms,
        stale: r.stale.clone(),
        ..Default::default()
    };
    if r.def.is_lifecycle() {
        info.kind = "lifecycle".into();
        if let Some(f) = snap.field(&r.name) {
            info.stages = stages(f, r)?;
            info.member_count = info.stages.iter().map(|s| s.member_count).sum();
            info.description = f.meta.description.clone();
            info.category = f.meta.category.clone();
        }
    } else {
        info.kind = "tag".into();
        info.query = r.def.query.clone();
        if let Some(t) = snap.tag(&r.name) {
            info.member_count = t.meta.count;
            info.description = t.meta.description.clone();
            info.category = t.meta.category.clone();
        }
    }
    Ok(info)
}

pub(super) async fn define_rule(
    engine: &Engine,
    r: proto::DefineRuleRequest,
) -> Result<proto::DefineRuleResponse, Status> {
    if r.stages.len() > MAX_STAGES {
        return Err(to_status(Error::invalid(format!(
            "a lifecycle has at most {MAX_STAGES} stages; {} given",
            r.stages.len()
        ))));
    }
    let definition = Definition {
        query: r.query,
        stages: r.stages.into_iter().map(|s| (s.value, s.query)).collect(),
        time_zone: r.time_zone,
    };
    let res = engine
        .write(WriteOp::DefineRule {
            name: r.name.clone(),
            definition,
            description: r.description,
            category: r.category,
            replace: r.replace,
        })
        .await
        .map_err(to_status)?;
    let snap = engine.snapshot();
    let rule = match snap.rules.get(&r.name) {
        Some(rule) => Some(rule_info(&snap, rule).map_err(to_status)?),
        None => None,
    };
    Ok(proto::DefineRuleResponse {
        rule,
        created: res.created,
        lsn: res.lsn,
    })
}

pub(super) async fn drop_rule(
    engine: &Engine,
    r: proto::DropRuleRequest,
) -> Result<proto::DropRuleResponse, Status> {
    let res = engine
        .write(WriteOp::DropRule { name: r.name })
        .await
        .map_err(to_status)?;
    Ok(proto::DropRuleResponse { lsn: res.lsn })
}

/// Most bytes of definitions one `ListRules` page holds (a client's
/// default message limit is 4 MiB).
const PAGE_BYTES: usize = 4 << 20;

pub(super) async fn list_rules(
    engine: &Engine,
    r: proto::ListRulesRequest,
) -> Result<proto::ListRulesResponse, Status> {
    let limit = match r.limit {
        0 => 100,
        n if n > 1_000 => {
            return Err(to_status(Error::invalid(format!(
                "limit {n} is over the page size limit of 1000"
            ))));
        }
        n => n as usize,
    };
    let snap = engine.snapshot();
    // Member counts may read bitmaps from their segments.
    blocking(move || {
        let total = snap.rules.len() as u64;
        let (mut rules, mut bytes, mut more) = (Vec::new(), 0, false);
        for rule in snap.rules.by_name.values() {
            if !r.after.is_empty() && *rule.name <= *r.after {
                continue;
            }
            if rules.len() >= limit || bytes > PAGE_BYTES {
                more = true;
                break;
            }
            bytes += rule.def.query.len()
                + rule
                    .def
                    .stages
                    .iter()
                    .map(|(v, q)| v.len() + q.len())
                    .sum::<usize>()
                + rule.def.reads.iter().map(String::len).sum::<usize>();
            rules.push(rule_info(&snap, rule).map_err(to_status)?);
        }
        Ok(proto::ListRulesResponse { rules, more, total })
    })
    .await
}

pub(super) async fn turn_rule_days(engine: &Engine) -> Result<proto::TurnRuleDaysResponse, Status> {
    let (rules_turned, lsn) = turn(engine).await.map_err(to_status)?;
    Ok(proto::TurnRuleDaysResponse { rules_turned, lsn })
}

/// Turns the rules' days; returns how many turned, and the log position.
async fn turn(engine: &Engine) -> crate::Result<(u32, u64)> {
    let before = engine.snapshot();
    let res = engine.write(WriteOp::TurnRuleDays).await?;
    let after = engine.snapshot();
    let turned = after
        .rules
        .by_name
        .values()
        .filter(|r| before.rules.get(&r.name).is_some_and(|b| b.day < r.day))
        .count();
    Ok((turned as u32, res.lsn))
}

/// How long until the next local midnight of any rule's zone (at most
/// [`LOOK_EVERY`]).
fn until_next_day(snap: &Snapshot, now_ms: i64) -> Duration {
    let mut wait = LOOK_EVERY;
    for r in snap.rules.by_name.values() {
        let Ok(zone) = time::zone(&r.def.time_zone) else {
            continue;
        };
        let Ok(today) = time::day_of(now_ms, &zone) else {
            continue;
        };
        if let Ok(next) = time::day_start_ms(today + 1, &zone) {
            let ms = u64::try_from(next.saturating_sub(now_ms)).unwrap_or(0);
            wait = wait.min(Duration::from_millis(ms) + AFTER_MIDNIGHT);
        }
    }
    wait
}

/// Starts the day turner; it runs while the runtime does. A turn that
/// fails (a full disk) is tried again at the next look; the rules stay
/// on their day meanwhile, consistent with it.
pub fn start_day_turner(engine: Arc<Engine>, mut closing: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            if !engine.snapshot().rules.is_empty() {
                match turn(&engine).await {
                    Ok((0, _)) => {}
                    Ok((n, lsn)) => tracing::info!(rules = n, lsn, "rules turned to a new day"),
                    Err(Error::ShuttingDown) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not turn the rules' day; trying again shortly")
                    }
                }
            }
            let wait = until_next_day(&engine.snapshot(), engine.now_ms());
            if !super::sleep_unless_closing(wait, &mut closing).await {
                return;
            }
        }
    });
}
