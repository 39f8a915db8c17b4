//! Raft traffic between replicas over its own TCP port.
//!
//! Each replica listens on its Raft address (`--raft HOST:PORT`) and keeps one
//! connection to each peer, on which requests go one at a time: a frame is a u32 LE
//! length and that many bytes of postcard (the request, or the response), at most
//! [`MAX_FRAME`] bytes. Requests are openraft's three RPCs (append entries, vote,
//! install snapshot chunk); a response carries openraft's result, so a refusal by the
//! peer (a higher vote, say) travels as openraft's own error. A connection that fails
//! is dropped and made again on the next request; a peer that cannot be reached is
//! reported to openraft as unreachable, which backs off. Every connection begins with
//! the cluster-secret handshake ([`crate::secret`]): nothing is read as Raft from a
//! peer that has not proven it holds the secret.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::inbound::Inbound;
use crate::secret::SecretError;
use crate::stats::RaftStats;
use crate::status::{Addresses, MemberStatus};
use crate::tls::{Credentials, Io};
use crate::types::TypeConfig;

/// Largest frame accepted (a batch of entries, or one snapshot chunk).
pub const MAX_FRAME: usize = 64 << 20;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize)]
enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// drover's own: the member's view of itself ([`MemberStatus`]).
    Status,
    /// drover's own: campaign now (a leader handing over; see
    /// [`crate::member::Leadership::transfer`]). The campaign is openraft's own.
    Elect,
    /// drover's own: a request for the application on this member (the leader), in
    /// bytes the application defines: a follower passing on what only the leader may
    /// decide (an admission, say). Answered by the member's [`ForwardHandler`].
    Forward(Vec<u8>),
}

#[derive(Serialize, Deserialize)]
enum Response {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Status(MemberStatus),
    /// The campaign was started (`Err`: why not).
    Elect(Result<(), String>),
    /// The application's answer (`Err`: this member takes no forwarded requests).
    Forward(Result<Vec<u8>, String>),
}

/// What a forwarded request's handler returns.
pub type ForwardFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>;

/// The application's handler of requests forwarded to this member by its peers
/// ([`Forwarder`]): bytes in, bytes (or a refusal) out. The peers are the group's
/// members, authenticated by the cluster secret; the handler still treats the bytes as
/// untrusted input (decodes them with limits, never panics).
pub type ForwardHandler = Arc<dyn Fn(Vec<u8>) -> ForwardFuture + Send + Sync>;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The peer announced a frame over the limit.
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// The bytes are not a message of this protocol.
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    /// The peer answered a different request.
    #[error("the peer answered another kind of request")]
    Mismatch,
    /// The cluster-secret handshake failed.
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// How long the cluster-secret handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

async fn write_frame<T: Serialize>(s: &mut (impl AsyncWrite + Unpin + ?Sized), value: &T) -> Result<(), FrameError> {
    let bytes = postcard::to_stdvec(value)?;
    if bytes.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    let mut out = Vec::with_capacity(4 + bytes.len());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&bytes);
    s.write_all(&out).await?;
    Ok(())
}

async fn read_frame<T: for<'de> Deserialize<'de>>(s: &mut (impl AsyncRead + Unpin + ?Sized)) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(postcard::from_bytes(&buf)?)
}

/// Decodes a request frame's body as the Raft port does (for fuzzing and tools).
pub fn decode_request(body: &[u8]) -> Result<(), FrameError> {
    postcard::from_bytes::<Request>(body).map(drop).map_err(FrameError::from)
}

/// Decodes a response frame's body as a peer does (for fuzzing and tools).
pub fn decode_response(body: &[u8]) -> Result<(), FrameError> {
    postcard::from_bytes::<Response>(body).map(drop).map_err(FrameError::from)
}

/// Serves the Raft port: every connection that completes TLS (when `creds` has it) and
/// proves it holds the cluster secret has its requests go to `inbound`, in order; a
/// status request is answered with this member's view of itself, `about` naming its
/// addresses.
pub async fn serve(
    listener: TcpListener,
    inbound: Inbound,
    creds: Credentials,
    about: Addresses,
    forward: Option<ForwardHandler>,
) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "raft port accept failed; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (inbound, creds, about, forward) = (inbound.clone(), creds.clone(), about.clone(), forward.clone());
        tokio::spawn(async move {
            let handshakes = async {
                let mut stream: Box<dyn Io> = match &creds.tls {
                    Some(tls) => tls.accept(stream).await.map_err(|e| format!("no mutual TLS: {e}"))?,
                    None => Box::new(stream),
                };
                creds
                    .secret
                    .prove_as_listener(&mut *stream)
                    .await
                    .map_err(|e| format!("it did not prove the cluster secret: {e}"))?;
                Ok::<_, String>(stream)
            };
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes).await {
                Ok(Ok(s)) => s,
                Ok(Err(why)) => {
                    tracing::warn!(%from, "raft connection refused: {why}");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%from, "raft connection refused: no handshake within 5 s");
                    return;
                }
            };
            if let Err(e) = serve_connection(stream, inbound, about, forward).await {
                tracing::debug!(%from, error = %e, "raft connection ended");
            }
        });
    }
}

