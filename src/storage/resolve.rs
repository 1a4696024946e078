//! Customer keys looked up before a large update reaches the writer
//! thread: most of a large batch's cost, done by the calling task (and a
//! blocking-pool thread beside it), so that requests from many clients
//! resolve their keys in parallel and the single writer only checks ids.
//! Reads one snapshot; writes nothing.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::storage::{Mutation, Snapshot};

/// Resolves the keys of `mutations` in `snap` in two halves at once: one on
/// the blocking pool, the other on this thread (a few hundred microseconds
/// for a batch of 1,000 keys).
async fn resolve_in_halves(
    mut mutations: Vec<Mutation>,
    snap: Arc<Snapshot>,
) -> Result<Vec<Mutation>> {
    // The other thread only reads and returns ids; what is kept is allocated
    // here, so that its memory is not stranded in an idle thread's heap.
    let upper: Vec<Mutation> = mutations.iter_mut().map(Mutation::split_off_half).collect();
    let upper = Arc::new(upper);
    let (theirs, keys) = (snap.clone(), upper.clone());
    let other = tokio::task::spawn_blocking(move || {
        keys.iter()
            .map(|m| m.look_up(&theirs))
            .collect::<Result<Vec<_>>>()
    });
    for m in &mut mutations {
        m.resolve_in(&snap)?;
    }
    let found = other
        .await
        .map_err(|e| Error::Internal(format!("key look-up task failed: {e}")))??;
    let upper = Arc::try_unwrap(upper).unwrap_or_else(|shared| (*shared).clone());
    for ((m, mut u), f) in mutations.iter_mut().zip(upper).zip(found) {
        u.take_resolved(f);
        m.append(u);
    }
    Ok(mutations)
}

/// An update naming at least this many customers by key has them looked up
/// on the blocking pool before it reaches the writer thread
/// ([`Mutation::resolve_in`]); below it, the hand-off costs more than the
/// look-ups.
pub(crate) const RESOLVE_BEFORE_WRITER: usize = 256;

/// Resolves the keys of `mutations` in `snap` before they go to the writer
/// (see the module doc), when they name at least [`RESOLVE_BEFORE_WRITER`]
/// customers by key; otherwise returns them as they are.
pub(crate) async fn before_writer(
    mut mutations: Vec<Mutation>,
    snap: Arc<Snapshot>,
) -> Result<Vec<Mutation>> {
    let by_key: usize = mutations.iter().map(|m| m.add.len() + m.remove.len()).sum();
    if by_key < RESOLVE_BEFORE_WRITER {
        return Ok(mutations);
    }
    if snap.live.is_loaded() {
        return resolve_in_halves(mutations, snap).await;
    }
    // The live set must first be read from disk: on the blocking pool.
    tokio::task::spawn_blocking(move || {
        for m in &mut mutations {
            m.resolve_in(&snap)?;
        }
        Ok(mutations)
    })
    .await
    .map_err(|e| Error::Internal(format!("key look-up task failed: {e}")))?
}
