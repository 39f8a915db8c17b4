//! The coordinator process: listens for its application on loopback, opens the log,
//! runs one [`Session`] at a time, and does its I/O.
//!
//! Connections (AMBROSIA-WIRE.md "Connections"): the application connects to the
//! receive port (app → coordinator) and, with the current generation, to the send port
//! (coordinator → app); with `connect_send` (the older generation, expected by the C
//! client) the coordinator connects out to the application's send port, retrying until
//! it listens. Any error or EOF ends the session; the log stays, and the application's
//! next start is a recovery. The log is reopened (and recovered) for every session.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use drover_journal::{FsStorage, FsyncMode, Journal, JournalConfig};
use drover_wire::ambrosia::{Direction, Frame, Limits, MessageReader};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::instance::{self, Instance};
use crate::session::{Action, Session};

/// Largest message an application may send (a call with its arguments).
pub const MAX_CALL: usize = 32 << 20;

/// Most links (incoming and outgoing) one instance keeps open.
const MAX_LINKS: usize = 256;

/// Settings of a coordinator.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// The instance served.
    pub instance: String,
    /// Where instances live.
    pub log_dir: PathBuf,
    /// The port the application writes to.
    pub receive_port: u16,
    /// The port the application reads from.
    pub send_port: u16,
    /// Connect out to the application's send port (older clients) instead of listening.
    pub connect_send: bool,
    /// Move the instance to this version at its next start (an upgrade).
    pub upgrade_version: Option<u64>,
    /// Log fsync policy.
    pub fsync: FsyncMode,
    /// Largest application checkpoint accepted.
    pub max_checkpoint: u64,
    /// Log size after which the coordinator asks for a checkpoint (AMBROSIA: 1000 MiB).
    pub checkpoint_every_bytes: u64,
    /// The port other coordinators link to (0: any free port); recorded in
    /// `instance.json` so instances in the same log directory find each other.
    pub peer_port: u16,
    /// Instance addresses (lines `name host:port`) instead of the log directory's registry.
    pub peers: Option<PathBuf>,
}

impl CoordinatorConfig {
    /// Defaults for `instance` in `log_dir` on the given ports.
    pub fn new(instance: impl Into<String>, log_dir: impl Into<PathBuf>, receive_port: u16, send_port: u16) -> Self {
        CoordinatorConfig {
            instance: instance.into(),
            log_dir: log_dir.into(),
            receive_port,
            send_port,
            connect_send: false,
            upgrade_version: None,
            fsync: FsyncMode::Always,
            max_checkpoint: 1 << 30,
            checkpoint_every_bytes: 1000 << 20,
            peer_port: 0,
            peers: None,
        }
    }
}