async fn serve_connection(
    mut stream: Box<dyn Io>,
    inbound: Inbound,
    about: Addresses,
    forward: Option<ForwardHandler>,
) -> Result<(), FrameError> {
    loop {
        let response = match read_frame::<Request>(&mut stream).await {
            Ok(Request::Status) => Response::Status(MemberStatus::of(inbound.raft(), &about)),
            Ok(Request::Append(r)) => Response::Append(inbound.append_entries(r).await),
            Ok(Request::Vote(r)) => Response::Vote(inbound.vote(r).await),
            Ok(Request::Snapshot(r)) => Response::Snapshot(inbound.install_snapshot(r).await),
            Ok(Request::Elect) => {
                tracing::info!("campaigning now: the leader hands leadership to this member");
                Response::Elect(inbound.raft().trigger().elect().await.map_err(|e| e.to_string()))
            }
            Ok(Request::Forward(body)) => Response::Forward(match &forward {
                Some(handle) => handle(body).await,
                None => Err("this member takes no forwarded requests".to_owned()),
            }),
            Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "bad request on the raft port; closing the connection");
                return Err(e);
            }
        };
        write_frame(&mut stream, &response).await?;
    }
}

/// Asks the member at `addr` for its view of itself (a connection of its own, closed
/// after the answer), within `ttl`.
pub async fn ask_status(addr: &str, creds: &Credentials, ttl: Duration) -> Result<MemberStatus, FrameError> {
    let mut peer = Peer::once(addr, creds);
    match peer.call(&Request::Status, ttl).await {
        Ok(Response::Status(s)) => Ok(s),
        Ok(_) => Err(FrameError::Mismatch),
        Err(CallError::Unreachable(e)) => Err(FrameError::Io(e)),
        Err(CallError::Network(e)) => Err(e),
    }
}

/// Asks the member at `addr` to campaign at once (a connection of its own), within `ttl`.
pub async fn ask_to_elect(addr: &str, creds: &Credentials, ttl: Duration) -> Result<(), FrameError> {
    let mut peer = Peer::once(addr, creds);
    match peer.call(&Request::Elect, ttl).await {
        Ok(Response::Elect(Ok(()))) => Ok(()),
        Ok(Response::Elect(Err(e))) => Err(FrameError::Io(io::Error::other(e))),
        Ok(_) => Err(FrameError::Mismatch),
        Err(CallError::Unreachable(e)) => Err(FrameError::Io(e)),
        Err(CallError::Network(e)) => Err(e),
    }
}

/// Passes requests to another member's [`ForwardHandler`] (a follower to its leader),
/// over the Raft port's authenticated connections. Idle connections are kept (up to
/// [`FORWARD_IDLE`] per member) and several calls run at once, each on a connection of
/// its own, so a burst of forwarded requests (a fleet re-admitting after a leader
/// change) is not serialised behind one round trip.
#[derive(Clone)]
pub struct Forwarder {
    creds: Credentials,
    idle: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<Peer>>>>,
}

/// Idle forwarding connections kept per member.
pub const FORWARD_IDLE: usize = 32;

/// Why a forwarded request got no answer from the application.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The member could not be reached or the exchange failed.
    #[error("forwarding to {addr}: {error}")]
    Network {
        /// The member's Raft address.
        addr: String,
        /// What failed.
        error: FrameError,
    },
    /// The member answered but takes no forwarded requests.
    #[error("{0}")]
    Refused(String),
}

impl Forwarder {
    /// Forwards with `creds` (the cluster secret, and TLS when it is on).
    pub fn new(creds: Credentials) -> Forwarder {
        Forwarder { creds, idle: Arc::default() }
    }

