//! Ingestion: the records of a brand's channels (e-commerce orders, social
//! interactions, store visits) in, facts about customers out.
//!
//! The rooms, in the order a record passes through them:
//! [`normalize`] (one value: a time, an amount, a phone number, an
//! identifier, into its one form).
//!
//! This module owns turning records into events and events into writes. It
//! must not write to the store itself, and knows nothing of gRPC.

pub mod normalize;
