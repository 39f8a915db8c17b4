//! The task plane of the core: the controller as seed 2's Manager.
//!
//! State: the workers in a relationship with this manager (their resources and what is
//! reserved on them), every task (its spec, state, attempts) and the queue of tasks
//! waiting for a worker. Rules, all deterministic and driven by inputs:
//!
//! - relationship: `NodeTypeV1Req` is answered with the manager's type and id; a
//!   `ManagerV1Req` is accepted only from a node that said it is a worker and that
//!   addresses this manager's id; `ManagerByeV1Req` is acknowledged and ends the
//!   relationship; `ManagerPingV1Req` gets `ManagerPongV1Reply` from a partner and
//!   `NotMineV1Reply` otherwise; any relationship-specific request from a non-partner
//!   gets `NotMineV1Reply`, and a `NotMineV1Reply` to our own request ends it.
//! - placement: queued tasks in priority then submission order go to the online worker
//!   with the most free cores that has the cores, memory and labels they need, one
//!   `TasksExecuteV1Req` per attempt; `TasksRefusedV1Reply` puts the task back (the
//!   refusal does not count as an attempt, the refusing worker is skipped).
//! - attempts: each dispatch is a new attempt number; reports (`TaskStarted`,
//!   `TaskError`, `TaskCompleted`) are acknowledged always and applied only when they
//!   are about the task's current attempt, so repeats are harmless; a report about an
//!   attempt that is no longer current (given away) is answered with `TasksAbortV1Req`.
//! - failures: an error, a worker gone for `worker_grace_ms`, or an attempt past its
//!   timeout plus `task_grace_ms` (which the manager aborts) is retried with backoff
//!   until `max_attempts`, then the task has failed.
//! - reconciliation: when a worker (re)joins, it is asked `TasksPingV1Req` about every
//!   attempt the state says it holds; Pending/Started keep them, Error/Completed apply
//!   as reports, Unknown loses the attempt (retried). After a controller restart the
//!   replayed state knows every attempt in flight, so nothing is started twice because
//!   of the restart and nothing is forgotten.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use drover_proto::{Payload, v1};
use serde::{Deserialize, Serialize};

use super::{Config, Controller, Node, Output, any_of};

/// Most arguments of a task.
const MAX_ARGS: usize = 256;
/// Most bytes of a task's spec (address, arguments, environment, labels).
const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Longest timeout accepted (7 days).
const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3_600_000;
/// Most attempts a task may ask for.
const MAX_ATTEMPTS: u32 = 20;
/// Attempt records kept per task.
const MAX_HISTORY: usize = 32;
/// Consecutive queued tasks that fit nowhere before a placement pass stops.
const MAX_MISSES: usize = 256;
/// Refusal records kept per task (of the [`MAX_HISTORY`]): a task every worker refuses
/// is asked again and again until `unplaceable_after`, and must not grow a row per try.
const MAX_REFUSAL_ROWS: usize = 8;
/// The wait before workers that all refused a task are asked again: from this,
/// doubling per round, up to [`REASK_MAX_MS`].
const REASK_MIN_MS: i64 = 1_000;
const REASK_MAX_MS: i64 = 15_000;

/// A worker in a relationship with this manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct WorkerRel {
    cores: u32,
    memory_mb: u64,
    labels: BTreeMap<String, String>,
    used_cores: u32,
    used_memory_mb: u64,
    /// Job address prefixes it runs (`--allow-jobs`); empty: it did not say (any).
    allow_jobs: Vec<String>,
}

impl WorkerRel {
    /// Why this worker could never run `spec`, whatever it is doing now.
    fn cannot_run(&self, spec: &Spec) -> Option<String> {
        if self.cores < spec.cores {
            return Some(format!("needs {} cores, has {}", spec.cores, self.cores));
        }
        if self.memory_mb < spec.memory_mb {
            return Some(format!("needs {} MiB, has {}", spec.memory_mb, self.memory_mb));
        }
        if !matches_labels(&spec.labels, &self.labels) {
            return Some("lacks the labels".into());
        }
        // Workers take any http(s) job (checked by its digest); prefixes are for paths.
        let url = spec.job_addr.starts_with("http://") || spec.job_addr.starts_with("https://");
        if !url && !self.allow_jobs.is_empty() && !self.allow_jobs.iter().any(|p| spec.job_addr.starts_with(p.as_str()))
        {
            return Some(format!("runs only jobs under {}", self.allow_jobs.join(", ")));
        }
        None
    }
}

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Spec {
    job_addr: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    timeout_ms: u64,
    cores: u32,
    memory_mb: u64,
    labels: BTreeMap<String, String>,
    max_attempts: u32,
    priority: i32,
    sha256: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    Queued,
    Running,
    Completed,
    Failed,
    Aborted,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Completed => "completed",
            State::Failed => "failed",
            State::Aborted => "aborted",
        }
    }
}

