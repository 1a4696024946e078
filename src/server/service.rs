//! The `tagstore.v1.TagStore` service: the tonic trait, each call handed to
//! the module of its group (`writes`, `reads`, `fields`, `admin`), and the
//! helpers they share. The groups check request limits, turn proto into
//! engine and query calls and back; CPU-heavy work runs on the blocking
//! pool so that one large request does not stall the connections served by
//! the async workers.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status, Streaming};

use crate::config::Limits;
use crate::error::Error;
use crate::ingest::facts::Facts;
use crate::proto;
use crate::proto::tag_store_server::TagStore;
use crate::query::eval::Abandon;
use crate::server::audit::Kind;
use crate::server::budget::{ExportSlots, MemoryBudget};
use crate::server::export::ExportStream;
use crate::server::status::to_status;
use crate::server::{
    admin, audiences, audit, fields, history, ingest, reads, rebuild, rules, scope, unmerge, watch,
    writes,
};
use crate::storage::backup::Header;
use crate::storage::{Engine, TagMeta};

pub struct Service {
    pub(super) engine: Arc<Engine>,
    pub(super) limits: Limits,
    pub(super) started: Instant,
    /// Time zone of behaviour fields created without one.
    pub(super) default_time_zone: String,
    pub(super) exports: Arc<ExportSlots>,
    pub(super) watches: Arc<ExportSlots>,
    /// The request memory budget, which `Ingest` streams draw on per batch.
    pub(super) budget: Arc<MemoryBudget>,
    /// The rules that turn ingested events into facts.
    pub(super) facts: Arc<Facts>,
    /// Becomes true when the server begins to shut down: open `Watch`
    /// streams end (they would otherwise hold the shutdown for ever).
    pub(super) closing: tokio::sync::watch::Receiver<bool>,
    /// The watchers' hub and thread.
    pub(super) feed: Arc<watch::Feed>,
    /// The audit trail.
    pub(super) audit: Arc<crate::audit::Audit>,
    /// One backup at a time.
    pub(super) backups: Arc<tokio::sync::Semaphore>,
    /// The consumers of Kafka sources, when the server runs them.
    pub(super) kafka: Option<Arc<crate::kafka::Consumers>>,
}

impl Service {
    pub fn new(
        engine: Arc<Engine>,
        limits: Limits,
        default_time_zone: String,
        budget: Arc<MemoryBudget>,
        facts: Facts,
        closing: tokio::sync::watch::Receiver<bool>,
        audit: Arc<crate::audit::Audit>,
    ) -> Self {
        let engine_for_feed = engine.clone();
        Self {
            engine,
            limits,
            started: Instant::now(),
            default_time_zone,
            exports: ExportSlots::new(limits.max_concurrent_exports),
            watches: ExportSlots::named(
                limits.max_concurrent_watches,
                "watchers are watching",
                "max_concurrent_watches",
            ),
            budget,
            facts: Arc::new(facts),
            feed: watch::Feed::start(engine_for_feed, closing.clone()),
            closing,
            audit,
            backups: Arc::new(tokio::sync::Semaphore::new(1)),
            kafka: None,
        }
    }

    /// The service, reporting the status of these Kafka consumers.
    pub fn with_kafka(mut self, consumers: Arc<crate::kafka::Consumers>) -> Self {
        self.kafka = Some(consumers);
        self
    }
}

/// A tag as the proto has it, with its rule's query when it is a rule tag.
pub(super) fn tag_info(m: &TagMeta, snap: &crate::storage::Snapshot) -> proto::TagInfo {
    proto::TagInfo {
        name: m.name.to_string(),
        description: m.description.clone(),
        category: m.category.clone(),
        created_at_ms: m.created_ms,
        updated_at_ms: m.updated_ms,
        member_count: m.count,
        rule: snap
            .rules
            .get(&m.name)
            .map(|r| r.def.query.clone())
            .unwrap_or_default(),
    }
}

pub(super) fn invalid(msg: impl Into<String>) -> Status {
    to_status(Error::invalid(msg))
}

