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
