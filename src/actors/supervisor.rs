//! The Supervisor: admits queued jobs, spawns one SandboxActor per admitted job, restarts an actor
//! that crashed (at most N times in T, with exponential backoff; past that the job fails and its VM
//! is destroyed), routes cancels, runs the reconciler, and on shutdown suspends every actor at a
//! point it can resume from.
//!
//! Admission, one round at a time: queued jobs whose deadline has passed time out; then the
//! ResourceGovernor is asked which of the queue's first jobs may start (FIFO: once the head waits,
//! nothing overtakes it), and those start, up to `admission.max_concurrent`. A round runs when a
//! job is submitted, an actor exits, the reconciler ran, or the governor says conditions changed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::governor::{self, Ask, Candidate, QueuedDeadline, ResourceGovernor};
use super::lifecycle::{self, Signals};
use super::reconciler;
use super::sandbox::{Exit, SandboxActor, SandboxExited};
use super::Services;
use crate::governor::policy::Demand;
use crate::model::{sandbox_name_for, JobStatus};
use crate::store::StoreError;

/// How many of the queue's first jobs one admission round considers at most.
const HEAD_MAX: usize = 64;

#[derive(Debug)]
struct Running {
    signals: Arc<Signals>,
    /// Crash times inside the restart window.
    crashes: VecDeque<Instant>,
    /// Set while a restart waits out its backoff.
    restarting: bool,
}

#[derive(Debug)]
pub struct Supervisor {
    svc: Arc<Services>,
    governor: Option<Addr<ResourceGovernor>>,
    running: HashMap<String, Running>,
    admitting: bool,
    admit_again: bool,
    shutting_down: bool,
    drained: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// Look at the queue: a job was submitted or a slot came free.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Admit;

/// End a job: a running one through its actor (which destroys the VM), a queued one at once.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct CancelJob {
    pub job_id: String,
    pub status: JobStatus,
    pub reason: String,
}

/// Compare the store with the backend and repair the difference.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Reconcile;

/// Stop admitting and suspend every actor; resolves when none runs.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// How many jobs have a live actor.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct RunningCount;

impl Supervisor {
    pub fn new(svc: Arc<Services>) -> Self {
        Supervisor {
            svc,
            governor: None,
            running: HashMap::new(),
            admitting: false,
            admit_again: false,
            shutting_down: false,
            drained: Vec::new(),
        }
    }

    /// Admission asks this governor; without one, jobs start up to `max_concurrent`.
    pub fn with_governor(mut self, governor: Addr<ResourceGovernor>) -> Self {
        self.governor = Some(governor);
        self
    }

    /// Starts the one actor a job may have. Admission and the reconciler can both find the same
    /// job RUNNING without an actor (admission marks it in the store before spawning), so a job
    /// that already has a live actor is left alone; only a restart waiting out its backoff respawns.
    fn spawn_actor(&mut self, job_id: String, ctx: &mut Context<Self>) {
        let signals = match self.running.get_mut(&job_id) {
            Some(entry) if !entry.restarting => return,
            Some(entry) => {
                entry.restarting = false;
                Arc::clone(&entry.signals)
            }
            None => {
                let signals = Arc::new(Signals::default());
                self.running.insert(
                    job_id.clone(),
                    Running {
                        signals: Arc::clone(&signals),
                        crashes: VecDeque::new(),
                        restarting: false,
                    },
                );
                signals
            }
        };
        if self.shutting_down {
            signals.suspend();
        }
        SandboxActor::new(
            Arc::clone(&self.svc),
            job_id,
            signals,
            ctx.address().recipient(),
        )
        .start();
    }

    fn admit(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        if self.admitting {
            self.admit_again = true;
            return;
        }
        self.admitting = true;
        let limit = self.svc.tuning.get().admission.max_concurrent as usize;
        let free = limit.saturating_sub(self.running.len());
        let round = admission_round(Arc::clone(&self.svc), self.governor.clone(), free);
        ctx.spawn(round.into_actor(self).map(|result, supervisor, ctx| {
            supervisor.admitting = false;
            match result {
                Ok(round) => {
                    for job_id in round.started {
                        tracing::info!(job = %job_id, "admitted");
                        supervisor.spawn_actor(job_id, ctx);
                    }
                    supervisor.admit_again |= round.again;
                }
                Err(err) => tracing::error!(%err, "admission failed on the store"),
            }
            if std::mem::take(&mut supervisor.admit_again) {
                supervisor.admit(ctx);
            }
        }));
    }

