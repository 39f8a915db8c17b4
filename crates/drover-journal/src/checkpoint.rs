//! Checkpoint files: the serialized state of the machine, in AMBROSIA form.
//!
//! A checkpoint file is the record that announces a checkpoint (sequence id -2, check
//! bytes 0, one `Checkpoint` message holding the state's length), the state's bytes,
//! then a 16-byte trailer: the sequence id of the first record *not* covered (i64 LE)
//! and the XXH64 of the state followed by that id (u64 LE). The trailer lets recovery tell a whole
//! checkpoint from a damaged one; the journal writes checkpoints atomically, so damage
//! means the disk, not a crash.

use bytes::Bytes;
use drover_wire::ambrosia::{Direction, Limits, Message, Record, SEQ_CHECKPOINT};

const TRAILER_LEN: usize = 16;

/// Encodes a checkpoint file.
pub fn encode(committer_id: i32, next_seq: i64, state: &[u8]) -> Vec<u8> {
    let mut out = Record::checkpoint_announcement(committer_id, state.len() as u64).to_bytes();
    out.reserve(state.len() + TRAILER_LEN);
    out.extend_from_slice(state);
    out.extend_from_slice(&next_seq.to_le_bytes());
    out.extend_from_slice(&trailer_check(state, next_seq).to_le_bytes());
    out
}

/// XXH64 over the state followed by the covered sequence id.
fn trailer_check(state: &[u8], next_seq: i64) -> u64 {
    let mut h = xxhash_rust::xxh64::Xxh64::new(0);
    h.update(state);
    h.update(&next_seq.to_le_bytes());
    h.digest()
}

/// Decodes a checkpoint file: the sequence id it covers up to, and the state.
pub fn decode(bytes: &[u8], committer_id: i32, limits: &Limits) -> Result<(i64, Bytes), String> {
    let (record, n) = match Record::decode(bytes, limits) {
        Ok(Some(r)) => r,
        Ok(None) => return Err("file ends inside the checkpoint header".into()),
        Err(e) => return Err(format!("bad checkpoint header: {e}")),
    };
    if record.header.seq != SEQ_CHECKPOINT {
        return Err(format!("header sequence id {} is not -2", record.header.seq));
    }
    if record.header.committer_id != committer_id {
        return Err(format!("committer id {} is not this journal's {committer_id}", record.header.committer_id));
    }
    let len = match record.messages(Direction::ToApplication, limits).as_deref() {
        Ok([Message::Checkpoint { len, .. }]) => *len,
        _ => return Err("header does not hold one Checkpoint message".into()),
    };
    let len = usize::try_from(len).map_err(|_| "checkpoint too large".to_string())?;
    let rest = &bytes[n..];
    if rest.len() != len + TRAILER_LEN {
        return Err(format!("{} bytes after the header, {} expected", rest.len(), len + TRAILER_LEN));
    }
    let (state, trailer) = rest.split_at(len);
    let next_seq = i64::from_le_bytes(trailer[..8].try_into().map_err(|_| "short trailer")?);
    let check = u64::from_le_bytes(trailer[8..].try_into().map_err(|_| "short trailer")?);
    if trailer_check(state, next_seq) != check {
        return Err("state does not match its check bytes".into());
    }
    Ok((next_seq, Bytes::copy_from_slice(state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let file = encode(3, 17, b"the state");
        assert_eq!(decode(&file, 3, &Limits::default()).unwrap(), (17, Bytes::from_static(b"the state")));
        assert!(decode(&file, 4, &Limits::default()).is_err());
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            // The -2 header carries no check bytes, so its check field may change freely.
            if (8..16).contains(&i) {
                continue;
            }
            assert!(decode(&bad, 3, &Limits::default()).is_err(), "flip at {i} went unnoticed");
        }
        for cut in 0..file.len() {
            assert!(decode(&file[..cut], 3, &Limits::default()).is_err());
        }
    }
}
