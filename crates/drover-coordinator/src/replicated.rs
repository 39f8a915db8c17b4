//! An instance's log as the state machine its replicas' openraft group applies.
//!
//! With replicas (`drover coordinator --replica K`), an instance's log is the group's
//! log: the primary (the group's leader) proposes each record the session would have
//! appended, and each checkpoint the application took, as inputs of an
//! [`InstanceLog`]; every replica applies them in commit order. Applying a record gives
//! it its sequence id (the next one: ids are dense and the same on every replica), so
//! what a replica hands its application, primary or secondary, is the committed log
//! with its original sequence ids. The machine holds what a new application session
//! needs (the last checkpoint and the records after it), which is also what a Raft
//! snapshot of it carries; older records are dropped once a checkpoint covers them.
//!
//! A checkpoint travels in parts of at most [`CHECKPOINT_PART`] bytes (an application
//! checkpoint may be far larger than a Raft frame); the last part carries the
//! instance's version, so an upgrade is replicated with the upgraded checkpoint.
//!
//! Every record ever applied also feeds a running digest (FNV-1a over sequence id,
//! length and payload), so replicas can be compared record for record without keeping
//! the whole history.
//!
//! Formats (durable: a Raft entry or snapshot holds them): an input is a kind byte (1
//! record: the payload; 2 checkpoint part: a first-part byte, the bytes; 3 checkpoint
//! end: version u64 LE, the bytes); a snapshot of the machine is format byte 1, then
//! the fields of [`InstanceLog`] in the order of [`InstanceLog::checkpoint`].

use bytes::Bytes;
use drover_machine::{DecodeError, EncodeError, StateMachine};

/// The largest part of a checkpoint in one input (eight fit in a Raft request).
pub const CHECKPOINT_PART: usize = 4 << 20;

/// The largest checkpoint being gathered from parts: larger ones (a primary would never
/// propose them) are dropped rather than grown without bound.
const MAX_GATHERED: usize = 2 << 30;

/// What the primary proposes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// One log record's payload (the session's `Action::Append`).
    Record(Bytes),
    /// A part of a checkpoint (`first`: it starts a new one, dropping any unfinished).
    CheckpointPart {
        /// Whether this part starts the checkpoint.
        first: bool,
        /// The bytes.
        data: Bytes,
    },
    /// The last part of a checkpoint, and the instance version it belongs to.
    CheckpointEnd {
        /// The instance version after this checkpoint.
        version: u64,
        /// The bytes.
        data: Bytes,
    },
}

/// What applying an input tells the replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A record is committed with this sequence id.
    Record {
        /// Its sequence id.
        seq: i64,
        /// Its payload.
        payload: Bytes,
    },
    /// A checkpoint is committed (the stored checkpoint: drover's header and the
    /// application's bytes); records before `next_seq` are covered by it.
    Checkpoint {
        /// The instance version it belongs to.
        version: u64,
        /// The sequence id of the first record after it.
        next_seq: i64,
        /// The stored checkpoint.
        stored: Bytes,
    },
}

/// The replicated log of one instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceLog {
    /// The sequence id the next record gets.
    next_seq: i64,
    /// The instance version (set by each checkpoint).
    version: u64,
    /// The last checkpoint (stored form) and the first sequence id after it.
    checkpoint: Option<(Bytes, i64)>,
    /// The records after it.
    records: Vec<(i64, Bytes)>,
    /// Their payload bytes.
    records_bytes: u64,
    /// A checkpoint being gathered from parts.
    partial: Vec<u8>,
    /// The running digest of every record applied.
    digest: u64,
    /// Checkpoints committed.
    checkpoints: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

impl InstanceLog {
    /// The sequence id the next record will get (= records committed so far).
    pub fn next_seq(&self) -> i64 {
        self.next_seq
    }

    /// The instance version the last checkpoint belongs to.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The last checkpoint (stored form) and the records after it: where an
    /// application session starts.
    pub fn start(&self) -> Option<(Bytes, Vec<(i64, Bytes)>)> {
        self.checkpoint.as_ref().map(|(c, _)| (c.clone(), self.records.clone()))
    }

    /// Whether nothing was ever committed (the instance's first start is to come).
    pub fn is_empty(&self) -> bool {
        self.next_seq == 0 && self.checkpoint.is_none()
    }

    /// Payload bytes of the records after the last checkpoint.
    pub fn bytes_since_checkpoint(&self) -> u64 {
        self.records_bytes
    }

