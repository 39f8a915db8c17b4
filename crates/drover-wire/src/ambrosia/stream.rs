//! Incremental readers for AMBROSIA byte streams.
//!
//! [`MessageReader`] reads bare messages (what an application sends its coordinator);
//! [`RecordReader`] reads log records (what a coordinator sends its application). Both
//! are fed bytes exactly as they arrive, split anywhere, and both pass through the raw
//! checkpoint bytes that follow a `Checkpoint` message (or a sequence id -2 record) as
//! [`Frame::CheckpointData`] / [`RecordEvent::CheckpointData`] chunks, so a checkpoint
//! never has to fit in memory at once.

use bytes::{Buf, Bytes, BytesMut};

use super::message::{Direction, Message};
use super::record::{HEADER_LEN, Record, RecordHeader, SEQ_CHECKPOINT};
use super::varint;
use super::{Limits, WireError};

/// What a [`MessageReader`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A whole message.
    Message(Message),
    /// Raw checkpoint bytes following a `Checkpoint` message.
    CheckpointData {
        /// This chunk.
        data: Bytes,
        /// Checkpoint bytes still to come after this chunk.
        remaining: u64,
    },
}

/// Reads a stream of bare messages.
#[derive(Debug)]
pub struct MessageReader {
    buf: BytesMut,
    dir: Direction,
    limits: Limits,
    checkpoint_left: u64,
}

impl MessageReader {
    /// A reader for messages travelling in `dir`.
    pub fn new(dir: Direction, limits: Limits) -> Self {
        MessageReader { buf: BytesMut::new(), dir, limits, checkpoint_left: 0 }
    }

    /// Adds bytes as they arrived.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held that do not form a whole frame yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether the reader sits between whole messages (not inside one, not inside
    /// checkpoint data): an EOF here is clean.
    pub fn at_boundary(&self) -> bool {
        self.buf.is_empty() && self.checkpoint_left == 0
    }

    /// The next whole frame, or `None` until more bytes arrive.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.checkpoint_left > 0 {
            return Ok(take_checkpoint_chunk(&mut self.buf, &mut self.checkpoint_left)
                .map(|(data, remaining)| Frame::CheckpointData { data, remaining }));
        }
        let Some((size, n)) = varint::get_int(&self.buf)? else {
            return Ok(None);
        };
        if size < 1 || size as usize > self.limits.max_message {
            return Err(if size == 0 {
                WireError::EmptyMessage
            } else {
                WireError::MessageSize { size: size.into(), max: self.limits.max_message }
            });
        }
        let size = size as usize;
        if self.buf.len() < n + size {
            self.buf.reserve(n + size - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(n);
        let body = self.buf.split_to(size).freeze();
        let msg = Message::parse_body(body, self.dir, &self.limits)?;
        if let Message::Checkpoint { len, .. } = msg {
            self.checkpoint_left = len;
        }
        Ok(Some(Frame::Message(msg)))
    }
}

fn take_checkpoint_chunk(buf: &mut BytesMut, left: &mut u64) -> Option<(Bytes, u64)> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
    *left -= n as u64;
    Some((buf.split_to(n).freeze(), *left))
}

/// What a [`RecordReader`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordEvent {
    /// A whole, verified record.
    Record(Record),
    /// Raw checkpoint bytes following a checkpoint announcement record.
    CheckpointData {
        /// This chunk.
        data: Bytes,
        /// Checkpoint bytes still to come after this chunk.
        remaining: u64,
    },
}

/// Reads a stream of log records.
#[derive(Debug)]
pub struct RecordReader {
    buf: BytesMut,
    limits: Limits,
    checkpoint_left: u64,
}

impl RecordReader {
    /// A reader with the given limits.
    pub fn new(limits: Limits) -> Self {
        RecordReader { buf: BytesMut::new(), limits, checkpoint_left: 0 }
    }

    /// Adds bytes as they arrived.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether the reader sits between whole records: an EOF here is clean.
    pub fn at_boundary(&self) -> bool {
        self.buf.is_empty() && self.checkpoint_left == 0
    }

