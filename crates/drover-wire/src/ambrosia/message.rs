//! AMBROSIA messages: `size` (ZigZagInt, bytes of type + data) · `type` (1 byte) ·
//! `data`, for every type 0–15 with its data layout.
//!
//! RPC bodies are kept as the raw bytes received, next to their parsed header fields,
//! so that a coordinator can deliver a call byte for byte as the sender wrote it.

use bytes::{BufMut, Bytes};

use super::varint::{self, take_int, take_long};
use super::{Limits, WireError};

/// Which way a message travels: RPCs carry a destination only from the application
/// to its coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Application → coordinator: bare messages, RPCs with a destination.
    ToCoordinator,
    /// Coordinator → application (and the journal): RPCs without a destination.
    ToApplication,
}

/// The type byte of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum MessageType {
    Rpc = 0,
    AttachTo = 1,
    TakeCheckpoint = 2,
    Commit = 3,
    ReplayFrom = 4,
    RpcBatch = 5,
    Ping = 6,
    PingReturn = 7,
    Checkpoint = 8,
    InitialMessage = 9,
    UpgradeTakeCheckpoint = 10,
    TakeBecomingPrimaryCheckpoint = 11,
    UpgradeService = 12,
    CountReplayableRpcBatch = 13,
    TrimTo = 14,
    BecomingPrimary = 15,
}

impl MessageType {
    /// The type for a type byte, if it is one of 0–15.
    pub fn from_byte(b: u8) -> Option<Self> {
        use MessageType::*;
        Some(match b {
            0 => Rpc,
            1 => AttachTo,
            2 => TakeCheckpoint,
            3 => Commit,
            4 => ReplayFrom,
            5 => RpcBatch,
            6 => Ping,
            7 => PingReturn,
            8 => Checkpoint,
            9 => InitialMessage,
            10 => UpgradeTakeCheckpoint,
            11 => TakeBecomingPrimaryCheckpoint,
            12 => UpgradeService,
            13 => CountReplayableRpcBatch,
            14 => TrimTo,
            15 => BecomingPrimary,
            _ => return None,
        })
    }
}

/// Byte 0 of an RPC body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RpcKind {
    /// A call.
    Call = 0,
    /// A return value.
    ReturnValue = 1,
    /// An empty return value.
    EmptyReturnValue = 2,
    /// An exception.
    Exception = 3,
}

/// The RPC type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RpcType {
    /// Async/await: the caller learns when the call completed.
    AsyncAwait = 0,
    /// Fire-and-forget.
    FireAndForget = 1,
    /// Impulse: logged, but not replayed on recovery.
    Impulse = 2,
}

/// An RPC body (kind · method id · type · arguments), raw bytes plus parsed fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcBody {
    raw: Bytes,
    kind: RpcKind,
    method_id: i32,
    rpc_type: RpcType,
    args_at: usize,
}

impl RpcBody {
    /// Builds a body from its fields.
    pub fn new(kind: RpcKind, method_id: i32, rpc_type: RpcType, args: &[u8]) -> Self {
        let mut raw = Vec::with_capacity(2 + varint::int_len(method_id) + args.len());
        raw.push(kind as u8);
        varint::put_int(&mut raw, method_id);
        raw.push(rpc_type as u8);
        let args_at = raw.len();
        raw.extend_from_slice(args);
        RpcBody { raw: raw.into(), kind, method_id, rpc_type, args_at }
    }

    /// Parses a body, keeping the bytes as they are.
    pub fn parse(raw: Bytes) -> Result<Self, WireError> {
        let mut rest: &[u8] = &raw;
        let (&k, tail) = rest.split_first().ok_or(WireError::Truncated { what: "RPC kind" })?;
        rest = tail;
        let kind = match k {
            0 => RpcKind::Call,
            1 => RpcKind::ReturnValue,
            2 => RpcKind::EmptyReturnValue,
            3 => RpcKind::Exception,
            other => return Err(WireError::BadRpcKind(other)),
        };
        let method_id = take_int(&mut rest)?;
        let (&t, tail) = rest.split_first().ok_or(WireError::Truncated { what: "RPC type" })?;
        rest = tail;
        let rpc_type = match t {
            0 => RpcType::AsyncAwait,
            1 => RpcType::FireAndForget,
            2 => RpcType::Impulse,
            other => return Err(WireError::BadRpcType(other)),
        };
        let args_at = raw.len() - rest.len();
        Ok(RpcBody { raw, kind, method_id, rpc_type, args_at })
    }

