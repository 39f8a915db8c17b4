//! The interface between the journal and a deterministic state machine (the trait
//! itself lives in `drover-machine`, so the core implements it without linking the
//! journal).
//!
//! A [`StateMachine`] applies inputs and produces outputs, serializes itself to a
//! checkpoint and restores from one. Its inputs are journaled as AMBROSIA RPC messages
//! (fire-and-forget, the encoded input as arguments), under the machine's
//! [`StateMachine::INPUT_FORMAT`] as the method id: the method id is the input's
//! format version.
//! [`replay`] rebuilds a machine from a [`Recovery`]: restore the checkpoint, apply
//! every logged input in order, and discard the outputs, which were already emitted
//! before the crash.

use bytes::Bytes;
use drover_wire::ambrosia::{MessageType, RpcBody, RpcKind, RpcType, varint};

use crate::{JournalError, Recovery, ReplayEntry};

pub use drover_machine::{DecodeError, Divergence, EncodeError, StateMachine};

/// Encodes `args` as a logged RPC message (size, type 0, body) with the given method.
pub fn encode_entry(method_id: i32, args: &[u8]) -> Bytes {
    let body_len = 1 + varint::int_len(method_id) + 1 + args.len();
    let size = 1 + body_len;
    let mut out = Vec::with_capacity(varint::int_len(size as i32) + size);
    varint::put_int(&mut out, size as i32);
    out.push(MessageType::Rpc as u8);
    out.push(RpcKind::Call as u8);
    varint::put_int(&mut out, method_id);
    out.push(RpcType::FireAndForget as u8);
    out.extend_from_slice(args);
    out.into()
}

/// Encodes a state machine input as a journal entry.
pub fn encode_input<M: StateMachine>(input: &M::Input) -> Result<Bytes, EncodeError> {
    let mut args = Vec::new();
    M::encode_input(input, &mut args)?;
    let format = i32::try_from(M::INPUT_FORMAT).map_err(|_| EncodeError("input format over i32".into()))?;
    Ok(encode_entry(format, &args))
}

/// Counts from a replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Inputs applied.
    pub inputs: u64,
    /// Logged messages that were not RPC calls (other message types) and were skipped.
    pub skipped: u64,
}

/// Rebuilds a machine: from the checkpoint if there is one (else `fresh()`), then
/// every logged input after it. Outputs are discarded.
pub fn replay<M: StateMachine>(
    recovery: &Recovery,
    fresh: impl FnOnce() -> M,
) -> Result<(M, ReplayStats), JournalError> {
    let fail = |at: String, reason: String| JournalError::Replay { at, reason };
    let mut machine = match &recovery.checkpoint {
        Some(state) => {
            M::restore(state).map_err(|e| fail("checkpoint".into(), format!("state does not restore: {e}")))?
        }
        None => fresh(),
    };
    let mut stats = ReplayStats::default();
    let mut out = Vec::new();
    for entry in recovery.entries() {
        let entry = entry?;
        let Some(input) = decode_entry::<M>(&entry)? else {
            stats.skipped += 1;
            continue;
        };
        machine.apply(input, &mut out);
        out.clear();
        stats.inputs += 1;
    }
    Ok((machine, stats))
}

/// Decodes one logged message as the machine's input: `None` for a message that is not
/// an RPC call (skipped by replay), an error naming the record for a bad one. The
/// method id is the input's format; the machine decodes each format it knows and
/// refuses a newer one, so a later release's inputs are never misread.
pub fn decode_entry<M: StateMachine>(entry: &ReplayEntry) -> Result<Option<M::Input>, JournalError> {
    let fail = |reason: String| JournalError::Replay { at: format!("record {}", entry.seq), reason };
    let Some((&ty, body)) = entry.message.split_first() else { return Ok(None) };
    if ty != MessageType::Rpc as u8 {
        return Ok(None);
    }
    let body = RpcBody::parse(entry.message.slice(1..1 + body.len())).map_err(|e| fail(format!("bad RPC: {e}")))?;
    let format = u32::try_from(body.method_id())
        .map_err(|_| fail(format!("input format {} (journal method id) is negative", body.method_id())))?;
    M::decode_logged_input(format, body.args()).map(Some).map_err(|e| fail(format!("input does not decode: {e}")))
}
