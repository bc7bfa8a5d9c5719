//! One job's sandbox lifecycle: clone → start → cloud-init → guest agent → run → upload → destroy.
//!
//! Each phase runs under its own timeout (from tuning). Every transition is written to the store
//! before and after it happens, so an actor restarted after a crash re-enters the phase it was in,
//! and every phase is idempotent for that reason. Whatever ends the job (success, failure, timeout,
//! cancel), the VM is destroyed, except a kept sandbox, which its lease ends later.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Services;
use super::{changes, cloud_check, restore, runner_fetch};
use crate::backend::{
    BackendError, CloudInitSpec, ExecStatus, GuestCommand, SandboxSpec, VmHandle, VmState,
};
use crate::config::profile::Profile;
use crate::jobfiles::JobFiles;
use crate::model::{
    now_ms, sandbox_name_for, Job, JobRequest, JobStatus, Phase, Sandbox, SandboxState, StartMethod,
};
use crate::store::{GuestProgress, PhaseLimit, StoreError, TokenKind};

/// Where the runner lives in every guest image, and how it finds its bootstrap token.
pub use crate::cloudinit::{BOOTSTRAP_PATH, RUNNER_PATH};
/// Stored as the runner's pid while its guest-exec is under way: a crash then leaves it unknown
/// whether the runner started, and a second one must not be started (it would lose the one-time
/// bootstrap token and look like a failure).
const EXEC_PENDING: i64 = -1;

#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Guest(String),
}

/// How a lifecycle run ended, as the supervisor needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job is terminal (or was already).
    Finished,
    /// Shutdown asked it to stop at a resumable point; the job stays RUNNING for the next start.
    Suspended,
}

/// What can stop a lifecycle from outside: a cancel (with the status and reason the job should
/// end with) or a shutdown's suspend.
#[derive(Debug, Default)]
pub struct Signals {
    cancel: CancellationToken,
    suspend: CancellationToken,
    reason: Mutex<Option<(JobStatus, String)>>,
}

impl Signals {
    pub fn cancel(&self, status: JobStatus, reason: impl Into<String>) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert((status, reason.into()));
        self.cancel.cancel();
    }

    pub fn suspend(&self) {
        self.suspend.cancel();
    }

    fn cancel_reason(&self) -> Option<(JobStatus, String)> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The status, exit code and reason a job ends with.
#[derive(Debug, Clone, PartialEq)]
struct Verdict {
    status: JobStatus,
    exit_code: Option<i32>,
    error: Option<String>,
    /// The command ran to an exit code (as opposed to an error ending the job).
    command_finished: bool,
}

impl Verdict {
    fn error(status: JobStatus, error: String) -> Self {
        Verdict {
            status,
            exit_code: None,
            error: Some(error),
            command_finished: false,
        }
    }
}

enum Interrupt {
    Cancel,
    Suspend,
    Failed(PhaseError),
    Timeout(Duration),
}

struct Lifecycle {
    svc: Arc<Services>,
    job: Job,
    request: JobRequest,
    profile: Profile,
    sandbox: Sandbox,
    signals: Arc<Signals>,
}

/// Drives a job's sandbox from wherever the store says it is to the end.
pub async fn drive(
    svc: Arc<Services>,
    job_id: String,
    signals: Arc<Signals>,
) -> Result<Outcome, StoreError> {
    let id = job_id.clone();
    let loaded = svc
        .store
        .call(move |s| Ok((s.get_job(&id)?, s.job_request(&id)?)))
        .await?;
    let (Some(job), Some(request)) = loaded else {
        return Ok(Outcome::Finished);
    };
    if job.status.is_terminal() {
        return Ok(Outcome::Finished);
    }
    let Some(profile) = svc.profiles().get(&job.profile).cloned() else {
        let reason = format!("profile `{}` no longer exists", job.profile);
        finish(&svc, &job.id, &Verdict::error(JobStatus::Failed, reason)).await?;
        return Ok(Outcome::Finished);
    };
    // A job that took a pool sandbox has its row already (its boot phases done ahead).
    let id = job.id.clone();
    let sandbox = match svc.store.call(move |s| s.sandbox_for_job(&id)).await? {
        Some(sandbox) => sandbox,
        None => {
            let sandbox = new_sandbox(&svc, &job, &request, &profile);
            svc.store.call(move |s| s.insert_sandbox(&sandbox)).await?
        }
    };
    let lifecycle = Lifecycle {
        svc,
        job,
        request,
        profile,
        sandbox,
        signals,
    };
    let outcome = lifecycle.run().await;
    lifecycle.svc.hub.forget(&job_id);
    if let Ok(Outcome::Suspended) = outcome {
        // The next daemon resumes it as suspended, not as interrupted by a crash.
        let (id, at) = (job_id.clone(), lifecycle.svc.clock.now_ms());
        lifecycle
            .svc
            .store
            .call(move |s| s.mark_suspended(&id, at))
            .await?;
    }
    outcome
}

