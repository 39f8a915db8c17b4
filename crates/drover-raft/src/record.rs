//! How Raft's durable data is written, byte for byte.
//!
//! **Entries.** Each Raft entry is one AMBROSIA message in the journal: an RPC (type 0,
//! call, fire-and-forget) whose method id is [`ENTRY_METHOD`] (the entry format, 1)
//! and whose arguments are, little-endian: term u64 · leader node id u64 · index u64 ·
//! kind u8 (0 blank, 1 normal, 2 membership) · the payload. A normal payload is the
//! entry's input messages as they are; a membership payload is: configs u32, each a
//! count u32 and that many node ids u64; nodes u32, each an id u64, an address length
//! u32 and the address (UTF-8). The journal's records group entries as its group
//! commit gathers them, so a record's sequence id is not a Raft index: every entry
//! carries its own log id.
//!
//! **Vote and purge point** live in the file [`STATE_FILE`] beside the segments,
//! replaced atomically (written, fsynced, renamed): format u8 (1) · vote present u8 ·
//! term u64 · node id u64 · committed u8 · purged present u8 · term u64 · node id u64 ·
//! index u64 (44 bytes).
//!
//! Both are durable formats: a change adds a format and keeps reading this one.

use std::collections::{BTreeMap, BTreeSet};

use drover_wire::ambrosia::{MessageType, RpcKind, RpcType, varint};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload};

use crate::types::{Entry, Inputs, LogId, Membership, Vote};

/// The journal method id of a Raft entry (format 1). Controller inputs use small
/// method ids (their input format); these never collide with them.
pub const ENTRY_METHOD: i32 = 1_000_001;

/// The file holding the vote and the purge point.
pub const STATE_FILE: &str = "raft-state";

/// Longest membership payload accepted (a few hundred members).
const MAX_MEMBERSHIP: usize = 1 << 20;

/// Bytes that are not a Raft entry or state of a format this binary reads.
#[derive(Debug, thiserror::Error)]
#[error("raft {what}: {why}")]
pub struct RecordError {
    what: &'static str,
    why: String,
}

pub(crate) fn bad(what: &'static str, why: impl Into<String>) -> RecordError {
    RecordError { what, why: why.into() }
}

/// Encodes an entry as one journal message (size, type, data).
pub fn encode_entry(entry: &Entry) -> bytes::Bytes {
    let mut args = Vec::with_capacity(32);
    args.extend_from_slice(&entry.log_id.leader_id.term.to_le_bytes());
    args.extend_from_slice(&entry.log_id.leader_id.node_id.to_le_bytes());
    args.extend_from_slice(&entry.log_id.index.to_le_bytes());
    match &entry.payload {
        EntryPayload::Blank => args.push(0),
        EntryPayload::Normal(Inputs(data)) => {
            args.push(1);
            args.extend_from_slice(data);
        }
        EntryPayload::Membership(m) => {
            args.push(2);
            encode_membership_bytes(m, &mut args);
        }
    }
    let body_len = 1 + varint::int_len(ENTRY_METHOD) + 1 + args.len();
    let mut out = Vec::with_capacity(6 + body_len);
    varint::put_int(&mut out, (1 + body_len) as i32);
    out.push(MessageType::Rpc as u8);
    out.push(RpcKind::Call as u8);
    varint::put_int(&mut out, ENTRY_METHOD);
    out.push(RpcType::FireAndForget as u8);
    out.extend_from_slice(&args);
    out.into()
}

/// Appends a membership's bytes (the layout in the module doc).
pub(crate) fn encode_membership_bytes(m: &Membership, out: &mut Vec<u8>) {
    let configs = m.get_joint_config();
    out.extend_from_slice(&(configs.len() as u32).to_le_bytes());
    for c in configs {
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        for id in c {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    let nodes: Vec<(&u64, &BasicNode)> = m.nodes().collect();
    out.extend_from_slice(&(nodes.len() as u32).to_le_bytes());
    for (id, node) in nodes {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(node.addr.len() as u32).to_le_bytes());
        out.extend_from_slice(node.addr.as_bytes());
    }
}

/// Reads fixed-width fields from a slice.
pub(crate) struct Reader<'a>(&'a [u8], &'static str);

impl<'a> Reader<'a> {
    /// Reads `bytes`, naming `what` in errors.
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader(bytes, what)
    }
    /// What is left.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.0
    }
    /// A present byte and a log id (term, node id, index), or 25 zero bytes for none.
    pub(crate) fn log_id(&mut self) -> Result<Option<LogId>, RecordError> {
        let present = self.u8()?;
        let (term, node, index) = (self.u64()?, self.u64()?, self.u64()?);
        Ok((present == 1).then(|| log_id(term, node, index)))
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(bad(self.1, format!("truncated: {} bytes left, {n} needed", self.0.len())));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

/// Appends a present byte and a log id (term, node id, index), or 25 zero bytes for
/// none: the form [`Reader::log_id`] reads.
pub(crate) fn put_log_id(out: &mut Vec<u8>, id: Option<LogId>) {
    match id {
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.leader_id.term.to_le_bytes());
            out.extend_from_slice(&id.leader_id.node_id.to_le_bytes());
            out.extend_from_slice(&id.index.to_le_bytes());
        }
        None => out.extend_from_slice(&[0; 25]),
    }
}

fn log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

