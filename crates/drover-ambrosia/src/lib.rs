//! A client for AMBROSIA-compatible coordinators (`drover coordinator`, or AMBROSIA's
//! own): implement [`Service`], call [`run`], and every call your service receives has
//! been logged before it sees it; after a crash it is rebuilt from its last checkpoint
//! plus a replay of the calls after it.
//!
//! The rules a service must keep are AMBROSIA's: handle calls deterministically (the
//! same calls in the same order give the same state and the same outgoing calls), make
//! outgoing calls only while handling a call (use [`Outbox::impulse`] for calls that
//! come from outside, such as user input: impulses are logged but not replayed), and
//! put everything into the checkpoint.
//!
//! ```no_run
//! use drover_ambrosia::{Connection, Outbox, Service};
//!
//! struct Counter(u64);
//! impl Service for Counter {
//!     fn on_call(&mut self, method: i32, args: &[u8], out: &mut Outbox) {
//!         if method == 1 { self.0 += 1; }
//!     }
//!     fn checkpoint(&self) -> Vec<u8> { self.0.to_le_bytes().to_vec() }
//!     fn restore(&mut self, bytes: &[u8]) { self.0 = u64::from_le_bytes(bytes.try_into().unwrap_or_default()); }
//! }
//! # async fn go() -> Result<(), drover_ambrosia::ClientError> {
//! drover_ambrosia::run(&mut Counter(0), Connection::listening_coordinator(1000, 1001), 0, b"").await
//! # }
//! ```

pub mod examples;

use bytes::Bytes;
use drover_wire::ambrosia::{
    Limits, Message, RecordEvent, RecordReader, Rpc, RpcBody, RpcKind, RpcType, SEQ_CHECKPOINT, SEQ_CONTROL,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};

/// A service run by a coordinator.
pub trait Service {
    /// A logged call (also the initial message at first start, with the method id given
    /// to [`run`]). Outgoing calls go into `out`; they are sent when this returns.
    fn on_call(&mut self, method: i32, args: &[u8], out: &mut Outbox);
    /// The whole state.
    fn checkpoint(&self) -> Vec<u8>;
    /// Replaces the state with a checkpoint.
    fn restore(&mut self, bytes: &[u8]);
    /// The service moves to a new version: convert the state. Called once, after the
    /// replay and before the upgrade checkpoint when the coordinator upgrades the
    /// instance; in an upgrade what-if run (`drover coordinator debug --test-upgrade`),
    /// after the checkpoint is restored and before the first replayed record.
    fn upgrade(&mut self) {}
}

/// Outgoing calls made while handling a call.
#[derive(Debug, Default)]
pub struct Outbox {
    messages: Vec<u8>,
    count: usize,
}

impl Outbox {
    fn push(&mut self, destination: &str, method: i32, rpc_type: RpcType, args: &[u8]) {
        let body = RpcBody::new(RpcKind::Call, method, rpc_type, args);
        Message::Rpc(Rpc::outgoing(destination, body)).encode(&mut self.messages);
        self.count += 1;
    }

    /// A fire-and-forget call to this service itself.
    pub fn call_self(&mut self, method: i32, args: &[u8]) {
        self.push("", method, RpcType::FireAndForget, args);
    }

    /// A fire-and-forget call to another instance.
    pub fn call(&mut self, destination: &str, method: i32, args: &[u8]) {
        self.push(destination, method, RpcType::FireAndForget, args);
    }

    /// An impulse to this service: logged but not replayed, for input from outside.
    pub fn impulse(&mut self, method: i32, args: &[u8]) {
        self.push("", method, RpcType::Impulse, args);
    }

