//! The openraft glue, one crate between the journal and the shells.
//!
//! drover replicates its journal with openraft (pinned in `Cargo.toml`); nothing here
//! elects or replicates by itself. This crate gives openraft what it needs from
//! drover, so that the controller's and (later) the coordinator's replicas use it
//! unchanged:
//!
//! - [`types`]: the Raft type configuration (node ids, what a normal entry carries);
//! - [`runtime`]: openraft's runtime (tokio, with a random source a simulation seeds);
//! - [`record`]: how a Raft entry is written into the journal: one AMBROSIA message per
//!   entry, carrying its Raft log id, so the on-disk format stays AMBROSIA log records;
//! - [`log_store`]: openraft's log storage over [`drover_journal::Journal`]: appends are
//!   group-committed and fsynced by the journal's writer, the vote and the purge point
//!   are saved durably beside it, an uncommitted tail is truncated, reads come from an
//!   in-memory mirror of the unpurged log;
//! - [`machine`]: openraft's state machine over a [`drover_journal::StateMachine`]:
//!   committed entries are applied to the core in order; snapshots are the core's
//!   checkpoints plus the applied log id and membership.
//!
//! - [`inbound`]: what a member does with requests from the others (openraft's,
//!   plus a campaign at once after refusing a candidate whose log is behind);
//! - [`network`]: the Raft port (length-prefixed postcard frames behind the
//!   cluster-secret handshake of [`secret`], inside mutual TLS of [`tls`] when on);
//! - [`member`]: one member started the way every replica starts (log, machine,
//!   openraft, Raft port, self-initialisation from the initial member list);
//! - [`status`]: each member's view of itself and the cluster view made of them;
//! - [`stats`]: elections, leader changes, commit latency and snapshot counts.

pub mod inbound;
pub mod log_store;
pub mod machine;
pub mod member;
pub mod network;
pub mod record;
pub mod runtime;
pub mod secret;
pub mod stats;
pub mod status;
pub mod tls;
pub mod types;

/// The openraft this crate is built on (one pinned version for every user).
pub use openraft;

pub use log_store::RaftLog;
pub use machine::RaftMachine;
pub use types::{Inputs, TypeConfig};