/// Decodes a journal message (type byte and data, as the journal's readers give it)
/// into an entry; `Ok(None)` for a message that is not a Raft entry.
pub fn decode_entry(message: &[u8]) -> Result<Option<Entry>, RecordError> {
    let Some((&ty, body)) = message.split_first() else { return Ok(None) };
    if ty != MessageType::Rpc as u8 || body.first() != Some(&(RpcKind::Call as u8)) {
        return Ok(None);
    }
    let (method, n) = match varint::get_int(&body[1..]) {
        Ok(Some(v)) => v,
        _ => return Ok(None),
    };
    if method != ENTRY_METHOD {
        return Ok(None);
    }
    let args = body.get(1 + n + 1..).ok_or_else(|| bad("entry", "no arguments"))?;
    let mut r = Reader(args, "entry");
    let id = log_id(r.u64()?, r.u64()?, r.u64()?);
    let payload = match r.u8()? {
        0 => EntryPayload::Blank,
        1 => EntryPayload::Normal(Inputs(r.0.to_vec())),
        2 => EntryPayload::Membership(decode_membership(r.0)?),
        k => return Err(bad("entry", format!("unknown kind {k} at index {}", id.index))),
    };
    Ok(Some(Entry { log_id: id, payload }))
}

fn decode_membership(bytes: &[u8]) -> Result<Membership, RecordError> {
    if bytes.len() > MAX_MEMBERSHIP {
        return Err(bad("membership", format!("{} bytes, over the limit", bytes.len())));
    }
    let mut r = Reader(bytes, "membership");
    let m = decode_membership_from(&mut r)?;
    if !r.0.is_empty() {
        return Err(bad("membership", format!("{} trailing bytes", r.0.len())));
    }
    Ok(m)
}

/// Reads a membership (the layout in the module doc) from `r`.
pub(crate) fn decode_membership_from(r: &mut Reader<'_>) -> Result<Membership, RecordError> {
    let mut configs = Vec::new();
    for _ in 0..r.u32()? {
        let mut c = BTreeSet::new();
        for _ in 0..r.u32()? {
            c.insert(r.u64()?);
        }
        configs.push(c);
    }
    let mut nodes = BTreeMap::new();
    for _ in 0..r.u32()? {
        let id = r.u64()?;
        let len = r.u32()? as usize;
        let addr = String::from_utf8(r.take(len)?.to_vec()).map_err(|_| bad("membership", "address is not UTF-8"))?;
        nodes.insert(id, BasicNode { addr });
    }
    // Every voter must be a node: the constructor would otherwise invent empty ones.
    if let Some(id) = configs.iter().flatten().find(|id| !nodes.contains_key(id)) {
        return Err(bad("membership", format!("voter {id} has no address")));
    }
    Ok(Membership::new(configs, nodes))
}

/// The vote and the purge point, as saved in [`STATE_FILE`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedState {
    /// The last vote saved.
    pub vote: Option<Vote>,
    /// The last log id purged.
    pub purged: Option<LogId>,
}

impl SavedState {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(44);
        out.push(1);
        match &self.vote {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&v.leader_id.term.to_le_bytes());
                out.extend_from_slice(&v.leader_id.node_id.to_le_bytes());
                out.push(u8::from(v.committed));
            }
            None => out.extend_from_slice(&[0; 18]),
        }
        put_log_id(&mut out, self.purged);
        out
    }

    /// Reads the file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<SavedState, RecordError> {
        let mut r = Reader(bytes, "state file");
        match r.u8()? {
            1 => {}
            f => return Err(bad("state file", format!("format {f} is not one this binary reads (it reads 1)"))),
        }
        let has_vote = r.u8()?;
        let (term, node, committed) = (r.u64()?, r.u64()?, r.u8()?);
        let vote = (has_vote == 1).then(|| {
            let mut v = Vote::new(term, node);
            v.committed = committed == 1;
            v
        });
        let purged = r.log_id()?;
        if !r.0.is_empty() {
            return Err(bad("state file", format!("{} trailing bytes", r.0.len())));
        }
        Ok(SavedState { vote, purged })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(e: Entry) {
        let bytes = encode_entry(&e);
        // The journal hands out messages without their size prefix.
        let (_, n) = varint::get_int(&bytes).unwrap().unwrap();
        let back = decode_entry(&bytes[n..]).unwrap().unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn entries_of_every_kind_round_trip() {
        roundtrip(Entry { log_id: log_id(3, 2, 17), payload: EntryPayload::Blank });
        roundtrip(Entry { log_id: log_id(3, 2, 18), payload: EntryPayload::Normal(Inputs(vec![1, 2, 3])) });
        let nodes: BTreeMap<u64, BasicNode> =
            [(1, BasicNode::new("a:7402")), (2, BasicNode::new("b:7402")), (3, BasicNode::new("c:7402"))].into();
        let m = Membership::new(vec![BTreeSet::from([1, 2]), BTreeSet::from([2, 3])], nodes);
        roundtrip(Entry { log_id: log_id(4, 1, 19), payload: EntryPayload::Membership(m) });
    }

    #[test]
    fn other_messages_are_not_entries_and_damage_is_an_error() {
        assert!(decode_entry(&[0, 0, 2, 1, 9]).unwrap().is_none(), "a controller input (method 1)");
        assert!(decode_entry(&[]).unwrap().is_none());
        let bytes = encode_entry(&Entry { log_id: log_id(1, 1, 1), payload: EntryPayload::Blank });
        let (_, n) = varint::get_int(&bytes).unwrap().unwrap();
        assert!(decode_entry(&bytes[n..bytes.len() - 3]).is_err(), "truncated");
    }

    #[test]
    fn the_state_file_round_trips_and_is_44_bytes() {
        let mut vote = Vote::new(9, 3);
        vote.committed = true;
        for s in [SavedState::default(), SavedState { vote: Some(vote), purged: Some(log_id(8, 2, 1000)) }] {
            let bytes = s.encode();
            assert_eq!(bytes.len(), 44);
            assert_eq!(SavedState::decode(&bytes).unwrap(), s);
        }
        assert!(SavedState::decode(&[2; 44]).unwrap_err().to_string().contains("format 2"));
    }
}
