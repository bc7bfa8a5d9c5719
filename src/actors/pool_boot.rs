//! One pool sandbox's boot, ahead of any job: clone → start → cloud_init → guest_agent, each
//! phase under its tuning timeout, each recorded on the pool row as the job that takes the
//! sandbox will list it. The guest boots with a seed that names only its hostname and, when the
//! daemon serves its runner, the runner's fetch behind a token scoped to this pool sandbox (no
//! job token, no phone-home): cloud-init is done when it has written its result, the runner
//! installed by then, and the identity comes with the job, through the guest agent. Phase
//! changes go to the Hub's broadcast like a job's, so the governor counts and times these boots
//! as it does any other.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::lifecycle::{self, PhaseError};
use super::Services;
use super::{restore, runner_fetch};
use crate::backend::{ExecStatus, GuestCommand, SandboxSpec, SnapshotStatus, VmHandle, VmState};
use crate::config::profile::Profile;
use crate::model::{now_ms, Phase, PhaseRun, PoolSandbox, StartMethod, StartMode};
use crate::start::resolve_start;
use crate::store::StoreError;

/// Where cloud-init records that it has finished (with its errors, if any).
const CLOUD_INIT_RESULT: &str = "/run/cloud-init/result.json";
/// Between two looks for cloud-init's result.
const CLOUD_INIT_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("phase {phase} failed: {source}")]
    Phase { phase: Phase, source: PhaseError },
    #[error("phase {phase} timed out after {seconds:.0}s")]
    Timeout { phase: Phase, seconds: f64 },
    #[error("stopped (shutdown or eviction)")]
    Cancelled,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a finished boot started its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    pub method: StartMethod,
    pub snapshot_id: Option<String>,
}

struct PoolBoot<'a> {
    svc: &'a Services,
    row: &'a PoolSandbox,
    profile: &'a Profile,
    vm: Option<VmHandle>,
    booted: Booted,
}

/// Boots `row`'s VM to READY-to-be (the caller marks it READY). On an error the VM may exist:
/// the caller destroys it.
pub async fn boot(
    svc: &Services,
    row: &PoolSandbox,
    profile: &Profile,
    cancel: &CancellationToken,
) -> Result<Booted, BootError> {
    let mut boot = PoolBoot {
        svc,
        row,
        profile,
        vm: None,
        booted: Booted {
            method: StartMethod::Cold,
            snapshot_id: None,
        },
    };
    for phase in Phase::PROVISIONING.iter().copied() {
        let limit = svc.tuning.get().phase_timeouts.get(phase);
        let started = now_ms();
        svc.hub.phase_changed(&row.id, phase, None);
        let result = tokio::select! {
            biased;
            () = cancel.cancelled() => Err(BootError::Cancelled),
            run = tokio::time::timeout(limit, boot.phase(phase)) => match run {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(BootError::Phase { phase, source }),
                Err(_) => Err(BootError::Timeout { phase, seconds: limit.as_secs_f64() }),
            },
        };
        let outcome = match &result {
            Ok(()) => "ok",
            Err(BootError::Timeout { .. }) => "timeout",
            Err(BootError::Cancelled) => "cancelled",
            Err(_) => "failed",
        };
        let ended = now_ms();
        let run = PhaseRun {
            phase,
            started_at_ms: started,
            ended_at_ms: Some(ended),
            duration_seconds: Some((ended - started).max(0) as f64 / 1000.0),
            result: Some(outcome.to_owned()),
        };
        let id = row.id.clone();
        svc.store.call(move |s| s.add_pool_phase(&id, &run)).await?;
        svc.metrics.observe_phase(
            phase.as_str(),
            outcome,
            (ended - started).max(0) as f64 / 1000.0,
        );
        svc.hub.phase_changed(&row.id, phase, Some(outcome));
        result?;
    }
    Ok(boot.booted)
}