/// An attempt in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Attempt {
    n: u32,
    worker: String,
    dispatched_ms: i64,
    started_ms: Option<i64>,
    /// The `TasksExecuteV1Req` request id, while its answer is awaited.
    request: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct AttemptRec {
    n: u32,
    worker: String,
    outcome: String,
    dispatched_ms: i64,
    started_ms: i64,
    finished_ms: i64,
    detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Outcome {
    exit_code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_truncated: bool,
    stderr_truncated: bool,
    started_ms: i64,
    finished_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Task {
    spec: Spec,
    state: State,
    seq: u64,
    submitted_ms: i64,
    finished_ms: i64,
    /// Attempts counted against `max_attempts` (refusals are not).
    attempts: u32,
    /// The last attempt number issued.
    last_attempt: u32,
    not_before_ms: i64,
    current: Option<Attempt>,
    history: Vec<AttemptRec>,
    refused_by: BTreeSet<String>,
    outcome: Option<Outcome>,
    /// The outcome's output was dropped to stay within the output budget.
    output_expired: bool,
    error: String,
    /// Since when no registered worker would take it (all refused, or none fits);
    /// past `unplaceable_after_ms` it fails with the reason.
    unplaceable_since_ms: Option<i64>,
    /// Rounds of asking every worker again after all refused (for the growing wait).
    reasks: u32,
}

/// The task plane's part of the state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TaskPlane {
    workers: BTreeMap<String, WorkerRel>,
    tasks: BTreeMap<String, Task>,
    /// (−priority, submission seq) → task id, for queued tasks.
    queue: BTreeMap<(i64, u64), String>,
    next_task: u64,
    /// Finished tasks, oldest first.
    finished: VecDeque<String>,
    output_bytes: u64,
    /// When this controller process started (its `ControllerStarted` input).
    pub(super) restarted_at_ms: i64,
    /// Our requests awaiting an answer: request id → (worker, task id or empty).
    pub(super) requests: BTreeMap<String, (String, String)>,
    pub(super) counters: TaskCounters,
}

/// Task counters, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounters {
    /// Tasks submitted.
    pub submitted: u64,
    /// Tasks that completed (any exit code).
    pub completed: u64,
    /// Tasks that failed after their last attempt.
    pub failed: u64,
    /// Tasks aborted by an operator.
    pub aborted: u64,
    /// Attempts dispatched to workers.
    pub dispatched: u64,
    /// Attempts retried after an error, a lost worker or a timeout.
    pub retries: u64,
    /// Dispatches refused by a worker.
    pub refusals: u64,
    /// Attempts the manager aborted for overrunning their timeout.
    pub timeouts: u64,
    /// Attempts a worker started (dispatched and not refused).
    pub started: u64,
    /// Tasks failed because no worker would take them for `unplaceable_after_ms`.
    pub unplaceable: u64,
}

/// One task as tests and tools see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskState {
    /// The task id.
    pub id: String,
    /// queued, running, completed, failed or aborted.
    pub state: &'static str,
    /// Cores it needs.
    pub cores: u32,
    /// Its current attempt: number and worker.
    pub attempt: Option<(u32, String)>,
}

/// Queue depth and tasks by state, for metrics and the dashboard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TaskGauges {
    /// Waiting for a worker.
    pub queued: u64,
    /// On a worker.
    pub running: u64,
    /// Completed (any exit code) and remembered.
    pub done: u64,
    /// Failed and remembered.
    pub failed: u64,
    /// Aborted by an operator and remembered.
    pub aborted: u64,
}

