//! Journaled ingest: N simulated nodes push price updates through the real gRPC server
//! as fast as flow control allows; the figure is inputs made durable (fsync group
//! commit) per second. Same run: nats-server with JetStream file storage, N publishers
//! with acks (a window of outstanding acks each), same message size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover_proto::v1::controller_client::ControllerClient;
use drover_proto::{Message, Payload, v1};
use tokio_stream::wrappers::ReceiverStream;

fn update(node: &str, pair: &str, seq: u64, epoch: u64) -> v1::StreamFromNode {
    let u = v1::NodePriceUpdateV1Notify {
        pair: pair.into(),
        price: Some(v1::Decimal { mantissa: 108_000 + (seq % 1000) as i64, scale: 5 }),
        upstream_time_ms: 1_700_000_000_000 + seq as i64,
        seq,
        epoch,
    };
    v1::StreamFromNode {
        node_uuid: node.into(),
        from_uuid: None,
        response: Some(Payload::from(u).to_any()),
        request_id: String::new(),
    }
}

/// The size of one price update as the bench's nodes send it.
pub fn message_size() -> usize {
    update(&format!("{:032x}", 0), "P0000", 1, 1).encoded_len()
}

/// Starts `nodes` simulated nodes that pass admission at `admission` with `join` and
/// push price updates to `addr` as fast as flow control allows, while `running`.
pub fn push(
    addr: std::net::SocketAddr,
    admission: std::net::SocketAddr,
    join: &str,
    nodes: usize,
    running: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for i in 0..nodes {
        let running = running.clone();
        let join = join.to_owned();
        tasks.push(tokio::spawn(async move {
            let node = format!("{i:032x}");
            let ticket = crate::admit(admission, &join, &node).await;
            let pair = format!("P{i:04}");
            let mut client = ControllerClient::connect(format!("http://{addr}")).await.unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            let hello = v1::NodeKnownCurrenciesV1Notify {
                pairs: vec![pair.clone()],
                name: node.clone(),
                version: "bench".into(),
                worker: false,
            };
            tx.send(v1::StreamFromNode {
                node_uuid: node.clone(),
                from_uuid: None,
                response: Some(Payload::from(hello).to_any()),
                request_id: String::new(),
            })
            .await
            .unwrap();
            let mut req = tonic::Request::new(ReceiverStream::new(rx));
            req.metadata_mut().insert("authorization", format!("Bearer {ticket}").parse().unwrap());
            let mut inbound = client.node_command_stream(req).await.unwrap().into_inner();
            let mut epoch = 0;
            while epoch == 0 {
                let m = inbound.message().await.unwrap().unwrap();
                if let Ok(Payload::NodeStreamModifyStateV1Req(r)) = Payload::from_any(m.command.as_ref().unwrap()) {
                    epoch = r.streams.iter().find(|s| s.pair == pair).map_or(0, |s| s.epoch);
                }
            }
            tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
            let mut seq = 0;
            while running.load(Ordering::Relaxed) {
                seq += 1;
                if tx.send(update(&node, &pair, seq, epoch)).await.is_err() {
                    break;
                }
            }
        }));
    }
    tasks
}

async fn drover_ingest(nodes: usize, secs: f64) -> (f64, usize) {
    let dir = tempfile::tempdir().unwrap();
    let bench = crate::start_controller(dir.path(), |_| {}).await;
    let health = bench.health.clone();
    let running = Arc::new(AtomicBool::new(true));
    let tasks = push(bench.addr, bench.admission, &bench.join, nodes, running.clone());
    tokio::time::sleep(Duration::from_secs(1)).await; // warm up
    let start_count = health.durable.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let n = health.durable.load(Ordering::Relaxed) - start_count;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let _ = bench.stop.send(());
    (rate, message_size())
}

async fn nats_ingest(publishers: usize, secs: f64, size: usize) -> Option<f64> {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let mut server = match std::process::Command::new("nats-server")
        .args(["-js", "-sd", dir.path().to_str()?, "-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nats-server not runnable ({e}); apt-get install nats-server");
            return None;
        }
    };
    let url = format!("nats://127.0.0.1:{port}");
    let client = nats_connect(&url).await?;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .ok()?;
    let rate = nats_publish(&js, publishers, secs, size).await;
    let _ = server.kill();
    let _ = server.wait();
    Some(rate)
}

/// `publishers` JetStream publishers on subjects `bench.N`, each keeping 64
/// acknowledgements outstanding; acknowledged publishes per second over `secs` after 1 s.
pub async fn nats_publish(js: &async_nats::jetstream::Context, publishers: usize, secs: f64, size: usize) -> f64 {
    let acked = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let payload = bytes_of(size);
    let mut tasks = Vec::new();
    for i in 0..publishers {
        let (js, acked, running, payload) = (js.clone(), acked.clone(), running.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let subject = format!("bench.{i}");
            let mut window = std::collections::VecDeque::new();
            while running.load(Ordering::Relaxed) {
                match js.publish(subject.clone(), payload.clone()).await {
                    Ok(ack) => window.push_back(ack),
                    Err(_) => break,
                }
                if window.len() >= 64 {
                    if let Some(a) = window.pop_front() {
                        if a.await.is_ok() {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_count = acked.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let rate = (acked.load(Ordering::Relaxed) - start_count) as f64 / start.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    rate
}

/// A client of the nats-server at `url`, retried for 5 s while it starts.
pub async fn nats_connect(url: &str) -> Option<async_nats::Client> {
    for _ in 0..100 {
        if let Ok(c) = async_nats::connect(url).await {
            return Some(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn bytes_of(n: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; n])
}

pub async fn run(nodes: usize, secs: f64) {
    let (ours, size) = drover_ingest(nodes, secs).await;
    println!("command: cd bench && cargo run --release -- ingest --nodes {nodes} --secs {secs}");
    println!("| system | publishers | message | durable inputs/s |\n| --- | --- | --- | --- |");
    println!(
        "| drover controller (gRPC stream, journal fsync group commit) | {nodes} | {size} B envelope | {ours:.0} |"
    );
    match nats_ingest(nodes, secs, size).await {
        Some(nats) => {
            println!(
                "| nats-server JetStream, file storage, acked publish (window 64) | {nodes} | {size} B | {nats:.0} |"
            );
            println!("\nratio drover / JetStream: {:.2}x", ours / nats);
        }
        None => println!("| nats-server JetStream | - | - | not measured (nats-server missing) |"),
    }
}