    /// The body's bytes, exactly as received or built.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
    /// Call, return value, empty return value or exception.
    pub fn kind(&self) -> RpcKind {
        self.kind
    }
    /// The method id (negative ids are reserved).
    pub fn method_id(&self) -> i32 {
        self.method_id
    }
    /// Async/await, fire-and-forget or impulse.
    pub fn rpc_type(&self) -> RpcType {
        self.rpc_type
    }
    /// The serialized arguments.
    pub fn args(&self) -> &[u8] {
        &self.raw[self.args_at..]
    }
}

/// An RPC message. `destination` is present from the application to its coordinator
/// (empty: the application itself) and absent the other way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rpc {
    /// The destination instance, on application → coordinator messages.
    pub destination: Option<String>,
    /// The call itself.
    pub body: RpcBody,
}

impl Rpc {
    /// An RPC as the coordinator delivers it: no destination.
    pub fn incoming(body: RpcBody) -> Self {
        Rpc { destination: None, body }
    }
    /// An RPC as an application sends it.
    pub fn outgoing(destination: impl Into<String>, body: RpcBody) -> Self {
        Rpc { destination: Some(destination.into()), body }
    }
}

/// One AMBROSIA message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// 0: an RPC.
    Rpc(Rpc),
    /// 1: attach to a destination before its first RPC.
    AttachTo {
        /// The destination instance name.
        destination: String,
    },
    /// 2: take (or, from the app, request) a checkpoint.
    TakeCheckpoint,
    /// 3: coordinator ↔ coordinator durability report.
    Commit {
        /// Sequence number.
        seq: i64,
        /// Replayable sequence number.
        replayable_seq: i64,
    },
    /// 4: coordinator ↔ coordinator resend request.
    ReplayFrom {
        /// Next sequence number expected.
        seq: i64,
        /// Next replayable sequence number expected.
        replayable_seq: i64,
    },
    /// 5: a batch of RPCs.
    RpcBatch(Vec<Rpc>),
    /// 6: performance-test ping, its data kept raw.
    Ping(Bytes),
    /// 7: performance-test ping reply, its data kept raw.
    PingReturn(Bytes),
    /// 8: a checkpoint of `len` bytes follows on the stream, outside any message.
    Checkpoint {
        /// Bytes of checkpoint data that follow.
        len: u64,
        /// Whether the length was written as the C client's fixed 8-byte integer.
        fixed_length: bool,
    },
    /// 9: opaque bootstrap bytes.
    InitialMessage(Bytes),
    /// 10
    UpgradeTakeCheckpoint,
    /// 11
    TakeBecomingPrimaryCheckpoint,
    /// 12
    UpgradeService,
    /// 13: a batch that also says how many of its RPCs are replayable.
    CountReplayableRpcBatch {
        /// How many of `rpcs` are not impulses.
        replayable: i32,
        /// The RPCs.
        rpcs: Vec<Rpc>,
    },
    /// 14: coordinator ↔ coordinator trim point.
    TrimTo {
        /// Trim up to here.
        seq: i64,
    },
    /// 15: an active/active secondary was promoted.
    BecomingPrimary,
}

