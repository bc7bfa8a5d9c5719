//! The command line, as clap parses it, and the checks on values that clap cannot express
//! (`--env` pairs, status names, repository paths).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::client::{Target, DEFAULT_SOCKET};
use super::exit::{CliError, EXIT_CODES_HELP};
use crate::model::{JobRequest, JobStatus, SandboxState, StartMode};

#[derive(Debug, Parser)]
#[command(
    name = "agentlab",
    version,
    about = "Run AI coding agents in throwaway VMs: submit and watch jobs, inspect sandboxes",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, value_name = "PATH", env = "AGENTLAB_SOCKET", default_value = DEFAULT_SOCKET, help_heading = "Global options")]
    pub socket: PathBuf,
    /// Talk to the daemon's TCP control API instead of the socket (http://host:port).
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "AGENTLAB_ENDPOINT",
        help_heading = "Global options"
    )]
    pub endpoint: Option<String>,
    /// Bearer token for --endpoint.
    #[arg(
        long,
        global = true,
        env = "AGENTLAB_TOKEN",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub token: Option<String>,
    /// Print the daemon's JSON answer as it came, instead of a table.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn target(&self) -> Target {
        match &self.endpoint {
            Some(base) => Target::Endpoint {
                base: base.clone(),
                token: self.token.clone(),
            },
            None => Target::Socket(self.socket.clone()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit, list, watch and cancel jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// List, inspect and destroy sandboxes (VMs).
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// The daemon's version, backend, queue and counts.
    Status,
    /// The profiles jobs can run with.
    Profiles,
    /// The warm pool: per profile its target, READY and booting sandboxes, hits and misses.
    Pool,
    /// Templates the local QEMU backend boots sandboxes from.
    #[command(subcommand)]
    Template(TemplateCommand),
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Check a whole-disk image (qcow2 or raw, with a partition table and a BIOS boot loader, such
    /// as a distribution's cloud image) and register it as template NAME, booted by its own boot
    /// loader. Says what the image lacks if a sandbox could not run in it. A profile then names
    /// it with `image: NAME`.
    Import {
        /// The image file; it is sent to the daemon, which keeps its own converted copy.
        file: PathBuf,
        /// The template's name: letters, digits, `-`, `_` and `.`.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job; prints its id, or with --wait/--follow watches it to the end.
    Run(RunArgs),
    /// List jobs, newest first, a page at a time.
    List {
        /// Only jobs with this status (QUEUED, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED).
        #[arg(long, value_parser = parse_status)]
        status: Option<JobStatus>,
        /// At most this many jobs (the daemon allows up to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start after this cursor, as the previous page's "more: --after CURSOR" gave it.
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
    },
    /// One job: status, phases and their durations, exit code, error.
    Show { id: String },
    /// The job's output (stdout and stderr).
    Logs {
        id: String,
        /// Keep streaming until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a queued or running job.
    Cancel { id: String },
    /// The agent's change to the job's host repository, as a patch series (git format-patch).
    Diff { id: String },
    /// List the job's artifacts, or download them.
    Artifacts {
        id: String,
        /// Download every artifact under DIR, checking each one's sha256.
        #[arg(long, value_name = "DIR")]
        download: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The profile (VM size, image, default command) to run with.
    #[arg(long)]
    pub profile: String,
    /// What the agent should do; the command gets it as AGENTLAB_TASK and on stdin.
    #[arg(long)]
    pub task: String,
    /// Override the profile's command (run by /bin/sh -c in the checkout).
    #[arg(long)]
    pub command: Option<String>,
    /// A git URL, or a local repository path (sent as an absolute path).
    #[arg(long)]
    pub repo: Option<String>,
    /// Branch, tag or commit to check out.
    #[arg(long = "ref", value_name = "REF")]
    pub git_ref: Option<String>,
    /// Environment for the command; repeatable. `--env KEY` takes KEY's value from this shell,
    /// which keeps a secret off the command line. Values of 6+ characters are masked in logs.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_arg)]
    pub env: Vec<(String, String)>,
    /// Files to collect from the checkout afterwards (glob, relative); repeatable.
    #[arg(long = "artifact", value_name = "GLOB")]
    pub artifacts: Vec<String>,
    /// Minutes a kept sandbox (a profile with keepalive) lives after its job ends: its lease,
    /// which starts when the job ends (default: the profile's; at most 7 days). It does not limit
    /// the job itself: --run-timeout does.
    #[arg(long, value_name = "N")]
    pub ttl_minutes: Option<u32>,
    /// Stop the command after this many seconds (it can only shorten the daemon's limit).
    #[arg(long, value_name = "SECS")]
    pub run_timeout: Option<u64>,
    /// Fail the job if it has not started after this many seconds in the queue.
    #[arg(long, value_name = "SECS")]
    pub deadline: Option<u64>,
    /// How the sandbox starts: restored from a snapshot of the booted template where the host
    /// can (auto, the default), always booted (cold), or restored or refused (snapshot).
    #[arg(long, value_enum, value_name = "HOW")]
    pub start: Option<StartArg>,
    /// Fetch the agent's changes (its commits, and what it left uncommitted as one more commit)
    /// into the host repository as branch agentlab/JOB; no other ref and no file there changes.
    #[arg(long)]
    pub result_branch: bool,
    /// Wait for the job to end, showing its phases; the exit code follows the job's status.
    #[arg(long)]
    pub wait: bool,
    /// Like --wait, and stream the job's output too (to stderr with --json, which keeps stdout
    /// for the final job).
    #[arg(long)]
    pub follow: bool,
}

/// `--start`: clap's view of [`StartMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StartArg {
    Auto,
    Cold,
    Snapshot,
}

impl From<StartArg> for StartMode {
    fn from(arg: StartArg) -> Self {
        match arg {
            StartArg::Auto => StartMode::Auto,
            StartArg::Cold => StartMode::Cold,
            StartArg::Snapshot => StartMode::Snapshot,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// List sandboxes, newest first, a page at a time; KEPT ones show when their lease ends.
    List {
        /// Only sandboxes in this state (PROVISIONING, BOOTING, READY, RUNNING, UPLOADING, KEPT,
        /// DESTROYING, DESTROYED).
        #[arg(long, value_parser = parse_state)]
        state: Option<SandboxState>,
        /// At most this many sandboxes (the daemon allows up to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start after this cursor, as the previous page's "more: --after CURSOR" gave it.
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
    },
    /// One sandbox.
    Show { id: String },
    /// Renew a sandbox's lease: a KEPT sandbox then lives TTL from now; for one whose job still
    /// runs, TTL becomes its lease once the job ends and it is kept.
    Renew {
        id: String,
        /// How long, e.g. 30m, 2h, 1d (at most 7 days).
        #[arg(long, value_name = "TTL", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
    /// Destroy a sandbox (and so stop its job).
    Destroy { id: String },
}

fn parse_status(s: &str) -> Result<JobStatus, String> {
    s.to_ascii_uppercase().parse().map_err(|_| {
        let names: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("expected one of {}", names.join(", "))
    })
}

fn parse_state(s: &str) -> Result<SandboxState, String> {
    s.to_ascii_uppercase().parse().map_err(|_| {
        let names: Vec<&str> = SandboxState::ALL.iter().map(|s| s.as_str()).collect();
        format!("expected one of {}", names.join(", "))
    })
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration like 30m or 2h: {e}"))
}

fn parse_env_arg(s: &str) -> Result<(String, String), String> {
    parse_env_pair(s, |key| std::env::var(key).ok())
}

/// `KEY=VALUE`, or `KEY` to take the value from `lookup` (the CLI's own environment).
pub fn parse_env_pair(
    s: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, String), String> {
    let (key, value) = match s.split_once('=') {
        Some((key, value)) => (key, Some(value.to_owned())),
        None => (s, None),
    };
    let valid = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "`{key}` is not a valid variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    if key.starts_with("AGENTLAB_") {
        return Err(format!("{key}: AGENTLAB_* variables are set by the runner"));
    }
    let value = match value {
        Some(value) => value,
        None => lookup(key).ok_or_else(|| {
            format!("{key} has no value: give KEY=VALUE, or set {key} in this environment")
        })?,
    };
    Ok((key.to_owned(), value))
}

/// A local path becomes absolute (the daemon resolves it on its own host); URLs and scp-style
/// `user@host:path` pass through.
pub fn resolve_repo(repo: &str) -> Result<String, CliError> {
    if looks_like_url(repo) {
        return Ok(repo.to_owned());
    }
    let path = std::path::Path::new(repo);
    let absolute = match std::fs::canonicalize(path) {
        Ok(path) => path,
        Err(_) => {
            std::path::absolute(path).map_err(|e| CliError::Usage(format!("--repo {repo}: {e}")))?
        }
    };
    absolute
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| CliError::Usage(format!("--repo {repo}: the path is not UTF-8")))
}

fn looks_like_url(repo: &str) -> bool {
    if repo.contains("://") {
        return true;
    }
    // git's scp-like syntax: a colon before any slash, e.g. git@github.com:org/repo.git.
    match (repo.find(':'), repo.find('/')) {
        (Some(colon), Some(slash)) => colon < slash && colon > 0,
        (Some(colon), None) => colon > 0,
        _ => false,
    }
}

impl RunArgs {
    /// The request body for `POST /v1/jobs`.
    pub fn to_request(&self) -> Result<JobRequest, CliError> {
        let mut env = BTreeMap::new();
        for (key, value) in &self.env {
            if env.insert(key.clone(), value.clone()).is_some() {
                return Err(CliError::Usage(format!("--env {key} is given twice")));
            }
        }
        Ok(JobRequest {
            profile: self.profile.clone(),
            task: self.task.clone(),
            command: self.command.clone(),
            repo: self.repo.as_deref().map(resolve_repo).transpose()?,
            git_ref: self.git_ref.clone(),
            env,
            artifacts: (!self.artifacts.is_empty()).then(|| self.artifacts.clone()),
            ttl_minutes: self.ttl_minutes,
            run_timeout_seconds: self.run_timeout,
            deadline_seconds: self.deadline,
            start: self.start.map(StartMode::from).unwrap_or_default(),
            result_branch: self.result_branch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("agentlab").chain(args.iter().copied()))
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn env_pairs_are_validated() {
        assert_eq!(
            parse_env_pair("API_KEY=a=b", no_env).unwrap(),
            ("API_KEY".into(), "a=b".into())
        );
        assert_eq!(
            parse_env_pair("EMPTY=", no_env).unwrap(),
            ("EMPTY".into(), "".into())
        );
        assert_eq!(
            parse_env_pair("_X1=v", no_env).unwrap(),
            ("_X1".into(), "v".into())
        );
        for bad in ["=v", "1X=v", "A-B=v", "A B=v", "", "AGENTLAB_TASK=x"] {
            assert!(parse_env_pair(bad, no_env).is_err(), "{bad}");
        }
        // A bare key takes its value from the environment, and must be set there.
        let lookup = |k: &str| (k == "TOKEN").then(|| "from-env".to_owned());
        assert_eq!(
            parse_env_pair("TOKEN", lookup).unwrap(),
            ("TOKEN".into(), "from-env".into())
        );
        assert!(parse_env_pair("UNSET", lookup).is_err());
    }

    #[test]
    fn job_run_parses_into_a_request() {
        let cli = parse(&[
            "job",
            "run",
            "--profile",
            "small",
            "--task",
            "fix it",
            "--repo",
            "https://example.invalid/r.git",
            "--ref",
            "main",
            "--env",
            "A=1",
            "--env",
            "B=two",
            "--artifact",
            "out/**",
            "--artifact",
            "*.log",
            "--ttl-minutes",
            "5",
            "--run-timeout",
            "600",
            "--follow",
        ])
        .unwrap();
        let Command::Job(JobCommand::Run(run)) = cli.command else {
            panic!("not job run");
        };
        assert!(run.follow && !run.wait);
        let req = run.to_request().unwrap();
        assert_eq!(req.profile, "small");
        assert_eq!(req.repo.as_deref(), Some("https://example.invalid/r.git"));
        assert_eq!(req.git_ref.as_deref(), Some("main"));
        assert_eq!(req.env.get("B").map(String::as_str), Some("two"));
        assert_eq!(req.artifacts, Some(vec!["out/**".into(), "*.log".into()]));
        assert_eq!(req.ttl_minutes, Some(5));
        assert_eq!(req.run_timeout_seconds, Some(600));
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["ref"], "main");
        assert!(json.get("command").is_none());
    }

    #[test]
    fn start_takes_one_of_three_ways_and_defaults_to_auto() {
        let start_of = |extra: &[&str]| {
            let mut args = vec!["job", "run", "--profile", "p", "--task", "t"];
            args.extend_from_slice(extra);
            let Command::Job(JobCommand::Run(run)) = parse(&args).unwrap().command else {
                panic!("not job run");
            };
            run.to_request().unwrap().start
        };
        assert_eq!(start_of(&[]), StartMode::Auto);
        assert_eq!(start_of(&["--start", "auto"]), StartMode::Auto);
        assert_eq!(start_of(&["--start", "cold"]), StartMode::Cold);
        assert_eq!(start_of(&["--start", "snapshot"]), StartMode::Snapshot);
        let err = parse(&[
            "job",
            "run",
            "--profile",
            "p",
            "--task",
            "t",
            "--start",
            "warm",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let message = err.to_string();
        assert!(
            message.contains("auto") && message.contains("cold") && message.contains("snapshot"),
            "{message}"
        );
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &["job", "run", "--task", "t"][..],
            &[
                "job",
                "run",
                "--profile",
                "p",
                "--task",
                "t",
                "--env",
                "1=x",
            ],
            &["job", "list", "--status", "BOGUS"],
            &[
                "job",
                "run",
                "--profile",
                "p",
                "--task",
                "t",
                "--run-timeout",
                "soon",
            ],
            &["frobnicate"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let cli = parse(&[
            "job",
            "run",
            "--profile",
            "p",
            "--task",
            "t",
            "--env",
            "A=1",
            "--env",
            "A=2",
        ])
        .unwrap();
        let Command::Job(JobCommand::Run(run)) = cli.command else {
            panic!("not job run");
        };
        assert_eq!(run.to_request().unwrap_err().exit_code(), 2);
    }

    #[test]
    fn statuses_are_case_insensitive_and_json_is_global() {
        let cli = parse(&["job", "list", "--status", "running", "--json"]).unwrap();
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            Command::Job(JobCommand::List {
                status: Some(JobStatus::Running),
                ..
            })
        ));
    }

    #[test]
    fn lists_page_and_renew_takes_a_humantime_ttl() {
        let cli = parse(&["job", "list", "--limit", "5", "--after", "j9"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Job(JobCommand::List { limit: 5, after: Some(ref a), .. }) if a == "j9"
        ));
        let cli = parse(&["sandbox", "renew", "sandbox-x", "--ttl", "1h30m"]).unwrap();
        let Command::Sandbox(SandboxCommand::Renew { id, ttl }) = cli.command else {
            panic!("not sandbox renew");
        };
        assert_eq!((id.as_str(), ttl.as_secs()), ("sandbox-x", 5400));
        assert_eq!(
            parse(&["sandbox", "renew", "x", "--ttl", "soon"])
                .unwrap_err()
                .exit_code(),
            2
        );
        assert!(
            parse(&["sandbox", "renew", "x"]).is_err(),
            "--ttl is required"
        );
    }

    #[test]
    fn the_endpoint_wins_over_the_socket() {
        let cli = parse(&["--endpoint", "http://h:1", "--token", "t", "status"]).unwrap();
        assert_eq!(
            cli.target(),
            Target::Endpoint {
                base: "http://h:1".into(),
                token: Some("t".into())
            }
        );
        let cli = parse(&["--socket", "/tmp/s.sock", "status"]).unwrap();
        assert_eq!(cli.target(), Target::Socket("/tmp/s.sock".into()));
    }

    #[test]
    fn local_repos_become_absolute_and_urls_pass_through() {
        for url in [
            "https://github.com/o/r.git",
            "git@github.com:o/r.git",
            "ssh://git@host/r",
            "file:///srv/r",
        ] {
            assert_eq!(resolve_repo(url).unwrap(), url);
        }
        let dir = tempfile::tempdir().unwrap();
        let canonical = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            resolve_repo(dir.path().to_str().unwrap()).unwrap(),
            canonical.to_str().unwrap()
        );
        let relative = resolve_repo("some/relative/repo").unwrap();
        assert!(relative.starts_with('/'), "{relative}");
        assert!(relative.ends_with("/some/relative/repo"), "{relative}");
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let err = parse(&["--help"]).unwrap_err();
        assert_eq!(err.exit_code(), 0);
        assert!(err.to_string().contains("5  the job hit its TIMEOUT"));
    }
}
