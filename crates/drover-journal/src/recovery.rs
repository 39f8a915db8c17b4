//! Recovery: from the files in a journal directory to a checkpoint plus the entries to
//! replay after it, with the log's tail repaired.
//!
//! The newest valid checkpoint is loaded (a damaged one is reported and the previous
//! one used). Every record after it is verified: committer id, sequence id continuity
//! within and across segments, check bytes. Damage at the end of the newest segment
//! with no valid record after it is a torn tail, left by a crash mid-write: it is cut
//! off and reported. Damage anywhere else is corruption: in [`RecoveryMode::Strict`]
//! recovery refuses, naming the file and byte offset; in
//! [`RecoveryMode::TolerateCorruption`] it skips to the next valid record and reports
//! what it dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use drover_wire::ambrosia::varint;

use crate::scan::{ScannedRecord, scan_segment};
use crate::storage::Storage;
use crate::{COMMITTER_FILE, JournalConfig, JournalError, Listing, RecoveryMode, checkpoint, segment_name};

/// One logged message to replay: its record's sequence id and the message's type byte
/// and data (the size prefix stripped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayEntry {
    /// Sequence id of the record holding the message.
    pub seq: i64,
    /// Type byte followed by data.
    pub message: Bytes,
}

/// A piece of log that recovery cut off or skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The file.
    pub file: PathBuf,
    /// Where the damage starts.
    pub offset: u64,
    /// Bytes removed or skipped.
    pub bytes: u64,
    /// What was wrong.
    pub damage: String,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The checkpoint loaded, if any.
    pub checkpoint: Option<PathBuf>,
    /// Checkpoints found damaged and passed over, with the reason.
    pub rejected_checkpoints: Vec<(PathBuf, String)>,
    /// A torn tail that was truncated.
    pub torn_tail: Option<Cut>,
    /// Damage skipped in tolerate-corruption mode.
    pub dropped: Vec<Cut>,
    /// Segments read.
    pub segments: usize,
    /// Records after the checkpoint, to replay.
    pub records: u64,
}

pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    pub(crate) data: Bytes,
    pub(crate) records: Vec<ScannedRecord>,
}

/// Where the writer continues.
pub(crate) struct Tail {
    /// The segment to append to and its valid length, or `None` to start a new one.
    pub(crate) segment: Option<(PathBuf, u64)>,
}

/// The outcome of recovery: the committer id, the checkpoint, and what to replay.
pub struct Recovery {
    /// This journal's committer id.
    pub committer_id: i32,
    /// The loaded checkpoint's state, if there is one.
    pub checkpoint: Option<Bytes>,
    /// The first sequence id the checkpoint does not cover (0 without one).
    pub checkpoint_seq: i64,
    /// The sequence id the next record will get.
    pub next_seq: i64,
    /// What was found and done.
    pub report: RecoveryReport,
    pub(crate) segments: Vec<Segment>,
    pub(crate) tail: Tail,
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovery")
            .field("committer_id", &self.committer_id)
            .field("checkpoint_seq", &self.checkpoint_seq)
            .field("next_seq", &self.next_seq)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl Recovery {
    /// Every logged message after the checkpoint, in order.
    /// The whole records after the checkpoint, in order: (sequence id, payload). For
    /// users whose payloads are not drover's packed messages (the AMBROSIA coordinator
    /// logs an InitialMessage's bytes verbatim).
    pub fn records(&self) -> impl Iterator<Item = (i64, Bytes)> + '_ {
        self.segments
            .iter()
            .flat_map(|seg| seg.records.iter().map(move |rec| (rec.seq, seg.data.slice(rec.payload.clone()))))
    }

    /// The messages after the checkpoint, in order.
    pub fn entries(&self) -> impl Iterator<Item = Result<ReplayEntry, JournalError>> + '_ {
        self.segments.iter().flat_map(|seg| {
            seg.records.iter().flat_map(move |rec| Messages { seg, rec, at: rec.payload.start, failed: false })
        })
    }
}

/// The messages of one record, in order.
pub(crate) struct Messages<'a> {
    pub(crate) seg: &'a Segment,
    pub(crate) rec: &'a ScannedRecord,
    pub(crate) at: usize,
    pub(crate) failed: bool,
}

