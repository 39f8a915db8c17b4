//! Admission (seed 3): what a node must pass before it may open a command stream.
//!
//! Everything here is sans-IO. [`server::ServerConn`] is the controller's side of one
//! admission connection and [`client::NodeConn`] the node's: both take decoded packets
//! (and the time) and return what to send and whether to close, following the seed's
//! flow exactly:
//!
//! ```text
//! node → conn:establish {id, version, type}
//!        controller → conn:startAuth {}            (version passes the policy)
//!                   | conn:close {reason}          (it does not)
//! node → auth:start {cert}
//!        controller → auth:ack {upstream, ticket}  (credential accepted)
//!                   | auth:dec {reason}            (refused)
//! node → auth:ack {}                               (or conn:close after auth:dec)
//! ```
//!
//! after which the connection stays open as a control channel (`conn:alive` both
//! ways; a new `auth:ack` moves the node; `conn:close` evicts it). Checking the
//! credential itself is the controller's business (join tokens live in its journaled
//! state), so the server state machine asks for a verdict ([`server::Action::Verify`])
//! and is told the answer. [`version`] is the version policy, [`token`] the join-token
//! format, [`ticket`] the signed session tickets and [`limiter`] the per-address
//! failure limiter.

pub mod client;
pub mod limiter;
pub mod server;
pub mod ticket;
pub mod token;
pub mod version;
