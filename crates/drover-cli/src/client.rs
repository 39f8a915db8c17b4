//! One CLI request: open `CliCommandStream`, send the command, and collect replies
//! until the controller's `CliResponseCountV1Notify` says all have come, or until the
//! timeout. No Control-C needed.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use drover_proto::v1::controller_client::ControllerClient;
use drover_proto::{Payload, v1};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Why a request failed outright.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The controller could not be reached.
    #[error(
        "cannot reach the controller at {addr}: {reason} (is `drover controller` running? set --controller or DROVER_CONTROLLER)"
    )]
    Connect {
        /// The address tried.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The stream failed mid-request.
    #[error("controller stream failed: {0}")]
    Stream(String),
    /// A reply could not be decoded.
    #[error("bad reply: {0}")]
    Decode(String),
    /// The operator asked for something that cannot be done.
    #[error("{0}")]
    Usage(String),
}

/// One reply.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The node that answered (absent for controller replies).
    pub node: Option<String>,
    /// What it said.
    pub payload: Payload,
}

/// Everything a request got back.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Replies the controller said to expect.
    pub expected: Option<u32>,
    /// Nodes the controller said were offline or unknown.
    pub missing: Vec<String>,
    /// The replies, in arrival order.
    pub replies: Vec<Reply>,
    /// Whether the timeout ended the wait before every expected reply came.
    pub timed_out: bool,
}

impl Outcome {
    /// Every expected reply came and no node was missing.
    pub fn complete(&self) -> bool {
        !self.timed_out && self.missing.is_empty()
    }
}

/// Where and how to reach the controller.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// gRPC endpoint (`http://host:port`; a bare `host:port` is accepted).
    pub controller: String,
    /// How long to wait for replies.
    pub timeout: Duration,
    /// JSON output instead of tables.
    pub json: bool,
    /// The operator token (`dt1.…`).
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the controller's TLS certificate; `None`: plain.
    pub ca: Option<Vec<u8>>,
}

impl Ctx {
    /// The endpoint as a URL.
    pub fn url(&self) -> String {
        let host = self.controller.trim_start_matches("http://").trim_start_matches("https://");
        format!("{}://{host}", if self.ca.is_some() { "https" } else { "http" })
    }
}

fn stream_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    format!("{:016x}", h.finish())
}

/// An open CLI stream.
pub struct Session {
    tx: mpsc::Sender<v1::StreamFromCli>,
    inbound: tonic::Streaming<v1::StreamToCli>,
    cli_uuid: String,
}

impl Session {
    /// Connects and opens the stream.
    pub async fn open(ctx: &Ctx) -> Result<Session, CliError> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(ctx.url())
            .map_err(|e| CliError::Usage(format!("bad controller address {}: {e}", ctx.controller)))?;
        if let Some(ca) = &ctx.ca {
            let tls =
                tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
            endpoint = endpoint.tls_config(tls).map_err(|e| CliError::Usage(format!("TLS: {e}")))?;
        }
        let connect = endpoint.connect();
        let mut client = match tokio::time::timeout(ctx.timeout, connect).await {
            Ok(Ok(c)) => ControllerClient::new(c).max_decoding_message_size(64 << 20),
            Ok(Err(e)) => {
                let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
                return Err(CliError::Connect { addr: ctx.url(), reason: format!("{e}{cause}") });
            }
            Err(_) => return Err(CliError::Connect { addr: ctx.url(), reason: "timed out".into() }),
        };
        let (tx, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = &ctx.token {
            let value = tonic::metadata::MetadataValue::try_from(format!("Bearer {}", token.trim()))
                .map_err(|_| CliError::Usage("the token holds characters that cannot be sent".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let inbound = client
            .cli_command_stream(request)
            .await
            .map_err(|e| match e.code() {
                tonic::Code::Unauthenticated => CliError::Usage(e.message().to_owned()),
                _ => CliError::Connect { addr: ctx.url(), reason: e.message().to_owned() },
            })?
            .into_inner();
        Ok(Session { tx, inbound, cli_uuid: stream_id() })
    }

    /// Sends a command; returns its stream id.
    pub async fn send(&self, node_uuids: Vec<String>, payload: &Payload) -> Result<String, CliError> {
        let sid = stream_id();
        let msg = v1::StreamFromCli {
            stream_id: sid.clone(),
            cli_uuid: self.cli_uuid.clone(),
            node_uuids,
            command: Some(payload.to_any()),
            request_id: sid.clone(),
        };
        self.tx.send(msg).await.map_err(|_| CliError::Stream("stream closed".into()))?;
        Ok(sid)
    }

    /// The next message on the stream, decoded.
    pub async fn next(&mut self) -> Result<Option<(String, Reply)>, CliError> {
        match self.inbound.message().await {
            Ok(Some(m)) => {
                let any = m.response.ok_or_else(|| CliError::Decode("reply without a payload".into()))?;
                let payload = Payload::from_any(&any).map_err(|e| CliError::Decode(e.to_string()))?;
                Ok(Some((m.stream_id, Reply { node: m.node_uuid, payload })))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(CliError::Stream(e.message().to_owned())),
        }
    }

    /// Sends a command and collects its replies (see the module doc).
    pub async fn request(
        &mut self,
        ctx: &Ctx,
        node_uuids: Vec<String>,
        payload: Payload,
        progress: bool,
    ) -> Result<Outcome, CliError> {
        let sid = self.send(node_uuids, &payload).await?;
        let deadline = tokio::time::Instant::now() + ctx.timeout;
        let show = progress && std::io::stderr().is_terminal();
        let mut out = Outcome::default();
        loop {
            if out.expected.is_some_and(|e| out.replies.len() as u32 >= e) {
                break;
            }
            let next = match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(n) => n?,
                Err(_) => {
                    out.timed_out = true;
                    break;
                }
            };
            let Some((stream, reply)) = next else {
                return Err(CliError::Stream("controller closed the stream".into()));
            };
            if stream != sid {
                continue;
            }
            match reply.payload {
                Payload::CliResponseCountV1Notify(c) => {
                    out.expected = Some(c.expected);
                    out.missing = c.missing;
                }
                _ => out.replies.push(reply),
            }
            if show {
                let mut err = std::io::stderr();
                let _ = write!(
                    err,
                    "\rreplies: {}/{}",
                    out.replies.len(),
                    out.expected.map_or("?".into(), |e| e.to_string())
                );
                let _ = err.flush();
            }
        }
        if show {
            eprint!("\r\x1b[K");
        }
        Ok(out)
    }
}

/// Opens a session, sends one command, collects its replies.
pub async fn request(ctx: &Ctx, node_uuids: Vec<String>, payload: Payload) -> Result<Outcome, CliError> {
    Session::open(ctx).await?.request(ctx, node_uuids, payload, true).await
}
