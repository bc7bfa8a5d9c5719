//! The Supervisor: admits queued jobs, spawns one SandboxActor per admitted job, restarts an actor
//! that crashed (at most N times in T, with exponential backoff; past that the job fails and its VM
//! is destroyed), routes cancels, runs the reconciler, and on shutdown suspends every actor at a
//! point it can resume from.
//!
//! Admission, one round at a time: queued jobs whose deadline has passed time out; then the
//! ResourceGovernor is asked which of the queue's first jobs may start (FIFO: once the head waits,
//! nothing overtakes it), and those start, up to `admission.max_concurrent`. That limit is a hard
//! ceiling over every live VM the store knows (running jobs, kept sandboxes, sandboxes still being
//! destroyed, RUNNING jobs not yet resumed), not only over live actors. Nothing is admitted before
//! the start-up reconcile has run. A round runs when a job is submitted, an actor exits, the
//! reconciler ran, or the governor says conditions changed.
//!
//! Crashes are counted in the store, so the restart policy holds across daemon restarts: a job
//! found RUNNING at start-up that the last daemon did not suspend was interrupted by that
//! daemon's death and counts as a crash of its own. A job being torn down is never resumed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;

use super::governor::{self, Answer, Ask, Candidate, QueuedDeadline, ResourceGovernor};
use super::lifecycle::{self, Signals};
use super::pool::{PoolKeeper, Provision, StopBoots};
use super::pool_plan;
use super::reconciler;
use super::sandbox::{Exit, SandboxActor, SandboxExited};
use super::Services;
use crate::governor::policy::Demand;
use crate::model::{
    new_pool_sandbox_name, sandbox_name_for, JobStatus, PoolSandbox, SandboxState, StartMode,
};
use crate::store::{ClaimTerms, QueuedJob, StoreError};

/// How many of the queue's first jobs one admission round considers at most.
const HEAD_MAX: usize = 64;
/// How soon a failed start-up reconcile is tried again (admission waits for it).
const STARTUP_RECONCILE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug)]
struct Running {
    signals: Arc<Signals>,
    /// Set while a crash is recorded and a restart waits out its backoff.
    restarting: bool,
}

