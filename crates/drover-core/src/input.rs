//! What goes into the core and what comes out of it.
//!
//! Inputs are journaled (postcard-encoded, see `Controller`'s `StateMachine` impl),
//! so they hold plain data: an Any travels as its type URL and bytes and is decoded
//! through `drover_proto::Payload` when applied. Outputs are never journaled.

use drover_proto::v1;
use serde::{Deserialize, Serialize};

/// How a streamer is picked for a pair without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Uniformly among capable online nodes (the seed's rule).
    Random,
    /// The capable online node streaming the fewest pairs; ties at random.
    Balanced,
}

/// The core's settings. They arrive journaled in [`Event::ControllerStarted`], so a
/// replay applies the same settings at the same point as the live run did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// A node that sends nothing for this long is gone.
    pub node_timeout_ms: i64,
    /// A streamer that sends nothing for a pair for this long loses it.
    pub stale_after_ms: i64,
    /// After a restart, how long previous streamers have to come back.
    pub rejoin_grace_ms: i64,
    /// Streamer selection.
    pub policy: Policy,
    /// Gone nodes stay listed this long.
    pub gone_retention_ms: i64,
    /// The controller's version, for `ControllerAppVersionV1Reply`.
    pub version: String,
    /// Seed of the core's generator (used once, when the state is created).
    pub seed: u64,
    /// The manager id workers address (seed 2); a worker allows managers by this id.
    pub manager_id: String,
    /// A task attempt may overrun its timeout by this much before the manager aborts it.
    pub task_grace_ms: i64,
    /// Attempts on a worker that is gone are given up (and retried) after this long.
    pub worker_grace_ms: i64,
    /// Finished tasks remembered (the oldest are forgotten first).
    pub task_retention: usize,
    /// Bytes of finished tasks' outputs kept in the state (the oldest outputs are dropped first).
    pub task_output_budget: u64,
    /// A queued task no registered worker would take (none fits, or all refused) for
    /// this long fails, with the reason.
    pub unplaceable_after_ms: i64,
}

/// Longest duration a setting may hold once applied (100 years): a journal that says
/// more (damaged, or written by hand) cannot make the core's time arithmetic overflow.
pub const MAX_SETTING_MS: i64 = 100 * 365 * 86_400_000;
/// Latest time the core accepts as "now" (the end of year 9999, Unix ms); a later
/// input time counts as this.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

impl Config {
    /// The settings with every duration within `0..=MAX_SETTING_MS` (a no-op for any
    /// value the shell accepts).
    pub fn bounded(self) -> Config {
        let b = |ms: i64| ms.clamp(0, MAX_SETTING_MS);
        Config {
            node_timeout_ms: b(self.node_timeout_ms),
            stale_after_ms: b(self.stale_after_ms),
            rejoin_grace_ms: b(self.rejoin_grace_ms),
            gone_retention_ms: b(self.gone_retention_ms),
            task_grace_ms: b(self.task_grace_ms),
            worker_grace_ms: b(self.worker_grace_ms),
            unplaceable_after_ms: b(self.unplaceable_after_ms),
            ..self
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_timeout_ms: 3_000,
            stale_after_ms: 10_000,
            rejoin_grace_ms: 5_000,
            policy: Policy::Random,
            gone_retention_ms: 600_000,
            version: String::new(),
            seed: 0x0D12_0FE2,
            manager_id: "controller".into(),
            task_grace_ms: 5_000,
            worker_grace_ms: 5_000,
            task_retention: 10_000,
            task_output_budget: 64 << 20,
            unplaceable_after_ms: 60_000,
        }
    }
}