    /// Calls waiting to be sent.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no call is waiting.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// How the service reaches its coordinator (both generations of AMBROSIA).
#[derive(Clone, Copy, Debug)]
pub enum Connection {
    /// The coordinator listens on both ports (current AMBROSIA, `drover coordinator`):
    /// connect to the receive port, then to the send port.
    ListeningCoordinator {
        /// The coordinator's receive port (service → coordinator).
        receive_port: u16,
        /// The coordinator's send port (coordinator → service).
        send_port: u16,
    },
    /// The coordinator connects to us (older AMBROSIA, `--connect-send`): connect to
    /// its receive port, listen on the send port.
    ConnectingCoordinator {
        /// The coordinator's receive port.
        receive_port: u16,
        /// The port we listen on for the coordinator.
        send_port: u16,
    },
}

impl Connection {
    /// The current generation.
    pub fn listening_coordinator(receive_port: u16, send_port: u16) -> Self {
        Connection::ListeningCoordinator { receive_port, send_port }
    }
}

/// Why [`run`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A connection failed or ended.
    #[error("connection to the coordinator: {0}")]
    Io(#[from] std::io::Error),
    /// The coordinator sent bytes that are not AMBROSIA records.
    #[error("the coordinator sent bad bytes: {0}")]
    Wire(#[from] drover_wire::ambrosia::WireError),
    /// The coordinator broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

async fn connect(c: Connection) -> Result<(TcpStream, TcpStream), ClientError> {
    let retry = |port: u16| async move {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => return Ok(s),
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    };
    Ok(match c {
        Connection::ListeningCoordinator { receive_port, send_port } => {
            let to = retry(receive_port).await?;
            let from = retry(send_port).await?;
            (to, from)
        }
        Connection::ConnectingCoordinator { receive_port, send_port } => {
            let listener = TcpListener::bind(("127.0.0.1", send_port)).await?;
            let to = retry(receive_port).await?;
            let (from, _) = listener.accept().await?;
            (to, from)
        }
    })
}

fn checkpoint_message(state: &[u8], out: &mut Vec<u8>) {
    Message::Checkpoint { len: state.len() as u64, fixed_length: false }.encode(out);
    out.extend_from_slice(state);
}

/// Runs `service` with its coordinator until the connection ends. At first start the
/// coordinator logs `initial_args` as a call to `initial_method` and delivers it first.
///
/// A live session only ends with an `Err` (the coordinator went away; start again to
/// recover). `Ok(())` means a debug run is over (`drover coordinator debug`, seed 4's
/// repro and upgrade what-if flows): the coordinator sent a checkpoint and the logged
/// records, never asked the service to go live, and closed the connection; the
/// service's state is the replayed one. (A coordinator that dies in the middle of a
/// recovery looks the same from here; the next start recovers in full.)
pub async fn run<S: Service>(
    service: &mut S,
    connection: Connection,
    initial_method: i32,
    initial_args: &[u8],
) -> Result<(), ClientError> {
    let (to, mut from) = connect(connection).await?;
    let _ = to.set_nodelay(true);
    let mut to = BufWriter::with_capacity(256 * 1024, to);
    let mut reader = RecordReader::new(Limits::default());
    let mut buf = vec![0u8; 256 * 1024];
    let mut restored = false;
    let mut live = false;
    let mut checkpoint: Option<(Vec<u8>, u64)> = None;
    let mut out = Outbox::default();
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            if restored && !live {
                return Ok(());
            }
            return Err(ClientError::Protocol("the coordinator closed the connection".into()));
        }
        reader.feed(&buf[..n]);
        while let Some(event) = reader.next_event()? {
            match event {
                RecordEvent::CheckpointData { data, remaining } => {
                    let c = checkpoint.get_or_insert_with(|| (Vec::new(), 0));
                    c.0.extend_from_slice(&data);
                    c.1 = remaining;
                    if remaining == 0 {
                        let (state, _) = checkpoint.take().unwrap_or_default();
                        service.restore(&state);
                        restored = true;
                    }
                }
                RecordEvent::Record(r) if r.header.seq == SEQ_CHECKPOINT => {
                    // The announcement; an empty checkpoint has no data events.
                    if let Some(Message::Checkpoint { len: 0, .. }) = first_message(&r.payload) {
                        service.restore(&[]);
                        restored = true;
                    }
                }
                RecordEvent::Record(r) if r.header.seq == SEQ_CONTROL => {
                    let mut reply = Vec::new();
                    match first_message(&r.payload) {
                        Some(Message::TakeBecomingPrimaryCheckpoint) if !restored => {
                            live = true;
                            // First start: the initial call, then our first checkpoint.
                            let body =
                                RpcBody::new(RpcKind::Call, initial_method, RpcType::FireAndForget, initial_args);
                            let mut initial = Vec::new();
                            Message::Rpc(Rpc::incoming(body)).encode(&mut initial);
                            Message::InitialMessage(Bytes::from(initial)).encode(&mut reply);
                            checkpoint_message(&service.checkpoint(), &mut reply);
                        }
                        Some(Message::UpgradeTakeCheckpoint) => {
                            live = true;
                            service.upgrade();
                            checkpoint_message(&service.checkpoint(), &mut reply);
                        }
                        Some(Message::TakeBecomingPrimaryCheckpoint | Message::TakeCheckpoint) => {
                            live = true;
                            checkpoint_message(&service.checkpoint(), &mut reply);
                        }
                        // An upgrade what-if run: upgrade the state, then the replay follows.
                        Some(Message::UpgradeService) => service.upgrade(),
                        Some(Message::BecomingPrimary) | None => {}
                        Some(other) => {
                            return Err(ClientError::Protocol(format!("unexpected control message {other:?}")));
                        }
                    }
                    to.write_all(&reply).await?;
                }
                RecordEvent::Record(r) => {
                    dispatch(service, &r.payload, &mut out)?;
                    if !out.is_empty() {
                        to.write_all(&out.messages).await?;
                        out = Outbox::default();
                    }
                }
            }
        }
        to.flush().await?;
    }
}

fn first_message(payload: &[u8]) -> Option<Message> {
    let limits = Limits::default();
    Message::decode(payload, drover_wire::ambrosia::Direction::ToApplication, &limits).ok()?.map(|(m, _)| m)
}

/// Delivers every call in a logged record.
fn dispatch<S: Service>(service: &mut S, payload: &[u8], out: &mut Outbox) -> Result<(), ClientError> {
    dispatch_level(service, payload, out, false)
}

fn dispatch_level<S: Service>(
    service: &mut S,
    payload: &[u8],
    out: &mut Outbox,
    in_initial: bool,
) -> Result<(), ClientError> {
    let mut r =
        drover_wire::ambrosia::MessageReader::new(drover_wire::ambrosia::Direction::ToApplication, Limits::default());
    r.feed(payload);
    while let Some(frame) = r.next_frame()? {
        let drover_wire::ambrosia::Frame::Message(m) = frame else { continue };
        let calls = match m {
            Message::Rpc(rpc) => vec![rpc],
            Message::RpcBatch(rpcs) | Message::CountReplayableRpcBatch { rpcs, .. } => rpcs,
            // Record 0 at first start (and in a replay from checkpoint 0): the whole
            // InitialMessage, whose data is the initial call this client sent.
            Message::InitialMessage(data) if !in_initial => {
                dispatch_level(service, &data, out, true)?;
                continue;
            }
            Message::InitialMessage(_) => {
                return Err(ClientError::Protocol("an InitialMessage nested in an InitialMessage".into()));
            }
            _ => continue,
        };
        for rpc in calls {
            service.on_call(rpc.body.method_id(), rpc.body.args(), out);
        }
    }
    Ok(())
}
