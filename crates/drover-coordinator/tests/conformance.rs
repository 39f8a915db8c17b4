//! Byte-level conformance: the coordinator in this process, the application played by
//! raw sockets in the test (no drover code on the application side for the first-start
//! exchange: bytes are written and checked by hand against AMBROSIA-WIRE.md).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{assert_refused, copy_dir, golden, read_exact, store_golden};
use drover_coordinator::{CoordinatorConfig, instance};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// XXH64 (seed 0) by hand would be long; the vectors in AMBROSIA-WIRE.md fix the
/// values we need.
const CHECK_02_0B: [u8; 8] = [0xC7, 0xF1, 0x79, 0xC2, 0xCB, 0x84, 0x2D, 0xDA];

struct Coordinator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), drover_coordinator::CoordinatorError>>,
    receive: u16,
    send: u16,
}

impl Coordinator {
    async fn start(dir: &Path, connect_send: bool, send_port: u16, upgrade: Option<u64>) -> Coordinator {
        let mut c = CoordinatorConfig::new("app", dir, 0, send_port);
        c.connect_send = connect_send;
        c.upgrade_version = upgrade;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(drover_coordinator::run(
            c,
            async {
                let _ = stopped.await;
            },
            move |l| {
                let _ = tx.send(l);
            },
        ));
        let l = rx.await.expect("listening");
        Coordinator { stop: Some(stop), task, receive: l.receive_port, send: l.send_port.unwrap_or(send_port) }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Connects as a current-generation application: receive port, then send port.
async fn connect(c: &Coordinator) -> (TcpStream, TcpStream) {
    let to = TcpStream::connect(("127.0.0.1", c.receive)).await.unwrap();
    let from = TcpStream::connect(("127.0.0.1", c.send)).await.unwrap();
    (to, from)
}

/// Reads one record: (committer, check bytes, seq, payload).
async fn read_record(s: &mut TcpStream) -> (i32, [u8; 8], i64, Vec<u8>) {
    let h = read_exact(s, 24).await;
    let committer = i32::from_le_bytes(h[0..4].try_into().unwrap());
    let len = i32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let check: [u8; 8] = h[8..16].try_into().unwrap();
    let seq = i64::from_le_bytes(h[16..24].try_into().unwrap());
    let payload = read_exact(s, len - 24).await;
    (committer, check, seq, payload)
}

/// Connects and goes through a first start: InitialMessage "hi", an empty checkpoint,
/// record 0 read back.
async fn first_start(c: &Coordinator) -> (TcpStream, TcpStream) {
    let (mut to, mut from) = connect(c).await;
    read_exact(&mut from, 26).await;
    to.write_all(&[0x06, 0x09, b'h', b'i']).await.unwrap();
    to.write_all(&[0x04, 0x08, 0x00]).await.unwrap();
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (0, &[0x06, 0x09, b'h', b'i'][..]));
    (to, from)
}

fn xxh64(data: &[u8]) -> [u8; 8] {
    drover_wire::ambrosia::check_bytes(data).to_le_bytes()
}

#[tokio::test]
async fn first_start_exchange_byte_for_byte_in_both_checkpoint_forms() {
    for fixed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        instance::register(dir.path(), "app", 0).unwrap();
        let c = Coordinator::start(dir.path(), false, 0, None).await;
        let (mut to, mut from) = connect(&c).await;
        // The 26-byte first-start record: [-1] TakeBecomingPrimaryCheckpoint.
        let first = read_exact(&mut from, 26).await;
        let committer = &first[0..4];
        assert_eq!(&first[4..8], &[0x1A, 0, 0, 0], "length 26");
        assert_eq!(&first[8..16], &CHECK_02_0B, "check bytes of 02 0B");
        assert_eq!(&first[16..24], &[0xFF; 8], "sequence id -1");
        assert_eq!(&first[24..], &[0x02, 0x0B]);
        // InitialMessage "hello" (size 6, type 9), then a 3-byte checkpoint.
        to.write_all(&[0x0C, 0x09, b'h', b'e', b'l', b'l', b'o']).await.unwrap();
        if fixed {
            // The C client's form: size 9 (zigzag 0x12), type 8, 8-byte little-endian length.
            to.write_all(&[0x12, 0x08, 3, 0, 0, 0, 0, 0, 0, 0]).await.unwrap();
        } else {
            to.write_all(&[0x04, 0x08, 0x06]).await.unwrap(); // size 2, type 8, zigzag long 3
        }
        to.write_all(&[7, 7, 7]).await.unwrap();
        // Record seq 0: the whole InitialMessage, as sent, with its check bytes.
        let (cid, check, seq, payload) = read_record(&mut from).await;
        assert_eq!(cid.to_le_bytes(), committer);
        assert_eq!(seq, 0);
        assert_eq!(payload, b"\x0C\x09hello");
        assert_eq!(check, xxh64(b"\x0C\x09hello"));
        // The test vector: a self RPC comes back as record 1 without its destination.
        to.write_all(&[0x10, 0x00, 0x00, 0x00, 0x40, 0x01, 0x05, 0x04, 0x03]).await.unwrap();
        let (_, check, seq, payload) = read_record(&mut from).await;
        assert_eq!((seq, payload.as_slice()), (1, &[0x0E, 0x00, 0x00, 0x40, 0x01, 0x05, 0x04, 0x03][..]));
        assert_eq!(check, xxh64(&payload));
        // TakeCheckpoint from the app: a [-1] record holding 02 02; then it checkpoints.
        to.write_all(&[0x02, 0x02]).await.unwrap();
        let (_, _, seq, payload) = read_record(&mut from).await;
        assert_eq!((seq, payload.as_slice()), (-1, &[0x02, 0x02][..]));
        to.write_all(&[0x04, 0x08, 0x04, 1, 2]).await.unwrap();
        // AttachTo itself is accepted; normal traffic goes on.
        to.write_all(&[0x08, 0x01, b'a', b'p', b'p']).await.unwrap();
        to.write_all(&[0x10, 0x00, 0x00, 0x00, 0x40, 0x01, 0x09, 0x09, 0x09]).await.unwrap();
        let (_, _, seq, _) = read_record(&mut from).await;
        assert_eq!(seq, 2);
        drop((to, from));
        c.stop().await;
        let files: Vec<String> = std::fs::read_dir(instance::log_path(dir.path(), "app"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(files.iter().filter(|f| f.starts_with("checkpoint")).count() >= 1, "{files:?}");
    }
}

#[tokio::test]
async fn recovery_replays_after_the_checkpoint_and_drops_regenerated_calls() {
    let dir = tempfile::tempdir().unwrap();
    instance::register(dir.path(), "app", 0).unwrap();
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = connect(&c).await;
    read_exact(&mut from, 26).await;
    to.write_all(&[0x0C, 0x09, b'h', b'e', b'l', b'l', b'o']).await.unwrap();
    to.write_all(&[0x04, 0x08, 0x02, 0xAA]).await.unwrap(); // checkpoint: one byte, AA
    read_record(&mut from).await; // seq 0
    // Two self calls (args 01 and 02), an impulse (args 03): seq 1, 2, 3.
    for (ty, arg) in [(1u8, 1u8), (1, 2), (2, 3)] {
        to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, ty, arg]).await.unwrap();
        read_record(&mut from).await;
    }
    drop((to, from));
    // The application comes back: checkpoint, replay without the impulse, then [-1] 11.
    let (mut to, mut from) = connect(&c).await;
    let head = read_exact(&mut from, 24).await;
    assert_eq!(&head[8..16], &[0; 8], "a [-2] record has no check bytes");
    assert_eq!(i64::from_le_bytes(head[16..24].try_into().unwrap()), -2);
    let announce = read_exact(&mut from, i32::from_le_bytes(head[4..8].try_into().unwrap()) as usize - 24).await;
    assert_eq!(announce, [0x04, 0x08, 0x02], "Checkpoint message of 1 byte");
    assert_eq!(read_exact(&mut from, 1).await, [0xAA]);
    let mut seqs = Vec::new();
    loop {
        let (_, _, seq, payload) = read_record(&mut from).await;
        if seq == -1 {
            assert_eq!(payload, [0x02, 0x0B], "then TakeBecomingPrimaryCheckpoint");
            break;
        }
        seqs.push((seq, payload));
    }
    assert_eq!(seqs.len(), 3, "initial message and the two calls; the impulse is not replayed: {seqs:?}");
    assert_eq!(seqs[0], (0, b"\x0C\x09hello".to_vec()));
    assert_eq!(seqs[2].1.last(), Some(&2));
    // While replaying, the app regenerates its two self calls: they are already logged.
    for arg in [1u8, 2] {
        to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, arg]).await.unwrap();
    }
    to.write_all(&[0x04, 0x08, 0x02, 0xBB]).await.unwrap();
    // A new call gets the next sequence id; the regenerated ones were dropped.
    to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, 0x63]).await.unwrap();
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.last()), (4, Some(&0x63)));
    drop((to, from));
    c.stop().await;
}

