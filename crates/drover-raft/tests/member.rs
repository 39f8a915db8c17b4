//! A member started the way every replica starts (`Member::start`, real files): its
//! log is bounded in bytes as well as in entries, so a busy member's memory (the
//! unpurged log is mirrored there) does not grow with the size of its entries; a
//! request forwarded to it reaches its application's handler, and only a holder of the
//! cluster secret can forward.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Sum;
use drover_journal::{FsStorage, machine::encode_input};
use drover_raft::Inputs;
use drover_raft::member::{Member, Settings, Timing};
use drover_raft::secret::ClusterSecret;
use drover_raft::tls::Credentials;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_snapshots_when_its_log_passes_the_byte_limit_long_before_the_entry_count() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let timing = Timing { snapshot_every: 1_000_000, snapshot_every_bytes: 256 << 10, ..Timing::default() };
    let settings = Settings {
        id: 1,
        dir: dir.path().to_path_buf(),
        listener,
        peers: [(1, addr)].into(),
        creds: Credentials::plain(ClusterSecret::generate().unwrap()),
        about: Default::default(),
        timing,
        forward: None,
    };
    let member = Member::start(settings, Arc::new(FsStorage), Sum::default).await.unwrap();
    member
        .raft
        .wait(Some(Duration::from_secs(10)))
        .state(openraft::ServerState::Leader, "the one member leads")
        .await
        .unwrap();
    // 64 entries of 1,000 inputs each (about 11 KiB an entry): over 512 KiB of log,
    // 64 entries of a million.
    let one: Vec<u8> = encode_input::<Sum>(&1).unwrap().to_vec();
    let batch = Inputs(one.repeat(1000));
    for _ in 0..64 {
        member.raft.client_write(batch.clone()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while member.stats.snapshots_built.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no snapshot within 10 s of 64 entries over the byte limit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dir.path().join(drover_raft::machine::SNAPSHOT_FILE).is_file());
    assert_eq!(member.machine.with_core(|s| s.0), 64_000);
    member.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_reach_the_members_handler_many_at_once_and_only_from_holders_of_the_secret() {
    use drover_raft::network::{ForwardError, ForwardHandler, Forwarder};
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let secret = ClusterSecret::generate().unwrap();
    // The handler answers after 200 ms: forty calls at once must not take forty times that.
    let handler: ForwardHandler = Arc::new(|body: Vec<u8>| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if body == b"refuse" {
                Err("refused by the handler".to_owned())
            } else {
                Ok([b"re: ".as_slice(), &body].concat())
            }
        })
    });
    let settings = Settings {
        id: 1,
        dir: dir.path().to_path_buf(),
        listener,
        peers: [(1, addr.clone())].into(),
        creds: Credentials::plain(secret.clone()),
        about: Default::default(),
        timing: Timing::default(),
        forward: Some(handler),
    };
    let member = Member::start(settings, Arc::new(FsStorage), Sum::default).await.unwrap();
    let forwarder = Forwarder::new(Credentials::plain(secret));
    let started = Instant::now();
    let calls: Vec<_> = (0..40u32)
        .map(|i| {
            let (f, a) = (forwarder.clone(), addr.clone());
            tokio::spawn(async move { f.call(&a, i.to_le_bytes().to_vec(), Duration::from_secs(5)).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call.await.unwrap().unwrap();
        assert_eq!(answer, [b"re: ".as_slice(), &(i as u32).to_le_bytes()].concat());
    }
    assert!(started.elapsed() < Duration::from_secs(4), "40 forwarded calls took {:?}: serialised", started.elapsed());
    // Connections are reused afterwards.
    assert_eq!(forwarder.call(&addr, b"x".to_vec(), Duration::from_secs(5)).await.unwrap(), b"re: x");
    match forwarder.call(&addr, b"refuse".to_vec(), Duration::from_secs(5)).await {
        Err(ForwardError::Refused(why)) => assert_eq!(why, "refused by the handler"),
        other => panic!("expected the handler's refusal, got {other:?}"),
    }
    // Someone without the secret gets no answer from the handler.
    let stranger = Forwarder::new(Credentials::plain(ClusterSecret::generate().unwrap()));
    match stranger.call(&addr, b"x".to_vec(), Duration::from_secs(5)).await {
        Err(ForwardError::Network { .. }) => {}
        other => panic!("a stranger was answered: {other:?}"),
    }
    member.shutdown().await;
}
