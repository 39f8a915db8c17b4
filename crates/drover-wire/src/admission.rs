//! Seed 3's admission packets: `CODE;;PAYLOAD<EOF>`, where CODE is `prefix:command`
//! (`conn:` for connection, `auth:` for authentication) and PAYLOAD is a JSON object.
//!
//! The encoder escapes every `<` in the JSON as `\u003c` (a `<` can only occur inside a
//! JSON string, where the escape means the same), so `<EOF>` never occurs inside a
//! payload and the decoder can frame on it. The decoder is fed bytes as they arrive: a
//! packet may be split over any number of reads and one read may hold several packets;
//! nothing after an `<EOF>` is lost. A packet longer than [`MAX_PACKET`] is refused
//! before more than that is buffered. An empty payload (`conn:startAuth;;<EOF>`, as the
//! seed writes packets without a payload) reads as the empty object.

use std::collections::VecDeque;
use std::fmt;

use serde_json::{Map, Value};

/// Largest packet accepted, `<EOF>` included: 64 KiB.
pub const MAX_PACKET: usize = 64 * 1024;
/// The end-of-information tag.
pub const EOF_TAG: &[u8] = b"<EOF>";
const SEPARATOR: &[u8] = b";;";

/// A packet code: the seed's `prefix:command` pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// `conn:establish`, node → controller: `{id, version, type}`.
    ConnEstablish,
    /// `conn:startAuth`, controller → node: the version passed.
    ConnStartAuth,
    /// `conn:close`, either way: `{reason}`.
    ConnClose,
    /// `conn:alive`, either way: keepalive.
    ConnAlive,
    /// `auth:start`, node → controller: `{cert}`.
    AuthStart,
    /// `auth:ack`: controller → node `{upstream, ticket}`; node → controller `{}`.
    AuthAck,
    /// `auth:dec`, controller → node: `{reason}`.
    AuthDec,
}

impl Code {
    /// Every code, for tests and tables.
    pub const ALL: [Code; 7] = [
        Code::ConnEstablish,
        Code::ConnStartAuth,
        Code::ConnClose,
        Code::ConnAlive,
        Code::AuthStart,
        Code::AuthAck,
        Code::AuthDec,
    ];

    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::ConnEstablish => "conn:establish",
            Code::ConnStartAuth => "conn:startAuth",
            Code::ConnClose => "conn:close",
            Code::ConnAlive => "conn:alive",
            Code::AuthStart => "auth:start",
            Code::AuthAck => "auth:ack",
            Code::AuthDec => "auth:dec",
        }
    }

    /// The code for its wire form.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One admission packet.
#[derive(Clone, Debug, PartialEq)]
pub struct Packet {
    /// What the packet is.
    pub code: Code,
    /// Its key/value payload.
    pub payload: Map<String, Value>,
}

impl Packet {
    /// A packet with an empty payload.
    pub fn new(code: Code) -> Self {
        Packet { code, payload: Map::new() }
    }

    /// Adds a string field.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.payload.insert(key.to_owned(), value.into());
        self
    }

    /// A string field of the payload, if present and a string.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.payload.get(key).and_then(Value::as_str)
    }

    /// Appends the packet's wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.code.as_str().as_bytes());
        out.extend_from_slice(SEPARATOR);
        // Serializing a map of JSON values cannot fail.
        let json = Value::Object(self.payload.clone()).to_string();
        out.extend_from_slice(json.replace('<', "\\u003c").as_bytes());
        out.extend_from_slice(EOF_TAG);
    }

    /// The packet's wire form as a fresh vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// Everything that can be wrong with admission bytes. The controller answers each
/// with `conn:close {"reason": <Display of the error>}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// No `<EOF>` within [`MAX_PACKET`] bytes.
    #[error("packet exceeds {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// No `;;` between code and payload.
    #[error("packet has no ';;' separator")]
    MissingSeparator,
    /// A code the protocol does not have.
    #[error("unknown packet code {0:?}")]
    UnknownCode(String),
    /// Code or payload is not UTF-8.
    #[error("packet is not UTF-8")]
    InvalidUtf8,
    /// The payload is not JSON.
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(String),
    /// The payload is JSON but not an object.
    #[error("payload is not a JSON object")]
    NotAnObject,
}

impl PacketError {
    /// Whether the stream can no longer be framed after this error (the decoder
    /// refuses everything after it). Errors in a well-framed packet leave the
    /// following packets readable.
    pub fn is_fatal(&self) -> bool {
        matches!(self, PacketError::TooLarge { .. })
    }
}

