//! AMBROSIA's wire format, exactly as `shared/AMBROSIA-WIRE.md` records it.
//!
//! * [`varint`]: ZigZagInt / ZigZagLong.
//! * [`message`]: the typed messages (types 0–15) and their data layouts.
//! * [`record`]: the 24-byte log record header with XXH64 check bytes.
//! * [`stream`]: incremental readers for a byte stream of bare messages (application
//!   → coordinator) and of log records (coordinator → application, and the journal),
//!   including the raw checkpoint bytes that follow a `Checkpoint` message.

pub mod message;
pub mod record;
pub mod stream;
pub mod varint;

pub use message::{Direction, Message, MessageType, Rpc, RpcBody, RpcKind, RpcType};
pub use record::{HEADER_LEN, Record, RecordHeader, SEQ_CHECKPOINT, SEQ_CONTROL, check_bytes};
pub use stream::{Frame, MessageReader, RecordEvent, RecordReader};

/// Limits on sizes a peer controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (type byte + data) accepted.
    pub max_message: usize,
    /// Largest log record (header included) accepted.
    pub max_record: usize,
    /// Largest checkpoint announced by a `Checkpoint` message.
    pub max_checkpoint: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_message: 64 << 20, max_record: (64 << 20) + HEADER_LEN, max_checkpoint: 16 << 30 }
    }
}

/// Everything that can be wrong with AMBROSIA bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A varint longer than its type allows (5 bytes for an int, 10 for a long).
    #[error("varint longer than {max} bytes")]
    VarintTooLong {
        /// The longest allowed encoding.
        max: usize,
    },
    /// A varint whose value does not fit its type.
    #[error("varint overflows {bits} bits")]
    VarintOverflow {
        /// The type's width.
        bits: u32,
    },
    /// A field ends before its message does.
    #[error("truncated {what}")]
    Truncated {
        /// Which field.
        what: &'static str,
    },
    /// A message with a size of zero (it must at least hold its type byte).
    #[error("message of size 0 has no type byte")]
    EmptyMessage,
    /// A message (or size) that is negative or larger than the limit.
    #[error("message size {size} outside 1..={max}")]
    MessageSize {
        /// The announced size.
        size: i64,
        /// The limit.
        max: usize,
    },
    /// A message type outside 0–15.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Bytes left over after a fixed-layout message's data.
    #[error("{count} trailing bytes after {what}")]
    TrailingBytes {
        /// Which message.
        what: &'static str,
        /// How many bytes were left.
        count: usize,
    },
    /// A name that is not UTF-8.
    #[error("{what} is not UTF-8")]
    InvalidUtf8 {
        /// Which field.
        what: &'static str,
    },
    /// RPC byte 0 outside 0 (call), 1 (return), 2 (empty return), 3 (exception).
    #[error("RPC kind byte {0} is not 0..=3")]
    BadRpcKind(u8),
    /// RPC type byte outside 0 (async/await), 1 (fire-and-forget), 2 (impulse).
    #[error("RPC type byte {0} is not 0..=2")]
    BadRpcType(u8),
    /// A negative count or length.
    #[error("negative {what}: {value}")]
    Negative {
        /// Which field.
        what: &'static str,
        /// The value read.
        value: i64,
    },
    /// An element of an RPC batch that is not an RPC message.
    #[error("RPC batch element has type {0}, not RPC")]
    BatchElementNotRpc(u8),
    /// A checkpoint larger than the limit.
    #[error("checkpoint of {len} bytes exceeds the limit of {max}")]
    CheckpointTooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A record whose length field is below the header size or above the limit.
    #[error("record length {length} outside {min}..={max}")]
    RecordLength {
        /// The length field.
        length: i64,
        /// The header size.
        min: usize,
        /// The limit.
        max: usize,
    },
    /// A record whose payload does not hash to its check bytes.
    #[error("record {seq}: check bytes {found:#018x}, payload hashes to {computed:#018x}")]
    CheckBytes {
        /// The record's sequence id.
        seq: i64,
        /// The check bytes in the header.
        found: u64,
        /// XXH64 of the payload.
        computed: u64,
    },
    /// A checkpoint announcement record whose payload is not one Checkpoint message.
    #[error("record with sequence id -2 does not hold a single Checkpoint message")]
    BadCheckpointRecord,
}