fn matches_labels(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

fn backoff_ms(attempts: u32) -> i64 {
    (500i64 << attempts.saturating_sub(1).min(6)).min(30_000)
}

fn kind_name(kind: i32) -> &'static str {
    match v1::TaskErrorKind::try_from(kind).unwrap_or(v1::TaskErrorKind::Unspecified) {
        v1::TaskErrorKind::TimedOut => "timed out",
        v1::TaskErrorKind::DownloadError => "download error",
        v1::TaskErrorKind::RunningError => "running error",
        v1::TaskErrorKind::Aborted => "aborted",
        v1::TaskErrorKind::Refused => "refused",
        v1::TaskErrorKind::Unspecified => "error",
    }
}

impl Spec {
    fn from_request(r: v1::ControllerTaskRunV1Req) -> Result<Spec, String> {
        if r.job_addr.is_empty() {
            return Err("a task needs a job address (a path on the worker or an http(s):// URL)".into());
        }
        if !(r.job_addr.starts_with('/') || r.job_addr.starts_with("http://") || r.job_addr.starts_with("https://")) {
            return Err(format!(
                "the job {:?} must be an absolute path on the worker (e.g. /bin/echo) or an http(s):// URL",
                r.job_addr
            ));
        }
        if r.job_addr.starts_with('/') && r.job_addr.split('/').any(|c| c == "..") {
            return Err(format!("the job {:?} contains `..` (workers refuse it)", r.job_addr));
        }
        if r.args.len() > MAX_ARGS {
            return Err(format!("at most {MAX_ARGS} arguments"));
        }
        // The shell seals secrets into `env` before the request is journaled; one that
        // reaches the core unsealed is refused rather than kept in clear.
        if !r.secret_env.is_empty() {
            return Err("secret environment values must be sealed by the controller".into());
        }
        let size = r.job_addr.len()
            + r.args.iter().map(String::len).sum::<usize>()
            + r.env.iter().chain(r.labels.iter()).map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if size > MAX_SPEC_BYTES {
            return Err(format!("the task is {size} bytes; at most {MAX_SPEC_BYTES}"));
        }
        if r.timeout_ms == 0 || r.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!("timeout must be 1 ms ..= {MAX_TIMEOUT_MS} ms"));
        }
        if let Some(s) = &r.sha256
            && (s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err("sha256 must be 64 hex digits".into());
        }
        Ok(Spec {
            job_addr: r.job_addr,
            args: r.args,
            env: r.env.into_iter().collect(),
            timeout_ms: r.timeout_ms,
            cores: r.cores.max(1),
            memory_mb: r.memory_mb,
            labels: r.labels.into_iter().collect(),
            max_attempts: r.max_attempts.clamp(1, MAX_ATTEMPTS),
            priority: r.priority,
            sha256: r.sha256,
        })
    }

    /// The task as it was asked for, with sealed (secret) values shown by name only:
    /// they are listed in `secret_env` with empty values.
    fn to_request(&self) -> v1::ControllerTaskRunV1Req {
        let (secret, env): (Vec<_>, Vec<_>) = self.env.iter().partition(|(_, v)| v.starts_with(crate::SEALED_PREFIX));
        v1::ControllerTaskRunV1Req {
            job_addr: self.job_addr.clone(),
            args: self.args.clone(),
            env: env.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            secret_env: secret.into_iter().map(|(k, _)| (k.clone(), String::new())).collect(),
            timeout_ms: self.timeout_ms,
            cores: self.cores,
            memory_mb: self.memory_mb,
            labels: self.labels.clone().into_iter().collect(),
            max_attempts: self.max_attempts,
            priority: self.priority,
            sha256: self.sha256.clone(),
        }
    }
}

