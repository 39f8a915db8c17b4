//! One application session with its coordinator, sans-IO.
//!
//! Frames the application sent (decoded by `drover_wire::ambrosia::MessageReader`) and
//! the journal's answers go in; [`Action`]s come out: bytes to send to the
//! application, entries to append to the log, checkpoints to write, the end of the
//! session. The rules are AMBROSIA-WIRE.md's:
//!
//! - **First start**: send record [-1] `TakeBecomingPrimaryCheckpoint`; take the
//!   application's `InitialMessage`, then its `Checkpoint`; write checkpoint 1, then log
//!   the InitialMessage's data verbatim as record 0 and deliver it.
//! - **Recovery**: send [-2] with the checkpoint, replay the records after it with their
//!   sequence ids (impulse RPCs dropped), send [-1] `TakeBecomingPrimaryCheckpoint` (or
//!   `UpgradeTakeCheckpoint` when upgrading) and take the application's checkpoint.
//! - **Normal**: every RPC to the application itself is logged before it is delivered;
//!   while one log write is in flight, arriving RPCs gather into the next record (two or
//!   more become one `RPCBatch`, or `CountReplayableRPCBatch` when some are impulses).
//!   A checkpoint (asked for by the application with `TakeCheckpoint`, or by the
//!   coordinator when its log grew) waits until nothing is in flight, so it covers
//!   exactly the records the application has been sent.
//! - **Replay dedup**: the application regenerates its outgoing calls while it replays;
//!   the coordinator counts the replayable (non-impulse) self-calls it has logged and
//!   drops regenerated ones up to that count, so a recovery repeats no call.
//! - A misbehaving application (coordinator-only message types, an unprompted
//!   checkpoint, an oversize checkpoint) ends its session with a clear reason; the log
//!   is left as it was.

use bytes::Bytes;
use drover_wire::ambrosia::{Frame, HEADER_LEN, Message, MessageType, RecordHeader, Rpc, RpcType, check_bytes, varint};

/// What the session's I/O must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the application's send connection.
    Send(Bytes),
    /// Append this entry to the log as one record; report it with [`Session::on_durable`].
    Append(Bytes),
    /// Write this checkpoint (our header + the application's bytes); then call
    /// [`Session::on_checkpoint_written`].
    WriteCheckpoint(Vec<u8>),
    /// The upgrade checkpoint was written: move the instance to the new version.
    Upgraded,
    /// End the session (the log stays intact).
    Close(String),
}

/// Bytes of drover's header in front of the application's checkpoint.
pub const CHECKPOINT_HEADER: usize = 17;

/// What the coordinator keeps with each application checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CheckpointHeader {
    /// Replayable self-calls the application had sent when it took the checkpoint.
    pub self_calls: u64,
    /// Of those, how many were still waiting to be logged (they are logged after the
    /// checkpoint, so recovery finds them among the records it replays).
    pub pending: u64,
    /// The next record is the InitialMessage (first start), not a self-call.
    pub initial_next: bool,
}

impl CheckpointHeader {
    fn encode(&self, app: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHECKPOINT_HEADER + app.len());
        out.extend_from_slice(&self.self_calls.to_le_bytes());
        out.extend_from_slice(&self.pending.to_le_bytes());
        out.push(u8::from(self.initial_next));
        out.extend_from_slice(app);
        out
    }

    /// Splits a stored checkpoint into its header and the application's bytes.
    pub fn decode(stored: &Bytes) -> Result<(CheckpointHeader, Bytes), String> {
        if stored.len() < CHECKPOINT_HEADER {
            return Err(format!("checkpoint of {} bytes is shorter than its header", stored.len()));
        }
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&stored[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let header = CheckpointHeader { self_calls: word(0), pending: word(8), initial_next: stored[16] == 1 };
        Ok((header, stored.slice(CHECKPOINT_HEADER..)))
    }
}

/// A whole record: header (with check bytes over `payload`) and payload.
pub fn record(committer_id: i32, seq: i64, payload: &[u8]) -> Vec<u8> {
    let header =
        RecordHeader { committer_id, length: (HEADER_LEN + payload.len()) as i32, check: check_bytes(payload), seq };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    header.encode(&mut out);
    out.extend_from_slice(payload);
    out
}

/// A [-1] control record holding one data-less message.
pub fn control(committer_id: i32, message: &Message) -> Vec<u8> {
    record(committer_id, -1, &message.to_bytes())
}

