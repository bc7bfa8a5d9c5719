//! Saving and loading a VM's device state through QEMU's migration stream, the way QEMU's "VM
//! templating" does it (docs/system/vm-templating.rst in QEMU's tree): the guest RAM is a
//! `memory-backend-file`, shared while the template runs and mapped privately by each clone, and
//! the `x-ignore-shared` capability leaves it out of the stream. What the stream carries is the
//! device state and the small RAM blocks QEMU makes itself (option ROMs, ACPI tables): about a
//! megabyte, whatever the guest's memory size.
//!
//! QEMU 7.2 has no `file:` migration URI, so the stream goes through `exec:cat`, which QEMU runs
//! with `/bin/sh -c`: the state file's path is single-quoted, and a path holding a quote is refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use super::qmp::{QmpClient, QmpError};

/// How often a migration's progress is asked for.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The limit on one QMP command within a migration conversation.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("migration {status}: {reason}")]
    Failed { status: String, reason: String },
    #[error("migration did not complete within {0:?}")]
    Timeout(Duration),
    #[error("the state file path {0} cannot be passed to the shell (it holds a quote)")]
    UnsafePath(PathBuf),
}

/// The part of `query-migrate` the conversation reads.
#[derive(Debug, Deserialize)]
struct MigrationInfo {
    status: Option<String>,
    #[serde(rename = "error-desc")]
    error_desc: Option<String>,
}

/// Pauses the VM and writes its device state to `state_file`. The VM stays paused, its RAM in
/// the shared memory file and its disks flushed (QEMU flushes them when it stops a VM), so that
/// RAM file, state file and disk are one consistent moment. QEMU is left running: the caller quits.
pub async fn save_state(
    qmp: &mut QmpClient,
    state_file: &Path,
    timeout: Duration,
) -> Result<(), MigrationError> {
    let uri = format!("exec:cat > {}", shell_quote(state_file)?);
    qmp.execute("stop", None, COMMAND_TIMEOUT).await?;
    ignore_shared_ram(qmp).await?;
    qmp.execute("migrate", Some(json!({ "uri": uri })), COMMAND_TIMEOUT)
        .await?;
    wait_completed(qmp, timeout).await
}

/// Loads the device state from `state_file` into a VM started with `-incoming defer -S` and
/// resumes it. A stream QEMU cannot load (truncated, from another QEMU or another machine shape)
/// makes QEMU 7.2 exit, which shows here as a lost QMP connection: the caller reads qemu's log.
pub async fn load_state(
    qmp: &mut QmpClient,
    state_file: &Path,
    timeout: Duration,
) -> Result<(), MigrationError> {
    let uri = format!("exec:cat {}", shell_quote(state_file)?);
    ignore_shared_ram(qmp).await?;
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": uri })),
        COMMAND_TIMEOUT,
    )
    .await?;
    wait_completed(qmp, timeout).await?;
    qmp.execute("cont", None, COMMAND_TIMEOUT).await?;
    Ok(())
}

async fn ignore_shared_ram(qmp: &mut QmpClient) -> Result<(), MigrationError> {
    let capabilities = json!({
        "capabilities": [{ "capability": "x-ignore-shared", "state": true }]
    });
    qmp.execute(
        "migrate-set-capabilities",
        Some(capabilities),
        COMMAND_TIMEOUT,
    )
    .await?;
    Ok(())
}

async fn wait_completed(qmp: &mut QmpClient, timeout: Duration) -> Result<(), MigrationError> {
    let started = Instant::now();
    loop {
        let reply = qmp.execute("query-migrate", None, COMMAND_TIMEOUT).await?;
        let info: MigrationInfo =
            serde_json::from_value(reply).map_err(|e| QmpError::Protocol {
                command: "query-migrate",
                message: e.to_string(),
            })?;
        match info.status.as_deref() {
            Some("completed") => return Ok(()),
            Some(status @ ("failed" | "cancelled")) => {
                return Err(MigrationError::Failed {
                    status: status.to_owned(),
                    reason: info.error_desc.unwrap_or_else(|| "no reason given".into()),
                })
            }
            _ => {}
        }
        if started.elapsed() >= timeout {
            return Err(MigrationError::Timeout(timeout));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn shell_quote(path: &Path) -> Result<String, MigrationError> {
    let text = path.to_str().filter(|t| !t.contains('\''));
    match text {
        Some(text) => Ok(format!("'{text}'")),
        None => Err(MigrationError::UnsafePath(path.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_paths_are_quoted_for_the_shell_or_refused() {
        assert_eq!(
            shell_quote(Path::new("/var/lib/agentlab/snapshots/a b/state")).unwrap(),
            "'/var/lib/agentlab/snapshots/a b/state'"
        );
        assert!(matches!(
            shell_quote(Path::new("/tmp/it's/state")),
            Err(MigrationError::UnsafePath(_))
        ));
    }
}
