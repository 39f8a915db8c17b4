//! `drover journal verify|dump|state|what-if`: read-only operator tools over a journal
//! directory. `verify` exits non-zero on any damage and prints where it is; `dump`
//! lists the records with their sequence ids, message types and sizes (`--json` for
//! scripts); `state` shows what a restarted controller would recover to; `what-if`
//! replays the journal with this binary's rules and compares every retained
//! checkpoint (exit 1 at the first that differs), the check to run on a copy of
//! production data before an upgrade.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use drover_journal::inspect::{Inspection, inspect};
use drover_journal::{FsStorage, Limits};

#[derive(Debug, Subcommand)]
pub enum JournalCommand {
    /// Check every checkpoint and record; exit 1 and say where if anything is damaged.
    Verify {
        /// A data directory (holding `journal/`) or a journal directory.
        #[arg(env = "DROVER_DATA_DIR", default_value = "./drover-data")]
        dir: PathBuf,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What a controller restarted on this journal would recover to: every node and
    /// pair (streamer, epoch, latest price) and the task figures. Recovers from a copy
    /// of the journal, so the directory is left exactly as it is (torn tail included).
    State {
        /// A data directory (holding `journal/`) or a journal directory.
        #[arg(env = "DROVER_DATA_DIR", default_value = "./drover-data")]
        dir: PathBuf,
        /// Print as JSON (the dashboard's `/api/fleet` shape).
        #[arg(long)]
        json: bool,
    },
    /// Upgrade what-if: replay the journal with this binary's rules from the oldest
    /// retained checkpoint and compare the state at every later checkpoint with the one
    /// recorded there. Exits 1 at the first difference, naming the records and the part
    /// of the state (a node, a pair, a token, a task); 0 when every stretch matches.
    /// Works on a copy: the directory is never written. Keep more checkpoints
    /// (`--keep-checkpoints`) for a longer and finer check. On a cluster member's
    /// directory it replays from its previous snapshot (or the start of its log) and
    /// compares with its newest snapshot.
    WhatIf {
        /// A data directory (holding `journal/` or `raft/`) or a journal directory.
        #[arg(env = "DROVER_DATA_DIR", default_value = "./drover-data")]
        dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// A cluster member's secret file: with it, a member whose log still starts
        /// at the group's first entry is replayed from there (its core is seeded from
        /// the secret).
        #[arg(long)]
        cluster_secret_file: Option<PathBuf>,
    },
    /// List checkpoints and records: sequence ids, offsets, sizes, message types.
    Dump {
        /// A data directory (holding `journal/`) or a journal directory.
        #[arg(env = "DROVER_DATA_DIR", default_value = "./drover-data")]
        dir: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The journal in `dir`: a single controller's `journal/`, a cluster member's `raft/`,
/// or `dir` itself.
fn journal_dir(dir: &Path) -> PathBuf {
    ["journal", "raft"].iter().map(|n| dir.join(n)).find(|d| d.is_dir()).unwrap_or_else(|| dir.to_owned())
}

/// Whether the journal in `dir` is a cluster member's Raft log.
fn is_raft(dir: &Path) -> bool {
    journal_dir(dir).join(drover_raft::record::STATE_FILE).is_file()
}

fn load(dir: &Path) -> anyhow::Result<Inspection> {
    let dir = journal_dir(dir);
    inspect(&dir, &FsStorage, &Limits::default())
        .with_context(|| format!("cannot read the journal in {}", dir.display()))
}

fn type_name(t: u8) -> &'static str {
    match t {
        0 => "RPC",
        1 => "AttachTo",
        2 => "TakeCheckpoint",
        3 => "Commit",
        4 => "ReplayFrom",
        5 => "RPCBatch",
        6 => "Ping",
        7 => "PingReturn",
        8 => "Checkpoint",
        9 => "InitialMessage",
        10 => "UpgradeTakeCheckpoint",
        11 => "TakeBecomingPrimaryCheckpoint",
        12 => "UpgradeService",
        13 => "CountReplayableRPCBatch",
        14 => "TrimTo",
        15 => "BecomingPrimary",
        _ => "unknown",
    }
}

/// A private copy of the journal in `dir` (recovery may repair a torn tail: the
/// tools never write the directory they are given).
fn copy_journal(dir: &Path) -> anyhow::Result<tempfile::TempDir> {
    let dir = journal_dir(dir);
    anyhow::ensure!(dir.is_dir(), "{} is not a journal directory", dir.display());
    let copy = tempfile::tempdir()?;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name()))
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(copy)
}

