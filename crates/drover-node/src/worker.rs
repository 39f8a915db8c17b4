//! The worker's side of seed 2 (manager/worker), sans-IO.
//!
//! Messages from the controller and events from running tasks go in; [`Action`]s come
//! out: messages to send, tasks to start, tasks to kill. The worker outlives its
//! connections: tasks keep running while the node reconnects, and their reports
//! (`TaskStarted`, `TaskError`, `TaskCompleted`) are repeated until the manager
//! acknowledges them. Rules, row by row from the seed:
//!
//! - `NodeTypeV1Req` is answered with the worker's type and id; on every new session
//!   the worker asks the controller's type itself, and if it is a manager whose id is
//!   allowed (`--manager`, any when none is configured) it sends `ManagerV1Req` with its
//!   resources (again after a reconnect, to the same manager: a re-confirmation).
//! - `ManagerV1Reply { accepted: true }` makes the sender its manager, unless it already
//!   has another one, in which case it answers `ManagerByeV1Req`.
//! - A worker asked `ManagerV1Req` itself answers `accepted: false`.
//! - `ManagerByeV1Req` is acknowledged; from its manager it ends the relationship and
//!   stops its tasks.
//! - `ManagerPingV1Req` gets `ManagerPongV1Reply` from its manager, `NotMineV1Reply`
//!   otherwise; so do `TasksExecuteV1Req`, `TasksPingV1Req` and `TasksAbortV1Req`.
//! - `TasksExecuteV1Req` is refused as a whole (`TasksRefusedV1Reply {reason}`) when a
//!   task's job is not allowed or the free cores/memory do not suffice; otherwise each
//!   task not already known is started and the request acknowledged (a repeat of a known
//!   attempt starts nothing).
//! - `TasksPingV1Req` is answered with every asked attempt's status (`Unknown` when
//!   the worker never had it or forgot it after its report was acknowledged).
//! - `TasksAbortV1Req` kills the asked attempts (each then reports `Aborted`).
//! - A `NotMineV1Reply` to a report means the manager disowned this worker: the
//!   relationship ends and its tasks stop.

use std::collections::BTreeMap;
use std::path::PathBuf;

use drover_proto::{Payload, v1};

/// How often an unacknowledged report is repeated.
pub const REPORT_EVERY_MS: i64 = 1_000;

/// A worker's settings.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The node id (sent as the worker's id).
    pub id: String,
    /// Cores offered.
    pub cores: u32,
    /// Memory offered, in MiB.
    pub memory_mb: u64,
    /// Labels tasks may require.
    pub labels: BTreeMap<String, String>,
    /// Local job paths must start with one of these.
    pub allow_jobs: Vec<String>,
    /// Managers (by id) this worker accepts; empty: any.
    pub allow_managers: Vec<String>,
    /// Bytes of stdout and of stderr kept per task.
    pub max_output: usize,
    /// Where downloaded jobs are cached.
    pub cache_dir: PathBuf,
}

impl WorkerConfig {
    /// Defaults: `cores` and `memory_mb` offered, jobs under `/bin/` and `/usr/bin/`.
    pub fn new(id: impl Into<String>, cores: u32, memory_mb: u64) -> Self {
        WorkerConfig {
            id: id.into(),
            cores,
            memory_mb,
            labels: BTreeMap::new(),
            allow_jobs: vec!["/bin/".into(), "/usr/bin/".into()],
            allow_managers: Vec::new(),
            max_output: 1 << 20,
            cache_dir: std::env::temp_dir().join("drover-jobs"),
        }
    }
}

/// What the worker's I/O must do.
#[derive(Clone, Debug, PartialEq)]
// `Send` is as large as the largest message (a task request); actions live briefly in
// short vectors, so boxing it would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Send on the node stream.
    Send {
        /// The request id (a reply reuses the request's).
        request_id: String,
        /// The message.
        payload: Payload,
    },
    /// Start a task.
    Start(v1::TaskSpec),
    /// Kill a running task (its process group).
    Kill(v1::TaskId),
}

#[derive(Clone, Debug, PartialEq)]
enum Local {
    Pending,
    Running { started_ms: i64 },
    Error { kind: i32, message: String },
    Completed(v1::TaskOutcome),
}

