//! drover's wire schema, `drover.v1`, as Rust types.
//!
//! The messages are generated from `proto/drover/v1/drover.proto` at build time. Every
//! command, reply and notification travels inside a `google.protobuf.Any`; this crate
//! owns the one table that maps a type URL to its message ([`Payload`]), so the rest of
//! drover matches on an enum and an Any nobody handles is an ordinary value
//! ([`Payload::Unknown`]) rather than an error path repeated at every call site.
//!
//! With the `grpc` feature the tonic client and server for `drover.v1.Controller` are
//! generated too; the sans-IO core depends on this crate without it, so it never links
//! an async runtime.

/// Generated `drover.v1` messages (and, with `grpc`, the service).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/drover.v1.rs"));
}

mod payload;

pub use payload::{Payload, PayloadError, TABLE, type_url};
pub use prost::{Message, Name};
pub use prost_types::Any;

/// The encoded `FileDescriptorSet` of the schema, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/drover_descriptor.bin"));

/// Formats an exact decimal (`mantissa` × 10^-`scale`) without going through floats.
pub fn format_decimal(mantissa: i64, scale: u32) -> String {
    let digits = mantissa.unsigned_abs().to_string();
    let scale = scale as usize;
    let s = if scale == 0 {
        digits
    } else if digits.len() > scale {
        format!("{}.{}", &digits[..digits.len() - scale], &digits[digits.len() - scale..])
    } else {
        format!("0.{}{}", "0".repeat(scale - digits.len()), digits)
    };
    if mantissa < 0 { format!("-{s}") } else { s }
}

/// The protocol name and version the controller reports in `ControllerAppVersionV1Reply`.
pub const PROTOCOL: &str = "drover.v1";

/// gRPC metadata on a cluster member's `UNAVAILABLE` answer when it does not lead: the
/// leader's gRPC address (`HOST:PORT`), which the CLI reconnects to.
pub const LEADER_METADATA: &str = "drover-leader";

/// The longest node id, in bytes: at admission (`conn:establish`), on a node stream
/// (`node_uuid`) and in the core. The one definition all three use.
pub const MAX_NODE_ID: usize = 128;
