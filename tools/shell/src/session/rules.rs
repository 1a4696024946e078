//! The shell's rule commands: `create rule`, `create lifecycle`, `drop
//! rule`, `rules`, `turn days`, over the proto.

use super::*;

impl Session {
    /// Runs a rule command.
    pub(super) async fn exec_rule(&mut self, cmd: Command) -> Result<(), Failure> {
        match cmd {
            Command::CreateRule {
                name,
                query,
                category,
                description,
                zone,
                replace,
            } => {
                let r = self
                    .client
                    .define_rule(DefineRuleRequest {
                        name: name.clone(),
                        query,
                        stages: Vec::new(),
                        time_zone: zone,
                        description,
                        category,
                        replace,
                    })
                    .await?
                    .into_inner();
                let n = r.rule.as_ref().map_or(0, |i| i.member_count);
                self.out(
                    format!(
                        "{} rule tag {name}: {} members",
                        if r.created { "defined" } else { "redefined" },
                        thousands(n)
                    ),
                    json!({ "name": name, "created": r.created, "members": n, "lsn": r.lsn }),
                );
            }
            Command::CreateLifecycle {
                name,
                stages,
                category,
                description,
                zone,
                replace,
            } => {
                let r = self
                    .client
                    .define_rule(DefineRuleRequest {
                        name: name.clone(),
                        query: String::new(),
                        stages: stages
                            .into_iter()
                            .map(|(value, query)| RuleStage {
                                value,
                                query,
                                member_count: 0,
                            })
                            .collect(),
                        time_zone: zone,
                        description,
                        category,
                        replace,
                    })
                    .await?
                    .into_inner();
                let stages: Vec<String> = r
                    .rule
                    .as_ref()
                    .map(|i| {
                        i.stages
                            .iter()
                            .map(|s| format!("{} {}", s.value, thousands(s.member_count)))
                            .collect()
                    })
                    .unwrap_or_default();
                self.out(
                    format!(
                        "{} lifecycle {name}: {}",
                        if r.created { "defined" } else { "redefined" },
                        stages.join(", ")
                    ),
                    json!({ "name": name, "created": r.created, "stages": stages, "lsn": r.lsn }),
                );
            }
            Command::DropRule { name, yes } => {
                self.confirm(
                    &format!("drop rule {name} with its tag or lifecycle field?"),
                    yes,
                )
                .await?;
                self.client
                    .drop_rule(DropRuleRequest { name: name.clone() })
                    .await?;
                self.out(format!("dropped rule {name}"), json!({ "dropped": name }));
            }
            Command::Rules => {
                let mut rules = Vec::new();
                let mut after = String::new();
                loop {
                    let page = self
                        .client
                        .list_rules(ListRulesRequest {
                            after: after.clone(),
                            limit: 1_000,
                        })
                        .await?
                        .into_inner();
                    if let Some(last) = page.rules.last() {
                        after = last.name.clone();
                    }
                    rules.extend(page.rules);
                    if !page.more {
                        break;
                    }
                }
                let mut rows = Vec::new();
                let mut all = Vec::new();
                for r in &rules {
                    let definition = if r.kind == "lifecycle" {
                        r.stages
                            .iter()
                            .map(|s| {
                                format!(
                                    "{} ({}) when {}",
                                    s.value,
                                    thousands(s.member_count),
                                    s.query
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("; ")
                    } else {
                        r.query.clone()
                    };
                    let state = if r.stale.is_empty() {
                        r.day.clone()
                    } else {
                        format!("{} STALE: {}", r.day, r.stale)
                    };
                    rows.push(vec![
                        r.name.clone(),
                        r.kind.clone(),
                        thousands(r.member_count),
                        definition,
                        state,
                    ]);
                    all.push(json!({
                        "name": r.name, "kind": r.kind, "query": r.query,
                        "stages": r.stages.iter().map(|s| json!({"value": s.value, "query": s.query, "members": s.member_count})).collect::<Vec<_>>(),
                        "time_zone": r.time_zone, "day": r.day, "reads": r.reads,
                        "members": r.member_count, "stale": r.stale,
                    }));
                }
                let text = if rows.is_empty() {
                    "(no rules)".to_string()
                } else {
                    table::render(
                        &["rule", "kind", "members", "definition", "day"],
                        &[
                            Align::Left,
                            Align::Left,
                            Align::Right,
                            Align::Left,
                            Align::Left,
                        ],
                        &rows,
                    )
                };
                self.out(text, json!({ "rules": all }));
            }
            Command::TurnDays => {
                let r = self
                    .client
                    .turn_rule_days(TurnRuleDaysRequest {})
                    .await?
                    .into_inner();
                let text = if r.rules_turned == 0 {
                    "every rule is on today already".to_string()
                } else {
                    format!("{} rules turned to today", r.rules_turned)
                };
                self.out(text, json!({ "turned": r.rules_turned, "lsn": r.lsn }));
            }
            _ => unreachable!("not a rule command"),
        }
        Ok(())
    }
}
