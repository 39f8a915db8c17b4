//! The seam between a deterministic state machine and the log that drives it.
//!
//! Both sides depend on this crate and on nothing of each other: the controller core
//! implements [`StateMachine`] without linking the journal (which does I/O), and the
//! journal (today a local file log, next a replicated one) replays any
//! [`StateMachine`] without knowing the core. It holds no I/O and no dependencies
//! beyond `thiserror`.
//!
//! Encoding is fallible on purpose: a state or input that cannot be encoded is an
//! error that stops whoever writes it, never an empty checkpoint or a skipped input.
//!
//! Formats are versioned: every logged input carries the format it was written in
//! (the log stores [`StateMachine::INPUT_FORMAT`] beside it), and a machine decodes
//! each format it knows, refusing a newer one by name ([`DecodeError::unknown_format`]).
//! Checkpoints carry their format inside their bytes, which the machine owns.

/// A checkpoint or logged input that does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

impl DecodeError {
    /// `what` (an input, a checkpoint) is in `found`, a format this binary does not
    /// read: it writes `current` and reads every earlier one.
    pub fn unknown_format(what: &str, found: u32, current: u32) -> DecodeError {
        let who = if found > current { "a newer release" } else { "an unknown writer" };
        DecodeError(format!(
            "{what} format {found} is not one this binary reads (it writes format {current} and reads formats 1 to {current}): the data was written by {who}; run that release (or a later one) on this directory"
        ))
    }
}

/// A state or input that could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(pub String);

/// A deterministic state machine driven by logged inputs.
pub trait StateMachine: Sized {
    /// What drives the machine.
    type Input;
    /// What the machine asks the outside world to do.
    type Output;

    /// The format [`encode_input`](Self::encode_input) writes. The log stores it with
    /// every input and hands it back to [`decode_logged_input`](Self::decode_logged_input).
    const INPUT_FORMAT: u32 = 1;

    /// Applies one input, appending the outputs it causes to `out`.
    fn apply(&mut self, input: Self::Input, out: &mut Vec<Self::Output>);
    /// Appends the input's encoding (in [`INPUT_FORMAT`](Self::INPUT_FORMAT)) to `buf`.
    fn encode_input(input: &Self::Input, buf: &mut Vec<u8>) -> Result<(), EncodeError>;
    /// Decodes an input encoded by this binary's `encode_input`.
    fn decode_input(bytes: &[u8]) -> Result<Self::Input, DecodeError>;
    /// Decodes a logged input written in `format`. The default reads the current
    /// format only; a machine that changed its input format decodes the older ones here
    /// (into the current type) and keeps doing so for every later release.
    fn decode_logged_input(format: u32, bytes: &[u8]) -> Result<Self::Input, DecodeError> {
        if format == Self::INPUT_FORMAT {
            Self::decode_input(bytes)
        } else {
            Err(DecodeError::unknown_format("input", format, Self::INPUT_FORMAT))
        }
    }
    /// Serializes the whole state (its format is the machine's to mark).
    fn checkpoint(&self) -> Result<Vec<u8>, EncodeError>;
    /// Rebuilds the state from the bytes of a checkpoint written by this release or an
    /// earlier one; a newer format is refused by name.
    fn restore(bytes: &[u8]) -> Result<Self, DecodeError>;
}

/// Names where two states of a machine differ, for replay comparisons (an upgrade
/// what-if run compares the state it computed with the one a checkpoint recorded).
pub trait Divergence {
    /// The first part of the state that differs between `self` and `other` (for the
    /// controller: a node, a pair, a token, a task…), with both values; `None` when
    /// equal.
    fn first_difference(&self, other: &Self) -> Option<String>;
}
