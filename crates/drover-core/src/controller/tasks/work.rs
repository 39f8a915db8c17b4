//! The task plane's conversation with workers and operators: the seed-2 messages a
//! worker sends (relationship, reports, answers to our requests), the attempts they
//! move forward (started, failed, completed, lost, retried), retention of finished
//! tasks, and the operator's task commands.

use super::*;

impl Work<'_> {
    pub(super) fn task_reply(&self, from: &From<'_>, payload: impl Into<Payload>) -> Output {
        Controller::reply_to_node(from.node, from.session, from.request_id.clone(), payload)
    }

    /// Sends a request to a worker; returns its request id (`None`: the worker is offline).
    pub(super) fn task_request(
        &mut self,
        worker: &str,
        task: &str,
        payload: impl Into<Payload>,
        out: &mut Vec<Output>,
    ) -> Option<String> {
        let session = self.nodes.get(worker).and_then(|n| n.session)?;
        *self.next_request += 1;
        let request_id = format!("m{}", *self.next_request);
        self.tasks.requests.insert(request_id.clone(), (worker.to_owned(), task.to_owned()));
        out.push(Output::ToNode {
            node: worker.to_owned(),
            session,
            msg: v1::StreamToNode {
                from_uuid: None,
                command: Some(any_of(payload)),
                request_id: request_id.clone(),
                fence: None,
            },
        });
        Some(request_id)
    }

    /// Handles a seed-2 message from a node. Returns `false` if the payload is not one.
    pub(in crate::controller) fn task_message(
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

    pub(super) fn answer(&mut self, node: &str, task: &str, payload: &Payload, out: &mut Vec<Output>) {
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
    pub(super) fn reconcile(&mut self, worker: &str, out: &mut Vec<Output>) {
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
    pub(super) fn current_on(&mut self, worker: &str, id: &v1::TaskId) -> Option<&mut Task> {
        self.tasks
            .tasks
            .get_mut(&id.id)
            .filter(|t| t.current.as_ref().is_some_and(|a| a.n == id.attempt && a.worker == worker))
    }

    /// Returns `false` when the attempt is not current (the caller aborts it).
    pub(super) fn attempt_started(&mut self, worker: &str, id: &v1::TaskId, _worker_clock_ms: i64) -> bool {
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

    pub(super) fn abort_stale(&mut self, worker: &str, id: v1::TaskId, out: &mut Vec<Output>) {
        let _ = self.task_request(worker, &id.id.clone(), v1::TasksAbortV1Req { tasks: vec![id] }, out);
    }

    pub(super) fn finish_attempt(&mut self, task: &str, outcome: &str, detail: String) -> Option<(String, u32, u64)> {
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

    pub(super) fn attempt_error(&mut self, worker: &str, id: &v1::TaskId, kind: i32, message: &str) {
        if self.current_on(worker, id).is_none() {
            return;
        }
        let what = kind_name(kind);
        self.finish_attempt(&id.id, &format!("error: {what}"), message.to_owned());
        self.retry_or_fail(&id.id, format!("{what}: {message}"));
    }

    pub(super) fn attempt_completed(&mut self, worker: &str, id: &v1::TaskId, o: v1::TaskOutcome) {
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
    pub(super) fn attempt_lost(&mut self, task: &str, attempt: u32, why: &str) {
        if self.tasks.tasks.get(task).is_none_or(|t| t.current.as_ref().is_none_or(|a| a.n != attempt)) {
            return;
        }
        self.finish_attempt(task, "lost", why.to_owned());
        self.retry_or_fail(task, format!("lost: {why}"));
    }

    pub(super) fn retry_or_fail(&mut self, task: &str, error: String) {
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

    pub(super) fn requeue(&mut self, task: &str, delay_ms: i64) {
        let now = self.now_ms;
        let Some(t) = self.tasks.tasks.get_mut(task) else { return };
        t.state = State::Queued;
        t.not_before_ms = now + delay_ms;
        if delay_ms > 0 {
            self.scratch.task_due_ms = self.scratch.task_due_ms.min(now + delay_ms);
        }
        self.tasks.queue.insert((-i64::from(t.spec.priority), t.seq), task.to_owned());
    }

    pub(super) fn release(&mut self, worker: &str, cores: u32, mem: u64) {
        self.reserve(worker, -i64::from(cores), -(mem as i64));
    }

    /// A finished task joins the retention queue; the oldest are forgotten and the
    /// oldest outputs dropped to stay within the limits.
    pub(super) fn retire(&mut self, task: &str) {
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

    pub(super) fn end_relationship(&mut self, worker: &str, why: &str) {
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
    pub(in crate::controller) fn forget_worker(&mut self, node: &str) {
        self.end_relationship(node, "the worker was forgotten");
    }

    /// Task commands from the CLI. Returns `None` when the payload is not one.
    pub(in crate::controller) fn task_command(&mut self, payload: &Payload) -> Option<Payload> {
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
    pub(in crate::controller) fn task_abort(
        &mut self,
        id: &str,
        out: &mut Vec<Output>,
    ) -> v1::ControllerTaskAbortV1Reply {
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