/// Parses one packet without its `<EOF>`.
pub fn parse_packet(bytes: &[u8]) -> Result<Packet, PacketError> {
    let sep = memchr::memmem::find(bytes, SEPARATOR).ok_or(PacketError::MissingSeparator)?;
    let code = std::str::from_utf8(&bytes[..sep]).map_err(|_| PacketError::InvalidUtf8)?;
    let code = Code::parse(code).ok_or_else(|| PacketError::UnknownCode(code.chars().take(64).collect()))?;
    let payload = &bytes[sep + SEPARATOR.len()..];
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Packet::new(code));
    }
    let payload = std::str::from_utf8(payload).map_err(|_| PacketError::InvalidUtf8)?;
    match serde_json::from_str::<Value>(payload) {
        Ok(Value::Object(payload)) => Ok(Packet { code, payload }),
        Ok(_) => Err(PacketError::NotAnObject),
        Err(e) => Err(PacketError::InvalidJson(e.to_string())),
    }
}

/// Incremental packet decoder.
#[derive(Debug, Default)]
pub struct PacketDecoder {
    /// Bytes of the packet being assembled (never more than `MAX_PACKET`).
    partial: Vec<u8>,
    /// Decoded packets (and per-packet errors) not yet taken.
    ready: VecDeque<Result<Packet, PacketError>>,
    /// Set after a framing error: the stream is unusable.
    failed: bool,
}

impl PacketDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        PacketDecoder::default()
    }

    /// Adds bytes as they arrived. Fails if a packet grows past [`MAX_PACKET`] without
    /// an `<EOF>`; bytes past that point are not buffered.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), PacketError> {
        if self.failed {
            return Err(PacketError::TooLarge { max: MAX_PACKET });
        }
        while !data.is_empty() {
            // Look for `<EOF>` in the partial packet's last 4 bytes plus the new data,
            // taking no more new bytes than the limit leaves room for.
            let room = MAX_PACKET - self.partial.len();
            let take = data.len().min(room);
            let overlap = self.partial.len().min(EOF_TAG.len() - 1);
            let old_len = self.partial.len();
            self.partial.extend_from_slice(&data[..take]);
            match memchr::memmem::find(&self.partial[old_len - overlap..], EOF_TAG) {
                Some(at) => {
                    let end = old_len - overlap + at;
                    let consumed = end + EOF_TAG.len() - old_len;
                    self.ready.push_back(parse_packet(&self.partial[..end]));
                    self.partial.clear();
                    data = &data[consumed..];
                }
                None if self.partial.len() >= MAX_PACKET => {
                    self.failed = true;
                    self.partial = Vec::new();
                    return Err(PacketError::TooLarge { max: MAX_PACKET });
                }
                None => data = &data[take..],
            }
        }
        Ok(())
    }

    /// The next decoded packet (or the error of a malformed one), in arrival order.
    pub fn next_packet(&mut self) -> Option<Result<Packet, PacketError>> {
        self.ready.pop_front()
    }

    /// Bytes of an incomplete packet held.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }
}

/// What a connection's first bytes say when they are not seed-3 packets at all: an
/// HTTP/2 client preface (a gRPC client, such as drover's CLI, pointed at the
/// admission port) or an HTTP/1 request (a browser or curl). `None` for anything else,
/// which the packet decoder then judges.
pub fn foreign_protocol(first: &[u8]) -> Option<&'static str> {
    if first.starts_with(b"PRI * HTTP/2") {
        return Some("HTTP/2 (a gRPC client?)");
    }
    const METHODS: [&[u8]; 7] = [b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH "];
    METHODS.iter().any(|m| first.starts_with(m)).then_some("HTTP/1 (a browser or curl?)")
}

#[cfg(test)]
mod tests {

