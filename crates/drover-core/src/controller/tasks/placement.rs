//! Placement and the task plane's time rules: the free-cores index, picking a worker,
//! dispatching attempts, tasks no worker can take, and the deadlines (overdue and lost
//! attempts, backoff, unplaceable) that `settle_tasks` enforces.

use super::*;

impl Work<'_> {
    /// The task plane's time rules and placement; run on every full settle.
    pub(in crate::controller) fn settle_tasks(&mut self, out: &mut Vec<Output>) {
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
    pub(super) fn free_index(&mut self) -> &mut BTreeSet<(u32, String)> {
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
    pub(super) fn reserve(&mut self, worker: &str, cores: i64, mem: i64) {
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
    pub(super) fn pick_worker(&mut self, t_id: &str) -> Option<String> {
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
    pub(super) fn why_unplaceable(&self, t: &Task) -> Option<String> {
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
    pub(super) fn check_placeable(&mut self, id: &str, key: (i64, u64)) -> bool {
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
    pub(super) fn place(&mut self, out: &mut Vec<Output>) {
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

    pub(super) fn dispatch(&mut self, id: &str, worker: &str, out: &mut Vec<Output>) {
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
    pub(super) fn judged_from(&self) -> i64 {
        self.tasks.restarted_at_ms + self.config.rejoin_grace_ms
    }

    /// When an attempt on a worker that is offline counts as lost (`None`: the worker
    /// is online).
    pub(super) fn lost_at(&self, a: &Attempt) -> Option<i64> {
        let n = self.nodes.get(&a.worker);
        if n.is_some_and(|n| n.session.is_some()) {
            return None;
        }
        let gone = n.and_then(|n| n.gone_at_ms).unwrap_or(a.dispatched_ms);
        Some(gone.max(a.dispatched_ms).max(self.judged_from()) + self.config.worker_grace_ms)
    }

    /// When the manager gives up on a running attempt and aborts it.
    pub(super) fn overdue_at(&self, t: &Task, a: &Attempt) -> i64 {
        let from = a.started_ms.unwrap_or(a.dispatched_ms).max(self.judged_from());
        from + t.spec.timeout_ms as i64 + self.config.task_grace_ms
    }

    /// The earliest time a task rule can fire (attempt deadlines, lost workers, backoff):
    /// O(tasks in flight + a window of the queue).
    pub(super) fn scan_task_deadline(&self) -> Option<i64> {
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
}