#[tokio::test]
async fn older_generation_coordinator_connects_out_and_batches_calls() {
    let dir = tempfile::tempdir().unwrap();
    instance::register(dir.path(), "app", 0).unwrap();
    // The application listens on its send port; the coordinator connects to it.
    let app_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let send_port = app_listener.local_addr().unwrap().port();
    let c = Coordinator::start(dir.path(), true, send_port, None).await;
    let mut to = TcpStream::connect(("127.0.0.1", c.receive)).await.unwrap();
    let (mut from, _) = tokio::time::timeout(Duration::from_secs(10), app_listener.accept()).await.unwrap().unwrap();
    read_exact(&mut from, 26).await;
    to.write_all(&[0x06, 0x09, b'h', b'i']).await.unwrap();
    to.write_all(&[0x04, 0x08, 0x00]).await.unwrap(); // an empty checkpoint
    let (_, _, seq, _) = read_record(&mut from).await;
    assert_eq!(seq, 0);
    // Many calls written at once: while one record is being written the rest gather,
    // and a record of two or more is one RPCBatch (or CountReplayableRPCBatch).
    let mut burst = Vec::new();
    for i in 0..200u8 {
        burst.extend_from_slice(&[0x0C, 0x00, 0x00, 0x00, 0x40, if i % 10 == 0 { 2 } else { 1 }, i]);
    }
    to.write_all(&burst).await.unwrap();
    let (mut calls, mut batches) = (0usize, 0usize);
    while calls < 200 {
        let (_, _, _, payload) = read_record(&mut from).await;
        let mut r = drover_wire::ambrosia::MessageReader::new(
            drover_wire::ambrosia::Direction::ToApplication,
            drover_wire::ambrosia::Limits::default(),
        );
        r.feed(&payload);
        match r.next_frame().unwrap().unwrap() {
            drover_wire::ambrosia::Frame::Message(drover_wire::ambrosia::Message::Rpc(_)) => calls += 1,
            drover_wire::ambrosia::Frame::Message(drover_wire::ambrosia::Message::RpcBatch(v)) => {
                assert!(v.len() >= 2);
                calls += v.len();
                batches += 1;
            }
            drover_wire::ambrosia::Frame::Message(drover_wire::ambrosia::Message::CountReplayableRpcBatch {
                replayable,
                rpcs,
            }) => {
                assert!(rpcs.len() >= 2 && (replayable as usize) < rpcs.len());
                calls += rpcs.len();
                batches += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(calls, 200);
    assert!(batches > 0, "some calls were batched");
    drop((to, from));
    c.stop().await;
}

#[tokio::test]
async fn misbehaving_applications_are_closed_and_the_log_stays_intact() {
    let dir = tempfile::tempdir().unwrap();
    instance::register(dir.path(), "app", 0).unwrap();
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = first_start(&c).await;
    // A Commit (type 3) is coordinator-to-coordinator only: the session ends.
    to.write_all(&[0x06, 0x03, 0x00, 0x00]).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), from.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(n, 0, "closed without sending more");
    // The next start is a recovery that still has record 0.
    let (_to, mut from) = connect(&c).await;
    read_checkpoint(&mut from).await;
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (0, &[0x06, 0x09, b'h', b'i'][..]));
    c.stop().await;
}

#[tokio::test]
async fn a_torn_log_tail_is_cut_at_the_last_whole_record_and_logging_goes_on_in_a_fresh_file() {
    let dir = tempfile::tempdir().unwrap();
    instance::register(dir.path(), "app", 0).unwrap();
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = first_start(&c).await;
    to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, 0x01]).await.unwrap();
    read_record(&mut from).await;
    drop((to, from));
    c.stop().await;
    // A crash mid-write: half a record at the end of the newest log file.
    let log = instance::log_path(dir.path(), "app");
    let mut segments: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let newest = segments.last().unwrap().clone();
    let whole = std::fs::metadata(&newest).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&newest).unwrap();
    std::io::Write::write_all(&mut f, &[0x78, 0x56, 0x34, 0x12, 0x40, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(f);
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = connect(&c).await;
    let mut head = vec![0u8; 24];
    if tokio::time::timeout(Duration::from_secs(5), from.read_exact(&mut head)).await.is_err() || c.task.is_finished() {
        let r = c.task.await;
        panic!("coordinator ended: {r:?}");
    }
    read_exact(&mut from, i32::from_le_bytes(head[4..8].try_into().unwrap()) as usize - 24).await;
    let mut last = -1;
    loop {
        let (_, _, seq, _) = read_record(&mut from).await;
        if seq == -1 {
            break;
        }
        last = seq;
    }
    assert_eq!(last, 1, "replay stops at the last whole record");
    assert_eq!(std::fs::metadata(&newest).unwrap().len(), whole, "the torn bytes were cut off");
    // A deterministic application regenerates its logged call while replaying (it is
    // dropped as a repeat), then checkpoints.
    to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, 0x01]).await.unwrap();
    to.write_all(&[0x04, 0x08, 0x00]).await.unwrap();
    to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, 0x02]).await.unwrap();
    let (_, _, seq, _) = read_record(&mut from).await;
    assert_eq!(seq, 2);
    drop((to, from));
    c.stop().await;
    let after: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log") && !segments.contains(p))
        .collect();
    assert_eq!(after.len(), 1, "record 2 went to a fresh log file: {after:?}");
}

