//! `agentlab-runner`: runs one job inside a sandbox. Started by the daemon through the guest
//! agent; exits with the job command's exit code (124 when the run timeout killed it), or 125
//! when it could not get a job to run at all.

use std::path::PathBuf;
use std::process::ExitCode;

use agentlab::runner::{self, RunnerConfig, DEFAULT_BOOTSTRAP_PATH, RUNNER_FAILURE_EXIT_CODE};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "agentlab-runner",
    version,
    about = "Runs one AgentLab job inside its sandbox"
)]
struct Args {
    /// The bootstrap file holding the daemon's guest URL and a one-time token.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BOOTSTRAP_PATH)]
    bootstrap: PathBuf,
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = RunnerConfig {
        bootstrap_path: args.bootstrap,
        ..RunnerConfig::default()
    };
    match runner::run(&config) {
        Ok(code) => exit_code(code),
        Err(e) => {
            eprintln!("agentlab-runner: {e}");
            exit_code(RUNNER_FAILURE_EXIT_CODE)
        }
    }
}