impl Task {
    fn info(&self, id: &str) -> v1::TaskInfo {
        let mut history: Vec<v1::TaskAttemptInfo> = self
            .history
            .iter()
            .map(|h| v1::TaskAttemptInfo {
                attempt: h.n,
                worker: h.worker.clone(),
                outcome: h.outcome.clone(),
                dispatched_at_ms: h.dispatched_ms,
                started_at_ms: h.started_ms,
                finished_at_ms: h.finished_ms,
                detail: h.detail.clone(),
            })
            .collect();
        if let Some(a) = &self.current {
            history.push(v1::TaskAttemptInfo {
                attempt: a.n,
                worker: a.worker.clone(),
                outcome: "running".into(),
                dispatched_at_ms: a.dispatched_ms,
                started_at_ms: a.started_ms.unwrap_or(0),
                finished_at_ms: 0,
                detail: String::new(),
            });
        }
        v1::TaskInfo {
            id: id.to_owned(),
            state: self.state.as_str().into(),
            spec: Some(self.spec.to_request()),
            attempts: self.attempts,
            worker: history.last().map(|h| h.worker.clone()).unwrap_or_default(),
            history,
            exit_code: self.outcome.as_ref().map(|o| o.exit_code),
            error: self.error.clone(),
            submitted_at_ms: self.submitted_ms,
            finished_at_ms: self.finished_ms,
        }
    }
}

impl TaskPlane {
    /// The first task, worker or task counter that differs from `other`'s.
    pub(super) fn first_difference(&self, other: &TaskPlane) -> Option<String> {
        use super::durable::{differs, map_differs};
        map_differs("task", &self.tasks, &other.tasks)
            .or_else(|| map_differs("worker", &self.workers, &other.workers))
            .or_else(|| differs("task queue", &self.queue, &other.queue))
            .or_else(|| differs("finished tasks", &self.finished, &other.finished))
            .or_else(|| differs("task output bytes", &self.output_bytes, &other.output_bytes))
            .or_else(|| differs("next task id", &self.next_task, &other.next_task))
            .or_else(|| map_differs("task request", &self.requests, &other.requests))
            .or_else(|| differs("task counters", &self.counters, &other.counters))
            .or_else(|| differs("controller start", &self.restarted_at_ms, &other.restarted_at_ms))
    }

    /// Queue depth and tasks by state.
    pub(super) fn gauges(&self) -> TaskGauges {
        let mut g = TaskGauges { queued: self.queue.len() as u64, ..TaskGauges::default() };
        for t in self.tasks.values() {
            match t.state {
                State::Running => g.running += 1,
                State::Completed => g.done += 1,
                State::Failed => g.failed += 1,
                State::Aborted => g.aborted += 1,
                State::Queued => {}
            }
        }
        g
    }

    /// Why no registered worker would take `spec`: each one's reason it could never run
    /// it, those in `refused` counting as unwilling. `None` when some worker would take
    /// it; an empty set when no worker is registered.
    fn why_none_takes(&self, spec: &Spec, refused: &BTreeSet<String>) -> Option<BTreeSet<String>> {
        let mut reasons = BTreeSet::new();
        for (id, w) in &self.workers {
            match w.cannot_run(spec) {
                Some(why) => {
                    reasons.insert(why);
                }
                None if refused.contains(id) => {}
                None => return None,
            }
        }
        Some(reasons)
    }

    /// A worker's (cores, cores reserved, memory MiB).
    pub(super) fn worker_resources(&self, node: &str) -> Option<(u32, u32, u64)> {
        self.workers.get(node).map(|w| (w.cores, w.used_cores, w.memory_mb))
    }

