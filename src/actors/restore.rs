//! The lifecycle's steps for a sandbox restored from a template snapshot: how it should start
//! (the job's choice against what the backend and the tuning allow, decided again at clone time),
//! which snapshot it comes from (made first, in the clone phase, when there is none), and the
//! identity its guest gets through the guest agent in the cloud-init phase.

use std::time::Duration;

use super::lifecycle::{describe, PhaseError, BOOTSTRAP_PATH, RUNNER_PATH};
use super::{cloud_check, Services};
use crate::backend::{
    BackendError, ExecStatus, GuestCommand, GuestInput, SandboxSpec, SnapshotStatus, VmHandle,
};
use crate::model::{now_ms, JobRequest, StartMode};
use crate::runner::identity::{self, BootstrapFile, Entropy, Identity};
use crate::start::resolve_start;
use crate::store::{StoreError, TokenKind};

/// The host entropy a restored guest gets mixed into its kernel pool.
const IDENTITY_ENTROPY_BYTES: usize = 64;

/// Between two looks at a short guest command (the identity step takes a few milliseconds).
const EXEC_POLL: Duration = Duration::from_millis(20);

/// How the backend should start the sandbox, decided again at clone time: a reload that
/// turned snapshots off since the submit makes an `auto` job boot cold and fails a
/// `snapshot` one with the reason.
pub(super) fn start_mode(svc: &Services, request: &JobRequest) -> Result<StartMode, PhaseError> {
    let snapshots_enabled = svc.tuning.get().snapshots_enabled();
    resolve_start(
        request.start,
        svc.backend.snapshot_starts(),
        snapshots_enabled,
    )
    .map_err(|refusal| PhaseError::Guest(refusal.to_string()))
}

/// The snapshot the sandbox is restored from: the one of its template and shape, made first
/// when there is none yet (the template boots once, in this clone phase, and counts as this
/// job's boot). Where none can be had, an `auto` job boots cold and says why; a `snapshot`
/// job fails.
pub(super) async fn snapshot_to_restore(
    svc: &Services,
    job_id: &str,
    spec: &SandboxSpec,
) -> Result<Option<String>, PhaseError> {
    if spec.start == StartMode::Cold {
        return Ok(None);
    }
    let backend = &svc.backend;
    let (cores, memory_mb) = backend.effective_size(spec.cores, spec.memory_mb);
    let made = match backend.snapshot_status(spec).await {
        Ok(SnapshotStatus::Ready(info)) => Ok(info),
        Ok(SnapshotStatus::Missing { id }) => {
            record_event(
                svc,
                job_id,
                "snapshot",
                &format!(
                    "making snapshot {id}: the template boots once ({} vCPU, {} MB), then \
                     sandboxes of this shape are restored from it",
                    cores, memory_mb
                ),
            )
            .await?;
            let made = backend.make_snapshot(spec).await;
            if let Ok(info) = &made {
                record_event(
                    svc,
                    job_id,
                    "snapshot",
                    &format!(
                        "snapshot {} made in {:.1}s (memory {:.0} MB, device state {:.1} MB \
                         on disk)",
                        info.id,
                        info.made_seconds,
                        info.memory_bytes as f64 / 1e6,
                        info.state_bytes as f64 / 1e6
                    ),
                )
                .await?;
                // The template booted cold for the making: its cloud-init's verdict is the
                // template's, and every sandbox restored from the snapshot inherits it.
                if let Some(result) = &info.cloud_init_result {
                    cloud_check::record_result(svc, job_id, &spec.template, result.as_bytes())
                        .await?;
                }
            }
            made
        }
        Err(err) => Err(err),
    };
    match made {
        Ok(info) => Ok(Some(info.id)),
        Err(err) if spec.start == StartMode::Snapshot => Err(err.into()),
        Err(err) => {
            record_event(
                svc,
                job_id,
                "snapshot",
                &format!("no snapshot to restore from ({err}); the sandbox boots cold"),
            )
            .await?;
            Ok(None)
        }
    }
}

/// The cloud-init phase of a restored sandbox: its guest booted as the template, so it gets
/// its own identity through the guest agent before its runner starts: a fresh one-time
/// bootstrap token in its bootstrap file, its hostname, the host's wall clock (the guest's
/// stopped at the snapshot) and host entropy mixed into its kernel pool and reseeded (or
/// every clone of the snapshot would produce the same random numbers). Run again after a
/// restart, it simply gives a newer token.
pub(super) async fn give_identity(
    svc: &Services,
    job_id: &str,
    vm: &VmHandle,
    hostname: &str,
) -> Result<(), PhaseError> {
    let (job, ttl) = (job_id.to_owned(), svc.config.token_ttl());
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let token = svc
        .store
        .call(move |s| s.issue_token(&job, TokenKind::Bootstrap, ttl_ms))
        .await?;
    let identity = Identity {
        hostname: hostname.to_owned(),
        // The host's wall clock, not the services' (tests may run that one paused).
        unix_time_ms: now_ms(),
        entropy: Entropy::random(IDENTITY_ENTROPY_BYTES),
        bootstrap_path: BOOTSTRAP_PATH.into(),
        bootstrap: BootstrapFile {
            url: svc.guest_url.trim_end_matches('/').to_owned(),
            token,
        },
    };
    let document = serde_json::to_vec(&identity)
        .map_err(|e| PhaseError::Guest(format!("cannot encode the identity: {e}")))?;
    let command = GuestCommand {
        path: RUNNER_PATH.to_owned(),
        args: vec![identity::SUBCOMMAND.to_owned()],
        env: Default::default(),
        stdin: Some(GuestInput::new(document)),
    };
    match exec_to_end(svc, vm, &command).await? {
        ExecStatus::Exited { code: 0 } => {}
        other => {
            return Err(PhaseError::Guest(format!(
                "the guest refused its identity ({RUNNER_PATH} {} ended with {})",
                identity::SUBCOMMAND,
                describe(other)
            )))
        }
    }
    record_event(
        svc,
        job_id,
        "identity",
        &format!(
            "hostname {}, wall clock, entropy and a bootstrap token given through the guest \
             agent",
            hostname
        ),
    )
    .await?;
    Ok(())
}

/// Runs a short command in the guest through its agent and waits for it to end.
pub(super) async fn exec_to_end(
    svc: &Services,
    vm: &VmHandle,
    command: &GuestCommand,
) -> Result<ExecStatus, BackendError> {
    let pid = svc.backend.exec(vm, command).await?;
    loop {
        match svc.backend.exec_status(vm, pid).await? {
            ExecStatus::Running => tokio::time::sleep(EXEC_POLL).await,
            ended => return Ok(ended),
        }
    }
}

/// Adds an event to a job's history and publishes it.
pub(super) async fn record_event(
    svc: &Services,
    job_id: &str,
    kind: &'static str,
    message: &str,
) -> Result<(), StoreError> {
    let (id, message) = (job_id.to_owned(), message.to_owned());
    let event = svc
        .store
        .call(move |s| s.add_event(&id, kind, None, &message))
        .await?;
    svc.hub.publish(event);
    Ok(())
}
