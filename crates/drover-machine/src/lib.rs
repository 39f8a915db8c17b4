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

/// A checkpoint or logged input that does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

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

    /// Applies one input, appending the outputs it causes to `out`.
    fn apply(&mut self, input: Self::Input, out: &mut Vec<Self::Output>);
    /// Appends the input's encoding to `buf`.
    fn encode_input(input: &Self::Input, buf: &mut Vec<u8>) -> Result<(), EncodeError>;
    /// Decodes an input encoded by `encode_input`.
    fn decode_input(bytes: &[u8]) -> Result<Self::Input, DecodeError>;
    /// Serializes the whole state.
    fn checkpoint(&self) -> Result<Vec<u8>, EncodeError>;
    /// Rebuilds the state from `checkpoint`'s bytes.
    fn restore(bytes: &[u8]) -> Result<Self, DecodeError>;
}