    /// The newest `n` tasks, newest first: O(tasks · log n).
    pub(super) fn recent(&self, n: usize) -> Vec<crate::view::TaskRow> {
        let mut newest: std::collections::BinaryHeap<std::cmp::Reverse<(u64, &String)>> =
            std::collections::BinaryHeap::with_capacity(n + 1);
        for (id, t) in &self.tasks {
            newest.push(std::cmp::Reverse((t.seq, id)));
            if newest.len() > n {
                newest.pop();
            }
        }
        let mut ids: Vec<(u64, &String)> = newest.into_iter().map(|r| r.0).collect();
        ids.sort_by_key(|a| std::cmp::Reverse(a.0));
        ids.into_iter()
            .filter_map(|(_, id)| {
                let t = self.tasks.get(id)?;
                let mut job = std::iter::once(t.spec.job_addr.as_str())
                    .chain(t.spec.args.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(" ");
                if job.chars().count() > 80 {
                    job = job.chars().take(79).collect::<String>() + "…";
                }
                let last =
                    t.current.as_ref().map(|a| a.worker.clone()).or_else(|| t.history.last().map(|h| h.worker.clone()));
                Some(crate::view::TaskRow {
                    id: id.clone(),
                    state: t.state.as_str(),
                    job,
                    worker: last,
                    attempts: t.attempts,
                    exit_code: t.outcome.as_ref().map(|o| o.exit_code),
                    error: t.error.clone(),
                    submitted_ms: t.submitted_ms,
                    finished_ms: t.finished_ms,
                })
            })
            .collect()
    }

    /// Whether `node` is a worker of this manager.
    pub(super) fn is_worker(&self, node: &str) -> bool {
        self.workers.contains_key(node)
    }

    /// A worker's declared cores and the cores reserved on it.
    pub(super) fn worker_load(&self, node: &str) -> Option<(u32, u32)> {
        self.workers.get(node).map(|w| (w.cores, w.used_cores))
    }

    /// Every task: id, state, cores, and its current attempt.
    pub(super) fn task_states(&self) -> Vec<TaskState> {
        self.tasks
            .iter()
            .map(|(id, t)| TaskState {
                id: id.clone(),
                state: t.state.as_str(),
                cores: t.spec.cores,
                attempt: t.current.as_ref().map(|a| (a.n, a.worker.clone())),
            })
            .collect()
    }
}

/// What the task plane sees of a node: whether it is connected (by which stream),
/// whether it said it is a worker, and when it went away.
#[derive(Clone, Copy, Debug)]
pub(super) struct NodeFacts {
    pub(super) session: Option<u64>,
    pub(super) worker: bool,
    pub(super) gone_at_ms: Option<i64>,
}

/// The task plane's narrow view of the fleet: a node's [`NodeFacts`], nothing more.
pub(super) struct Fleet<'a>(&'a BTreeMap<String, Node>);

impl Fleet<'_> {
    pub(super) fn get(&self, node: &str) -> Option<NodeFacts> {
        self.0.get(node).map(|n| NodeFacts { session: n.session, worker: n.worker, gone_at_ms: n.gone_at_ms })
    }
}

/// The task plane's working memory within one input (a cache, never state).
#[derive(Clone, Debug, Default)]
pub(super) struct TaskScratch {
    /// No task time rule (overdue or lost attempt, end of a backoff) can fire before
    /// this (a cache, lowered whenever a deadline may have come earlier; 0 = unknown).
    pub(super) task_due_ms: i64,
    /// Workers with free cores by (free cores, id), for placement (`None`: rebuild).
    pub(super) free_index: Option<BTreeSet<(u32, String)>>,
    /// `Output::TaskEnded` notices of the current input.
    pub(super) ended: Vec<Output>,
}

impl TaskScratch {
    /// The earliest time a task rule can fire, as cached by the last scan (never later
    /// than the truth: every change that can bring a deadline earlier lowers it).
    pub(super) fn deadline(&self) -> Option<i64> {
        match self.task_due_ms {
            i64::MAX => None,
            d => Some(d),
        }
    }

    /// Forgets the cached deadline: the next settle scans the attempts (a worker may
    /// have gone, or come back).
    pub(super) fn rescan(&mut self) {
        self.task_due_ms = 0;
    }
}

/// The task plane at work on one input: its state and working memory, the time and
/// settings, the fleet as [`Fleet`] shows it, and the request counter it shares with
/// the controller. The controller hands it out ([`Controller::work`]); the task rules
/// touch nothing else.
pub(super) struct Work<'a> {
    tasks: &'a mut TaskPlane,
    scratch: &'a mut TaskScratch,
    now_ms: i64,
    config: &'a Config,
    nodes: Fleet<'a>,
    next_request: &'a mut u64,
}

impl Controller {
    /// The task plane, at work on the current input.
    pub(super) fn work(&mut self) -> Work<'_> {
        Work {
            tasks: &mut self.tasks,
            scratch: &mut self.scratch.tasks,
            now_ms: self.now_ms,
            config: &self.config,
            nodes: Fleet(&self.nodes),
            next_request: &mut self.next_request,
        }
    }
}

/// Where a worker-originated message came from.
struct From<'a> {
    node: &'a str,
    session: u64,
    request_id: String,
}

mod placement;
mod work;
