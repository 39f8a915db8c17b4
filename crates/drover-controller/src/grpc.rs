//! The tonic service: one task per stream turns messages into `ShellEvent`s for the
//! owner. Handlers hold no state beyond the owner's channel and a session counter.

use crate::now_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use drover_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::owner::{Inbox, ShellEvent};
use crate::ratelog::LogLimiter;

use drover_proto::MAX_NODE_ID;

/// Messages queued on a CLI stream before it counts as not reading.
const CLI_QUEUE: usize = 65_536;

#[derive(Clone)]
pub(crate) struct Service {
    events: Inbox,
    sessions: Arc<AtomicU64>,
    queue: usize,
    key: drover_admission::ticket::TicketKey,
    /// Peer-caused lines are written at most once per interval per peer and kind.
    logs: Arc<LogLimiter>,
    /// The largest message accepted, for the refusal of a larger one.
    max_message_bytes: usize,
}

/// The status a stream's read error ends it with: a message over the size limit gets
/// `RESOURCE_EXHAUSTED` naming the limit (tonic reports it as `OUT_OF_RANGE`); other
/// errors (the peer reset or broke the stream) need no answer.
fn read_error(e: &Status, max_message_bytes: usize) -> Option<Status> {
    (e.code() == tonic::Code::OutOfRange && e.message().contains("too large")).then(|| {
        Status::resource_exhausted(format!(
            "message over the controller's limit of {max_message_bytes} bytes (--max-message-bytes): {}",
            e.message()
        ))
    })
}

/// A response stream that marks its connection busy until tonic drops it (the RPC
/// ended either way): a client that half-closes its side while it still reads (a
/// quiet watch) keeps its connection.
pub(crate) struct Held<S> {
    inner: S,
    _open: Option<crate::conns::StreamGuard>,
}

impl<S: tokio_stream::Stream + Unpin> tokio_stream::Stream for Held<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The connection a request arrived on (peer and activity), over TCP or TLS.
fn conn_info<T>(request: &Request<T>) -> Option<crate::conns::ConnInfo> {
    let ext = request.extensions();
    ext.get::<crate::conns::ConnInfo>().cloned().or_else(|| {
        ext.get::<tonic::transport::server::TlsConnectInfo<crate::conns::ConnInfo>>().map(|t| t.get_ref().clone())
    })
}

/// The bearer credential of a request, if it has one.
fn bearer<T>(request: &Request<T>) -> Option<String> {
    let v = request.metadata().get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|t| t.trim().to_owned())
}

impl Service {
    pub(crate) fn new(
        events: Inbox,
        queue: usize,
        key: drover_admission::ticket::TicketKey,
        logs: Arc<LogLimiter>,
        max_message_bytes: usize,
    ) -> Self {
        // Session ids only need to differ from those of earlier runs that the journal
        // remembers; starting from the clock does that.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Service { events, sessions: Arc::new(AtomicU64::new(start)), queue, key, logs, max_message_bytes }
    }

    /// The session counter, shared with the dashboard's admin actions.
    pub(crate) fn sessions(&self) -> Arc<AtomicU64> {
        self.sessions.clone()
    }

    fn session(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed)
    }

    /// A refused node stream: one WARN line per peer per interval, with the count.
    fn refused(&self, peer: Option<std::net::SocketAddr>, why: &str) {
        if let Some(count) = self.logs.admit("node stream refused", peer.map(|p| p.ip()), now_ms()) {
            tracing::warn!(
                ?peer,
                count,
                reason = why,
                "node stream refused (count: since the last such line from this address)"
            );
        }
    }
}

/// Ends a stream whose read failed because a message was over the size limit: the
/// peer gets `RESOURCE_EXHAUSTED` (see [`read_error`]) on `tx`, if the stream still
/// exists, and one WARN line per peer per interval is written. Returns whether it was
/// such an error (other read errors need no answer).
fn refuse_oversized<T>(
    e: &Status,
    max_message_bytes: usize,
    logs: &LogLimiter,
    peer: Option<std::net::SocketAddr>,
    tx: &mpsc::WeakSender<Result<T, Status>>,
) -> bool {
    let Some(status) = read_error(e, max_message_bytes) else { return false };
    if let Some(count) = logs.admit("message too large", peer.map(|p| p.ip()), now_ms()) {
        tracing::warn!(?peer, count, error = %status.message(), "message refused: over the gRPC size limit");
    }
    if let Some(tx) = tx.upgrade() {
        let _ = tx.try_send(Err(status));
    }
    true
}

#[tonic::async_trait]
impl v1::controller_server::Controller for Service {
    type NodeCommandStreamStream = Held<ReceiverStream<Result<v1::StreamToNode, Status>>>;
    type CliCommandStreamStream = Held<ReceiverStream<Result<v1::StreamToCli, Status>>>;