#[derive(Clone, Debug)]
struct Report {
    task: (String, u32),
    payload: Payload,
    sent_ms: i64,
}

/// The worker's state.
#[derive(Debug)]
pub struct Worker {
    config: WorkerConfig,
    manager: Option<String>,
    /// The manager a `ManagerV1Req` is out to, by its request id.
    asking: Option<(String, String)>,
    tasks: BTreeMap<(String, u32), (Local, u32, u64)>,
    reports: BTreeMap<String, Report>,
    next: u64,
    used_cores: u32,
    used_memory_mb: u64,
}

fn key(id: &v1::TaskId) -> (String, u32) {
    (id.id.clone(), id.attempt)
}

fn task_id(k: &(String, u32)) -> v1::TaskId {
    v1::TaskId { id: k.0.clone(), attempt: k.1 }
}

impl Worker {
    /// A worker with no manager and no tasks.
    pub fn new(config: WorkerConfig) -> Self {
        Worker {
            config,
            manager: None,
            asking: None,
            tasks: BTreeMap::new(),
            reports: BTreeMap::new(),
            next: 0,
            used_cores: 0,
            used_memory_mb: 0,
        }
    }

    /// The manager's id, if it has one.
    pub fn manager(&self) -> Option<&str> {
        self.manager.as_deref()
    }

    /// Attempts it holds (pending, running or awaiting acknowledgement).
    pub fn held(&self) -> usize {
        self.tasks.len()
    }

    fn request_id(&mut self) -> String {
        self.next += 1;
        format!("w{}", self.next)
    }

    fn send(request_id: &str, payload: impl Into<Payload>) -> Action {
        Action::Send { request_id: request_id.to_owned(), payload: payload.into() }
    }

    /// A new stream to the controller is open: ask its type, repeat pending reports.
    pub fn session_opened(&mut self, now_ms: i64) -> Vec<Action> {
        let rid = self.request_id();
        let mut out = vec![Self::send(
            &rid,
            v1::NodeTypeV1Req { node_type: v1::NodeType::Worker as i32, id: self.config.id.clone() },
        )];
        for (rid, r) in &mut self.reports {
            r.sent_ms = now_ms;
            out.push(Self::send(rid, r.payload.clone()));
        }
        out
    }

    /// Repeats reports not acknowledged within [`REPORT_EVERY_MS`].
    pub fn tick(&mut self, now_ms: i64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.manager.is_none() {
            return out;
        }
        for (rid, r) in &mut self.reports {
            if now_ms - r.sent_ms >= REPORT_EVERY_MS {
                r.sent_ms = now_ms;
                out.push(Self::send(rid, r.payload.clone()));
            }
        }
        out
    }

    fn report(&mut self, task: (String, u32), payload: Payload, now_ms: i64) -> Action {
        let rid = self.request_id();
        self.reports.insert(rid.clone(), Report { task, payload: payload.clone(), sent_ms: now_ms });
        Action::Send { request_id: rid, payload }
    }

    /// A task's process started.
    pub fn started(&mut self, id: &v1::TaskId, started_ms: i64, now_ms: i64) -> Vec<Action> {
        let k = key(id);
        match self.tasks.get_mut(&k) {
            Some((local @ Local::Pending, _, _)) => *local = Local::Running { started_ms },
            _ => return Vec::new(),
        }
        let payload = v1::TaskStartedV1Req { task: Some(id.clone()), started_at_ms: started_ms }.into();
        vec![self.report(k, payload, now_ms)]
    }

    /// A task ended: completed (any exit code) or an error.
    pub fn finished(
        &mut self,
        id: &v1::TaskId,
        result: Result<v1::TaskOutcome, (v1::TaskErrorKind, String)>,
        now_ms: i64,
    ) -> Vec<Action> {
        let k = key(id);
        let Some((local, cores, mem)) = self.tasks.get_mut(&k) else { return Vec::new() };
        if matches!(local, Local::Error { .. } | Local::Completed(_)) {
            return Vec::new();
        }
        let (cores, mem) = (*cores, *mem);
        let payload: Payload = match result {
            Ok(o) => {
                *local = Local::Completed(o.clone());
                v1::TaskCompletedV1Req { task: Some(id.clone()), outcome: Some(o) }.into()
            }
            Err((kind, message)) => {
                *local = Local::Error { kind: kind as i32, message: message.clone() };
                v1::TaskErrorV1Req { task: Some(id.clone()), kind: kind as i32, message, at_ms: now_ms }.into()
            }
        };
        self.used_cores = self.used_cores.saturating_sub(cores);
        self.used_memory_mb = self.used_memory_mb.saturating_sub(mem);
        if self.manager.is_none() {
            // Nobody to tell: the manager let go of this worker.
            self.tasks.remove(&k);
            return Vec::new();
        }
        vec![self.report(k, payload, now_ms)]
    }

