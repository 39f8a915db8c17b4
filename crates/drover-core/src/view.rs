//! A read-only picture of the fleet for operators (the dashboard and its live
//! updates): nodes with their state and streams, pairs with their streamer, epoch and
//! last price. Built from the core's state in one pass over nodes and pairs, and plain
//! serde data, so the shell can ship it as JSON without reaching into the core.

use serde::Serialize;

/// Tasks in [`FleetView::recent_tasks`].
pub const RECENT_TASKS: usize = 20;
/// Known pairs listed per node in [`NodeView::known`] (the count is in `known_pairs`).
pub const MAX_KNOWN_SHOWN: usize = 64;

/// The fleet at the time of the core's last input.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FleetView {
    /// The time of the core's last input (Unix ms).
    pub at_ms: i64,
    /// Every node the controller remembers, by id.
    pub nodes: Vec<NodeView>,
    /// Every pair some node has announced, by name.
    pub pairs: Vec<PairView>,
    /// Task queue depth and tasks by state.
    pub tasks: Option<crate::TaskGauges>,
    /// The newest tasks (at most [`RECENT_TASKS`]), newest first.
    pub recent_tasks: Vec<TaskRow>,
}

/// One task, as the dashboard's task table shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskRow {
    /// The task id.
    pub id: String,
    /// queued, running, completed, failed or aborted.
    pub state: &'static str,
    /// The job and its arguments (shortened).
    pub job: String,
    /// The worker of the running or last attempt.
    pub worker: Option<String>,
    /// Attempts counted so far.
    pub attempts: u32,
    /// The job's exit code, once completed.
    pub exit_code: Option<i32>,
    /// Why it failed (or the last attempt's error).
    pub error: String,
    /// When it was submitted (Unix ms).
    pub submitted_ms: i64,
    /// When it finished (Unix ms; 0 while it has not).
    pub finished_ms: i64,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeView {
    /// The node's uuid.
    pub id: String,
    /// Its human name.
    pub name: String,
    /// The version it announced.
    pub version: String,
    /// `online`, `suspect`, `draining`, `rejoining` or `gone`.
    pub state: &'static str,
    /// When its current (or last) stream opened (Unix ms).
    pub connected_since_ms: i64,
    /// When it went away, while it is not connected (Unix ms).
    pub gone_since_ms: Option<i64>,
    /// Whether it runs tasks.
    pub worker: bool,
    /// How many pairs its upstream serves.
    pub known_pairs: usize,
    /// The pairs its upstream serves (the first [`MAX_KNOWN_SHOWN`]).
    pub known: Vec<String>,
    /// Pairs it streams now (or is taking over).
    pub streaming: Vec<String>,
    /// A worker's cores, the cores its tasks hold, and its memory (MiB).
    pub cores: Option<u32>,
    /// Cores reserved by its running tasks.
    pub used_cores: Option<u32>,
    /// Its memory (MiB).
    pub memory_mb: Option<u64>,
}

/// One pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairView {
    /// The pair's name.
    pub pair: String,
    /// The node whose updates are accepted, if any.
    pub streamer: Option<String>,
    /// The streamer's epoch (the last one issued when there is none).
    pub epoch: u64,
    /// The node taking the pair over make-before-break, if any.
    pub incoming: Option<String>,
    /// The newest accepted price as an exact decimal string.
    pub price: Option<String>,
    /// Its upstream time (Unix ms).
    pub upstream_time_ms: Option<i64>,
    /// How old the pair's news is at `at_ms`: since the current streamer's last update,
    /// or, with nobody streaming it, since the newest price's upstream time.
    pub age_ms: Option<i64>,
}
