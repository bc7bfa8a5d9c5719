//! Running `qm` and `pvesh`. Every command is an argv list handed to the kernel through duct, never
//! a shell string, so no argument is ever re-parsed; an argument holding a control character is
//! refused before anything runs. Each command has a timeout: past it, its process group gets
//! SIGTERM (so `qm` can clean up), then SIGKILL after a grace period.
//!
//! `CommandRunner` is the seam the contract tests replace with a recorder. Its `run` blocks, so
//! the backend calls it from `spawn_blocking`, never on an executor thread.

use std::fmt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::process::{kill_process_group, Pid, Signal};

/// How long a killed command may take to be reaped before it is left to a background thread.
const REAP_WAIT: Duration = Duration::from_secs(2);

/// The two Proxmox tools the backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tool {
    Qm,
    Pvesh,
}

impl Tool {
    pub fn as_str(self) -> &'static str {
        match self {
            Tool::Qm => "qm",
            Tool::Pvesh => "pvesh",
        }
    }
}

/// One command to run: the tool, its arguments (without the program name) and its timeout.
#[derive(Clone, PartialEq, Eq)]
pub struct Invocation {
    pub tool: Tool,
    pub args: Vec<String>,
    pub timeout: Duration,
    /// Whether the arguments may be written to logs. Guest commands carry the job's arguments,
    /// which stay out of them.
    pub loggable: bool,
    /// Bytes for the command's stdin (`qm guest exec --pass-stdin 1` forwards them to the guest);
    /// None gives it /dev/null. Never logged: they can carry a token.
    pub stdin: Option<Vec<u8>>,
}

impl Invocation {
    pub fn new(
        tool: Tool,
        args: impl IntoIterator<Item = impl Into<String>>,
        timeout: Duration,
    ) -> Self {
        Invocation {
            tool,
            args: args.into_iter().map(Into::into).collect(),
            timeout,
            loggable: true,
            stdin: None,
        }
    }

    /// The command as a reader would type it, or its first two words when it is not loggable.
    pub fn display(&self) -> String {
        if self.loggable {
            format!("{} {}", self.tool.as_str(), self.args.join(" "))
        } else {
            let head: Vec<&str> = self.args.iter().take(2).map(String::as_str).collect();
            format!("{} {} …", self.tool.as_str(), head.join(" "))
        }
    }
}

impl fmt::Debug for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invocation")
            .field("command", &self.display())
            .field("timeout", &self.timeout)
            .field("stdin_bytes", &self.stdin.as_ref().map(Vec::len))
            .finish()
    }
}

