//! Sans-IO codecs for the two byte-level protocols drover speaks.
//!
//! * [`admission`]: seed 3's text packets, `CODE;;PAYLOAD<EOF>` with a JSON object as
//!   payload, spoken on the controller's admission port.
//! * [`ambrosia`]: AMBROSIA's variable-length integers, 24-byte log records and typed
//!   messages, used by drover's journal and by `drover coordinator`.
//!
//! Nothing here does I/O: encoders append to a buffer, decoders are fed bytes as they
//! arrive (split anywhere) and hand back whole values. Every size a peer controls has a
//! limit, and every malformed input is a typed error, never a panic.

pub mod admission;
pub mod ambrosia;

/// The wall clock in Unix milliseconds (0 if the clock is before 1970): the one
/// reading every shell uses for the times it puts on the wire and in the journal
/// (input stamps, tickets, task reports, coordinator timestamps). The codecs never
/// call it; the shells around them do.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
