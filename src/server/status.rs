//! Mapping of library errors to gRPC statuses, as gRPC users expect them.

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::error::{Error, QueryErrorKind};

/// Metadata key carrying the character position of a query error.
pub const POSITION_KEY: &str = "tagstore-error-position";
/// Metadata key carrying the index of the failing query in a `Count`.
pub const QUERY_INDEX_KEY: &str = "tagstore-error-query";

/// Longest status message sent, in bytes: the message travels in a response
/// header, and one over the client's metadata limit would replace the real
/// status with `RESOURCE_EXHAUSTED`.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// Cuts `msg` to [`MAX_MESSAGE_BYTES`] on a character boundary, saying so.
pub fn cut_message(msg: &mut String) {
    if msg.len() <= MAX_MESSAGE_BYTES {
        return;
    }
    let mut end = MAX_MESSAGE_BYTES - 32;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let total = msg.len();
    msg.truncate(end);
    msg.push_str(&format!("… ({total} bytes in all)"));
}

pub fn to_status(e: Error) -> Status {
    query_status(e, None)
}

/// Like [`to_status`], naming which of several queries failed.
pub fn query_status(e: Error, index: Option<usize>) -> Status {
    let code = match &e {
        Error::Io { .. } | Error::Checkpoint(_) | Error::MissingKey(_) | Error::Internal(_) => {
            Code::Internal
        }
        Error::Corrupt { .. } | Error::BadRecord(_) | Error::Recovery(_) => Code::DataLoss,
        Error::TagNotFound(_)
        | Error::FieldNotFound(_)
        | Error::SourceNotFound(_)
        | Error::CustomerNotFound(_)
        | Error::CustomerIdNotFound(_)
        | Error::MergeNotFound(_)
        | Error::AudienceNotFound(_)
        | Error::RuleNotFound(_)
        | Error::SnapshotNotFound(_) => Code::NotFound,
        Error::TagExists(_)
        | Error::FieldExists(_)
        | Error::SourceExists(_)
        | Error::AudienceExists(_) => Code::AlreadyExists,
        Error::InvalidArgument(_) | Error::Config(_) => Code::InvalidArgument,
        Error::Query { kind, .. } => match kind {
            QueryErrorKind::Syntax | QueryErrorKind::Type => Code::InvalidArgument,
            QueryErrorKind::UnknownTag => Code::NotFound,
        },
        Error::Locked(_) | Error::Precondition(_) => Code::FailedPrecondition,
        Error::DiskFull(_) => Code::ResourceExhausted,
        Error::OutOfRange(_) => Code::OutOfRange,
        Error::Failed(_) | Error::ShuttingDown => Code::Unavailable,
        Error::Abandoned => Code::Cancelled,
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
    let mut msg = match index {
        Some(i) => format!("query {i}: {e}"),
        None => e.to_string(),
    };
    cut_message(&mut msg);
    Status::with_metadata(code, msg, meta)
}
