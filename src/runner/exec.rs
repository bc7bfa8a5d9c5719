//! Running the job's command: `/bin/sh -c COMMAND` in the checkout, in its own process group,
//! with the task on stdin, its output pumped into the log queue, and a run timeout that takes
//! down the whole group.
//!
//! stdout and stderr share one pipe, as with `2>&1`: the log is one stream, and two pipes read by
//! two threads could not keep the order in which the command wrote to them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rustix::pipe::{pipe_with, PipeFlags};
use rustix::process::{kill_process_group, Pid, Signal};

use super::error::RunnerError;
use super::logs::{pump, LogQueue};
use super::mask::Masker;

/// The exit code reported for a command killed by the run timeout, as `timeout(1)` does.
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// Used only when neither the runner's environment nor the job sets them: a process started by
/// the guest agent may have next to no environment, and git and most tools want both.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_HOME: &str = "/root";

#[derive(Debug, Clone)]
pub struct CommandSpec<'a> {
    pub command: &'a str,
    pub task: &'a str,
    pub job_id: &'a str,
    pub env: &'a BTreeMap<String, String>,
    pub dir: &'a Path,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecSettings {
    /// Between SIGTERM and SIGKILL on a timeout.
    pub kill_grace: Duration,
    /// How long the pipes may stay open after the command exits (a background process that
    /// inherited them) before the group is killed and its output abandoned.
    pub drain_grace: Duration,
}

impl Default for ExecSettings {
    fn default() -> Self {
        ExecSettings {
            kill_grace: Duration::from_secs(5),
            drain_grace: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub exit_code: i32,
    pub timed_out: bool,
}

/// Sets the variables the command needs that the job does not set itself.
pub fn apply_env(cmd: &mut Command, env: &BTreeMap<String, String>) {
    for (key, default) in [("PATH", DEFAULT_PATH), ("HOME", DEFAULT_HOME)] {
        if std::env::var_os(key).is_none() && !env.contains_key(key) {
            cmd.env(key, default);
        }
    }
    cmd.envs(env);
}

fn signal_group(pgid: Option<Pid>, signal: Signal) {
    if let Some(pgid) = pgid {
        // ESRCH (the group is already gone) is the outcome we want anyway.
        let _ = kill_process_group(pgid, signal);
    }
}

/// Runs the command to its end (or its timeout) and returns its exit code. Output goes to
/// `queue`, masked by `masker`.
pub fn run_command(
    spec: &CommandSpec<'_>,
    settings: &ExecSettings,
    masker: &Masker,
    queue: &Arc<LogQueue>,
) -> Result<Outcome, RunnerError> {
    let (output, output_writer) =
        pipe_with(PipeFlags::CLOEXEC).map_err(|e| RunnerError::Spawn(e.into()))?;
    let stderr_writer = output_writer.try_clone().map_err(RunnerError::Spawn)?;
    let mut child = {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(spec.command)
            .current_dir(spec.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(output_writer))
            .stderr(Stdio::from(stderr_writer))
            // Its own group, so a timeout reaches everything the command started.
            .process_group(0);
        apply_env(&mut cmd, spec.env);
        cmd.env("AGENTLAB_TASK", spec.task)
            .env("AGENTLAB_JOB_ID", spec.job_id);
        let child = cmd.spawn().map_err(RunnerError::Spawn)?;
        // Dropping `cmd` here closes the runner's copies of the write end, so the pump sees
        // EOF once the command's processes are gone.
        child
    };
    let pgid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);

    let (pipes_done_tx, pipes_done) = mpsc::channel::<()>();
    spawn_pump(File::from(output), masker.fresh(), queue, pipes_done_tx);
    let pumps = 1;
    if let Some(mut stdin) = child.stdin.take() {
        let task = spec.task.as_bytes().to_vec();
        // A command that never reads stdin must not block the runner on a full pipe; EPIPE
        // from one that exits early is expected.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&task);
        });
    }

    let exited = spawn_waiter(child);
    let mut timed_out = false;
    let status = match exited.recv_timeout(spec.timeout) {
        Ok(status) => status,
        Err(_) => {
            timed_out = true;
            queue.note(&format!(
                "run timeout of {}s reached: stopping the command",
                spec.timeout.as_secs()
            ));
            signal_group(pgid, Signal::TERM);
            match exited.recv_timeout(settings.kill_grace) {
                Ok(status) => status,
                Err(_) => {
                    signal_group(pgid, Signal::KILL);
                    exited.recv().map_err(|_| {
                        RunnerError::io(
                            "wait for the command",
                            std::io::Error::other("waiter thread vanished"),
                        )
                    })?
                }
            }
        }
    };
    let status = status.map_err(|e| RunnerError::io("wait for the command", e))?;
    if timed_out {
        // Stragglers that ignored SIGTERM while the shell itself exited.
        signal_group(pgid, Signal::KILL);
    }

    if !wait_for_pipes(&pipes_done, pumps, settings.drain_grace) {
        signal_group(pgid, Signal::KILL);
        if !wait_for_pipes(&pipes_done, pumps, settings.drain_grace) {
            queue.note("output of processes that outlived the command is not collected");
        }
    }

    let exit_code = if timed_out {
        TIMEOUT_EXIT_CODE
    } else {
        exit_code(status)
    };
    Ok(Outcome {
        exit_code,
        timed_out,
    })
}