/// The C client's InitialMessage (AMBROSIA-WIRE.md "Start-up sequences"): a whole
/// incoming self-call in the data.
const C_INITIAL: [u8; 10] = [0x12, 0x09, 0x0E, 0x00, 0x00, 0x40, 0x01, 0x05, 0x04, 0x03];
/// The JavaScript client's InitialMessage: its version string "2.0.1".
const JS_INITIAL: [u8; 7] = [0x0C, 0x09, 0x32, 0x2E, 0x30, 0x2E, 0x31];

/// `tests/golden/record0-v1` was written by the release before the record-0 fix (it
/// logged only the InitialMessage's data as record 0): a first start with the C
/// client's InitialMessage, a 2-byte checkpoint, two self calls. Recreate (with that
/// release only) by `DROVER_WRITE_GOLDEN=record0-v1 cargo test -p drover-coordinator
/// --test conformance golden`.
#[tokio::test]
async fn golden_record0_v1_directory_recovers_with_record_0_as_the_whole_initial_message() {
    if std::env::var("DROVER_WRITE_GOLDEN").as_deref() == Ok("record0-v1") {
        let dir = tempfile::tempdir().unwrap();
        instance::register(dir.path(), "app", 0).unwrap();
        let c = Coordinator::start(dir.path(), false, 0, None).await;
        let (mut to, mut from) = connect(&c).await;
        read_exact(&mut from, 26).await;
        to.write_all(&C_INITIAL).await.unwrap();
        to.write_all(&[0x04, 0x08, 0x04, 0xC0, 0xDE]).await.unwrap();
        read_record(&mut from).await;
        for arg in [1u8, 2] {
            to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, arg]).await.unwrap();
            read_record(&mut from).await;
        }
        drop((to, from));
        c.stop().await;
        store_golden("record0-v1", dir.path(), &["app/LOCK"]);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&golden("record0-v1"), dir.path());
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = connect(&c).await;
    let head = read_exact(&mut from, 24).await;
    assert_eq!(i64::from_le_bytes(head[16..24].try_into().unwrap()), -2);
    let announce = read_exact(&mut from, i32::from_le_bytes(head[4..8].try_into().unwrap()) as usize - 24).await;
    assert_eq!(announce, [0x04, 0x08, 0x04]);
    assert_eq!(read_exact(&mut from, 2).await, [0xC0, 0xDE]);
    let (_, check, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (0, &C_INITIAL[..]), "an old record 0 is delivered as the whole message");
    assert_eq!(check, xxh64(&C_INITIAL));
    for (want, arg) in [(1, 1u8), (2, 2)] {
        let (_, _, seq, payload) = read_record(&mut from).await;
        assert_eq!((seq, payload.as_slice()), (want, &[0x0A, 0x00, 0x00, 0x40, 0x01, arg][..]));
    }
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (-1, &[0x02, 0x0B][..]));
    // The application regenerates its two calls (dropped), checkpoints, goes on.
    for arg in [1u8, 2] {
        to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, arg]).await.unwrap();
    }
    to.write_all(&[0x04, 0x08, 0x00]).await.unwrap();
    to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, 0x03]).await.unwrap();
    let (_, _, seq, _) = read_record(&mut from).await;
    assert_eq!(seq, 3);
    drop((to, from));
    c.stop().await;
}