fn new_sandbox(svc: &Services, job: &Job, request: &JobRequest, profile: &Profile) -> Sandbox {
    let now = now_ms();
    let ttl_minutes = request.ttl_minutes.unwrap_or(profile.ttl_minutes);
    let lease_from = svc.clock.now_ms();
    Sandbox {
        id: sandbox_name_for(&job.id),
        job_id: job.id.clone(),
        backend: svc.backend.kind().as_str().to_owned(),
        vm_ref: None,
        state: SandboxState::Provisioning,
        phase: None,
        profile: profile.name.clone(),
        cores: profile.resources.cores,
        memory_mb: profile.resources.memory_mb,
        disk_gb: profile.storage.root_size_gb,
        keepalive: profile.keepalive,
        lease_expires_at_ms: lease_from.saturating_add(i64::from(ttl_minutes) * 60_000),
        created_at_ms: now,
        updated_at_ms: now,
        destroyed_at_ms: None,
        error: None,
        start_method: None,
        snapshot_id: None,
        from_pool: false,
    }
}

impl Lifecycle {
    async fn run(&self) -> Result<Outcome, StoreError> {
        let resume_at = self.sandbox.phase.unwrap_or(Phase::Clone);
        let id = self.job.id.clone();
        let pending = self.svc.store.call(move |s| s.pending_outcome(&id)).await?;
        // A job whose outcome is decided is being torn down (or kept): it never re-enters its
        // phases, whichever phase the crash left it in.
        let verdict = if let Some(pending) = pending {
            Verdict {
                command_finished: pending.status == JobStatus::Completed,
                status: pending.status,
                exit_code: pending.exit_code,
                error: pending.error,
            }
        } else if resume_at == Phase::Destroy {
            Verdict::error(JobStatus::Failed, "interrupted during destroy".into())
        } else {
            match self.run_phases(resume_at).await? {
                Some(verdict) => verdict,
                None => return Ok(Outcome::Suspended),
            }
        };
        let id = self.job.id.clone();
        let pending = verdict.clone();
        self.svc
            .store
            .call(move |s| {
                s.set_pending_outcome(
                    &id,
                    pending.status,
                    pending.exit_code,
                    pending.error.as_deref(),
                )
            })
            .await?;
        if self.profile.keepalive && verdict.command_finished {
            let id = self.sandbox.id.clone();
            let (now, ttl_minutes) = (
                self.svc.clock.now_ms(),
                self.request.ttl_minutes.unwrap_or(self.profile.ttl_minutes),
            );
            let ttl = Duration::from_secs(u64::from(ttl_minutes) * 60);
            self.svc
                .store
                .call(move |s| s.keep_sandbox(&id, now, ttl))
                .await?;
        } else {
            self.destroy_phase().await?;
        }
        finish(&self.svc, &self.job.id, &verdict).await?;
        Ok(Outcome::Finished)
    }