/// The next message of a client stream; `DEADLINE_EXCEEDED` when none comes
/// within `stream_idle_seconds` (what the stream held is then dropped).
pub(super) async fn next_message<T>(
    stream: &mut Streaming<T>,
    limits: &Limits,
    what: &str,
) -> Result<Option<T>, Status> {
    let idle = std::time::Duration::from_secs(limits.stream_idle_seconds.max(1));
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(m) => m,
        Err(_) => Err(idle_status(limits, what)),
    }
}

/// The status of a stream ended for going idle.
pub(super) fn idle_status(limits: &Limits, what: &str) -> Status {
    Status::deadline_exceeded(format!(
        "no message for {} s (`stream_idle_seconds`): the stream is closed; {what}",
        limits.stream_idle_seconds.max(1)
    ))
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("query task failed: {e}")))?
}

/// [`blocking`] for work that checks an [`Abandon`]: it is set when this
/// future is dropped (the call cancelled, or its deadline passed), and the
/// work stops at its next check instead of running on for no one.
pub(super) async fn blocking_until_gone<T: Send + 'static>(
    f: impl FnOnce(&Abandon) -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    let abandon = Abandon::default();
    let _stop_when_dropped = abandon.on_drop();
    blocking(move || f(&abandon)).await
}

#[tonic::async_trait]
impl TagStore for Service {
    async fn create_tag(
        &self,
        req: Request<proto::CreateTagRequest>,
    ) -> Result<Response<proto::CreateTagResponse>, Status> {
        writes::create_tag(self, req).await
    }

    async fn drop_tag(
        &self,
        req: Request<proto::DropTagRequest>,
    ) -> Result<Response<proto::DropTagResponse>, Status> {
        writes::drop_tag(self, req).await
    }

    async fn list_tags(
        &self,
        req: Request<proto::ListTagsRequest>,
    ) -> Result<Response<proto::ListTagsResponse>, Status> {
        // A token limited to some categories pages through the tags it may
        // see: a page is never empty while more follow.
        let limited = scope::limited(&req);
        reads::list_tags(self, req, |snap, name, category| {
            limited
                .as_ref()
                .is_none_or(|g| scope::visible(g, snap, name, category))
        })
        .await
    }

    async fn describe_tag(
        &self,
        req: Request<proto::DescribeTagRequest>,
    ) -> Result<Response<proto::DescribeTagResponse>, Status> {
        scope::before(&req, &self.engine, |g, snap| {
            scope::check_names(g, snap, [req.get_ref().name.as_str()])
        })?;
        reads::describe_tag(self, req).await
    }

    async fn update(
        &self,
        req: Request<proto::UpdateRequest>,
    ) -> Result<Response<proto::UpdateResponse>, Status> {
        let who = audit::who(&req);
        let tags: Vec<&str> = req
            .get_ref()
            .mutations
            .iter()
            .map(|m| m.tag.as_str())
            .collect();
        scope::before(&req, &self.engine, |g, snap| {
            scope::no_new_tags(g, req.get_ref().create_missing_tags)?;
            scope::check_names(g, snap, tags.iter().copied())
        })?;
        let subject = format!("tags {}", tags.join(", "));
        let res = writes::update(self, req).await;
        self.audited(Kind::Changes, who, "Update", &subject, res, |r| {
            r.get_ref().added + r.get_ref().removed
        })
        .await
    }

    async fn replace_members(
        &self,
        req: Request<Streaming<proto::ReplaceMembersRequest>>,
    ) -> Result<Response<proto::ReplaceMembersResponse>, Status> {
        let who = audit::who(&req);
        let res = writes::replace_members(self, req).await;
        self.audited(Kind::Changes, who, "ReplaceMembers", "", res, |r| {
            r.get_ref().added + r.get_ref().removed
        })
        .await
    }

    async fn delete_customers(
        &self,
        req: Request<proto::DeleteCustomersRequest>,
    ) -> Result<Response<proto::DeleteCustomersResponse>, Status> {
        let who = audit::who(&req);
        let subject = req.get_ref().customers.join(", ");
        let res = writes::delete_customers(self, req).await;
        self.audited(Kind::Changes, who, "DeleteCustomers", &subject, res, |r| {
            r.get_ref().deleted
        })
        .await
    }

