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
    /// Something answered at the address, but not a controller's gRPC port.
    #[error(
        "{addr} is {kind}, not the controller's gRPC port: CLI commands want the gRPC port (the controller's --listen, default 127.0.0.1:7400; set --controller or DROVER_CONTROLLER)"
    )]
    WrongPort {
        /// The address tried.
        addr: String,
        /// What answered there.
        kind: &'static str,
    },
    /// Nothing answered in time.
    #[error(
        "no answer from the controller at {addr} within {waited:?} (connecting and opening the stream): is it running, stopped or overloaded? is this its gRPC port?"
    )]
    NoAnswer {
        /// The address tried.
        addr: String,
        /// The whole time waited.
        waited: Duration,
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
    /// A cluster member that does not lead answered (and no leader it named did).
    #[error("the controller at {addr} does not lead: {why}")]
    NotLeader {
        /// The address tried.
        addr: String,
        /// Its reason, naming the leader when it knows one.
        why: String,
        /// The leader's gRPC address, when the member knew it.
        leader: Option<String>,
    },
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
    /// gRPC endpoint (`http://host:port`; a bare `host:port` is accepted), or a
    /// cluster's members as a comma-separated list of them.
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
    /// The (first) endpoint as a URL.
    pub fn url(&self) -> String {
        self.url_of(self.addresses().first().map_or("", String::as_str))
    }

    /// `addr` as a URL with this context's scheme.
    pub fn url_of(&self, addr: &str) -> String {
        let host = addr.trim_start_matches("http://").trim_start_matches("https://");
        format!("{}://{host}", if self.ca.is_some() { "https" } else { "http" })
    }

    /// The addresses in `controller`, in order.
    pub fn addresses(&self) -> Vec<String> {
        self.controller.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect()
    }
}

/// Most redirects followed while opening one stream.
const MAX_REDIRECTS: usize = 5;

/// With several addresses, how long one may take to answer before the next is tried.
const PER_ADDRESS: Duration = Duration::from_secs(2);

