//! The query language and its evaluation. Reads a [`crate::storage::Snapshot`]
//! and writes nothing.
//!
//! `parser` turns text into an expression (with error positions), `eval`
//! compiles it against a snapshot and counts or lists its members,
//! `parallel` decides where and on how many threads a count runs.

pub mod analytics;
pub mod eval;
mod fields;
pub mod parallel;
pub mod parser;

pub use eval::{Plan, Query};
pub use parser::{Expr, parse};