/// What a command that ran to its end left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The exit code; None when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// A successful output with `stdout`, for tests and recorders.
    pub fn ok(stdout: impl Into<String>) -> Self {
        CommandOutput {
            code: Some(0),
            signal: None,
            stdout: stdout.into(),
            stderr: String::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// A failed output (exit code 255, as `qm` exits on an error) with `stderr`.
    pub fn failed(stderr: impl Into<String>) -> Self {
        CommandOutput {
            code: Some(255),
            signal: None,
            stdout: String::new(),
            stderr: stderr.into(),
            elapsed: Duration::ZERO,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("refusing to run {tool}: argument {index} holds a control character")]
    ControlCharacter { tool: &'static str, index: usize },
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {command}: {source}")]
    Wait {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} timed out after {seconds:.0}s and was killed")]
    Timeout { command: String, seconds: f64 },
}

/// Runs one invocation to its end (or its timeout). Blocking.
pub trait CommandRunner: Send + Sync + fmt::Debug {
    fn run(&self, invocation: &Invocation) -> Result<CommandOutput, CommandError>;
}

/// Refuses arguments that hold control characters (newlines, NUL, escapes, C1 controls): no `qm`
/// argument needs one, and they are how a value smuggles a second line into a config file or a
/// log.
pub fn check_args(invocation: &Invocation) -> Result<(), CommandError> {
    match invocation
        .args
        .iter()
        .position(|arg| arg.chars().any(char::is_control))
    {
        Some(index) => Err(CommandError::ControlCharacter {
            tool: invocation.tool.as_str(),
            index,
        }),
        None => Ok(()),
    }
}

/// The production runner: the configured `qm` and `pvesh` binaries through duct.
#[derive(Debug, Clone)]
pub struct DuctRunner {
    pub qm: PathBuf,
    pub pvesh: PathBuf,
    /// Between SIGTERM and SIGKILL on a timeout.
    pub kill_grace: Duration,
}

impl DuctRunner {
    fn program(&self, tool: Tool) -> &PathBuf {
        match tool {
            Tool::Qm => &self.qm,
            Tool::Pvesh => &self.pvesh,
        }
    }
}

impl CommandRunner for DuctRunner {
    fn run(&self, invocation: &Invocation) -> Result<CommandOutput, CommandError> {
        check_args(invocation)?;
        let program = self.program(invocation.tool);
        let started = Instant::now();
        // As an OsStr, not a Path: duct turns a relative Path into `./qm`, which would defeat the
        // PATH lookup of the default `qm`/`pvesh`.
        let expression = duct::cmd(program.as_os_str(), &invocation.args);
        let expression = match &invocation.stdin {
            // duct writes them from a thread of its own and closes the pipe after them.
            Some(bytes) => expression.stdin_bytes(bytes.clone()),
            None => expression.stdin_null(),
        };
        let handle = expression
            .stdout_capture()
            .stderr_capture()
            .unchecked()
            // Its own process group, so a timeout reaches the workers `qm` forks as well.
            .before_spawn(|command| {
                command.process_group(0);
                Ok(())
            })
            .start()
            .map_err(|source| CommandError::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        let wait_error = |source| CommandError::Wait {
            command: invocation.display(),
            source,
        };
        if let Some(output) = handle
            .wait_timeout(invocation.timeout)
            .map_err(wait_error)?
        {
            return Ok(CommandOutput {
                code: output.status.code(),
                signal: output.status.signal(),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
                elapsed: started.elapsed(),
            });
        }
        let group = handle
            .pids()
            .first()
            .and_then(|pid| i32::try_from(*pid).ok())
            .and_then(Pid::from_raw);
        signal_group(group, Signal::TERM);
        if !matches!(handle.wait_timeout(self.kill_grace), Ok(Some(_))) {
            signal_group(group, Signal::KILL);
            // duct's own kill reaches the child even if it left the group.
            let _ = handle.kill();
            if !matches!(handle.wait_timeout(REAP_WAIT), Ok(Some(_))) {
                // Something outside the group still holds the output pipes; reap it later
                // rather than block this thread.
                std::thread::spawn(move || {
                    let _ = handle.wait();
                });
            }
        }
        tracing::warn!(command = %invocation.display(), timeout = ?invocation.timeout, "command timed out and was killed");
        Err(CommandError::Timeout {
            command: invocation.display(),
            seconds: invocation.timeout.as_secs_f64(),
        })
    }
}

fn signal_group(group: Option<Pid>, signal: Signal) {
    if let Some(group) = group {
        // ESRCH (the group is already gone) is what we want anyway.
        let _ = kill_process_group(group, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(dir: &std::path::Path) -> DuctRunner {
        DuctRunner {
            qm: dir.join("qm"),
            pvesh: dir.join("pvesh"),
            kill_grace: Duration::from_millis(300),
        }
    }

    fn script(dir: &std::path::Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn arguments_reach_the_program_verbatim_and_output_is_captured() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "qm",
            r#"for a in "$@"; do printf '<%s>' "$a"; done; echo; echo oops >&2; exit 3"#,
        );
        let invocation = Invocation::new(
            Tool::Qm,
            ["set", "101", "--name", "a b;$(touch x)", "*", "--"],
            Duration::from_secs(10),
        );
        let output = runner(dir.path()).run(&invocation).unwrap();
        assert_eq!(output.stdout, "<set><101><--name><a b;$(touch x)><*><-->\n");
        assert_eq!(output.stderr, "oops\n");
        assert_eq!(output.code, Some(3));
        assert!(!output.success());
        assert!(
            !dir.path().join("x").exists(),
            "no shell ever saw the argument"
        );
    }

    #[test]
    fn stdin_bytes_reach_the_program_and_end_in_eof() {
        let dir = tempfile::tempdir().unwrap();
        // `cat` only ends once its stdin is closed.
        script(dir.path(), "qm", "cat; echo '<eof>'");
        let mut invocation = Invocation::new(Tool::Qm, ["guest"], Duration::from_secs(10));
        invocation.stdin = Some(b"{\"token\":\"t\"}\n".to_vec());
        let output = runner(dir.path()).run(&invocation).unwrap();
        assert_eq!(output.stdout, "{\"token\":\"t\"}\n<eof>\n");
        assert!(
            !format!("{invocation:?}").contains("token"),
            "{invocation:?}"
        );
        // Without bytes, stdin is empty rather than the daemon's own.
        invocation.stdin = None;
        let output = runner(dir.path()).run(&invocation).unwrap();
        assert_eq!(output.stdout, "<eof>\n");
    }

    #[test]
    fn control_characters_are_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "qm", "touch \"$0.ran\"");
        for bad in [
            "a\nb",
            "nul\0",
            "tab\t",
            "esc\u{1b}[0m",
            "c1\u{85}",
            "del\u{7f}",
        ] {
            let invocation = Invocation::new(Tool::Qm, ["set", "101", bad], Duration::from_secs(5));
            let err = runner(dir.path()).run(&invocation).unwrap_err();
            assert!(
                matches!(err, CommandError::ControlCharacter { index: 2, .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(!dir.path().join("qm.ran").exists());
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child.pid");
        // A worker that ignores SIGTERM, like a stuck task: only SIGKILL ends it.
        script(
            dir.path(),
            "pvesh",
            &format!(
                "trap '' TERM; sleep 30 & echo $! > {}; wait",
                marker.display()
            ),
        );
        let invocation =
            Invocation::new(Tool::Pvesh, ["get", "/nodes"], Duration::from_millis(300));
        let started = Instant::now();
        let err = runner(dir.path()).run(&invocation).unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let child: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for init.
            if stat.is_empty() || stat.contains(") Z ") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the forked child survived the timeout"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_bare_program_name_is_looked_up_on_path() {
        let runner = DuctRunner {
            qm: PathBuf::from("sh"),
            pvesh: PathBuf::from("sh"),
            kill_grace: Duration::from_millis(300),
        };
        let invocation = Invocation::new(Tool::Qm, ["-c", "echo found"], Duration::from_secs(5));
        assert_eq!(runner.run(&invocation).unwrap().stdout, "found\n");
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let invocation = Invocation::new(Tool::Qm, ["list"], Duration::from_secs(5));
        let err = runner(dir.path()).run(&invocation).unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }), "{err}");
    }

    #[test]
    fn unloggable_invocations_show_only_their_first_words() {
        let mut invocation = Invocation::new(
            Tool::Qm,
            ["guest", "exec", "101", "--", "/bin/secret", "token"],
            Duration::from_secs(1),
        );
        invocation.loggable = false;
        assert_eq!(invocation.display(), "qm guest exec …");
        assert!(!format!("{invocation:?}").contains("token"));
    }
}
