//! The CLI's exit codes, which scripts may rely on, and the error type every command returns.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success; for `job run --wait/--follow`, the job COMPLETED |
//! | 1 | the job FAILED (its command exited non-zero, or the job could not run) |
//! | 2 | usage error (bad arguments) |
//! | 3 | the daemon is unreachable (no socket, connection refused, timed out) |
//! | 4 | not found (no such job, sandbox or artifact) |
//! | 5 | the job hit its TIMEOUT |
//! | 6 | the job was CANCELLED |
//! | 7 | any other error the API reported (or a local one, such as a download that fails its digest check) |

use crate::model::JobStatus;

pub const SUCCESS: u8 = 0;
pub const JOB_FAILED: u8 = 1;
pub const USAGE: u8 = 2;
pub const UNREACHABLE: u8 = 3;
pub const NOT_FOUND: u8 = 4;
pub const JOB_TIMEOUT: u8 = 5;
pub const JOB_CANCELLED: u8 = 6;
pub const OTHER: u8 = 7;

/// Shown at the end of `agentlab --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success; with `job run --wait/--follow`, the job COMPLETED
  1  the job FAILED (its command exited non-zero, or it could not run)
  2  usage error
  3  agentlabd is unreachable
  4  not found (job, sandbox or artifact)
  5  the job hit its TIMEOUT
  6  the job was CANCELLED
  7  any other error reported by the API (or a failed download check)";

/// The exit code for a job that has finished (or, for a job still going, success: nothing
/// went wrong yet).
pub fn for_status(status: JobStatus) -> u8 {
    match status {
        JobStatus::Completed | JobStatus::Queued | JobStatus::Running => SUCCESS,
        JobStatus::Failed => JOB_FAILED,
        JobStatus::Timeout => JOB_TIMEOUT,
        JobStatus::Cancelled => JOB_CANCELLED,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach agentlabd at {target}: {detail}")]
    Unreachable { target: String, detail: String },
    #[error("{message}")]
    NotFound { message: String },
    #[error("agentlabd answered {status} ({code}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from agentlabd: {0}")]
    Protocol(String),
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Download(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => UNREACHABLE,
            CliError::NotFound { .. } => NOT_FOUND,
            CliError::Usage(_) => USAGE,
            CliError::Api { .. }
            | CliError::Protocol(_)
            | CliError::Io { .. }
            | CliError::Download(_) => OTHER,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CliError::Io {
            context: context.into(),
            source,
        }
    }

    /// Output to a closed pipe (`agentlab job logs ID | head`) is the reader's choice, not a
    /// failure worth a message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_statuses_map_to_documented_codes() {
        assert_eq!(for_status(JobStatus::Completed), 0);
        assert_eq!(for_status(JobStatus::Failed), 1);
        assert_eq!(for_status(JobStatus::Timeout), 5);
        assert_eq!(for_status(JobStatus::Cancelled), 6);
    }

    #[test]
    fn errors_map_to_documented_codes() {
        let unreachable = CliError::Unreachable {
            target: "x".into(),
            detail: "y".into(),
        };
        assert_eq!(unreachable.exit_code(), 3);
        assert_eq!(
            CliError::NotFound {
                message: "m".into()
            }
            .exit_code(),
            4
        );
        assert_eq!(CliError::Usage("u".into()).exit_code(), 2);
        let api = CliError::Api {
            status: 409,
            code: "conflict".into(),
            message: "already terminal".into(),
        };
        assert_eq!(api.exit_code(), 7);
        assert_eq!(
            api.to_string(),
            "agentlabd answered 409 (conflict): already terminal"
        );
        assert_eq!(CliError::Download("bad digest".into()).exit_code(), 7);
    }

    #[test]
    fn the_help_text_lists_every_code() {
        for code in 0..=7 {
            assert!(EXIT_CODES_HELP.contains(&format!("\n  {code}  ")));
        }
    }
}
