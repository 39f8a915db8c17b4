//! Upgrade what-if: replay a recorded journal with this binary's state machine and
//! compare, at every retained checkpoint, the state it computes with the state the
//! writer recorded there.
//!
//! Seed 4 names "repro" and "what-if" runs: replay recorded history without going
//! live. Before an upgrade, an operator runs the new binary's what-if on a copy of
//! production data: if the new rules compute a different state from the same inputs,
//! the run names the first interval between checkpoints where they do and which part
//! of the state differs. Its precision is the spacing of the retained checkpoints
//! (`--checkpoint-every`, `--keep-checkpoints`): with a checkpoint after every record
//! it names the record.
//!
//! It replays from the oldest valid checkpoint. Recovery may cut a torn tail, so run
//! it on a copy of the directory (the `drover journal what-if` command makes one).

use std::sync::Arc;

use crate::recovery::{Start, recover_from};
use crate::storage::Storage;
use crate::{JournalConfig, JournalError, StateMachine, checkpoint, checkpoint_name, machine::decode_entry};
use drover_machine::Divergence;

/// One stretch of the log between two checkpoints, replayed and compared.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Interval {
    /// The first record of the stretch (the earlier checkpoint covers those before it).
    pub first_seq: i64,
    /// The checkpoint compared: it covers records before this one.
    pub checkpoint_seq: i64,
    /// Inputs replayed in the stretch.
    pub inputs: u64,
}

/// Where replay first computed a state other than the recorded one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Divergent {
    /// The stretch whose replay disagrees with the checkpoint at its end.
    pub interval: Interval,
    /// The first part of the state that differs (replayed value, then recorded value).
    pub part: String,
}

/// The outcome of a what-if run.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WhatIf {
    /// The checkpoint replay started from (records before it are not replayed).
    pub start_seq: i64,
    /// Stretches that replayed to exactly the recorded state.
    pub matched: Vec<Interval>,
    /// The first stretch that did not, if any (the run stops there).
    pub diverged: Option<Divergent>,
    /// Inputs after the newest checkpoint: replayed, but with nothing to compare with.
    pub unchecked_inputs: u64,
    /// Checkpoints that could not be read and were not compared, with the reason.
    pub skipped_checkpoints: Vec<(i64, String)>,
}

/// Runs a what-if replay of the journal in `config.dir` (a copy: recovery may repair
/// it) with the machine `M`. `fresh` builds the state when no checkpoint exists.
pub fn what_if<M: StateMachine + Divergence>(
    config: &JournalConfig,
    storage: &Arc<dyn Storage>,
    fresh: impl FnOnce() -> M,
) -> Result<WhatIf, JournalError> {
    let recovery = recover_from(config, storage, Start::OldestCheckpoint)?;
    let fail = |at: String, reason: String| JournalError::Replay { at, reason };
    let mut machine = match &recovery.checkpoint {
        Some(state) => M::restore(state)
            .map_err(|e| fail(format!("checkpoint {}", recovery.checkpoint_seq), format!("does not restore: {e}")))?,
        None => fresh(),
    };
    let dir = &config.dir;
    let later: Vec<i64> = crate::Listing::read(storage.as_ref(), dir)?
        .checkpoints
        .into_iter()
        .filter(|&s| s > recovery.checkpoint_seq)
        .collect();
    let mut report = WhatIf { start_seq: recovery.checkpoint_seq, ..WhatIf::default() };
    let mut current = Interval { first_seq: recovery.checkpoint_seq, checkpoint_seq: 0, inputs: 0 };
    let mut next = later.into_iter().peekable();
    let mut out = Vec::new();
    // Compares the replayed state with the checkpoint covering records before `seq`.
    let compare = |machine: &M, seq: i64, current: &mut Interval, report: &mut WhatIf| -> bool {
        let path = dir.join(checkpoint_name(seq));
        let recorded = storage
            .read(&path)
            .map_err(|e| e.to_string())
            .and_then(|raw| checkpoint::decode(&raw, recovery.committer_id, &config.limits))
            .and_then(|(covered, state)| M::restore(&state).map(|m| (covered, m)).map_err(|e| e.to_string()));
        let recorded = match recorded {
            Ok((covered, m)) if covered == seq => m,
            Ok((covered, _)) => {
                report.skipped_checkpoints.push((seq, format!("covers {covered}, but is named for {seq}")));
                return true;
            }
            Err(reason) => {
                report.skipped_checkpoints.push((seq, reason));
                return true;
            }
        };
        let interval = Interval { checkpoint_seq: seq, ..current.clone() };
        *current = Interval { first_seq: seq, checkpoint_seq: 0, inputs: 0 };
        match machine.first_difference(&recorded) {
            None => {
                report.matched.push(interval);
                true
            }
            Some(part) => {
                report.diverged = Some(Divergent { interval, part });
                false
            }
        }
    };
    for entry in recovery.entries() {
        let entry = entry?;
        while let Some(&seq) = next.peek()
            && seq <= entry.seq
        {
            next.next();
            if !compare(&machine, seq, &mut current, &mut report) {
                return Ok(report);
            }
        }
        if let Some(input) = decode_entry::<M>(&entry)? {
            machine.apply(input, &mut out);
            out.clear();
            current.inputs += 1;
        }
    }
    for seq in next {
        if seq > recovery.next_seq {
            report.skipped_checkpoints.push((seq, format!("covers records up to {seq}, past the log's end")));
            continue;
        }
        if !compare(&machine, seq, &mut current, &mut report) {
            return Ok(report);
        }
    }
    report.unchecked_inputs = current.inputs;
    Ok(report)
}
