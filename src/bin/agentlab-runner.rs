//! `agentlab-runner`: runs one job inside a sandbox. Started by the daemon through the guest
//! agent; exits with the job command's exit code (124 when the run timeout killed it), or 125
//! when it could not get a job to run at all.
//!
//! `agentlab-runner identity` instead applies the identity document on its stdin (hostname,
//! clock, entropy, bootstrap file) to a guest restored from a template snapshot, before the
//! daemon starts the job runner proper (`runner::identity`).

use std::path::PathBuf;
use std::process::ExitCode;

use agentlab::runner::identity::{self, Identity, LinuxSystem};
use agentlab::runner::{self, RunnerConfig, DEFAULT_BOOTSTRAP_PATH, RUNNER_FAILURE_EXIT_CODE};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agentlab-runner",
    version,
    about = "Runs one AgentLab job inside its sandbox",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// The bootstrap file holding the daemon's guest URL and a one-time token.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BOOTSTRAP_PATH)]
    bootstrap: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Gives a guest restored from a snapshot its own identity: reads a JSON document from stdin
    /// (at most 64 KiB), writes its bootstrap file, sets the hostname and the clock, and reseeds
    /// the kernel's random number generator with its entropy.
    Identity,
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::Identity) => apply_identity(),
        None => run_job(args.bootstrap),
    }
}

fn run_job(bootstrap_path: PathBuf) -> ExitCode {
    let config = RunnerConfig {
        bootstrap_path,
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

fn apply_identity() -> ExitCode {
    let applied = identity::read_document(std::io::stdin().lock())
        .and_then(|bytes| Identity::parse(&bytes))
        .and_then(|document| identity::apply(&document, &LinuxSystem));
    match applied {
        Ok(applied) => {
            println!("agentlab-runner: {applied}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentlab-runner identity: {e}");
            exit_code(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_subcommand_it_runs_the_job_as_before() {
        let args = Args::try_parse_from(["agentlab-runner", "--bootstrap", "/tmp/b.json"]).unwrap();
        assert!(args.command.is_none());
        assert_eq!(args.bootstrap, PathBuf::from("/tmp/b.json"));
        let args = Args::try_parse_from(["agentlab-runner"]).unwrap();
        assert!(args.command.is_none());
        assert_eq!(args.bootstrap, PathBuf::from(DEFAULT_BOOTSTRAP_PATH));
    }

    #[test]
    fn identity_is_a_subcommand_of_its_own() {
        let args = Args::try_parse_from(["agentlab-runner", "identity"]).unwrap();
        assert!(matches!(args.command, Some(Command::Identity)));
        assert!(
            Args::try_parse_from(["agentlab-runner", "--bootstrap", "/x", "identity"]).is_err()
        );
    }
}
