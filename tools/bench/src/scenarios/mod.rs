//! The harness's scenarios, one file each: every file adds its scenario's
//! methods to [`Bench`](crate::Bench), which holds the run's settings, data
//! set, report and helpers (in `main.rs`).

mod backup;
mod history;
mod ingest;
mod kafka;
mod load;
mod mixed;
mod pipelined;
mod query;
mod restart;
mod rules;
mod snapshots;
mod sweep;
mod update;
pub(crate) mod watch;
