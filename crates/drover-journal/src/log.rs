//! The log interface: what the controller's shell needs from a durable log, shaped so
//! that a replicated log (the next step: the journal under consensus) can implement it
//! too.
//!
//! - `append` → a ticket that resolves once the entries are durable (for a replicated
//!   log: committed, that is durable on a majority);
//! - `read_from` a sequence id (a follower catching up, a what-if run, a new leader
//!   applying what it has);
//! - `truncate_from` a sequence id: drop an uncommitted tail (a deposed leader's
//!   records that the new leader overwrote);
//! - `checkpoint` the state covering everything appended, and `purge_before` a
//!   checkpoint: drop what the checkpoint makes unnecessary.
//!
//! [`Journal`](crate::Journal) implements it over its segment files; the contract
//! tests in `tests/log_contract.rs` are written against the trait, so the replicated
//! log runs the same ones.

use std::future::Future;

use bytes::Bytes;

use crate::{JournalError, ReplayEntry, Ticket};

/// A durable, ordered log of entries grouped in records with consecutive sequence ids.
pub trait Log: Send + Sync {
    /// Queues entries to be made durable together, in one record; the ticket resolves
    /// with the record's position once they are.
    fn append(&self, entries: Vec<Bytes>) -> impl Future<Output = Result<Ticket, JournalError>> + Send;
    /// Every entry of every record from sequence id `from` on, in order. `from` may be
    /// the next sequence id (nothing to read); a purged or future id is `OutOfRange`.
    fn read_from(&self, from: i64) -> impl Future<Output = Result<Vec<ReplayEntry>, JournalError>> + Send;
    /// Removes every record from sequence id `from` on; the next append gets `from`.
    /// Checkpoints covering a removed record are removed with it.
    fn truncate_from(&self, from: i64) -> impl Future<Output = Result<(), JournalError>> + Send;
    /// Writes a checkpoint of `state`, which reflects every record appended before;
    /// returns the sequence id it covers up to (exclusive).
    fn checkpoint(&self, state: Vec<u8>) -> impl Future<Output = Result<i64, JournalError>> + Send;
    /// Drops records and checkpoints wholly before the checkpoint covering up to `seq`
    /// (which must exist and is kept). Returns the first sequence id the log now holds.
    fn purge_before(&self, seq: i64) -> impl Future<Output = Result<i64, JournalError>> + Send;
    /// Every record before this sequence id is durable.
    fn durable_seq(&self) -> i64;
}