    async fn node_command_stream(
        &self,
        request: Request<Streaming<v1::StreamFromNode>>,
    ) -> Result<Response<Self::NodeCommandStreamStream>, Status> {
        let conn = conn_info(&request);
        let peer = conn.as_ref().map(|c| c.peer);
        // Only admitted nodes: a valid ticket, and later the matching node id.
        let ticket = bearer(&request).ok_or_else(|| {
            self.refused(peer, "no ticket");
            Status::unauthenticated(
                "a session ticket is required: pass admission first (authorization: Bearer <ticket>)",
            )
        })?;
        let claims = self.key.verify(&ticket, now_ms()).map_err(|e| {
            self.refused(peer, &e.to_string());
            Status::unauthenticated(format!("{e}: pass admission again"))
        })?;
        let ticket_node = claims.node;
        let generation = claims.generation;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(self.queue);
        let events = self.events.clone();
        let session = self.session();
        let this = self.clone();
        // The connection counts as busy (not idle) while this stream's answers flow.
        let open = conn.map(|c| c.activity.stream());
        tokio::spawn(async move {
            // Kept to end the stream with a status of our own (a refused message) after
            // the owner holds the sink.
            let status_tx = tx.downgrade();
            let mut sink = Some(tx);
            let mut node: Option<String> = None;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        if !refuse_oversized(&e, this.max_message_bytes, &this.logs, peer, &status_tx) {
                            tracing::debug!(session, error = %e, "node stream error");
                        }
                        break;
                    }
                };
                match &node {
                    None => {
                        if msg.node_uuid.is_empty() || msg.node_uuid.len() > MAX_NODE_ID {
                            this.refused(peer, "first message without a valid node_uuid");
                            if let Some(tx) = sink.take() {
                                let _ = tx
                                    .send(Err(Status::invalid_argument(format!(
                                        "node_uuid must be 1..={MAX_NODE_ID} bytes"
                                    ))))
                                    .await;
                            }
                            return;
                        }
                        if msg.node_uuid != ticket_node {
                            this.refused(peer, "the ticket is for another node");
                            if let Some(tx) = sink.take() {
                                let _ = tx
                                    .send(Err(Status::permission_denied("the ticket was issued to another node")))
                                    .await;
                            }
                            return;
                        }
                        node = Some(msg.node_uuid.clone());
                        let Some(tx) = sink.take() else { return };
                        let opened =
                            ShellEvent::NodeOpened { node: msg.node_uuid.clone(), session, generation, sink: tx };
                        if events.send(opened).await.is_err() {
                            return;
                        }
                    }
                    Some(id) if *id != msg.node_uuid => {
                        tracing::warn!(session, node = %id, claimed = %msg.node_uuid, "node changed its uuid mid-stream; closing");
                        break;
                    }
                    Some(_) => {}
                }
                let node_id = msg.node_uuid.clone();
                if events.send(ShellEvent::NodeMessage { node: node_id, session, msg }).await.is_err() {
                    return;
                }
            }
            if let Some(node) = node {
                let _ = events.send(ShellEvent::NodeClosed { node, session }).await;
            }
        });
        Ok(Response::new(Held { inner: ReceiverStream::new(rx), _open: open }))
    }

    async fn cli_command_stream(
        &self,
        request: Request<Streaming<v1::StreamFromCli>>,
    ) -> Result<Response<Self::CliCommandStreamStream>, Status> {
        let conn = conn_info(&request);
        let request_peer = conn.as_ref().map(|c| c.peer);
        let token = bearer(&request).ok_or_else(|| {
            Status::unauthenticated(
                "an operator token is required: pass --token or set DROVER_TOKEN (see admin.token in the data directory)",
            )
        })?;
        let presented = drover_admission::token::parse(&token).map_err(|_| {
            Status::unauthenticated(
                "the token passed is not a drover token (dt1.<id>.<secret>): check --token or DROVER_TOKEN",
            )
        })?;
        let ip = request_peer.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let role = crate::owner::operator_role(&self.events, presented, ip)
            .await
            .map_err(|_| Status::unavailable("controller is stopping"))?
            .map_err(|refusal| match refusal {
                crate::owner::CliRefusal::Token(reason) => {
                    if let Some(count) = self.logs.admit("operator token refused", Some(ip), now_ms()) {
                        tracing::warn!(peer = %ip, count, %reason, "CLI stream refused: bad operator token (count: since the last such line from this address)");
                    }
                    Status::unauthenticated(reason)
                }
                crate::owner::CliRefusal::NotLeader { why, leader_grpc } => not_leader(why, leader_grpc),
            })?;
        let mut inbound = request.into_inner();
        // A fan-out to every node answers in bursts of up to one reply per node: a CLI
        // stream may hold that many (the queue's memory is only used when filled).
        let (tx, rx) = mpsc::channel(self.queue.max(CLI_QUEUE));
        let status_tx = tx.downgrade();
        let session = self.session();
        let events = self.events.clone();
        if events.send(ShellEvent::CliOpened { session, role, sink: tx }).await.is_err() {
            return Err(Status::unavailable("controller is stopping"));
        }
        let (logs, max) = (self.logs.clone(), self.max_message_bytes);
        let peer = request_peer;
        let open = conn.map(|c| c.activity.stream());
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        if events.send(ShellEvent::CliMessage { session, msg }).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        refuse_oversized(&e, max, &logs, peer, &status_tx);
                        break;
                    }
                }
            }
            let _ = events.send(ShellEvent::CliClosed { session }).await;
        });
        Ok(Response::new(Held { inner: ReceiverStream::new(rx), _open: open }))
    }
}

/// A follower's answer to a CLI stream: `UNAVAILABLE`, the reason, and the leader's
/// gRPC address in [`drover_proto::LEADER_METADATA`] when it is known (the CLI reconnects there).
fn not_leader(why: String, leader_grpc: Option<String>) -> Status {
    let mut md = tonic::metadata::MetadataMap::new();
    if let Some(addr) = leader_grpc.and_then(|a| tonic::metadata::MetadataValue::try_from(a).ok()) {
        md.insert(drover_proto::LEADER_METADATA, addr);
    }
    Status::with_metadata(tonic::Code::Unavailable, why, md)
}
