//! Read-only inspection of a journal directory, for `drover journal verify` and
//! `drover journal dump`. Unlike recovery, it changes nothing: a torn tail is reported
//! (recovery would truncate it), not repaired.

use std::path::{Path, PathBuf};

use drover_wire::ambrosia::{Limits, varint};
use serde::Serialize;

use crate::scan::scan_segment;
use crate::storage::Storage;
use crate::{COMMITTER_FILE, JournalError, Listing, checkpoint};

/// One message inside a record.
#[derive(Clone, Debug, Serialize)]
pub struct MessageInfo {
    /// The type byte.
    pub r#type: u8,
    /// Bytes of type + data.
    pub size: usize,
}

/// One record.
#[derive(Clone, Debug, Serialize)]
pub struct RecordInfo {
    /// Byte offset of the header.
    pub offset: usize,
    /// Sequence id.
    pub seq: i64,
    /// Total length, header included.
    pub length: usize,
    /// The messages it holds.
    pub messages: Vec<MessageInfo>,
}

/// Damage in a segment.
#[derive(Clone, Debug, Serialize)]
pub struct DamageInfo {
    /// Byte offset where it starts.
    pub offset: usize,
    /// What is wrong.
    pub damage: String,
    /// `torn-tail` (recovery truncates it) or `corruption` (recovery refuses).
    pub kind: &'static str,
}

/// One segment file.
#[derive(Clone, Debug, Serialize)]
pub struct SegmentInfo {
    /// The file.
    pub file: PathBuf,
    /// Sequence id its name says it starts at.
    pub first_seq: i64,
    /// File size.
    pub bytes: usize,
    /// Whole records, in order (up to any damage).
    pub records: Vec<RecordInfo>,
    /// Damage, if any.
    pub damage: Option<DamageInfo>,
}

/// One checkpoint file.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointInfo {
    /// The file.
    pub file: PathBuf,
    /// The sequence id its name says it covers up to.
    pub covers: i64,
    /// Size of the state, if the file is whole.
    pub state_bytes: Option<usize>,
    /// Why it is unusable, if it is.
    pub error: Option<String>,
}

/// Everything found in a journal directory.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    /// The directory.
    pub dir: PathBuf,
    /// Its committer id.
    pub committer_id: i32,
    /// Checkpoints, oldest first.
    pub checkpoints: Vec<CheckpointInfo>,
    /// Segments, oldest first.
    pub segments: Vec<SegmentInfo>,
    /// Gaps between segments: (file, expected first seq).
    pub gaps: Vec<(PathBuf, i64)>,
}

impl Inspection {
    /// Whether anything is damaged: a checkpoint, a segment, or a gap.
    pub fn damaged(&self) -> bool {
        !self.gaps.is_empty()
            || self.checkpoints.iter().any(|c| c.error.is_some())
            || self.segments.iter().any(|s| s.damage.is_some())
    }
}

fn messages(payload: &[u8]) -> Vec<MessageInfo> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        match varint::get_int(&payload[at..]) {
            Ok(Some((size, n))) if size > 0 && at + n + size as usize <= payload.len() => {
                out.push(MessageInfo { r#type: payload[at + n], size: size as usize });
                at += n + size as usize;
            }
            _ => break,
        }
    }
    out
}

/// Inspects the journal in `dir` without changing it.
pub fn inspect(dir: &Path, storage: &dyn Storage, limits: &Limits) -> Result<Inspection, JournalError> {
    let listing = Listing::read(storage, dir)?;
    let committer_path = dir.join(COMMITTER_FILE);
    let raw = storage.read(&committer_path).map_err(|e| JournalError::io("read", &committer_path, e))?;
    let committer_id: i32 = std::str::from_utf8(&raw).ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
        JournalError::Corrupt { file: committer_path.clone(), offset: 0, damage: "committer id is not a number".into() }
    })?;

    let checkpoints = listing
        .checkpoints
        .into_iter()
        .map(|covers| {
            let file = dir.join(crate::checkpoint_name(covers));
            let result = storage
                .read(&file)
                .map_err(|e| e.to_string())
                .and_then(|raw| checkpoint::decode(&raw, committer_id, limits))
                .and_then(|(c, s)| if c == covers { Ok(s.len()) } else { Err(format!("covers {c}, named {covers}")) });
            CheckpointInfo { file, covers, state_bytes: result.as_ref().ok().copied(), error: result.err() }
        })
        .collect();

    let segs = listing.segments;
    let mut segments = Vec::new();
    let mut gaps = Vec::new();
    let mut expect: Option<i64> = None;
    for (i, &first) in segs.iter().enumerate() {
        let file = dir.join(crate::segment_name(first));
        if let Some(e) = expect
            && e != first
        {
            gaps.push((file.clone(), e));
        }
        let data = storage.read(&file).map_err(|e| JournalError::io("read", &file, e))?;
        let scan = scan_segment(&data, committer_id, first, limits);
        let records: Vec<RecordInfo> = scan
            .records
            .iter()
            .map(|r| RecordInfo {
                offset: r.offset,
                seq: r.seq,
                length: r.payload.end - r.offset,
                messages: messages(&data[r.payload.clone()]),
            })
            .collect();
        expect = Some(records.last().map_or(first, |r| r.seq + 1));
        let last = i + 1 == segs.len();
        let damage = scan.damage.map(|f| DamageInfo {
            offset: f.offset,
            damage: f.damage.to_string(),
            kind: if last && f.resync.is_none() { "torn-tail" } else { "corruption" },
        });
        segments.push(SegmentInfo { file, first_seq: first, bytes: data.len(), records, damage });
    }
    Ok(Inspection { dir: dir.to_owned(), committer_id, checkpoints, segments, gaps })
}
