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

/// Longest node id accepted.
const MAX_NODE_ID: usize = 128;

/// Messages queued on a CLI stream before it counts as not reading.
const CLI_QUEUE: usize = 65_536;

#[derive(Clone)]
pub(crate) struct Service {
    events: Inbox,
    sessions: Arc<AtomicU64>,
    queue: usize,
    key: drover_admission::ticket::TicketKey,
}

/// The bearer credential of a request, if it has one.
fn bearer<T>(request: &Request<T>) -> Option<String> {
    let v = request.metadata().get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|t| t.trim().to_owned())
}

impl Service {
    pub(crate) fn new(events: Inbox, queue: usize, key: drover_admission::ticket::TicketKey) -> Self {
        // Session ids only need to differ from those of earlier runs that the journal
        // remembers; starting from the clock does that.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Service { events, sessions: Arc::new(AtomicU64::new(start)), queue, key }
    }

    /// The session counter, shared with the dashboard's admin actions.
    pub(crate) fn sessions(&self) -> Arc<AtomicU64> {
        self.sessions.clone()
    }

    fn session(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed)
    }
}

#[tonic::async_trait]
impl v1::controller_server::Controller for Service {
    type NodeCommandStreamStream = ReceiverStream<Result<v1::StreamToNode, Status>>;
    type CliCommandStreamStream = ReceiverStream<Result<v1::StreamToCli, Status>>;

    async fn node_command_stream(
        &self,
        request: Request<Streaming<v1::StreamFromNode>>,
    ) -> Result<Response<Self::NodeCommandStreamStream>, Status> {
        let peer = request.remote_addr();
        // Only admitted nodes: a valid ticket, and later the matching node id.
        let ticket = bearer(&request).ok_or_else(|| {
            tracing::warn!(?peer, "node stream refused: no ticket");
            Status::unauthenticated(
                "a session ticket is required: pass admission first (authorization: Bearer <ticket>)",
            )
        })?;
        let ticket_node = self.key.verify(&ticket, now_ms()).map_err(|e| {
            tracing::warn!(?peer, error = %e, "node stream refused");
            Status::unauthenticated(format!("{e}: pass admission again"))
        })?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(self.queue);
        let events = self.events.clone();
        let session = self.session();
        tokio::spawn(async move {
            let mut sink = Some(tx);
            let mut node: Option<String> = None;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(session, error = %e, "node stream error");
                        break;
                    }
                };
                match &node {
                    None => {
                        if msg.node_uuid.is_empty() || msg.node_uuid.len() > MAX_NODE_ID {
                            tracing::warn!(?peer, "node stream refused: first message without a valid node_uuid");
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
                            tracing::warn!(?peer, node = %msg.node_uuid, ticket = %ticket_node, "node stream refused: ticket is for another node");
                            if let Some(tx) = sink.take() {
                                let _ = tx
                                    .send(Err(Status::permission_denied("the ticket was issued to another node")))
                                    .await;
                            }
                            return;
                        }
                        node = Some(msg.node_uuid.clone());
                        let Some(tx) = sink.take() else { return };
                        let opened = ShellEvent::NodeOpened { node: msg.node_uuid.clone(), session, sink: tx };
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
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cli_command_stream(
        &self,
        request: Request<Streaming<v1::StreamFromCli>>,
    ) -> Result<Response<Self::CliCommandStreamStream>, Status> {
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
        let admin = crate::owner::operator_role(&self.events, presented)
            .await
            .map_err(|_| Status::unavailable("controller is stopping"))?
            .map_err(Status::unauthenticated)?;
        let mut inbound = request.into_inner();
        // A fan-out to every node answers in bursts of up to one reply per node: a CLI
        // stream may hold that many (the queue's memory is only used when filled).
        let (tx, rx) = mpsc::channel(self.queue.max(CLI_QUEUE));
        let session = self.session();
        let events = self.events.clone();
        if events.send(ShellEvent::CliOpened { session, admin, sink: tx }).await.is_err() {
            return Err(Status::unavailable("controller is stopping"));
        }
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if events.send(ShellEvent::CliMessage { session, msg }).await.is_err() {
                    return;
                }
            }
            let _ = events.send(ShellEvent::CliClosed { session }).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
