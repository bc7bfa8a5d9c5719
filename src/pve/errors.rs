//! What went wrong with a `qm`/`pvesh` command, in the terms the backend acts on. `qm` reports
//! every failure as text on stderr with a non-zero exit, so `classify` reads that text: the
//! patterns come from the qemu-server and pve-manager sources and the messages operators see.
//! Every error keeps the command and its stderr, because that is what an operator searches for.

use super::command::{CommandError, CommandOutput};
use crate::backend::BackendError;

/// The failures the backend treats differently from "it failed".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The VM's config file does not exist: it was never made or is already gone.
    VmMissing,
    /// The VM's config is locked by another task, or its lock could not be taken in time; the
    /// same command is likely to work a moment later.
    Busy,
    /// The VMID was taken between `pvesh get /cluster/nextid` and the clone.
    IdTaken,
    /// The template's storage cannot make a linked clone of one of its disks.
    LinkedCloneUnsupported,
    /// The VM runs but its guest agent does not answer (yet).
    AgentNotRunning,
    /// The VM has no `agent` option at all; waiting will not help.
    AgentNotConfigured,
    VmNotRunning,
    AlreadyRunning,
    /// The guest agent forgot the process (it reports an exit once, or never ran it).
    UnknownPid,
    Other,
}

/// Reads a failed command's stderr. The order matters: an id collision also mentions "VM", a lock
/// timeout also says "got timeout".
pub fn classify(stderr: &str) -> ErrorClass {
    let text = stderr.to_ascii_lowercase();
    let has = |needle: &str| text.contains(needle);
    if has("already exists") && (has("unable to create vm") || has("on node")) {
        return ErrorClass::IdTaken;
    }
    if has("can't lock file") || has("is locked (") || has("lock request timeout") {
        return ErrorClass::Busy;
    }
    if (has("linked clone") && (has("not supported") || has("not available")))
        || has("snapshot feature is not available")
        || has("clone feature is not available")
    {
        return ErrorClass::LinkedCloneUnsupported;
    }
    if (has("configuration file") && has("does not exist")) || has("no such vm") {
        return ErrorClass::VmMissing;
    }
    if has("no qemu guest agent configured") {
        return ErrorClass::AgentNotConfigured;
    }
    if has("guest agent is not running")
        || (has("qmp command 'guest-") && (has("got timeout") || has("timeout")))
        || has("guest agent is not available")
    {
        return ErrorClass::AgentNotRunning;
    }
    if has("already running") {
        return ErrorClass::AlreadyRunning;
    }
    if has("not running") && has("vm ") {
        return ErrorClass::VmNotRunning;
    }
    if has("invalid parameter 'pid'") || (has("pid") && has("does not exist")) {
        return ErrorClass::UnknownPid;
    }
    ErrorClass::Other
}

#[derive(Debug, thiserror::Error)]
pub enum PveError {
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The command ran and failed; `stderr` is what it said.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        class: ErrorClass,
        status: String,
        stderr: String,
    },
    /// The command succeeded but printed something this backend cannot read.
    #[error("`{command}` printed what this backend cannot read ({problem}): {output}")]
    Unreadable {
        command: String,
        problem: String,
        output: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl PveError {
    /// The error for a command whose output says it failed.
    pub fn failed(command: String, output: &CommandOutput) -> Self {
        let stderr = output.stderr.trim();
        // Some failures (a task that died) only say so on stdout.
        let text = if stderr.is_empty() {
            output.stdout.trim()
        } else {
            stderr
        };
        let status = match (output.code, output.signal) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "no exit status".to_owned(),
        };
        PveError::Failed {
            command,
            // A task's own log (on stdout) may say more than the final line on stderr.
            class: classify(&format!("{}\n{}", output.stderr, output.stdout)),
            status,
            stderr: tail(text, 2000),
        }
    }

    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            PveError::Failed { class, .. } => Some(*class),
            _ => None,
        }
    }

    pub fn is(&self, class: ErrorClass) -> bool {
        self.class() == Some(class)
    }

    /// The backend's error for this failure of `operation`.
    pub fn into_backend(self, operation: &'static str) -> BackendError {
        match self {
            PveError::Command(CommandError::Timeout { seconds, .. }) => {
                BackendError::Timeout { operation, seconds }
            }
            PveError::Command(CommandError::ControlCharacter { .. }) | PveError::Invalid(_) => {
                BackendError::InvalidInput(self.to_string())
            }
            PveError::Command(CommandError::Spawn { program, source }) => BackendError::Io {
                context: format!("{operation}: starting {program} (is this a Proxmox VE host?)"),
                source,
            },
            PveError::Command(CommandError::Wait { command, source }) => BackendError::Io {
                context: format!("{operation}: waiting for {command}"),
                source,
            },
            PveError::Io { context, source } => BackendError::Io {
                context: format!("{operation}: {context}"),
                source,
            },
            PveError::Failed {
                class: ErrorClass::AgentNotRunning,
                ..
            } => BackendError::AgentUnavailable(self.to_string()),
            other => BackendError::operation(operation, other.to_string()),
        }
    }
}