/// An input, stamped with the time the shell accepted it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// What happened.
    pub event: Event,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The controller process started (first start or after a crash): every previous
    /// connection is gone; previous streamers get the rejoin grace.
    ControllerStarted {
        /// The settings of this run.
        config: Config,
    },
    /// Time passed (the shell sends this when `next_deadline` is due).
    Tick,
    /// A node's command stream opened (its ticket checked by the shell).
    NodeConnected {
        /// The node's uuid.
        node: String,
        /// The shell's id for this connection.
        session: u64,
    },
    /// A message on a node's stream.
    NodeMessage {
        /// The node's uuid.
        node: String,
        /// The connection.
        session: u64,
        /// `StreamFromNode.request_id`.
        request_id: String,
        /// `StreamFromNode.from_uuid`.
        from_uuid: Option<String>,
        /// The Any's type URL.
        type_url: String,
        /// The Any's bytes.
        value: Vec<u8>,
    },
    /// A node's stream ended.
    NodeDisconnected {
        /// The node's uuid.
        node: String,
        /// The connection.
        session: u64,
    },
    /// A CLI stream opened.
    CliConnected {
        /// The connection.
        session: u64,
        /// What the operator's token allows (journaled as the byte `admin: bool` was:
        /// read 0, admin 1).
        role: OperatorRole,
    },
    /// A message on a CLI stream.
    CliMessage {
        /// The connection.
        session: u64,
        /// `StreamFromCli.stream_id`.
        stream_id: String,
        /// `StreamFromCli.cli_uuid`.
        cli_uuid: String,
        /// `StreamFromCli.node_uuids`.
        node_uuids: Vec<String>,
        /// `StreamFromCli.request_id`.
        request_id: String,
        /// The Any's type URL.
        type_url: String,
        /// The Any's bytes.
        value: Vec<u8>,
    },
    /// A CLI stream ended.
    CliDisconnected {
        /// The connection.
        session: u64,
    },
    /// Create a token. The shell generated the secret; only its hash is journaled.
    /// `session` 0 means the controller itself (the first admin token).
    TokenCreate {
        /// The CLI connection that asked (0: none).
        session: u64,
        /// Its stream id.
        stream_id: String,
        /// The token's public id.
        id: String,
        /// SHA-256 of the secret.
        secret_hash: [u8; 32],
        /// `drover.v1.TokenRole` as a number.
        role: i32,
        /// Lifetime (0: forever).
        ttl_ms: u64,
        /// Uses (0: unlimited).
        uses: u32,
        /// Free text.
        description: String,
    },
    /// A node presented a join token at admission.
    AdmissionAttempt {
        /// The shell's id for the attempt.
        attempt: u64,
        /// The node id from `conn:establish`.
        node: String,
        /// The token's public id.
        token_id: String,
        /// SHA-256 of the presented secret.
        secret_hash: [u8; 32],
    },
    // Variants below were added after the first release: new variants go at the end,
    // so inputs journaled by an earlier release still decode.
    /// A node presented a credential at admission (supersedes `AdmissionAttempt`, which
    /// is still read from older journals).
    Admission {
        /// The shell's id for the attempt.
        attempt: u64,
        /// The node id from `conn:establish`.
        node: String,
        /// What it presented.
        credential: Credential,
    },
    /// A node stream opened with a valid ticket of `generation` (supersedes
    /// `NodeConnected`, which is still read from older journals: it has no generation
    /// to check).
    NodeOpened {
        /// The node id (the ticket's).
        node: String,
        /// The shell's id for the connection.
        session: u64,
        /// The admission generation the ticket carries.
        generation: u64,
    },
    /// A node's message the shell could not decode (an unknown type or bad bytes): only
    /// a bounded digest is journaled, so the core can answer and count it.
    NodeRefused {
        /// The node.
        node: String,
        /// Its connection.
        session: u64,
        /// The message's request id (truncated).
        request_id: String,
        /// Its type URL (truncated).
        type_url: String,
        /// Why it was refused.
        reason: String,
    },
    /// A CLI command the shell could not decode: a bounded digest, as for `NodeRefused`.
    CliRefused {
        /// The CLI's connection.
        session: u64,
        /// The stream id the answer goes back on (truncated).
        stream_id: String,
        /// The command's type URL (truncated).
        type_url: String,
        /// Why it was refused.
        reason: String,
    },
}

/// What an operator's token allows on a CLI stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorRole {
    /// Lists, status, prices: nothing that changes the fleet or reveals tokens.
    Read,
    /// Everything.
    Admin,
}

/// Why an admission was refused: decided by the core (the token, the node id's
/// binding) or by the shell before the core (a malformed credential, the rate limit).
/// Carried to the node's admission connection (as its text) and to
/// `drover_admission_refusals_total{reason}` (as [`reason`](Self::reason)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdmissionRefusal {
    /// No such token, or the secret does not match (the two are not told apart).
    UnknownToken,
    /// A read or admin token was presented for a node.
    NotJoinToken,
    /// The token was revoked.
    Revoked,
    /// The token expired.
    Expired,
    /// The token's uses are spent.
    UsedUp,
    /// The node id belongs to another credential.
    IdTaken {
        /// The node id.
        node: String,
        /// What it is bound to.
        holder: String,
    },
    /// The table of node identities is full.
    TooManyIdentities,
    /// What was presented is not a credential (token syntax, certificate), per the shell.
    Malformed(String),
    /// Too many failed attempts with this credential from this address.
    RateLimited,
    /// This controller does not lead its cluster (per the shell; says who does).
    NotLeader(String),
}

impl AdmissionRefusal {
    /// Every [`reason`](Self::reason), for metrics that list each (zeros included).
    pub const REASONS: [&'static str; 10] = [
        "unknown_token",
        "not_join_token",
        "revoked",
        "expired",
        "used_up",
        "identity",
        "identity_limit",
        "malformed",
        "rate_limited",
        "not_leader",
    ];

