//! The AMBROSIA log record: a 24-byte header (committer id, total length, XXH64 check
//! bytes over the payload, sequence id), then messages packed back to back.
//!
//! Sequence id -1 marks an unlogged control record holding one data-less message;
//! -2 announces a checkpoint (check bytes 0) whose raw bytes follow on the stream.

use bytes::{Buf, BufMut, Bytes};

use super::message::{Direction, Message};
use super::{Limits, WireError};

/// Size of the record header.
pub const HEADER_LEN: usize = 24;
/// Sequence id of an unlogged control record.
pub const SEQ_CONTROL: i64 = -1;
/// Sequence id of a checkpoint announcement.
pub const SEQ_CHECKPOINT: i64 = -2;

/// XXH64 with seed 0 over a record's payload.
pub fn check_bytes(payload: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(payload, 0)
}

/// The fixed 24-byte record header, all fields little-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecordHeader {
    /// Chosen once per instance; another id marks the end of the log during replay.
    pub committer_id: i32,
    /// Total record length, header included.
    pub length: i32,
    /// XXH64 (seed 0) of the payload; 0 on a checkpoint announcement.
    pub check: u64,
    /// 0, 1, 2 … for logged records; -1 control; -2 checkpoint announcement.
    pub seq: i64,
}

impl RecordHeader {
    /// Reads a header from its 24 bytes.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Self {
        let mut b: &[u8] = bytes;
        RecordHeader {
            committer_id: b.get_i32_le(),
            length: b.get_i32_le(),
            check: b.get_u64_le(),
            seq: b.get_i64_le(),
        }
    }

    /// Appends the header's 24 bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_i32_le(self.committer_id);
        out.put_i32_le(self.length);
        out.put_u64_le(self.check);
        out.put_i64_le(self.seq);
    }

    /// The payload length the header announces, if it is within limits.
    pub fn payload_len(&self, limits: &Limits) -> Result<usize, WireError> {
        let length = i64::from(self.length);
        if length < HEADER_LEN as i64 || length > limits.max_record as i64 {
            return Err(WireError::RecordLength { length, min: HEADER_LEN, max: limits.max_record });
        }
        Ok(self.length as usize - HEADER_LEN)
    }
}

/// A whole record: header and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The header.
    pub header: RecordHeader,
    /// The messages, packed.
    pub payload: Bytes,
}

impl Record {
    /// A record with the given sequence id; length and check bytes are computed.
    pub fn new(committer_id: i32, seq: i64, payload: impl Into<Bytes>) -> Self {
        let payload = payload.into();
        let length = i32::try_from(HEADER_LEN + payload.len()).unwrap_or(i32::MAX);
        Record { header: RecordHeader { committer_id, length, check: check_bytes(&payload), seq }, payload }
    }

    /// A control record (sequence id -1) holding one message.
    pub fn control(committer_id: i32, msg: &Message) -> Self {
        Record::new(committer_id, SEQ_CONTROL, msg.to_bytes())
    }

    /// The record (sequence id -2, check bytes 0) that announces `len` checkpoint bytes.
    pub fn checkpoint_announcement(committer_id: i32, len: u64) -> Self {
        let mut r =
            Record::new(committer_id, SEQ_CHECKPOINT, Message::Checkpoint { len, fixed_length: false }.to_bytes());
        r.header.check = 0;
        r
    }