    async fn resolve_customers(
        &self,
        req: Request<proto::ResolveCustomersRequest>,
    ) -> Result<Response<proto::ResolveCustomersResponse>, Status> {
        let who = audit::who(&req);
        let subject = req.get_ref().customers.join(", ");
        let res = writes::resolve_customers(self, req).await;
        self.audited(Kind::Reads, who, "ResolveCustomers", &subject, res, |r| {
            r.get_ref().ids.iter().filter(|&&id| id >= 0).count() as u64
        })
        .await
    }

    async fn count(
        &self,
        req: Request<proto::CountRequest>,
    ) -> Result<Response<proto::CountResponse>, Status> {
        scope::before(&req, &self.engine, |g, snap| {
            let queries = &req.get_ref().queries;
            queries
                .iter()
                .try_for_each(|q| scope::check_query(g, snap, q))
        })?;
        reads::count(self, req).await
    }

    async fn members(
        &self,
        req: Request<proto::MembersRequest>,
    ) -> Result<Response<proto::MembersResponse>, Status> {
        let who = audit::who(&req);
        let subject = req.get_ref().query.clone();
        scope::before(&req, &self.engine, |g, snap| {
            scope::check_query(g, snap, &subject)
        })?;
        let subject = super::past::in_subject(subject, req.get_ref().as_of.as_ref());
        let res = reads::members(self, req).await;
        self.audited(Kind::Reads, who, "Members", &subject, res, |r| {
            r.get_ref().customers.len() as u64 + r.get_ref().without_identity
        })
        .await
    }

    type ExportStream = ExportStream;
    type WatchStream = watch::WatchStream;
    type BackupStream = super::backup::BackupStream;

