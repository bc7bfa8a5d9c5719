//! The `agentlab` command line: submit and watch jobs, inspect sandboxes, over the daemon's
//! control API (Unix socket by default, TCP with `--endpoint`).
//!
//! Exit codes, which scripts may rely on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success; for `job run --wait/--follow`, the job COMPLETED |
//! | 1 | the job FAILED (its command exited non-zero, or it could not run) |
//! | 2 | usage error |
//! | 3 | the daemon is unreachable |
//! | 4 | not found (job, sandbox or artifact) |
//! | 5 | the job hit its TIMEOUT |
//! | 6 | the job was CANCELLED |
//! | 7 | any other error the API reported (or a download failing its digest check) |

pub mod args;
pub mod client;
pub mod commands;
pub mod exit;
pub mod follow;
pub mod format;
pub mod sse;

use std::io::Write;

pub use args::Cli;
pub use exit::CliError;

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: &Cli) -> u8 {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut out = stdout.lock();
    let mut err = stderr.lock();
    match commands::execute(cli, &mut out, &mut err) {
        Ok(code) => code,
        Err(e) if e.is_broken_pipe() => exit::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            let _ = writeln!(err, "agentlab: {e}");
            e.exit_code()
        }
    }
}