#[derive(Debug)]
pub struct Supervisor {
    svc: Arc<Services>,
    governor: Option<Addr<ResourceGovernor>>,
    pool: Option<Addr<PoolKeeper>>,
    running: HashMap<String, Running>,
    /// Jobs whose VM is being destroyed outside an actor: never resumed or respawned.
    tearing_down: HashSet<String>,
    /// The start-up reconcile has run: admission may begin.
    reconciled: bool,
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

/// Destroy a sandbox by request: a running job's through its actor (the job is cancelled), a
/// kept one or one whose destroy failed here. Err when it is already destroyed.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), DestroyRefused>")]
pub struct DestroySandbox {
    pub sandbox_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DestroyRefused {
    #[error("sandbox {0} does not exist")]
    Missing(String),
    #[error("sandbox {0} is already destroyed")]
    AlreadyDestroyed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether the start-up reconcile has run (admission waits for it).
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct IsReady;

impl Supervisor {
    pub fn new(svc: Arc<Services>) -> Self {
        Supervisor {
            svc,
            governor: None,
            pool: None,
            running: HashMap::new(),
            tearing_down: HashSet::new(),
            reconciled: false,
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

    pub fn with_pool(mut self, pool: Addr<PoolKeeper>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Starts the one actor a job may have. Admission and the reconciler can both find the same
    /// job RUNNING without an actor (admission marks it in the store before spawning), so a job
    /// that already has a live actor is left alone; only a restart waiting out its backoff respawns.
    fn spawn_actor(&mut self, job_id: String, ctx: &mut Context<Self>) {
        if self.tearing_down.contains(&job_id) {
            return;
        }
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
        if self.shutting_down || !self.reconciled {
            return;
        }
        if self.admitting {
            self.admit_again = true;
            return;
        }
        self.admitting = true;
        let limit = self.svc.tuning.get().admission.max_concurrent as usize;
        let slots = Slots {
            limit,
            actors: self.running.len() + self.tearing_down.len(),
        };
        let round = admission_round(
            Arc::clone(&self.svc),
            self.governor.clone(),
            self.pool.clone(),
            slots,
        );
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

    /// An actor died without finishing, or (at start-up) the last daemon died under the job.
    /// The crash is recorded in the store, and the restart policy counts the job's crashes there,
    /// so a crash loop ends even when each crash takes the daemon with it.
    fn on_crash(&mut self, job_id: String, why: String, ctx: &mut Context<Self>) {
        match self.running.get_mut(&job_id) {
            Some(entry) => entry.restarting = true,
            None => {
                self.running.insert(
                    job_id.clone(),
                    Running {
                        signals: Arc::new(Signals::default()),
                        restarting: true,
                    },
                );
            }
        }
        let policy = self.svc.tuning.get().restart.clone();
        let svc = Arc::clone(&self.svc);
        let id = job_id.clone();
        let reason = why.clone();
        let now = svc.clock.now_ms();
        let window_ms = i64::try_from(policy.window.as_millis()).unwrap_or(i64::MAX);
        let since = now.saturating_sub(window_ms);
        ctx.spawn(
            async move {
                svc.store
                    .call(move |s| s.record_crash(&id, now, &reason, since))
                    .await
            }
            .into_actor(self)
            .map(move |counted, supervisor, ctx| {
                let crashes = match counted {
                    Ok(crashes) => crashes,
                    Err(err) => {
                        // Without the history, count this crash alone rather than loop forever
                        // on a broken store: the next crash fails to record too and gives up.
                        tracing::error!(job = %job_id, %err, "recording a crash failed");
                        policy.max_restarts.saturating_add(1)
                    }
                };
                supervisor.after_crash(job_id, why, crashes, ctx);
            }),
        );
    }

    fn after_crash(&mut self, job_id: String, why: String, crashes: u32, ctx: &mut Context<Self>) {
        let policy = self.svc.tuning.get().restart.clone();
        if !self.running.contains_key(&job_id) {
            return;
        }
        if crashes > policy.max_restarts {
            tracing::error!(job = %job_id, crashes, "sandbox actor crashed past the restart limit");
            self.svc
                .metrics
                .actor_restarts
                .with_label_values(&["gave_up"])
                .inc();
            self.running.remove(&job_id);
            let reason = format!(
                "sandbox actor crashed {crashes} times in {} ({why}); gave up",
                humantime::format_duration(policy.window)
            );
            self.teardown(job_id, JobStatus::Failed, reason, ctx);
            return;
        }
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

    /// Ends a job that has no actor: destroys its VM and records the verdict. While it runs the
    /// job is neither resumed by the reconciler nor respawned.
    fn teardown(
        &mut self,
        job_id: String,
        status: JobStatus,
        reason: String,
        ctx: &mut Context<Self>,
    ) {
        if !self.tearing_down.insert(job_id.clone()) {
            return;
        }
        let svc = Arc::clone(&self.svc);
        let id = job_id.clone();
        ctx.spawn(
            async move {
                if let Err(err) = lifecycle::teardown(&svc, &id, status, &reason).await {
                    tracing::error!(job = %id, %err, "teardown failed");
                }
            }
            .into_actor(self)
            .map(move |(), supervisor, ctx| {
                supervisor.tearing_down.remove(&job_id);
                supervisor.check_drained();
                supervisor.admit(ctx);
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
        if self.shutting_down && self.running.is_empty() && self.tearing_down.is_empty() {
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
    /// Those of `started` that took a pool sandbox.
    hits: Vec<String>,
    /// The head was failed (it can never fit): look at the queue again at once.
    again: bool,
}

/// What `admission.max_concurrent` leaves room for.
#[derive(Debug, Clone, Copy)]
struct Slots {
    limit: usize,
    /// Live actors and teardowns in flight.
    actors: usize,
}

impl Slots {
    /// Free slots when the store holds `live` VMs (sandboxes not destroyed, and RUNNING jobs
    /// without a sandbox yet): the ceiling is over every live VM, whether an actor drives it or
    /// not (kept sandboxes, failed destroys, jobs not yet resumed).
    fn free(&self, live: usize) -> usize {
        self.limit.saturating_sub(live.max(self.actors))
    }
}

/// Expires overdue queued jobs, asks the governor about the queue's head, and starts what it
/// admits; fails a head that can never fit and jobs whose deadline predictably passes.
async fn admission_round(
    svc: Arc<Services>,
    governor: Option<Addr<ResourceGovernor>>,
    pool: Option<Addr<PoolKeeper>>,
    slots: Slots,
) -> Result<Round, StoreError> {
    let now = svc.clock.now_ms();
    let (expired, view) = svc
        .store
        .call(move |s| Ok((s.expire_queued(now)?, s.admission_view(HEAD_MAX as u32)?)))
        .await?;
    let free = slots.free(view.holdings.len());
    // At least the head, so the governor can say why it waits even with no slot free.
    let head_len = free.clamp(1, HEAD_MAX);
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
        .take(head_len)
        .map(|job| Candidate {
            job_id: job.id.clone(),
            demand: profiles
                .get(&job.profile)
                .map(|p| crate::governor::effective(svc.backend.as_ref(), Demand::of(p))),
            // A job that asked for a cold boot or a restore gets what it asked for.
            pool_profile: (job.start == StartMode::Auto).then(|| job.profile.clone()),
        })
        .collect();
    let tuning = svc.tuning.get();
    let plan = match pool {
        Some(_) => pool_plan::plan(
            &view.holdings,
            &tuning.pool,
            &profiles,
            now,
            |profile| svc.pool.may_refill(profile, now),
            |d| crate::governor::effective(svc.backend.as_ref(), d),
        ),
        None => pool_plan::PoolPlan::default(),
    };
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
                pool: plan.idle.clone(),
                refill: plan.refill.clone(),
            };
            match governor.send(ask).await {
                Ok(answer) => answer,
                Err(err) => {
                    tracing::error!(%err, "the governor did not answer; admitting by max_concurrent alone");
                    governor::ungoverned(&head, free, &plan.idle, &plan.refill)
                }
            }
        }
        None => governor::ungoverned(&head, free, &plan.idle, &plan.refill),
    };
    if let (Some(pool), false) = (&pool, answer.evict.is_empty()) {
        pool.do_send(super::pool::Evict(answer.evict.clone()));
    }
    for profile in tuning.pool.profiles.keys() {
        let wanted = plan.refill.iter().filter(|r| &r.profile == profile).count();
        let booted = answer.refill.iter().filter(|p| *p == profile).count();
        let why = (booted < wanted)
            .then(|| answer.refill_waits.clone())
            .flatten();
        svc.pool.refill_waits(profile, why);
    }
    if answer.admit.is_empty()
        && answer.never.is_none()
        && answer.doomed.is_empty()
        && answer.refill.is_empty()
    {
        return Ok(Round::default());
    }
    let boots = pool_rows(&svc, &answer.refill, &profiles);
    let claims = claim_terms(&svc, &view.head, &answer, &profiles, &tuning.pool, now);
    let pooled: Vec<String> = tuning
        .pool
        .profiles
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(p, _)| p.clone())
        .collect();
    let profile_of: HashMap<String, String> = view
        .head
        .iter()
        .map(|j| (j.id.clone(), j.profile.clone()))
        .collect();
    let rows = boots.clone();
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
                if let Some((profile, terms)) = claims.get(&id) {
                    match s.start_job_from_pool(&id, profile, terms)? {
                        Some(claim) => {
                            events.extend(claim.events);
                            round.started.push(id.clone());
                            round.hits.push(id);
                        }
                        // Taken for destroying since the round looked: the next round decides.
                        None => round.again = true,
                    }
                    continue;
                }
                if let Some(event) = s.start_job(&id, &sandbox_name_for(&id))? {
                    events.push(event);
                    round.started.push(id);
                }
            }
            s.insert_pool_sandboxes(&rows)?;
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
    for id in &round.started {
        let Some(profile) = profile_of.get(id).filter(|p| pooled.contains(p)) else {
            continue;
        };
        let hit = round.hits.contains(id);
        if hit {
            svc.pool.hit(profile);
        } else {
            svc.pool.miss(profile);
        }
        svc.metrics
            .pool_claims
            .with_label_values(&[profile.as_str(), if hit { "hit" } else { "miss" }])
            .inc();
    }
    if let (Some(pool), false) = (&pool, boots.is_empty()) {
        pool.do_send(Provision(boots));
    }
    Ok(round)
}

/// The BOOTING rows of the pool sandboxes a round decided to boot, written in the round's own
/// store call so that the next round's governor counts them at once.
fn pool_rows(
    svc: &Services,
    profiles_to_boot: &[String],
    profiles: &crate::config::profile::Profiles,
) -> Vec<PoolSandbox> {
    let now = svc.clock.now_ms();
    profiles_to_boot
        .iter()
        .filter_map(|name| {
            let profile = profiles.get(name)?;
            Some(PoolSandbox::booting(
                new_pool_sandbox_name(),
                name,
                svc.backend.kind().as_str(),
                (
                    profile.resources.cores,
                    profile.resources.memory_mb,
                    profile.storage.root_size_gb,
                ),
                now,
            ))
        })
        .collect()
}

/// For each admitted pool hit: its profile and what its sandbox row gets (the lease counted as
/// a fresh sandbox's would be, and only pool sandboxes younger than `max_idle`).
fn claim_terms(
    svc: &Services,
    head: &[QueuedJob],
    answer: &Answer,
    profiles: &crate::config::profile::Profiles,
    pool: &crate::config::pool::PoolTuning,
    now: i64,
) -> HashMap<String, (String, ClaimTerms)> {
    head.iter()
        .filter(|job| answer.hits.contains(&job.id))
        .filter_map(|job| {
            let profile = profiles.get(&job.profile)?;
            let ttl_minutes = job.ttl_minutes.unwrap_or(profile.ttl_minutes);
            let terms = ClaimTerms {
                keepalive: profile.keepalive,
                lease_expires_ms: svc
                    .clock
                    .now_ms()
                    .saturating_add(i64::from(ttl_minutes) * 60_000),
                ready_since_ms: pool_plan::ready_since_ms(pool, now),
            };
            Some((job.id.clone(), (job.profile.clone(), terms)))
        })
        .collect()
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
    type Result = ResponseActFuture<Self, Result<bool, StoreError>>;
    fn handle(&mut self, msg: CancelJob, _: &mut Self::Context) -> Self::Result {
        if let Some(entry) = self.running.get(&msg.job_id) {
            entry.signals.cancel(msg.status, msg.reason);
            return Box::pin(fut::ready(Ok(true)));
        }
        if self.tearing_down.contains(&msg.job_id) {
            return Box::pin(fut::ready(Ok(true)));
        }
        let svc = Arc::clone(&self.svc);
        let (job_id, status, reason) = (msg.job_id.clone(), msg.status, msg.reason.clone());
        let decided = async move {
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
                    Ok(CancelPath::Ended(ended))
                }
                // RUNNING with no actor: between a restart and its resume.
                Some(JobStatus::Running) => Ok(CancelPath::Teardown),
                _ => Ok(CancelPath::Ended(false)),
            }
        };
        Box::pin(decided.into_actor(self).map(
            move |path: Result<CancelPath, StoreError>, supervisor, ctx| {
                match path? {
                    CancelPath::Ended(ended) => Ok(ended),
                    CancelPath::Teardown => {
                        match supervisor.running.get(&job_id) {
                            // An actor was spawned meanwhile (a resume): it ends the job.
                            Some(entry) => entry.signals.cancel(status, reason),
                            None => supervisor.teardown(job_id, status, reason, ctx),
                        }
                        Ok(true)
                    }
                }
            },
        ))
    }
}

/// How a cancel of a job without an actor goes on.
enum CancelPath {
    /// Done in the store; whether the job ended by it.
    Ended(bool),
    /// RUNNING without an actor: the Supervisor tears it down.
    Teardown,
}

impl Handler<Reconcile> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: Reconcile, ctx: &mut Self::Context) {
        if self.shutting_down {
            return;
        }
        let svc = Arc::clone(&self.svc);
        let mut active: HashSet<String> = self.running.keys().cloned().collect();
        active.extend(self.tearing_down.iter().cloned());
        let startup = !self.reconciled;
        ctx.spawn(
            async move {
                if startup {
                    // Before the orphan pass: what the last daemon's pool left is settled here.
                    super::pool::settle_pool(&svc).await?;
                }
                let report = reconciler::reconcile(&svc, &active).await?;
                if !startup {
                    return Ok((report, Vec::new()));
                }
                // At start-up, a RUNNING job the last daemon did not suspend was interrupted by
                // its death: that counts as a crash of the job.
                let resume = report.resume.clone();
                let suspended = svc
                    .store
                    .call(move |s| {
                        resume
                            .into_iter()
                            .map(|id| Ok((s.take_suspended(&id)?, id)))
                            .collect::<Result<Vec<_>, StoreError>>()
                    })
                    .await?;
                Ok((report, suspended))
            }
            .into_actor(self)
            .map(move |result: Result<_, reconciler::ReconcileError>, supervisor, ctx| {
                match result {
                    Ok((report, suspended)) => {
                        let clean: HashSet<&str> = suspended
                            .iter()
                            .filter(|(was, _)| *was)
                            .map(|(_, id)| id.as_str())
                            .collect();
                        for job_id in report.resume {
                            if supervisor.running.contains_key(&job_id)
                                || supervisor.tearing_down.contains(&job_id)
                            {
                                continue;
                            }
                            if startup && !clean.contains(job_id.as_str()) {
                                tracing::warn!(job = %job_id, "the last daemon stopped under this job without suspending it");
                                supervisor.on_crash(
                                    job_id,
                                    "the daemon stopped while the job ran".into(),
                                    ctx,
                                );
                            } else {
                                tracing::info!(job = %job_id, "resuming job after restart");
                                supervisor.spawn_actor(job_id, ctx);
                            }
                        }
                        if startup {
                            tracing::info!("start-up reconcile done; admitting jobs");
                            supervisor.reconciled = true;
                            if let Some(pool) = &supervisor.pool {
                                pool.do_send(super::pool::Tidy);
                            }
                        }
                    }
                    Err(err) => {
                        tracing::error!(%err, "reconciliation failed");
                        if startup {
                            // Nothing is admitted until it succeeds: try again soon.
                            let retry = supervisor
                                .svc
                                .tuning
                                .get()
                                .intervals
                                .reconcile
                                .min(STARTUP_RECONCILE_RETRY);
                            ctx.notify_later(Reconcile, retry);
                        }
                    }
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
        if let Some(pool) = &self.pool {
            pool.do_send(StopBoots);
        }
        for entry in self.running.values() {
            entry.signals.suspend();
        }
        // Actors waiting out a restart backoff hold no VM operation: they can go at once. Their
        // crash is already counted; marked suspended, the next start does not count another.
        let waiting: Vec<String> = self
            .running
            .iter()
            .filter(|(_, entry)| entry.restarting)
            .map(|(id, _)| id.clone())
            .collect();
        self.running.retain(|_, entry| !entry.restarting);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.drained.push(tx);
        self.check_drained();
        let svc = Arc::clone(&self.svc);
        Box::pin(async move {
            let at = svc.clock.now_ms();
            let marked = svc
                .store
                .call(move |s| waiting.iter().try_for_each(|id| s.mark_suspended(id, at)))
                .await;
            if let Err(err) = marked {
                tracing::error!(%err, "marking jobs that waited to restart as suspended failed");
            }
            let _ = rx.await;
        })
    }
}

/// The pool's sizes may have changed (a reload): the keeper looks at once, and admission too.
impl Handler<super::pool::Tidy> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: super::pool::Tidy, ctx: &mut Self::Context) {
        if let (Some(pool), true) = (&self.pool, self.reconciled) {
            pool.do_send(super::pool::Tidy);
        }
        self.admit(ctx);
    }
}

impl Handler<RunningCount> for Supervisor {
    type Result = usize;
    fn handle(&mut self, _: RunningCount, _: &mut Self::Context) -> usize {
        self.running.len()
    }
}

impl Handler<IsReady> for Supervisor {
    type Result = bool;
    fn handle(&mut self, _: IsReady, _: &mut Self::Context) -> bool {
        self.reconciled
    }
}

impl Handler<DestroySandbox> for Supervisor {
    type Result = ResponseActFuture<Self, Result<(), DestroyRefused>>;
    fn handle(&mut self, msg: DestroySandbox, _: &mut Self::Context) -> Self::Result {
        let svc = Arc::clone(&self.svc);
        let id = msg.sandbox_id.clone();
        let loaded = async move {
            let found = svc
                .store
                .call(move |s| {
                    let Some(sandbox) = s.get_sandbox(&id)? else {
                        return Ok(None);
                    };
                    let job = s.get_job(&sandbox.job_id)?;
                    Ok(Some((sandbox, job.map(|j| j.status))))
                })
                .await?;
            found.ok_or(DestroyRefused::Missing(msg.sandbox_id))
        };
        Box::pin(loaded.into_actor(self).map(|found, supervisor, ctx| {
            let (sandbox, status) = found?;
            if sandbox.state == SandboxState::Destroyed {
                return Err(DestroyRefused::AlreadyDestroyed(sandbox.id));
            }
            let reason = "sandbox destroyed by request".to_owned();
            if status.is_some_and(|s| !s.is_terminal()) {
                // Its job still runs: the job ends and takes its VM with it.
                match supervisor.running.get(&sandbox.job_id) {
                    Some(entry) => entry.signals.cancel(JobStatus::Cancelled, reason),
                    None => supervisor.teardown(sandbox.job_id, JobStatus::Cancelled, reason, ctx),
                }
                return Ok(());
            }
            // Kept, or a destroy that failed: no actor owns it any more.
            if supervisor.tearing_down.insert(sandbox.job_id.clone()) {
                let svc = Arc::clone(&supervisor.svc);
                let job_id = sandbox.job_id.clone();
                ctx.spawn(
                    async move {
                        if let Err(err) = lifecycle::destroy_sandbox(&svc, &sandbox).await {
                            tracing::warn!(sandbox = %sandbox.id, %err, "destroy by request failed");
                        }
                    }
                    .into_actor(supervisor)
                    .map(move |(), supervisor, ctx| {
                        supervisor.tearing_down.remove(&job_id);
                        supervisor.check_drained();
                        supervisor.admit(ctx);
                    }),
                );
            }
            Ok(())
        }))
    }
}
