//! What the dashboard shows beyond the current fleet: a short price history per pair
//! and a strip of recent events (failovers, evictions, timeouts, task endings).
//!
//! Both are observations of the running process, not state: they are filled by the
//! owner from the core's outputs and views, never journaled, and start empty after a
//! restart. Both are bounded (points per pair, pairs tracked, events kept), so a large
//! fleet or a chatty one costs a fixed amount of memory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use drover_core::{FleetView, Output};
use serde::Serialize;

/// Price points kept per pair (at most one per publish, every 250 ms: a minute or more).
pub(crate) const POINTS_PER_PAIR: usize = 240;
/// Pairs whose history is kept (the first ones seen).
pub(crate) const MAX_PAIRS: usize = 2_000;
/// Events kept.
pub(crate) const MAX_EVENTS: usize = 100;

/// One event of the strip.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Notice {
    /// When (Unix ms).
    pub(crate) at_ms: i64,
    /// `assigned`, `evicted`, `closed` or `task`.
    pub(crate) kind: &'static str,
    /// One line for a person.
    pub(crate) text: String,
}

/// The history and the events, shared between the owner (writer) and HTTP (readers).
#[derive(Debug, Default)]
pub(crate) struct Recent {
    /// Pair → (upstream time, price) points, oldest first.
    history: BTreeMap<String, VecDeque<(i64, String)>>,
    events: VecDeque<Notice>,
}

/// The shared handle.
pub(crate) type Shared = Arc<Mutex<Recent>>;

impl Recent {
    /// Records the newest price of every pair in `view` that changed since the last call.
    pub(crate) fn sample(&mut self, view: &FleetView) {
        for p in &view.pairs {
            let (Some(price), Some(t)) = (&p.price, p.upstream_time_ms) else { continue };
            if !self.history.contains_key(&p.pair) && self.history.len() >= MAX_PAIRS {
                continue;
            }
            let points = self.history.entry(p.pair.clone()).or_default();
            if points.back().is_some_and(|(last, _)| *last >= t) {
                continue;
            }
            if points.len() >= POINTS_PER_PAIR {
                points.pop_front();
            }
            points.push_back((t, price.clone()));
        }
    }

    /// Records the outputs an operator wants to see in the strip; `label` names a node.
    pub(crate) fn observe(&mut self, at_ms: i64, out: &[Output], label: impl Fn(&str) -> String) {
        for o in out {
            let (kind, text) = match o {
                // A first assignment is routine; moves are what an operator looks for.
                Output::Assigned { pair, node, epoch, reason }
                    if !(*epoch == 1 && *reason == "the pair had no streamer") =>
                {
                    ("assigned", format!("{pair} → {} (epoch {epoch}): {reason}", label(node)))
                }
                Output::EvictNode { node, reason } => ("evicted", format!("{} evicted: {reason}", label(node))),
                Output::CloseNode { node, reason, .. } => ("closed", format!("{} disconnected: {reason}", label(node))),
                Output::TaskEnded { task, state, detail } if *state != "completed" || detail != "exit code 0" => {
                    ("task", format!("{task} {state}: {detail}"))
                }
                _ => continue,
            };
            self.note(at_ms, kind, text);
        }
    }

    /// Records one event the shell saw itself (a stream closing).
    pub(crate) fn note(&mut self, at_ms: i64, kind: &'static str, text: String) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(Notice { at_ms, kind, text });
    }

    /// Every pair's points, as `{pair: [[upstream_ms, "price"], …]}`.
    pub(crate) fn history_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = self
            .history
            .iter()
            .map(|(pair, points)| (pair.clone(), serde_json::json!(points.iter().collect::<Vec<_>>())))
            .collect();
        serde_json::Value::Object(map)
    }

    /// The events, newest first.
    pub(crate) fn events(&self) -> Vec<Notice> {
        self.events.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(price: &str, t: i64) -> FleetView {
        FleetView {
            pairs: vec![drover_core::PairView {
                pair: "EURUSD".into(),
                streamer: None,
                epoch: 1,
                incoming: None,
                price: Some(price.into()),
                upstream_time_ms: Some(t),
                age_ms: None,
            }],
            ..FleetView::default()
        }
    }

    #[test]
    fn history_keeps_new_points_only_and_is_bounded() {
        let mut r = Recent::default();
        r.sample(&view("1.1", 10));
        r.sample(&view("1.1", 10));
        r.sample(&view("1.2", 20));
        assert_eq!(r.history["EURUSD"].len(), 2, "a repeated view adds nothing");
        for t in 0..(POINTS_PER_PAIR as i64 * 2) {
            r.sample(&view("1.3", 100 + t));
        }
        assert_eq!(r.history["EURUSD"].len(), POINTS_PER_PAIR);
    }

    #[test]
    fn events_keep_moves_and_failures_newest_first_bounded() {
        let mut r = Recent::default();
        let moved = Output::Assigned { pair: "EURUSD".into(), node: "n1".into(), epoch: 2, reason: "failover" };
        let fine = Output::TaskEnded { task: "t1".into(), state: "completed", detail: "exit code 0".into() };
        let failed = Output::TaskEnded { task: "t2".into(), state: "failed", detail: "timed out".into() };
        r.observe(1, &[moved, fine, failed], str::to_owned);
        let e = r.events();
        assert_eq!(e.len(), 2, "a task that exited 0 is not news: {e:?}");
        assert!(e[0].text.contains("t2 failed: timed out") && e[1].text.contains("failover"), "{e:?}");
        for i in 0..(MAX_EVENTS * 2) {
            r.observe(i as i64, &[Output::EvictNode { node: "n".into(), reason: "r".into() }], str::to_owned);
        }
        assert_eq!(r.events().len(), MAX_EVENTS);
    }
}