/// Recovers the controller core from a copy of the journal in `dir` (a cluster
/// member's: its snapshot and every entry in its log, the last ones perhaps not yet
/// committed).
fn recovered_state(dir: &Path) -> anyhow::Result<drover_core::FleetView> {
    let copy = copy_journal(dir)?;
    if is_raft(dir) {
        let storage: std::sync::Arc<dyn drover_journal::Storage> = std::sync::Arc::new(FsStorage);
        let r = drover_raft::machine::replay_dir(copy.path(), storage, || {
            drover_core::Controller::new(drover_core::Config::default())
        })
        .map_err(|e| anyhow::anyhow!("replaying the Raft log: {e}"))?;
        eprintln!(
            "a cluster member's Raft log: snapshot at entry {}, then {} entries up to {} (the last may not be committed yet)",
            r.snapshot_index,
            r.entries,
            r.last.map_or("none".to_owned(), |l| format!("term {} index {}", l.leader_id.term, l.index))
        );
        return Ok(r.core.fleet_view());
    }
    let config = drover_journal::JournalConfig::new(copy.path());
    let storage: std::sync::Arc<dyn drover_journal::Storage> = std::sync::Arc::new(FsStorage);
    let recovery = drover_journal::recovery::recover(&config, &storage).context("recovery failed")?;
    let (core, _) = drover_journal::replay(&recovery, || drover_core::Controller::new(drover_core::Config::default()))
        .context("replay failed")?;
    Ok(core.fleet_view())
}

/// Says on stderr when a live process holds the directory: these tools read without
/// taking the lock, so what they show may be a moment behind the writer.
fn note_live(dir: &Path) {
    let data_dir = if dir.join("journal").is_dir() { dir } else { dir.parent().unwrap_or(dir) };
    for d in [dir, data_dir] {
        if let Some(pid) = drover_journal::lock::holder(d) {
            let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            eprintln!(
                "note: {} is in use by a running process{pid}; reading it live, so the newest records may still be arriving",
                d.display()
            );
            return;
        }
    }
}

