//! The interface between the journal and a deterministic state machine (the trait
//! itself lives in `drover-machine`, so the core implements it without linking the
//! journal).
//!
//! A [`StateMachine`] applies inputs and produces outputs, serializes itself to a
//! checkpoint and restores from one. Its inputs are journaled as AMBROSIA RPC messages
//! (method [`INPUT_METHOD`], fire-and-forget, the encoded input as arguments).
//! [`replay`] rebuilds a machine from a [`Recovery`]: restore the checkpoint, apply
//! every logged input in order, and discard the outputs, which were already emitted
//! before the crash.

use bytes::Bytes;
use drover_wire::ambrosia::{MessageType, RpcBody, RpcKind, RpcType, varint};

use crate::{JournalError, Recovery};

/// The method id under which state machine inputs are logged. It doubles as the
/// inputs' format version: a later format is logged under another method id, which
/// this binary's `replay` refuses by name instead of skipping.
pub const INPUT_METHOD: i32 = 1;

pub use drover_machine::{DecodeError, EncodeError, StateMachine};

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
    Ok(encode_entry(INPUT_METHOD, &args))
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
        let Some((&ty, body)) = entry.message.split_first() else { continue };
        if ty != MessageType::Rpc as u8 {
            stats.skipped += 1;
            continue;
        }
        let body = RpcBody::parse(entry.message.slice(1..1 + body.len()))
            .map_err(|e| fail(format!("record {}", entry.seq), format!("bad RPC: {e}")))?;
        // The method id is the input's format. One this binary does not know was
        // written by a newer release: replaying around it would misread the log, so
        // recovery refuses, naming both formats.
        if body.method_id() != INPUT_METHOD {
            return Err(fail(
                format!("record {}", entry.seq),
                format!(
                    "input format {} (journal method id) is not this binary's format {INPUT_METHOD}: the data directory was written by another release; use that release (or a newer one) to read it",
                    body.method_id()
                ),
            ));
        }
        let input = M::decode_input(body.args())
            .map_err(|e| fail(format!("record {}", entry.seq), format!("input does not decode: {e}")))?;
        machine.apply(input, &mut out);
        out.clear();
        stats.inputs += 1;
    }
    Ok((machine, stats))
}