    /// Runs the phases from `first` through upload. None means suspended.
    async fn run_phases(&self, first: Phase) -> Result<Option<Verdict>, StoreError> {
        let phases = Phase::ALL
            .iter()
            .copied()
            .skip_while(|p| *p != first)
            .take_while(|p| *p != Phase::Destroy);
        for phase in phases {
            if let Some((status, reason)) = self.signals.cancel_reason() {
                return Ok(Some(Verdict::error(
                    status,
                    format!("{reason} (before phase {phase})"),
                )));
            }
            if self.signals.suspend.is_cancelled() {
                return Ok(None);
            }
            let limit = self.timeout_for(phase);
            let deadline_ms = self.begin(phase, limit).await?;
            // A resumed phase keeps the deadline it got when it first began.
            let left_ms = deadline_ms.saturating_sub(self.svc.clock.now_ms()).max(0);
            let left = Duration::from_millis(left_ms.unsigned_abs());
            let waiting = !matches!(phase, Phase::Clone | Phase::Start);
            let result = tokio::select! {
                biased;
                () = self.signals.cancel.cancelled() => Err(Interrupt::Cancel),
                () = self.signals.suspend.cancelled(), if waiting => Err(Interrupt::Suspend),
                result = tokio::time::timeout(left, self.run_phase(phase)) => match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(err)) => Err(Interrupt::Failed(err)),
                    Err(_) => Err(Interrupt::Timeout(limit)),
                },
            };
            let verdict = match result {
                Ok(()) => {
                    self.end(phase, "ok", "done").await?;
                    if phase == Phase::GuestAgent {
                        let since = self.job.started_at_ms.unwrap_or(self.job.created_at_ms);
                        let seconds = (now_ms() - since).max(0) as f64 / 1000.0;
                        self.svc.metrics.provisioning_duration.observe(seconds);
                    }
                    continue;
                }
                Err(Interrupt::Suspend) => return Ok(None),
                Err(Interrupt::Cancel) => {
                    let (status, reason) = self
                        .signals
                        .cancel_reason()
                        .unwrap_or((JobStatus::Cancelled, "cancelled".into()));
                    let reason = format!("{reason} (during phase {phase})");
                    self.end(phase, "cancelled", &reason).await?;
                    Verdict::error(status, reason)
                }
                Err(Interrupt::Failed(err)) => {
                    let reason = format!("phase {phase} failed: {err}");
                    self.end(phase, "failed", &reason).await?;
                    Verdict::error(JobStatus::Failed, reason)
                }
                Err(Interrupt::Timeout(limit)) => {
                    let reason = format!(
                        "phase {phase} timed out after {}",
                        humantime::format_duration(Duration::from_secs(limit.as_secs().max(1)))
                    );
                    self.end(phase, "timeout", &reason).await?;
                    Verdict::error(JobStatus::Timeout, reason)
                }
            };
            return Ok(Some(verdict));
        }
        let id = self.job.id.clone();
        let progress = self.svc.store.call(move |s| s.guest_progress(&id)).await?;
        Ok(Some(match progress.exit_code {
            Some(0) => Verdict {
                status: JobStatus::Completed,
                exit_code: Some(0),
                error: None,
                command_finished: true,
            },
            Some(code) => Verdict {
                status: JobStatus::Failed,
                exit_code: Some(code),
                error: Some(format!("command exited with code {code}")),
                command_finished: true,
            },
            None => Verdict::error(
                JobStatus::Failed,
                "the guest never reported an exit code".into(),
            ),
        }))
    }

    fn timeout_for(&self, phase: Phase) -> Duration {
        let tuning = self.svc.tuning.get();
        let mut limit = tuning.phase_timeouts.get(phase);
        if phase == Phase::Run {
            if let Some(seconds) = self.request.run_timeout_seconds {
                limit = limit.min(Duration::from_secs(seconds));
            }
        }
        if phase.is_provisioning() {
            let started = self.job.started_at_ms.unwrap_or_else(now_ms);
            let budget_ms =
                i64::try_from(self.svc.provisioning_timeout().as_millis()).unwrap_or(i64::MAX);
            let left_ms = started
                .saturating_add(budget_ms)
                .saturating_sub(now_ms())
                .max(0);
            limit = limit.min(Duration::from_millis(left_ms.unsigned_abs()));
        }
        limit
    }

    /// Records that `phase` begins (with `limit` as its time limit) and returns its deadline on
    /// the services' clock.
    async fn begin(&self, phase: Phase, limit: Duration) -> Result<i64, StoreError> {
        let (job, sandbox) = (self.job.id.clone(), self.sandbox.id.clone());
        let limit = PhaseLimit {
            now_ms: self.svc.clock.now_ms(),
            limit_ms: i64::try_from(limit.as_millis()).unwrap_or(i64::MAX),
        };
        let (event, deadline_ms) = self
            .svc
            .store
            .call(move |s| s.begin_phase(&job, &sandbox, phase, limit))
            .await?;
        self.svc.hub.publish(event);
        self.svc.hub.phase_changed(&self.job.id, phase, None);
        Ok(deadline_ms)
    }

    async fn end(
        &self,
        phase: Phase,
        result: &'static str,
        message: &str,
    ) -> Result<(), StoreError> {
        let (job, message) = (self.job.id.clone(), message.to_owned());
        let (event, seconds) = self
            .svc
            .store
            .call(move |s| s.end_phase(&job, phase, result, &message))
            .await?;
        self.svc
            .metrics
            .observe_phase(phase.as_str(), result, seconds);
        self.svc.hub.publish(event);
        self.svc
            .hub
            .phase_changed(&self.job.id, phase, Some(result));
        Ok(())
    }

    /// The VM as recorded; a restarted actor finds it in the store.
    async fn vm(&self) -> Result<VmHandle, PhaseError> {
        let id = self.sandbox.id.clone();
        let sandbox = self.svc.store.call(move |s| s.get_sandbox(&id)).await?;
        match sandbox.and_then(|s| s.vm_ref) {
            Some(vm_ref) => Ok(VmHandle {
                name: self.sandbox.id.clone(),
                vm_ref,
            }),
            None => Err(PhaseError::Guest(
                "the sandbox has no VM (clone never finished)".into(),
            )),
        }
    }

    async fn run_phase(&self, phase: Phase) -> Result<(), PhaseError> {
        match phase {
            Phase::Clone => self.clone_vm().await,
            Phase::Start => self.start_vm().await,
            Phase::CloudInit => {
                let vm = self.vm().await?;
                if self.restored().await? {
                    self.wait_for_agent().await?;
                    return restore::give_identity(&self.svc, &self.job.id, &vm, &self.sandbox.id)
                        .await;
                }
                self.wait_for_guest(
                    &vm,
                    |p| p.phoned_home,
                    None,
                    "the VM stopped before it phoned home",
                )
                .await
            }
            Phase::GuestAgent => {
                self.wait_for_agent().await?;
                // A restored guest's cloud-init ran when its snapshot was made, and was checked then.
                if !self.restored().await? {
                    let vm = self.vm().await?;
                    cloud_check::record_verdict(&self.svc, &self.job.id, &vm, &self.profile)
                        .await?;
                }
                Ok(())
            }
            Phase::Run => {
                let vm = self.vm().await?;
                let pid = self.start_runner(&vm).await?;
                self.wait_for_guest(
                    &vm,
                    |p| p.exit_code.is_some(),
                    pid,
                    "the runner exited before reporting the command's exit",
                )
                .await
            }
            Phase::Upload => {
                let vm = self.vm().await?;
                let id = self.sandbox.id.clone();
                let pid = match self.svc.store.call(move |s| s.exec_pid(&id)).await? {
                    None => return Err(PhaseError::Guest("the runner was never started".into())),
                    Some(EXEC_PENDING) => None,
                    Some(pid) => Some(pid),
                };
                self.wait_for_guest(
                    &vm,
                    |p| p.done,
                    pid,
                    "the runner exited before finishing uploads",
                )
                .await?;
                changes::record_changes(&self.svc, &self.job.id, &self.request).await?;
                Ok(())
            }
            Phase::Destroy => Ok(()),
        }
    }

    async fn clone_vm(&self) -> Result<(), PhaseError> {
        let (job, ttl) = (self.job.id.clone(), self.svc.config.token_ttl());
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        // Fresh tokens per attempt: a VM cloned before a crash keeps the (still valid) old ones.
        let serves_runner = self.svc.runner.is_some();
        let (phone_home, bootstrap, runner_token) = self
            .svc
            .store
            .call(move |s| {
                Ok((
                    s.issue_token(&job, TokenKind::PhoneHome, ttl_ms)?,
                    s.issue_token(&job, TokenKind::Bootstrap, ttl_ms)?,
                    serves_runner
                        .then(|| s.issue_token(&job, TokenKind::Runner, ttl_ms))
                        .transpose()?,
                ))
            })
            .await?;
        let guest_url = self.svc.guest_url.trim_end_matches('/').to_owned();
        let runner = self
            .svc
            .runner
            .as_ref()
            .zip(runner_token)
            .map(|(binary, token)| runner_fetch::fetch(&guest_url, binary, token));
        let template = template_of(&self.svc, &self.profile);
        let spec = SandboxSpec {
            job_id: self.job.id.clone(),
            name: self.sandbox.id.clone(),
            template,
            cores: self.profile.resources.cores,
            memory_mb: self.profile.resources.memory_mb,
            disk_gb: self.profile.storage.root_size_gb,
            network: self.profile.network.mode,
            cloud_init: Some(CloudInitSpec {
                hostname: self.sandbox.id.clone(),
                phone_home_url: format!("{guest_url}/guest/v1/phone-home/{phone_home}"),
                guest_url,
                bootstrap_token: bootstrap,
            }),
            runner,
            owner: self.svc.instance.id.to_string(),
            start: restore::start_mode(&self.svc, &self.request)?,
            restore_from: None,
        };
        let spec = SandboxSpec {
            restore_from: restore::snapshot_to_restore(&self.svc, &self.job.id, &spec).await?,
            ..spec
        };
        let vm = self.svc.backend.clone_vm(&spec).await?;
        let (id, vm_ref) = (self.sandbox.id.clone(), vm.vm_ref.clone());
        self.svc
            .store
            .call(move |s| s.set_vm_ref(&id, &vm_ref))
            .await?;
        Ok(())
    }

    /// Starts (or restores) the VM and records how: the cloud-init phase differs for a
    /// restored guest, and the job's events say which snapshot it came from.
    async fn start_vm(&self) -> Result<(), PhaseError> {
        let started = std::time::Instant::now();
        let report = self.svc.backend.start_vm(&self.vm().await?).await?;
        for note in &report.notes {
            self.event("snapshot", note).await?;
        }
        let (id, snapshot) = (self.sandbox.id.clone(), report.restored_from.clone());
        let method = match snapshot {
            Some(_) => StartMethod::Restored,
            None => StartMethod::Cold,
        };
        self.svc
            .store
            .call(move |s| s.set_sandbox_start(&id, method, snapshot.as_deref()))
            .await?;
        if let Some(snapshot) = &report.restored_from {
            self.event(
                "restored",
                &format!(
                    "restored from snapshot {snapshot} in {:.2}s",
                    started.elapsed().as_secs_f64()
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// Whether the sandbox was restored from a snapshot, as its start phase recorded.
    async fn restored(&self) -> Result<bool, StoreError> {
        let id = self.sandbox.id.clone();
        let sandbox = self.svc.store.call(move |s| s.get_sandbox(&id)).await?;
        Ok(sandbox.and_then(|s| s.start_method) == Some(StartMethod::Restored))
    }

    /// Adds an event to the job's history and publishes it.
    async fn event(&self, kind: &'static str, message: &str) -> Result<(), StoreError> {
        restore::record_event(&self.svc, &self.job.id, kind, message).await
    }

    async fn wait_for_agent(&self) -> Result<(), PhaseError> {
        wait_for_agent(&self.svc, &self.vm().await?).await
    }

    /// Starts the guest runner once; a restarted actor finds its pid in the store. None: a runner
    /// may have been started before a crash, its pid unknown, so the phase follows the guest's
    /// reports and the VM's liveness instead. A sandbox taken from the pool gets the job's
    /// identity first (it booted with none); after a crash before the runner started, again,
    /// with a newer token.
    async fn start_runner(&self, vm: &VmHandle) -> Result<Option<i64>, PhaseError> {
        let id = self.sandbox.id.clone();
        match self.svc.store.call(move |s| s.exec_pid(&id)).await? {
            Some(EXEC_PENDING) => return Ok(None),
            Some(pid) => return Ok(Some(pid)),
            None => {}
        }
        if self.sandbox.from_pool {
            restore::give_identity(&self.svc, &self.job.id, vm, &self.sandbox.id).await?;
        }
        let id = self.sandbox.id.clone();
        self.svc
            .store
            .call(move |s| s.set_exec_pid(&id, EXEC_PENDING))
            .await?;
        let command = GuestCommand {
            path: RUNNER_PATH.to_owned(),
            args: vec!["--bootstrap".to_owned(), BOOTSTRAP_PATH.to_owned()],
            env: Default::default(),
            stdin: None,
        };
        let pid = self.svc.backend.exec(vm, &command).await?;
        let id = self.sandbox.id.clone();
        self.svc
            .store
            .call(move |s| s.set_exec_pid(&id, pid))
            .await?;
        Ok(Some(pid))
    }

    /// Waits until the guest's reports satisfy `reached`, checking between wake-ups that the
    /// runner (or, without one, the VM) is still alive.
    async fn wait_for_guest(
        &self,
        vm: &VmHandle,
        reached: fn(&GuestProgress) -> bool,
        runner_pid: Option<i64>,
        lost: &str,
    ) -> Result<(), PhaseError> {
        let waker = self.svc.hub.waker(&self.job.id);
        loop {
            if reached(&self.progress().await?) {
                return Ok(());
            }
            match runner_pid {
                Some(pid) => {
                    let status = self.svc.backend.exec_status(vm, pid).await?;
                    if status != ExecStatus::Running {
                        // The runner reports before it exits; look once more to close the race.
                        if reached(&self.progress().await?) {
                            return Ok(());
                        }
                        return Err(PhaseError::Guest(format!("{lost} ({})", describe(status))));
                    }
                }
                None => {
                    if self.svc.backend.vm_state(vm).await? != VmState::Running {
                        return Err(PhaseError::Guest(lost.to_owned()));
                    }
                }
            }
            let poll = self.svc.tuning.get().intervals.guest_poll;
            tokio::select! {
                () = waker.notified() => {}
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    async fn progress(&self) -> Result<GuestProgress, StoreError> {
        let id = self.job.id.clone();
        self.svc.store.call(move |s| s.guest_progress(&id)).await
    }

    async fn destroy_phase(&self) -> Result<(), StoreError> {
        // Its own timeout applies inside `destroy_sandbox`; the deadline is only recorded.
        let limit = self.svc.tuning.get().phase_timeouts.destroy;
        self.begin(Phase::Destroy, limit).await?;
        let id = self.sandbox.id.clone();
        let sandbox = self.svc.store.call(move |s| s.get_sandbox(&id)).await?;
        let result = match sandbox {
            Some(sandbox) => destroy_sandbox(&self.svc, &sandbox).await,
            None => Ok(()),
        };
        match result {
            Ok(()) => self.end(Phase::Destroy, "ok", "destroyed").await,
            Err(err) => {
                // The job still ends; the reconciler retries the destroy until the VM is gone.
                tracing::warn!(job = %self.job.id, %err, "destroy failed; the reconciler will retry");
                self.end(
                    Phase::Destroy,
                    "failed",
                    &format!("destroy failed, will retry: {err}"),
                )
                .await
            }
        }
    }
}

/// What the backend clones a profile's sandboxes from: a template VMID on Proxmox, an image name
/// elsewhere.
pub(super) fn template_of(svc: &Services, profile: &Profile) -> String {
    match svc.backend.kind() {
        crate::backend::BackendKind::Pve => profile
            .template_vmid
            .map(|v| v.to_string())
            .unwrap_or_default(),
        _ => profile.image.clone(),
    }
}

/// Waits until the VM's guest agent answers; fails once the VM is seen stopped.
pub(super) async fn wait_for_agent(svc: &Services, vm: &VmHandle) -> Result<(), PhaseError> {
    let mut attempt: u32 = 0;
    loop {
        let ping = tokio::time::timeout(Duration::from_secs(5), svc.backend.agent_ping(vm)).await;
        match ping {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(BackendError::AgentUnavailable(_))) | Err(_) => {}
            Ok(Err(err)) => return Err(err.into()),
        }
        attempt += 1;
        if attempt % 10 == 0 && svc.backend.vm_state(vm).await? != VmState::Running {
            return Err(PhaseError::Guest(
                "the VM stopped before its guest agent answered".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(super) fn describe(status: ExecStatus) -> String {
    match status {
        ExecStatus::Running => "still running".into(),
        ExecStatus::Exited { code } => format!("exit code {code}"),
        ExecStatus::Signalled { signal } => format!("killed by signal {signal}"),
    }
}

async fn finish(svc: &Services, job_id: &str, verdict: &Verdict) -> Result<(), StoreError> {
    // The guest has cloned by now (or never will): its repository bundle goes before the job
    // shows as ended.
    if let Err(err) = JobFiles::new(&svc.config).remove_bundle(job_id).await {
        tracing::warn!(job = job_id, %err, "the job's repository bundle stays until retention");
    }
    let (id, v) = (job_id.to_owned(), verdict.clone());
    let event = svc
        .store
        .call(move |s| s.finish_job(&id, v.status, v.exit_code, v.error.as_deref()))
        .await?;
    if let Some(event) = event {
        tracing::info!(job = job_id, status = %verdict.status, error = ?verdict.error, "job finished");
        svc.hub.publish(event);
    }
    Ok(())
}

/// Destroys a sandbox's VM (under the destroy timeout) and marks it DESTROYED; on failure it stays
/// DESTROYING with the error, for the reconciler to retry.
pub async fn destroy_sandbox(svc: &Services, sandbox: &Sandbox) -> Result<(), PhaseError> {
    let id = sandbox.id.clone();
    svc.store
        .call(move |s| s.set_sandbox_state(&id, SandboxState::Destroying, None))
        .await?;
    let limit = svc.tuning.get().phase_timeouts.destroy;
    let named = destroy_vm_named(svc, &sandbox.id, sandbox.vm_ref.as_deref());
    let result = match tokio::time::timeout(limit, named).await {
        Ok(result) => result,
        Err(_) => Err(PhaseError::Backend(BackendError::Timeout {
            operation: "destroy",
            seconds: limit.as_secs_f64(),
        })),
    };
    let id = sandbox.id.clone();
    match &result {
        Ok(()) => {
            svc.store
                .call(move |s| s.set_sandbox_state(&id, SandboxState::Destroyed, None))
                .await?
        }
        Err(err) => {
            let message = err.to_string();
            svc.store
                .call(move |s| s.set_sandbox_state(&id, SandboxState::Destroying, Some(&message)))
                .await?
        }
    }
    result
}

/// A crash between clone and recording the VM leaves no vm_ref; the name still finds the VM.
/// A VM that now carries another daemon's id is not ours any more and is left alone: the
/// sandbox counts as destroyed, and the reconciler lists the VM as foreign.
pub(super) async fn destroy_vm_named(
    svc: &Services,
    name: &str,
    vm_ref: Option<&str>,
) -> Result<(), PhaseError> {
    let listed = svc
        .backend
        .find_vm(name)
        .await?
        .filter(|l| vm_ref.is_none_or(|r| r == l.vm.vm_ref));
    let ours = svc.instance.id.as_str();
    if let Some(owner) = listed.as_ref().and_then(|l| l.owner.as_deref()) {
        if owner != ours {
            tracing::warn!(sandbox = %name, %owner, "the sandbox's VM carries another daemon's id; left alone");
            return Ok(());
        }
    }
    let vm = match vm_ref {
        Some(vm_ref) => Some(VmHandle {
            name: name.to_owned(),
            vm_ref: vm_ref.to_owned(),
        }),
        None => listed.map(|listed| listed.vm),
    };
    if let Some(vm) = vm {
        svc.backend.destroy_vm(&vm).await?;
    }
    Ok(())
}

/// Ends a job that has no running actor (its actor crashed past the restart limit, or a lease
/// ran out while it waited to resume): destroy its VM, then record the verdict.
pub async fn teardown(
    svc: &Services,
    job_id: &str,
    status: JobStatus,
    reason: &str,
) -> Result<(), PhaseError> {
    // The outcome is recorded first: a daemon that dies during the destroy leaves a job that
    // the next one finishes tearing down instead of resuming.
    let (id, why) = (job_id.to_owned(), reason.to_owned());
    svc.store
        .call(move |s| s.set_pending_outcome(&id, status, None, Some(&why)))
        .await?;
    let id = job_id.to_owned();
    let destroyed = match svc.store.call(move |s| s.sandbox_for_job(&id)).await? {
        Some(sandbox) if sandbox.state != SandboxState::Destroyed => {
            destroy_sandbox(svc, &sandbox).await
        }
        _ => Ok(()),
    };
    // The job ends either way; a failed destroy stays DESTROYING for the reconciler.
    finish(svc, job_id, &Verdict::error(status, reason.to_owned())).await?;
    destroyed
}
