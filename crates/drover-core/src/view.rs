//! A read-only picture of the fleet for operators (the dashboard and its live
//! updates): nodes with their state and streams, pairs with their streamer, epoch and
//! last price. Built from the core's state in one pass over nodes and pairs, and plain
//! serde data, so the shell can ship it as JSON without reaching into the core.

use serde::Serialize;

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
    /// Whether it runs tasks.
    pub worker: bool,
    /// How many pairs its upstream serves.
    pub known_pairs: usize,
    /// Pairs it streams now (or is taking over).
    pub streaming: Vec<String>,
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
    /// How long ago (at `at_ms`) the current streamer last sent an update for it.
    pub age_ms: Option<i64>,
}