    /// The digest of every record applied so far (equal on replicas that applied the
    /// same records).
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Checkpoints committed so far.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints
    }

    /// The inputs that commit `stored` as a checkpoint at `version`.
    pub fn checkpoint_inputs(stored: &[u8], version: u64) -> Vec<Input> {
        let mut chunks: Vec<&[u8]> = stored.chunks(CHECKPOINT_PART).collect();
        let last = chunks.pop().unwrap_or(&[]);
        let mut out: Vec<Input> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| Input::CheckpointPart { first: i == 0, data: Bytes::copy_from_slice(c) })
            .collect();
        if out.is_empty() {
            // A one-part checkpoint still starts afresh.
            out.push(Input::CheckpointPart { first: true, data: Bytes::new() });
        }
        out.push(Input::CheckpointEnd { version, data: Bytes::copy_from_slice(last) });
        out
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(DecodeError(format!("instance log: {n} bytes wanted, {} left", self.0.len())));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| DecodeError("instance log: short u64".into()))?))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        let v = self.u64()? as i64;
        if v < 0 {
            return Err(DecodeError(format!("instance log: negative sequence id {v}")));
        }
        Ok(v)
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::try_from(self.u64()?).map_err(|_| DecodeError("instance log: length over usize".into()))?;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
}

impl StateMachine for InstanceLog {
    type Input = Input;
    type Output = Output;

