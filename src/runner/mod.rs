//! The guest runner: the program inside each sandbox that turns a one-time bootstrap token into a
//! finished job. It redeems the token for the job spec, gets the code into the workdir, runs the
//! command with its output streamed (masked) to the daemon, reports the exit code, uploads the
//! artifacts and reports done, in that order, as `docs/api.md` lays down.
//!
//! Plain threads and blocking IO throughout: the binary ships into minimal guests.

pub mod artifacts;
pub mod changes;
pub mod client;
pub mod error;
pub mod exec;
pub mod identity;
pub mod logs;
/// The masker lives with the host's, which masks a guest's log a second time.
pub use crate::secrets::mask;
pub mod repo;
pub mod spec;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use client::{GuestClient, RetryPolicy};
pub use error::RunnerError;
pub use exec::{ExecSettings, TIMEOUT_EXIT_CODE};
pub use logs::LogSettings;
pub use spec::{Bootstrap, JobSpec, RepoSpec, DEFAULT_BOOTSTRAP_PATH};

use changes::RESULT_BUNDLE_ARTIFACT;
use exec::CommandSpec;
use logs::{spawn_shipper, LogQueue};
use mask::Masker;
use repo::Git;

/// The exit code for a job the runner could not run at all (no checkout, no shell), and the
/// runner's own exit code when it fails before it has a job: like `timeout(1)`, 125 means the
/// wrapper failed rather than the command.
pub const RUNNER_FAILURE_EXIT_CODE: i32 = 125;

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub bootstrap_path: PathBuf,
    pub retry: RetryPolicy,
    pub logs: LogSettings,
    pub exec: ExecSettings,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            bootstrap_path: PathBuf::from(DEFAULT_BOOTSTRAP_PATH),
            retry: RetryPolicy::default(),
            logs: LogSettings::default(),
            exec: ExecSettings::default(),
        }
    }
}

/// Runs the job the bootstrap file points at, start to finish. Returns the command's exit code,
/// which the runner exits with. Errors are only those that leave no job to report on (no
/// bootstrap file, the token refused, the daemon gone for good before the spec arrived); later
/// failures are reported to the daemon through the log and `done`'s errors instead.
pub fn run(config: &RunnerConfig) -> Result<i32, RunnerError> {
    let bootstrap = Bootstrap::load(&config.bootstrap_path)?;
    let mut client = GuestClient::new(&bootstrap.url, config.retry)?;
    let spec = client.bootstrap(&bootstrap.token)?;
    let client = Arc::new(client);

    let mut secrets: Vec<String> = spec.env.values().cloned().collect();
    // The command never sees the tokens, but a token that slips into output must not leave.
    secrets.push(bootstrap.token.clone());
    secrets.push(spec.session_token.clone());
    if let Some(RepoSpec::Url { url, .. }) = &spec.repo {
        secrets.extend(repo::url_secrets(url));
    }
    let masker = Masker::new(&secrets);

    let queue = LogQueue::new(config.logs.queue_bytes);
    let shipper = spawn_shipper(Arc::clone(&queue), client.clone(), config.logs);
    let mut errors = Vec::new();

    let note = |text: &str| {
        let text = String::from_utf8_lossy(&masker.mask_all(text.as_bytes())).into_owned();
        eprintln!("agentlab-runner: {text}");
        queue.note(&text);
    };

    let git = Git {
        env: &spec.env,
        masker: &masker,
    };
    let checkout = match prepare_checkout(&spec, &client, &git) {
        Ok(()) => Some(spec.workdir.clone()),
        Err(e) => {
            let text = format!("cannot prepare the checkout: {e}");
            note(&text);
            errors.push(text);
            None
        }
    };

    // The start commit is read before the command runs: the command may move HEAD.
    let base = match (&checkout, spec.send_changes) {
        (Some(dir), true) => match git.head_commit(dir) {
            Ok(base) => Some(base),
            Err(e) => {
                errors.push(format!(
                    "cannot tell which commit the checkout started at: {e}"
                ));
                None
            }
        },
        _ => None,
    };

    let exit_code = match &checkout {
        None => RUNNER_FAILURE_EXIT_CODE,
        Some(dir) => {
            let command = CommandSpec {
                command: &spec.command,
                task: &spec.task,
                job_id: &spec.job_id,
                env: &spec.env,
                dir,
                timeout: Duration::from_secs(spec.run_timeout_seconds),
            };
            match exec::run_command(&command, &config.exec, &masker, &queue) {
                Ok(outcome) => outcome.exit_code,
                Err(e) => {
                    let text = e.to_string();
                    note(&text);
                    errors.push(text);
                    RUNNER_FAILURE_EXIT_CODE
                }
            }
        }
    };

    queue.close();
    match shipper.join() {
        Ok(report) => {
            if let Some(e) = report.last_error {
                let text = format!("{} batches of output were lost: {e}", report.failed_batches);
                eprintln!("agentlab-runner: {text}");
                errors.push(text);
            }
        }
        Err(_) => errors.push("the log shipper panicked".into()),
    }
    let dropped = queue.dropped_total();
    if dropped > 0 {
        errors.push(format!(
            "{dropped} bytes of output were dropped because the log upload fell behind"
        ));
    }

    if let Err(e) = client.post_exit(exit_code) {
        eprintln!("agentlab-runner: {e}");
        errors.push(e.to_string());
    }

    let mut uploaded = match &checkout {
        Some(dir) => upload_artifacts(&client, dir, &spec, &mut errors),
        None => 0,
    };
    if let (Some(dir), Some(base)) = (&checkout, &base) {
        if send_changes(&client, &git, dir, base, &spec, &mut errors) {
            uploaded += 1;
        }
    }

    // Errors quote git, paths and answers: mask them like the output.
    let errors: Vec<String> = errors
        .iter()
        .map(|e| String::from_utf8_lossy(&masker.mask_all(e.as_bytes())).into_owned())
        .collect();
    if let Err(e) = client.post_done(uploaded, &errors) {
        eprintln!("agentlab-runner: {e}");
    }
    Ok(exit_code)
}

