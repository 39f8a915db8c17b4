//! drover's end-to-end benchmarks, printed as markdown rows for BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p drover                  # the node processes for `failover`
//! cd bench && cargo run --release -- ingest        # journaled ingest vs NATS JetStream
//! cd bench && cargo run --release -- failover      # SIGKILL / SIGSTOP failover latency
//! cd bench && cargo run --release -- recovery      # restart with 1M updates to replay
//! ```

mod failover;
mod ingest;
mod recovery;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_owned())
}

fn drover_bin() -> std::path::PathBuf {
    std::env::var("DROVER_BIN")
        .map(Into::into)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/drover"))
}

#[tokio::main]
async fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    match which.as_str() {
        "ingest" => ingest::run(arg("--nodes", "64").parse().unwrap(), arg("--secs", "5").parse().unwrap()).await,
        "failover" => failover::run(arg("--trials", "100").parse().unwrap()).await,
        "recovery" => recovery::run(arg("--updates", "1000000").parse().unwrap()).await,
        _ => {
            eprintln!("usage: drover-bench ingest|failover|recovery [--nodes N --secs S | --trials N | --updates N]");
            std::process::exit(2);
        }
    }
}

/// A controller in this process on a fresh data directory.
pub async fn start_controller(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut drover_controller::ControllerConfig),
) -> (std::net::SocketAddr, std::sync::Arc<drover_controller::Health>, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = drover_controller::ControllerConfig::new(dir);
    tune(&mut config);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(drover_controller::run(
        config,
        listener,
        async {
            let _ = stop_rx.await;
        },
        move |r| {
            let _ = ready_tx.send((r.addr, r.health));
        },
    ));
    let (addr, health) = ready_rx.await.unwrap();
    (addr, health, stop_tx)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
