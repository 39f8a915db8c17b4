//! Byte-level conformance of seed 4's secondary flows: three replicas of one instance
//! in this process (real Raft ports, real files), every application played by raw
//! sockets in the test, bytes written and checked by hand against AMBROSIA-WIRE.md.
//!
//! - A non-upgrading secondary receives the checkpoint, then every committed record
//!   with the bytes the primary's application received (committer id, check bytes,
//!   sequence id, payload), live; its calls are dropped while the log holds them; on
//!   becoming primary it gets `TakeBecomingPrimaryCheckpoint`, answers with a
//!   checkpoint, and its call the old primary had not logged is logged next.
//! - An upgrading secondary gets `UpgradeTakeCheckpoint` instead, and the instance
//!   moves to its version once its checkpoint is committed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{assert_refused, copy_dir, golden, read_exact, store_golden};
use drover_coordinator::CoordinatorConfig;
use drover_coordinator::admin::{Answer, InstanceStatus, Request};
use drover_coordinator::replica::{ReplicaConfig, run_replica};
use drover_raft::member::Timing;
use drover_raft::secret::ClusterSecret;
use drover_raft::tls::Credentials;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Replica {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), drover_coordinator::CoordinatorError>>,
    receive: u16,
    send: u16,
}

struct Group {
    replicas: BTreeMap<u64, Replica>,
    raft: Vec<String>,
    creds: Credentials,
    _dir: tempfile::TempDir,
}

impl Group {
    /// Three replicas; replica 3 runs an upgrading secondary (version 1).
    async fn start() -> Group {
        Group::start_in(tempfile::tempdir().unwrap(), 3, Timing::default()).await
    }

    /// `n` replicas of instance `app` in `dir`.
    async fn start_in(dir: tempfile::TempDir, n: u64, timing: Timing) -> Group {
        let creds = Credentials::plain(ClusterSecret::generate().unwrap());
        let mut listeners = BTreeMap::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.insert(id, l);
        }
        let peers: BTreeMap<u64, String> =
            listeners.iter().map(|(id, l)| (*id, l.local_addr().unwrap().to_string())).collect();
        let mut replicas = BTreeMap::new();
        for (id, raft) in listeners {
            let mut c = CoordinatorConfig::new("app", dir.path(), 0, 0);
            c.upgrade_version = (id == 3).then_some(1);
            let config = ReplicaConfig {
                coordinator: c,
                id,
                raft,
                raft_addr: peers[&id].clone(),
                peers: peers.clone(),
                creds: creds.clone(),
                timing,
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(run_replica(
                config,
                async {
                    let _ = stopped.await;
                },
                move |l| {
                    let _ = tx.send(l);
                },
            ));
            let l = rx.await.expect("listening");
            replicas
                .insert(id, Replica { stop: Some(stop), task, receive: l.receive_port, send: l.send_port.unwrap() });
        }
        Group { replicas, raft: peers.into_values().collect(), creds, _dir: dir }
    }

    async fn status(&self) -> InstanceStatus {
        match drover_coordinator::admin::ask(&self.raft, &self.creds, &Request::Status).await.unwrap() {
            Answer::Status(s) => s,
            other => panic!("{other:?}"),
        }
    }