fn prepare_checkout(spec: &JobSpec, client: &GuestClient, git: &Git) -> Result<(), RunnerError> {
    match &spec.repo {
        None => repo::create_empty(&spec.workdir),
        Some(RepoSpec::Url { url, git_ref }) => {
            git.clone_url(url, &spec.workdir, git_ref.as_deref())
        }
        Some(RepoSpec::Bundle { git_ref }) => {
            let bundle = bundle_path(&spec.workdir);
            if let Some(parent) = bundle.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| RunnerError::io(format!("create {}", parent.display()), e))?;
            }
            let cloned = client
                .download_bundle(&bundle)
                .and_then(|_| git.clone_bundle(&bundle, &spec.workdir, git_ref.as_deref()));
            let _ = std::fs::remove_file(&bundle);
            cloned
        }
    }
}

/// Beside the workdir rather than in /tmp: the bundle can be as large as the repository, and in
/// a small guest /tmp may be memory.
fn bundle_path(workdir: &Path) -> PathBuf {
    let name = workdir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "repo".into());
    workdir.with_file_name(format!(".{name}.agentlab-{}.bundle", std::process::id()))
}

fn upload_artifacts(
    client: &GuestClient,
    checkout: &Path,
    spec: &JobSpec,
    errors: &mut Vec<String>,
) -> usize {
    if spec.artifacts.is_empty() {
        return 0;
    }
    let expansion = artifacts::expand(checkout, &spec.artifacts);
    errors.extend(expansion.errors);
    let mut uploaded = 0;
    for file in &expansion.files {
        if file.rel == RESULT_BUNDLE_ARTIFACT.as_bytes() {
            errors.push(format!(
                "artifact {} skipped: the name is the result bundle's",
                file.display()
            ));
            continue;
        }
        if file.len > spec.max_artifact_bytes {
            errors.push(format!(
                "artifact {} skipped: {} bytes is over the limit of {} bytes",
                file.display(),
                file.len,
                spec.max_artifact_bytes
            ));
            continue;
        }
        match client.put_artifact(&file.rel, &file.real, file.len) {
            Ok(()) => uploaded += 1,
            Err(e) => errors.push(format!("artifact {}: {e}", file.display())),
        }
    }
    uploaded
}

/// Bundles the checkout's changes against `base` and uploads them as the result bundle; true if
/// one was uploaded. A checkout left as it was sends nothing.
fn send_changes(
    client: &GuestClient,
    git: &Git,
    checkout: &Path,
    base: &str,
    spec: &JobSpec,
    errors: &mut Vec<String>,
) -> bool {
    let path = bundle_path(checkout).with_extension("result");
    let made = git.bundle_changes(checkout, base, &spec.job_id, &path);
    let sent = match made {
        Ok(None) => false,
        Ok(Some(bundle)) if bundle.len > spec.max_artifact_bytes => {
            errors.push(format!(
                "the result bundle ({} commits) is not sent: {} bytes is over the limit of {} bytes",
                bundle.commits, bundle.len, spec.max_artifact_bytes
            ));
            false
        }
        Ok(Some(bundle)) => {
            match client.put_artifact(RESULT_BUNDLE_ARTIFACT.as_bytes(), &bundle.path, bundle.len) {
                Ok(()) => true,
                Err(e) => {
                    errors.push(format!("the result bundle: {e}"));
                    false
                }
            }
        }
        Err(e) => {
            errors.push(format!("cannot bundle the checkout's changes: {e}"));
            false
        }
    };
    let _ = std::fs::remove_file(&path);
    sent
}