    /// The metric label of this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            AdmissionRefusal::UnknownToken => "unknown_token",
            AdmissionRefusal::NotJoinToken => "not_join_token",
            AdmissionRefusal::Revoked => "revoked",
            AdmissionRefusal::Expired => "expired",
            AdmissionRefusal::UsedUp => "used_up",
            AdmissionRefusal::IdTaken { .. } => "identity",
            AdmissionRefusal::TooManyIdentities => "identity_limit",
            AdmissionRefusal::Malformed(_) => "malformed",
            AdmissionRefusal::RateLimited => "rate_limited",
            AdmissionRefusal::NotLeader(_) => "not_leader",
        }
    }

    /// The text of a refusal that carries no data (for callers that need a
    /// `&'static str`); the others give a general phrase.
    pub fn text(&self) -> &'static str {
        match self {
            AdmissionRefusal::UnknownToken => "unknown token",
            AdmissionRefusal::NotJoinToken => "not a join token",
            AdmissionRefusal::Revoked => "token revoked",
            AdmissionRefusal::Expired => "token expired",
            AdmissionRefusal::UsedUp => "token has no uses left",
            AdmissionRefusal::IdTaken { .. } => "node id belongs to another credential",
            AdmissionRefusal::TooManyIdentities => "too many node identities: forget gone nodes first",
            AdmissionRefusal::Malformed(_) => "malformed credential",
            AdmissionRefusal::RateLimited => {
                "too many failed attempts with this credential from this address; retry later"
            }
            AdmissionRefusal::NotLeader(_) => "this controller does not lead its cluster",
        }
    }
}

impl std::fmt::Display for AdmissionRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdmissionRefusal::IdTaken { node, holder } => write!(
                f,
                "node id {node} belongs to another credential ({holder}): an operator frees it with `drover forget {node}` once that node is gone"
            ),
            AdmissionRefusal::Malformed(why) | AdmissionRefusal::NotLeader(why) => f.write_str(why),
            other => f.write_str(other.text()),
        }
    }
}

impl std::error::Error for AdmissionRefusal {}

/// What a node presented at admission.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credential {
    /// A join token (checked by the core).
    Token {
        /// The token's public id.
        id: String,
        /// SHA-256 of the presented secret.
        secret_hash: [u8; 32],
    },
    /// A client certificate naming the node id, chained to the cluster CA and proven by
    /// the TLS handshake (checked by the shell, which holds the TLS session).
    Certificate,
}

impl Credential {
    /// What a node id is bound to when this credential admits it.
    pub fn binding(&self) -> String {
        match self {
            Credential::Token { id, .. } => Credential::token_binding(id),
            Credential::Certificate => "certificate".into(),
        }
    }

    /// What the join token `id` binds node ids to.
    pub fn token_binding(id: &str) -> String {
        format!("token {id}")
    }
}

impl Event {
    /// A node's message carrying `payload` (no `from_uuid`), as the shell builds it
    /// from a `StreamFromNode`.
    pub fn node_message(
        node: &str,
        session: u64,
        request_id: &str,
        payload: impl Into<drover_proto::Payload>,
    ) -> Event {
        let any = payload.into().to_any();
        Event::NodeMessage {
            node: node.to_owned(),
            session,
            request_id: request_id.to_owned(),
            from_uuid: None,
            type_url: any.type_url,
            value: any.value,
        }
    }

    /// A CLI's command carrying `payload` on `stream_id` (no request id), addressed to
    /// `node_uuids`, as the shell builds it from a `StreamFromCli`.
    pub fn cli_message(
        session: u64,
        stream_id: &str,
        cli_uuid: &str,
        node_uuids: Vec<String>,
        payload: impl Into<drover_proto::Payload>,
    ) -> Event {
        let any = payload.into().to_any();
        Event::CliMessage {
            session,
            stream_id: stream_id.to_owned(),
            cli_uuid: cli_uuid.to_owned(),
            node_uuids,
            request_id: String::new(),
            type_url: any.type_url,
            value: any.value,
        }
    }
}

/// What the core asks the shell to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send on a node's stream (only if that connection is still the one open).
    ToNode {
        /// The node.
        node: String,
        /// The connection.
        session: u64,
        /// The envelope.
        msg: v1::StreamToNode,
    },
    /// Send on a CLI stream.
    ToCli {
        /// The connection.
        session: u64,
        /// The envelope.
        msg: v1::StreamToCli,
    },
    /// The verdict on an admission attempt.
    AdmissionVerdict {
        /// The attempt.
        attempt: u64,
        /// `Ok` with the node's new admission generation (for its ticket), or why the
        /// credential was refused.
        result: Result<u64, AdmissionRefusal>,
    },
    /// Evict a node: `conn:close` on its admission control channel.
    EvictNode {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// A pair got a streamer (for the operator's log; nothing to send).
    Assigned {
        /// The pair.
        pair: String,
        /// The new streamer (or the incoming one of a make-before-break move).
        node: String,
        /// Its epoch.
        epoch: u64,
        /// Why the pair moved.
        reason: &'static str,
    },
    /// A task reached its end (completed, failed or aborted), for the operator's log
    /// and the dashboard's recent events; nothing to send.
    TaskEnded {
        /// The task id.
        task: String,
        /// completed, failed or aborted.
        state: &'static str,
        /// The exit code, or why it failed.
        detail: String,
    },
    /// End a node's stream (kick, missed keepalives).
    CloseNode {
        /// The node.
        node: String,
        /// The connection.
        session: u64,
        /// Why.
        reason: String,
    },
}