    #[test]
    fn foreign_protocols_are_named_and_packets_are_not() {
        assert!(foreign_protocol(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap().contains("HTTP/2"));
        assert!(foreign_protocol(b"GET / HTTP/1.1\r\n").unwrap().contains("HTTP/1"));
        assert_eq!(foreign_protocol(b"conn:establish;;{}<EOF>"), None);
        assert_eq!(foreign_protocol(b""), None);
    }
    use super::*;
    use proptest::prelude::*;

    fn decode_all(chunks: &[&[u8]]) -> Vec<Result<Packet, PacketError>> {
        let mut d = PacketDecoder::new();
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c).unwrap();
            while let Some(p) = d.next_packet() {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn seed_example_packet() {
        let p = Packet::new(Code::ConnEstablish).with("id", "n1").with("version", "0.1.0").with("type", "node");
        let bytes = p.to_bytes();
        assert!(bytes.starts_with(b"conn:establish;;{"));
        assert!(bytes.ends_with(b"}<EOF>"));
        assert_eq!(decode_all(&[&bytes]), [Ok(p)]);
    }

    /// Regression (found by the `admission_packets` fuzz target): a number with more
    /// digits than an f64 holds decoded to a float that did not survive re-encoding
    /// (serde_json's default float parsing is not correctly rounded), so a re-encoded
    /// packet decoded to a different one. `float_roundtrip` parses exactly.
    #[test]
    fn long_numbers_survive_reencoding() {
        let bytes =
            br#"conn:establish;;{"id":"n0","version":66666666666666666666666666666666666666666666666666666}<EOF>"#;
        let decoded = decode_all(&[bytes]);
        let [Ok(p)] = decoded.as_slice() else { panic!("does not decode: {decoded:?}") };
        assert_eq!(decode_all(&[&p.to_bytes()]), [Ok(p.clone())]);
    }

    #[test]
    fn escapes_angle_brackets() {
        let p = Packet::new(Code::ConnClose).with("reason", "bad <EOF> inside");
        let bytes = p.to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text.matches("<EOF>").count(), 1);
        assert!(text.contains("\\u003cEOF>"));
        assert_eq!(decode_all(&[&bytes]), [Ok(p)]);
    }

    #[test]
    fn pipelined_packets_in_one_read() {
        let a = Packet::new(Code::AuthAck);
        let b = Packet::new(Code::ConnAlive);
        let mut bytes = a.to_bytes();
        b.encode(&mut bytes);
        assert_eq!(decode_all(&[&bytes]), [Ok(a), Ok(b)]);
    }

    #[test]
    fn split_inside_the_eof_tag() {
        let p = Packet::new(Code::ConnStartAuth).to_bytes();
        for cut in 0..p.len() {
            assert_eq!(decode_all(&[&p[..cut], &p[cut..]]), [Ok(Packet::new(Code::ConnStartAuth))], "cut {cut}");
        }
    }

    #[test]
    fn empty_payload_is_the_empty_object() {
        assert_eq!(decode_all(&[b"conn:startAuth;;<EOF>"]), [Ok(Packet::new(Code::ConnStartAuth))]);
    }

    #[test]
    fn typed_errors_and_recovery_after_them() {
        let out = decode_all(&[b"conn:nope;;{}<EOF>conn:alive;;{}<EOF>"]);
        assert_eq!(out, [Err(PacketError::UnknownCode("conn:nope".into())), Ok(Packet::new(Code::ConnAlive))]);
        assert_eq!(decode_all(&[b"conn:alive{}<EOF>"]), [Err(PacketError::MissingSeparator)]);
        assert!(matches!(decode_all(&[b"conn:alive;;{\"a\":<EOF>"])[0], Err(PacketError::InvalidJson(_))));
        assert_eq!(decode_all(&[b"conn:alive;;[1,2]<EOF>"]), [Err(PacketError::NotAnObject)]);
        assert_eq!(decode_all(&[b"conn:alive;;\"x\"<EOF>"]), [Err(PacketError::NotAnObject)]);
        assert_eq!(decode_all(&[b"conn:alive;;\xff\xfe<EOF>"]), [Err(PacketError::InvalidUtf8)]);
    }

    #[test]
    fn oversize_is_refused_before_buffering_more() {
        let mut d = PacketDecoder::new();
        let big = vec![b'a'; MAX_PACKET + 10];
        assert_eq!(d.feed(&big), Err(PacketError::TooLarge { max: MAX_PACKET }));
        assert_eq!(d.buffered(), 0);
        assert!(d.feed(b"conn:alive;;{}<EOF>").is_err(), "a failed stream stays failed");
        // Fed in small pieces, the limit holds too.
        let mut d = PacketDecoder::new();
        let mut err = None;
        for chunk in big.chunks(1000) {
            if let Err(e) = d.feed(chunk) {
                err = Some(e);
                break;
            }
            assert!(d.buffered() < MAX_PACKET);
        }
        assert_eq!(err, Some(PacketError::TooLarge { max: MAX_PACKET }));
        // Exactly at the limit is fine.
        let mut p = b"conn:close;;{\"reason\":\"".to_vec();
        p.resize(MAX_PACKET - 2 - 5, b'x');
        p.extend_from_slice(b"\"}<EOF>");
        assert_eq!(p.len(), MAX_PACKET);
        assert!(decode_all(&[&p])[0].is_ok());
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "(?s).{0,16}".prop_map(Value::String),
            Just(Value::String("<EOF>;;<".into())),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z<;]{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_packet() -> impl Strategy<Value = Packet> {
        (0..Code::ALL.len(), proptest::collection::btree_map("(?s).{0,8}", arb_value(), 0..4))
            .prop_map(|(c, m)| Packet { code: Code::ALL[c], payload: m.into_iter().collect() })
    }

    proptest! {
        #[test]
        fn any_packets_any_splits(
            packets in proptest::collection::vec(arb_packet(), 0..6),
            splits in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut bytes = Vec::new();
            for p in &packets {
                p.encode(&mut bytes);
            }
            let mut cuts: Vec<usize> = splits.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                chunks.push(&bytes[at..cut]);
                at = cut;
            }
            let expected: Vec<_> = packets.into_iter().map(Ok).collect();
            prop_assert_eq!(decode_all(&chunks), expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..256), 0..8)) {
            let mut d = PacketDecoder::new();
            for c in &chunks {
                let _ = d.feed(c);
                while d.next_packet().is_some() {}
                prop_assert!(d.buffered() <= MAX_PACKET);
            }
        }
    }
}
