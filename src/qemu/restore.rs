//! Restoring one sandbox from a template snapshot: QEMU is launched paused and waiting for an
//! incoming migration, with the snapshot's memory file mapped privately; the device state is
//! loaded from the snapshot's state file, the VM resumed, and the restore only counts once the
//! guest agent answers. Anything short of that is a failed restore, and its reason says why in
//! words the job's events can carry (QEMU's own complaint included).

use std::time::{Duration, Instant};

use super::launch::{self, LaunchPlan};
use super::migration;
use super::process;
use super::qga::QgaClient;
use super::qmp::QmpClient;
use super::snapshot::SnapshotFiles;

/// How long QEMU's QMP socket may take to accept a client after the launcher returned.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Between two guest-agent pings of a restored guest.
const AGENT_POLL: Duration = Duration::from_millis(20);

/// Why a restore failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RestoreFailed(pub String);

/// Restores the VM `plan` describes (its `memory` must be `GuestMemory::Restore` on `files`'
/// memory file) and returns the connected guest agent once it answered. `timeout` covers the
/// load and the agent's first answer; `agent_ping_timeout` bounds each ping.
pub async fn restore(
    plan: &LaunchPlan<'_>,
    files: &SnapshotFiles,
    launch_timeout: Duration,
    timeout: Duration,
    agent_ping_timeout: Duration,
) -> Result<QgaClient, RestoreFailed> {
    if let Some(missing) = files.missing_file().await {
        return Err(RestoreFailed(format!("{} is gone", missing.display())));
    }
    let paths = plan.paths;
    launch::launch(plan, launch_timeout)
        .await
        .map_err(|e| RestoreFailed(e.to_string()))?;
    let started = Instant::now();
    let loaded = async {
        let mut qmp = QmpClient::connect(&paths.qmp_socket(), QMP_CONNECT_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        migration::load_state(&mut qmp, &files.state(), timeout)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    if let Err(reason) = loaded {
        return Err(failed(paths, "loading the device state", reason).await);
    }
    let mut agent = QgaClient::new(paths.qga_socket());
    loop {
        match agent.ping(agent_ping_timeout).await {
            Ok(()) => return Ok(agent),
            Err(e) if started.elapsed() >= timeout => {
                return Err(failed(
                    paths,
                    "waiting for the guest agent",
                    format!("no answer within {timeout:?} ({e})"),
                )
                .await)
            }
            Err(_) => {}
        }
        if matches!(process::running_pid(paths).await, Ok(None)) {
            return Err(failed(
                paths,
                "waiting for the guest agent",
                "the VM stopped".into(),
            )
            .await);
        }
        tokio::time::sleep(AGENT_POLL).await;
    }
}

/// A failure's reason with QEMU's own last words, which say why a stream did not load.
async fn failed(paths: &super::layout::SandboxPaths, step: &str, reason: String) -> RestoreFailed {
    let qemu_log = process::log_tail(paths.qemu_log(), 400).await;
    let qemu_log = qemu_log.trim();
    if qemu_log.is_empty() {
        RestoreFailed(format!("{step}: {reason}"))
    } else {
        RestoreFailed(format!("{step}: {reason}; qemu: {qemu_log}"))
    }
}
