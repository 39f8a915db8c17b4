//! `drover coordinator`: an AMBROSIA-compatible reliability coordinator.
//!
//! A program written against AMBROSIA's client libraries talks to this coordinator
//! exactly as it would to AMBROSIA's own (AMBROSIA-WIRE.md): two loopback connections,
//! log records in, bare messages out. Every call the program makes to itself is logged
//! (group commit, fsync) before the program sees it; a restart replays the log after
//! the last checkpoint, so no call is lost or repeated. Instance metadata lives in the
//! log directory instead of Azure tables.
//!
//! - [`session`]: one application session, sans-IO (start-up sequences, logging and
//!   delivery, checkpoints, replay dedup, misbehaving applications).
//! - [`server`]: the process around it (ports, both connection generations, the log).
//! - [`instance`]: `instance.json`, registration and upgrades.
//! - [`debug`]: debug runs (seed 4's repro and upgrade what-if flows) over a log,
//!   read-only, and the checkpoints they can start from.
//!
//! - [`link`]: links between coordinators (`ReplayFrom`, `Commit`, `TrimTo`), so calls
//!   between instances are delivered exactly once across crashes of either side.

pub mod admin;
pub mod debug;
pub mod instance;
pub mod link;
pub mod replica;
pub mod replicated;
pub mod server;
pub mod session;

pub use server::{CoordinatorConfig, CoordinatorError, Listening, run};
