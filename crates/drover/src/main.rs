//! The `drover` binary: one command for every role (controller, node, CLI, coordinator)
//! and the operator tools. This file only parses arguments and dispatches; each
//! subcommand lives in its own module and returns `anyhow::Result`, so errors reach the
//! operator as one line that says what went wrong and where.

mod cert;
mod cluster_cmd;
mod config;
mod coordinator;
mod demo;
mod fleet;
mod journal_cmd;
mod roles;
mod util;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use drover_cli::Ctx;

/// drover: a resilient controller for fleets of nodes.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about, propagate_version = true)]
struct Cli {
    /// Log format for diagnostics on stderr.
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"], env = "DROVER_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

/// How CLI commands reach the controller.
#[derive(Debug, Args)]
struct CliArgs {
    /// The controller's gRPC address, or a cluster's as a list (`a:7400,b:7400,c:7400`):
    /// the CLI finds the leader (a member that does not lead names it).
    #[arg(long, env = "DROVER_CONTROLLER", default_value = "127.0.0.1:7400")]
    controller: String,
    /// How long to wait for replies before reporting the missing ones (and exiting 1).
    #[arg(long, env = "DROVER_TIMEOUT", default_value = "5s", value_parser = util::parse_duration)]
    timeout: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Operator token (default: the `admin.token` file in $DROVER_DATA_DIR or ./drover-data).
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify the controller's TLS certificate (default: plain).
    #[arg(long, env = "DROVER_CA")]
    ca: Option<std::path::PathBuf>,
}

/// `explicit` (`--token`, `DROVER_TOKEN`), else the `admin.token` file in
/// $DROVER_DATA_DIR or ./drover-data.
fn token_or_admin_file(explicit: Option<String>) -> Option<String> {
    explicit.or_else(|| {
        let dir = std::env::var("DROVER_DATA_DIR").unwrap_or_else(|_| "./drover-data".into());
        std::fs::read_to_string(std::path::Path::new(&dir).join("admin.token")).ok().map(|t| t.trim().to_owned())
    })
}

impl CliArgs {
    fn ctx(&self) -> Ctx {
        let token = token_or_admin_file(self.token.clone());
        // An unreadable CA file must not silently fall back to plain text: keep the bytes
        // empty, which fails the TLS setup with a clear error.
        let ca = self.ca.as_ref().map(|p| std::fs::read(p).unwrap_or_default());
        Ctx { controller: self.controller.clone(), timeout: self.timeout, json: self.json, token, ca }
    }
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Print a new cluster secret (32 random bytes as 64 hex digits): every member of a
    /// cluster reads the same file, and a replica's Raft traffic is refused unless it
    /// proves it holds it.
    Secret,
    /// Leader, term, and every member's role, commit index and lag, as the members
    /// report them (asked through any member's HTTP port).
    Status {
        #[command(flatten)]
        at: ClusterAt,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a member (started first with --member ID --raft ADDR and no --peers): it
    /// joins as a learner, catches up, then votes.
    Add {
        #[command(flatten)]
        at: ClusterAt,
        /// Its member id.
        id: u64,
        /// Its Raft address.
        raft: String,
    },
    /// Remove a member that does not lead (hand leadership over first to remove it).
    Remove {
        #[command(flatten)]
        at: ClusterAt,
        /// Its member id.
        id: u64,
    },
    /// Hand leadership to another voting member (proposals pause for about two
    /// election timeouts while the leader hands over).
    TransferLeader {
        #[command(flatten)]
        at: ClusterAt,
        /// The member id to lead.
        id: u64,
    },
}

/// Which member to ask, and the operator token for changes.
#[derive(Debug, clap::Args)]
struct ClusterAt {
    /// Any member's HTTP address.
    #[arg(long, env = "DROVER_HTTP", default_value = "127.0.0.1:7480")]
    http: String,
    /// Admin token (default: the `admin.token` file in $DROVER_DATA_DIR or ./drover-data).
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify the members' HTTPS (controllers run with TLS).
    #[arg(long, env = "DROVER_CA")]
    ca: Option<std::path::PathBuf>,
}

impl ClusterAt {
    fn ca(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.ca
            .as_ref()
            .map(|p| anyhow::Context::with_context(std::fs::read(p), || format!("cannot read --ca {}", p.display())))
            .transpose()
    }

