//! Pure scanning of one segment's bytes: which whole records it holds, and where and
//! how it is damaged, if it is.
//!
//! Recovery decides what damage means: at the very end of the newest segment with no
//! valid record after it, it is a torn tail (a crash mid-write) and is cut off; anywhere
//! else it is corruption, and the journal refuses to start.

use std::fmt;
use std::ops::Range;

use drover_wire::ambrosia::{HEADER_LEN, Limits, RecordHeader, check_bytes};

/// A whole, verified record inside a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    /// Its sequence id.
    pub seq: i64,
    /// Byte offset of its header in the segment.
    pub offset: usize,
    /// Byte range of its payload in the segment.
    pub payload: Range<usize>,
}

/// Why the bytes at some offset are not the expected record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// Fewer than 24 bytes left.
    ShortHeader {
        /// Bytes left.
        left: usize,
    },
    /// The length field is below 24 or above the limit.
    BadLength {
        /// The length field.
        length: i64,
    },
    /// The record runs past the end of the file.
    ShortPayload {
        /// The record's length field.
        length: usize,
        /// Bytes left in the file.
        left: usize,
    },
    /// The payload does not hash to the check bytes.
    CheckBytes {
        /// The record's sequence id field.
        seq: i64,
    },
    /// The record belongs to another committer.
    CommitterId {
        /// The id found.
        found: i32,
    },
    /// The sequence id does not follow the previous record's.
    Sequence {
        /// The id expected.
        expected: i64,
        /// The id found.
        found: i64,
    },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::ShortHeader { left } => write!(f, "short record header ({left} of {HEADER_LEN} bytes)"),
            Damage::BadLength { length } => write!(f, "impossible record length {length}"),
            Damage::ShortPayload { length, left } => write!(f, "record of {length} bytes but only {left} left"),
            Damage::CheckBytes { seq } => write!(f, "check bytes do not match the payload of record {seq}"),
            Damage::CommitterId { found } => write!(f, "record of another committer ({found})"),
            Damage::Sequence { expected, found } => write!(f, "sequence id {found} where {expected} was expected"),
        }
    }
}

/// Damage found by a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Offset of the first damaged byte (the start of the bad record).
    pub offset: usize,
    /// What is wrong there.
    pub damage: Damage,
    /// The next offset at which a whole valid record of this committer starts, if any:
    /// damage followed by valid records is corruption, not a torn tail.
    pub resync: Option<(usize, i64)>,
}

/// The result of scanning a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scan {
    /// The whole, verified records before any damage, in order.
    pub records: Vec<ScannedRecord>,
    /// Bytes up to the end of the last whole record.
    pub valid_len: usize,
    /// The first damage, if any.
    pub damage: Option<Found>,
}

/// The header at `at` if a whole record of `committer` with matching check bytes
/// starts there.
fn valid_record_at(bytes: &[u8], at: usize, committer: i32, limits: &Limits) -> Result<RecordHeader, Damage> {
    let rest = &bytes[at..];
    let Some(head) = rest.first_chunk::<HEADER_LEN>() else {
        return Err(Damage::ShortHeader { left: rest.len() });
    };
    let header = RecordHeader::parse(head);
    if header.committer_id != committer {
        return Err(Damage::CommitterId { found: header.committer_id });
    }
    let len = header.payload_len(limits).map_err(|_| Damage::BadLength { length: header.length.into() })?;
    let Some(payload) = rest.get(HEADER_LEN..HEADER_LEN + len) else {
        return Err(Damage::ShortPayload { length: HEADER_LEN + len, left: rest.len() });
    };
    if check_bytes(payload) != header.check {
        return Err(Damage::CheckBytes { seq: header.seq });
    }
    Ok(header)
}