impl Message {
    /// The message's type byte.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Rpc(_) => MessageType::Rpc,
            Message::AttachTo { .. } => MessageType::AttachTo,
            Message::TakeCheckpoint => MessageType::TakeCheckpoint,
            Message::Commit { .. } => MessageType::Commit,
            Message::ReplayFrom { .. } => MessageType::ReplayFrom,
            Message::RpcBatch(_) => MessageType::RpcBatch,
            Message::Ping(_) => MessageType::Ping,
            Message::PingReturn(_) => MessageType::PingReturn,
            Message::Checkpoint { .. } => MessageType::Checkpoint,
            Message::InitialMessage(_) => MessageType::InitialMessage,
            Message::UpgradeTakeCheckpoint => MessageType::UpgradeTakeCheckpoint,
            Message::TakeBecomingPrimaryCheckpoint => MessageType::TakeBecomingPrimaryCheckpoint,
            Message::UpgradeService => MessageType::UpgradeService,
            Message::CountReplayableRpcBatch { .. } => MessageType::CountReplayableRpcBatch,
            Message::TrimTo { .. } => MessageType::TrimTo,
            Message::BecomingPrimary => MessageType::BecomingPrimary,
        }
    }

    /// Appends the message (size, type, data) to `out`, with a minimal size.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        self.encode_data(&mut data);
        let size = i32::try_from(data.len() + 1).unwrap_or(i32::MAX);
        varint::put_int(out, size);
        out.push(self.message_type() as u8);
        out.extend_from_slice(&data);
    }

    /// The encoded message as a fresh vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    fn encode_data(&self, out: &mut Vec<u8>) {
        match self {
            Message::Rpc(rpc) => encode_rpc_data(rpc, out),
            Message::AttachTo { destination } => out.extend_from_slice(destination.as_bytes()),
            Message::TakeCheckpoint
            | Message::UpgradeTakeCheckpoint
            | Message::TakeBecomingPrimaryCheckpoint
            | Message::UpgradeService
            | Message::BecomingPrimary => {}
            Message::Commit { seq, replayable_seq } | Message::ReplayFrom { seq, replayable_seq } => {
                varint::put_long(out, *seq);
                varint::put_long(out, *replayable_seq);
            }
            Message::RpcBatch(rpcs) => {
                varint::put_int(out, i32::try_from(rpcs.len()).unwrap_or(i32::MAX));
                for rpc in rpcs {
                    Message::Rpc(rpc.clone()).encode(out);
                }
            }
            Message::Ping(data) | Message::PingReturn(data) | Message::InitialMessage(data) => {
                out.extend_from_slice(data)
            }
            Message::Checkpoint { len, fixed_length } => {
                let len = i64::try_from(*len).unwrap_or(i64::MAX);
                if *fixed_length {
                    out.put_i64_le(len);
                } else {
                    varint::put_long(out, len);
                }
            }
            Message::CountReplayableRpcBatch { replayable, rpcs } => {
                varint::put_int(out, i32::try_from(rpcs.len()).unwrap_or(i32::MAX));
                varint::put_int(out, *replayable);
                for rpc in rpcs {
                    Message::Rpc(rpc.clone()).encode(out);
                }
            }
            Message::TrimTo { seq } => varint::put_long(out, *seq),
        }
    }

    /// Decodes one message from the front of `input`: the message and the bytes it
    /// took, or `None` if `input` ends before the message does.
    pub fn decode(input: &[u8], dir: Direction, limits: &Limits) -> Result<Option<(Message, usize)>, WireError> {
        let Some((size, n)) = varint::get_int(input)? else {
            return Ok(None);
        };
        let size = check_size(size, limits)?;
        let Some(body) = input.get(n..n + size) else {
            return Ok(None);
        };
        let msg = Message::parse_body(Bytes::copy_from_slice(body), dir, limits)?;
        Ok(Some((msg, n + size)))
    }

    /// Parses type byte + data (a message without its size prefix).
    pub fn parse_body(body: Bytes, dir: Direction, limits: &Limits) -> Result<Message, WireError> {
        let (&t, _) = body.split_first().ok_or(WireError::EmptyMessage)?;
        let ty = MessageType::from_byte(t).ok_or(WireError::UnknownType(t))?;
        let data = body.slice(1..);
        let expect_empty = |m: Message, what| {
            if data.is_empty() { Ok(m) } else { Err(WireError::TrailingBytes { what, count: data.len() }) }
        };
        Ok(match ty {
            MessageType::Rpc => Message::Rpc(parse_rpc_data(data, dir)?),
            MessageType::AttachTo => Message::AttachTo {
                destination: String::from_utf8(data.to_vec())
                    .map_err(|_| WireError::InvalidUtf8 { what: "AttachTo destination" })?,
            },
            MessageType::TakeCheckpoint => expect_empty(Message::TakeCheckpoint, "TakeCheckpoint")?,
            MessageType::UpgradeTakeCheckpoint => {
                expect_empty(Message::UpgradeTakeCheckpoint, "UpgradeTakeCheckpoint")?
            }
            MessageType::TakeBecomingPrimaryCheckpoint => {
                expect_empty(Message::TakeBecomingPrimaryCheckpoint, "TakeBecomingPrimaryCheckpoint")?
            }
            MessageType::UpgradeService => expect_empty(Message::UpgradeService, "UpgradeService")?,
            MessageType::BecomingPrimary => expect_empty(Message::BecomingPrimary, "BecomingPrimary")?,
            MessageType::Commit | MessageType::ReplayFrom => {
                let mut rest: &[u8] = &data;
                let seq = take_long(&mut rest)?;
                let replayable_seq = take_long(&mut rest)?;
                if !rest.is_empty() {
                    return Err(WireError::TrailingBytes { what: "Commit/ReplayFrom", count: rest.len() });
                }
                if ty == MessageType::Commit {
                    Message::Commit { seq, replayable_seq }
                } else {
                    Message::ReplayFrom { seq, replayable_seq }
                }
            }
            MessageType::TrimTo => {
                let mut rest: &[u8] = &data;
                let seq = take_long(&mut rest)?;
                if !rest.is_empty() {
                    return Err(WireError::TrailingBytes { what: "TrimTo", count: rest.len() });
                }
                Message::TrimTo { seq }
            }
            MessageType::RpcBatch => {
                let mut rest: &[u8] = &data;
                let count = take_count(&mut rest, "RPC batch count")?;
                Message::RpcBatch(parse_batch(&data, rest, count, dir, limits)?)
            }
            MessageType::CountReplayableRpcBatch => {
                let mut rest: &[u8] = &data;
                let count = take_count(&mut rest, "RPC batch count")?;
                let replayable = take_int(&mut rest)?;
                Message::CountReplayableRpcBatch { replayable, rpcs: parse_batch(&data, rest, count, dir, limits)? }
            }
            MessageType::Ping => Message::Ping(data),
            MessageType::PingReturn => Message::PingReturn(data),
            MessageType::InitialMessage => Message::InitialMessage(data),
            MessageType::Checkpoint => parse_checkpoint(&data, limits)?,
        })
    }
}

