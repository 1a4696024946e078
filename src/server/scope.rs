//! Tokens limited to tag categories: every call whose rule reaches the tags
//! and fields it names (`access::Reach::Named`) is checked here before it
//! runs, and what it lists or shows is filtered after. A tag or field of
//! another category is refused with PERMISSION_DENIED, whether it is named
//! directly, through a saved audience, or through an audience snapshot;
//! a listing or profile simply leaves it out. Names that do not exist pass
//! (the call then says NOT_FOUND itself). Owns these checks; the rules
//! (which call reaches what) are the access room's.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::access::Grant;
use crate::proto;
use crate::query::eval::names_reached;
use crate::query::parse;
use crate::storage::Snapshot;

/// How deep audience snapshots are followed (a snapshot's query may name
/// another snapshot).
const MAX_DEPTH: usize = 4;

/// The grant of a call whose token is limited to categories; `None` for
/// every other call (no tokens, or a token without the limit).
pub(super) fn limited<T>(req: &Request<T>) -> Option<Arc<Grant>> {
    req.extensions()
        .get::<Arc<Grant>>()
        .filter(|g| !g.categories.is_empty())
        .cloned()
}

fn denied(g: &Grant, what: &str) -> Status {
    Status::permission_denied(format!(
        "token {:?} may use the tags and fields of {} only; {what} is not one of them",
        g.name,
        g.categories_text()
    ))
}

/// The category of a tag or field, if `name` is one.
fn category_of<'a>(snap: &'a Snapshot, name: &str) -> Option<&'a str> {
    if let Some(t) = snap.tag(name) {
        return Some(&t.meta.category);
    }
    snap.fields.get(name).map(|f| f.meta.category.as_str())
}

/// Checks tag and field names, and saved audiences by what they reach.
pub(super) fn check_names<'a>(
    g: &Grant,
    snap: &Snapshot,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), Status> {
    for name in names {
        check_category_of(g, snap, name)?;
        // An audience, also one kept current (whose rule tag has the
        // audience's category): by what its query reaches.
        if let Some(a) = snap.audiences.get(name) {
            check_query_at(g, snap, &a.query, 0)
                .map_err(|_| denied(g, &format!("saved audience {name:?}")))?;
        }
    }
    Ok(())
}

/// Checks the category of `name` if it is a tag or field.
fn check_category_of(g: &Grant, snap: &Snapshot, name: &str) -> Result<(), Status> {
    match category_of(snap, name) {
        Some(c) if !g.may_use(c) => Err(denied(g, &format!("{name:?} (category {c:?})"))),
        _ => Ok(()),
    }
}

/// Checks every tag and field a query reaches, through saved audiences and
/// audience snapshots. A query that does not parse passes (the call says
/// why it does not).
pub(super) fn check_query(g: &Grant, snap: &Snapshot, text: &str) -> Result<(), Status> {
    check_query_at(g, snap, text, 0)
}

fn check_query_at(g: &Grant, snap: &Snapshot, text: &str, depth: usize) -> Result<(), Status> {
    let Ok(expr) = parse(text) else {
        return Ok(());
    };
    let mut names = Vec::new();
    let mut snapshots = Vec::new();
    if !names_reached(&expr, snap, &mut names, &mut snapshots) || depth > MAX_DEPTH {
        return Err(denied(
            g,
            "a query reaching more saved audiences or snapshots than can be checked",
        ));
    }
    // What the audiences reach is in `names` already (a kept audience's
    // rule tag beside it).
    for n in &names {
        check_category_of(g, snap, n)?;
    }
    for id in snapshots {
        if let Some(s) = snap.snapshots.get(&id) {
            check_query_at(g, snap, &s.query, depth + 1)
                .map_err(|_| denied(g, &format!("audience snapshot {id}")))?;
        }
    }
    Ok(())
}

/// Whether a query reaches only allowed tags and fields (for listings).
pub(super) fn query_allowed(g: &Grant, snap: &Snapshot, text: &str) -> bool {
    check_query(g, snap, text).is_ok()
}

/// Whether a listing shows tag, field or rule `name` of `category` to `g`:
/// one of its categories, and, for the rule tag of an audience kept
/// current, an audience whose query reaches only allowed ones.
pub(super) fn visible(g: &Grant, snap: &Snapshot, name: &str, category: &str) -> bool {
    g.may_use(category)
        && snap
            .audiences
            .get(name)
            .is_none_or(|a| query_allowed(g, snap, &a.query))
}

/// Leaves out of a profile the tags and values of other categories.
pub(super) fn filter_profile(g: &Grant, snap: &Snapshot, p: &mut proto::ProfileResponse) {
    let keep = |name: &str| category_of(snap, name).is_none_or(|c| visible(g, snap, name, c));
    p.tags.retain(|t| keep(t));
    p.rule_tags.retain(|t| keep(t));
    p.values.retain(|v| keep(&v.field));
}

/// Runs `check` against the newest snapshot when the call's token is
/// limited to categories; passes every other call.
pub(super) fn before<T>(
    req: &Request<T>,
    engine: &crate::storage::Engine,
    check: impl FnOnce(&Grant, &Snapshot) -> Result<(), Status>,
) -> Result<(), Status> {
    match limited(req) {
        None => Ok(()),
        Some(g) => check(&g, &engine.snapshot()),
    }
}

/// Refuses creating tags to a limited token (a new tag has no category
/// it could be given).
pub(super) fn no_new_tags(g: &Grant, creates: bool) -> Result<(), Status> {
    if creates {
        return Err(denied(g, "a new tag (it would have no category)"));
    }
    Ok(())
}

/// A category a call asks about (a breakdown by category, the top tags of
/// one): one of the token's. An empty one means every category, which a
/// limited token may not ask for.
pub(super) fn check_category(g: &Grant, category: &str) -> Result<(), Status> {
    if category.is_empty() {
        return Err(denied(g, "every category (name one of yours)"));
    }
    if !g.may_use(category) {
        return Err(denied(g, &format!("category {category:?}")));
    }
    Ok(())
}
