//! The controller core: a deterministic state machine with no I/O.
//!
//! Everything the controller learns arrives as an [`Input`] (a node connected, a
//! message from a node or a CLI, time passed), stamped by the shell with the time it
//! was accepted; everything it wants done comes out as [`Output`]s (a message to a
//! node or a CLI, close a node's stream). There is no clock, no socket and no OS
//! randomness in here: time is the inputs' `at_ms`, randomness a seeded generator kept
//! in the state. Same inputs in the same order give the same state and the same
//! outputs, which is what makes journal replay a correct recovery and what lets
//! `tests/sim.rs` test the core by seeded simulation.
//!
//! The rules (seed 1 and DESIGN.md "Command plane"): each pair known by some online
//! node has exactly one streamer; every assignment carries a per-pair epoch that only
//! grows and updates stamped with an older epoch are fenced off; a node that is gone
//! (stream ended, keepalives missed, kicked) loses its pairs at once; a streamer silent
//! on a pair for `stale_after` loses it; a drain moves pairs make-before-break; after a
//! restart the previous streamers get `rejoin_grace` to come back.

mod controller;
mod input;
mod rng;
mod view;

pub use controller::durable::{CHECKPOINT_FORMAT, INPUT_FORMAT, checkpoint_format};
pub use controller::tasks::{TaskCounters, TaskGauges, TaskState};
pub use controller::{Controller, Counters, NodeState};
pub use input::{
    AdmissionRefusal, Config, Credential, Event, Input, MAX_SETTING_MS, MAX_TIME_MS, OperatorRole, Output, Policy,
};
pub use rng::SplitMix64;
pub use view::{FleetView, NodeView, PairView, TaskRow};

/// Longest accepted pair name.
pub const MAX_PAIR_LEN: usize = 32;
/// Most pairs a node may announce.
pub const MAX_PAIRS_PER_NODE: usize = 1024;
/// Longest accepted node id, name, or version string.
pub const MAX_ID_LEN: usize = drover_proto::MAX_NODE_ID;

/// How a task environment value sealed by the shell starts (`--secret-env`): the core
/// keeps it as it is, shows its name only, and the shell opens it to dispatch the task.
pub const SEALED_PREFIX: &str = "drover-sealed:v1:";