pub fn run(cmd: JournalCommand) -> anyhow::Result<ExitCode> {
    let (JournalCommand::Verify { dir, .. }
    | JournalCommand::State { dir, .. }
    | JournalCommand::Dump { dir, .. }
    | JournalCommand::WhatIf { dir, .. }) = &cmd;
    anyhow::ensure!(
        dir.is_dir(),
        "{} is not a directory (pass a data directory or a journal directory)",
        dir.display()
    );
    note_live(dir);
    match cmd {
        JournalCommand::State { dir, json } => {
            let view = recovered_state(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("{} nodes, {} pairs (state as of {} ms)", view.nodes.len(), view.pairs.len(), view.at_ms);
                for p in &view.pairs {
                    println!(
                        "{:<10} streamer {:<24} epoch {:<6} price {:<14} upstream {}",
                        p.pair,
                        p.streamer.as_deref().unwrap_or("-"),
                        p.epoch,
                        p.price.as_deref().unwrap_or("-"),
                        p.upstream_time_ms.map_or("-".to_owned(), |t| t.to_string())
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JournalCommand::WhatIf { dir, json, cluster_secret_file } => {
            if is_raft(&dir) {
                member_what_if(&dir, json, cluster_secret_file.as_deref())
            } else {
                what_if(&dir, json)
            }
        }
        JournalCommand::Verify { dir, json } => {
            let ins = load(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ins)?);
            } else {
                print_summary(&ins);
                for c in ins.checkpoints.iter().filter(|c| c.error.is_some()) {
                    println!("DAMAGED checkpoint {}: {}", c.file.display(), c.error.as_deref().unwrap_or(""));
                }
                for (file, expected) in &ins.gaps {
                    println!("GAP {}: expected the log to continue at record {expected}", file.display());
                }
                for s in &ins.segments {
                    if let Some(d) = &s.damage {
                        println!("DAMAGED ({}) {} at byte {}: {}", d.kind, s.file.display(), d.offset, d.damage);
                    }
                }
                println!("{}", if ins.damaged() { "journal is DAMAGED" } else { "journal OK" });
            }
            Ok(if ins.damaged() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        JournalCommand::Dump { dir, json } => {
            let ins = load(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ins)?);
                return Ok(ExitCode::SUCCESS);
            }
            print_summary(&ins);
            for c in &ins.checkpoints {
                match c.state_bytes {
                    Some(n) => {
                        println!("checkpoint {} covers records < {} ({n} bytes of state)", c.file.display(), c.covers)
                    }
                    None => println!("checkpoint {} DAMAGED: {}", c.file.display(), c.error.as_deref().unwrap_or("")),
                }
            }
            for s in &ins.segments {
                println!("segment {} ({} bytes, {} records)", s.file.display(), s.bytes, s.records.len());
                for r in &s.records {
                    let mut kinds: Vec<(u8, usize, usize)> = Vec::new();
                    for m in &r.messages {
                        match kinds.last_mut() {
                            Some((t, n, sz)) if *t == m.r#type => {
                                *n += 1;
                                *sz += m.size;
                            }
                            _ => kinds.push((m.r#type, 1, m.size)),
                        }
                    }
                    let kinds: Vec<String> =
                        kinds.iter().map(|(t, n, sz)| format!("{n}x {} ({sz} B)", type_name(*t))).collect();
                    println!(
                        "  seq {:>8}  offset {:>10}  length {:>8}  {}",
                        r.seq,
                        r.offset,
                        r.length,
                        kinds.join(", ")
                    );
                }
                if let Some(d) = &s.damage {
                    println!("  DAMAGED ({}) at byte {}: {}", d.kind, d.offset, d.damage);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `what-if` on a cluster member's directory: its previous snapshot (or the start of
/// its log, given the secret) replayed to its newest snapshot.
fn member_what_if(dir: &Path, json: bool, secret: Option<&Path>) -> anyhow::Result<ExitCode> {
    let copy = copy_journal(dir)?;
    let storage: std::sync::Arc<dyn drover_journal::Storage> = std::sync::Arc::new(FsStorage);
    let fresh = match secret {
        Some(path) => {
            let secret = drover_raft::secret::ClusterSecret::from_file(path)?;
            let core = drover_core::Config { seed: drover_controller::core_seed(&secret), ..Default::default() };
            Some(drover_core::Controller::new(core))
        }
        None => None,
    };
    let report = drover_raft::machine::what_if_dir(copy.path(), storage, fresh)
        .map_err(|e| anyhow::anyhow!("what-if replay of the Raft log failed: {e}"))?;
    let code = if report.diverged.is_some() { ExitCode::FAILURE } else { ExitCode::SUCCESS };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(code);
    }
    use drover_raft::machine::ReplayStart;
    match report.start {
        ReplayStart::Snapshot(i) => {
            println!("a cluster member's Raft log: replaying from the snapshot covering entries up to {i}")
        }
        ReplayStart::FirstEntry => println!("a cluster member's Raft log: replaying from the group's first entry"),
        ReplayStart::Nowhere => {
            println!("a cluster member's Raft log: no snapshot the log continues, nothing replayed")
        }
    }
    if report.first_entry_unused {
        println!(
            "the log still starts at the group's first entry: --cluster-secret-file replays it from there (the core is seeded from the secret)"
        );
    }
    for s in &report.matched {
        println!(
            "entries {} to {}: {} batches of inputs, same state as the snapshot at entry {}",
            s.first_index, s.snapshot_index, s.entries, s.snapshot_index
        );
    }
    for (index, why) in &report.skipped {
        println!("snapshot at entry {index} not compared: {why}");
    }
    match &report.diverged {
        Some((s, part)) => println!(
            "DIVERGED in entries {} to {} ({} batches of inputs): at the snapshot at entry {}, {part}",
            s.first_index, s.snapshot_index, s.entries, s.snapshot_index
        ),
        None => {
            if report.unchecked_entries > 0 {
                println!(
                    "{} batches of inputs after the newest snapshot replayed, with nothing to compare",
                    report.unchecked_entries
                );
            }
            if report.matched.is_empty() {
                println!("no snapshot to compare with: a member keeps its previous snapshot once it has taken two");
            } else {
                println!("same state at every snapshot ({} compared)", report.matched.len());
            }
        }
    }
    Ok(code)
}

fn what_if(dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let copy = copy_journal(dir)?;
    let config = drover_journal::JournalConfig::new(copy.path());
    let storage: std::sync::Arc<dyn drover_journal::Storage> = std::sync::Arc::new(FsStorage);
    let report = drover_journal::whatif::what_if(&config, &storage, || {
        drover_core::Controller::new(drover_core::Config::default())
    })
    .context("what-if replay failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("replaying from the checkpoint covering records before {}", report.start_seq);
        for i in &report.matched {
            println!(
                "records {} to {}: {} inputs, same state as the checkpoint at {}",
                i.first_seq,
                i.checkpoint_seq - 1,
                i.inputs,
                i.checkpoint_seq
            );
        }
        for (seq, why) in &report.skipped_checkpoints {
            println!("checkpoint at {seq} not compared: {why}");
        }
        match &report.diverged {
            Some(d) => println!(
                "DIVERGED in records {} to {} ({} inputs; the divergence starts at record {} or later): at the checkpoint at {}, {}",
                d.interval.first_seq,
                d.interval.checkpoint_seq - 1,
                d.interval.inputs,
                d.interval.first_seq,
                d.interval.checkpoint_seq,
                d.part
            ),
            None => {
                if report.unchecked_inputs > 0 {
                    println!(
                        "{} inputs after the newest checkpoint replayed, with nothing to compare",
                        report.unchecked_inputs
                    );
                }
                if report.matched.is_empty() {
                    println!("no later checkpoint to compare with: keep more (--keep-checkpoints) for a what-if run");
                } else {
                    println!("same state at every checkpoint ({} compared)", report.matched.len());
                }
            }
        }
    }
    Ok(if report.diverged.is_some() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn print_summary(ins: &Inspection) {
    let records: usize = ins.segments.iter().map(|s| s.records.len()).sum();
    let first = ins.segments.iter().flat_map(|s| s.records.first()).next().map(|r| r.seq);
    let last = ins.segments.iter().rev().flat_map(|s| s.records.last()).next().map(|r| r.seq);
    println!(
        "journal {}: committer id {}, {} checkpoint(s), {} segment(s), {records} record(s){}",
        ins.dir.display(),
        ins.committer_id,
        ins.checkpoints.len(),
        ins.segments.len(),
        match (first, last) {
            (Some(a), Some(b)) => format!(", sequence ids {a}..={b}"),
            _ => String::new(),
        }
    );
}
