//! One application session with its coordinator, sans-IO.
//!
//! Frames the application sent (decoded by `drover_wire::ambrosia::MessageReader`) and
//! the journal's answers go in; [`Action`]s come out: bytes to send to the
//! application, entries to append to the log, checkpoints to write, the end of the
//! session. The rules are AMBROSIA-WIRE.md's:
//!
//! - **First start**: send record [-1] `TakeBecomingPrimaryCheckpoint`; take the
//!   application's `InitialMessage`, then its `Checkpoint`; write checkpoint 1, then log
//!   the whole InitialMessage (size, type 9, data) as record 0 and deliver it, as
//!   AMBROSIA's coordinator does (the bindings dispatch on that type 9). Logs written
//!   before this rule hold only the data in record 0; their checkpoint header says so
//!   ([`InitialNext::DataOnly`]) and recovery delivers the whole message all the same.
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

use std::collections::{BTreeMap, VecDeque};

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
    /// Send this call (an incoming-RPC message) to instance `dest` as its `seq`th.
    Forward {
        /// The destination instance.
        dest: String,
        /// The call's sequence number on the link to it.
        seq: i64,
        /// The message as the destination's application will see it.
        message: Bytes,
    },
    /// The calls from `source` up to `seq` are durable here: tell its coordinator.
    Commit {
        /// The sending instance.
        source: String,
        /// Everything up to here is logged.
        seq: i64,
    },
    /// End the session (the log stays intact).
    Close(String),
}

/// What the coordinator keeps with each application checkpoint, in front of the
/// application's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CheckpointHeader {
    /// Replayable self-calls the application had sent when it took the checkpoint.
    pub self_calls: u64,
    /// Of those, how many were still waiting to be logged (they are logged after the
    /// checkpoint, so recovery finds them among the records it replays).
    pub pending: u64,
    /// Whether the next record is the InitialMessage (first start), not a self-call,
    /// and in which form it was logged.
    pub initial_next: InitialNext,
    /// Per source instance: the last call sequence number logged from it.
    pub received: BTreeMap<String, i64>,
    /// Per destination instance: calls made to it so far, and those it has not
    /// committed yet (sequence number, message), which replay will not regenerate.
    pub sent: BTreeMap<String, (i64, Vec<(i64, Bytes)>)>,
    /// What was waiting to be logged (each message and whether it is replayable):
    /// the first ordinary record after the checkpoint holds all of it. Replay does not
    /// regenerate it (the application sent it before the checkpoint), so a log that
    /// ends at this checkpoint logs it again from here. Empty in checkpoints written
    /// before this field existed (a trailing part of the header older releases skip).
    pub unlogged: Vec<(Bytes, bool)>,
    /// The InitialMessage that is record 0, when it is the next record (a first
    /// start's checkpoint): a log that ends at the checkpoint logs it from here.
    pub unlogged_initial: Option<Bytes>,
    /// Per source instance, the calls from it in `unlogged` (last sequence number, how
    /// many): the tags of the record that holds them.
    pub unlogged_tags: BTreeMap<String, (i64, u32)>,
}

/// What a session started from a checkpoint must log itself unless the record after
/// that checkpoint commits (see [`CheckpointHeader::unlogged`]).
#[derive(Clone, Debug, Default)]
struct Unlogged {
    /// Record 0, until it is logged.
    initial: Option<Bytes>,
    calls: Vec<(Bytes, bool)>,
    tags: BTreeMap<String, (i64, u32)>,
}

/// What a checkpoint says about the record after it (one byte in the header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InitialNext {
    /// An ordinary record (byte 0).
    #[default]
    No,
    /// Record 0 holding only the InitialMessage's data (byte 1): written by releases
    /// before the record-0 fix; delivered wrapped as the whole message.
    DataOnly,
    /// Record 0 holding the whole InitialMessage (byte 2), delivered as logged.
    WholeMessage,
}

