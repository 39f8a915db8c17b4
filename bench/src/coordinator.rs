//! Fire-and-forget self calls through `drover coordinator` (in this process, log fsync
//! on), from a drover-ambrosia service that keeps `window` calls in flight: each call it
//! receives sends the next, until `calls` have been delivered. The log directory's raw
//! fsync'd sequential write bandwidth is measured in the same run.

use std::time::{Duration, Instant};

use drover_ambrosia::{Connection, Outbox, Service};

/// Counts delivered calls and says when all `total` have arrived.
struct Countdown {
    received: u64,
    total: u64,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Countdown {
    fn new(total: u64, done: tokio::sync::oneshot::Sender<()>) -> Self {
        Countdown { received: 0, total, done: Some(done) }
    }

    fn count(&mut self) {
        self.received += 1;
        if self.received == self.total
            && let Some(d) = self.done.take()
        {
            let _ = d.send(());
        }
    }
}

/// A service flooding itself with `total` calls of `size` bytes, `window` in flight;
/// `done` fires when all were delivered.
pub(crate) fn flood(size: usize, window: usize, total: u64, done: tokio::sync::oneshot::Sender<()>) -> impl Service {
    Flood { size, window, sent: 0, delivered: Countdown::new(total, done) }
}

struct Flood {
    size: usize,
    window: usize,
    sent: u64,
    delivered: Countdown,
}

impl Service for Flood {
    fn on_call(&mut self, method: i32, _args: &[u8], out: &mut Outbox) {
        let payload = vec![0x5Au8; self.size];
        let send = |s: &mut Self, out: &mut Outbox| {
            if s.sent < s.delivered.total {
                s.sent += 1;
                out.call_self(1, &payload);
            }
        };
        if method == 0 {
            for _ in 0..self.window {
                send(self, out);
            }
            return;
        }
        send(self, out);
        self.delivered.count();
    }
    fn checkpoint(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, _bytes: &[u8]) {}
}

/// The server side of the two-instance bench: acknowledges every call.
struct Sink {
    delivered: Countdown,
}

impl Service for Sink {
    fn on_call(&mut self, method: i32, _args: &[u8], out: &mut Outbox) {
        if method == 1 {
            out.call("client", 2, &[]);
            self.delivered.count();
        }
    }
    fn checkpoint(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, _bytes: &[u8]) {}
}

/// The client side: keeps `window` calls to the server unacknowledged.
struct Source {
    size: usize,
    window: usize,
    total: u64,
    sent: u64,
}

impl Service for Source {
    fn on_call(&mut self, method: i32, _args: &[u8], out: &mut Outbox) {
        let payload = vec![0xC3u8; self.size];
        let n = if method == 0 { self.window } else { 1 };
        for _ in 0..n {
            if self.sent < self.total {
                self.sent += 1;
                out.call("server", 1, &payload);
            }
        }
    }
    fn checkpoint(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, _bytes: &[u8]) {}
}

/// A coordinator running in this process.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), drover_coordinator::CoordinatorError>>,
}

impl Running {
    /// Stops it and reports an error it ended with.
    async fn stop(self) {
        let _ = self.stop.send(());
        if let Ok(Err(e)) = self.task.await {
            eprintln!("coordinator: {e}");
        }
    }
}

/// Registers instance `name` in `dir` and runs its coordinator on free ports.
async fn start(dir: &std::path::Path, name: &str) -> (drover_coordinator::Listening, Running) {
    drover_coordinator::instance::register(dir, name, 0).unwrap();
    let config = drover_coordinator::CoordinatorConfig::new(name, dir, 0, 0);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(drover_coordinator::run(
        config,
        async {
            let _ = stop_rx.await;
        },
        move |l| {
            let _ = tx.send(l);
        },
    ));
    (rx.await.unwrap(), Running { stop, task })
}

async fn pair(size: usize, calls: u64, window: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (server, stop_server) = start(dir.path(), "server").await;
    let (client, stop_client) = start(dir.path(), "client").await;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let mut sink = Sink { delivered: Countdown::new(calls, done_tx) };
    let mut source = Source { size, window, total: calls, sent: 0 };
    let s = tokio::spawn(async move {
        let c = Connection::listening_coordinator(server.receive_port, server.send_port.unwrap());
        if let Err(e) = drover_ambrosia::run(&mut sink, c, 0, b"").await {
            eprintln!("sink stopped: {e}");
        }
    });
    let started = Instant::now();
    let c = tokio::spawn(async move {
        let c = Connection::listening_coordinator(client.receive_port, client.send_port.unwrap());
        if let Err(e) = drover_ambrosia::run(&mut source, c, 0, b"").await {
            eprintln!("source stopped: {e}");
        }
    });
    tokio::time::timeout(Duration::from_secs(600), done_rx).await.unwrap().unwrap();
    let took = started.elapsed().as_secs_f64();
    s.abort();
    c.abort();
    stop_server.stop().await;
    stop_client.stop().await;
    let rate = calls as f64 / took;
    (rate, rate * size as f64 / 1e6)
}

fn raw_sequential_mb_s(dir: &std::path::Path) -> f64 {
    use std::io::Write;
    let path = dir.join("raw.bin");
    let chunk = vec![0xA5u8; 1 << 20];
    let started = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..1024 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    let mb = 1024.0 * 1.048_576;
    let rate = mb / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    rate
}

pub(crate) async fn one(size: usize, calls: u64, window: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (l, coordinator) = start(dir.path(), "bench").await;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let mut flood = Flood { size, window, sent: 0, delivered: Countdown::new(calls, done_tx) };
    let connection = Connection::listening_coordinator(l.receive_port, l.send_port.unwrap());
    let started = Instant::now();
    let app = tokio::spawn(async move {
        if let Err(e) = drover_ambrosia::run(&mut flood, connection, 0, b"").await {
            eprintln!("flood service stopped: {e}");
        }
    });
    tokio::time::timeout(Duration::from_secs(600), done_rx).await.unwrap().unwrap();
    let took = started.elapsed().as_secs_f64();
    app.abort();
    coordinator.stop().await;
    let rate = calls as f64 / took;
    (rate, rate * size as f64 / 1e6)
}

pub async fn run(window: usize) {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_sequential_mb_s(dir.path());
    println!("raw sequential write + fsync in the temp dir: {raw:.0} MB/s");
    println!("| argument | calls | window | calls/s | MB/s | vs AMBROSIA | % of raw sequential |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (size, calls, anchor) in [(16usize, 200_000u64, None), (1024, 200_000, Some(4.6)), (65_536, 8_000, Some(50.0))]
    {
        let (rate, mb) = one(size, calls, window).await;
        let vs = anchor.map(|a: f64| format!("{:.1}×", mb / a)).unwrap_or_else(|| "—".into());
        println!("| {size} B | {calls} | {window} | {rate:.0} | {mb:.1} | {vs} | {:.0} % |", 100.0 * mb / raw);
    }
    println!();
    println!("between two coordinators (client instance -> server instance, each call acknowledged back):");
    println!("| argument | calls | in flight | calls/s | MB/s | vs AMBROSIA |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (size, calls, anchor) in [(16usize, 100_000u64, None), (1024, 100_000, Some(4.6)), (65_536, 4_000, Some(50.0))]
    {
        let (rate, mb) = pair(size, calls, window).await;
        let vs = anchor.map(|a: f64| format!("{:.1}×", mb / a)).unwrap_or_else(|| "—".into());
        println!("| {size} B | {calls} | {window} | {rate:.0} | {mb:.1} | {vs} |");
    }
}