    /// Waits until a replica is primary and its view says `ok`.
    async fn wait(&self, what: &str, ok: impl Fn(&InstanceStatus) -> bool) -> InstanceStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status().await;
            if ok(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {s:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn transfer(&self, to: u64) {
        match drover_coordinator::admin::ask(&self.raft, &self.creds, &Request::Transfer { to }).await {
            Ok(Answer::Done(_)) => {}
            other => panic!("transfer to {to}: {other:?}"),
        }
    }

    async fn connect(&self, id: u64) -> (TcpStream, TcpStream) {
        let r = &self.replicas[&id];
        let to = TcpStream::connect(("127.0.0.1", r.receive)).await.unwrap();
        let from = TcpStream::connect(("127.0.0.1", r.send)).await.unwrap();
        (to, from)
    }

    /// Stops every replica; the directory is removed when the returned handle drops.
    async fn stop(mut self) -> tempfile::TempDir {
        for r in self.replicas.values_mut() {
            let _ = r.stop.take().unwrap().send(());
        }
        for (_, r) in std::mem::take(&mut self.replicas) {
            r.task.await.unwrap().unwrap();
        }
        self._dir
    }
}

/// One whole record, as bytes (header and payload).
async fn read_record(s: &mut TcpStream) -> Vec<u8> {
    let mut h = read_exact(s, 24).await;
    let len = i32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    h.extend(read_exact(s, len - 24).await);
    h
}

fn seq(record: &[u8]) -> i64 {
    i64::from_le_bytes(record[16..24].try_into().unwrap())
}

fn check(payload: &[u8]) -> [u8; 8] {
    drover_wire::ambrosia::check_bytes(payload).to_le_bytes()
}

/// A self call (fire and forget, method 32) with one argument byte, as sent.
fn self_call(arg: u8) -> [u8; 7] {
    [0x0C, 0x00, 0x00, 0x00, 0x40, 0x01, arg]
}

/// Nothing arrives on `s` for a while.
async fn silent(s: &mut TcpStream) {
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await;
    assert!(r.is_err(), "unexpected bytes: {r:?} {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondaries_follow_the_log_byte_for_byte_and_take_over_by_becoming_primary() {
    let g = Group::start().await;
    let s = g.wait("a primary", |s| s.primary.is_some()).await;
    let p = s.primary.unwrap();
    // The non-upgrading secondary: the other replica without an upgrade version.
    let sec = (1..=3).find(|id| *id != p && *id != 3).unwrap();
    if p == 3 {
        // Start from a primary that is not the upgrading replica.
        g.transfer(sec).await;
    }
    let p = g.wait("a primary other than 3", |s| s.primary.is_some_and(|p| p != 3)).await.primary.unwrap();
    let sec = (1..=3).find(|id| *id != p && *id != 3).unwrap();

    // The primary's application: a first start, then two self calls (records 0, 1, 2).
    let (mut pto, mut pfrom) = g.connect(p).await;
    let first = read_exact(&mut pfrom, 26).await;
    let committer: [u8; 4] = first[0..4].try_into().unwrap();
    assert_eq!(&first[16..], &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02, 0x0B]);
    pto.write_all(&[0x06, 0x09, b'h', b'i']).await.unwrap();
    pto.write_all(&[0x04, 0x08, 0x02, 0xAA]).await.unwrap(); // checkpoint: one byte, AA
    let mut primary_saw = vec![read_record(&mut pfrom).await];
    assert_eq!(&primary_saw[0][24..], &[0x06, 0x09, b'h', b'i']);
    for arg in [1u8, 2] {
        pto.write_all(&self_call(arg)).await.unwrap();
        primary_saw.push(read_record(&mut pfrom).await);
    }
    assert_eq!(primary_saw.iter().map(|r| seq(r)).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(&primary_saw[2][24..], &[0x0A, 0x00, 0x00, 0x40, 0x01, 0x02]);

    // The secondary's application: [-2] with the checkpoint (one byte, AA), then the
    // three records exactly as the primary's application got them.
    let (mut sto, mut sfrom) = g.connect(sec).await;
    let head = read_exact(&mut sfrom, 24).await;
    assert_eq!(&head[0..4], &committer, "the same committer id on every replica");
    assert_eq!(&head[4..8], &[27, 0, 0, 0]);
    assert_eq!(&head[8..16], &[0; 8], "a [-2] record has no check bytes");
    assert_eq!(seq(&head), -2);
    assert_eq!(read_exact(&mut sfrom, 3).await, [0x04, 0x08, 0x02], "Checkpoint message of 1 byte");
    assert_eq!(read_exact(&mut sfrom, 1).await, [0xAA]);
    for r in &primary_saw {
        assert_eq!(&read_record(&mut sfrom).await, r, "the secondary sees the primary's bytes");
    }
    // While it replays, its application regenerates the two calls: dropped, and no
    // TakeBecomingPrimaryCheckpoint comes (this replica is not primary).
    sto.write_all(&self_call(1)).await.unwrap();
    sto.write_all(&self_call(2)).await.unwrap();
    silent(&mut sfrom).await;

    // Live: a record the primary commits reaches the secondary as it commits.
    pto.write_all(&self_call(3)).await.unwrap();
    let r3 = read_record(&mut pfrom).await;
    assert_eq!((seq(&r3), &r3[8..16]), (3, &check(&r3[24..])[..]));
    assert_eq!(read_record(&mut sfrom).await, r3);
    // The secondary's application, deterministic like the primary's, makes its third
    // call (in the log: dropped) and, handling record 3, a fourth that the primary's
    // application has not made: it is not in the log and waits.
    sto.write_all(&self_call(3)).await.unwrap();
    sto.write_all(&self_call(4)).await.unwrap();
    let s = g
        .wait("the secondary's drops", |s| {
            s.replicas
                .iter()
                .any(|r| r.id == sec && r.info.as_ref().is_some_and(|i| i.app.dropped == 3 && i.app.next_seq == 4))
        })
        .await;
    let view = s.replicas.iter().find(|r| r.id == sec).unwrap().info.clone().unwrap();
    assert_eq!(view.app.phase, "secondary");

    // The primary role moves to the secondary: its application is asked for a
    // checkpoint, [-1] TakeBecomingPrimaryCheckpoint byte for byte.
    g.transfer(sec).await;
    let ask = read_record(&mut sfrom).await;
    assert_eq!(&ask[0..4], &committer);
    assert_eq!(&ask[4..8], &[26, 0, 0, 0]);
    assert_eq!(&ask[8..16], &check(&[0x02, 0x0B]));
    assert_eq!(seq(&ask), -1);
    assert_eq!(&ask[24..], &[0x02, 0x0B]);
    sto.write_all(&[0x04, 0x08, 0x02, 0xBB]).await.unwrap();
    // The call the old primary never logged is logged next: record 4, once.
    let r4 = read_record(&mut sfrom).await;
    assert_eq!((seq(&r4), &r4[24..]), (4, &[0x0A, 0x00, 0x00, 0x40, 0x01, 0x04][..]));
    sto.write_all(&self_call(5)).await.unwrap();
    let r5 = read_record(&mut sfrom).await;
    assert_eq!((seq(&r5), r5.last()), (5, Some(&5)));
    // The old primary's session ended (its application restarts as a secondary).
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), pfrom.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the deposed primary's session is closed");

    // The upgrading secondary (replica 3): checkpoint BB, records 4 and 5, then on
    // becoming primary UpgradeTakeCheckpoint ([-1] 02 0A) instead.
    let (mut uto, mut ufrom) = g.connect(3).await;
    let head = read_exact(&mut ufrom, 24).await;
    assert_eq!(seq(&head), -2);
    assert_eq!(read_exact(&mut ufrom, 4).await, [0x04, 0x08, 0x02, 0xBB]);
    assert_eq!(read_record(&mut ufrom).await, r4);
    assert_eq!(read_record(&mut ufrom).await, r5);
    uto.write_all(&self_call(5)).await.unwrap(); // regenerated: dropped
    g.wait("replica 3 in step", |s| {
        s.replicas
            .iter()
            .any(|r| r.id == 3 && r.info.as_ref().is_some_and(|i| i.app.next_seq == 6 && i.app.dropped == 1))
    })
    .await;
    g.transfer(3).await;
    let ask = read_record(&mut ufrom).await;
    assert_eq!((seq(&ask), &ask[24..]), (-1, &[0x02, 0x0A][..]), "UpgradeTakeCheckpoint");
    assert_eq!(&ask[8..16], &check(&[0x02, 0x0A]));
    uto.write_all(&[0x04, 0x08, 0x02, 0xCC]).await.unwrap();
    let s = g
        .wait("version 1", |s| {
            s.primary == Some(3) && s.replicas.iter().all(|r| r.info.as_ref().is_some_and(|i| i.version == 1))
        })
        .await;
    uto.write_all(&self_call(6)).await.unwrap();
    let r6 = read_record(&mut ufrom).await;
    assert_eq!((seq(&r6), r6.last()), (6, Some(&6)));
    // The replicas that answered hold the same records.
    let s2 = g
        .wait("every replica at 7 records", |s| {
            s.replicas.iter().all(|r| r.info.as_ref().is_some_and(|i| i.records == 7))
        })
        .await;
    let digests: Vec<u64> = s2.replicas.iter().map(|r| r.info.as_ref().unwrap().digest).collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    assert!(s.term >= 2);
    drop((pto, pfrom, sto, sfrom, uto, ufrom));
    g.stop().await;
}

/// `tests/golden/replica-v1`: a one-replica instance written by the release that
/// introduced replicas (Raft entries holding `InstanceLog` inputs, and a Raft snapshot
/// holding an `InstanceLog`): a first start ("hi", checkpoint AA), three self calls, a
/// checkpoint asked by the application (CC), three more calls. Recreate (with that
/// release only) by `DROVER_WRITE_GOLDEN=replica-v1 cargo test -p drover-coordinator
/// --test replica_conformance golden`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_replica_v1_directory_recovers_its_checkpoint_and_records() {
    if std::env::var("DROVER_WRITE_GOLDEN").as_deref() == Ok("replica-v1") {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let timing = Timing { snapshot_every: 4, ..Timing::default() };
        let g = Group::start_in(dir, 1, timing).await;
        g.wait("a primary", |s| s.primary.is_some()).await;
        let (mut to, mut from) = g.connect(1).await;
        read_exact(&mut from, 26).await;
        to.write_all(&[0x06, 0x09, b'h', b'i']).await.unwrap();
        to.write_all(&[0x04, 0x08, 0x02, 0xAA]).await.unwrap();
        read_record(&mut from).await;
        for arg in [1u8, 2, 3] {
            to.write_all(&self_call(arg)).await.unwrap();
            read_record(&mut from).await;
        }
        to.write_all(&[0x02, 0x02]).await.unwrap(); // TakeCheckpoint
        assert_eq!(&read_record(&mut from).await[24..], &[0x02, 0x02]);
        to.write_all(&[0x04, 0x08, 0x02, 0xCC]).await.unwrap();
        for arg in [4u8, 5, 6] {
            to.write_all(&self_call(arg)).await.unwrap();
            read_record(&mut from).await;
        }
        let s = g.status().await;
        eprintln!("written: {s:#?}");
        drop((to, from));
        let _dir = g.stop().await;
        let target = store_golden("replica-v1", &root.join("app/replica-1"), &["LOCK", "peer-address", "raft-address"]);
        assert!(target.join(drover_raft::machine::SNAPSHOT_FILE).exists(), "no snapshot was taken");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&golden("replica-v1"), &dir.path().join("app/replica-1"));
    let g = Group::start_in(dir, 1, Timing::default()).await;
    let s = g.wait("the replica leads", |s| s.primary == Some(1)).await;
    let info = s.replicas[0].info.clone().unwrap();
    assert_eq!((info.records, info.checkpoints, info.version), (7, 2, 0), "{info:#?}");
    // The application recovers as the primary: checkpoint CC, records 4 to 6, then
    // TakeBecomingPrimaryCheckpoint; a new call is record 7.
    let (mut to, mut from) = g.connect(1).await;
    let head = read_exact(&mut from, 24).await;
    assert_eq!(seq(&head), -2);
    assert_eq!(read_exact(&mut from, 4).await, [0x04, 0x08, 0x02, 0xCC]);
    for (want, arg) in [(4, 4u8), (5, 5), (6, 6)] {
        let r = read_record(&mut from).await;
        assert_eq!((seq(&r), &r[24..]), (want, &[0x0A, 0x00, 0x00, 0x40, 0x01, arg][..]));
        assert_eq!(&r[8..16], &check(&r[24..]));
    }
    let ask = read_record(&mut from).await;
    assert_eq!((seq(&ask), &ask[24..]), (-1, &[0x02, 0x0B][..]));
    for arg in [4u8, 5, 6] {
        to.write_all(&self_call(arg)).await.unwrap(); // regenerated: dropped
    }
    to.write_all(&[0x04, 0x08, 0x02, 0xDD]).await.unwrap();
    to.write_all(&self_call(7)).await.unwrap();
    let r = read_record(&mut from).await;
    assert_eq!((seq(&r), r.last()), (7, Some(&7)));
    drop((to, from));
    g.stop().await;
}

/// A second application on replica `id` is refused.
async fn refused(g: &Group, id: u64) {
    let started = std::time::Instant::now();
    let (mut to, mut from) = g.connect(id).await;
    assert_refused(&mut to, &mut from, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_application_on_a_replica_is_refused_and_the_one_in_session_goes_on() {
    let g = Group::start().await;
    let p = g.wait("a primary", |s| s.primary.is_some()).await.primary.unwrap();
    let (mut pto, mut pfrom) = g.connect(p).await;
    read_exact(&mut pfrom, 26).await;
    pto.write_all(&[0x06, 0x09, b'h', b'i']).await.unwrap();
    pto.write_all(&[0x04, 0x08, 0x02, 0xAA]).await.unwrap();
    assert_eq!(seq(&read_record(&mut pfrom).await), 0);
    // On the primary.
    refused(&g, p).await;
    pto.write_all(&self_call(1)).await.unwrap();
    assert_eq!(seq(&read_record(&mut pfrom).await), 1);
    // On a secondary: its application in session gets the record as it commits.
    let sec = (1..=3).find(|id| *id != p).unwrap();
    let (_sto, mut sfrom) = g.connect(sec).await;
    let head = read_exact(&mut sfrom, 24).await;
    assert_eq!(seq(&head), -2);
    read_exact(&mut sfrom, i32::from_le_bytes(head[4..8].try_into().unwrap()) as usize - 24 + 1).await;
    for want in [0, 1] {
        assert_eq!(seq(&read_record(&mut sfrom).await), want);
    }
    refused(&g, sec).await;
    pto.write_all(&self_call(2)).await.unwrap();
    assert_eq!(seq(&read_record(&mut pfrom).await), 2);
    assert_eq!(seq(&read_record(&mut sfrom).await), 2);
    drop((pto, pfrom));
    g.stop().await;
}