/// A self call as the application sends it (fire-and-forget, method 32, one byte).
fn call(arg: u8) -> [u8; 7] {
    [0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, arg]
}

/// The same call as a logged record delivers it.
fn delivered(arg: u8) -> [u8; 6] {
    [0x0A, 0x00, 0x00, 0x40, 0x01, arg]
}

/// Writes a log through the session and the journal, as the coordinator does, and
/// stops right after writing checkpoint `last` (1 or 2), as a coordinator killed
/// before the record that follows it: a first start (C InitialMessage, checkpoint
/// `C0 DE`, then record 0), call 1 logged, a checkpoint asked for, calls 2 and 3 sent
/// before the application's answer `C2 DE` (so they wait to be logged after it).
/// With `last` 2 this is `tests/golden/checkpoint-header-v2`.
async fn write_log_ending_at_checkpoint(dir: &Path, last: usize) {
    use drover_coordinator::session::{Action, Session};
    use drover_journal::{FsStorage, Journal, JournalConfig};
    use drover_wire::ambrosia::{Direction, Frame, Limits, MessageReader};
    instance::register(dir, "app", 0).unwrap();
    let config = JournalConfig::new(instance::log_path(dir, "app"));
    let (journal, _) = Journal::open(config, std::sync::Arc::new(FsStorage)).unwrap();
    let (mut session, _) = Session::first_start(journal.committer_id(), "app", 1 << 20);
    // What the application sends, parsed as the coordinator parses it.
    let frames = |bytes: &[u8]| {
        let mut r = MessageReader::new(Direction::ToCoordinator, Limits::default());
        r.feed(bytes);
        std::iter::from_fn(move || r.next_frame().unwrap()).collect::<Vec<Frame>>()
    };
    let mut app = frames(&C_INITIAL);
    app.extend(frames(&[0x04, 0x08, 0x04, 0xC0, 0xDE]));
    app.extend(frames(&call(1)));
    let mut checkpoints = 0;
    let mut queue: std::collections::VecDeque<Action> = Default::default();
    loop {
        let Some(action) = queue.pop_front() else {
            match app.is_empty() {
                true if checkpoints == 1 => {
                    // Call 1 is logged: the coordinator asks for a checkpoint; calls 2
                    // and 3 come before the application's answer.
                    queue.extend(session.request_checkpoint());
                    app.extend(frames(&call(2)));
                    app.extend(frames(&call(3)));
                    app.extend(frames(&[0x04, 0x08, 0x04, 0xC2, 0xDE]));
                    continue;
                }
                true => panic!("the application has nothing more to send"),
                false => {
                    queue.extend(session.on_frame(app.remove(0)));
                    continue;
                }
            }
        };
        match action {
            Action::Append(entry) => {
                let at = journal.append(entry.clone()).await.unwrap().await.unwrap();
                queue.extend(session.on_durable(at.seq, &entry));
            }
            Action::WriteCheckpoint(state) => {
                journal.checkpoint(state).await.unwrap();
                checkpoints += 1;
                if checkpoints == last {
                    break;
                }
                queue.extend(session.on_checkpoint_written());
            }
            Action::Send(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    tokio::task::spawn_blocking(move || journal.close_blocking()).await.unwrap();
}

/// `tests/golden/checkpoint-header-v2`: a log that ends at a checkpoint whose two
/// waiting calls were never logged (see `write_log_ending_at_checkpoint`). A checkpoint
/// header now carries such calls; a release before it lost them. Recreate by
/// `DROVER_WRITE_GOLDEN=checkpoint-header-v2 cargo test -p drover-coordinator --test
/// conformance golden`.
#[tokio::test]
async fn golden_checkpoint_header_v2_a_log_ending_at_a_checkpoint_still_logs_the_calls_that_waited() {
    if std::env::var("DROVER_WRITE_GOLDEN").as_deref() == Ok("checkpoint-header-v2") {
        let dir = tempfile::tempdir().unwrap();
        write_log_ending_at_checkpoint(dir.path(), 2).await;
        store_golden("checkpoint-header-v2", dir.path(), &["app/LOCK"]);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&golden("checkpoint-header-v2"), dir.path());
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = connect(&c).await;
    // The second checkpoint, no record after it, and the request to go live.
    assert_eq!(read_checkpoint(&mut from).await, [0xC2, 0xDE]);
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (-1, &[0x02, 0x0B][..]));
    to.write_all(&[0x04, 0x08, 0x00]).await.unwrap();
    // Calls 2 and 3 are logged (once, in one record) and delivered.
    let (_, _, seq, payload) = read_record(&mut from).await;
    let mut batch = Vec::new();
    drover_wire::ambrosia::varint::put_int(&mut batch, 2);
    batch.extend_from_slice(&delivered(2));
    batch.extend_from_slice(&delivered(3));
    let mut want = Vec::new();
    drover_wire::ambrosia::varint::put_int(&mut want, batch.len() as i32 + 1);
    want.push(drover_wire::ambrosia::MessageType::RpcBatch as u8);
    want.extend_from_slice(&batch);
    assert_eq!((seq, payload), (2, want));
    // The application's next call is logged after them.
    to.write_all(&call(4)).await.unwrap();
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (3, &delivered(4)[..]));
    drop((to, from));
    c.stop().await;
}

/// A first start killed between its checkpoint and record 0: recovery logs the
/// InitialMessage as record 0 after the application's recovery checkpoint, delivered
/// whole, and the application goes on from it.
#[tokio::test]
async fn a_first_start_killed_before_record_0_logs_the_initial_message_on_recovery() {
    let dir = tempfile::tempdir().unwrap();
    write_log_ending_at_checkpoint(dir.path(), 1).await;
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = connect(&c).await;
    assert_eq!(read_checkpoint(&mut from).await, [0xC0, 0xDE]);
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (-1, &[0x02, 0x0B][..]));
    to.write_all(&[0x04, 0x08, 0x02, 0xC0]).await.unwrap();
    let (_, check, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (0, &C_INITIAL[..]), "record 0, the whole InitialMessage");
    assert_eq!(check, xxh64(&C_INITIAL));
    to.write_all(&call(1)).await.unwrap();
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (1, &delivered(1)[..]));
    drop((to, from));
    c.stop().await;
    // And a recovery from the checkpoint written meanwhile replays record 0 whole.
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (_to, mut from) = connect(&c).await;
    assert_eq!(read_checkpoint(&mut from).await, [0xC0]);
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (0, &C_INITIAL[..]));
    let (_, _, seq, payload) = read_record(&mut from).await;
    assert_eq!((seq, payload.as_slice()), (1, &delivered(1)[..]));
    drop((_to, from));
    c.stop().await;
}

