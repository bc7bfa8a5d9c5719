//! Finding, signalling and waiting for a sandbox's QEMU process. A pid is only trusted while
//! `/proc/PID/cmdline` names a file in the sandbox folder, so a pid the kernel reused for some
//! other process is never signalled.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::layout::SandboxPaths;
use super::qmp::QmpClient;
use crate::backend::BackendError;

/// How long one QMP `quit` may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a SIGTERMed QEMU gets before SIGKILL, and how long SIGKILL may take to land.
const TERM_GRACE: Duration = Duration::from_secs(1);
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How often a wait for processes to exit looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Whether `pid` is alive and its command line names a file under the sandbox folder. A zombie
/// has an empty command line, so it counts as gone.
fn is_ours_blocking(pid: i32, marker: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline
        .split(|b| *b == 0)
        .any(|arg| contains(arg, marker.as_bytes()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

fn read_pidfile_blocking(pidfile: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pidfile).ok()?;
    text.trim().parse().ok().filter(|pid| *pid > 0)
}

/// Every live process that is this sandbox's QEMU: the one in the pidfile, plus any that a
/// cancelled launch left before it wrote the pidfile.
fn find_blocking(pidfile: &Path, marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Some(pid) = read_pidfile_blocking(pidfile) {
        if is_ours_blocking(pid, marker) {
            pids.push(pid);
        }
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if !pids.contains(&pid) && is_ours_blocking(pid, marker) {
            pids.push(pid);
        }
    }
    pids
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BackendError::operation("inspect processes", e.to_string()))
}

/// The running QEMU of a sandbox, by its pidfile (cheap: no /proc scan).
pub async fn running_pid(paths: &SandboxPaths) -> Result<Option<i32>, BackendError> {
    let pidfile = paths.pidfile();
    let marker = paths.ownership_marker();
    blocking(move || read_pidfile_blocking(&pidfile).filter(|pid| is_ours_blocking(*pid, &marker)))
        .await
}

/// Stops every QEMU process of a VM folder: QMP `quit` first, then SIGTERM and SIGKILL for
/// whatever is still there after `grace`.
pub async fn stop(paths: &SandboxPaths, grace: Duration) -> Result<(), BackendError> {
    let pids = find(paths).await?;
    if pids.is_empty() {
        return Ok(());
    }
    let qmp_timeout = grace.min(QMP_TIMEOUT);
    if let Ok(mut qmp) = QmpClient::connect(&paths.qmp_socket(), qmp_timeout).await {
        if let Err(e) = qmp.quit(qmp_timeout).await {
            tracing::debug!(dir = %paths.dir.display(), error = %e, "QMP quit failed");
        }
    }
    let remaining = wait_gone(paths, &pids, grace).await?;
    if !remaining.is_empty() {
        tracing::warn!(dir = %paths.dir.display(), pids = ?remaining, "qemu ignored quit; signalling");
    }
    terminate(paths, &remaining, TERM_GRACE, KILL_WAIT).await
}

/// Every live QEMU process of a sandbox (pidfile and a /proc scan).
pub async fn find(paths: &SandboxPaths) -> Result<Vec<i32>, BackendError> {
    let pidfile = paths.pidfile();
    let marker = paths.ownership_marker();
    blocking(move || find_blocking(&pidfile, &marker)).await
}

/// Sends `signal` to those of `pids` that are still ours.
pub async fn signal(
    paths: &SandboxPaths,
    pids: &[i32],
    signal: Signal,
) -> Result<(), BackendError> {
    let marker = paths.ownership_marker();
    let pids = pids.to_vec();
    blocking(move || {
        for pid in pids {
            // Checked right before the signal: the window for pid reuse is the syscall itself.
            if !is_ours_blocking(pid, &marker) {
                continue;
            }
            // ESRCH: it exited in between, which is what we want anyway.
            let _ = kill(Pid::from_raw(pid), signal);
        }
    })
    .await
}

/// Waits until none of `pids` is ours any more, or `limit` passes; returns those still running.
pub async fn wait_gone(
    paths: &SandboxPaths,
    pids: &[i32],
    limit: Duration,
) -> Result<Vec<i32>, BackendError> {
    let deadline = Instant::now() + limit;
    let marker = paths.ownership_marker();
    let mut remaining = pids.to_vec();
    loop {
        let check = remaining.clone();
        let marker = marker.clone();
        remaining = blocking(move || {
            check
                .into_iter()
                .filter(|pid| is_ours_blocking(*pid, &marker))
                .collect()
        })
        .await?;
        if remaining.is_empty() || Instant::now() >= deadline {
            return Ok(remaining);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Sends SIGTERM and waits up to `term_grace`, then SIGKILL and waits up to `kill_wait`.
pub async fn terminate(
    paths: &SandboxPaths,
    pids: &[i32],
    term_grace: Duration,
    kill_wait: Duration,
) -> Result<(), BackendError> {
    let mut remaining = pids.to_vec();
    for (sig, wait) in [(Signal::SIGTERM, term_grace), (Signal::SIGKILL, kill_wait)] {
        if remaining.is_empty() {
            return Ok(());
        }
        signal(paths, &remaining, sig).await?;
        remaining = wait_gone(paths, &remaining, wait).await?;
    }
    if remaining.is_empty() {
        Ok(())
    } else {
        Err(BackendError::operation(
            "destroy",
            format!(
                "qemu pid(s) {remaining:?} of {} survived SIGKILL",
                paths.dir.display()
            ),
        ))
    }
}

/// The last lines of a log file, for error messages.
pub async fn log_tail(path: PathBuf, max_bytes: usize) -> String {
    match tokio::fs::read(&path).await {
        Ok(bytes) => super::tool::tail(&bytes, max_bytes),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finds_signals_and_waits_only_for_processes_naming_the_folder() {
        let root = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::new(root.path(), "sandbox-proc");
        std::fs::create_dir(&paths.dir).unwrap();
        let sibling = SandboxPaths::new(root.path(), "sandbox-procx");
        std::fs::create_dir(&sibling.dir).unwrap();

        // `tail -f FILE` names a file in the folder, never forks, and runs until signalled.
        let spawn = |dir: &Path| {
            let log = dir.join("console.log");
            std::fs::write(&log, b"").unwrap();
            KillOnDrop(
                std::process::Command::new("tail")
                    .arg("-f")
                    .arg(&log)
                    .spawn()
                    .unwrap(),
            )
        };
        let mut ours = spawn(&paths.dir);
        let mut theirs = spawn(&sibling.dir);
        std::fs::write(paths.pidfile(), format!("{}\n", ours.0.id())).unwrap();

        let pid = i32::try_from(ours.0.id()).unwrap();
        assert_eq!(running_pid(&paths).await.unwrap(), Some(pid));
        assert_eq!(find(&paths).await.unwrap(), vec![pid]);

        // A pidfile pointing at somebody else's process is not trusted.
        std::fs::write(sibling.pidfile(), format!("{}\n", ours.0.id())).unwrap();
        assert_eq!(running_pid(&sibling).await.unwrap(), None);

        terminate(
            &paths,
            &[pid],
            Duration::from_secs(2),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        ours.0.wait().unwrap();
        assert!(find(&paths).await.unwrap().is_empty());
        assert!(
            theirs.0.try_wait().unwrap().is_none(),
            "the sibling must survive"
        );
    }

    /// Kills a test's helper process even when an assertion fails first.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
