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

use super::{Controller, Output, any_of};

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

/// Where a worker-originated message came from.
struct From<'a> {
    node: &'a str,
    session: u64,
    request_id: String,
}

impl Controller {
    fn task_reply(&self, from: &From<'_>, payload: impl Into<Payload>) -> Output {
        self.reply_to_node(from.node, from.session, from.request_id.clone(), payload)
    }

    /// Sends a request to a worker; returns its request id (`None`: the worker is offline).
    fn task_request(
        &mut self,
        worker: &str,
        task: &str,
        payload: impl Into<Payload>,
        out: &mut Vec<Output>,
    ) -> Option<String> {
        let session = self.nodes.get(worker).and_then(|n| n.session)?;
        self.next_request += 1;
        let request_id = format!("m{}", self.next_request);
        self.tasks.requests.insert(request_id.clone(), (worker.to_owned(), task.to_owned()));
        out.push(Output::ToNode {
            node: worker.to_owned(),
            session,
            msg: v1::StreamToNode { from_uuid: None, command: Some(any_of(payload)), request_id: request_id.clone() },
        });
        Some(request_id)
    }

    /// Handles a seed-2 message from a node. Returns `false` if the payload is not one.
    pub(super) fn task_message(
        &mut self,
        node: &str,
        session: u64,
        request_id: String,
        payload: &Payload,
        out: &mut Vec<Output>,
    ) -> bool {
        let from = From { node, session, request_id };
        let partner = self.tasks.workers.contains_key(node);
        let not_mine = |c: &Self, out: &mut Vec<Output>| out.push(c.task_reply(&from, v1::NotMineV1Reply {}));
        match payload {
            Payload::NodeTypeV1Req(_) => {
                let id = self.config.manager_id.clone();
                out.push(self.task_reply(&from, v1::NodeTypeV1Reply { node_type: v1::NodeType::Manager as i32, id }));
            }
            Payload::ManagerV1Req(r) => {
                let is_worker = self.nodes.get(node).is_some_and(|n| n.worker);
                let accepted = is_worker && r.manager_id == self.config.manager_id && r.cores > 0;
                if accepted {
                    let rel = self.tasks.workers.entry(node.to_owned()).or_insert(WorkerRel {
                        cores: 0,
                        memory_mb: 0,
                        labels: BTreeMap::new(),
                        used_cores: 0,
                        used_memory_mb: 0,
                        allow_jobs: Vec::new(),
                    });
                    rel.cores = r.cores;
                    rel.memory_mb = r.memory_mb;
                    rel.labels = r.labels.clone().into_iter().collect();
                    rel.allow_jobs = r.allow_jobs.iter().take(64).map(|p| p.chars().take(1024).collect()).collect();
                    self.scratch.free_index = None;
                }
                out.push(self.task_reply(&from, v1::ManagerV1Reply { accepted }));
                if accepted {
                    self.reconcile(node, out);
                }
            }
            Payload::ManagerByeV1Req(_) => {
                out.push(self.task_reply(&from, v1::AckV1Reply {}));
                if partner {
                    self.end_relationship(node, "the worker said ManagerBye");
                }
            }
            Payload::ManagerPingV1Req(_) => {
                if partner {
                    out.push(self.task_reply(&from, v1::ManagerPongV1Reply {}));
                } else {
                    not_mine(self, out);
                }
            }
            Payload::TaskStartedV1Req(_) | Payload::TaskErrorV1Req(_) | Payload::TaskCompletedV1Req(_) if !partner => {
                not_mine(self, out)
            }
            Payload::TaskStartedV1Req(r) => {
                out.push(self.task_reply(&from, v1::AckV1Reply {}));
                let id = r.task.clone().unwrap_or_default();
                if !self.attempt_started(node, &id, r.started_at_ms) {
                    self.abort_stale(node, id, out);
                }
            }
            Payload::TaskErrorV1Req(r) => {
                out.push(self.task_reply(&from, v1::AckV1Reply {}));
                let id = r.task.clone().unwrap_or_default();
                self.attempt_error(node, &id, r.kind, &r.message);
            }
            Payload::TaskCompletedV1Req(r) => {
                out.push(self.task_reply(&from, v1::AckV1Reply {}));
                let id = r.task.clone().unwrap_or_default();
                self.attempt_completed(node, &id, r.outcome.clone().unwrap_or_default());
            }
            // Answers to our requests.
            Payload::AckV1Reply(_)
            | Payload::TasksRefusedV1Reply(_)
            | Payload::NotMineV1Reply(_)
            | Payload::TasksPongV1Reply(_)
            | Payload::ManagerPongV1Reply(_)
            | Payload::NodeTypeV1Reply(_) => {
                let Some((worker, task)) = self.tasks.requests.remove(&from.request_id) else { return true };
                if worker != node {
                    return true;
                }
                self.answer(node, &task, payload, out);
            }
            // A worker never asks its manager to run, ping or abort tasks.
            Payload::TasksExecuteV1Req(_) | Payload::TasksPingV1Req(_) | Payload::TasksAbortV1Req(_) => {
                not_mine(self, out)
            }
            Payload::ManagerV1Reply(_) => {}
            _ => return false,
        }
        true
    }

