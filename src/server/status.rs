//! Mapping of library errors to gRPC statuses, as gRPC users expect them.

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::error::{Error, QueryErrorKind};

/// Metadata key carrying the character position of a query error.
pub const POSITION_KEY: &str = "tagstore-error-position";
/// Metadata key carrying the index of the failing query in a `Count`.
pub const QUERY_INDEX_KEY: &str = "tagstore-error-query";

pub fn to_status(e: Error) -> Status {
    query_status(e, None)
}

/// Like [`to_status`], naming which of several queries failed.
pub fn query_status(e: Error, index: Option<usize>) -> Status {
    let code = match &e {
        Error::Io { .. } | Error::Checkpoint(_) => Code::Internal,
        Error::Corrupt { .. } => Code::DataLoss,
        Error::TagNotFound(_)
        | Error::FieldNotFound(_)
        | Error::CustomerNotFound(_)
        | Error::CustomerIdNotFound(_) => Code::NotFound,
        Error::TagExists(_) | Error::FieldExists(_) => Code::AlreadyExists,
        Error::InvalidArgument(_) | Error::Config(_) => Code::InvalidArgument,
        Error::Query { kind, .. } => match kind {
            QueryErrorKind::Syntax | QueryErrorKind::Type => Code::InvalidArgument,
            QueryErrorKind::UnknownTag => Code::NotFound,
        },
        Error::Locked(_) => Code::FailedPrecondition,
        Error::Failed(_) | Error::ShuttingDown => Code::Unavailable,
    };
    let mut meta = MetadataMap::new();
    if let Error::Query { position, .. } = &e {
        meta.insert(
            POSITION_KEY,
            position
                .to_string()
                .parse()
                .expect("digits are valid metadata"),
        );
        if let Some(i) = index {
            meta.insert(
                QUERY_INDEX_KEY,
                i.to_string().parse().expect("digits are valid metadata"),
            );
        }
    }
    let msg = match index {
        Some(i) => format!("query {i}: {e}"),
        None => e.to_string(),
    };
    Status::with_metadata(code, msg, meta)
}