    /// Sends `body` to the member at `addr` (its Raft address) and returns the
    /// application's answer, within `ttl`.
    pub async fn call(&self, addr: &str, body: Vec<u8>, ttl: Duration) -> Result<Vec<u8>, ForwardError> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.get_mut(addr).and_then(Vec::pop));
        let mut peer = pooled.unwrap_or_else(|| Peer::once(addr, &self.creds));
        let net = |error| ForwardError::Network { addr: addr.to_owned(), error };
        let answer = match peer.call(&Request::Forward(body), ttl).await {
            Ok(Response::Forward(answer)) => answer,
            Ok(_) => return Err(net(FrameError::Mismatch)),
            Err(CallError::Unreachable(e)) => return Err(net(FrameError::Io(e))),
            Err(CallError::Network(e)) => return Err(net(e)),
        };
        if peer.conn.is_some()
            && let Ok(mut idle) = self.idle.lock()
        {
            let kept = idle.entry(addr.to_owned()).or_default();
            if kept.len() < FORWARD_IDLE {
                kept.push(peer);
            }
        }
        answer.map_err(ForwardError::Refused)
    }
}

/// Makes a [`Peer`] for each replica openraft talks to.
#[derive(Clone, Debug)]
pub struct Network {
    creds: Credentials,
    stats: Arc<RaftStats>,
}

impl Network {
    /// Peers reached with `creds`; snapshots sent are counted in `stats`.
    pub fn new(creds: Credentials, stats: Arc<RaftStats>) -> Network {
        Network { creds, stats }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        Peer { target, addr: node.addr.clone(), conn: None, creds: self.creds.clone(), stats: self.stats.clone() }
    }
}

/// One peer: its address and the connection to it.
pub struct Peer {
    target: u64,
    addr: String,
    conn: Option<Box<dyn Io>>,
    creds: Credentials,
    stats: Arc<RaftStats>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

impl Peer {
    /// A peer for one drover request of its own (not openraft's).
    fn once(addr: &str, creds: &Credentials) -> Peer {
        Peer { target: 0, addr: addr.to_owned(), conn: None, creds: creds.clone(), stats: Arc::default() }
    }

    /// Sends `req` and waits for the answer within `ttl`.
    async fn call(&mut self, req: &Request, ttl: Duration) -> Result<Response, CallError> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let c = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
                    .await
                    .map_err(|_| CallError::Unreachable(io::Error::from(io::ErrorKind::TimedOut)))?
                    .map_err(CallError::Unreachable)?;
                let _ = c.set_nodelay(true);
                let handshakes = async {
                    let mut c: Box<dyn Io> = match &self.creds.tls {
                        Some(tls) => tls.connect(&self.addr, c).await.map_err(FrameError::Io)?,
                        None => Box::new(c),
                    };
                    self.creds.secret.prove_as_connector(&mut *c).await.map_err(FrameError::Secret)?;
                    Ok::<_, FrameError>(c)
                };
                tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes)
                    .await
                    .map_err(|_| CallError::Network(FrameError::Io(io::Error::from(io::ErrorKind::TimedOut))))?
                    .map_err(CallError::Network)?
            }
        };
        let mut conn = conn;
        let exchange = async {
            write_frame(&mut conn, req).await?;
            read_frame::<Response>(&mut conn).await
        };
        let response = tokio::time::timeout(ttl, exchange)
            .await
            .map_err(|_| CallError::Network(FrameError::Io(io::Error::from(io::ErrorKind::TimedOut))))?
            .map_err(CallError::Network)?;
        self.conn = Some(conn);
        Ok(response)
    }
}

enum CallError {
    Unreachable(io::Error),
    Network(FrameError),
}

impl CallError {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        match self {
            CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Network(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        match self.call(&Request::Append(rpc), option.hard_ttl()).await.map_err(CallError::into_rpc)? {
            Response::Append(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(RPCError::Network(NetworkError::new(&FrameError::Mismatch))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        // Counted once per snapshot, at its first chunk.
        if rpc.offset == 0 {
            RaftStats::bump(&self.stats.snapshots_sent);
        }
        match self.call(&Request::Snapshot(rpc), option.hard_ttl()).await.map_err(CallError::into_rpc)? {
            Response::Snapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(RPCError::Network(NetworkError::new(&FrameError::Mismatch))),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> Result<VoteResponse<u64>, RpcErr> {
        match self.call(&Request::Vote(rpc), option.hard_ttl()).await.map_err(CallError::into_rpc)? {
            Response::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(RPCError::Network(NetworkError::new(&FrameError::Mismatch))),
        }
    }
}