/// Why the coordinator stopped.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The instance metadata.
    #[error(transparent)]
    Instance(#[from] instance::InstanceError),
    /// The log.
    #[error("log: {0}")]
    Journal(#[from] drover_journal::JournalError),
    /// Binding or accepting.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A setting or the stored state is unusable.
    #[error("{0}")]
    Config(String),
    /// Another process holds the instance directory.
    #[error(transparent)]
    Lock(#[from] drover_journal::LockError),
    /// The application broke the protocol during a debug run.
    #[error("the application misbehaved: {0}")]
    Misbehaved(String),
}

/// Announced when the coordinator listens (for tests and tools).
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    /// The receive port.
    pub receive_port: u16,
    /// The send port (when listening on it).
    pub send_port: Option<u16>,
    /// The port other coordinators link to.
    pub peer_port: u16,
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()>,
    on_listening: impl FnOnce(Listening),
) -> Result<(), CoordinatorError> {
    let mut meta = instance::load(&config.log_dir, &config.instance)?;
    // Held for the process's life: two coordinators on one instance would interleave
    // their logs and trim each other's segments.
    let _lock = drover_journal::DirLock::acquire(&instance::dir(&config.log_dir, &config.instance))?;
    if let Some(v) = config.upgrade_version
        && v <= meta.version
    {
        return Err(CoordinatorError::Config(format!(
            "--upgrade-version {v} is not above the instance's version {}",
            meta.version
        )));
    }
    let receive = TcpListener::bind(("127.0.0.1", config.receive_port)).await?;
    let send = if config.connect_send { None } else { Some(TcpListener::bind(("127.0.0.1", config.send_port)).await?) };
    let peer = TcpListener::bind(("127.0.0.1", config.peer_port)).await?;
    let peer_addr = peer.local_addr()?;
    instance::set_peer(&config.log_dir, &mut meta, &peer_addr.to_string())?;
    on_listening(Listening {
        receive_port: receive.local_addr()?.port(),
        send_port: send.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port()),
        peer_port: peer_addr.port(),
    });
    tracing::info!(instance = %config.instance, version = meta.version, receive = config.receive_port, send = config.send_port,
        connect_send = config.connect_send, "coordinator listening");
    tokio::pin!(shutdown);
    let mut ports = AppPorts::new(&receive, send.as_ref());
    loop {
        // Every wait races the shutdown signal: SIGINT/SIGTERM stop the coordinator at
        // once, whatever it is waiting for.
        let (input, from) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = ports.next_session() => match a {
                Some(a) => a,
                None => continue,
            },
        };
        let (input, output) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            c = session_connections(&config, ports.send(), input, from) => match c {
                Some(c) => c,
                None => continue,
            },
        };
        let journal_config = journal_config(&config);
        let opened = tokio::task::spawn_blocking(move || Journal::open(journal_config, Arc::new(FsStorage)))
            .await
            .map_err(|e| CoordinatorError::Config(format!("log open task failed: {e}")))?;
        let (journal, recovery) = opened?;
        if let Some(cut) = &recovery.report.torn_tail {
            tracing::warn!(file = %cut.file.display(), offset = cut.offset, "torn log tail truncated; the next checkpoint starts a fresh log file");
        }
        let upgrade = config.upgrade_version.filter(|v| *v > meta.version);
        let started = match &recovery.checkpoint {
            None if recovery.next_seq == 0 => {
                tracing::info!(instance = %config.instance, "first start");
                Session::first_start(journal.committer_id(), &config.instance, config.max_checkpoint)
            }
            None => {
                return Err(CoordinatorError::Config(format!(
                    "the log holds records but no checkpoint: {} is damaged",
                    instance::log_path(&config.log_dir, &config.instance).display()
                )));
            }
            Some(ckpt) => {
                tracing::info!(instance = %config.instance, records = recovery.report.records, upgrade = ?upgrade, "recovery");
                Session::recovery(
                    journal.committer_id(),
                    &config.instance,
                    ckpt,
                    recovery.records(),
                    upgrade.is_some(),
                    config.max_checkpoint,
                )
                .map_err(CoordinatorError::Config)?
            }
        };
        drop(recovery);
        let end = tokio::select! {
            _ = &mut shutdown => None,
            end = serve(&config, &mut meta, upgrade, &journal, started, input, output, &peer, &mut ports) => Some(end),
        };
        tokio::task::spawn_blocking(move || journal.close_blocking()).await.ok();
        match end {
            None => return Ok(()),
            Some(Ok(why)) => tracing::info!(instance = %config.instance, %why, "application session ended"),
            Some(Err(e)) => return Err(e),
        }
    }
}

pub(crate) fn journal_config(config: &CoordinatorConfig) -> JournalConfig {
    let mut j = JournalConfig::new(instance::log_path(&config.log_dir, &config.instance));
    j.fsync = config.fsync;
    j.checkpoint_every_bytes = config.checkpoint_every_bytes;
    j.checkpoint_every_records = u64::MAX;
    j.segment_bytes = config.checkpoint_every_bytes.max(1 << 20);
    // The checkpoint also holds the calls other instances have not committed yet.
    j.limits.max_checkpoint = config.max_checkpoint + (256 << 20);
    // One record holds what gathered while the previous write was in flight: at most
    // the session's pending limit plus one message (MAX_CALL), well under a record.
    j.max_batch_bytes = j.limits.max_record - drover_wire::ambrosia::HEADER_LEN;
    j
}