    /// The next record or checkpoint chunk, or `None` until more bytes arrive.
    pub fn next_event(&mut self) -> Result<Option<RecordEvent>, WireError> {
        if self.checkpoint_left > 0 {
            return Ok(take_checkpoint_chunk(&mut self.buf, &mut self.checkpoint_left)
                .map(|(data, remaining)| RecordEvent::CheckpointData { data, remaining }));
        }
        let Some(head) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = RecordHeader::parse(head);
        let len = header.payload_len(&self.limits)?;
        if self.buf.len() < HEADER_LEN + len {
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let record = Record { header, payload: self.buf.split_to(len).freeze() };
        record.verify()?;
        if header.seq == SEQ_CHECKPOINT {
            match record.messages(Direction::ToApplication, &self.limits)?.as_slice() {
                [Message::Checkpoint { len, .. }] => self.checkpoint_left = *len,
                _ => return Err(WireError::BadCheckpointRecord),
            }
        }
        Ok(Some(RecordEvent::Record(record)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ambrosia::message::{Rpc, RpcBody, RpcKind, RpcType};
    use proptest::prelude::*;

    fn drain_messages(r: &mut MessageReader, out: &mut Vec<Frame>) {
        while let Some(f) = r.next_frame().unwrap() {
            out.push(f);
        }
    }

    /// Joins adjacent checkpoint chunks so that any split gives the same frames.
    fn normalize(frames: Vec<Frame>) -> Vec<Frame> {
        let mut out: Vec<Frame> = Vec::new();
        for f in frames {
            if let (
                Some(Frame::CheckpointData { data: prev, remaining: prev_rem }),
                Frame::CheckpointData { data, remaining },
            ) = (out.last_mut(), &f)
            {
                let mut joined = prev.to_vec();
                joined.extend_from_slice(data);
                *prev = joined.into();
                *prev_rem = *remaining;
                continue;
            }
            out.push(f);
        }
        out
    }

    fn sample_stream() -> (Vec<u8>, Vec<Frame>) {
        let rpc = Message::Rpc(Rpc::outgoing("", RpcBody::new(RpcKind::Call, 32, RpcType::FireAndForget, &[5, 4, 3])));
        let mut bytes = Vec::new();
        let mut frames = Vec::new();
        for m in [Message::InitialMessage(Bytes::from_static(b"hi")), rpc.clone()] {
            m.encode(&mut bytes);
            frames.push(Frame::Message(m));
        }
        let cp = Message::Checkpoint { len: 5, fixed_length: true };
        cp.encode(&mut bytes);
        bytes.extend_from_slice(b"state");
        frames.push(Frame::Message(cp));
        frames.push(Frame::CheckpointData { data: Bytes::from_static(b"state"), remaining: 0 });
        rpc.encode(&mut bytes);
        frames.push(Frame::Message(rpc));
        (bytes, frames)
    }

    #[test]
    fn message_stream_with_checkpoint_in_one_read() {
        let (bytes, frames) = sample_stream();
        let mut r = MessageReader::new(Direction::ToCoordinator, Limits::default());
        r.feed(&bytes);
        let mut out = Vec::new();
        drain_messages(&mut r, &mut out);
        assert_eq!(out, frames);
        assert!(r.at_boundary());
    }

    #[test]
    fn message_stream_byte_by_byte() {
        let (bytes, frames) = sample_stream();
        let mut r = MessageReader::new(Direction::ToCoordinator, Limits::default());
        let mut out = Vec::new();
        for b in &bytes {
            r.feed(std::slice::from_ref(b));
            drain_messages(&mut r, &mut out);
        }
        assert_eq!(normalize(out), frames);
    }

    #[test]
    fn oversized_message_is_refused_before_buffering_it() {
        let mut r = MessageReader::new(Direction::ToCoordinator, Limits { max_message: 16, ..Limits::default() });
        r.feed(&[0x80, 0x02]); // size 128
        assert!(matches!(r.next_frame(), Err(WireError::MessageSize { size: 128, max: 16 })));
    }

    #[test]
    fn record_stream_recovery_sequence() {
        // [-2] + checkpoint bytes, replayed record 0, then [-1] TakeBecomingPrimaryCheckpoint.
        let mut bytes = Vec::new();
        Record::checkpoint_announcement(9, 4).encode(&mut bytes);
        bytes.extend_from_slice(b"abcd");
        let logged = Record::new(
            9,
            0,
            Message::Rpc(Rpc::incoming(RpcBody::new(RpcKind::Call, 1, RpcType::FireAndForget, b"x"))).to_bytes(),
        );
        logged.encode(&mut bytes);
        let control = Record::control(9, &Message::TakeBecomingPrimaryCheckpoint);
        control.encode(&mut bytes);
        for split in 0..bytes.len() {
            let mut r = RecordReader::new(Limits::default());
            let mut events = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                r.feed(part);
                while let Some(e) = r.next_event().unwrap() {
                    events.push(e);
                }
            }
            let data: Vec<u8> = events
                .iter()
                .filter_map(|e| match e {
                    RecordEvent::CheckpointData { data, .. } => Some(data.to_vec()),
                    RecordEvent::Record(_) => None,
                })
                .flatten()
                .collect();
            assert_eq!(data, b"abcd");
            let records: Vec<_> = events
                .into_iter()
                .filter_map(|e| match e {
                    RecordEvent::Record(r) => Some(r.header.seq),
                    RecordEvent::CheckpointData { .. } => None,
                })
                .collect();
            assert_eq!(records, [-2, 0, -1]);
            assert!(r.at_boundary());
        }
    }

    #[test]
    fn corrupted_record_in_stream_is_an_error() {
        let mut bytes = Record::new(1, 0, vec![0x02, 0x02]).to_bytes();
        bytes[24] = 0x04;
        let mut r = RecordReader::new(Limits::default());
        r.feed(&bytes);
        assert!(matches!(r.next_event(), Err(WireError::CheckBytes { .. })));
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_frames(
            msgs in proptest::collection::vec(crate::ambrosia::message::tests::arb_message(Direction::ToCoordinator), 0..8),
            splits in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut bytes = Vec::new();
            let mut expected = Vec::new();
            for m in msgs {
                // Checkpoint data has to follow its announcement; keep them small here.
                let m = match m {
                    Message::Checkpoint { fixed_length, .. } => Message::Checkpoint { len: 3, fixed_length },
                    other => other,
                };
                m.encode(&mut bytes);
                let is_cp = matches!(m, Message::Checkpoint { .. });
                expected.push(Frame::Message(m));
                if is_cp {
                    bytes.extend_from_slice(b"cpt");
                    expected.push(Frame::CheckpointData { data: Bytes::from_static(b"cpt"), remaining: 0 });
                }
            }
            let mut cuts: Vec<usize> = splits.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut r = MessageReader::new(Direction::ToCoordinator, Limits::default());
            let mut out = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                r.feed(&bytes[at..cut]);
                at = cut;
                drain_messages(&mut r, &mut out);
            }
            prop_assert_eq!(normalize(out), expected);
            prop_assert!(r.at_boundary());
        }

        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut m = MessageReader::new(Direction::ToCoordinator, Limits::default());
            let mut r = RecordReader::new(Limits::default());
            for c in &chunks {
                m.feed(c);
                r.feed(c);
                while let Ok(Some(_)) = m.next_frame() {}
                while let Ok(Some(_)) = r.next_event() {}
            }
        }
    }
}
