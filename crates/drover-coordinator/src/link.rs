//! Links between coordinators (calls from one instance's application to another's).
//!
//! The link handshake drover chose (AMBROSIA leaves its own to the coordinator): the
//! sending coordinator connects to the receiving one's peer port and sends `AttachTo`
//! with its own instance name. The receiver answers `ReplayFrom { next expected
//! sequence number }` and `TrimTo { that minus one }`. Then the connection carries data
//! one way and control the other: the sender writes each call as a log record whose
//! sequence id is the call's number on this link (resending its uncommitted calls from
//! the asked number first); the receiver logs calls in order, drops repeats, and once
//! they are durable answers `Commit { seq }`, after which the sender forgets them. Any
//! error ends the connection; the sender reconnects and the handshake starts over, so
//! a crash on either side neither loses nor repeats a call.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use drover_wire::ambrosia::{Direction, Frame, Limits, Message, MessageReader, RecordEvent, RecordReader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::session::record;

/// What the main loop tells an outgoing link.
#[derive(Debug)]
pub enum LinkCmd {
    /// A new call (dropped until the link has resent what was asked).
    Forward(i64, Bytes),
    /// The calls to resend after `ReplayFrom`.
    Resend(Vec<(i64, Bytes)>),
}

/// What links tell the main loop.
#[derive(Debug)]
pub enum PeerEvent {
    /// `dest` asks for our calls from `seq` on.
    ReplayFrom {
        /// The destination.
        dest: String,
        /// The next call it expects.
        seq: i64,
    },
    /// `dest` has everything up to `seq` (Commit or TrimTo).
    Commit {
        /// The destination.
        dest: String,
        /// Durable there up to here.
        seq: i64,
    },
    /// Another coordinator linked to us.
    InboundOpened {
        /// Its instance.
        source: String,
        /// Where our control messages to it go.
        writer: mpsc::UnboundedSender<Bytes>,
    },
    /// A call from another instance.
    Remote {
        /// Its instance.
        source: String,
        /// The call's number on that link.
        seq: i64,
        /// The record payload (incoming-RPC messages).
        payload: Bytes,
    },
}

fn control(m: &Message) -> Bytes {
    m.to_bytes().into()
}

/// The messages the receiver sends when a sender (re)connects.
pub fn greeting(next: i64) -> Bytes {
    let mut out = Message::ReplayFrom { seq: next, replayable_seq: next }.to_bytes();
    Message::TrimTo { seq: next - 1 }.encode(&mut out);
    out.into()
}

/// A commit message.
pub fn commit(seq: i64) -> Bytes {
    control(&Message::Commit { seq, replayable_seq: seq })
}