    fn token(&self) -> anyhow::Result<String> {
        token_or_admin_file(self.token.clone())
            .ok_or_else(|| anyhow::anyhow!("an admin token is needed (--token, DROVER_TOKEN, or admin.token)"))
    }
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Many simulated nodes (real admission and gRPC streams) against a controller
    /// child process: memory, CPU, `nodes` and `status --all` times, failover latency.
    Fleet(fleet::FleetArgs),
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Submit a task (admin token): `drover task run --timeout 30s -- /bin/echo hi`.
    Run {
        #[command(flatten)]
        cli: CliArgs,
        /// Cores it needs on the worker.
        #[arg(long, default_value_t = 1)]
        cores: u32,
        /// Memory it needs, in MiB (also its address-space limit; 0: no limit).
        #[arg(long, default_value_t = 0)]
        memory: u64,
        /// Kill the job after this long (the worker reports TimedOut). Not --timeout,
        /// which, as on every command, is how long to wait for the controller's replies.
        #[arg(long = "task-timeout", default_value = "30s", value_parser = util::parse_duration)]
        task_timeout: Duration,
        /// A label the worker must carry, key=value (repeatable).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// An environment variable for the job, KEY=value (repeatable).
        #[arg(long = "env", value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// A secret environment variable, KEY=value, or KEY alone to take the value from
        /// this shell's environment (keeps it out of shell history). The controller
        /// never journals it in clear and `task status` shows its name only (repeatable).
        #[arg(long = "secret-env", value_parser = parse_secret_kv)]
        secret_env: Vec<(String, String)>,
        /// Attempts before it counts as failed (errors, lost workers, timeouts).
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        /// Higher runs first.
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Expected sha256 of a downloaded job (hex).
        #[arg(long)]
        sha256: Option<String>,
        /// Follow the task, print its output, and exit with its exit code.
        #[arg(long)]
        wait: bool,
        /// The job (a path on the worker or an http(s):// URL) and its arguments.
        #[arg(required = true, last = true)]
        job: Vec<String>,
    },
    /// List tasks, newest first.
    List {
        #[command(flatten)]
        cli: CliArgs,
        /// Only tasks in this state.
        #[arg(long, value_parser = ["queued", "running", "completed", "failed", "aborted"])]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// A task's state and attempts; exits 1 if there is no such task.
    Status {
        #[command(flatten)]
        cli: CliArgs,
        /// The task id (as `task run` printed it).
        id: String,
    },
    /// Abort tasks: a queued one is dropped, a running one killed on its worker.
    Abort {
        #[command(flatten)]
        cli: CliArgs,
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// A finished task's output: its stdout to stdout, its stderr to stderr.
    Logs {
        #[command(flatten)]
        cli: CliArgs,
        /// The task id.
        id: String,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// `KEY=value`, or `KEY` alone: the value of `KEY` in this process's environment.
fn parse_secret_kv(s: &str) -> Result<(String, String), String> {
    if s.contains('=') {
        return parse_kv(s);
    }
    if s.is_empty() {
        return Err("--secret-env needs KEY=value or KEY".into());
    }
    std::env::var(s).map(|v| (s.to_owned(), v)).map_err(|_| format!("--secret-env {s}: no {s} in this environment"))
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it (once: the controller keeps only its hash).
    Create {
        #[command(flatten)]
        cli: CliArgs,
        /// join (nodes), read (operators: list, status, prices) or admin (everything).
        #[arg(long, default_value = "join", value_parser = ["join", "read", "admin"])]
        role: String,
        /// Lifetime, e.g. 24h (default: no expiry).
        #[arg(long, value_parser = util::parse_duration)]
        ttl: Option<Duration>,
        /// How many admissions it allows (default: unlimited).
        #[arg(long, default_value_t = 0)]
        uses: u32,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (ids, roles, uses left, expiry; never secrets).
    List(CliArgs),
    /// Revoke tokens by id; durable at once.
    Revoke {
        #[command(flatten)]
        cli: CliArgs,
        /// Token ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

// Parsed once at start: the size of the controller's settings does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (gRPC for nodes and CLIs; journal in the data directory).
    Controller(roles::ControllerArgs),
    /// Run a node that streams prices for the pairs the controller assigns it.
    Node(roles::NodeArgs),
    /// Load tools: `drover bench fleet` simulates many nodes against a controller.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run an AMBROSIA-compatible reliability coordinator for one instance.
    Coordinator(coordinator::CoordinatorArgs),
    /// Replicated controllers: the group's secret, status, membership and leadership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run a controller and three nodes in one process and show a failover.
    Demo(demo::DemoArgs),
    /// List nodes: state, known pairs, streaming pairs with epochs.
    Nodes(CliArgs),
    /// Ask the controller for its version.
    Version(CliArgs),
    /// Disconnect nodes (they reconnect by themselves); their pairs fail over.
    Kick {
        #[command(flatten)]
        cli: CliArgs,
        /// Node uuids, uuid prefixes or names.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Evict nodes: they stop and stay out until started and admitted again.
    Evict {
        #[command(flatten)]
        cli: CliArgs,
        /// Node uuids, uuid prefixes or names.
        #[arg(required = true)]
        nodes: Vec<String>,
        /// Why (sent to the node in conn:close).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Move nodes' pairs elsewhere, make-before-break (--undo: take pairs again).
    Drain {
        #[command(flatten)]
        cli: CliArgs,
        /// Node uuids, uuid prefixes or names.
        #[arg(required = true)]
        nodes: Vec<String>,
        /// Undo a drain: the nodes take pairs again.
        #[arg(long)]
        undo: bool,
    },
    /// Forget gone nodes now (they leave `drover nodes`, and pairs they were last to
    /// stream go to the next capable node) instead of after the retention.
    Forget {
        #[command(flatten)]
        cli: CliArgs,
        /// Node uuids, uuid prefixes or names.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Ask nodes for their status; exits 1 if any does not answer in time.
    Status {
        #[command(flatten)]
        cli: CliArgs,
        /// Node uuids, uuid prefixes or names.
        nodes: Vec<String>,
        /// Ask every connected node.
        #[arg(long, conflicts_with = "nodes")]
        all: bool,
    },
    /// Move pairs to a node (pinned until it is gone or --unpin).
    Stream {
        #[command(flatten)]
        cli: CliArgs,
        /// Node uuid, uuid prefix or name.
        node: String,
        /// Pairs, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        pairs: Vec<String>,
        /// Release the pin instead.
        #[arg(long)]
        unpin: bool,
    },
    /// Ask nodes to shut down (they reply, then exit).
    Shutdown {
        #[command(flatten)]
        cli: CliArgs,
        /// Node uuids, uuid prefixes or names.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Show the latest prices; --watch streams every accepted update.
    Prices {
        #[command(flatten)]
        cli: CliArgs,
        /// Only these pairs.
        pairs: Vec<String>,
        /// Keep streaming updates.
        #[arg(long)]
        watch: bool,
        /// With --watch, stop after this long.
        #[arg(long, value_parser = util::parse_duration)]
        duration: Option<Duration>,
    },
    /// Run tasks on worker nodes and follow them.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Make a development CA and certificates for TLS.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Manage join tokens (nodes) and operator tokens (CLI).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect a journal directory: verify its integrity or dump its records.
    #[command(subcommand)]
    Journal(journal_cmd::JournalCommand),
    /// Print a shell completion script: `source <(drover completions bash)`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `drover man > drover.1`.
    Man,
}

fn init_logging(format: &str, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn task(cmd: TaskCommand) -> anyhow::Result<std::process::ExitCode> {
    use drover_cli::tasks as t;
    match cmd {
        TaskCommand::Run {
            cli,
            cores,
            memory,
            task_timeout,
            labels,
            env,
            secret_env,
            attempts,
            priority,
            sha256,
            wait,
            mut job,
        } => {
            let job_addr = job.remove(0);
            let req = drover_proto::v1::ControllerTaskRunV1Req {
                job_addr,
                args: job,
                env: env.into_iter().collect(),
                timeout_ms: task_timeout.as_millis() as u64,
                cores,
                memory_mb: memory,
                labels: labels.into_iter().collect(),
                max_attempts: attempts,
                priority,
                sha256,
                secret_env: secret_env.into_iter().collect(),
            };
            let code = t::run(&cli.ctx(), req, wait).await?;
            Ok(std::process::ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1)))
        }
        TaskCommand::List { cli, state, limit } => cli_result(t::list(&cli.ctx(), state, limit).await),
        TaskCommand::Status { cli, id } => cli_result(t::status(&cli.ctx(), &id).await),
        TaskCommand::Abort { cli, ids } => cli_result(t::abort(&cli.ctx(), &ids).await),
        TaskCommand::Logs { cli, id } => cli_result(t::logs(&cli.ctx(), &id).await),
    }
}

fn cli_result(r: Result<bool, drover_cli::CliError>) -> anyhow::Result<std::process::ExitCode> {
    Ok(if r? { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

async fn dispatch(command: Command) -> anyhow::Result<std::process::ExitCode> {
    use drover_cli::commands as c;
    match command {
        Command::Controller(a) => roles::controller(a).await,
        Command::Node(a) => roles::node(a).await,
        Command::Demo(a) => demo::demo(a).await,
        Command::Coordinator(a) => coordinator::run(a).await,
        Command::Cluster(ClusterCommand::Status { at, json }) => {
            let view = cluster_cmd::status(&at.http, at.ca()?.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                cluster_cmd::print(&view);
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Cluster(ClusterCommand::Add { at, id, raft }) => {
            let view =
                cluster_cmd::change(&at.http, at.ca()?.as_deref(), &at.token()?, id, cluster_cmd::Change::Add(&raft))
                    .await?;
            cluster_cmd::print(&view);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Cluster(ClusterCommand::Remove { at, id }) => {
            let view =
                cluster_cmd::change(&at.http, at.ca()?.as_deref(), &at.token()?, id, cluster_cmd::Change::Remove)
                    .await?;
            cluster_cmd::print(&view);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Cluster(ClusterCommand::TransferLeader { at, id }) => {
            let view =
                cluster_cmd::change(&at.http, at.ca()?.as_deref(), &at.token()?, id, cluster_cmd::Change::Transfer)
                    .await?;
            cluster_cmd::print(&view);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Cluster(ClusterCommand::Secret) => {
            // 64 hex digits on stdout: `drover cluster secret > FILE`, the same file on
            // every member (`chmod 600`).
            println!("{}", drover_raft::secret::ClusterSecret::generate()?.to_hex());
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Fleet(a)) => fleet::run(a).await,
        Command::Nodes(cli) => cli_result(c::nodes(&cli.ctx()).await),
        Command::Version(cli) => cli_result(c::version(&cli.ctx()).await),
        Command::Kick { cli, nodes } => cli_result(c::kick_or_drain(&cli.ctx(), &nodes, c::NodeAction::Kick).await),
        Command::Evict { cli, nodes, reason } => cli_result(c::evict(&cli.ctx(), &nodes, reason).await),
        Command::Drain { cli, nodes, undo } => {
            let action = if undo { c::NodeAction::Undrain } else { c::NodeAction::Drain };
            cli_result(c::kick_or_drain(&cli.ctx(), &nodes, action).await)
        }
        Command::Forget { cli, nodes } => cli_result(c::forget(&cli.ctx(), &nodes).await),
        Command::Status { cli, nodes, all } => cli_result(c::status(&cli.ctx(), &nodes, all).await),
        Command::Stream { cli, node, pairs, unpin } => cli_result(c::stream(&cli.ctx(), &node, pairs, unpin).await),
        Command::Shutdown { cli, nodes } => cli_result(c::shutdown(&cli.ctx(), &nodes).await),
        Command::Prices { cli, pairs, watch, duration } => {
            cli_result(c::prices(&cli.ctx(), pairs, watch, duration).await)
        }
        Command::Token(TokenCommand::Create { cli, role, ttl, uses, description }) => {
            cli_result(c::token_create(&cli.ctx(), &role, ttl, uses, description).await)
        }
        Command::Token(TokenCommand::List(cli)) => cli_result(c::token_list(&cli.ctx()).await),
        Command::Token(TokenCommand::Revoke { cli, ids }) => cli_result(c::token_revoke(&cli.ctx(), ids).await),
        Command::Cert(cmd) => cert::run(cmd),
        Command::Task(cmd) => task(cmd).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "drover", &mut std::io::stdout());
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Journal(cmd) => journal_cmd::run(cmd),
    }
}

/// Parses the command line with the configuration file layered in (see `config`);
/// handles `--print-config`.
fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let root = Cli::command();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let first = root.clone().try_get_matches_from(&argv).unwrap_or_else(|e| e.exit());
    let layered = match config::layer(&root, &first, argv) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let matches = root.clone().try_get_matches_from(&layered.argv).unwrap_or_else(|e| {
        if let Some(f) = &layered.file {
            eprintln!("note: settings were read from {}", f.display());
        }
        e.exit()
    });
    let print = matches.subcommand().and_then(|(_, s)| s.try_get_one::<bool>("print_config").ok().flatten().copied());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if print == Some(true) {
        print!("{}", config::render(&root, &matches, &layered));
        std::process::exit(0);
    }
    cli
}

fn main() -> std::process::ExitCode {
    let cli = parse();
    let quiet = !matches!(cli.command, Command::Controller(_) | Command::Node(_) | Command::Coordinator(_));
    // openraft logs every failed attempt to reach a member (several lines a second
    // while one is down); the controller logs leader changes and members that stop or
    // resume replicating itself, once each. DROVER_LOG=openraft=info brings them back.
    init_logging(&cli.log_format, if quiet { "warn,openraft=off" } else { "info,openraft=off" });
    if !matches!(
        cli.command,
        Command::Controller(_) | Command::Node(_) | Command::Coordinator(_) | Command::Demo(_) | Command::Bench(_)
    ) {
        // A one-shot command whose reader goes away (`drover nodes | head -1`) ends as
        // any Unix tool does, by SIGPIPE, instead of panicking in print!. The servers
        // keep Rust's default (ignored): their sockets report EPIPE as an error.
        // SAFETY: setting a signal's disposition to the default, before any thread
        // that could be writing exists, has no memory-safety preconditions.
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