    /// Appends header and payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.header.encode(out);
        out.extend_from_slice(&self.payload);
    }

    /// The encoded record as a fresh vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        self.encode(&mut out);
        out
    }

    /// Checks the check bytes (checkpoint announcements carry none).
    pub fn verify(&self) -> Result<(), WireError> {
        if self.header.seq == SEQ_CHECKPOINT {
            return Ok(());
        }
        let computed = check_bytes(&self.payload);
        if computed != self.header.check {
            return Err(WireError::CheckBytes { seq: self.header.seq, found: self.header.check, computed });
        }
        Ok(())
    }

    /// Decodes one verified record from the front of `input`, or `None` if `input`
    /// ends first.
    pub fn decode(input: &[u8], limits: &Limits) -> Result<Option<(Record, usize)>, WireError> {
        let Some(head) = input.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = RecordHeader::parse(head);
        let len = header.payload_len(limits)?;
        let Some(payload) = input.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let record = Record { header, payload: Bytes::copy_from_slice(payload) };
        record.verify()?;
        Ok(Some((record, HEADER_LEN + len)))
    }

    /// The messages the payload holds, in order.
    pub fn messages(&self, dir: Direction, limits: &Limits) -> Result<Vec<Message>, WireError> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < self.payload.len() {
            match Message::decode(&self.payload[at..], dir, limits)? {
                Some((msg, n)) => {
                    out.push(msg);
                    at += n;
                }
                None => return Err(WireError::Truncated { what: "message in record" }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn check_byte_vectors() {
        assert_eq!(check_bytes(&[0x02, 0x0B]), 0xDA2D_84CB_C279_F1C7);
        assert_eq!(check_bytes(&[0x02, 0x02]), 0xF833_905A_897B_74FB);
        assert_eq!(check_bytes(&[]), 0xEF46_DB37_51D8_E999);
    }

    #[test]
    fn first_start_record_vector() {
        let record = Record::control(0x1234_5678, &Message::TakeBecomingPrimaryCheckpoint);
        let expected = [
            0x78, 0x56, 0x34, 0x12, 0x1A, 0x00, 0x00, 0x00, 0xC7, 0xF1, 0x79, 0xC2, 0xCB, 0x84, 0x2D, 0xDA, 0xFF, 0xFF,
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02, 0x0B,
        ];
        assert_eq!(record.to_bytes(), expected);
        let (back, n) = Record::decode(&expected, &Limits::default()).unwrap().unwrap();
        assert_eq!(n, 26);
        assert_eq!(back, record);
        assert_eq!(
            back.messages(Direction::ToApplication, &Limits::default()).unwrap(),
            [Message::TakeBecomingPrimaryCheckpoint]
        );
    }

    #[test]
    fn app_take_checkpoint_becomes_control_record() {
        let record = Record::control(7, &Message::TakeCheckpoint);
        assert_eq!(record.header.seq, -1);
        assert_eq!(&record.payload[..], [0x02, 0x02]);
        assert_eq!(record.header.check, 0xF833_905A_897B_74FB);
    }

    #[test]
    fn checkpoint_announcement_has_zero_check_bytes() {
        let r = Record::checkpoint_announcement(1, 100);
        assert_eq!(r.header.check, 0);
        assert_eq!(r.header.seq, SEQ_CHECKPOINT);
        let (back, _) = Record::decode(&r.to_bytes(), &Limits::default()).unwrap().unwrap();
        assert_eq!(
            back.messages(Direction::ToApplication, &Limits::default()).unwrap(),
            [Message::Checkpoint { len: 100, fixed_length: false }]
        );
    }

    #[test]
    fn damaged_records_are_typed_errors() {
        let mut bytes = Record::new(1, 0, vec![0x02, 0x02]).to_bytes();
        bytes[25] ^= 1;
        assert!(matches!(Record::decode(&bytes, &Limits::default()), Err(WireError::CheckBytes { seq: 0, .. })));
        let mut short = Record::new(1, 0, vec![]).to_bytes();
        short[4] = 3; // length 3 < 24
        assert!(matches!(Record::decode(&short, &Limits::default()), Err(WireError::RecordLength { .. })));
        let mut huge = Record::new(1, 0, vec![]).to_bytes();
        huge[4..8].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(matches!(Record::decode(&huge, &Limits::default()), Err(WireError::RecordLength { .. })));
    }

    #[test]
    fn truncated_message_inside_record() {
        let r = Record::new(1, 0, vec![0x0A, 0x09, 0x01]);
        assert!(matches!(r.messages(Direction::ToApplication, &Limits::default()), Err(WireError::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn records_round_trip(committer: i32, seq in 0i64.., payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let r = Record::new(committer, seq, payload);
            let bytes = r.to_bytes();
            for cut in 0..bytes.len() {
                prop_assert_eq!(Record::decode(&bytes[..cut], &Limits::default()).unwrap(), None);
            }
            prop_assert_eq!(Record::decode(&bytes, &Limits::default()).unwrap(), Some((r, bytes.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) {
            if let Ok(Some((r, _))) = Record::decode(&bytes, &Limits::default()) {
                let _ = r.messages(Direction::ToApplication, &Limits::default());
                let _ = r.messages(Direction::ToCoordinator, &Limits::default());
            }
        }
    }
}
