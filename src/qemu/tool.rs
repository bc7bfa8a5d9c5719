//! Runs host tools (qemu-img, mkfs.vfat, mcopy, the qemu launcher) as child processes with a
//! timeout. The child is killed if the caller's future is dropped, and its stderr is kept for the
//! error message.

use std::io;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} did not finish within {timeout:?}")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Runs `command` to completion and returns its output if it exited with status 0.
pub async fn run(mut command: Command, timeout: Duration) -> Result<Output, ToolError> {
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(timeout, command.output()).await {
        Err(_) => return Err(ToolError::Timeout { program, timeout }),
        Ok(Err(source)) => return Err(ToolError::Spawn { program, source }),
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        return Err(ToolError::Failed {
            program,
            status: output.status,
            stderr: tail(&output.stderr, 2000),
        });
    }
    Ok(output)
}

/// The last `max` bytes of a tool's output, as trimmed text.
pub fn tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn success_failure_timeout_and_missing_program() {
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo out"]);
        assert_eq!(
            run(ok, Duration::from_secs(5)).await.unwrap().stdout,
            b"out\n"
        );

        let mut failing = Command::new("sh");
        failing.args(["-c", "echo bad >&2; exit 4"]);
        let err = run(failing, Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(&err, ToolError::Failed { stderr, .. } if stderr == "bad"),
            "{err}"
        );

        let mut slow = Command::new("sleep");
        slow.arg("10");
        let started = std::time::Instant::now();
        let err = run(slow, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, ToolError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));

        let err = run(Command::new("/nonexistent/tool"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, ToolError::Spawn { .. }), "{err}");
    }
}
