//! The public contract of tagstore, shared by the server and every client
//! (the shell, the capacity harness, the tests):
//!
//! - the generated `tagstore.v1` messages, client and service
//!   (`proto/tagstore.proto` is the documented source);
//! - [`codec`]: prost's codec with undecodable messages as
//!   `INVALID_ARGUMENT`;
//! - [`names`]: what a valid tag name and customer key are, and how a tag
//!   name is written in the query language;
//! - [`auth`]: a client's token on every call;
//! - [`connect`]: a connection as the tools make it (plain text or TLS);
//! - [`backup`]: a `Backup` stream saved to a file.
//!
//! This package owns no behaviour of the server: it must not depend on the
//! engine, and the engine's rules that a client cannot check (a tag exists, a
//! field has this kind) stay in the engine.

pub mod auth;
pub mod backup;
pub mod codec;
pub mod connect;
pub mod names;

mod generated {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tagstore.v1");
}
pub use generated::*;

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tagstore_descriptor");

/// The address a server listens on, and a client connects to, when told
/// nothing else: loopback only, port 7420.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7420";
