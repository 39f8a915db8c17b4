//! The controller shell on the journal's fault-injecting storage, in process: a
//! failed fsync releases nothing and stops the controller with the error.
//!
//! The storage is a parameter of `drover_controller::run`, so this runs the real
//! shell (gRPC on loopback, the owner, the releaser, the journal writer) with
//! `FaultyStorage` over real files.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use drover_controller::{ControllerConfig, Faults, FaultyStorage, FsStorage, Listeners, ShellError};
use drover_proto::v1::controller_client::ControllerClient;
use drover_proto::{Payload, v1};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Opens a CLI stream as the first admin and sends one command; returns the stream.
async fn command(
    addr: std::net::SocketAddr,
    token: &str,
    stream_id: &str,
) -> (mpsc::Sender<v1::StreamFromCli>, tonic::Streaming<v1::StreamToCli>) {
    let mut client = ControllerClient::connect(format!("http://{addr}")).await.expect("connect");
    let (tx, rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let msg = v1::StreamFromCli {
        stream_id: stream_id.into(),
        command: Some(Payload::from(v1::ControllerAppVersionV1Req {}).to_any()),
        cli_uuid: "test".into(),
        ..Default::default()
    };
    tx.send(msg).await.unwrap();
    let replies = client.cli_command_stream(request).await.expect("stream opens").into_inner();
    (tx, replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_releases_nothing_and_stops_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::none();
    let storage = Arc::new(FaultyStorage::new(Arc::new(FsStorage), faults.clone()));
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let config = ControllerConfig::new(dir.path());
    let controller = tokio::spawn(drover_controller::run(
        config,
        storage,
        Listeners { grpc, admission: None, http: None, raft: None },
        std::future::pending(),
        move |_| {
            let _ = ready_tx.send(());
        },
    ));
    ready_rx.await.expect("the controller starts");
    let token = std::fs::read_to_string(dir.path().join(drover_controller::ADMIN_TOKEN_FILE)).unwrap();
    let token = token.trim();

    // Healthy: the command is journaled, then answered.
    let (_keep, mut replies) = command(addr, token, "ok").await;
    let mut answered = false;
    while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(10), replies.message()).await.unwrap() {
        if let Some(any) = reply.response
            && matches!(Payload::from_any(&any), Ok(Payload::ControllerAppVersionV1Reply(_)))
        {
            answered = true;
            break;
        }
    }
    assert!(answered, "a healthy controller answers");

    // Every fsync fails from now on: the next command is never answered, and the
    // controller ends with the journal's error.
    faults.fail_sync_after.store(0, Ordering::SeqCst);
    let (_keep, mut replies) = command(addr, token, "lost").await;
    let mut released = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), replies.message()).await {
            Ok(Ok(Some(reply))) => released.push(reply),
            Ok(Ok(None) | Err(_)) => break,
            Err(_) => panic!("the stream neither ended nor answered in 10 s"),
        }
    }
    assert!(released.is_empty(), "nothing may leave before its input is durable: {released:?}");
    let result = tokio::time::timeout(Duration::from_secs(10), controller).await.expect("the controller stops");
    let err = result.expect("no panic").expect_err("the controller fails");
    assert!(matches!(err, ShellError::Journal(_)), "{err}");
    assert!(err.to_string().contains("fsync"), "the error names the failed fsync: {err}");
}