impl Iterator for Messages<'_> {
    type Item = Result<ReplayEntry, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.rec.payload.end {
            return None;
        }
        let bytes = &self.seg.data[self.at..self.rec.payload.end];
        let parsed = match varint::get_int(bytes) {
            Ok(Some((size, n))) if size > 0 && n + size as usize <= bytes.len() => Some((n, size as usize)),
            _ => None,
        };
        let Some((n, size)) = parsed else {
            self.failed = true;
            // The record's check bytes matched, so the writer itself framed this badly.
            return Some(Err(JournalError::Corrupt {
                file: self.seg.path.clone(),
                offset: self.at as u64,
                damage: "malformed message inside a verified record".into(),
            }));
        };
        let start = self.at + n;
        self.at = start + size;
        Some(Ok(ReplayEntry { seq: self.rec.seq, message: self.seg.data.slice(start..start + size) }))
    }
}

fn read_committer(storage: &dyn Storage, dir: &Path, exists: bool, has_files: bool) -> Result<i32, JournalError> {
    let path = dir.join(COMMITTER_FILE);
    if exists {
        let raw = storage.read(&path).map_err(|e| JournalError::io("read", &path, e))?;
        return std::str::from_utf8(&raw).ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
            JournalError::Corrupt { file: path.clone(), offset: 0, damage: "committer id is not a number".into() }
        });
    }
    if has_files {
        return Err(JournalError::Corrupt {
            file: path,
            offset: 0,
            damage: "missing, but the directory holds segments or checkpoints".into(),
        });
    }
    // A fresh journal: pick a committer id once. It only has to differ between
    // instances, so the standard library's randomly keyed hasher is enough.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    let id = (h.finish() as i32) & i32::MAX;
    storage.write_atomic(&path, id.to_string().as_bytes()).map_err(|e| JournalError::io("write", &path, e))?;
    Ok(id)
}

/// Recovers the journal in `config.dir`, repairing a torn tail.
pub fn recover(config: &JournalConfig, storage: &Arc<dyn Storage>) -> Result<Recovery, JournalError> {
    recover_from(config, storage, Start::NewestCheckpoint)
}

/// Which checkpoint recovery starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The newest valid one (what a restart does).
    NewestCheckpoint,
    /// The oldest valid one, so every later checkpoint can be compared with a replay
    /// (an upgrade what-if run).
    OldestCheckpoint,
    /// Exactly the checkpoint covering the records before this sequence id; without it
    /// (missing or damaged) there is no checkpoint and replay starts at the log's start.
    At(i64),
}

/// Reads the journal in `config.dir` from the checkpoint `start` names without
/// changing anything: no directory or committer file is created and a torn tail is
/// reported (in `report.torn_tail`) but left in place, so a writer may be appending to
/// the same directory meanwhile (its newest, half-written record reads as a torn
/// tail). For debug and repro runs over a live log.
pub fn read_only(config: &JournalConfig, storage: &Arc<dyn Storage>, start: Start) -> Result<Recovery, JournalError> {
    recover_impl(config, storage, start, false)
}

/// Recovers the journal in `config.dir` from the checkpoint `start` names, repairing
/// a torn tail.
pub fn recover_from(
    config: &JournalConfig,
    storage: &Arc<dyn Storage>,
    start: Start,
) -> Result<Recovery, JournalError> {
    recover_impl(config, storage, start, true)
}