    fn on_crash(&mut self, job_id: String, why: String, ctx: &mut Context<Self>) {
        let policy = self.svc.tuning.get().restart.clone();
        let Some(entry) = self.running.get_mut(&job_id) else {
            return;
        };
        let now = Instant::now();
        while entry
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            entry.crashes.pop_front();
        }
        entry.crashes.push_back(now);
        let crashes = u32::try_from(entry.crashes.len()).unwrap_or(u32::MAX);
        if crashes > policy.max_restarts {
            tracing::error!(job = %job_id, crashes, "sandbox actor crashed past the restart limit");
            self.svc
                .metrics
                .actor_restarts
                .with_label_values(&["gave_up"])
                .inc();
            self.running.remove(&job_id);
            let svc = Arc::clone(&self.svc);
            let reason = format!("sandbox actor crashed {crashes} times ({why}); gave up");
            ctx.spawn(
                async move {
                    if let Err(err) = lifecycle::teardown(&svc, &job_id, JobStatus::Failed, &reason).await {
                        tracing::error!(job = %job_id, %err, "teardown after repeated crashes failed");
                    }
                }
                .into_actor(self)
                .map(|(), supervisor, ctx| supervisor.admit(ctx)),
            );
            return;
        }
        entry.restarting = true;
        let delay = policy.backoff(crashes);
        tracing::warn!(job = %job_id, crashes, ?delay, %why, "restarting sandbox actor");
        self.svc
            .metrics
            .actor_restarts
            .with_label_values(&["restarted"])
            .inc();
        let svc = Arc::clone(&self.svc);
        let id = job_id.clone();
        let message = format!("sandbox actor crashed ({why}); restart {crashes} in {delay:?}");
        ctx.spawn(
            async move {
                let recorded = svc
                    .store
                    .call(move |s| {
                        s.add_restart(&id)?;
                        s.add_event(&id, "restart", None, &message)
                    })
                    .await;
                match recorded {
                    Ok(event) => svc.hub.publish(event),
                    Err(err) => tracing::error!(%err, "recording a restart failed"),
                }
                tokio::time::sleep(delay).await;
            }
            .into_actor(self)
            .map(move |(), supervisor, ctx| {
                if supervisor.running.contains_key(&job_id) {
                    supervisor.spawn_actor(job_id, ctx);
                }
            }),
        );
    }

    fn schedule_reconcile(&self, ctx: &mut Context<Self>) {
        let every = self.svc.tuning.get().intervals.reconcile;
        ctx.run_later(every, |supervisor, ctx| {
            ctx.notify(Reconcile);
            supervisor.schedule_reconcile(ctx);
        });
    }

    fn check_drained(&mut self) {
        if self.shutting_down && self.running.is_empty() {
            for waiter in self.drained.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Start-up reconciliation resumes RUNNING jobs before anything new is admitted.
        ctx.notify(Reconcile);
        self.schedule_reconcile(ctx);
    }
}

/// What one admission round did.
#[derive(Debug, Default)]
struct Round {
    started: Vec<String>,
    /// The head was failed (it can never fit): look at the queue again at once.
    again: bool,
}

/// Expires overdue queued jobs, asks the governor about the queue's head, and starts what it
/// admits; fails a head that can never fit and jobs whose deadline predictably passes.
async fn admission_round(
    svc: Arc<Services>,
    governor: Option<Addr<ResourceGovernor>>,
    free: usize,
) -> Result<Round, StoreError> {
    let now = svc.clock.now_ms();
    // At least the head, so the governor can say why it waits even with no slot free.
    let head_len = u32::try_from(free.clamp(1, HEAD_MAX)).unwrap_or(1);
    let (expired, view) = svc
        .store
        .call(move |s| Ok((s.expire_queued(now)?, s.admission_view(head_len)?)))
        .await?;
    if !expired.is_empty() {
        tracing::info!(
            jobs = expired.len(),
            "queued jobs timed out: deadline passed"
        );
    }
    svc.hub.publish_all(expired);
    let profiles = svc.profiles();
    let head: Vec<Candidate> = view
        .head
        .iter()
        .map(|job| Candidate {
            job_id: job.id.clone(),
            demand: profiles
                .get(&job.profile)
                .map(|p| crate::governor::effective(svc.backend.as_ref(), Demand::of(p))),
        })
        .collect();
    let answer = match governor {
        Some(governor) => {
            // One measurement for every VM; a failure keeps the governor's last one.
            let disk = match svc.backend.disk_usage().await {
                Ok(usage) => Some(usage),
                Err(err) => {
                    tracing::warn!(%err, "measuring sandbox disks failed; the last measurement stands");
                    None
                }
            };
            let ask = Ask {
                committed: crate::governor::tally(&view.holdings, &profiles, |d| {
                    crate::governor::effective(svc.backend.as_ref(), d)
                }),
                head: head.clone(),
                free,
                queue_length: view.queue_length,
                deadlines: view
                    .deadlines
                    .iter()
                    .filter_map(|job| {
                        Some(QueuedDeadline {
                            job_id: job.id.clone(),
                            position: job.position,
                            deadline_ms: job.deadline_ms?,
                        })
                    })
                    .collect(),
                now_ms: now,
                disk,
            };
            match governor.send(ask).await {
                Ok(answer) => answer,
                Err(err) => {
                    tracing::error!(%err, "the governor did not answer; admitting by max_concurrent alone");
                    governor::ungoverned(&head, free)
                }
            }
        }
        None => governor::ungoverned(&head, free),
    };
    if answer.admit.is_empty() && answer.never.is_none() && answer.doomed.is_empty() {
        return Ok(Round::default());
    }
    let (round, events) = svc
        .store
        .call(move |s| {
            let mut round = Round {
                // Everything looked at was admitted: there may be more behind.
                again: answer.admit.len() == head.len() && view.queue_length > head.len() as u64,
                ..Round::default()
            };
            let mut events = Vec::new();
            for id in answer.admit {
                if let Some(event) = s.start_job(&id, &sandbox_name_for(&id))? {
                    events.push(event);
                    round.started.push(id);
                }
            }
            if let Some((id, reason)) = answer.never {
                tracing::warn!(job = %id, %reason, "failing a queued job");
                events.extend(s.finish_job(&id, JobStatus::Failed, None, Some(&reason))?);
                round.again = true;
            }
            for (id, reason) in answer.doomed {
                tracing::info!(job = %id, %reason, "failing a queued job early");
                events.extend(s.finish_job(&id, JobStatus::Timeout, None, Some(&reason))?);
            }
            Ok((round, events))
        })
        .await?;
    svc.hub.publish_all(events);
    svc.metrics
        .governor
        .admitted
        .inc_by(round.started.len() as u64);
    Ok(round)
}