/// A receive-port accept's connection; after an error (logged), none, 100 ms later.
pub(crate) async fn accepted(
    a: std::io::Result<(TcpStream, std::net::SocketAddr)>,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    match a {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(error = %e, "accept on the receive port failed; pausing 100 ms");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// The application's two connections (see [`connect_output`]), without Nagle's delay;
/// none (logged) when the send connection does not come.
pub(crate) async fn session_connections(
    config: &CoordinatorConfig,
    send: Option<&TcpListener>,
    input: TcpStream,
    from: std::net::SocketAddr,
) -> Option<(TcpStream, TcpStream)> {
    let _ = input.set_nodelay(true);
    match connect_output(config, send, &input).await {
        Ok(output) => {
            let _ = output.set_nodelay(true);
            Some((input, output))
        }
        Err(e) => {
            tracing::warn!(%from, error = %e, "no application session; waiting for the next application");
            None
        }
    }
}

/// Waits for the application's send connection (accepted on the send port, or made to
/// the application's own port with `connect_send`), while watching the receive
/// connection already accepted: an application that connected and died (a crashed
/// start, a port probe) is noticed at once and the coordinator goes back to waiting,
/// instead of pairing the next application with a dead connection.
pub(crate) async fn connect_output(
    config: &CoordinatorConfig,
    send: Option<&TcpListener>,
    input: &TcpStream,
) -> std::io::Result<TcpStream> {
    let connect = async {
        match send {
            Some(l) => loop {
                let (s, from) = tokio::time::timeout(Duration::from_secs(30), l.accept())
                    .await
                    .map_err(|_| std::io::Error::other("no connection on the send port within 30 s"))??;
                // A connection left in the backlog by an application that has gone.
                if closed_now(&s).await {
                    tracing::warn!(%from, "dropped a send-port connection that had already closed");
                    continue;
                }
                return Ok(s);
            },
            None => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                loop {
                    match TcpStream::connect(("127.0.0.1", config.send_port)).await {
                        Ok(s) => return Ok(s),
                        Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        }
    };
    tokio::pin!(connect);
    let mut watching = true;
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            o = &mut connect => {
                // The send connection came at once, but the receive one may be long dead.
                if watching && closed_now(input).await {
                    return Err(std::io::Error::other("the application's receive connection closed before its session started"));
                }
                return o;
            }
            peeked = input.peek(&mut byte), if watching => match peeked {
                Ok(0) => return Err(std::io::Error::other("the application's receive connection closed before its session started")),
                Err(e) => return Err(std::io::Error::other(format!("the application's receive connection failed before its session started: {e}"))),
                // The application already wrote: it is alive; its bytes wait for the session.
                Ok(_) => watching = false,
            },
        }
    }
}

/// Whether a connection has already been closed by its peer (without waiting).
async fn closed_now(s: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(Duration::ZERO, s.peek(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

/// How long a connection made during a session waits before it is refused: long
/// enough for the coordinator to read the end of a session whose application was just
/// killed and restarted.
const SECOND_APP_GRACE: Duration = Duration::from_millis(250);

/// A connection on an application port made while a session was active.
struct Waiting {
    stream: TcpStream,
    from: std::net::SocketAddr,
    port: &'static str,
    until: tokio::time::Instant,
}

/// The application ports. Between sessions, where the next session's connection
/// comes from; during one, they are watched so that a second application is refused
/// (after a short grace, see [`SECOND_APP_GRACE`]) and a leftover connection never
/// waits for the next session. Shared by the single coordinator and replicas.
pub(crate) struct AppPorts<'a> {
    receive: &'a TcpListener,
    send: Option<&'a TcpListener>,
    waiting: Option<Waiting>,
}

impl<'a> AppPorts<'a> {
    pub(crate) fn new(receive: &'a TcpListener, send: Option<&'a TcpListener>) -> Self {
        AppPorts { receive, send, waiting: None }
    }

    /// The send port (None when the coordinator connects out to the application).
    pub(crate) fn send(&self) -> Option<&'a TcpListener> {
        self.send
    }

    /// The receive-port connection that starts the next session: one made while the
    /// last session was ending, or the next one (none, after a logged pause, when the
    /// accept fails). A send-port connection left from a session never starts one.
    pub(crate) async fn next_session(&mut self) -> Option<(TcpStream, std::net::SocketAddr)> {
        if let Some(w) = self.waiting.take()
            && w.port == "receive"
        {
            return Some((w.stream, w.from));
        }
        accepted(self.receive.accept().await).await
    }

    /// During a session (never returns; cancel-safe, for a `select!`): a connection
    /// on either port waits out the grace (an application restarted just after its
    /// old session died, whose end may not be read yet: if the session ends
    /// meanwhile, it starts the next one), then is refused. AMBROSIA has no message
    /// for this, so the connection is closed (the second application sees it end at
    /// once) and the log says why. The active session is untouched.
    pub(crate) async fn refuse_second_applications(&mut self, instance: &str) -> std::convert::Infallible {
        loop {
            match &self.waiting {
                None => {
                    let (port, accepted) = self.accept().await;
                    match accepted {
                        Ok((stream, from)) => {
                            let until = tokio::time::Instant::now() + SECOND_APP_GRACE;
                            self.waiting = Some(Waiting { stream, from, port, until });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accept on an application port failed; pausing 100 ms");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                Some(w) => {
                    tokio::time::sleep_until(w.until).await;
                    if let Some(w) = self.waiting.take() {
                        drop(w.stream);
                        tracing::warn!(%instance, from = %w.from, port = w.port,
                            "refused a second application: this instance already has an application session");
                    }
                }
            }
        }
    }

    /// The next connection on either port, with the port's name.
    async fn accept(&self) -> (&'static str, std::io::Result<(TcpStream, std::net::SocketAddr)>) {
        tokio::select! {
            a = self.receive.accept() => ("receive", a),
            a = async {
                match self.send {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => ("send", a),
        }
    }
}

/// Reads the application's bytes into frames for the session.
pub(crate) async fn read_frames(mut input: TcpStream, tx: mpsc::Sender<Result<Frame, String>>, limits: Limits) {
    let mut reader = MessageReader::new(Direction::ToCoordinator, limits);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match input.read(&mut buf).await {
            Ok(0) => {
                let _ = tx.send(Err("the application closed its connection".into())).await;
                return;
            }
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(format!("reading from the application: {e}"))).await;
                return;
            }
        };
        reader.feed(&buf[..n]);
        loop {
            match reader.next_frame() {
                Ok(Some(f)) => {
                    if tx.send(Ok(f)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(format!("the application sent bad bytes: {e}"))).await;
                    return;
                }
            }
        }
    }
}

/// The links of one session: outgoing link tasks by destination, incoming writers by
/// source, and the tasks to stop when the session ends.
pub(crate) struct Links {
    own: String,
    committer_id: i32,
    log_dir: PathBuf,
    peers: Option<PathBuf>,
    out: std::collections::BTreeMap<String, mpsc::UnboundedSender<crate::link::LinkCmd>>,
    inbound: std::collections::BTreeMap<String, mpsc::UnboundedSender<Bytes>>,
    events: mpsc::UnboundedSender<crate::link::PeerEvent>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Links {
    /// The links of a session of `config`'s instance, and where their events arrive.
    pub(crate) fn new(
        config: &CoordinatorConfig,
        committer_id: i32,
    ) -> (Links, mpsc::UnboundedReceiver<crate::link::PeerEvent>) {
        let (events_tx, events) = mpsc::unbounded_channel();
        let links = Links {
            own: config.instance.clone(),
            committer_id,
            log_dir: config.log_dir.clone(),
            peers: config.peers.clone(),
            out: Default::default(),
            inbound: Default::default(),
            events: events_tx,
            tasks: Vec::new(),
        };
        (links, events)
    }

    /// A coordinator connected to the peer port: read its link (up to [`MAX_LINKS`]).
    pub(crate) fn accept(&mut self, s: TcpStream, from: std::net::SocketAddr) {
        self.tasks.retain(|t| !t.is_finished());
        if self.tasks.len() >= MAX_LINKS {
            tracing::warn!(%from, limit = MAX_LINKS, "peer link refused: too many open links");
        } else {
            self.tasks.push(tokio::spawn(crate::link::incoming(s, self.events.clone())));
        }
    }

    /// Carries out a link action of the session (`Forward`, `Commit`); other actions
    /// are returned.
    pub(crate) fn act(&mut self, a: Action) -> Option<Action> {
        match a {
            Action::Forward { dest, seq, message } => {
                let _ = self.to(&dest).send(crate::link::LinkCmd::Forward(seq, message));
            }
            Action::Commit { source, seq } => {
                if let Some(w) = self.inbound.get(&source) {
                    let _ = w.send(crate::link::commit(seq));
                }
            }
            other => return Some(other),
        }
        None
    }

    /// Links to every destination with calls still to be committed.
    pub(crate) fn open_pending(&mut self, session: &Session) {
        for dest in session.destinations() {
            self.to(&dest);
        }
    }

    /// A link event, handled for `session`; the actions it causes.
    pub(crate) fn on_event(
        &mut self,
        instance: &str,
        session: &mut Session,
        ev: Option<crate::link::PeerEvent>,
    ) -> Vec<Action> {
        use crate::link::PeerEvent;
        match ev {
            Some(PeerEvent::InboundOpened { source, writer }) => {
                let _ = writer.send(crate::link::greeting(session.next_from(&source)));
                tracing::info!(%instance, %source, "instance linked");
                self.inbound.insert(source, writer);
            }
            Some(PeerEvent::Remote { source, seq, payload }) if !session.backpressure() => {
                return session.on_remote(&source, seq, &payload);
            }
            // Over the limit: the call is dropped now and resent after a reconnect.
            Some(PeerEvent::Remote { source, .. }) => {
                self.inbound.remove(&source);
            }
            Some(PeerEvent::ReplayFrom { dest, seq }) => {
                session.on_commit(&dest, seq - 1);
                let resend = session.outbox_from(&dest, seq);
                let _ = self.to(&dest).send(crate::link::LinkCmd::Resend(resend));
            }
            Some(PeerEvent::Commit { dest, seq }) => session.on_commit(&dest, seq),
            None => {}
        }
        Vec::new()
    }

    fn to(&mut self, dest: &str) -> &mpsc::UnboundedSender<crate::link::LinkCmd> {
        if !self.out.contains_key(dest) {
            let (tx, rx) = mpsc::unbounded_channel();
            self.tasks.push(tokio::spawn(crate::link::outgoing(
                self.own.clone(),
                self.committer_id,
                dest.to_owned(),
                self.log_dir.clone(),
                self.peers.clone(),
                rx,
                self.events.clone(),
            )));
            self.out.insert(dest.to_owned(), tx);
        }
        &self.out[dest]
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Runs one session to its end; returns why it ended (an application problem is an
/// ordinary end, a log failure an error).
#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &CoordinatorConfig,
    meta: &mut Instance,
    upgrade: Option<u64>,
    journal: &Journal,
    started: (Session, Vec<Action>),
    input: TcpStream,
    output: TcpStream,
    peer: &TcpListener,
    ports: &mut AppPorts<'_>,
) -> Result<String, CoordinatorError> {
    let (mut session, first) = started;
    let (mut links, mut events) = Links::new(config, journal.committer_id());
    // Calls recovered from the checkpoint still to be committed: link at once.
    links.open_pending(&session);
    let mut out = BufWriter::with_capacity(256 * 1024, output);
    let limits = Limits { max_checkpoint: config.max_checkpoint, max_message: MAX_CALL, ..Limits::default() };
    let (tx, mut frames) = mpsc::channel(1024);
    let reader = tokio::spawn(read_frames(input, tx, limits));
    let result = async {
        let mut inflight: Option<(drover_journal::Ticket, Bytes)> = None;
        let mut actions = first;
        loop {
            // Carry out what the session asked for; some steps answer at once.
            let mut queue: std::collections::VecDeque<Action> = actions.drain(..).collect();
            while let Some(a) = queue.pop_front() {
                match a {
                    Action::Send(bytes) => {
                        if let Err(e) = out.write_all(&bytes).await {
                            return Ok(format!("writing to the application: {e}"));
                        }
                    }
                    Action::Append(entry) => {
                        let ticket = journal.append(entry.clone()).await?;
                        inflight = Some((ticket, entry));
                    }
                    Action::WriteCheckpoint(state) => {
                        let covered = journal.checkpoint(state).await?;
                        tracing::info!(instance = %config.instance, covered, "checkpoint written");
                        queue.extend(session.on_checkpoint_written());
                    }
                    Action::Upgraded => {
                        if let Some(v) = upgrade {
                            instance::upgrade(&config.log_dir, meta, v)?;
                            tracing::info!(instance = %config.instance, version = v, "upgraded");
                        }
                    }
                    Action::Close(why) => {
                        tracing::error!(instance = %config.instance, reason = %why, "application misbehaved; ending its session");
                        return Ok(why);
                    }
                    link => {
                        links.act(link);
                    }
                }
            }
            if let Err(e) = out.flush().await {
                return Ok(format!("writing to the application: {e}"));
            }
            let durable = async {
                match inflight.as_mut() {
                    Some((t, _)) => Some(t.await),
                    None => std::future::pending().await,
                }
            };
            let reading = !session.backpressure();
            tokio::select! {
                d = durable => {
                    let (_, entry) = inflight.take().expect("in flight");
                    let pos = d.expect("polled only in flight")?;
                    actions = session.on_durable(pos.seq, &entry);
                    if journal.checkpoint_due() {
                        actions.extend(session.request_checkpoint());
                    }
                }
                f = frames.recv(), if reading => match f {
                    Some(Ok(frame)) => actions = session.on_frame(frame),
                    Some(Err(why)) => return Ok(why),
                    None => return Ok("the application's connection ended".into()),
                },
                never = ports.refuse_second_applications(&config.instance) => match never {},
                accepted = peer.accept() => match accepted {
                    Ok((s, from)) => links.accept(s, from),
                    // Out of descriptors: do not spin on the error.
                    Err(e) => {
                        tracing::warn!(error = %e, "peer accept failed; pausing 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                ev = events.recv() => actions = links.on_event(&config.instance, &mut session, ev),
            }
        }
    }
    .await;
    reader.abort();
    result
}
