//! Typed errors of the library. The server maps each kind to a gRPC status
//! (see `server::status`); nothing here knows about gRPC.

use std::path::PathBuf;

use crate::names::shown;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a query's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryErrorKind {
    /// The text does not parse.
    Syntax,
    /// The text names a tag or field that does not exist.
    UnknownTag,
    /// The text uses a field or value in a way its kind does not allow
    /// (comparing an enumerated field with `>=`, an unknown value, …).
    Type,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt data in {path} at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A log record's content does not decode; the log replay names the
    /// file and offset (see `wal::replay`).
    #[error("{0}")]
    BadRecord(String),
    /// Start-up cannot establish what the store is (a missing manifest,
    /// files that contradict each other); the message says what and how to
    /// recover.
    #[error("{0}")]
    Recovery(String),
    /// A snapshot holds a customer id its dictionary cannot name: a bug,
    /// reported rather than answered with a row left out.
    #[error("customer id {0} has no key in the dictionary of its snapshot")]
    MissingKey(u32),
    /// The disk holding the data directory is full; the write was refused
    /// before it was applied, and the store takes writes again once space
    /// is freed.
    #[error("disk full: {0}; the write was not applied")]
    DiskFull(String),
    #[error("tag not found: {:?}", shown(.0))]
    TagNotFound(String),
    #[error("tag already exists: {:?}", shown(.0))]
    TagExists(String),
    #[error("field not found: {:?}", shown(.0))]
    FieldNotFound(String),
    #[error("a field named {:?} already exists", shown(.0))]
    FieldExists(String),
    #[error("customer not found: {:?}", shown(.0))]
    CustomerNotFound(String),
    #[error("source not found: {:?}", shown(.0))]
    SourceNotFound(String),
    #[error("saved audience not found: {:?}", shown(.0))]
    AudienceNotFound(String),
    #[error("a saved audience named {:?} already exists", shown(.0))]
    AudienceExists(String),
    #[error("rule not found: {:?}", shown(.0))]
    RuleNotFound(String),
    #[error("no audience snapshot {0}")]
    SnapshotNotFound(u32),
    #[error("a source named {:?} already exists", shown(.0))]
    SourceExists(String),
    #[error("customer id {0} names no live customer (ids come from ResolveCustomers or Profile)")]
    CustomerIdNotFound(u32),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no merge {0} in the merge log")]
    MergeNotFound(u64),
    /// The store is not in the state the request needs (a merge already
    /// undone, a survivor merged again since); the message says what to do.
    #[error("{0}")]
    Precondition(String),
    /// A moment the store cannot be read at: ahead of it, or before its
    /// history begins; the message says where the range is.
    #[error("{0}")]
    OutOfRange(String),
    #[error("{message} at position {position}")]
    Query {
        kind: QueryErrorKind,
        /// 0-based character (not byte) offset into the query text.
        position: usize,
        message: String,
    },
    #[error("data directory {0} is in use by another tagstore process")]
    Locked(PathBuf),
    #[error("storage stopped after a fatal error and accepts no more writes: {0}")]
    Failed(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Work stopped because whoever asked for it stopped waiting (a call
    /// the client cancelled, or whose deadline passed).
    #[error("the caller stopped waiting")]
    Abandoned,
    /// A failure of the server itself (a task that died); the message says what.
    #[error("{0}")]
    Internal(String),
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn corrupt(path: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

impl From<crate::names::NameError> for Error {
    fn from(e: crate::names::NameError) -> Self {
        Error::InvalidArgument(e.0)
    }
}