fn check_size(size: i32, limits: &Limits) -> Result<usize, WireError> {
    if size < 1 {
        return Err(if size == 0 {
            WireError::EmptyMessage
        } else {
            WireError::MessageSize { size: size.into(), max: limits.max_message }
        });
    }
    let size = size as usize;
    if size > limits.max_message {
        return Err(WireError::MessageSize { size: size as i64, max: limits.max_message });
    }
    Ok(size)
}

fn take_count(rest: &mut &[u8], what: &'static str) -> Result<usize, WireError> {
    let count = take_int(rest)?;
    usize::try_from(count).map_err(|_| WireError::Negative { what, value: count.into() })
}

fn encode_rpc_data(rpc: &Rpc, out: &mut Vec<u8>) {
    if let Some(dest) = &rpc.destination {
        varint::put_int(out, i32::try_from(dest.len()).unwrap_or(i32::MAX));
        out.extend_from_slice(dest.as_bytes());
    }
    out.extend_from_slice(rpc.body.raw());
}

fn parse_rpc_data(data: Bytes, dir: Direction) -> Result<Rpc, WireError> {
    match dir {
        Direction::ToApplication => Ok(Rpc::incoming(RpcBody::parse(data)?)),
        Direction::ToCoordinator => {
            let mut rest: &[u8] = &data;
            let len = take_int(&mut rest)?;
            let len = usize::try_from(len)
                .map_err(|_| WireError::Negative { what: "destination length", value: len.into() })?;
            let name = rest.get(..len).ok_or(WireError::Truncated { what: "RPC destination" })?;
            let destination =
                std::str::from_utf8(name).map_err(|_| WireError::InvalidUtf8 { what: "RPC destination" })?.to_owned();
            let body_at = data.len() - rest.len() + len;
            Ok(Rpc { destination: Some(destination), body: RpcBody::parse(data.slice(body_at..))? })
        }
    }
}

