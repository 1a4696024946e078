//! tagstore: a database server for customer tags.
//!
//! One roaring bitmap per tag over dense `u32` customer ids, kept durable by a
//! write-ahead log and immutable, memory-mapped segment files, and queried with
//! boolean expressions over gRPC. `ARCHITECTURE.md` has the map.
//!
//! The crate is layered; data flows one way:
//!
//! - [`server`]: gRPC in and out (proto types, status codes, limits, the
//!   memory budget). Turns requests into domain operations and results back
//!   into proto.
//! - [`storage`]: the engine. Logs each operation in the WAL, applies it to the
//!   in-memory state, publishes an immutable [`storage::Snapshot`], and turns
//!   snapshots into segment files at checkpoints. Knows nothing of gRPC.
//! - [`query`]: the query language (parser) and its evaluation over one
//!   snapshot. Reads, never writes.
//! - [`rules`]: rule tags and lifecycles: a definition checked, the order
//!   rules are evaluated in, a rule's members among some customers, what a
//!   turn of the day can change. Reads snapshots; the one apply function
//!   in `storage` asks it and writes what it returns.
//! - [`ingest`]: channel records in (order, social and store exports, as
//!   CSV or JSON Lines, UTF-8 or GBK), normalised into the one event model
//!   and turned into facts (field writes). Knows nothing of gRPC; hands its
//!   writes to the engine like any client.
//! - [`intake`]: records read from a source into the engine's writes
//!   (the facts' fields made when missing), shared by the `Ingest` stream
//!   and the Kafka consumers.
//! - [`kafka`]: the server consuming Kafka topics of sources that name
//!   them, each batch logged with the positions it consumed to (exactly
//!   once); knows nothing of gRPC.
//! - [`fields`]: what a field is (integer, enumerated, behaviour) and how
//!   its values sit in bitmaps; local days and months.
//! - [`access`]: API tokens (the tokens file, roles) and the rule of every
//!   call; the server asks it before handing a call on.
//! - [`audit`]: the audit trail: who read or changed customers, with which
//!   call, when and how many, in checksummed files of the data directory.
//! - [`bitmap`]: the sharded roaring bitmap every tag is stored in.
//! - [`clock`]: the one source of "now" (injectable, for tests that cross
//!   a local midnight or a month end).
//! - [`config`]: server settings (defaults, file, flags); [`error`]: typed
//!   errors.
//! - [`proto`] and [`names`]: the public contract (the `tagstore.v1` types
//!   and the rules for tag names and customer keys), from the
//!   `tagstore-proto` package that clients share.

pub mod access;
pub mod audit;
pub mod bitmap;
pub mod clock;
pub mod config;
pub mod error;
pub mod fields;
pub mod ingest;
pub mod intake;
pub mod kafka;
pub mod query;
pub mod rules;
pub mod server;
pub mod storage;

pub use error::{Error, Result};

/// The generated `tagstore.v1` types, client and service.
pub use tagstore_proto as proto;
/// The rules for tag names and customer keys.
pub use tagstore_proto::names;
