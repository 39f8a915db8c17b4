//! A member started the way every replica starts (`Member::start`, real files): its
//! log is bounded in bytes as well as in entries, so a busy member's memory (the
//! unpurged log is mirrored there) does not grow with the size of its entries.

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