/// The [-2] record announcing a checkpoint, followed by its bytes.
pub fn checkpoint_announcement(committer_id: i32, app_checkpoint: &[u8]) -> Vec<u8> {
    let msg = Message::Checkpoint { len: app_checkpoint.len() as u64, fixed_length: false }.to_bytes();
    let header = RecordHeader { committer_id, length: (HEADER_LEN + msg.len()) as i32, check: 0, seq: -2 };
    let mut out = Vec::with_capacity(HEADER_LEN + msg.len() + app_checkpoint.len());
    header.encode(&mut out);
    out.extend_from_slice(&msg);
    out.extend_from_slice(app_checkpoint);
    out
}

/// Splits a record payload into its messages (size-prefixed), if it is well framed.
fn messages(payload: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let (size, n) = varint::get_int(&payload[at..]).ok()??;
        let end = at + n + usize::try_from(size).ok()?;
        if size <= 0 || end > payload.len() {
            return None;
        }
        out.push(&payload[at..end]);
        at = end;
    }
    Some(out)
}

fn parse(message: &[u8]) -> Option<Message> {
    let mut reader = drover_wire::ambrosia::MessageReader::new(
        drover_wire::ambrosia::Direction::ToApplication,
        drover_wire::ambrosia::Limits::default(),
    );
    reader.feed(message);
    match reader.next_frame() {
        Ok(Some(Frame::Message(m))) => Some(m),
        _ => None,
    }
}