impl PoolBoot<'_> {
    fn vm(&self) -> Result<&VmHandle, PhaseError> {
        self.vm
            .as_ref()
            .ok_or_else(|| PhaseError::Guest("the pool sandbox has no VM".into()))
    }

    async fn phase(&mut self, phase: Phase) -> Result<(), PhaseError> {
        match phase {
            Phase::Clone => self.clone_vm().await,
            Phase::Start => {
                let report = self.svc.backend.start_vm(self.vm()?).await?;
                for note in &report.notes {
                    tracing::info!(sandbox = %self.row.id, %note, "pool sandbox start");
                }
                if let Some(snapshot) = report.restored_from {
                    self.booted = Booted {
                        method: StartMethod::Restored,
                        snapshot_id: Some(snapshot),
                    };
                }
                Ok(())
            }
            Phase::CloudInit => {
                let vm = self.vm()?.clone();
                lifecycle::wait_for_agent(self.svc, &vm).await?;
                // A restored guest finished cloud-init in its template before the snapshot.
                if self.booted.method == StartMethod::Cold {
                    self.wait_for_cloud_init(&vm).await?;
                }
                Ok(())
            }
            Phase::GuestAgent => {
                let vm = self.vm()?.clone();
                lifecycle::wait_for_agent(self.svc, &vm).await?;
                self.warm_runner(&vm).await
            }
            _ => Ok(()),
        }
    }

    async fn clone_vm(&mut self) -> Result<(), PhaseError> {
        let tuning = self.svc.tuning.get();
        let start = resolve_start(
            StartMode::Auto,
            self.svc.backend.snapshot_starts(),
            tuning.snapshots_enabled(),
        )
        .map_err(|refusal| PhaseError::Guest(refusal.to_string()))?;
        // Issued afresh for each boot; it goes with the pool row, so a job that takes this VM
        // over, or its destroy, ends it.
        let runner = runner_fetch::for_pool(self.svc, &self.row.id).await?;
        let spec = SandboxSpec {
            job_id: String::new(),
            name: self.row.id.clone(),
            template: lifecycle::template_of(self.svc, self.profile),
            cores: self.row.cores,
            memory_mb: self.row.memory_mb,
            disk_gb: self.row.disk_gb,
            network: self.profile.network.mode,
            cloud_init: None,
            runner,
            owner: self.svc.instance.id.to_string(),
            start,
            restore_from: None,
        };
        let restore_from = self.snapshot(&spec).await;
        let spec = SandboxSpec {
            restore_from,
            ..spec
        };
        let vm = self.svc.backend.clone_vm(&spec).await?;
        let (id, vm_ref) = (self.row.id.clone(), vm.vm_ref.clone());
        self.svc
            .store
            .call(move |s| s.set_pool_vm_ref(&id, &vm_ref))
            .await?;
        self.vm = Some(vm);
        Ok(())
    }

    /// The snapshot to restore from where the backend and tuning allow it (made first when
    /// there is none); otherwise, or when none can be had, the sandbox boots cold.
    async fn snapshot(&self, spec: &SandboxSpec) -> Option<String> {
        if spec.start == StartMode::Cold {
            return None;
        }
        let made = match self.svc.backend.snapshot_status(spec).await {
            Ok(SnapshotStatus::Ready(info)) => Ok(info),
            Ok(SnapshotStatus::Missing { id }) => {
                tracing::info!(sandbox = %self.row.id, snapshot = %id, "making a snapshot for the pool");
                self.svc.backend.make_snapshot(spec).await
            }
            Err(err) => Err(err),
        };
        match made {
            Ok(info) => Some(info.id),
            Err(err) => {
                tracing::warn!(sandbox = %self.row.id, %err, "no snapshot for the pool sandbox; it boots cold");
                None
            }
        }
    }

    /// Runs the guest's runner once (`--version`), so that a template without one fails here,
    /// not in a job's run phase, and so that the first exec of the runner in this VM, slow
    /// under TCG (every code page translated afresh), is not on the job's path.
    async fn warm_runner(&self, vm: &VmHandle) -> Result<(), PhaseError> {
        let probe = GuestCommand {
            path: lifecycle::RUNNER_PATH.to_owned(),
            args: vec!["--version".to_owned()],
            env: Default::default(),
            stdin: None,
        };
        match restore::exec_to_end(self.svc, vm, &probe).await? {
            ExecStatus::Exited { code: 0 } => Ok(()),
            other => Err(PhaseError::Guest(format!(
                "{} --version in the guest: {}",
                lifecycle::RUNNER_PATH,
                lifecycle::describe(other)
            ))),
        }
    }

    /// Waits for cloud-init's result file; the VM stopping ends the wait.
    async fn wait_for_cloud_init(&self, vm: &VmHandle) -> Result<(), PhaseError> {
        let probe = GuestCommand {
            path: "/bin/sh".to_owned(),
            args: vec!["-c".to_owned(), format!("test -f {CLOUD_INIT_RESULT}")],
            env: Default::default(),
            stdin: None,
        };
        loop {
            if restore::exec_to_end(self.svc, vm, &probe).await? == (ExecStatus::Exited { code: 0 })
            {
                return Ok(());
            }
            if self.svc.backend.vm_state(vm).await? != VmState::Running {
                return Err(PhaseError::Guest(
                    "the VM stopped before cloud-init finished".into(),
                ));
            }
            tokio::time::sleep(CLOUD_INIT_POLL).await;
        }
    }
}