    fn answer(&mut self, node: &str, task: &str, payload: &Payload, out: &mut Vec<Output>) {
        match payload {
            Payload::AckV1Reply(_) => {
                if let Some(a) = self.tasks.tasks.get_mut(task).and_then(|t| t.current.as_mut()) {
                    a.request = None;
                }
            }
            Payload::TasksRefusedV1Reply(r) => {
                self.tasks.counters.refusals += 1;
                let now = self.now_ms;
                let Some(t) = self.tasks.tasks.get_mut(task) else { return };
                let Some(a) = t.current.take_if(|a| a.worker == node) else { return };
                t.refused_by.insert(node.to_owned());
                // A refusal is not an attempt: the task never ran.
                t.attempts = t.attempts.saturating_sub(1);
                let refusals: Vec<usize> =
                    t.history.iter().enumerate().filter(|(_, h)| h.outcome == "refused").map(|(i, _)| i).collect();
                if refusals.len() >= MAX_REFUSAL_ROWS {
                    t.history.remove(refusals[0]);
                } else if t.history.len() >= MAX_HISTORY {
                    t.history.remove(0);
                }
                t.history.push(AttemptRec {
                    n: a.n,
                    worker: a.worker,
                    outcome: "refused".into(),
                    dispatched_ms: a.dispatched_ms,
                    started_ms: 0,
                    finished_ms: now,
                    detail: r.reason.clone(),
                });
                let (cores, mem) = (t.spec.cores, t.spec.memory_mb);
                self.release(node, cores, mem);
                self.requeue(task, 0);
            }
            Payload::NotMineV1Reply(_) => self.end_relationship(node, "the worker answered NotMine"),
            Payload::TasksPongV1Reply(p) => {
                for s in &p.tasks {
                    let id = s.task.clone().unwrap_or_default();
                    match &s.status {
                        Some(v1::task_status::Status::Pending(_)) | None => {}
                        Some(v1::task_status::Status::Started(st)) => {
                            if !self.attempt_started(node, &id, st.started_at_ms) {
                                self.abort_stale(node, id, out);
                            }
                        }
                        Some(v1::task_status::Status::Error(e)) => self.attempt_error(node, &id, e.kind, &e.message),
                        Some(v1::task_status::Status::Completed(o)) => self.attempt_completed(node, &id, o.clone()),
                        Some(v1::task_status::Status::Unknown(_)) => {
                            self.attempt_lost(&id.id, id.attempt, "the worker does not know the attempt")
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Asks a (re)joined worker about every attempt the state says it holds.
    fn reconcile(&mut self, worker: &str, out: &mut Vec<Output>) {
        let held: Vec<v1::TaskId> = self
            .tasks
            .tasks
            .iter()
            .filter_map(|(id, t)| {
                let a = t.current.as_ref().filter(|a| a.worker == worker)?;
                Some(v1::TaskId { id: id.clone(), attempt: a.n })
            })
            .collect();
        if !held.is_empty() {
            let _ = self.task_request(worker, "", v1::TasksPingV1Req { tasks: held }, out);
        }
    }

    /// The current attempt `id`, if it runs on `worker`.
    fn current_on(&mut self, worker: &str, id: &v1::TaskId) -> Option<&mut Task> {
        self.tasks
            .tasks
            .get_mut(&id.id)
            .filter(|t| t.current.as_ref().is_some_and(|a| a.n == id.attempt && a.worker == worker))
    }

    /// Returns `false` when the attempt is not current (the caller aborts it).
    fn attempt_started(&mut self, worker: &str, id: &v1::TaskId, _worker_clock_ms: i64) -> bool {
        let now = self.now_ms;
        match self.current_on(worker, id) {
            Some(t) => {
                t.unplaceable_since_ms = None;
                t.reasks = 0;
                let mut first = false;
                if let Some(a) = t.current.as_mut() {
                    // Deadlines run on the manager's clock, from when it heard of the start.
                    first = a.started_ms.is_none();
                    a.started_ms.get_or_insert(now);
                }
                if first {
                    self.tasks.counters.started += 1;
                }
                true
            }
            // Not current (given away, timed out, aborted, or a late repeat of a finished
            // attempt's start): the worker is told to abort it; for a finished one that
            // is a no-op on the worker.
            None => false,
        }
    }

    fn abort_stale(&mut self, worker: &str, id: v1::TaskId, out: &mut Vec<Output>) {
        let _ = self.task_request(worker, &id.id.clone(), v1::TasksAbortV1Req { tasks: vec![id] }, out);
    }

    fn finish_attempt(&mut self, task: &str, outcome: &str, detail: String) -> Option<(String, u32, u64)> {
        let now = self.now_ms;
        let t = self.tasks.tasks.get_mut(task)?;
        let a = t.current.take()?;
        if t.history.len() >= MAX_HISTORY {
            t.history.remove(0);
        }
        t.history.push(AttemptRec {
            n: a.n,
            worker: a.worker.clone(),
            outcome: outcome.to_owned(),
            dispatched_ms: a.dispatched_ms,
            started_ms: a.started_ms.unwrap_or(0),
            finished_ms: now,
            detail,
        });
        let (cores, mem) = (t.spec.cores, t.spec.memory_mb);
        self.release(&a.worker, cores, mem);
        Some((a.worker, cores, mem))
    }

    fn attempt_error(&mut self, worker: &str, id: &v1::TaskId, kind: i32, message: &str) {
        if self.current_on(worker, id).is_none() {
            return;
        }
        let what = kind_name(kind);
        self.finish_attempt(&id.id, &format!("error: {what}"), message.to_owned());
        self.retry_or_fail(&id.id, format!("{what}: {message}"));
    }

    fn attempt_completed(&mut self, worker: &str, id: &v1::TaskId, o: v1::TaskOutcome) {
        if self.current_on(worker, id).is_none() {
            return;
        }
        self.finish_attempt(&id.id, "completed", format!("exit code {}", o.exit_code));
        let now = self.now_ms;
        let Some(t) = self.tasks.tasks.get_mut(&id.id) else { return };
        let bytes = (o.stdout.len() + o.stderr.len()) as u64;
        t.outcome = Some(Outcome {
            exit_code: o.exit_code,
            stdout: o.stdout,
            stderr: o.stderr,
            stdout_truncated: o.stdout_truncated,
            stderr_truncated: o.stderr_truncated,
            started_ms: o.started_at_ms,
            finished_ms: o.finished_at_ms,
        });
        t.state = State::Completed;
        t.finished_ms = now;
        self.tasks.output_bytes += bytes;
        self.tasks.counters.completed += 1;
        self.retire(&id.id);
    }

    /// The attempt is lost (its worker is gone or does not know it): retry or fail.
    fn attempt_lost(&mut self, task: &str, attempt: u32, why: &str) {
        if self.tasks.tasks.get(task).is_none_or(|t| t.current.as_ref().is_none_or(|a| a.n != attempt)) {
            return;
        }
        self.finish_attempt(task, "lost", why.to_owned());
        self.retry_or_fail(task, format!("lost: {why}"));
    }

    fn retry_or_fail(&mut self, task: &str, error: String) {
        let now = self.now_ms;
        let Some(t) = self.tasks.tasks.get_mut(task) else { return };
        if t.state != State::Running && t.state != State::Queued {
            return;
        }
        t.error = error;
        if t.attempts < t.spec.max_attempts {
            self.tasks.counters.retries += 1;
            let delay = backoff_ms(t.attempts);
            self.requeue(task, delay);
        } else {
            t.state = State::Failed;
            t.finished_ms = now;
            self.tasks.counters.failed += 1;
            self.retire(task);
        }
    }

    fn requeue(&mut self, task: &str, delay_ms: i64) {
        let now = self.now_ms;
        let Some(t) = self.tasks.tasks.get_mut(task) else { return };
        t.state = State::Queued;
        t.not_before_ms = now + delay_ms;
        if delay_ms > 0 {
            self.scratch.task_due_ms = self.scratch.task_due_ms.min(now + delay_ms);
        }
        self.tasks.queue.insert((-i64::from(t.spec.priority), t.seq), task.to_owned());
    }

    fn release(&mut self, worker: &str, cores: u32, mem: u64) {
        self.reserve(worker, -i64::from(cores), -(mem as i64));
    }

    /// A finished task joins the retention queue; the oldest are forgotten and the
    /// oldest outputs dropped to stay within the limits.
    fn retire(&mut self, task: &str) {
        if let Some(t) = self.tasks.tasks.get(task) {
            self.scratch.ended.push(Output::TaskEnded {
                task: task.to_owned(),
                state: t.state.as_str(),
                detail: match &t.outcome {
                    Some(o) if t.state == State::Completed => format!("exit code {}", o.exit_code),
                    _ => t.error.clone(),
                },
            });
        }
        self.tasks.finished.push_back(task.to_owned());
        while self.tasks.finished.len() > self.config.task_retention.max(1) {
            if let Some(old) = self.tasks.finished.pop_front()
                && let Some(t) = self.tasks.tasks.remove(&old)
                && let Some(o) = &t.outcome
                && !t.output_expired
            {
                self.tasks.output_bytes -= (o.stdout.len() + o.stderr.len()) as u64;
            }
        }
        let budget = self.config.task_output_budget;
        let mut i = 0;
        while self.tasks.output_bytes > budget && i < self.tasks.finished.len() {
            let id = self.tasks.finished[i].clone();
            i += 1;
            if let Some(t) = self.tasks.tasks.get_mut(&id)
                && !t.output_expired
                && let Some(o) = &mut t.outcome
            {
                self.tasks.output_bytes -= (o.stdout.len() + o.stderr.len()) as u64;
                o.stdout = Vec::new();
                o.stderr = Vec::new();
                t.output_expired = true;
            }
        }
    }

    fn end_relationship(&mut self, worker: &str, why: &str) {
        if self.tasks.workers.remove(worker).is_none() {
            return;
        }
        self.scratch.free_index = None;
        let held: Vec<(String, u32)> = self
            .tasks
            .tasks
            .iter()
            .filter_map(|(id, t)| t.current.as_ref().filter(|a| a.worker == worker).map(|a| (id.clone(), a.n)))
            .collect();
        for (id, n) in held {
            self.attempt_lost(&id, n, why);
        }
    }

    /// A node left the state for good (gone past retention): so does its relationship.
    pub(super) fn forget_worker(&mut self, node: &str) {
        self.end_relationship(node, "the worker was forgotten");
    }

    /// The task plane's time rules and placement; run on every full settle.
    pub(super) fn settle_tasks(&mut self, out: &mut Vec<Output>) {
        let now = self.now_ms;
        if now < self.scratch.task_due_ms {
            // Nothing can be due: skip the O(tasks) scan.
            self.place(out);
            return;
        }
        self.scratch.task_due_ms = i64::MAX;
        // Attempts past their deadline, or on a worker gone for too long.
        let mut overdue = Vec::new();
        let mut lost = Vec::new();
        for (id, t) in &self.tasks.tasks {
            let Some(a) = &t.current else { continue };
            match self.lost_at(a) {
                Some(at) if now >= at => lost.push((id.clone(), a.n)),
                Some(_) => {}
                None if now >= self.overdue_at(t, a) => overdue.push((id.clone(), a.n, a.worker.clone())),
                None => {}
            }
        }
        for (id, n) in lost {
            self.attempt_lost(&id, n, "the worker is gone");
        }
        for (id, n, worker) in overdue {
            self.tasks.counters.timeouts += 1;
            self.abort_stale(&worker, v1::TaskId { id: id.clone(), attempt: n }, out);
            self.finish_attempt(&id, "error: timed out", "overran its timeout; aborted by the manager".into());
            self.retry_or_fail(&id, "timed out: aborted by the manager".into());
        }
        let next = self.scan_task_deadline();
        self.scratch.task_due_ms = self.scratch.task_due_ms.min(next.unwrap_or(i64::MAX));
        self.place(out);
    }

    /// The workers with free cores, by (free cores, id): a cache of `workers`, rebuilt
    /// when unknown and kept up to date by `reserve` and `release`.
    fn free_index(&mut self) -> &mut BTreeSet<(u32, String)> {
        let workers = &self.tasks.workers;
        self.scratch.free_index.get_or_insert_with(|| {
            workers
                .iter()
                .filter(|(_, w)| w.used_cores < w.cores)
                .map(|(id, w)| (w.cores - w.used_cores, id.clone()))
                .collect()
        })
    }

    /// Changes a worker's reservation, keeping the free index in step.
    fn reserve(&mut self, worker: &str, cores: i64, mem: i64) {
        let Some(w) = self.tasks.workers.get_mut(worker) else { return };
        let before = w.cores.saturating_sub(w.used_cores);
        w.used_cores = (i64::from(w.used_cores) + cores).clamp(0, i64::from(u32::MAX)) as u32;
        w.used_memory_mb = (w.used_memory_mb as i64 + mem).max(0) as u64;
        let after = w.cores.saturating_sub(w.used_cores);
        if before != after
            && let Some(index) = self.scratch.free_index.as_mut()
        {
            index.remove(&(before, worker.to_owned()));
            if after > 0 {
                index.insert((after, worker.to_owned()));
            }
        }
    }

    /// The online worker with the most free cores that fits `t` (memory, labels, not
    /// refused), ties broken by id: O(log workers) when the best candidates fit.
    fn pick_worker(&mut self, t_id: &str) -> Option<String> {
        self.tasks.tasks.get(t_id)?;
        let mut index = std::mem::take(self.free_index());
        let t = &self.tasks.tasks[t_id];
        let mut stale = Vec::new();
        let mut found = None;
        for (free, w) in index.iter().rev() {
            if *free < t.spec.cores {
                break;
            }
            let Some(rel) = self.tasks.workers.get(w) else {
                stale.push((*free, w.clone()));
                continue;
            };
            if t.refused_by.contains(w)
                || rel.memory_mb.saturating_sub(rel.used_memory_mb) < t.spec.memory_mb
                || !matches_labels(&t.spec.labels, &rel.labels)
                || self.nodes.get(w).is_none_or(|n| n.session.is_none())
            {
                continue;
            }
            found = Some(w.clone());
            break;
        }
        for k in stale {
            index.remove(&k);
        }
        self.scratch.free_index = Some(index);
        found
    }

    /// Why no registered worker would ever take `t` now: none is registered, none could
    /// run it (cores, memory, labels, allowed jobs), or every one that could refused it.
    fn why_unplaceable(&self, t: &Task) -> Option<String> {
        if self.tasks.workers.is_empty() {
            return Some("no worker is registered".into());
        }
        let mut reasons = self.tasks.why_none_takes(&t.spec, &t.refused_by)?;
        let refusal = t.history.iter().rev().find(|h| h.outcome == "refused").map(|h| h.detail.clone());
        if let Some(r) = refusal.filter(|_| !t.refused_by.is_empty()) {
            reasons.insert(format!("refused: {r}"));
        }
        Some(format!("no worker can take it ({})", reasons.into_iter().collect::<Vec<_>>().join("; ")))
    }

    /// Marks or clears `id` as unplaceable; fails it once it has been so for
    /// `unplaceable_after_ms`. Returns whether it failed.
    fn check_placeable(&mut self, id: &str, key: (i64, u64)) -> bool {
        let now = self.now_ms;
        let after = self.config.unplaceable_after_ms;
        let Some(t) = self.tasks.tasks.get(id) else { return false };
        let why = self.why_unplaceable(t);
        let Some(t) = self.tasks.tasks.get_mut(id) else { return false };
        let Some(why) = why else {
            t.unplaceable_since_ms = None;
            return false;
        };
        let since = *t.unplaceable_since_ms.get_or_insert(now);
        if now - since < after {
            self.scratch.task_due_ms = self.scratch.task_due_ms.min(since + after);
            return false;
        }
        t.state = State::Failed;
        t.finished_ms = now;
        t.error = format!("unplaceable for {} s: {why}", after / 1000);
        self.tasks.queue.remove(&key);
        self.tasks.counters.failed += 1;
        self.tasks.counters.unplaceable += 1;
        self.retire(id);
        true
    }

    /// Places queued tasks on workers with room, highest priority first.
    fn place(&mut self, out: &mut Vec<Output>) {
        if self.tasks.queue.is_empty() {
            return;
        }
        if self.tasks.workers.is_empty() {
            // Nobody to place on: the window at the queue's head is timed as unplaceable.
            let head: Vec<((i64, u64), String)> =
                self.tasks.queue.iter().take(MAX_MISSES).map(|(k, v)| (*k, v.clone())).collect();
            for (key, id) in head {
                self.check_placeable(&id, key);
            }
            return;
        }
        if self.free_index().is_empty() {
            return;
        }
        let now = self.now_ms;
        let mut misses = 0;
        let mut cursor: Option<(i64, u64)> = None;
        loop {
            if misses >= MAX_MISSES || self.free_index().is_empty() {
                break;
            }
            let next = match cursor {
                None => self.tasks.queue.iter().next(),
                Some(c) => self.tasks.queue.range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded)).next(),
            };
            let Some((key, id)) = next.map(|(k, v)| (*k, v.clone())) else { break };
            cursor = Some(key);
            let Some(t) = self.tasks.tasks.get(&id) else {
                self.tasks.queue.remove(&key);
                continue;
            };
            if t.not_before_ms > now {
                misses += 1;
                continue;
            }
            let Some(worker) = self.pick_worker(&id) else {
                misses += 1;
                if self.check_placeable(&id, key) {
                    continue;
                }
                // Every worker refused it: let them be asked again after a growing pause.
                if let Some(t) = self.tasks.tasks.get_mut(&id)
                    && !t.refused_by.is_empty()
                    && self.tasks.workers.keys().all(|w| t.refused_by.contains(w))
                {
                    t.refused_by.clear();
                    let wait = (REASK_MIN_MS << t.reasks.min(8)).min(REASK_MAX_MS);
                    t.reasks += 1;
                    t.not_before_ms = now + wait;
                    self.scratch.task_due_ms = self.scratch.task_due_ms.min(now + wait);
                }
                continue;
            };
            misses = 0;
            self.tasks.queue.remove(&key);
            self.dispatch(&id, &worker, out);
        }
    }

    fn dispatch(&mut self, id: &str, worker: &str, out: &mut Vec<Output>) {
        let now = self.now_ms;
        let Some(t) = self.tasks.tasks.get_mut(id) else { return };
        t.last_attempt += 1;
        t.attempts += 1;
        t.state = State::Running;
        let n = t.last_attempt;
        let spec = v1::TaskSpec {
            task: Some(v1::TaskId { id: id.to_owned(), attempt: n }),
            job_addr: t.spec.job_addr.clone(),
            args: t.spec.args.clone(),
            env: t.spec.env.clone().into_iter().collect(),
            timeout_ms: t.spec.timeout_ms,
            cores: t.spec.cores,
            memory_mb: t.spec.memory_mb,
            sha256: t.spec.sha256.clone(),
        };
        let (cores, mem) = (t.spec.cores, t.spec.memory_mb);
        self.reserve(worker, i64::from(cores), mem as i64);
        self.tasks.counters.dispatched += 1;
        let request = self.task_request(worker, id, v1::TasksExecuteV1Req { tasks: vec![spec] }, out);
        let a = Attempt { n, worker: worker.to_owned(), dispatched_ms: now, started_ms: None, request };
        if let Some(t) = self.tasks.tasks.get(id) {
            let due = self.overdue_at(t, &a);
            self.scratch.task_due_ms = self.scratch.task_due_ms.min(due);
        }
        if let Some(t) = self.tasks.tasks.get_mut(id) {
            t.current = Some(a);
        }
    }

    /// Attempts are not judged before returning workers had their chance after a
    /// controller restart.
    fn judged_from(&self) -> i64 {
        self.tasks.restarted_at_ms + self.config.rejoin_grace_ms
    }

    /// When an attempt on a worker that is offline counts as lost (`None`: the worker
    /// is online).
    fn lost_at(&self, a: &Attempt) -> Option<i64> {
        let n = self.nodes.get(&a.worker);
        if n.is_some_and(|n| n.session.is_some()) {
            return None;
        }
        let gone = n.and_then(|n| n.gone_at_ms).unwrap_or(a.dispatched_ms);
        Some(gone.max(a.dispatched_ms).max(self.judged_from()) + self.config.worker_grace_ms)
    }

    /// When the manager gives up on a running attempt and aborts it.
    fn overdue_at(&self, t: &Task, a: &Attempt) -> i64 {
        let from = a.started_ms.unwrap_or(a.dispatched_ms).max(self.judged_from());
        from + t.spec.timeout_ms as i64 + self.config.task_grace_ms
    }

    /// The earliest time a task rule can fire, as cached by the last scan (never later
    /// than the truth: every change that can bring a deadline earlier lowers it).
    pub(super) fn task_deadline(&self) -> Option<i64> {
        match self.scratch.task_due_ms {
            i64::MAX => None,
            d => Some(d),
        }
    }

    /// The earliest time a task rule can fire (attempt deadlines, lost workers, backoff):
    /// O(tasks in flight + a window of the queue).
    fn scan_task_deadline(&self) -> Option<i64> {
        let mut d: Option<i64> = None;
        let mut at = |t: i64| d = Some(d.map_or(t, |x: i64| x.min(t)));
        for t in self.tasks.tasks.values() {
            if let Some(a) = &t.current {
                match self.lost_at(a) {
                    Some(l) => at(l),
                    None => at(self.overdue_at(t, a)),
                }
            }
        }
        if !self.tasks.queue.is_empty() {
            for id in self.tasks.queue.values().take(MAX_MISSES) {
                if let Some(t) = self.tasks.tasks.get(id) {
                    if t.not_before_ms > self.now_ms {
                        at(t.not_before_ms);
                    }
                    if let Some(since) = t.unplaceable_since_ms {
                        at(since + self.config.unplaceable_after_ms);
                    }
                }
            }
        }
        d
    }

    /// Task commands from the CLI. Returns `None` when the payload is not one.
    pub(super) fn task_command(&mut self, payload: &Payload) -> Option<Payload> {
        Some(match payload {
            Payload::ControllerTaskRunV1Req(r) => match Spec::from_request(r.clone()).and_then(|spec| {
                // With workers registered, a task none of them could ever run is refused
                // now, with why, rather than queued to wait forever.
                match self.tasks.why_none_takes(&spec, &BTreeSet::new()) {
                    Some(why) if !why.is_empty() => Err(format!(
                        "no registered worker could run it: {}",
                        why.into_iter().collect::<Vec<_>>().join("; ")
                    )),
                    _ => Ok(spec),
                }
            }) {
                Ok(spec) => {
                    self.tasks.next_task += 1;
                    let seq = self.tasks.next_task;
                    let id = format!("t{seq}");
                    self.tasks.queue.insert((-i64::from(spec.priority), seq), id.clone());
                    self.tasks.tasks.insert(
                        id.clone(),
                        Task {
                            spec,
                            state: State::Queued,
                            seq,
                            submitted_ms: self.now_ms,
                            finished_ms: 0,
                            attempts: 0,
                            last_attempt: 0,
                            not_before_ms: 0,
                            current: None,
                            history: Vec::new(),
                            refused_by: BTreeSet::new(),
                            outcome: None,
                            output_expired: false,
                            error: String::new(),
                            unplaceable_since_ms: None,
                            reasks: 0,
                        },
                    );
                    self.tasks.counters.submitted += 1;
                    v1::ControllerTaskRunV1Reply { task_id: id }.into()
                }
                Err(reason) => v1::UnknownCommandV1Notify {
                    type_url: drover_proto::type_url::<v1::ControllerTaskRunV1Req>(),
                    reason: format!("task refused: {reason}"),
                }
                .into(),
            },
            Payload::ControllerTaskListV1Req(r) => {
                let limit = if r.limit == 0 { 1000 } else { r.limit as usize };
                let mut tasks: Vec<(&String, &Task)> = self
                    .tasks
                    .tasks
                    .iter()
                    .filter(|(_, t)| r.state.is_empty() || t.state.as_str() == r.state)
                    .collect();
                tasks.sort_by_key(|(_, t)| std::cmp::Reverse(t.seq));
                let g = self.tasks.gauges();
                v1::ControllerTaskListV1Reply {
                    tasks: tasks.into_iter().take(limit).map(|(id, t)| t.info(id)).collect(),
                    counts: Some(v1::TaskCounts {
                        queued: g.queued,
                        running: g.running,
                        completed: g.done,
                        failed: self.tasks.tasks.values().filter(|t| t.state == State::Failed).count() as u64,
                        aborted: self.tasks.tasks.values().filter(|t| t.state == State::Aborted).count() as u64,
                    }),
                }
                .into()
            }
            Payload::ControllerTaskStatusV1Req(r) => {
                v1::ControllerTaskStatusV1Reply { task: self.tasks.tasks.get(&r.id).map(|t| t.info(&r.id)) }.into()
            }
            Payload::ControllerTaskLogsV1Req(r) => match self.tasks.tasks.get(&r.id) {
                None => {
                    v1::ControllerTaskLogsV1Reply { found: false, outcome: None, note: "no such task".into() }.into()
                }
                Some(t) => {
                    let note = match (t.state, t.output_expired) {
                        (State::Completed, true) => "the output was dropped to stay within the output budget".into(),
                        (State::Completed, false) => String::new(),
                        (state, _) => format!(
                            "the task is {}{}",
                            state.as_str(),
                            if t.error.is_empty() { String::new() } else { format!(": {}", t.error) }
                        ),
                    };
                    let outcome = t.outcome.as_ref().map(|o| v1::TaskOutcome {
                        exit_code: o.exit_code,
                        stdout: o.stdout.clone(),
                        stderr: o.stderr.clone(),
                        stdout_truncated: o.stdout_truncated,
                        stderr_truncated: o.stderr_truncated,
                        started_at_ms: o.started_ms,
                        finished_at_ms: o.finished_ms,
                    });
                    v1::ControllerTaskLogsV1Reply { found: true, outcome, note }.into()
                }
            },
            _ => return None,
        })
    }

    /// `ControllerTaskAbortV1Req`: a queued task is dropped, a running one is told to
    /// stop on its worker.
    pub(super) fn task_abort(&mut self, id: &str, out: &mut Vec<Output>) -> v1::ControllerTaskAbortV1Reply {
        let now = self.now_ms;
        let Some(t) = self.tasks.tasks.get(id) else {
            return v1::ControllerTaskAbortV1Reply { aborted: false, state: "unknown".into() };
        };
        match t.state {
            State::Queued | State::Running => {}
            s => return v1::ControllerTaskAbortV1Reply { aborted: false, state: s.as_str().into() },
        }
        if let Some(a) = t.current.clone() {
            self.abort_stale(&a.worker, v1::TaskId { id: id.to_owned(), attempt: a.n }, out);
            self.finish_attempt(id, "aborted", "aborted by an operator".into());
        }
        self.tasks.queue.retain(|_, q| q != id);
        if let Some(t) = self.tasks.tasks.get_mut(id) {
            t.state = State::Aborted;
            t.finished_ms = now;
            t.error = "aborted by an operator".into();
        }
        self.tasks.counters.aborted += 1;
        self.retire(id);
        v1::ControllerTaskAbortV1Reply { aborted: true, state: "aborted".into() }
    }
}
