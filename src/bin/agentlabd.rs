//! agentlabd: the AgentLab daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use agentlab::config::{Config, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "agentlabd",
    version,
    about = "AgentLab daemon: runs each agent job in its own throwaway VM"
)]
struct Args {
    /// The config file (YAML).
    #[arg(
        long,
        short,
        env = "AGENTLAB_CONFIG",
        default_value = "/etc/agentlab/config.yaml"
    )]
    config: PathBuf,
    /// Validate the config, profiles and tuning files, then exit.
    #[arg(long)]
    check_config: bool,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTLAB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,actix_server=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.check_config {
        return match agentlab::daemon::check(&args.config) {
            Ok(report) => {
                println!(
                    "ok: {} ({} profiles: {}; {} tuning files)",
                    args.config.display(),
                    report.profiles.len(),
                    report.profiles.join(", "),
                    report.tuning_files.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("agentlabd: {err}");
                ExitCode::from(2)
            }
        };
    }
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("agentlabd: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    let result = actix_web::rt::System::new().block_on(agentlab::daemon::run(config, args.config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "agentlabd failed");
            eprintln!("agentlabd: {err}");
            ExitCode::FAILURE
        }
    }
}