/// Pause before trying the list again when no member leads (an election).
const NO_LEADER_RETRY: Duration = Duration::from_millis(200);

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
    /// Connects and opens the stream, within `ctx.timeout`.
    pub async fn open(ctx: &Ctx) -> Result<Session, CliError> {
        Session::open_until(ctx, tokio::time::Instant::now() + ctx.timeout).await
    }

    /// Connects and opens the stream before `deadline`: connecting, the HTTP/2 and TLS
    /// handshakes and the stream's first response headers all count, so a controller
    /// that accepts connections but never answers (stopped, overloaded, or not a
    /// controller) cannot hold the CLI.
    ///
    /// With a cluster, the addresses are tried in order: a member that does not lead
    /// names the leader and the stream is opened there instead; an unreachable member
    /// is passed over; while no member leads (an election) the list is tried again
    /// until the deadline.
    pub async fn open_until(ctx: &Ctx, deadline: tokio::time::Instant) -> Result<Session, CliError> {
        let addrs = ctx.addresses();
        if addrs.is_empty() {
            return Err(CliError::Usage("no controller address given (--controller or DROVER_CONTROLLER)".into()));
        }
        let mut redirects = 0;
        loop {
            let mut queue: std::collections::VecDeque<String> = addrs.iter().cloned().collect();
            let mut last = None;
            while let Some(addr) = queue.pop_front() {
                let now = tokio::time::Instant::now();
                let until = if addrs.len() > 1 { deadline.min(now + PER_ADDRESS) } else { deadline };
                let e = match tokio::time::timeout_at(until, Session::open_inner(ctx, &addr)).await {
                    Ok(Ok(s)) => return Ok(s),
                    Ok(Err(CliError::NotLeader { leader: Some(l), .. }))
                        if redirects < MAX_REDIRECTS && ctx.url_of(&l) != ctx.url_of(&addr) =>
                    {
                        redirects += 1;
                        queue.push_front(l);
                        continue;
                    }
                    Ok(Err(e @ (CliError::Connect { .. } | CliError::NotLeader { .. }))) => e,
                    Ok(Err(e)) => return Err(e),
                    Err(_) => CliError::NoAnswer { addr: ctx.url_of(&addr), waited: until - now },
                };
                last = Some((addr, e));
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            let Some((addr, e)) = last else { unreachable!("the list is not empty") };
            let retry = addrs.len() > 1 && matches!(e, CliError::Connect { .. } | CliError::NoAnswer { .. })
                || matches!(e, CliError::NotLeader { .. });
            if !retry || tokio::time::Instant::now() + NO_LEADER_RETRY >= deadline {
                return Err(explain(&addr, e).await);
            }
            tokio::time::sleep(NO_LEADER_RETRY).await;
        }
    }

    async fn open_inner(ctx: &Ctx, addr: &str) -> Result<Session, CliError> {
        let url = ctx.url_of(addr);
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| CliError::Usage(format!("bad controller address {addr}: {e}")))?;
        if let Some(ca) = &ctx.ca {
            let tls =
                tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
            endpoint = endpoint.tls_config(tls).map_err(|e| CliError::Usage(format!("TLS: {e}")))?;
        }
        let mut client = match endpoint.connect().await {
            Ok(c) => ControllerClient::new(c).max_decoding_message_size(64 << 20),
            Err(e) => {
                let mut reason = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    let c_text = c.to_string();
                    if !reason.ends_with(&c_text) {
                        reason = format!("{reason}: {c_text}");
                    }
                    cause = c.source();
                }
                return Err(CliError::Connect { addr: url, reason });
            }
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
                tonic::Code::Unavailable if e.message().contains("does not lead") => CliError::NotLeader {
                    addr: url.clone(),
                    why: e.message().to_owned(),
                    leader: e
                        .metadata()
                        .get(drover_proto::LEADER_METADATA)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                },
                _ => CliError::Connect { addr: url.clone(), reason: e.message().to_owned() },
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

    /// Sends a command and collects its replies for up to `ctx.timeout` (see the
    /// module doc).
    pub async fn request(
        &mut self,
        ctx: &Ctx,
        node_uuids: Vec<String>,
        payload: Payload,
        progress: bool,
    ) -> Result<Outcome, CliError> {
        self.request_until(tokio::time::Instant::now() + ctx.timeout, node_uuids, payload, progress).await
    }

    /// Sends a command and collects its replies until `deadline`.
    pub async fn request_until(
        &mut self,
        deadline: tokio::time::Instant,
        node_uuids: Vec<String>,
        payload: Payload,
        progress: bool,
    ) -> Result<Outcome, CliError> {
        let sid = match tokio::time::timeout_at(deadline, self.send(node_uuids, &payload)).await {
            Ok(sid) => sid?,
            Err(_) => return Ok(Outcome { timed_out: true, ..Outcome::default() }),
        };
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

/// Opens a session, sends one command, collects its replies: all of it within one
/// `ctx.timeout`, connecting included.
pub async fn request(ctx: &Ctx, node_uuids: Vec<String>, payload: Payload) -> Result<Outcome, CliError> {
    let deadline = tokio::time::Instant::now() + ctx.timeout;
    let mut session = Session::open_until(ctx, deadline).await?;
    match session.request_until(deadline, node_uuids, payload, true).await {
        Err(e @ CliError::Stream(_)) if ctx.addresses().len() == 1 => Err(explain(&ctx.controller, e).await),
        other => other,
    }
}

/// A connect or stream failure before any reply usually means the address is some
/// other server: says which, when the probe can tell.
async fn explain(addr: &str, e: CliError) -> CliError {
    if !matches!(e, CliError::Connect { .. } | CliError::Stream(_)) {
        return e;
    }
    match probe(addr).await {
        Some(kind) => CliError::WrongPort { addr: addr.to_owned(), kind },
        None => e,
    }
}

/// How long the wrong-port probe waits for the peer's first bytes.
const PROBE_WAIT: Duration = Duration::from_millis(1_000);

/// After a failed request, finds out what is listening at `addr` when it is not a gRPC
/// server, with one HTTP/1 request: drover's admission port answers it with
/// `conn:close`, an HTTP/1 server with `HTTP/1.x`, and a gRPC (HTTP/2-only) server
/// closes the connection, which says nothing and leaves the original error standing.
async fn probe(addr: &str) -> Option<&'static str> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = addr.trim_start_matches("http://").trim_start_matches("https://");
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(host).await.ok()?;
        tcp.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.ok()?;
        let mut buf = vec![0u8; 512];
        let mut got = 0;
        while got < buf.len() {
            match tcp.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            if buf[..got].windows(5).any(|w| w == b"<EOF>") || buf[..got].starts_with(b"HTTP/") {
                break;
            }
        }
        let first = &buf[..got];
        if first.starts_with(b"conn:") {
            Some("drover's admission port (nodes connect there)")
        } else if first.starts_with(b"HTTP/") {
            Some("an HTTP/1 server (the controller's HTTP port?)")
        } else {
            None
        }
    };
    tokio::time::timeout(PROBE_WAIT, attempt).await.ok().flatten()
}