    fn apply(&mut self, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Record(payload) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.digest = fnv(self.digest ^ FNV_OFFSET, &seq.to_le_bytes());
                self.digest = fnv(self.digest, &(payload.len() as u64).to_le_bytes());
                self.digest = fnv(self.digest, &payload);
                self.records_bytes += payload.len() as u64;
                self.records.push((seq, payload.clone()));
                out.push(Output::Record { seq, payload });
            }
            Input::CheckpointPart { first, data } => {
                if first {
                    self.partial.clear();
                }
                if self.partial.len() + data.len() > MAX_GATHERED {
                    self.partial = Vec::new();
                } else {
                    self.partial.extend_from_slice(&data);
                }
            }
            Input::CheckpointEnd { version, data } => {
                let mut stored = std::mem::take(&mut self.partial);
                stored.extend_from_slice(&data);
                let stored = Bytes::from(stored);
                self.version = version;
                self.checkpoint = Some((stored.clone(), self.next_seq));
                self.records.clear();
                self.records_bytes = 0;
                self.checkpoints += 1;
                out.push(Output::Checkpoint { version, next_seq: self.next_seq, stored });
            }
        }
    }

    fn encode_input(input: &Input, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        match input {
            Input::Record(p) => {
                buf.push(1);
                buf.extend_from_slice(p);
            }
            Input::CheckpointPart { first, data } => {
                buf.push(2);
                buf.push(u8::from(*first));
                buf.extend_from_slice(data);
            }
            Input::CheckpointEnd { version, data } => {
                buf.push(3);
                buf.extend_from_slice(&version.to_le_bytes());
                buf.extend_from_slice(data);
            }
        }
        Ok(())
    }

    fn decode_input(bytes: &[u8]) -> Result<Input, DecodeError> {
        let mut r = Reader(bytes);
        match r.u8()? {
            1 => Ok(Input::Record(Bytes::copy_from_slice(r.0))),
            2 => {
                let first = match r.u8()? {
                    0 => false,
                    1 => true,
                    b => return Err(DecodeError(format!("instance log: checkpoint part flag {b}"))),
                };
                Ok(Input::CheckpointPart { first, data: Bytes::copy_from_slice(r.0) })
            }
            3 => {
                let version = r.u64()?;
                Ok(Input::CheckpointEnd { version, data: Bytes::copy_from_slice(r.0) })
            }
            k => Err(DecodeError(format!("instance log: unknown input kind {k}"))),
        }
    }

    fn checkpoint(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = vec![1u8];
        out.extend_from_slice(&(self.next_seq as u64).to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        match &self.checkpoint {
            Some((c, at)) => {
                out.push(1);
                out.extend_from_slice(&(*at as u64).to_le_bytes());
                put_bytes(&mut out, c);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        for (seq, p) in &self.records {
            out.extend_from_slice(&(*seq as u64).to_le_bytes());
            put_bytes(&mut out, p);
        }
        put_bytes(&mut out, &self.partial);
        out.extend_from_slice(&self.digest.to_le_bytes());
        out.extend_from_slice(&self.checkpoints.to_le_bytes());
        Ok(out)
    }

    fn restore(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        match r.u8()? {
            1 => {}
            f => return Err(DecodeError::unknown_format("instance log snapshot", u32::from(f), 1)),
        }
        let next_seq = r.i64()?;
        let version = r.u64()?;
        let checkpoint = match r.u8()? {
            0 => None,
            1 => {
                let at = r.i64()?;
                Some((r.bytes()?, at))
            }
            b => return Err(DecodeError(format!("instance log snapshot: checkpoint flag {b}"))),
        };
        let n = r.u64()?;
        // Each record takes at least 16 bytes: a count beyond that is damage.
        if n > (r.0.len() / 16) as u64 {
            return Err(DecodeError(format!("instance log snapshot: {n} records cannot fit")));
        }
        let mut records = Vec::with_capacity(n as usize);
        let mut records_bytes = 0u64;
        for _ in 0..n {
            let seq = r.i64()?;
            let p = r.bytes()?;
            records_bytes += p.len() as u64;
            records.push((seq, p));
        }
        let partial = r.bytes()?.to_vec();
        let digest = r.u64()?;
        let checkpoints = r.u64()?;
        if !r.0.is_empty() {
            return Err(DecodeError(format!("instance log snapshot: {} bytes after the end", r.0.len())));
        }
        Ok(InstanceLog { next_seq, version, checkpoint, records, records_bytes, partial, digest, checkpoints })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_all(m: &mut InstanceLog, inputs: Vec<Input>) -> Vec<Output> {
        let mut out = Vec::new();
        for i in inputs {
            let mut buf = Vec::new();
            InstanceLog::encode_input(&i, &mut buf).unwrap();
            let decoded = InstanceLog::decode_input(&buf).unwrap();
            assert_eq!(decoded, i);
            m.apply(decoded, &mut out);
        }
        out
    }

    #[test]
    fn records_get_dense_ids_and_a_checkpoint_in_parts_drops_what_it_covers() {
        let mut m = InstanceLog::default();
        assert!(m.is_empty() && m.start().is_none());
        let out =
            apply_all(&mut m, vec![Input::Record(Bytes::from_static(b"a")), Input::Record(Bytes::from_static(b"b"))]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], Output::Record { seq: 1, payload: Bytes::from_static(b"b") });
        let big: Vec<u8> = (0..CHECKPOINT_PART * 2 + 5).map(|i| i as u8).collect();
        let inputs = InstanceLog::checkpoint_inputs(&big, 3);
        assert_eq!(inputs.len(), 3);
        let out = apply_all(&mut m, inputs);
        assert_eq!(out, vec![Output::Checkpoint { version: 3, next_seq: 2, stored: Bytes::from(big.clone()) }]);
        apply_all(&mut m, vec![Input::Record(Bytes::from_static(b"c"))]);
        let (c, records) = m.start().unwrap();
        assert_eq!(c, big);
        assert_eq!(records, vec![(2, Bytes::from_static(b"c"))]);
        assert_eq!((m.next_seq(), m.version(), m.checkpoints()), (3, 3, 1));

        // A snapshot round-trips, and the digest continues the same on both.
        let mut back = InstanceLog::restore(&m.checkpoint().unwrap()).unwrap();
        assert_eq!(back, m);
        apply_all(&mut back, vec![Input::Record(Bytes::from_static(b"d"))]);
        apply_all(&mut m, vec![Input::Record(Bytes::from_static(b"d"))]);
        assert_eq!(back.digest(), m.digest());
        let mut other = m.clone();
        apply_all(&mut other, vec![Input::Record(Bytes::from_static(b"e"))]);
        apply_all(&mut m, vec![Input::Record(Bytes::from_static(b"f"))]);
        assert_ne!(other.digest(), m.digest());

        // A small checkpoint is one starting part and the end; an unfinished one is
        // dropped by the next start.
        apply_all(&mut m, vec![Input::CheckpointPart { first: true, data: Bytes::from_static(b"junk") }]);
        let out = apply_all(&mut m, InstanceLog::checkpoint_inputs(b"small", 3));
        assert!(matches!(&out[0], Output::Checkpoint { stored, .. } if stored.as_ref() == b"small"));
    }

    #[test]
    fn damaged_inputs_and_snapshots_are_refused_without_panicking() {
        assert!(InstanceLog::decode_input(&[]).is_err());
        assert!(InstanceLog::decode_input(&[9]).is_err());
        assert!(InstanceLog::decode_input(&[2, 7]).is_err());
        assert!(InstanceLog::decode_input(&[3, 1, 2]).is_err());
        let mut m = InstanceLog::default();
        apply_all(&mut m, InstanceLog::checkpoint_inputs(b"ck", 0));
        apply_all(&mut m, vec![Input::Record(Bytes::from_static(b"r"))]);
        let good = m.checkpoint().unwrap();
        for cut in 0..good.len() {
            assert!(InstanceLog::restore(&good[..cut]).is_err(), "prefix of {cut} bytes accepted");
        }
        let mut newer = good.clone();
        newer[0] = 2;
        let err = InstanceLog::restore(&newer).unwrap_err().to_string();
        assert!(err.contains("newer release"), "{err}");
        let mut huge = good.clone();
        huge.extend_from_slice(&[0]);
        assert!(InstanceLog::restore(&huge).is_err());
    }
}