impl InitialNext {
    fn byte(self) -> u8 {
        match self {
            InitialNext::No => 0,
            InitialNext::DataOnly => 1,
            InitialNext::WholeMessage => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Self, String> {
        match b {
            0 => Ok(InitialNext::No),
            1 => Ok(InitialNext::DataOnly),
            2 => Ok(InitialNext::WholeMessage),
            other => Err(format!("checkpoint header: unknown record-0 form {other} (written by a newer release?)")),
        }
    }

    /// Record 0 as the application must see it: the whole InitialMessage.
    pub fn deliverable(self, logged: &Bytes) -> Bytes {
        match self {
            InitialNext::DataOnly => Message::InitialMessage(logged.clone()).to_bytes().into(),
            InitialNext::No | InitialNext::WholeMessage => logged.clone(),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    varint::put_int(out, s.len() as i32);
    out.extend_from_slice(s.as_bytes());
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn long(&mut self) -> Result<i64, String> {
        match varint::get_long(self.0) {
            Ok(Some((v, n))) => {
                self.0 = &self.0[n..];
                Ok(v)
            }
            _ => Err("truncated checkpoint header".into()),
        }
    }
    /// A count or sequence number: never negative, and small enough that the sums
    /// and `+ 1`s done with it cannot overflow (a damaged header is refused instead).
    fn count(&mut self, what: &str) -> Result<u64, String> {
        let v = self.long()?;
        if (0..=MAX_COUNT).contains(&v) {
            Ok(v as u64)
        } else {
            Err(format!("checkpoint header has an impossible {what} ({v})"))
        }
    }
    fn bytes(&mut self) -> Result<&[u8], String> {
        let n = usize::try_from(self.long()?).map_err(|_| "bad length in checkpoint header".to_owned())?;
        if n > self.0.len() {
            return Err("truncated checkpoint header".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "bad name in checkpoint header".to_owned())
    }
}

impl CheckpointHeader {
    /// The stored checkpoint: the header's length (u64 LE), the header, the application's bytes.
    pub fn encode(&self, app: &[u8]) -> Vec<u8> {
        let mut h = Vec::new();
        varint::put_long(&mut h, self.self_calls as i64);
        varint::put_long(&mut h, self.pending as i64);
        h.push(self.initial_next.byte());
        varint::put_long(&mut h, self.received.len() as i64);
        for (name, seq) in &self.received {
            put_str(&mut h, name);
            varint::put_long(&mut h, *seq);
        }
        varint::put_long(&mut h, self.sent.len() as i64);
        for (name, (count, outbox)) in &self.sent {
            put_str(&mut h, name);
            varint::put_long(&mut h, *count);
            varint::put_long(&mut h, outbox.len() as i64);
            for (seq, msg) in outbox {
                varint::put_long(&mut h, *seq);
                varint::put_long(&mut h, msg.len() as i64);
                h.extend_from_slice(msg);
            }
        }
        if !self.unlogged.is_empty() || self.unlogged_initial.is_some() || !self.unlogged_tags.is_empty() {
            // Each entry's kind byte: 0 a call that is not replayable, 1 one that is, 2
            // the InitialMessage (first, and only in a first start's checkpoint).
            let initial = self.unlogged_initial.iter().map(|m| (m, 2u8));
            let calls = self.unlogged.iter().map(|(m, r)| (m, u8::from(*r)));
            varint::put_long(&mut h, (self.unlogged.len() + usize::from(self.unlogged_initial.is_some())) as i64);
            for (msg, kind) in initial.chain(calls) {
                h.push(kind);
                varint::put_long(&mut h, msg.len() as i64);
                h.extend_from_slice(msg);
            }
            varint::put_long(&mut h, self.unlogged_tags.len() as i64);
            for (name, (seq, count)) in &self.unlogged_tags {
                put_str(&mut h, name);
                varint::put_long(&mut h, *seq);
                varint::put_long(&mut h, i64::from(*count));
            }
        }
        let mut out = Vec::with_capacity(8 + h.len() + app.len());
        out.extend_from_slice(&(h.len() as u64).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(app);
        out
    }

    /// Splits a stored checkpoint into its header and the application's bytes.
    pub fn decode(stored: &Bytes) -> Result<(CheckpointHeader, Bytes), String> {
        let short = || format!("checkpoint of {} bytes is shorter than its header", stored.len());
        let len = stored.get(..8).ok_or_else(short)?;
        let len = usize::try_from(u64::from_le_bytes(len.try_into().map_err(|_| short())?)).map_err(|_| short())?;
        // The length is read from disk: an absurd one must not overflow the range.
        let h = 8usize.checked_add(len).and_then(|end| stored.get(8..end)).ok_or_else(short)?;
        let mut c = Cursor(h);
        let self_calls = c.count("self-call count")?;
        let pending = c.count("pending count")?;
        let (&flag, rest) = c.0.split_first().ok_or_else(short)?;
        c.0 = rest;
        let mut received = BTreeMap::new();
        for _ in 0..c.long()? {
            let name = c.string()?;
            received.insert(name, c.count("sequence number")? as i64);
        }
        let mut sent = BTreeMap::new();
        for _ in 0..c.long()? {
            let name = c.string()?;
            let count = c.count("call count")? as i64;
            let mut outbox = Vec::new();
            for _ in 0..c.long()? {
                let seq = c.count("sequence number")? as i64;
                outbox.push((seq, Bytes::copy_from_slice(c.bytes()?)));
            }
            sent.insert(name, (count, outbox));
        }
        // The unlogged calls: absent in headers written before they were kept.
        let (mut unlogged, mut unlogged_tags, mut unlogged_initial) = (Vec::new(), BTreeMap::new(), None);
        if !c.0.is_empty() {
            for i in 0..c.count("unlogged call count")? {
                let (&kind, rest) = c.0.split_first().ok_or_else(short)?;
                c.0 = rest;
                let message = Bytes::copy_from_slice(c.bytes()?);
                match kind {
                    0 | 1 => unlogged.push((message, kind == 1)),
                    2 if i == 0 => unlogged_initial = Some(message),
                    k => return Err(format!("checkpoint header: unlogged entry {i} of kind {k}")),
                }
            }
            for _ in 0..c.count("unlogged source count")? {
                let name = c.string()?;
                let seq = c.count("sequence number")? as i64;
                let count = u32::try_from(c.count("call count")?)
                    .map_err(|_| "checkpoint header has an impossible call count".to_owned())?;
                unlogged_tags.insert(name, (seq, count));
            }
        }
        let initial_next = InitialNext::from_byte(flag)?;
        let header = CheckpointHeader {
            self_calls,
            pending,
            initial_next,
            received,
            sent,
            unlogged,
            unlogged_tags,
            unlogged_initial,
        };
        Ok((header, stored.slice(8 + len..)))
    }
}

/// The largest count or sequence number a checkpoint header or tag may hold (2^62):
/// far beyond any real log, and far enough below `i64::MAX` that arithmetic on it
/// cannot overflow.
const MAX_COUNT: i64 = 1 << 62;

/// The type byte of drover's own tag message in a logged record: which source
/// instance's calls the record holds (name, last sequence number, how many). AMBROSIA
/// does not use it; it is stripped before a record is delivered.
pub const SOURCE_TAG: u8 = 0x40;

fn source_tag(name: &str, last: i64, count: u32) -> Vec<u8> {
    let mut data = vec![SOURCE_TAG];
    put_str(&mut data, name);
    varint::put_long(&mut data, last);
    varint::put_long(&mut data, i64::from(count));
    let mut out = Vec::new();
    varint::put_int(&mut out, data.len() as i32);
    out.extend_from_slice(&data);
    out
}

/// A tag's (name, last sequence number, count), given the message (size included).
fn parse_tag(message: &[u8]) -> Option<(String, i64, u64)> {
    let (_, n) = varint::get_int(message).ok()??;
    let body = message.get(n..)?;
    if body.first() != Some(&SOURCE_TAG) {
        return None;
    }
    let mut c = Cursor(&body[1..]);
    let name = c.string().ok()?;
    let last = c.long().ok().filter(|v| (0..=MAX_COUNT).contains(v))?;
    let count = c.long().ok().filter(|v| (0..=MAX_COUNT).contains(v))? as u64;
    Some((name, last, count))
}

/// A record's payload without drover's tags (what the application sees), and the tags.
pub fn strip_tags(payload: &[u8]) -> (Vec<u8>, Vec<(String, i64, u64)>) {
    let Some(parts) = messages(payload) else { return (payload.to_vec(), Vec::new()) };
    let mut kept = Vec::with_capacity(payload.len());
    let mut tags = Vec::new();
    for part in parts {
        match parse_tag(part) {
            Some(t) => tags.push(t),
            None => kept.extend_from_slice(part),
        }
    }
    (kept, tags)
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
    let limits = drover_wire::ambrosia::Limits::default();
    Message::decode(message, drover_wire::ambrosia::Direction::ToApplication, &limits).ok()?.map(|(m, _)| m)
}

/// Replayable RPCs in a logged record, and the record without its impulses (`None`:
/// nothing left to replay). Payloads that are not messages (an InitialMessage's
/// bytes) are passed on as they are.
pub fn replay_view(payload: &Bytes) -> (u64, Option<Bytes>) {
    let (stripped, tags) = strip_tags(payload);
    let remote: u64 = tags.iter().fold(0, |sum, t| sum.saturating_add(t.2));
    let payload = &Bytes::from(stripped);
    let (replayable, view) = replay_view_untagged(payload);
    (replayable.saturating_sub(remote), view)
}

fn replay_view_untagged(payload: &Bytes) -> (u64, Option<Bytes>) {
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
    /// First start: then log the whole InitialMessage (these bytes).
    FirstStart(Bytes),
    /// After recovery (`upgrade`: move to the new version), then log `initial` as
    /// record 0 when the log ends before it (a first start killed between its
    /// checkpoint and record 0).
    Recovered { upgrade: bool, initial: Option<Bytes> },
    /// A checkpoint during normal operation.
    Normal,
}

impl After {
    /// The InitialMessage to log as record 0 right after this checkpoint, if any.
    fn initial(&self) -> Option<&Bytes> {
        match self {
            After::FirstStart(initial) | After::Recovered { initial: Some(initial), .. } => Some(initial),
            After::Recovered { initial: None, .. } | After::Normal => None,
        }
    }
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
    /// A secondary replica's session: committed records are delivered as they commit
    /// ([`Session::on_committed`]); nothing the application sends is logged until the
    /// replica becomes primary ([`Session::become_primary`]).
    Secondary,
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
    /// Per source instance: the last call sequence number accepted (logged or pending).
    received: BTreeMap<String, i64>,
    /// Per source: the last sequence number and count of its calls in `pending`.
    pending_tags: BTreeMap<String, (i64, u32)>,
    /// Commits to send once the record in flight is durable.
    inflight_commits: Vec<(String, i64)>,
    /// Per destination: calls made to it so far.
    sent: BTreeMap<String, i64>,
    /// Per destination: calls it has not committed yet.
    outbox: BTreeMap<String, VecDeque<(i64, Bytes)>>,
    /// A secondary's stream: what the next committed record is (the InitialMessage
    /// after a first checkpoint, or an ordinary record).
    initial_next: InitialNext,
    /// A secondary's calls read and dropped because the log already held them.
    dropped: u64,
    /// What the checkpoint this session started from had waiting to be logged, until
    /// an ordinary record after it commits (then the log holds it).
    unlogged: Option<Unlogged>,
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
            received: BTreeMap::new(),
            pending_tags: BTreeMap::new(),
            inflight_commits: Vec::new(),
            sent: BTreeMap::new(),
            outbox: BTreeMap::new(),
            initial_next: InitialNext::No,
            dropped: 0,
            unlogged: None,
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
        let phase = Phase::AwaitCheckpoint(After::Recovered { upgrade, initial: None });
        let (mut s, mut out) =
            Session::replayed(committer_id, name, stored_checkpoint, records, phase, max_checkpoint)?;
        let initial = s.requeue_unlogged();
        s.phase = Phase::AwaitCheckpoint(After::Recovered { upgrade, initial });
        let ask = if upgrade { Message::UpgradeTakeCheckpoint } else { Message::TakeBecomingPrimaryCheckpoint };
        out.push(Action::Send(control(committer_id, &ask).into()));
        Ok((s, out))
    }

    /// A secondary replica's session (seed 4's "starting as a non-upgrading secondary"
    /// or "as an upgrading secondary"): the checkpoint and the records after it, as a
    /// recovery sends them; then every record as it commits ([`Session::on_committed`]),
    /// until this replica becomes primary ([`Session::become_primary`]).
    pub fn secondary(
        committer_id: i32,
        name: &str,
        stored_checkpoint: &Bytes,
        records: impl IntoIterator<Item = (i64, Bytes)>,
        max_checkpoint: u64,
    ) -> Result<(Session, Vec<Action>), String> {
        Session::replayed(committer_id, name, stored_checkpoint, records, Phase::Secondary, max_checkpoint)
    }

    /// The checkpoint and the records after it, sent as a recovery sends them; the
    /// session then is in `phase`.
    fn replayed(
        committer_id: i32,
        name: &str,
        stored_checkpoint: &Bytes,
        records: impl IntoIterator<Item = (i64, Bytes)>,
        phase: Phase,
        max_checkpoint: u64,
    ) -> Result<(Session, Vec<Action>), String> {
        let (header, app) = CheckpointHeader::decode(stored_checkpoint)?;
        let mut s = Session::new(committer_id, name, phase, max_checkpoint);
        let mut out = vec![Action::Send(checkpoint_announcement(committer_id, &app).into())];
        let mut logged = header.self_calls - header.pending.min(header.self_calls);
        let mut initial_next = header.initial_next;
        s.received = header.received.clone();
        for (name, (count, outbox)) in &header.sent {
            s.sent.insert(name.clone(), *count);
            s.outbox.insert(name.clone(), outbox.iter().cloned().collect());
        }
        let mut unlogged = Unlogged {
            initial: header.unlogged_initial.filter(|_| header.initial_next != InitialNext::No),
            calls: header.unlogged,
            tags: header.unlogged_tags,
        };
        for (seq, payload) in records {
            if initial_next != InitialNext::No {
                // The InitialMessage record: the whole message, not a self-call.
                let whole = initial_next.deliverable(&payload);
                initial_next = InitialNext::No;
                out.push(Action::Send(record(committer_id, seq, &whole).into()));
                unlogged.initial = None;
                continue;
            }
            // The first ordinary record after the checkpoint holds what it had waiting.
            unlogged = Unlogged::default();
            for (source, last, _) in strip_tags(&payload).1 {
                let r = s.received.entry(source).or_insert(0);
                *r = (*r).max(last);
            }
            let (replayable, view) = replay_view(&payload);
            logged = logged.saturating_add(replayable);
            if let Some(p) = view {
                out.push(Action::Send(record(committer_id, seq, &p).into()));
            }
        }
        s.self_calls = header.self_calls;
        s.logged_self_calls = logged;
        s.initial_next = initial_next;
        s.unlogged = Some(unlogged).filter(|u| u.initial.is_some() || !u.calls.is_empty());
        Ok((s, out))
    }

    /// At a first start, while its checkpoint is being written: the InitialMessage the
    /// session logs as record 0 right after (a replicated log commits both together).
    pub fn initial_to_log(&self) -> Option<Bytes> {
        match &self.phase {
            Phase::Writing(after) => after.initial().cloned(),
            _ => None,
        }
    }

    /// Whether the session is in normal operation (a primary's, live).
    pub fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Normal)
    }

    /// Whether this is a secondary's session (not yet primary).
    pub fn is_secondary(&self) -> bool {
        matches!(self.phase, Phase::Secondary)
    }

    /// Calls a secondary's application sent that the log already held (dropped).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// A secondary: record `seq` committed; deliver it as a replayed record. Its
    /// replayable self-calls are counted as logged, so the application's own copies of
    /// them (regenerated as it handles the records before) are dropped; copies of calls
    /// the log does not hold yet wait, and are logged if this replica becomes primary
    /// before the old primary's record holding them commits.
    pub fn on_committed(&mut self, seq: i64, payload: &Bytes) -> Vec<Action> {
        if !self.is_secondary() {
            return Vec::new();
        }
        if self.initial_next != InitialNext::No {
            let whole = self.initial_next.deliverable(payload);
            self.initial_next = InitialNext::No;
            if let Some(u) = &mut self.unlogged {
                u.initial = None;
            }
            return vec![Action::Send(record(self.committer_id, seq, &whole).into())];
        }
        self.unlogged = None;
        for (source, last, _) in strip_tags(payload).1 {
            let r = self.received.entry(source).or_insert(0);
            *r = (*r).max(last);
        }
        let (replayable, view) = replay_view(payload);
        self.logged_self_calls = self.logged_self_calls.saturating_add(replayable);
        self.drop_logged();
        view.map(|p| vec![Action::Send(record(self.committer_id, seq, &p).into())]).unwrap_or_default()
    }

    /// A secondary: drops the waiting calls the log now holds (the oldest first: the
    /// application regenerates its calls in the order they were logged).
    fn drop_logged(&mut self) {
        let waiting = self.pending.len() as u64;
        let first = self.self_calls.saturating_sub(waiting);
        let logged = self.logged_self_calls.saturating_sub(first).min(waiting) as usize;
        for (b, _) in self.pending.drain(..logged) {
            self.pending_bytes -= b.len();
            self.dropped += 1;
        }
    }

    /// A secondary: a checkpoint committed; calls to other instances it records as
    /// committed by them are forgotten here too.
    pub fn on_checkpoint_committed(&mut self, stored: &Bytes) {
        let Ok((header, _)) = CheckpointHeader::decode(stored) else { return };
        for (dest, (count, outbox)) in header.sent {
            let acked = outbox.first().map_or(count, |(seq, _)| seq - 1);
            self.on_commit(&dest, acked);
        }
    }

    /// This replica became primary: ask the application for the checkpoint that makes
    /// it live (`UpgradeTakeCheckpoint` when upgrading); calls waiting since it was a
    /// secondary are logged after it.
    pub fn become_primary(&mut self, upgrade: bool) -> Vec<Action> {
        if !self.is_secondary() {
            return Vec::new();
        }
        let initial = self.requeue_unlogged();
        self.phase = Phase::AwaitCheckpoint(After::Recovered { upgrade, initial });
        let ask = if upgrade { Message::UpgradeTakeCheckpoint } else { Message::TakeBecomingPrimaryCheckpoint };
        vec![Action::Send(control(self.committer_id, &ask).into())]
    }

    /// Going live from a log that ends with no ordinary record after the checkpoint
    /// this session started from: what that checkpoint had waiting goes first in line
    /// (the application sent it before the checkpoint, so nothing regenerates it; the
    /// calls regenerated since are numbered after it). Returns record 0 when the log
    /// does not hold it either: it is logged right after the next checkpoint.
    fn requeue_unlogged(&mut self) -> Option<Bytes> {
        let Unlogged { initial, calls, tags } = self.unlogged.take()?;
        tracing::info!(
            calls = calls.len(),
            record_0 = initial.is_some(),
            "the log ends at a checkpoint without what it had waiting to be logged: logging it now"
        );
        self.pending_bytes += calls.iter().map(|(b, _)| b.len()).sum::<usize>();
        self.pending.splice(0..0, calls);
        for (source, (seq, count)) in tags {
            let tag = self.pending_tags.entry(source).or_insert((seq, 0));
            tag.0 = tag.0.max(seq);
            tag.1 = tag.1.saturating_add(count);
        }
        initial
    }

    /// What a debug run (seed 4's repro and upgrade what-if flows) sends: the
    /// checkpoint, `UpgradeService` when `test_upgrade`, then the records after the
    /// checkpoint exactly as recovery replays them (original sequence ids, impulses
    /// dropped, record 0 as the whole InitialMessage), and no request to go live.
    pub fn replay_only(
        committer_id: i32,
        name: &str,
        stored_checkpoint: &Bytes,
        records: impl IntoIterator<Item = (i64, Bytes)>,
        test_upgrade: bool,
    ) -> Result<Vec<Bytes>, String> {
        let (_, actions) = Session::recovery(committer_id, name, stored_checkpoint, records, false, u64::MAX)?;
        let mut out: Vec<Bytes> = actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Send(b) => Some(b),
                _ => None,
            })
            .collect();
        // The last is the TakeBecomingPrimaryCheckpoint that would make the run live.
        out.pop();
        if test_upgrade {
            out.insert(1, control(committer_id, &Message::UpgradeService).into());
        }
        Ok(out)
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
        let remote_pending: u64 = self.pending_tags.values().map(|(_, n)| u64::from(*n)).sum();
        let header = CheckpointHeader {
            self_calls: self.self_calls,
            pending: (self.pending.iter().filter(|(_, r)| *r).count() as u64).saturating_sub(remote_pending),
            initial_next: if after.initial().is_some() { InitialNext::WholeMessage } else { InitialNext::No },
            received: self.received.clone(),
            sent: self
                .sent
                .iter()
                .map(|(d, n)| {
                    (d.clone(), (*n, self.outbox.get(d).map(|o| o.iter().cloned().collect()).unwrap_or_default()))
                })
                .collect(),
            unlogged_initial: after.initial().cloned(),
            unlogged: self.pending.clone(),
            unlogged_tags: self.pending_tags.clone(),
        };
        let state = header.encode(&buf);
        self.phase = Phase::Writing(after);
        vec![Action::WriteCheckpoint(state)]
    }

    fn on_message(&mut self, m: Message) -> Vec<Action> {
        match m {
            Message::Rpc(rpc) => self.outgoing(vec![rpc]),
            Message::RpcBatch(rpcs) => self.outgoing(rpcs),
            // Links to other instances are made when there is something to send.
            Message::AttachTo { .. } => Vec::new(),
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
                    let whole = Message::InitialMessage(data).to_bytes().into();
                    self.phase = Phase::AwaitCheckpoint(After::FirstStart(whole));
                    Vec::new()
                }
                _ => self.close("an InitialMessage outside the first start"),
            },
            Message::Ping(_) | Message::PingReturn(_) if self.is_secondary() => Vec::new(),
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

    /// Calls from the application: self-calls are logged and delivered; calls to other
    /// instances are numbered per destination, kept until committed, and forwarded.
    fn outgoing(&mut self, rpcs: Vec<Rpc>) -> Vec<Action> {
        let mut out = Vec::new();
        for rpc in rpcs {
            let dest = rpc.destination.clone().unwrap_or_default();
            if !dest.is_empty() && dest != self.name {
                let n = self.sent.entry(dest.clone()).or_insert(0);
                *n += 1;
                let seq = *n;
                let message: Bytes = Message::Rpc(Rpc::incoming(rpc.body)).to_bytes().into();
                // Replayed calls get the numbers they had; the destination drops repeats.
                let outbox = self.outbox.entry(dest.clone()).or_default();
                if outbox.back().is_none_or(|(last, _)| *last < seq) {
                    outbox.push_back((seq, message.clone()));
                }
                // A secondary sends nothing: its calls go out if it becomes primary.
                if !self.is_secondary() {
                    out.push(Action::Forward { dest, seq, message });
                }
                continue;
            }
            let replayable = rpc.body.rpc_type() != RpcType::Impulse;
            if replayable {
                self.self_calls += 1;
                if self.self_calls <= self.logged_self_calls {
                    // Regenerated during replay: already in the log.
                    self.dropped += 1;
                    continue;
                }
            } else if self.is_secondary() {
                // An impulse comes from outside; a secondary's is not the primary's.
                self.dropped += 1;
                continue;
            }
            let bytes: Bytes = Message::Rpc(Rpc::incoming(rpc.body)).to_bytes().into();
            self.pending_bytes += bytes.len();
            self.pending.push((bytes, replayable));
        }
        if self.is_secondary() && self.backpressure() {
            return self.close(format!(
                "a secondary's application sent {} bytes of calls the log does not hold (limit {}): it is not replaying what the primary's did",
                self.pending_bytes, self.max_pending_bytes
            ));
        }
        out.extend(self.flush());
        out
    }

    /// The next call sequence number expected from `source` (what to ask `ReplayFrom`).
    pub fn next_from(&self, source: &str) -> i64 {
        self.received.get(source).copied().unwrap_or(0).saturating_add(1)
    }

    /// A call from another instance: logged like a self call, tagged with its source
    /// and sequence number; repeats (and calls out of order) are dropped.
    pub fn on_remote(&mut self, source: &str, seq: i64, payload: &[u8]) -> Vec<Action> {
        let next = self.next_from(source);
        if seq < next {
            return Vec::new();
        }
        if seq > next {
            // A gap: the sender's link resends from `next` once it reconnects.
            tracing::warn!(%source, seq, expected = next, "a call from another instance came out of order; dropped");
            return Vec::new();
        }
        let Some(parts) = messages(payload) else { return Vec::new() };
        let mut count = 0u32;
        for part in parts {
            if let Some(Message::Rpc(r)) = parse(part) {
                let replayable = r.body.rpc_type() != RpcType::Impulse;
                count += u32::from(replayable);
                let bytes = Bytes::copy_from_slice(part);
                self.pending_bytes += bytes.len();
                self.pending.push((bytes, replayable));
            }
        }
        self.received.insert(source.to_owned(), seq);
        let tag = self.pending_tags.entry(source.to_owned()).or_insert((seq, 0));
        tag.0 = seq;
        tag.1 += count;
        self.flush()
    }

    /// `source`'s coordinator (re)connected: its calls after `next_from` are wanted.
    /// `dest` committed everything up to `seq`: forget those calls.
    pub fn on_commit(&mut self, dest: &str, seq: i64) {
        if let Some(o) = self.outbox.get_mut(dest) {
            while o.front().is_some_and(|(s, _)| *s <= seq) {
                o.pop_front();
            }
        }
    }

    /// The calls to `dest` from `seq` on, to resend after a reconnect.
    pub fn outbox_from(&self, dest: &str, seq: i64) -> Vec<(i64, Bytes)> {
        self.outbox.get(dest).map(|o| o.iter().filter(|(s, _)| *s >= seq).cloned().collect()).unwrap_or_default()
    }

    /// Destinations with calls not yet committed.
    pub fn destinations(&self) -> Vec<String> {
        self.outbox.iter().filter(|(_, o)| !o.is_empty()).map(|(d, _)| d.clone()).collect()
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
        let tags = std::mem::take(&mut self.pending_tags);
        self.inflight_commits = tags.iter().map(|(s, (seq, _))| (s.clone(), *seq)).collect();
        let mut tag_bytes = Vec::new();
        for (source, (seq, count)) in &tags {
            tag_bytes.extend_from_slice(&source_tag(source, *seq, *count));
        }
        let entry: Bytes = if batch.len() == 1 {
            let mut one = batch.into_iter().next().map(|(b, _)| b.to_vec()).unwrap_or_default();
            one.extend_from_slice(&tag_bytes);
            one.into()
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
            let mut out = Vec::with_capacity(data.len() + 6 + tag_bytes.len());
            varint::put_int(&mut out, (data.len() + 1) as i32);
            out.push(ty as u8);
            out.extend_from_slice(&data);
            out.extend_from_slice(&tag_bytes);
            out.into()
        };
        self.in_flight = true;
        vec![Action::Append(entry)]
    }

    /// The record holding the last appended entry is durable: deliver it.
    pub fn on_durable(&mut self, seq: i64, payload: &[u8]) -> Vec<Action> {
        self.in_flight = false;
        let delivered = if self.initial_in_flight { payload.to_vec() } else { strip_tags(payload).0 };
        self.initial_in_flight = false;
        let mut out = vec![Action::Send(record(self.committer_id, seq, &delivered).into())];
        for (source, seq) in std::mem::take(&mut self.inflight_commits) {
            out.push(Action::Commit { source, seq });
        }
        out.extend(self.flush());
        out
    }

    /// The checkpoint asked for by [`Action::WriteCheckpoint`] is durable.
    pub fn on_checkpoint_written(&mut self) -> Vec<Action> {
        let Phase::Writing(after) = std::mem::replace(&mut self.phase, Phase::Normal) else { return Vec::new() };
        let mut out = Vec::new();
        if let After::Recovered { upgrade: true, .. } = after {
            out.push(Action::Upgraded);
        }
        // Record 0 next (a first start, or a log that ended before it): alone.
        if let Some(initial) = after.initial() {
            self.in_flight = true;
            self.initial_in_flight = true;
            out.push(Action::Append(initial.clone()));
            return out;
        }
        out.extend(self.flush());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(arg: u8) -> Bytes {
        use drover_wire::ambrosia::{RpcBody, RpcKind};
        Message::Rpc(Rpc::incoming(RpcBody::new(RpcKind::Call, 32, RpcType::FireAndForget, &[arg]))).to_bytes().into()
    }

    fn sent(arg: u8) -> Frame {
        use drover_wire::ambrosia::{RpcBody, RpcKind};
        Frame::Message(Message::Rpc(Rpc::outgoing("", RpcBody::new(RpcKind::Call, 32, RpcType::FireAndForget, &[arg]))))
    }

    #[test]
    fn a_secondary_drops_what_the_log_holds_keeps_what_it_does_not_and_logs_it_once_primary() {
        let stored = Bytes::from(CheckpointHeader::default().encode(b"s"));
        let (mut s, out) = Session::secondary(7, "app", &stored, vec![(0, logged(1))], 1 << 20).unwrap();
        assert_eq!(out.len(), 2, "[-2] with the checkpoint, then record 0: {out:?}");
        assert!(s.is_secondary());
        // The application regenerates call 1 (in the log: dropped) and makes call 2
        // (not in the log yet: it waits); a secondary sends nothing and logs nothing.
        assert!(s.on_frame(sent(1)).is_empty());
        assert!(s.on_frame(sent(2)).is_empty());
        assert_eq!(s.dropped(), 1);
        // Record 1 (the primary's call 2) commits: delivered, and the waiting copy dropped.
        let out = s.on_committed(1, &logged(2));
        assert_eq!(out, vec![Action::Send(record(7, 1, &logged(2)).into())]);
        assert_eq!(s.dropped(), 2);
        // Call 3 waits; on becoming primary the application is asked for a checkpoint,
        // after which call 3 is logged, once.
        assert!(s.on_frame(sent(3)).is_empty());
        let ask = s.become_primary(false);
        assert_eq!(ask, vec![Action::Send(control(7, &Message::TakeBecomingPrimaryCheckpoint).into())]);
        let write = s.on_frame(Frame::Message(Message::Checkpoint { len: 0, fixed_length: false }));
        let [Action::WriteCheckpoint(state)] = write.as_slice() else { panic!("{write:?}") };
        let (header, _) = CheckpointHeader::decode(&Bytes::from(state.clone())).unwrap();
        assert_eq!((header.self_calls, header.pending), (3, 1));
        assert_eq!(s.on_checkpoint_written(), vec![Action::Append(logged(3))]);
        // An upgrading secondary is asked with UpgradeTakeCheckpoint instead.
        let (mut u, _) = Session::secondary(7, "app", &stored, Vec::new(), 1 << 20).unwrap();
        assert_eq!(u.become_primary(true), vec![Action::Send(control(7, &Message::UpgradeTakeCheckpoint).into())]);
        assert!(u.become_primary(true).is_empty(), "only once");
    }

    /// A live session with `in_flight` appended and not yet durable, then `waiting`
    /// calls sent while the application answers `TakeCheckpoint`: the checkpoint it
    /// writes, and the session.
    fn checkpoint_with_waiting_calls(in_flight: u8, waiting: &[u8], remote: Option<(&str, u8)>) -> (Session, Bytes) {
        let empty = Bytes::from(CheckpointHeader::default().encode(b""));
        let (mut s, _) = Session::recovery(7, "app", &empty, Vec::new(), false, 1 << 20).unwrap();
        let _ = s.on_frame(Frame::Message(Message::Checkpoint { len: 0, fixed_length: false }));
        let _ = s.on_checkpoint_written();
        assert_eq!(s.on_frame(sent(in_flight)), vec![Action::Append(logged(in_flight))]);
        assert!(s.request_checkpoint().is_empty(), "asked once nothing is in flight");
        let out = s.on_durable(0, &logged(in_flight));
        assert_eq!(out.last(), Some(&Action::Send(control(7, &Message::TakeCheckpoint).into())));
        for arg in waiting {
            assert!(s.on_frame(sent(*arg)).is_empty());
        }
        if let Some((source, arg)) = remote {
            assert!(s.on_remote(source, 1, &logged(arg)).is_empty());
        }
        let write = s.on_frame(Frame::Message(Message::Checkpoint { len: 0, fixed_length: false }));
        let [Action::WriteCheckpoint(state)] = write.as_slice() else { panic!("{write:?}") };
        (s, Bytes::from(state.clone()))
    }

    /// The one record a session appends next (the waiting calls, batched).
    fn appended(out: &[Action]) -> Bytes {
        match out {
            [Action::Append(entry)] => entry.clone(),
            other => panic!("expected one append: {other:?}"),
        }
    }

    #[test]
    fn calls_waiting_at_a_checkpoint_are_logged_even_when_the_log_ends_at_it() {
        let (mut live, stored) = checkpoint_with_waiting_calls(1, &[2, 3], None);
        let (header, _) = CheckpointHeader::decode(&stored).unwrap();
        assert_eq!((header.self_calls, header.pending), (3, 2));
        assert_eq!(header.unlogged, vec![(logged(2), true), (logged(3), true)]);
        // Without a crash, the record after the checkpoint holds both.
        let next = appended(&live.on_checkpoint_written());
        assert_eq!(replay_view(&next).0, 2);

        // A crash after the checkpoint and before that record: recovery logs them.
        let (mut s, _) = Session::recovery(7, "app", &stored, Vec::new(), false, 1 << 20).unwrap();
        let write = s.on_frame(Frame::Message(Message::Checkpoint { len: 0, fixed_length: false }));
        let [Action::WriteCheckpoint(again)] = write.as_slice() else { panic!("{write:?}") };
        let (header, _) = CheckpointHeader::decode(&Bytes::from(again.clone())).unwrap();
        assert_eq!((header.self_calls, header.pending, header.unlogged.len()), (3, 2, 2));
        assert_eq!(appended(&s.on_checkpoint_written()), next, "the same record, once");
        // The application's next call is its fourth: logged, not taken for a repeat.
        assert!(s.on_frame(sent(4)).is_empty(), "one record in flight");
        assert_eq!(s.on_durable(2, &next), vec![Action::Send(record(7, 2, &next).into()), Action::Append(logged(4))]);

        // With that record in the log, recovery replays it and logs nothing again.
        let (mut s, out) = Session::recovery(7, "app", &stored, vec![(2, next.clone())], false, 1 << 20).unwrap();
        assert_eq!(out.len(), 3, "[-2] and checkpoint, the record, TakeBecomingPrimaryCheckpoint: {out:?}");
        let _ = s.on_frame(Frame::Message(Message::Checkpoint { len: 0, fixed_length: false }));
        assert!(s.on_checkpoint_written().is_empty());
    }

    /// The record the session appends for these self-calls (an `RpcBatch`).
    fn batch(args: &[u8]) -> Bytes {
        let mut data = Vec::new();
        varint::put_int(&mut data, args.len() as i32);
        for a in args {
            data.extend_from_slice(&logged(*a));
        }
        let mut out = Vec::new();
        varint::put_int(&mut out, (data.len() + 1) as i32);
        out.push(MessageType::RpcBatch as u8);
        out.extend_from_slice(&data);
        out.into()
    }

    #[test]
    fn a_secondary_started_at_such_a_checkpoint_logs_them_first_on_becoming_primary_unless_their_record_commits() {
        let (mut live, stored) = checkpoint_with_waiting_calls(1, &[2, 3], None);
        let next = appended(&live.on_checkpoint_written());
        assert_eq!(next, batch(&[2, 3]));
        // The primary is lost before that record commits. This replica's application
        // started from the checkpoint (so it never makes calls 2 and 3 again) and makes
        // call 4, which waits; on becoming primary, 2 and 3 go first.
        let (mut s, _) = Session::secondary(7, "app", &stored, Vec::new(), 1 << 20).unwrap();
        assert!(s.on_frame(sent(4)).is_empty());
        let _ = s.become_primary(false);
        let write = s.on_frame(Frame::Message(Message::Checkpoint { len: 0, fixed_length: false }));
        let [Action::WriteCheckpoint(state)] = write.as_slice() else { panic!("{write:?}") };
        let (header, _) = CheckpointHeader::decode(&Bytes::from(state.clone())).unwrap();
        assert_eq!((header.self_calls, header.pending), (4, 3));
        assert_eq!(appended(&s.on_checkpoint_written()), batch(&[2, 3, 4]));

        // The record commits first: the secondary delivers it and logs nothing again.
        let (mut s, _) = Session::secondary(7, "app", &stored, Vec::new(), 1 << 20).unwrap();
        assert_eq!(s.on_committed(2, &next), vec![Action::Send(record(7, 2, &next).into())]);
        let _ = s.become_primary(false);
        let _ = s.on_frame(Frame::Message(Message::Checkpoint { len: 0, fixed_length: false }));
        assert!(s.on_checkpoint_written().is_empty());
    }

    #[test]
    fn a_call_from_another_instance_waiting_at_a_checkpoint_is_logged_and_committed_after_recovery() {
        let (_, stored) = checkpoint_with_waiting_calls(1, &[], Some(("peer", 9)));
        let (header, _) = CheckpointHeader::decode(&stored).unwrap();
        assert_eq!(header.received.get("peer"), Some(&1));
        assert_eq!(header.unlogged_tags.get("peer"), Some(&(1, 1)));
        // The log ends at the checkpoint: the peer is not asked again (it counts the
        // call as received), so recovery logs it, tagged, and then commits it.
        let (mut s, _) = Session::recovery(7, "app", &stored, Vec::new(), false, 1 << 20).unwrap();
        assert_eq!(s.next_from("peer"), 2);
        let _ = s.on_frame(Frame::Message(Message::Checkpoint { len: 0, fixed_length: false }));
        let entry = appended(&s.on_checkpoint_written());
        let (stripped, tags) = strip_tags(&entry);
        assert_eq!(stripped, logged(9).to_vec());
        assert_eq!(tags, vec![("peer".to_owned(), 1, 1)]);
        let out = s.on_durable(2, &entry);
        assert!(out.contains(&Action::Commit { source: "peer".into(), seq: 1 }), "{out:?}");
    }

    #[test]
    fn the_unlogged_part_of_a_header_is_optional_and_damage_to_it_is_refused() {
        let (_, stored) = checkpoint_with_waiting_calls(1, &[2, 3], Some(("peer", 9)));
        let len = u64::from_le_bytes(stored[..8].try_into().unwrap()) as usize;
        let (full, app) = (stored.slice(8..8 + len), stored.slice(8 + len..));
        // Where the unlogged part starts: the header of the same checkpoint without it.
        let (mut header, _) = CheckpointHeader::decode(&stored).unwrap();
        let (unlogged, tags) = (std::mem::take(&mut header.unlogged), std::mem::take(&mut header.unlogged_tags));
        let old = Bytes::from(header.encode(&app));
        let old_len = u64::from_le_bytes(old[..8].try_into().unwrap()) as usize;
        assert_eq!(full[..old_len], old[8..8 + old_len], "the part is appended after the older fields");
        assert!(CheckpointHeader::decode(&old).unwrap().0.unlogged.is_empty(), "a header without it: nothing unlogged");
        assert_eq!((unlogged.len(), tags.len()), (3, 1));
        // Every cut inside the part is refused (not read as fewer calls, no panic).
        for cut in old_len + 1..len {
            let mut damaged = (cut as u64).to_le_bytes().to_vec();
            damaged.extend_from_slice(&full[..cut]);
            damaged.extend_from_slice(&app);
            assert!(CheckpointHeader::decode(&Bytes::from(damaged)).is_err(), "cut at {cut} of {len}");
        }
    }

    #[test]
    fn a_checkpoint_header_length_from_disk_cannot_overflow() {
        // The first 8 bytes are the header's length, read from disk: the largest one
        // used to overflow `8 + len` (a panic in debug builds).
        for len in [u64::MAX, u64::MAX - 7, 1 << 40] {
            let mut stored = len.to_le_bytes().to_vec();
            stored.extend_from_slice(&[0; 16]);
            let err = CheckpointHeader::decode(&Bytes::from(stored)).unwrap_err();
            assert!(err.contains("shorter than its header"), "{err}");
        }
    }

    /// A header with counts near `i64::MAX` used to overflow while recovery added up
    /// the logged self-calls (found by the fuzz target `coordinator_checkpoint`).
    #[test]
    fn impossible_counts_are_refused_and_huge_tags_do_not_overflow() {
        let mut h = Vec::new();
        varint::put_long(&mut h, i64::MAX);
        varint::put_long(&mut h, 0);
        h.extend_from_slice(&[0, 0, 0]);
        let mut stored = (h.len() as u64).to_le_bytes().to_vec();
        stored.extend_from_slice(&h);
        let err = CheckpointHeader::decode(&Bytes::from(stored)).unwrap_err();
        assert!(err.contains("impossible self-call count"), "{err}");
        for bad in [-1, MAX_COUNT + 1] {
            let mut h = Vec::new();
            varint::put_long(&mut h, 0);
            varint::put_long(&mut h, bad);
            h.extend_from_slice(&[0, 0, 0]);
            let mut stored = (h.len() as u64).to_le_bytes().to_vec();
            stored.extend_from_slice(&h);
            let err = CheckpointHeader::decode(&Bytes::from(stored)).unwrap_err();
            assert!(err.contains("impossible pending count"), "{err}");
        }

        // The largest counts a header may hold, then records whose tags claim huge
        // counts: recovery saturates instead of overflowing, and asks for the same
        // sequence number it would for any source.
        let header = CheckpointHeader { self_calls: MAX_COUNT as u64, ..Default::default() };
        let stored = Bytes::from(header.encode(b"app"));
        let huge = Bytes::from(source_tag("peer", MAX_COUNT, u32::MAX));
        let records = (1..=3).map(|i| (i, huge.clone()));
        let (s, actions) = Session::recovery(7, "app", &stored, records, false, 1 << 20).unwrap();
        assert_eq!(s.next_from("peer"), MAX_COUNT + 1);
        assert!(matches!(actions.last(), Some(Action::Send(_))));

        // The fuzz finding itself, byte for byte.
        let crash = [
            15u8, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 15, 5, 0, 158, 158, 158, 158, 158, 158, 158, 158, 158,
            158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158,
            158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 0, 158, 158, 158, 158, 158, 199,
            199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 199, 158, 158,
            255, 255, 255, 15, 0, 1, 127, 62, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158, 158,
            158, 158, 158, 158, 158, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 191, 255, 29, 0, 0, 0, 0, 216,
        ];
        let (&split, rest) = crash.split_first().unwrap();
        let at = (split as usize).min(rest.len());
        let stored = Bytes::copy_from_slice(&rest[..at]);
        let records: Vec<(i64, Bytes)> =
            rest[at..].chunks(17).enumerate().map(|(i, c)| (i as i64, Bytes::copy_from_slice(c))).collect();
        let _ = Session::recovery(7, "app", &stored, records.clone(), false, 1 << 20);
        let _ = Session::replay_only(7, "app", &stored, records, true);
    }
}