    async fn backup(
        &self,
        req: Request<proto::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let who = audit::who(&req);
        let since = &req.get_ref().since;
        let subject = match Header::decode(since) {
            _ if since.is_empty() => "full".to_string(),
            Ok(h) => format!("increment of {:016x} (lsn {})", h.id, h.position),
            Err(_) => "increment of a header that does not read".to_string(),
        };
        let customers = self.engine.snapshot().customer_count().unwrap_or(0);
        let res = super::backup::backup(self, req).await;
        self.audited(Kind::Reads, who, "Backup", &subject, res, |_| customers)
            .await
    }

    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = audit::who(&req);
        let r = req.get_ref();
        let mut subjects: Vec<String> = r.tags.clone();
        subjects.extend(r.values.iter().map(|v| format!("{}={}", v.field, v.value)));
        subjects.extend(r.audiences.iter().map(|a| format!("audience {a}")));
        let subject = match r.after_lsn {
            Some(lsn) => format!("{} after lsn {lsn}", subjects.join(", ")),
            None => subjects.join(", "),
        };
        scope::before(&req, &self.engine, |g, snap| {
            let r = req.get_ref();
            let names = r
                .tags
                .iter()
                .chain(r.values.iter().map(|v| &v.field))
                .chain(&r.audiences);
            scope::check_names(g, snap, names.map(String::as_str))
        })?;
        let res = watch::watch(self, req).await;
        self.audited(Kind::Reads, who, "Watch", &subject, res, |_| 0)
            .await
    }

    async fn export(
        &self,
        req: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let who = audit::who(&req);
        let r = req.get_ref();
        let subject = if r.identity_type.is_empty() {
            r.query.clone()
        } else {
            format!("{} as {} {}", r.query, r.identity_type, r.hash)
        };
        let subject = super::past::in_subject(subject.trim_end().to_string(), r.as_of.as_ref());
        scope::before(&req, &self.engine, |g, snap| {
            scope::check_query(g, snap, &req.get_ref().query)
        })?;
        let res = reads::export(self, req).await;
        self.audited(Kind::Reads, who, "Export", subject.trim_end(), res, |r| {
            r.get_ref().total()
        })
        .await
    }

    async fn profile(
        &self,
        req: Request<proto::ProfileRequest>,
    ) -> Result<Response<proto::ProfileResponse>, Status> {
        let who = audit::who(&req);
        let subject = req.get_ref().customer.clone();
        let limited = scope::limited(&req);
        let res = reads::profile(self, req).await.map(|mut r| {
            if let Some(g) = limited {
                scope::filter_profile(&g, &self.engine.snapshot(), r.get_mut());
            }
            r
        });
        self.audited(Kind::Reads, who, "Profile", &subject, res, |_| 1)
            .await
    }

    async fn link(
        &self,
        req: Request<proto::LinkRequest>,
    ) -> Result<Response<proto::LinkResponse>, Status> {
        let who = audit::who(&req);
        let subject = req.get_ref().identities.join(", ");
        let res = ingest::link(self, req).await;
        self.audited(Kind::Changes, who, "Link", &subject, res, |r| {
            1 + r.get_ref().merges.len() as u64
        })
        .await
    }

    async fn list_merges(
        &self,
        req: Request<proto::ListMergesRequest>,
    ) -> Result<Response<proto::ListMergesResponse>, Status> {
        let who = audit::who(&req);
        let subject = req.get_ref().customer.clone();
        let res = reads::list_merges(self, req).await;
        self.audited(Kind::Reads, who, "ListMerges", &subject, res, |r| {
            2 * r.get_ref().merges.len() as u64
        })
        .await
    }

    async fn create_field(
        &self,
        req: Request<proto::CreateFieldRequest>,
    ) -> Result<Response<proto::CreateFieldResponse>, Status> {
        fields::create_field(&self.engine, req.into_inner(), &self.default_time_zone)
            .await
            .map(Response::new)
    }

    async fn drop_field(
        &self,
        req: Request<proto::DropFieldRequest>,
    ) -> Result<Response<proto::DropFieldResponse>, Status> {
        fields::drop_field(&self.engine, req.into_inner().name).await?;
        Ok(Response::new(proto::DropFieldResponse {}))
    }

    async fn list_fields(
        &self,
        req: Request<proto::ListFieldsRequest>,
    ) -> Result<Response<proto::ListFieldsResponse>, Status> {
        // A token limited to some categories pages through the fields it
        // may see: a page is never empty while more follow.
        let limited = scope::limited(&req);
        let r = fields::list_fields(&self.engine, req.into_inner(), move |category| {
            limited.as_ref().is_none_or(|g| g.may_use(category))
        })
        .await?;
        Ok(Response::new(r))
    }

    async fn set_values(
        &self,
        req: Request<proto::SetValuesRequest>,
    ) -> Result<Response<proto::SetValuesResponse>, Status> {
        let who = audit::who(&req);
        scope::before(&req, &self.engine, |g, snap| {
            let fields = req.get_ref().writes.iter().map(|w| w.field.as_str());
            scope::check_names(g, snap, fields)
        })?;
        let r = req.into_inner();
        if r.writes.len() > self.limits.max_keys_per_request {
            return Err(invalid(format!(
                "{} writes in one request; the limit is {} (split the batch)",
                r.writes.len(),
                self.limits.max_keys_per_request
            )));
        }
        let mut written: Vec<&str> = r.writes.iter().map(|w| w.field.as_str()).collect();
        written.sort_unstable();
        written.dedup();
        let subject = format!("fields {}", written.join(", "));
        let n = r.writes.len() as u64;
        let res = fields::set_values(&self.engine, r).await.map(Response::new);
        self.audited(Kind::Changes, who, "SetValues", &subject, res, |_| n)
            .await
    }

    async fn create_source(
        &self,
        req: Request<proto::CreateSourceRequest>,
    ) -> Result<Response<proto::CreateSourceResponse>, Status> {
        ingest::create_source(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn pause_source(
        &self,
        req: Request<proto::PauseSourceRequest>,
    ) -> Result<Response<proto::PauseSourceResponse>, Status> {
        ingest::pause_source(&self.engine, req.into_inner().name, true).await?;
        Ok(Response::new(proto::PauseSourceResponse {}))
    }

    async fn resume_source(
        &self,
        req: Request<proto::ResumeSourceRequest>,
    ) -> Result<Response<proto::ResumeSourceResponse>, Status> {
        ingest::pause_source(&self.engine, req.into_inner().name, false).await?;
        Ok(Response::new(proto::ResumeSourceResponse {}))
    }

    async fn drop_source(
        &self,
        req: Request<proto::DropSourceRequest>,
    ) -> Result<Response<proto::DropSourceResponse>, Status> {
        ingest::drop_source(&self.engine, req.into_inner().name).await?;
        Ok(Response::new(proto::DropSourceResponse {}))
    }

    async fn list_sources(
        &self,
        _req: Request<proto::ListSourcesRequest>,
    ) -> Result<Response<proto::ListSourcesResponse>, Status> {
        Ok(Response::new(ingest::list_sources(
            &self.engine,
            self.kafka.as_deref(),
        )))
    }

    type IngestStream = ingest::IngestStream;

    async fn ingest(
        &self,
        req: Request<Streaming<proto::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let who = audit::who(&req);
        let res = ingest::ingest(self, req).await;
        self.audited(
            Kind::Changes,
            who,
            "Ingest",
            "a stream of batches",
            res,
            |_| 0,
        )
        .await
    }

    async fn rebuild_facts(
        &self,
        req: Request<proto::RebuildFactsRequest>,
    ) -> Result<Response<proto::RebuildFactsResponse>, Status> {
        let who = audit::who(&req);
        let subject = req.get_ref().customers.join(", ");
        let res = rebuild::rebuild_facts(self, req.into_inner())
            .await
            .map(Response::new);
        self.audited(Kind::Changes, who, "RebuildFacts", &subject, res, |r| {
            r.get_ref().rebuilt
        })
        .await
    }

    async fn define_rule(
        &self,
        req: Request<proto::DefineRuleRequest>,
    ) -> Result<Response<proto::DefineRuleResponse>, Status> {
        rules::define_rule(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn drop_rule(
        &self,
        req: Request<proto::DropRuleRequest>,
    ) -> Result<Response<proto::DropRuleResponse>, Status> {
        rules::drop_rule(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_rules(
        &self,
        req: Request<proto::ListRulesRequest>,
    ) -> Result<Response<proto::ListRulesResponse>, Status> {
        let limited = scope::limited(&req);
        let mut r = rules::list_rules(&self.engine, req.into_inner()).await?;
        if let Some(g) = limited {
            let snap = self.engine.snapshot();
            r.rules
                .retain(|rule| scope::visible(&g, &snap, &rule.name, &rule.category));
        }
        Ok(Response::new(r))
    }

    async fn turn_rule_days(
        &self,
        _req: Request<proto::TurnRuleDaysRequest>,
    ) -> Result<Response<proto::TurnRuleDaysResponse>, Status> {
        rules::turn_rule_days(&self.engine).await.map(Response::new)
    }

    async fn create_audience(
        &self,
        req: Request<proto::CreateAudienceRequest>,
    ) -> Result<Response<proto::CreateAudienceResponse>, Status> {
        let r = req.get_ref();
        audiences::check_kept_role(&req, &self.engine.snapshot(), &r.name, r.kept_current)?;
        scope::before(&req, &self.engine, |g, snap| {
            scope::check_query(g, snap, &req.get_ref().query)?;
            // Replacing one: its old query too.
            scope::check_names(g, snap, [req.get_ref().name.as_str()])
        })?;
        audiences::create_audience(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn drop_audience(
        &self,
        req: Request<proto::DropAudienceRequest>,
    ) -> Result<Response<proto::DropAudienceResponse>, Status> {
        audiences::check_kept_role(&req, &self.engine.snapshot(), &req.get_ref().name, false)?;
        scope::before(&req, &self.engine, |g, snap| {
            scope::check_names(g, snap, [req.get_ref().name.as_str()])
        })?;
        audiences::drop_audience(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_audiences(
        &self,
        req: Request<proto::ListAudiencesRequest>,
    ) -> Result<Response<proto::ListAudiencesResponse>, Status> {
        let limited = scope::limited(&req);
        let mut r = audiences::list_audiences(&self.engine, req.into_inner()).await?;
        if let Some(g) = limited {
            let snap = self.engine.snapshot();
            r.audiences
                .retain(|a| scope::query_allowed(&g, &snap, &a.query));
        }
        Ok(Response::new(r))
    }

    async fn take_snapshot(
        &self,
        req: Request<proto::TakeSnapshotRequest>,
    ) -> Result<Response<proto::TakeSnapshotResponse>, Status> {
        scope::before(&req, &self.engine, |g, snap| {
            scope::check_names(g, snap, [req.get_ref().audience.as_str()])
        })?;
        audiences::take_snapshot(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_snapshots(
        &self,
        req: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        let limited = scope::limited(&req);
        let mut r = audiences::list_snapshots(&self.engine, req.into_inner())?;
        if let Some(g) = limited {
            let snap = self.engine.snapshot();
            r.snapshots
                .retain(|s| scope::query_allowed(&g, &snap, &s.query));
        }
        Ok(Response::new(r))
    }

    async fn drop_snapshot(
        &self,
        req: Request<proto::DropSnapshotRequest>,
    ) -> Result<Response<proto::DropSnapshotResponse>, Status> {
        scope::before(&req, &self.engine, |g, snap| {
            match snap.snapshots.get(&req.get_ref().id) {
                Some(s) => scope::check_query(g, snap, &s.query),
                None => Ok(()),
            }
        })?;
        audiences::drop_snapshot(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn tag_history(
        &self,
        req: Request<proto::TagHistoryRequest>,
    ) -> Result<Response<proto::TagHistoryResponse>, Status> {
        scope::before(&req, &self.engine, |g, snap| {
            scope::check_names(g, snap, [req.get_ref().name.as_str()])
        })?;
        history::tag_history(&self.engine, &self.default_time_zone, req.into_inner())
            .map(Response::new)
    }

    async fn unmerge(
        &self,
        req: Request<proto::UnmergeRequest>,
    ) -> Result<Response<proto::UnmergeResponse>, Status> {
        let who = audit::who(&req);
        let r = req.get_ref();
        let subject = if r.identity.is_empty() {
            format!("merge {}", r.merge_id)
        } else {
            r.identity.clone()
        };
        let res = unmerge::unmerge(self, req.into_inner())
            .await
            .map(Response::new);
        self.audited(Kind::Changes, who, "Unmerge", &subject, res, |_| 2)
            .await
    }

    async fn read_audit(
        &self,
        req: Request<proto::ReadAuditRequest>,
    ) -> Result<Response<proto::ReadAuditResponse>, Status> {
        audit::read_audit(self, req).await
    }

    async fn aggregate(
        &self,
        req: Request<proto::AggregateRequest>,
    ) -> Result<Response<proto::AggregateResponse>, Status> {
        scope::before(&req, &self.engine, |g, snap| {
            scope::check_query(g, snap, &req.get_ref().query)?;
            scope::check_names(g, snap, [req.get_ref().field.as_str()])
        })?;
        fields::aggregate(&self.engine, scope::limited(&req), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn breakdown(
        &self,
        req: Request<proto::BreakdownRequest>,
    ) -> Result<Response<proto::BreakdownResponse>, Status> {
        scope::before(&req, &self.engine, |g, snap| {
            let r = req.get_ref();
            scope::check_query(g, snap, &r.query)?;
            match &r.by {
                Some(proto::breakdown_request::By::Field(f)) => {
                    scope::check_names(g, snap, [f.as_str()])
                }
                Some(proto::breakdown_request::By::Category(c)) => scope::check_category(g, c),
                None => Ok(()),
            }
        })?;
        fields::breakdown(&self.engine, scope::limited(&req), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn top_tags(
        &self,
        req: Request<proto::TopTagsRequest>,
    ) -> Result<Response<proto::TopTagsResponse>, Status> {
        scope::before(&req, &self.engine, |g, snap| {
            scope::check_query(g, snap, &req.get_ref().query)?;
            scope::check_category(g, &req.get_ref().category)
        })?;
        fields::top_tags(&self.engine, scope::limited(&req), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn overlap(
        &self,
        req: Request<proto::OverlapRequest>,
    ) -> Result<Response<proto::OverlapResponse>, Status> {
        scope::before(&req, &self.engine, |g, snap| {
            let queries = &req.get_ref().queries;
            queries
                .iter()
                .try_for_each(|q| scope::check_query(g, snap, q))
        })?;
        fields::overlap(&self.engine, scope::limited(&req), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn stats(
        &self,
        req: Request<proto::StatsRequest>,
    ) -> Result<Response<proto::StatsResponse>, Status> {
        admin::stats(self, req).await
    }

    async fn checkpoint(
        &self,
        req: Request<proto::CheckpointRequest>,
    ) -> Result<Response<proto::CheckpointResponse>, Status> {
        admin::checkpoint(self, req).await
    }
}
