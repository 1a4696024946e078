//! The query language and its evaluation. Reads a [`crate::storage::Snapshot`]
//! and writes nothing.
//!
//! `lexer` and `parser` turn text into an expression (with error
//! positions), `eval`
//! compiles it against a snapshot into a plan and counts or lists its
//! members, `shard` holds the per-shard set operations a plan runs,
//! `fields` turns field predicates into plans, `analytics` answers
//! aggregates, breakdowns, top tags and overlaps, and `parallel` decides
//! where and on how many threads a count runs.

pub mod analytics;
pub mod eval;
pub(crate) mod fields;
mod lexer;
pub mod parallel;
pub mod parser;
mod shard;

pub use eval::{Plan, Query, saved_audiences_in};
pub use parser::{Expr, parse};