/// Connects as either generation: (app → coordinator, coordinator → app).
async fn connect_as(c: &Coordinator, app_listener: Option<&TcpListener>) -> (TcpStream, TcpStream) {
    match app_listener {
        None => connect(c).await,
        Some(l) => {
            let to = TcpStream::connect(("127.0.0.1", c.receive)).await.unwrap();
            let (from, _) = tokio::time::timeout(Duration::from_secs(10), l.accept()).await.unwrap().unwrap();
            (to, from)
        }
    }
}

/// Reads a [-2] announcement and the checkpoint bytes after it.
async fn read_checkpoint(from: &mut TcpStream) -> Vec<u8> {
    let head = read_exact(from, 24).await;
    assert_eq!(i64::from_le_bytes(head[16..24].try_into().unwrap()), -2);
    let announce = read_exact(from, i32::from_le_bytes(head[4..8].try_into().unwrap()) as usize - 24).await;
    let (len, _) = drover_wire::ambrosia::varint::get_long(&announce[2..]).unwrap().unwrap();
    read_exact(from, len as usize).await
}

#[tokio::test]
async fn record_0_is_the_whole_initial_message_in_c_and_js_forms_for_both_generations_and_after_recovery() {
    for (form, initial) in [("C", &C_INITIAL[..]), ("JavaScript", &JS_INITIAL[..])] {
        for older in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            instance::register(dir.path(), "app", 0).unwrap();
            let app_listener = if older { Some(TcpListener::bind("127.0.0.1:0").await.unwrap()) } else { None };
            let send_port = app_listener.as_ref().map_or(0, |l| l.local_addr().unwrap().port());
            let c = Coordinator::start(dir.path(), older, send_port, None).await;
            let (mut to, mut from) = connect_as(&c, app_listener.as_ref()).await;
            let first = read_exact(&mut from, 26).await;
            assert_eq!(&first[16..], &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02, 0x0B]);
            to.write_all(initial).await.unwrap();
            to.write_all(&[0x04, 0x08, 0x02, 0x11]).await.unwrap();
            let (_, check, seq, payload) = read_record(&mut from).await;
            assert_eq!((seq, payload.as_slice()), (0, initial), "{form}, older generation {older}");
            assert_eq!(check, xxh64(initial));
            // The application dispatches record 0 on its type byte: 9.
            assert_eq!(payload[1], 9);
            drop((to, from));
            // Recovery replays record 0 exactly as it was delivered live.
            let (mut to, mut from) = connect_as(&c, app_listener.as_ref()).await;
            assert_eq!(read_checkpoint(&mut from).await, [0x11]);
            let (_, check, seq, payload) = read_record(&mut from).await;
            assert_eq!((seq, payload.as_slice()), (0, initial), "{form} after recovery, older generation {older}");
            assert_eq!(check, xxh64(initial));
            let (_, _, seq, payload) = read_record(&mut from).await;
            assert_eq!((seq, payload.as_slice()), (-1, &[0x02, 0x0B][..]));
            to.write_all(&[0x04, 0x08, 0x02, 0x22]).await.unwrap();
            to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, 0x07]).await.unwrap();
            let (_, _, seq, _) = read_record(&mut from).await;
            assert_eq!(seq, 1, "normal processing follows");
            drop((to, from));
            c.stop().await;
        }
    }
}

