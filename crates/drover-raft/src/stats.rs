//! Counters of consensus a member keeps for its shell's `/metrics`: elections and
//! leader changes it saw, how long proposals took to commit, snapshots built, sent and
//! installed. Kept here, beside openraft, so every kind of replica (controller,
//! coordinator) reports the same figures.

use std::sync::atomic::{AtomicU64, Ordering};

use drover_journal::histogram::{Histogram, HistogramSnapshot, LATENCY_BOUNDS_US};

/// A member's consensus counters (shared by its tasks; all relaxed atomics).
#[derive(Debug)]
pub struct RaftStats {
    /// Terms this member saw begin since it started (each is one election, won or not).
    pub elections: AtomicU64,
    /// Times the known leader became a different member (or a first one).
    pub leader_changes: AtomicU64,
    /// Propose → committed, in microseconds, on the leader.
    pub commit_latency: Histogram,
    /// Snapshots this member built from its core.
    pub snapshots_built: AtomicU64,
    /// Snapshots this member sent to a member behind its purge point.
    pub snapshots_sent: AtomicU64,
    /// Snapshots this member installed from a leader (it had fallen behind).
    pub snapshots_installed: AtomicU64,
    /// Campaigns this member began at once after refusing a candidate whose log was
    /// behind its own, or splitting a vote with it ([`crate::inbound`]).
    pub campaigns_after_refusal: AtomicU64,
}

impl Default for RaftStats {
    fn default() -> Self {
        RaftStats {
            elections: AtomicU64::new(0),
            leader_changes: AtomicU64::new(0),
            commit_latency: Histogram::new(LATENCY_BOUNDS_US),
            snapshots_built: AtomicU64::new(0),
            snapshots_sent: AtomicU64::new(0),
            snapshots_installed: AtomicU64::new(0),
            campaigns_after_refusal: AtomicU64::new(0),
        }
    }
}

/// A copy of [`RaftStats`] at one moment.
#[derive(Clone, Debug, Default)]
pub struct StatsSnapshot {
    /// See [`RaftStats::elections`].
    pub elections: u64,
    /// See [`RaftStats::leader_changes`].
    pub leader_changes: u64,
    /// See [`RaftStats::commit_latency`].
    pub commit_latency: HistogramSnapshot,
    /// See [`RaftStats::snapshots_built`].
    pub snapshots_built: u64,
    /// See [`RaftStats::snapshots_sent`].
    pub snapshots_sent: u64,
    /// See [`RaftStats::snapshots_installed`].
    pub snapshots_installed: u64,
    /// See [`RaftStats::campaigns_after_refusal`].
    pub campaigns_after_refusal: u64,
}

impl RaftStats {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            elections: get(&self.elections),
            leader_changes: get(&self.leader_changes),
            commit_latency: self.commit_latency.snapshot(),
            snapshots_built: get(&self.snapshots_built),
            snapshots_sent: get(&self.snapshots_sent),
            snapshots_installed: get(&self.snapshots_installed),
            campaigns_after_refusal: get(&self.campaigns_after_refusal),
        }
    }
}
