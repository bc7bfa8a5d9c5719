//! `agentlab`: the command line for the AgentLab daemon. See `agentlab --help`; the exit codes are
//! documented there and in `agentlab::cli`.

use std::process::ExitCode;

use agentlab::cli::{self, Cli};
use clap::Parser;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap's own codes: 0 for --help and --version, 2 for usage errors.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(cli::exit::USAGE));
        }
    };
    ExitCode::from(cli::run(&cli))
}