    fn allowed_job(&self, addr: &str) -> Result<(), String> {
        if addr.starts_with("http://") || addr.starts_with("https://") {
            return Ok(());
        }
        if !addr.starts_with('/') {
            return Err(format!("job {addr:?} is neither an absolute path nor an http(s) URL"));
        }
        if addr.split('/').any(|c| c == "..") {
            return Err(format!("job {addr:?} contains `..`"));
        }
        if self.config.allow_jobs.iter().any(|p| addr.starts_with(p.as_str())) {
            Ok(())
        } else {
            Err(format!("job {addr:?} is outside the allowed prefixes {:?}", self.config.allow_jobs))
        }
    }

    /// Drops every task: kills the running ones, forgets reports.
    fn stop_all(&mut self) -> Vec<Action> {
        let out = self
            .tasks
            .iter()
            .filter(|(_, (l, _, _))| matches!(l, Local::Pending | Local::Running { .. }))
            .map(|(k, _)| Action::Kill(task_id(k)))
            .collect();
        self.reports.clear();
        out
    }

    /// A message from the controller (a request, or an answer to one of ours).
    pub fn on_message(&mut self, request_id: &str, payload: Payload) -> Vec<Action> {
        let is_manager = self.manager.is_some();
        let not_mine = || vec![Self::send(request_id, v1::NotMineV1Reply {})];
        match payload {
            Payload::NodeTypeV1Req(_) => vec![Self::send(
                request_id,
                v1::NodeTypeV1Reply { node_type: v1::NodeType::Worker as i32, id: self.config.id.clone() },
            )],
            Payload::NodeTypeV1Reply(r) => {
                let manager = r.node_type == v1::NodeType::Manager as i32;
                let allowed = self.config.allow_managers.is_empty() || self.config.allow_managers.contains(&r.id);
                let free = self.manager.as_ref().is_none_or(|m| *m == r.id);
                if !(manager && allowed && free) {
                    if manager && !allowed {
                        tracing::warn!(manager = %r.id, "not subscribing: this manager is not in --manager");
                    }
                    return Vec::new();
                }
                let rid = self.request_id();
                self.asking = Some((rid.clone(), r.id.clone()));
                vec![Self::send(
                    &rid,
                    v1::ManagerV1Req {
                        cores: self.config.cores,
                        memory_mb: self.config.memory_mb,
                        labels: self.config.labels.clone().into_iter().collect(),
                        manager_id: r.id,
                        allow_jobs: self.config.allow_jobs.clone(),
                    },
                )]
            }
            Payload::ManagerV1Reply(r) => {
                let Some((_, id)) = self.asking.take_if(|(rid, _)| rid == request_id) else {
                    // Accepted without being asked (or for an older request): this worker
                    // cannot be that manager's worker, so it says so.
                    if r.accepted && self.manager.is_none() {
                        let rid = self.request_id();
                        return vec![Self::send(&rid, v1::ManagerByeV1Req {})];
                    }
                    return Vec::new();
                };
                if !r.accepted {
                    tracing::warn!(manager = %id, "the manager did not accept this worker");
                    return Vec::new();
                }
                match &self.manager {
                    Some(m) if *m != id => {
                        let rid = self.request_id();
                        vec![Self::send(&rid, v1::ManagerByeV1Req {})]
                    }
                    _ => {
                        tracing::info!(manager = %id, "managed");
                        self.manager = Some(id);
                        Vec::new()
                    }
                }
            }
            Payload::ManagerV1Req(_) => vec![Self::send(request_id, v1::ManagerV1Reply { accepted: false })],
            Payload::ManagerByeV1Req(_) => {
                let mut out = vec![Self::send(request_id, v1::AckV1Reply {})];
                if is_manager {
                    self.manager = None;
                    out.extend(self.stop_all());
                }
                out
            }
            Payload::ManagerPingV1Req(_) if is_manager => vec![Self::send(request_id, v1::ManagerPongV1Reply {})],
            Payload::ManagerPingV1Req(_) => not_mine(),
            Payload::TasksExecuteV1Req(_) | Payload::TasksPingV1Req(_) | Payload::TasksAbortV1Req(_) if !is_manager => {
                not_mine()
            }
            Payload::TasksExecuteV1Req(r) => self.execute(request_id, r),
            Payload::TasksPingV1Req(r) => {
                let tasks = r
                    .tasks
                    .iter()
                    .map(|id| {
                        use v1::task_status::Status;
                        let status = match self.tasks.get(&key(id)).map(|t| &t.0) {
                            None => Status::Unknown(v1::task_status::Unknown {}),
                            Some(Local::Pending) => Status::Pending(v1::task_status::Pending {}),
                            Some(Local::Running { started_ms }) => {
                                Status::Started(v1::task_status::Started { started_at_ms: *started_ms })
                            }
                            Some(Local::Error { kind, message }) => {
                                Status::Error(v1::task_status::Error { kind: *kind, message: message.clone() })
                            }
                            Some(Local::Completed(o)) => Status::Completed(o.clone()),
                        };
                        v1::TaskStatus { task: Some(id.clone()), status: Some(status) }
                    })
                    .collect();
                vec![Self::send(request_id, v1::TasksPongV1Reply { tasks })]
            }
            Payload::TasksAbortV1Req(r) => {
                let mut out = vec![Self::send(request_id, v1::AckV1Reply {})];
                for id in &r.tasks {
                    if let Some((Local::Pending | Local::Running { .. }, _, _)) = self.tasks.get(&key(id)) {
                        out.push(Action::Kill(id.clone()));
                    }
                }
                out
            }
            Payload::AckV1Reply(_) => {
                // The manager has the report durably: a finished task can be forgotten.
                if let Some(r) = self.reports.remove(request_id)
                    && matches!(self.tasks.get(&r.task), Some((Local::Error { .. } | Local::Completed(_), _, _)))
                {
                    self.tasks.remove(&r.task);
                }
                Vec::new()
            }
            Payload::NotMineV1Reply(_) => {
                if self.reports.contains_key(request_id) && is_manager {
                    tracing::warn!("the manager disowned this worker (NotMine); stopping its tasks");
                    self.manager = None;
                    return self.stop_all();
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn execute(&mut self, request_id: &str, r: v1::TasksExecuteV1Req) -> Vec<Action> {
        let fresh: Vec<&v1::TaskSpec> =
            r.tasks.iter().filter(|t| t.task.as_ref().is_some_and(|id| !self.tasks.contains_key(&key(id)))).collect();
        let (cores, mem) = fresh.iter().fold((0u32, 0u64), |(c, m), t| (c + t.cores.max(1), m + t.memory_mb));
        let refuse = |reason: String| vec![Self::send(request_id, v1::TasksRefusedV1Reply { reason })];
        if r.tasks.iter().any(|t| t.task.is_none()) {
            return refuse("a task without an id".into());
        }
        for t in &fresh {
            if let Err(reason) = self.allowed_job(&t.job_addr) {
                return refuse(reason);
            }
        }
        let free_cores = self.config.cores.saturating_sub(self.used_cores);
        let free_mem = self.config.memory_mb.saturating_sub(self.used_memory_mb);
        if cores > free_cores || mem > free_mem {
            return refuse(format!(
                "not enough room: asked {cores} cores and {mem} MiB, free {free_cores} cores and {free_mem} MiB"
            ));
        }
        let mut out = vec![Self::send(request_id, v1::AckV1Reply {})];
        for t in fresh {
            let Some(id) = &t.task else { continue };
            self.tasks.insert(key(id), (Local::Pending, t.cores.max(1), t.memory_mb));
            out.push(Action::Start(t.clone()));
        }
        self.used_cores += cores;
        self.used_memory_mb += mem;
        out
    }
}