/// The shell's convention: the code, or 128 + the signal that killed the process.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

fn spawn_pump(
    source: impl std::io::Read + Send + 'static,
    masker: Masker,
    queue: &Arc<LogQueue>,
    done: mpsc::Sender<()>,
) {
    let queue = Arc::clone(queue);
    std::thread::spawn(move || {
        pump(source, masker, &queue);
        let _ = done.send(());
    });
}

fn spawn_waiter(mut child: Child) -> mpsc::Receiver<std::io::Result<ExitStatus>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    rx
}

/// True when all `pumps` pipes closed within `grace`. Counts down across calls.
fn wait_for_pipes(done: &mpsc::Receiver<()>, pumps: usize, grace: Duration) -> bool {
    let deadline = std::time::Instant::now() + grace;
    let mut seen = 0;
    while seen < pumps {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match done.recv_timeout(left) {
            Ok(()) => seen += 1,
            // Every pump has already reported (in an earlier call) and hung up.
            Err(mpsc::RecvTimeoutError::Disconnected) => return true,
            Err(mpsc::RecvTimeoutError::Timeout) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::logs::{spawn_shipper, LogSettings, LogSink};
    use std::sync::Mutex;
    use std::time::Instant;

    #[derive(Default)]
    struct Collect(Mutex<Vec<u8>>);

    impl LogSink for Collect {
        fn send(&self, batch: &[u8]) -> Result<(), RunnerError> {
            self.0.lock().unwrap().extend_from_slice(batch);
            Ok(())
        }
    }

    fn run(command: &str, timeout: Duration, env: &[(&str, &str)]) -> (Outcome, String) {
        let dir = tempfile::tempdir().unwrap();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let masker = Masker::new(env.values());
        let queue = LogQueue::new(1 << 20);
        let sink = Arc::new(Collect::default());
        let shipper = spawn_shipper(Arc::clone(&queue), sink.clone(), LogSettings::default());
        let spec = CommandSpec {
            command,
            task: "the task\nline two",
            job_id: "job-1",
            env: &env,
            dir: dir.path(),
            timeout,
        };
        let settings = ExecSettings {
            kill_grace: Duration::from_millis(500),
            drain_grace: Duration::from_millis(500),
        };
        let outcome = run_command(&spec, &settings, &masker, &queue).unwrap();
        queue.close();
        shipper.join().unwrap();
        let log = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        (outcome, log)
    }

    #[test]
    fn passes_task_env_and_exit_code() {
        let (outcome, log) = run(
            "echo \"id=$AGENTLAB_JOB_ID\"; echo \"task=$AGENTLAB_TASK\" | head -n1; \
             read first; echo \"stdin=$first\"; echo \"key=$API_KEY short=$SHORT\"; pwd >/dev/null; exit 7",
            Duration::from_secs(30),
            &[("API_KEY", "sk-live-1234567"), ("SHORT", "abc")],
        );
        assert_eq!(
            outcome,
            Outcome {
                exit_code: 7,
                timed_out: false
            }
        );
        assert_eq!(
            log,
            "id=job-1\ntask=the task\nstdin=the task\nkey=*** short=abc\n"
        );
    }

    #[test]
    fn stdout_and_stderr_keep_the_order_they_were_written_in() {
        let script = "i=0; while [ $i -lt 200 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done";
        let (outcome, log) = run(script, Duration::from_secs(30), &[]);
        assert_eq!(outcome.exit_code, 0);
        let expected: String = (0..200).map(|i| format!("out{i}\nerr{i}\n")).collect();
        assert_eq!(log, expected);
    }

    #[test]
    fn a_timeout_kills_the_whole_group_and_reports_124() {
        let started = Instant::now();
        // The background sleep holds the pipes open: only a group kill ends this quickly.
        let (outcome, log) = run(
            "sleep 60 & trap '' TERM; echo started; sleep 60",
            Duration::from_millis(300),
            &[],
        );
        assert_eq!(outcome.exit_code, TIMEOUT_EXIT_CODE);
        assert!(outcome.timed_out);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(log.starts_with("started\n"), "{log}");
        assert!(log.contains("run timeout"), "{log}");
    }

    #[test]
    fn a_background_process_holding_the_pipes_does_not_hang_the_runner() {
        let started = Instant::now();
        let (outcome, log) = run("sleep 60 & echo done", Duration::from_secs(30), &[]);
        assert_eq!(outcome.exit_code, 0);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(log.starts_with("done\n"), "{log}");
    }

    #[test]
    fn a_signal_death_maps_to_128_plus_the_signal() {
        let (outcome, _) = run("kill -9 $$", Duration::from_secs(30), &[]);
        assert_eq!(outcome.exit_code, 128 + 9);
    }
}