/// The last `max` bytes of `text` (on a character boundary): the end of a task log says why.
fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stderr as `qm`/`pvesh` print it (from proxmox-cli reference notes and the qemu-server,
    /// pve-common and pve-cluster sources), and the class each must get.
    const SAMPLES: &[(&str, ErrorClass)] = &[
        (
            "Configuration file 'nodes/pve/qemu-server/101.conf' does not exist\n",
            ErrorClass::VmMissing,
        ),
        ("no such VM ('101')\n", ErrorClass::VmMissing),
        (
            "can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout\n",
            ErrorClass::Busy,
        ),
        ("VM is locked (clone)\n", ErrorClass::Busy),
        ("VM is locked (backup)\n", ErrorClass::Busy),
        (
            "trying to acquire cfs lock 'storage-local-zfs' ...\ncfs-lock 'storage-local-zfs' error: got lock request timeout\n",
            ErrorClass::Busy,
        ),
        (
            "unable to create VM 101 - VM 101 already exists on node 'pve'\n",
            ErrorClass::IdTaken,
        ),
        (
            "unable to create VM 101: config file already exists\n",
            ErrorClass::IdTaken,
        ),
        (
            "400 Parameter verification failed.\nfull: linked clone feature is not supported for drive 'scsi0'\n",
            ErrorClass::LinkedCloneUnsupported,
        ),
        (
            "Linked clone feature is not supported for drive 'virtio0'\n",
            ErrorClass::LinkedCloneUnsupported,
        ),
        (
            "Linked clone feature for 'local:9000/base-9000-disk-0.raw' is not available\n",
            ErrorClass::LinkedCloneUnsupported,
        ),
        (
            "parameter 'storage' not allowed for linked clones\n",
            ErrorClass::Other,
        ),
        ("QEMU guest agent is not running\n", ErrorClass::AgentNotRunning),
        (
            "VM 101 qmp command 'guest-ping' failed - got timeout\n",
            ErrorClass::AgentNotRunning,
        ),
        ("No QEMU guest agent configured\n", ErrorClass::AgentNotConfigured),
        ("VM 101 not running\n", ErrorClass::VmNotRunning),
        ("VM 101 is not running\n", ErrorClass::VmNotRunning),
        ("VM 101 already running\n", ErrorClass::AlreadyRunning),
        ("Agent error: Invalid parameter 'pid'\n", ErrorClass::UnknownPid),
        (
            "storage 'local-zfs' does not exist\n",
            ErrorClass::Other,
        ),
        ("400 Parameter verification failed.\ncores: invalid format\n", ErrorClass::Other),
    ];

    #[test]
    fn stderr_samples_get_their_class() {
        for (stderr, class) in SAMPLES {
            assert_eq!(classify(stderr), *class, "{stderr:?}");
        }
    }

    #[test]
    fn failures_keep_the_command_and_its_stderr() {
        let err = PveError::failed(
            "qm start 101".into(),
            &CommandOutput::failed("VM is locked (clone)\n"),
        );
        assert!(err.is(ErrorClass::Busy));
        let text = err.into_backend("start").to_string();
        assert!(text.contains("qm start 101"), "{text}");
        assert!(text.contains("VM is locked (clone)"), "{text}");
        assert!(text.contains("exit 255"), "{text}");
    }

    #[test]
    fn agent_failures_are_agent_unavailable_and_timeouts_are_timeouts() {
        let err = PveError::failed(
            "qm guest cmd 101 ping".into(),
            &CommandOutput::failed("QEMU guest agent is not running\n"),
        );
        assert!(matches!(
            err.into_backend("guest ping"),
            BackendError::AgentUnavailable(message) if message.contains("not running")
        ));
        let err = PveError::Command(CommandError::Timeout {
            command: "qm clone 9000 101".into(),
            seconds: 120.0,
        });
        assert!(matches!(
            err.into_backend("clone"),
            BackendError::Timeout {
                operation: "clone",
                ..
            }
        ));
    }

    #[test]
    fn long_task_logs_keep_their_end() {
        let log = format!(
            "{}\nclone failed: out of space",
            "progress line\n".repeat(500)
        );
        let err = PveError::failed("qm clone".into(), &CommandOutput::failed(log));
        let text = err.to_string();
        assert!(text.ends_with("clone failed: out of space"), "{text}");
        assert!(text.len() < 2200);
    }
}