/// Runs the outgoing link from `own` to `dest` until aborted, reconnecting forever.
pub async fn outgoing(
    own: String,
    committer_id: i32,
    dest: String,
    log_dir: PathBuf,
    peers: Option<PathBuf>,
    mut cmds: mpsc::UnboundedReceiver<LinkCmd>,
    events: mpsc::UnboundedSender<PeerEvent>,
) {
    // A replicated destination has an address per replica; only its primary takes the
    // link, so a failed or refused attempt moves on to the next address.
    let mut next = 0usize;
    loop {
        let addrs = crate::instance::lookup_peers(&log_dir, peers.as_deref(), &dest);
        if addrs.is_empty() {
            tracing::debug!(%dest, "no address for the instance yet");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let addr = addrs[next % addrs.len()].clone();
        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await else {
            next += 1;
            tokio::time::sleep(Duration::from_millis(if addrs.len() > 1 { 20 } else { 200 })).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        if s.write_all(&control(&Message::AttachTo { destination: own.clone() })).await.is_err() {
            continue;
        }
        let began = tokio::time::Instant::now();
        let why = run_link(&mut s, committer_id, &dest, &mut cmds, &events).await;
        tracing::info!(%dest, %addr, %why, "link to the instance ended; reconnecting");
        // A link closed at once was refused (a secondary): try the next replica.
        if began.elapsed() < Duration::from_secs(1) && addrs.len() > 1 {
            next += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn run_link(
    s: &mut TcpStream,
    committer_id: i32,
    dest: &str,
    cmds: &mut mpsc::UnboundedReceiver<LinkCmd>,
    events: &mpsc::UnboundedSender<PeerEvent>,
) -> String {
    let (mut rd, mut wr) = s.split();
    let mut reader = MessageReader::new(Direction::ToCoordinator, Limits::default());
    let mut buf = vec![0u8; 64 * 1024];
    let mut ready = false;
    let greeted = tokio::time::Instant::now();
    // Calls written on this connection and not yet committed by the other side, with
    // when: one left uncommitted for COMMIT_WAIT ends the link, and the handshake on
    // the next connection resends it (a receiver that dropped a call, say on its way to
    // becoming primary, would otherwise wait for it forever).
    let mut unanswered: std::collections::VecDeque<(i64, tokio::time::Instant)> = Default::default();
    loop {
        let overdue = unanswered.front().map(|(_, at)| *at + COMMIT_WAIT);
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = match n {
                    Ok(0) => return "closed by the other coordinator".into(),
                    Ok(n) => n,
                    Err(e) => return e.to_string(),
                };
                reader.feed(&buf[..n]);
                loop {
                    match reader.next_frame() {
                        Ok(Some(Frame::Message(Message::ReplayFrom { seq, .. }))) => {
                            ready = false;
                            let _ = events.send(PeerEvent::ReplayFrom { dest: dest.to_owned(), seq });
                        }
                        Ok(Some(Frame::Message(Message::Commit { seq, .. } | Message::TrimTo { seq }))) => {
                            while unanswered.front().is_some_and(|(s, _)| *s <= seq) {
                                unanswered.pop_front();
                            }
                            let _ = events.send(PeerEvent::Commit { dest: dest.to_owned(), seq });
                        }
                        Ok(Some(other)) => return format!("unexpected control frame {other:?}"),
                        Ok(None) => break,
                        Err(e) => return format!("bad control bytes: {e}"),
                    }
                }
            }
            cmd = cmds.recv() => {
                let batch = match cmd {
                    None => return "the session ended".into(),
                    Some(LinkCmd::Forward(seq, msg)) if ready => vec![(seq, msg)],
                    Some(LinkCmd::Forward(..)) => continue,
                    Some(LinkCmd::Resend(entries)) => {
                        ready = true;
                        entries
                    }
                };
                let mut bytes = Vec::new();
                let now = tokio::time::Instant::now();
                for (seq, msg) in batch {
                    bytes.extend_from_slice(&record(committer_id, seq, &msg));
                    if unanswered.back().is_none_or(|(last, _)| *last < seq) {
                        unanswered.push_back((seq, now));
                    }
                }
                if let Err(e) = wr.write_all(&bytes).await {
                    return e.to_string();
                }
            }
            _ = tokio::time::sleep_until(greeted + Duration::from_secs(5)), if !ready => {
                return "no ReplayFrom within 5 s".into();
            }
            _ = async { tokio::time::sleep_until(overdue.expect("guarded")).await }, if overdue.is_some() => {
                let seq = unanswered.front().map_or(0, |(s, _)| *s);
                tracing::warn!(%dest, seq, "call not committed by the other coordinator within {COMMIT_WAIT:?}; reconnecting to resend it");
                return format!("call {seq} not committed within {COMMIT_WAIT:?}");
            }
        }
    }
}

/// How long a call sent on a link may wait for the other side's `Commit` before the
/// link is made again (a commit takes a log write: milliseconds).
const COMMIT_WAIT: Duration = Duration::from_secs(3);

/// Most bytes a link may send before its `AttachTo` (which holds only a name).
const HELLO_LIMIT: usize = 4096;

/// Serves one incoming link until it ends.
pub async fn incoming(mut s: TcpStream, events: mpsc::UnboundedSender<PeerEvent>) {
    let _ = s.set_nodelay(true);
    // The hello: AttachTo with the sender's name. Until it has said who it is, a peer
    // gets a small budget (one short message), not the 64 MiB of a logged call.
    let hello = Limits { max_message: HELLO_LIMIT, max_record: HELLO_LIMIT, ..Limits::default() };
    let mut reader = MessageReader::new(Direction::ToCoordinator, hello);
    let mut buf = vec![0u8; 64 * 1024];
    let mut hello_bytes = 0usize;
    let source = loop {
        let n = match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        hello_bytes += n;
        if hello_bytes > HELLO_LIMIT {
            tracing::warn!("a link sent more than {HELLO_LIMIT} bytes before its AttachTo; closing it");
            return;
        }
        reader.feed(&buf[..n]);
        match reader.next_frame() {
            Ok(Some(Frame::Message(Message::AttachTo { destination }))) => break destination,
            Ok(None) => continue,
            _ => return,
        }
    };
    let (writer, mut outbound) = mpsc::unbounded_channel::<Bytes>();
    if events.send(PeerEvent::InboundOpened { source: source.clone(), writer }).is_err() {
        return;
    }
    // A linked peer's records carry calls, each at most MAX_CALL.
    let calls = Limits {
        max_record: crate::server::MAX_CALL + drover_wire::ambrosia::HEADER_LEN + 64,
        max_message: crate::server::MAX_CALL,
        ..Limits::default()
    };
    let mut records = RecordReader::new(calls);
    if !reader.at_boundary() {
        return;
    }
    let (mut rd, mut wr) = s.split();
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = match n {
                    Ok(n) if n > 0 => n,
                    _ => return,
                };
                records.feed(&buf[..n]);
                loop {
                    match records.next_event() {
                        Ok(Some(RecordEvent::Record(r))) => {
                            let ev = PeerEvent::Remote { source: source.clone(), seq: r.header.seq, payload: r.payload };
                            if events.send(ev).is_err() {
                                return;
                            }
                        }
                        Ok(Some(RecordEvent::CheckpointData { .. })) => return,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(%source, error = %e, "bad record on a link; closing it");
                            return;
                        }
                    }
                }
            }
            out = outbound.recv() => {
                let Some(bytes) = out else { return };
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
    }
}