fn recover_impl(
    config: &JournalConfig,
    storage: &Arc<dyn Storage>,
    start: Start,
    repair: bool,
) -> Result<Recovery, JournalError> {
    let dir = &config.dir;
    if repair {
        storage.create_dir_all(dir).map_err(|e| JournalError::io("create", dir, e))?;
    }
    let Listing { segments: segment_seqs, checkpoints: mut checkpoint_seqs, committer } =
        Listing::read(storage.as_ref(), dir)?;
    let has_files = !segment_seqs.is_empty() || !checkpoint_seqs.is_empty();
    // Tried in this order: newest first, unless asked for the oldest or one.
    match start {
        Start::NewestCheckpoint => checkpoint_seqs.reverse(),
        Start::OldestCheckpoint => {}
        Start::At(seq) => checkpoint_seqs.retain(|&s| s == seq),
    }
    if !repair && !committer {
        let path = dir.join(COMMITTER_FILE);
        return Err(JournalError::io("read", &path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    let committer_id = read_committer(storage.as_ref(), dir, committer, has_files)?;

    let mut report = RecoveryReport::default();
    let mut loaded = None;
    for seq in checkpoint_seqs {
        let path = dir.join(crate::checkpoint_name(seq));
        let outcome = storage
            .read(&path)
            .map_err(|e| e.to_string())
            .and_then(|raw| checkpoint::decode(&raw, committer_id, &config.limits))
            .and_then(|(covered, state)| {
                if covered == seq { Ok(state) } else { Err(format!("covers {covered}, but is named for {seq}")) }
            });
        match outcome {
            Ok(state) => {
                report.checkpoint = Some(path);
                loaded = Some((seq, state));
                break;
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "checkpoint damaged; trying an older one");
                report.rejected_checkpoints.push((path, reason));
            }
        }
    }
    let checkpoint_seq = loaded.as_ref().map_or(0, |(s, _)| *s);

    // Segments wholly before the checkpoint need not be read.
    let first_needed = segment_seqs.iter().rposition(|&s| s <= checkpoint_seq).unwrap_or(0);
    let to_read = &segment_seqs[first_needed.min(segment_seqs.len())..];
    if let Some(&first) = to_read.first()
        && first > checkpoint_seq
    {
        let file = dir.join(segment_name(first));
        let damage =
            format!("log starts at record {first}, but the checkpoint covers only records before {checkpoint_seq}");
        if config.recovery == RecoveryMode::Strict {
            return Err(JournalError::Corrupt { file, offset: 0, damage });
        }
        report.dropped.push(Cut { file, offset: 0, bytes: 0, damage });
    }

    let mut segments = Vec::new();
    let mut expect = to_read.first().copied().unwrap_or(checkpoint_seq);
    let mut tail = Tail { segment: None };
    for (i, &first) in to_read.iter().enumerate() {
        let last_segment = i + 1 == to_read.len();
        let path = dir.join(segment_name(first));
        if first != expect {
            let damage = format!("segment starts at record {first}, but the previous one ends before {expect}");
            if config.recovery == RecoveryMode::Strict {
                return Err(JournalError::Corrupt { file: path, offset: 0, damage });
            }
            report.dropped.push(Cut { file: path.clone(), offset: 0, bytes: 0, damage });
            expect = first;
        }
        let data = Bytes::from(storage.read(&path).map_err(|e| JournalError::io("read", &path, e))?);
        let mut records = Vec::new();
        let mut offset = 0usize;
        let valid_len = loop {
            let scan = scan_segment(&data[offset..], committer_id, expect, &config.limits);
            records.extend(scan.records.into_iter().map(|mut r| {
                r.offset += offset;
                r.payload = r.payload.start + offset..r.payload.end + offset;
                r
            }));
            expect = records.last().map_or(expect, |r| r.seq + 1);
            let Some(found) = scan.damage else { break data.len() };
            let at = offset + found.offset;
            let resync = found.resync.map(|(o, seq)| (o + offset, seq));
            if resync.is_none() && last_segment {
                let cut = Cut {
                    file: path.clone(),
                    offset: at as u64,
                    bytes: (data.len() - at) as u64,
                    damage: found.damage.to_string(),
                };
                if repair {
                    tracing::warn!(file = %path.display(), offset = at, bytes = cut.bytes, damage = %cut.damage,
                        "torn tail after a crash; truncating");
                    storage.truncate(&path, at as u64).map_err(|e| JournalError::io("truncate", &path, e))?;
                }
                report.torn_tail = Some(cut);
                break at;
            }
            if config.recovery == RecoveryMode::Strict {
                return Err(JournalError::Corrupt { file: path, offset: at as u64, damage: found.damage.to_string() });
            }
            let until = resync.map_or(data.len(), |(o, _)| o);
            tracing::warn!(file = %path.display(), offset = at, bytes = until - at, damage = %found.damage,
                "skipping damaged log (tolerate-corruption)");
            report.dropped.push(Cut {
                file: path.clone(),
                offset: at as u64,
                bytes: (until - at) as u64,
                damage: found.damage.to_string(),
            });
            match resync {
                Some((o, seq)) => {
                    offset = o;
                    expect = seq;
                }
                None => break data.len(),
            }
        };
        if last_segment && valid_len as u64 <= config.segment_bytes && report.dropped.is_empty() {
            tail.segment = Some((path.clone(), valid_len as u64));
        }
        records.retain(|r| r.seq >= checkpoint_seq);
        report.records += records.len() as u64;
        segments.push(Segment { path, data, records });
    }
    report.segments = segments.len();
    let next_seq = expect.max(checkpoint_seq);
    if expect < checkpoint_seq {
        // The checkpoint covers records the log no longer has; continue in a fresh
        // segment so sequence ids stay contiguous within every file.
        tail.segment = None;
    }
    Ok(Recovery { committer_id, checkpoint: loaded.map(|(_, s)| s), checkpoint_seq, next_seq, report, segments, tail })
}