/// The first offset after `from` where a valid logged record (sequence id ≥ 0) starts.
pub fn find_valid_record(bytes: &[u8], from: usize, committer: i32, limits: &Limits) -> Option<(usize, i64)> {
    let needle = committer.to_le_bytes();
    let mut at = from;
    while at + HEADER_LEN <= bytes.len() {
        let hit = memchr_committer(&bytes[at..], &needle)?;
        let pos = at + hit;
        if let Ok(h) = valid_record_at(bytes, pos, committer, limits)
            && h.seq >= 0
        {
            return Some((pos, h.seq));
        }
        at = pos + 1;
    }
    None
}

fn memchr_committer(hay: &[u8], needle: &[u8; 4]) -> Option<usize> {
    hay.windows(4).position(|w| w == needle)
}

/// Scans a segment whose first record should have sequence id `first_seq`.
pub fn scan_segment(bytes: &[u8], committer: i32, first_seq: i64, limits: &Limits) -> Scan {
    let mut records = Vec::new();
    let mut at = 0;
    let mut expect = first_seq;
    while at < bytes.len() {
        let damage = match valid_record_at(bytes, at, committer, limits) {
            Ok(h) if h.seq == expect => {
                let end = at + h.length as usize;
                records.push(ScannedRecord { seq: h.seq, offset: at, payload: at + HEADER_LEN..end });
                at = end;
                expect += 1;
                continue;
            }
            Ok(h) => Damage::Sequence { expected: expect, found: h.seq },
            Err(d) => d,
        };
        let resync = find_valid_record(bytes, at + 1, committer, limits);
        return Scan { records, valid_len: at, damage: Some(Found { offset: at, damage, resync }) };
    }
    Scan { records, valid_len: at, damage: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_wire::ambrosia::Record;

    fn segment(n: i64) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut offsets = Vec::new();
        for seq in 0..n {
            offsets.push(bytes.len());
            Record::new(7, seq, vec![0x02, 0x02, seq as u8]).encode(&mut bytes);
        }
        (bytes, offsets)
    }

    #[test]
    fn clean_segment() {
        let (bytes, _) = segment(5);
        let s = scan_segment(&bytes, 7, 0, &Limits::default());
        assert_eq!(s.records.len(), 5);
        assert_eq!(s.valid_len, bytes.len());
        assert_eq!(s.damage, None);
    }

    #[test]
    fn every_cut_of_the_last_record_is_a_torn_tail() {
        let (bytes, offsets) = segment(4);
        let last = offsets[3];
        for cut in last + 1..bytes.len() {
            let s = scan_segment(&bytes[..cut], 7, 0, &Limits::default());
            assert_eq!(s.records.len(), 3, "cut {cut}");
            assert_eq!(s.valid_len, last);
            let found = s.damage.expect("damage");
            assert_eq!(found.offset, last);
            assert_eq!(found.resync, None, "a torn tail has nothing valid after it");
        }
    }

    #[test]
    fn flipped_bit_in_the_middle_is_followed_by_valid_records() {
        let (mut bytes, offsets) = segment(5);
        bytes[offsets[2] + HEADER_LEN] ^= 0x10;
        let s = scan_segment(&bytes, 7, 0, &Limits::default());
        assert_eq!(s.records.len(), 2);
        let found = s.damage.unwrap();
        assert_eq!(found.offset, offsets[2]);
        assert_eq!(found.damage, Damage::CheckBytes { seq: 2 });
        assert_eq!(found.resync, Some((offsets[3], 3)));
    }

    #[test]
    fn wrong_first_sequence_is_damage() {
        let (bytes, _) = segment(2);
        let s = scan_segment(&bytes, 7, 5, &Limits::default());
        assert_eq!(s.damage.unwrap().damage, Damage::Sequence { expected: 5, found: 0 });
    }

    #[test]
    fn other_committer_is_damage() {
        let (bytes, _) = segment(2);
        let s = scan_segment(&bytes, 8, 0, &Limits::default());
        assert!(matches!(s.damage.unwrap().damage, Damage::CommitterId { found: 7 }));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) {
            let s = scan_segment(&bytes, 7, 0, &Limits::default());
            proptest::prop_assert!(s.valid_len <= bytes.len());
        }
    }
}