impl Handler<Admit> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: Admit, ctx: &mut Self::Context) {
        self.admit(ctx);
    }
}

impl Handler<SandboxExited> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: SandboxExited, ctx: &mut Self::Context) {
        match msg.exit {
            Exit::Crashed(why) if !self.shutting_down => self.on_crash(msg.job_id, why, ctx),
            _ => {
                self.running.remove(&msg.job_id);
                self.check_drained();
                self.admit(ctx);
            }
        }
    }
}

impl Handler<CancelJob> for Supervisor {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, msg: CancelJob, _: &mut Self::Context) -> Self::Result {
        if let Some(entry) = self.running.get(&msg.job_id) {
            entry.signals.cancel(msg.status, msg.reason);
            return Box::pin(async { Ok(true) });
        }
        let svc = Arc::clone(&self.svc);
        Box::pin(async move {
            let id = msg.job_id.clone();
            let job = svc.store.call(move |s| s.get_job(&id)).await?;
            match job.map(|j| j.status) {
                Some(JobStatus::Queued) => {
                    let (id, status, reason) = (msg.job_id.clone(), msg.status, msg.reason.clone());
                    let event = svc
                        .store
                        .call(move |s| s.finish_job(&id, status, None, Some(&reason)))
                        .await?;
                    let ended = event.is_some();
                    svc.hub.publish_all(event);
                    Ok(ended)
                }
                // RUNNING with no actor: between a restart and its resume. End it here.
                Some(JobStatus::Running) => {
                    if let Err(err) =
                        lifecycle::teardown(&svc, &msg.job_id, msg.status, &msg.reason).await
                    {
                        tracing::warn!(job = %msg.job_id, %err, "teardown on cancel failed");
                    }
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }
}

impl Handler<Reconcile> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: Reconcile, ctx: &mut Self::Context) {
        if self.shutting_down {
            return;
        }
        let svc = Arc::clone(&self.svc);
        let active: HashSet<String> = self.running.keys().cloned().collect();
        ctx.spawn(
            async move { reconciler::reconcile(&svc, &active).await }
                .into_actor(self)
                .map(|result, supervisor, ctx| {
                    match result {
                        Ok(report) => {
                            for job_id in report.resume {
                                if !supervisor.running.contains_key(&job_id) {
                                    tracing::info!(job = %job_id, "resuming job after restart");
                                    supervisor.spawn_actor(job_id, ctx);
                                }
                            }
                        }
                        Err(err) => tracing::error!(%err, "reconciliation failed"),
                    }
                    supervisor.admit(ctx);
                }),
        );
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        self.shutting_down = true;
        for entry in self.running.values() {
            entry.signals.suspend();
        }
        // Actors waiting out a restart backoff hold no VM operation: they can go at once.
        self.running.retain(|_, entry| !entry.restarting);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.drained.push(tx);
        self.check_drained();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<RunningCount> for Supervisor {
    type Result = usize;
    fn handle(&mut self, _: RunningCount, _: &mut Self::Context) -> usize {
        self.running.len()
    }
}