/// A debug run's task.
type DebugRun =
    tokio::task::JoinHandle<Result<drover_coordinator::debug::DebugReport, drover_coordinator::CoordinatorError>>;

/// Starts a debug run over `dir`'s instance "app", listening on both ports, or
/// connecting out to the application's port `connect_to` (the older generation);
/// returns its task, its receive port and the send port.
async fn start_debug(
    dir: &Path,
    checkpoint: Option<i64>,
    test_upgrade: bool,
    connect_to: Option<u16>,
) -> (DebugRun, u16, u16) {
    let mut coordinator = CoordinatorConfig::new("app", dir, 0, connect_to.unwrap_or(0));
    coordinator.connect_send = connect_to.is_some();
    let config = drover_coordinator::debug::DebugConfig { coordinator, checkpoint, test_upgrade };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(drover_coordinator::debug::debug(config, std::future::pending(), move |l| {
        let _ = tx.send(l);
    }));
    let l = rx.await.expect("listening");
    (task, l.receive_port, l.send_port.or(connect_to).unwrap())
}

/// Every file of the instance with its bytes (to show a run changed nothing).
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn debug_runs_send_checkpoint_then_upgrade_service_then_the_records_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    instance::register(dir.path(), "app", 0).unwrap();
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = connect(&c).await;
    read_exact(&mut from, 26).await;
    to.write_all(&JS_INITIAL).await.unwrap();
    to.write_all(&[0x04, 0x08, 0x02, 0x5A]).await.unwrap();
    read_record(&mut from).await;
    // A self call, an impulse, a self call: records 1 to 3.
    for (ty, arg) in [(1u8, 1u8), (2, 2), (1, 3)] {
        to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, ty, arg]).await.unwrap();
        read_record(&mut from).await;
    }
    // The live coordinator keeps running (its application connected) during the runs.
    let before = snapshot(dir.path());
    for test_upgrade in [false, true] {
        let (run, receive, send) = start_debug(dir.path(), None, test_upgrade, None).await;
        let mut app_to = TcpStream::connect(("127.0.0.1", receive)).await.unwrap();
        let mut app_from = TcpStream::connect(("127.0.0.1", send)).await.unwrap();
        assert_eq!(read_checkpoint(&mut app_from).await, [0x5A], "the checkpoint first");
        if test_upgrade {
            let (_, check, seq, payload) = read_record(&mut app_from).await;
            assert_eq!((seq, payload.as_slice()), (-1, &[0x02, 0x0C][..]), "then UpgradeService (type 12)");
            assert_eq!(check, xxh64(&[0x02, 0x0C]));
        }
        let (_, _, seq, payload) = read_record(&mut app_from).await;
        assert_eq!((seq, payload.as_slice()), (0, &JS_INITIAL[..]), "record 0 as the whole InitialMessage");
        let mut seqs = Vec::new();
        let mut rest = Vec::new();
        loop {
            let mut head = [0u8; 24];
            match tokio::time::timeout(Duration::from_secs(10), app_from.read(&mut head[..1])).await.unwrap().unwrap() {
                0 => break, // the end of the replay: the stream ends, no [-1] to go live
                _ => {
                    app_from.read_exact(&mut head[1..]).await.unwrap();
                    let len = i32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
                    let payload = read_exact(&mut app_from, len - 24).await;
                    seqs.push(i64::from_le_bytes(head[16..24].try_into().unwrap()));
                    rest.push(payload);
                }
            }
        }
        assert_eq!(seqs, [1, 3], "original sequence ids; the impulse (2) is not replayed, as in recovery");
        assert_eq!(rest[1].last(), Some(&3));
        // The application regenerates its calls: read and dropped.
        to_app_calls(&mut app_to, 2).await;
        drop((app_to, app_from));
        let report = run.await.unwrap().unwrap();
        assert_eq!((report.checkpoint, report.records, report.calls_dropped), (0, 4, 2));
        assert_eq!((report.first_seq, report.last_seq), (Some(0), Some(3)));
    }
    assert!(before == snapshot(dir.path()), "a debug run wrote nothing");
    // The live session was untouched: its next call is record 4.
    to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, 0x04]).await.unwrap();
    assert_eq!(read_record(&mut from).await.2, 4);

    // An application that sends what it may not (a Checkpoint nobody asked for) ends
    // the run with a clear error.
    let (run, receive, send) = start_debug(dir.path(), Some(0), false, None).await;
    let mut app_to = TcpStream::connect(("127.0.0.1", receive)).await.unwrap();
    let _app_from = TcpStream::connect(("127.0.0.1", send)).await.unwrap();
    to_app_calls(&mut app_to, 1).await;
    app_to.write_all(&[0x04, 0x08, 0x02, 0x01]).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), run).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(err, drover_coordinator::CoordinatorError::Misbehaved(_)), "{err}");
    assert!(err.to_string().contains("Checkpoint during a debug run"), "{err}");
    // A checkpoint the instance does not have is refused by name.
    let coordinator = CoordinatorConfig::new("app", dir.path(), 0, 0);
    let config = drover_coordinator::debug::DebugConfig { coordinator, checkpoint: Some(77), test_upgrade: false };
    let err = drover_coordinator::debug::debug(config, std::future::pending(), |_| {}).await.unwrap_err();
    assert!(err.to_string().contains("has no checkpoint 77"), "{err}");
    drop((to, from));
    c.stop().await;
}

