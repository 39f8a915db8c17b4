//! drover's end-to-end benchmarks, printed as markdown rows for BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p drover                  # the node processes for `failover`
//! cd bench && cargo run --release -- ingest        # journaled ingest vs NATS JetStream
//! cd bench && cargo run --release -- failover      # SIGKILL / SIGSTOP failover latency
//! cd bench && cargo run --release -- recovery      # restart with 1M updates to replay
//! cd bench && cargo run --release -- tasks         # 8 workers running /bin/true: tasks/s, latency
//! cd bench && cargo run --release -- coordinator   # self calls through the AMBROSIA coordinator
//! ```

mod cluster;
mod coordinator;
mod failover;

/// Counts heap allocations, so a bench can say how many a phase made.
pub struct Counting;

/// Allocations and bytes allocated since the process started.
pub static ALLOCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static ALLOC_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(new_size as u64, std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;
mod ha;
mod ingest;
mod recovery;
mod replicas;
mod tasks;

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
        "cluster" => {
            cluster::run(
                arg("--nodes", "64").parse().unwrap(),
                arg("--secs", "5").parse().unwrap(),
                arg("--kills", "50").parse().unwrap(),
            )
            .await
        }
        "ha" => {
            ha::run(
                arg("--kills", "50").parse().unwrap(),
                arg("--transfers", "30").parse().unwrap(),
                arg("--nodes", "12").parse().unwrap(),
            )
            .await
        }
        "ingest" => ingest::run(arg("--nodes", "64").parse().unwrap(), arg("--secs", "5").parse().unwrap()).await,
        "failover" => failover::run(arg("--trials", "100").parse().unwrap(), arg("--fsync", "always") != "never").await,
        "recovery" => recovery::run(arg("--updates", "1000000").parse().unwrap()).await,
        "coordinator" => coordinator::run(arg("--window", "256").parse().unwrap()).await,
        "replicas" => {
            replicas::run(
                arg("--trials", "30").parse().unwrap(),
                arg("--calls", "100000").parse().unwrap(),
                arg("--window", "256").parse().unwrap(),
                Some(arg("--only", "all")).filter(|o| o != "all").as_deref(),
            )
            .await
        }
        "tasks" => {
            tasks::run(
                arg("--tasks", "4000").parse().unwrap(),
                arg("--workers", "8").parse().unwrap(),
                arg("--cores", "4").parse().unwrap(),
                arg("--submitters", "16").parse().unwrap(),
            )
            .await
        }
        _ => {
            eprintln!(
                "usage: drover-bench cluster|ha|ingest|failover|recovery|tasks|coordinator|replicas [--trials N --calls C | --nodes N --secs S [--kills K] | --kills K --transfers T --nodes N | --trials N [--fsync never] | --updates N | --tasks N --workers W --cores C --submitters S]"
            );
            std::process::exit(2);
        }
    }
}

/// A controller running in this process.
pub struct Bench {
    pub addr: std::net::SocketAddr,
    pub admission: std::net::SocketAddr,
    pub health: std::sync::Arc<drover_controller::Health>,
    pub admin: String,
    pub join: String,
    pub stop: tokio::sync::oneshot::Sender<()>,
}

impl Bench {
    pub fn ctx(&self) -> drover_cli::Ctx {
        drover_cli::Ctx {
            controller: self.addr.to_string(),
            timeout: std::time::Duration::from_secs(2),
            json: false,
            token: Some(self.admin.clone()),
            ca: None,
        }
    }
}

/// Passes admission for `node` with `token` (the node agent's own handshake); returns
/// the session ticket. The control channel stays open, answered, for the process's life.
pub async fn admit(admission: std::net::SocketAddr, token: &str, node: &str) -> String {
    let mut config = drover_node::NodeConfig::new(admission.to_string(), token.to_owned(), Vec::new());
    config.id = node.to_owned();
    let (_upstream, ticket, mut control) = drover_node::admit_session(&config).await.expect("admission");
    tokio::spawn(async move { control.hold().await });
    ticket
}

/// A controller in this process on a fresh data directory, with a join token.
pub async fn start_controller(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut drover_controller::ControllerConfig),
) -> Bench {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admission = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = drover_controller::ControllerConfig::new(dir);
    tune(&mut config);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(drover_controller::run(
        config,
        std::sync::Arc::new(drover_controller::FsStorage),
        drover_controller::Listeners { grpc: listener, admission: Some(admission), http: None, raft: None },
        async {
            let _ = stop_rx.await;
        },
        move |r| {
            let _ = ready_tx.send((r.addr, r.admission, r.health));
        },
    ));
    let (addr, admission, health) = ready_rx.await.unwrap();
    let admin = std::fs::read_to_string(dir.join(drover_controller::ADMIN_TOKEN_FILE)).unwrap().trim().to_owned();
    let mut b = Bench { addr, admission: admission.unwrap(), health, admin, join: String::new(), stop: stop_tx };
    let req = drover_proto::v1::ControllerTokenCreateV1Req {
        role: drover_proto::v1::TokenRole::Join as i32,
        ttl_ms: 0,
        uses: 0,
        description: "bench".into(),
    };
    let out = drover_cli::request(&b.ctx(), vec![], req.into()).await.unwrap();
    b.join = out
        .replies
        .into_iter()
        .find_map(|r| match r.payload {
            drover_proto::Payload::ControllerTokenCreateV1Reply(t) => Some(t.token),
            _ => None,
        })
        .unwrap();
    b
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
