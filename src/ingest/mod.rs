//! Ingestion: the records of a brand's channels (e-commerce orders, social
//! interactions, store visits) in, facts about customers out.
//!
//! The rooms, in the order a record passes through them:
//! [`read`] (bytes into records: CSV or JSON Lines, UTF-8 or GBK),
//! [`source`] (a channel's declared mapping, applied to one record; the
//! built-in ones in [`presets`]),
//! [`normalize`] (one value: a time, an amount, a phone number, an
//! identifier, into its one form), [`event`] (the unified event model every
//! record becomes), [`facts`] (the field writes an event makes: counters,
//! first and last days, behaviours). A source may also name Kafka topics
//! ([`kafka`]: its settings; `crate::kafka` consumes them). Apart from
//! that path, [`rebuild`]
//! folds kept events back into facts, and [`split`] decides whose each
//! kept event is when a merge is undone.
//!
//! This module owns turning records into events and events into writes. It
//! must not write to the store itself, and knows nothing of gRPC.

pub mod event;
pub mod facts;
pub mod kafka;
pub mod normalize;
pub mod presets;
pub mod read;
pub mod rebuild;
pub mod source;
pub mod split;