fn parse_batch(
    whole: &Bytes,
    rest: &[u8],
    count: usize,
    dir: Direction,
    limits: &Limits,
) -> Result<Vec<Rpc>, WireError> {
    // Each element takes at least two bytes, so `count` cannot make us allocate more
    // than the data we already hold.
    let mut rpcs = Vec::with_capacity(count.min(rest.len() / 2));
    let mut at = whole.len() - rest.len();
    for _ in 0..count {
        let Some((size, n)) = varint::get_int(&whole[at..])? else {
            return Err(WireError::Truncated { what: "RPC batch element size" });
        };
        let size = check_size(size, limits)?;
        let start = at + n;
        let end = start
            .checked_add(size)
            .filter(|&e| e <= whole.len())
            .ok_or(WireError::Truncated { what: "RPC batch element" })?;
        let t = whole[start];
        if t != MessageType::Rpc as u8 {
            return Err(WireError::BatchElementNotRpc(t));
        }
        rpcs.push(parse_rpc_data(whole.slice(start + 1..end), dir)?);
        at = end;
    }
    if at != whole.len() {
        return Err(WireError::TrailingBytes { what: "RPC batch", count: whole.len() - at });
    }
    Ok(rpcs)
}

fn parse_checkpoint(data: &[u8], limits: &Limits) -> Result<Message, WireError> {
    // Two forms exist: a ZigZagLong, and the C client's fixed 8-byte little-endian
    // integer. Data of exactly 8 bytes whose varint ends earlier is the fixed form.
    let varint = varint::get_long(data);
    let (len, fixed_length) = match varint {
        Ok(Some((v, n))) if n == data.len() => (v, false),
        _ if data.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(data);
            (i64::from_le_bytes(b), true)
        }
        Ok(Some((_, n))) => return Err(WireError::TrailingBytes { what: "Checkpoint", count: data.len() - n }),
        Ok(None) => return Err(WireError::Truncated { what: "Checkpoint length" }),
        Err(e) => return Err(e),
    };
    let len = u64::try_from(len).map_err(|_| WireError::Negative { what: "checkpoint length", value: len })?;
    if len > limits.max_checkpoint {
        return Err(WireError::CheckpointTooLarge { len, max: limits.max_checkpoint });
    }
    Ok(Message::Checkpoint { len, fixed_length })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dec(bytes: &[u8], dir: Direction) -> Result<Option<(Message, usize)>, WireError> {
        Message::decode(bytes, dir, &Limits::default())
    }

    #[test]
    fn self_rpc_vector() {
        // size 8, RPC, dest length 0, kind 0, method 32, fire-and-forget, args 05 04 03
        let wire = [0x10, 0x00, 0x00, 0x00, 0x40, 0x01, 0x05, 0x04, 0x03];
        let (msg, n) = dec(&wire, Direction::ToCoordinator).unwrap().unwrap();
        assert_eq!(n, wire.len());
        let Message::Rpc(rpc) = &msg else { panic!("not an RPC: {msg:?}") };
        assert_eq!(rpc.destination.as_deref(), Some(""));
        assert_eq!(rpc.body.kind(), RpcKind::Call);
        assert_eq!(rpc.body.method_id(), 32);
        assert_eq!(rpc.body.rpc_type(), RpcType::FireAndForget);
        assert_eq!(rpc.body.args(), [5, 4, 3]);
        assert_eq!(msg.to_bytes(), wire);
        // Delivered to the destination: the destination stripped.
        let delivered = Message::Rpc(Rpc::incoming(rpc.body.clone())).to_bytes();
        assert_eq!(delivered, [0x0E, 0x00, 0x00, 0x40, 0x01, 0x05, 0x04, 0x03]);
    }

    #[test]
    fn attach_to_vector() {
        let wire = [0x0E, 0x01, 0x73, 0x65, 0x72, 0x76, 0x65, 0x72];
        let msg = Message::AttachTo { destination: "server".into() };
        assert_eq!(msg.to_bytes(), wire);
        assert_eq!(dec(&wire, Direction::ToCoordinator).unwrap(), Some((msg, 8)));
    }

    #[test]
    fn padded_take_checkpoint_vector() {
        let wire = [0x82, 0x80, 0x80, 0x80, 0x00, 0x02];
        assert_eq!(dec(&wire, Direction::ToCoordinator).unwrap(), Some((Message::TakeCheckpoint, 6)));
        assert_eq!(Message::TakeCheckpoint.to_bytes(), [0x02, 0x02]);
    }

    #[test]
    fn checkpoint_both_length_forms() {
        // ZigZagLong form: 100 → C8 01.
        let v = Message::Checkpoint { len: 100, fixed_length: false };
        assert_eq!(v.to_bytes(), [0x06, 0x08, 0xC8, 0x01]);
        assert_eq!(dec(&[0x06, 0x08, 0xC8, 0x01], Direction::ToCoordinator).unwrap(), Some((v, 4)));
        // The C client's form: `12 08` + 8 bytes little-endian.
        let c = [0x12, 0x08, 100, 0, 0, 0, 0, 0, 0, 0];
        let f = Message::Checkpoint { len: 100, fixed_length: true };
        assert_eq!(dec(&c, Direction::ToCoordinator).unwrap(), Some((f.clone(), 10)));
        assert_eq!(f.to_bytes(), c);
        // An 8-byte varint is the varint form (2^49 needs 8 bytes as ZigZag).
        let big = Message::Checkpoint { len: 1 << 48, fixed_length: false };
        let bytes = big.to_bytes();
        assert_eq!(bytes.len(), 10);
        let limits = Limits { max_checkpoint: u64::MAX, ..Limits::default() };
        assert_eq!(Message::decode(&bytes, Direction::ToCoordinator, &limits).unwrap(), Some((big, 10)));
    }

    #[test]
    fn checkpoint_over_limit_or_negative() {
        let m = Message::Checkpoint { len: 1 << 40, fixed_length: false }.to_bytes();
        assert!(matches!(dec(&m, Direction::ToCoordinator), Err(WireError::CheckpointTooLarge { .. })));
        let neg = [0x04, 0x08, 0x01]; // ZigZagLong -1
        assert!(matches!(dec(&neg, Direction::ToCoordinator), Err(WireError::Negative { .. })));
    }

    #[test]
    fn typed_errors() {
        assert_eq!(dec(&[0x00], Direction::ToCoordinator), Err(WireError::EmptyMessage));
        assert_eq!(dec(&[0x02, 0x10], Direction::ToCoordinator), Err(WireError::UnknownType(16)));
        assert!(matches!(dec(&[0x01], Direction::ToCoordinator), Err(WireError::MessageSize { .. })));
        assert!(matches!(dec(&[0x04, 0x02, 0x00], Direction::ToCoordinator), Err(WireError::TrailingBytes { .. })));
        assert!(matches!(
            dec(&[0x06, 0x00, 0x09, 0x00, 0x00], Direction::ToApplication),
            Err(WireError::BadRpcKind(9))
        ));
        assert!(matches!(
            dec(&[0x08, 0x00, 0x00, 0x00, 0x07], Direction::ToApplication),
            Err(WireError::BadRpcType(7))
        ));
        let small = Limits { max_message: 4, ..Limits::default() };
        assert!(matches!(
            Message::decode(&[0x0A, 0x09, 1, 2, 3, 4], Direction::ToCoordinator, &small),
            Err(WireError::MessageSize { size: 5, max: 4 })
        ));
        // A batch claiming a huge count with no elements.
        assert!(matches!(
            dec(&[0x0C, 0x05, 0xFE, 0xFF, 0xFF, 0xFF, 0x07], Direction::ToApplication),
            Err(WireError::Truncated { .. })
        ));
        // A batch element that is not an RPC.
        let mut batch = Vec::new();
        Message::RpcBatch(vec![]).encode(&mut batch);
        let mut bad = vec![0x02]; // count 1
        bad.extend_from_slice(&Message::TakeCheckpoint.to_bytes());
        let mut msg = Vec::new();
        varint::put_int(&mut msg, bad.len() as i32 + 1);
        msg.push(5);
        msg.extend_from_slice(&bad);
        assert_eq!(dec(&msg, Direction::ToApplication), Err(WireError::BatchElementNotRpc(2)));
    }

    #[test]
    fn incomplete_is_none() {
        let wire = Message::AttachTo { destination: "server".into() }.to_bytes();
        for cut in 0..wire.len() {
            assert_eq!(dec(&wire[..cut], Direction::ToCoordinator).unwrap(), None, "cut at {cut}");
        }
    }

    fn arb_body() -> impl Strategy<Value = RpcBody> {
        (0u8..4, any::<i32>(), 0u8..3, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(k, m, t, args)| {
            let mut raw = vec![k];
            varint::put_int(&mut raw, m);
            raw.push(t);
            raw.extend_from_slice(&args);
            RpcBody::parse(raw.into()).expect("valid body")
        })
    }

    pub(crate) fn arb_message(dir: Direction) -> impl Strategy<Value = Message> {
        let rpc = move || {
            (arb_body(), "[a-z]{0,12}").prop_map(move |(body, dest)| match dir {
                Direction::ToCoordinator => Rpc::outgoing(dest, body),
                Direction::ToApplication => Rpc::incoming(body),
            })
        };
        let bytes = || proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
        prop_oneof![
            rpc().prop_map(Message::Rpc),
            "[a-z]{0,16}".prop_map(|destination| Message::AttachTo { destination }),
            Just(Message::TakeCheckpoint),
            (any::<i64>(), any::<i64>()).prop_map(|(seq, replayable_seq)| Message::Commit { seq, replayable_seq }),
            (any::<i64>(), any::<i64>()).prop_map(|(seq, replayable_seq)| Message::ReplayFrom { seq, replayable_seq }),
            proptest::collection::vec(rpc(), 0..4).prop_map(Message::RpcBatch),
            bytes().prop_map(Message::Ping),
            bytes().prop_map(Message::PingReturn),
            (0u64..(1 << 30), any::<bool>()).prop_map(|(len, fixed_length)| Message::Checkpoint { len, fixed_length }),
            bytes().prop_map(Message::InitialMessage),
            Just(Message::UpgradeTakeCheckpoint),
            Just(Message::TakeBecomingPrimaryCheckpoint),
            Just(Message::UpgradeService),
            (any::<i32>(), proptest::collection::vec(rpc(), 0..4))
                .prop_map(|(replayable, rpcs)| Message::CountReplayableRpcBatch { replayable, rpcs }),
            any::<i64>().prop_map(|seq| Message::TrimTo { seq }),
            Just(Message::BecomingPrimary),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip_to_coordinator(msg in arb_message(Direction::ToCoordinator)) {
            let bytes = msg.to_bytes();
            prop_assert_eq!(dec(&bytes, Direction::ToCoordinator).unwrap(), Some((msg, bytes.len())));
        }

        #[test]
        fn messages_round_trip_to_application(msg in arb_message(Direction::ToApplication)) {
            let bytes = msg.to_bytes();
            prop_assert_eq!(dec(&bytes, Direction::ToApplication).unwrap(), Some((msg, bytes.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) {
            let _ = dec(&bytes, Direction::ToCoordinator);
            let _ = dec(&bytes, Direction::ToApplication);
        }
    }
}