/// Replayable RPCs in a logged record, and the record without its impulses (`None`:
/// nothing left to replay). Payloads that are not messages (an InitialMessage's
/// bytes) are passed on as they are.
pub fn replay_view(payload: &Bytes) -> (u64, Option<Bytes>) {
    let Some(parts) = messages(payload) else { return (0, Some(payload.clone())) };
    let mut replayable = 0u64;
    let mut kept: Vec<u8> = Vec::with_capacity(payload.len());
    let mut changed = false;
    for part in parts {
        match parse(part) {
            Some(Message::Rpc(r)) if r.body.rpc_type() == RpcType::Impulse => changed = true,
            Some(Message::Rpc(_)) => {
                replayable += 1;
                kept.extend_from_slice(part);
            }
            Some(Message::RpcBatch(rpcs)) | Some(Message::CountReplayableRpcBatch { rpcs, .. }) => {
                let mut keep: Vec<Rpc> = rpcs.into_iter().filter(|r| r.body.rpc_type() != RpcType::Impulse).collect();
                replayable += keep.len() as u64;
                changed = true;
                if keep.len() > 1 {
                    Message::RpcBatch(keep).encode(&mut kept);
                } else if let Some(one) = keep.pop() {
                    Message::Rpc(one).encode(&mut kept);
                }
            }
            _ => kept.extend_from_slice(part),
        }
    }
    if !changed {
        return (replayable, Some(payload.clone()));
    }
    (replayable, (!kept.is_empty()).then(|| Bytes::from(kept)))
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum After {
    /// First start: then log the InitialMessage.
    FirstStart(Bytes),
    /// After recovery (`upgrade`: move to the new version).
    Recovered { upgrade: bool },
    /// A checkpoint during normal operation.
    Normal,
}

#[derive(Debug)]
enum Phase {
    /// First start: waiting for the InitialMessage.
    AwaitInitial,
    /// Waiting for the application's `Checkpoint` message.
    AwaitCheckpoint(After),
    /// Reading checkpoint bytes.
    Reading { after: After, buf: Vec<u8>, remaining: u64 },
    /// The checkpoint is being written.
    Writing(After),
    /// Normal operation.
    Normal,
}

/// One application session.
#[derive(Debug)]
pub struct Session {
    committer_id: i32,
    name: String,
    phase: Phase,
    /// Incoming messages waiting for the next record: (encoded message, replayable).
    pending: Vec<(Bytes, bool)>,
    in_flight: bool,
    want_checkpoint: bool,
    /// Replayable self-calls received from the application (counting from the base).
    self_calls: u64,
    /// Replayable self-calls already in the log: regenerated ones up to here are dropped.
    logged_self_calls: u64,
    /// The record being appended is the InitialMessage.
    initial_in_flight: bool,
    max_checkpoint: u64,
    max_pending_bytes: usize,
    pending_bytes: usize,
}

impl Session {
    fn new(committer_id: i32, name: &str, phase: Phase, max_checkpoint: u64) -> Session {
        Session {
            committer_id,
            name: name.to_owned(),
            phase,
            pending: Vec::new(),
            in_flight: false,
            want_checkpoint: false,
            self_calls: 0,
            logged_self_calls: 0,
            initial_in_flight: false,
            max_checkpoint,
            max_pending_bytes: 8 << 20,
            pending_bytes: 0,
        }
    }

    /// A first start: the application is asked for its initial message and checkpoint.
    pub fn first_start(committer_id: i32, name: &str, max_checkpoint: u64) -> (Session, Vec<Action>) {
        let s = Session::new(committer_id, name, Phase::AwaitInitial, max_checkpoint);
        let send = control(committer_id, &Message::TakeBecomingPrimaryCheckpoint);
        (s, vec![Action::Send(send.into())])
    }

    /// A recovery (or upgrade): the checkpoint, the records after it, then a request
    /// for a checkpoint.
    pub fn recovery(
        committer_id: i32,
        name: &str,
        stored_checkpoint: &Bytes,
        records: impl IntoIterator<Item = (i64, Bytes)>,
        upgrade: bool,
        max_checkpoint: u64,
    ) -> Result<(Session, Vec<Action>), String> {
        let (header, app) = CheckpointHeader::decode(stored_checkpoint)?;
        let mut s =
            Session::new(committer_id, name, Phase::AwaitCheckpoint(After::Recovered { upgrade }), max_checkpoint);
        let mut out = vec![Action::Send(checkpoint_announcement(committer_id, &app).into())];
        let mut logged = header.self_calls - header.pending.min(header.self_calls);
        let mut initial_next = header.initial_next;
        for (seq, payload) in records {
            if initial_next {
                // The InitialMessage record: delivered as logged, not a self-call.
                initial_next = false;
                out.push(Action::Send(record(committer_id, seq, &payload).into()));
                continue;
            }
            let (replayable, view) = replay_view(&payload);
            logged += replayable;
            if let Some(p) = view {
                out.push(Action::Send(record(committer_id, seq, &p).into()));
            }
        }
        s.self_calls = header.self_calls;
        s.logged_self_calls = logged;
        let ask = if upgrade { Message::UpgradeTakeCheckpoint } else { Message::TakeBecomingPrimaryCheckpoint };
        out.push(Action::Send(control(committer_id, &ask).into()));
        Ok((s, out))
    }

    fn close(&self, why: impl Into<String>) -> Vec<Action> {
        vec![Action::Close(why.into())]
    }

    /// A frame from the application.
    pub fn on_frame(&mut self, frame: Frame) -> Vec<Action> {
        match frame {
            Frame::CheckpointData { data, remaining } => {
                let Phase::Reading { buf, remaining: left, .. } = &mut self.phase else {
                    return self.close("checkpoint bytes outside a checkpoint");
                };
                buf.extend_from_slice(&data);
                *left = remaining;
                if remaining == 0 { self.checkpoint_read() } else { Vec::new() }
            }
            Frame::Message(m) => self.on_message(m),
        }
    }

    fn checkpoint_read(&mut self) -> Vec<Action> {
        let Phase::Reading { after, buf, .. } = std::mem::replace(&mut self.phase, Phase::Normal) else {
            return Vec::new();
        };
        let header = CheckpointHeader {
            self_calls: self.self_calls,
            pending: self.pending.iter().filter(|(_, r)| *r).count() as u64,
            initial_next: matches!(after, After::FirstStart(_)),
        };
        let state = header.encode(&buf);
        self.phase = Phase::Writing(after);
        vec![Action::WriteCheckpoint(state)]
    }

    fn on_message(&mut self, m: Message) -> Vec<Action> {
        match m {
            Message::Rpc(rpc) => self.outgoing(vec![rpc]),
            Message::RpcBatch(rpcs) => self.outgoing(rpcs),
            Message::AttachTo { destination } => {
                if destination.is_empty() || destination == self.name {
                    Vec::new()
                } else {
                    self.close(format!(
                        "AttachTo {destination:?}: calls to other instances are not supported by this coordinator yet"
                    ))
                }
            }
            Message::TakeCheckpoint => {
                self.want_checkpoint = true;
                self.flush()
            }
            Message::Checkpoint { len, .. } => {
                let after = match std::mem::replace(&mut self.phase, Phase::Normal) {
                    Phase::AwaitCheckpoint(after) => after,
                    other => {
                        self.phase = other;
                        return self.close("a Checkpoint the coordinator did not ask for");
                    }
                };
                if len > self.max_checkpoint {
                    return self
                        .close(format!("checkpoint of {len} bytes is over the limit of {}", self.max_checkpoint));
                }
                self.phase =
                    Phase::Reading { after, buf: Vec::with_capacity(len.min(1 << 26) as usize), remaining: len };
                if len == 0 { self.checkpoint_read() } else { Vec::new() }
            }
            Message::InitialMessage(data) => match self.phase {
                Phase::AwaitInitial => {
                    self.phase = Phase::AwaitCheckpoint(After::FirstStart(data));
                    Vec::new()
                }
                _ => self.close("an InitialMessage outside the first start"),
            },
            Message::Ping(_) | Message::PingReturn(_) => {
                self.pending.push((m.to_bytes().into(), false));
                self.flush()
            }
            other => self.close(format!(
                "message type {} ({:?}) is not one an application may send",
                other.message_type() as u8,
                other.message_type()
            )),
        }
    }

    /// Calls from the application: self-calls are logged and delivered.
    fn outgoing(&mut self, rpcs: Vec<Rpc>) -> Vec<Action> {
        for rpc in rpcs {
            let dest = rpc.destination.clone().unwrap_or_default();
            if !dest.is_empty() && dest != self.name {
                return self.close(format!(
                    "a call to {dest:?}: calls to other instances are not supported by this coordinator yet"
                ));
            }
            let replayable = rpc.body.rpc_type() != RpcType::Impulse;
            if replayable {
                self.self_calls += 1;
                if self.self_calls <= self.logged_self_calls {
                    // Regenerated during replay: already in the log.
                    continue;
                }
            }
            let bytes: Bytes = Message::Rpc(Rpc::incoming(rpc.body)).to_bytes().into();
            self.pending_bytes += bytes.len();
            self.pending.push((bytes, replayable));
        }
        self.flush()
    }

    /// The coordinator wants a checkpoint (its log grew).
    pub fn request_checkpoint(&mut self) -> Vec<Action> {
        self.want_checkpoint = true;
        self.flush()
    }

    /// Whether incoming calls should stop being read for now (too much is waiting).
    pub fn backpressure(&self) -> bool {
        self.pending_bytes >= self.max_pending_bytes
    }

    /// Starts the next record, or the checkpoint that waits for no record in flight.
    fn flush(&mut self) -> Vec<Action> {
        if self.in_flight || !matches!(self.phase, Phase::Normal) {
            return Vec::new();
        }
        if self.want_checkpoint {
            self.want_checkpoint = false;
            self.phase = Phase::AwaitCheckpoint(After::Normal);
            return vec![Action::Send(control(self.committer_id, &Message::TakeCheckpoint).into())];
        }
        if self.pending.is_empty() {
            return Vec::new();
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let entry: Bytes = if batch.len() == 1 {
            batch.into_iter().next().map(|(b, _)| b).unwrap_or_default()
        } else {
            let replayable = batch.iter().filter(|(_, r)| *r).count();
            let count = batch.len();
            let mut data = Vec::new();
            varint::put_int(&mut data, count as i32);
            let ty = if replayable < count {
                varint::put_int(&mut data, replayable as i32);
                MessageType::CountReplayableRpcBatch
            } else {
                MessageType::RpcBatch
            };
            for (b, _) in &batch {
                data.extend_from_slice(b);
            }
            let mut out = Vec::with_capacity(data.len() + 6);
            varint::put_int(&mut out, (data.len() + 1) as i32);
            out.push(ty as u8);
            out.extend_from_slice(&data);
            out.into()
        };
        self.in_flight = true;
        vec![Action::Append(entry)]
    }

    /// The record holding the last appended entry is durable: deliver it.
    pub fn on_durable(&mut self, seq: i64, payload: &[u8]) -> Vec<Action> {
        self.in_flight = false;
        self.initial_in_flight = false;
        let mut out = vec![Action::Send(record(self.committer_id, seq, payload).into())];
        out.extend(self.flush());
        out
    }

    /// The checkpoint asked for by [`Action::WriteCheckpoint`] is durable.
    pub fn on_checkpoint_written(&mut self) -> Vec<Action> {
        let Phase::Writing(after) = std::mem::replace(&mut self.phase, Phase::Normal) else { return Vec::new() };
        let mut out = Vec::new();
        match after {
            After::FirstStart(initial) => {
                self.in_flight = true;
                self.initial_in_flight = true;
                out.push(Action::Append(initial));
                return out;
            }
            After::Recovered { upgrade: true } => out.push(Action::Upgraded),
            After::Recovered { upgrade: false } | After::Normal => {}
        }
        out.extend(self.flush());
        out
    }
}