/// Writes `n` self calls as an application replaying would.
async fn to_app_calls(to: &mut TcpStream, n: u8) {
    for i in 0..n {
        to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, i]).await.unwrap();
    }
}

#[tokio::test]
async fn a_second_application_is_refused_and_the_active_one_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    instance::register(dir.path(), "app", 0).unwrap();
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = first_start(&c).await;
    let started = std::time::Instant::now();
    let (mut to2, mut from2) = connect(&c).await;
    assert_refused(&mut to2, &mut from2, started).await;
    // The first application goes on.
    to.write_all(&[0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, 0x01]).await.unwrap();
    assert_eq!(read_record(&mut from).await.2, 1);
    // When it leaves, the next application recovers normally.
    drop((to, from));
    let (_to, mut from) = connect(&c).await;
    read_checkpoint(&mut from).await;
    assert_eq!(read_record(&mut from).await.2, 0);
    c.stop().await;
}

#[tokio::test]
async fn a_receive_connection_that_dies_before_its_session_is_dropped_in_both_generations() {
    for older in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        instance::register(dir.path(), "app", 0).unwrap();
        // The older generation's application listens on its send port only once it
        // starts: a port chosen now, bound later.
        let app_port =
            if older { TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port() } else { 0 };
        let c = Coordinator::start(dir.path(), older, app_port, None).await;
        // A client that connected and died (a crashed start, a port probe); for the
        // current generation, one on the send port too.
        drop(TcpStream::connect(("127.0.0.1", c.receive)).await.unwrap());
        if !older {
            drop(TcpStream::connect(("127.0.0.1", c.send)).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A healthy application starts normally.
        let app_listener = if older { Some(TcpListener::bind(("127.0.0.1", app_port)).await.unwrap()) } else { None };
        let (mut to, mut from) = connect_as(&c, app_listener.as_ref()).await;
        let first = read_exact(&mut from, 26).await;
        assert_eq!(&first[24..], &[0x02, 0x0B], "a normal first start (older generation {older})");
        to.write_all(&C_INITIAL).await.unwrap();
        to.write_all(&[0x04, 0x08, 0x00]).await.unwrap();
        assert_eq!(read_record(&mut from).await.3, C_INITIAL);
        drop((to, from));
        c.stop().await;
    }
}

#[tokio::test]
async fn a_debug_run_connects_out_to_an_older_generation_application() {
    let dir = tempfile::tempdir().unwrap();
    instance::register(dir.path(), "app", 0).unwrap();
    let c = Coordinator::start(dir.path(), false, 0, None).await;
    let (mut to, mut from) = connect(&c).await;
    read_exact(&mut from, 26).await;
    to.write_all(&C_INITIAL).await.unwrap();
    to.write_all(&[0x04, 0x08, 0x00]).await.unwrap();
    read_record(&mut from).await;
    drop((to, from));
    c.stop().await;
    // The C client listens on its send port; the debug run connects out to it.
    let app_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app_listener.local_addr().unwrap().port();
    let (run, receive, _) = start_debug(dir.path(), None, true, Some(app_port)).await;
    let app_to = TcpStream::connect(("127.0.0.1", receive)).await.unwrap();
    let (mut app_from, _) =
        tokio::time::timeout(Duration::from_secs(10), app_listener.accept()).await.unwrap().unwrap();
    assert_eq!(read_checkpoint(&mut app_from).await, Vec::<u8>::new());
    assert_eq!(read_record(&mut app_from).await.3, [0x02, 0x0C], "UpgradeService");
    assert_eq!(read_record(&mut app_from).await.3, C_INITIAL, "record 0");
    let mut rest = Vec::new();
    assert_eq!(app_from.read_to_end(&mut rest).await.unwrap(), 0, "then the end of the replay");
    drop(app_to);
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.records, report.calls_dropped), (1, 0));
}
