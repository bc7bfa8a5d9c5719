//! What each command does: the API calls, and what goes to stdout (results) and stderr
//! (progress and notes). Returns the exit code on success; errors carry their own.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::args::{Cli, Command, JobCommand, RunArgs, SandboxCommand, TemplateCommand};
use super::client::{parse, ApiClient};
use super::exit::{self, CliError};
use super::follow;
use super::format;
use crate::actors::pool_status::PoolStatus;
use crate::model::{Artifact, Job, Sandbox};
use crate::urlpath::{encode_path, encode_segment};

#[derive(Deserialize)]
struct Jobs {
    jobs: Vec<Job>,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
struct Sandboxes {
    sandboxes: Vec<Sandbox>,
    #[serde(default)]
    next: Option<String>,
}

/// What `POST /v1/sandboxes/{id}/lease` answers.
#[derive(Deserialize)]
struct Renewed {
    sandbox: Sandbox,
    ttl_seconds: u64,
    lease_expires_at_ms: Option<i64>,
}

#[derive(Deserialize)]
struct Artifacts {
    artifacts: Vec<Artifact>,
}

#[derive(Deserialize)]
struct Profiles {
    profiles: Vec<Value>,
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

fn io(e: std::io::Error) -> CliError {
    CliError::io("write output", e)
}

/// Prints the daemon's JSON as it came, or the human view of it.
fn show<T: for<'de> Deserialize<'de>>(
    out: &mut dyn Write,
    json: bool,
    text: &str,
    view: impl Fn(&T) -> String,
) -> Result<u8, CliError> {
    if json {
        writeln!(out, "{}", text.trim_end()).map_err(io)?;
    } else {
        let value: T = parse(text)?;
        out.write_all(view(&value).as_bytes()).map_err(io)?;
    }
    Ok(exit::SUCCESS)
}

pub fn execute(cli: &Cli, out: &mut dyn Write, err: &mut dyn Write) -> Result<u8, CliError> {
    let client = ApiClient::new(&cli.target())?;
    let json = cli.json;
    let now = format::now_ms();
    match &cli.command {
        Command::Status => {
            let text = client.get_text("/v1/status")?;
            show(out, json, &text, format::status)
        }
        Command::Pool => {
            let text = client.get_text("/v1/pool")?;
            show(out, json, &text, |p: &PoolStatus| format::pool(p, now))
        }
        Command::Template(TemplateCommand::Import { file, name }) => {
            import_template(&client, out, err, json, file, name)
        }
        Command::Profiles => {
            let text = client.get_text("/v1/profiles")?;
            show(out, json, &text, |p: &Profiles| {
                format::profiles(&p.profiles)
            })
        }
        Command::Job(JobCommand::Run(args)) => run(&client, args, json, out, err),
        Command::Job(JobCommand::List {
            status,
            limit,
            after,
        }) => {
            let mut path = format!("/v1/jobs?limit={limit}");
            if let Some(status) = status {
                path.push_str(&format!("&status={status}"));
            }
            push_after(&mut path, after.as_deref());
            let text = client.get_text(&path)?;
            show(out, json, &text, |j: &Jobs| format::job_list(&j.jobs, now))?;
            if !json {
                more(err, parse::<Jobs>(&text)?.next)?;
            }
            Ok(exit::SUCCESS)
        }
        Command::Job(JobCommand::Show { id }) => {
            let text = client.get_text(&job_path(id))?;
            show(out, json, &text, format::shown_job)
        }
        Command::Job(JobCommand::Logs { id, follow }) => {
            if *follow {
                follow::follow_logs(&client, id, |bytes| {
                    out.write_all(bytes).and_then(|()| out.flush()).map_err(io)
                })?;
            } else {
                let mut resp = client.get_stream(&format!("{}/logs", job_path(id)))?;
                std::io::copy(&mut resp, out).map_err(io)?;
            }
            Ok(exit::SUCCESS)
        }
        Command::Job(JobCommand::Cancel { id }) => {
            let text = client.post_text(&format!("{}/cancel", job_path(id)), None)?;
            show(out, json, &text, |j: &Job| {
                format!("job {} {}\n", j.id, j.status)
            })
        }
        Command::Job(JobCommand::Diff { id }) => {
            let mut resp = client.get_stream(&format!("{}/diff", job_path(id)))?;
            std::io::copy(&mut resp, out).map_err(io)?;
            Ok(exit::SUCCESS)
        }
        Command::Job(JobCommand::Artifacts { id, download }) => {
            let text = client.get_text(&format!("{}/artifacts", job_path(id)))?;
            match download {
                None => show(out, json, &text, |a: &Artifacts| {
                    format::artifact_list(&a.artifacts)
                }),
                Some(dir) => {
                    let list: Artifacts = parse(&text)?;
                    download_all(&client, id, &list.artifacts, dir, out, err)
                }
            }
        }
        Command::Sandbox(SandboxCommand::List {
            state,
            limit,
            after,
        }) => {
            let mut path = format!("/v1/sandboxes?limit={limit}");
            if let Some(state) = state {
                path.push_str(&format!("&state={state}"));
            }
            push_after(&mut path, after.as_deref());
            let text = client.get_text(&path)?;
            show(out, json, &text, |s: &Sandboxes| {
                format::sandbox_list(&s.sandboxes, now)
            })?;
            if !json {
                more(err, parse::<Sandboxes>(&text)?.next)?;
            }
            Ok(exit::SUCCESS)
        }
        Command::Sandbox(SandboxCommand::Show { id }) => {
            let text = client.get_text(&sandbox_path(id))?;
            show(out, json, &text, |s: &Sandbox| {
                format::sandbox_detail(s, now)
            })
        }
        Command::Sandbox(SandboxCommand::Renew { id, ttl }) => {
            let body = serde_json::json!({ "ttl": humantime::format_duration(*ttl).to_string() });
            let text = client.post_text(&format!("{}/lease", sandbox_path(id)), Some(&body))?;
            show(out, json, &text, |r: &Renewed| renewed(r, now))
        }
        Command::Sandbox(SandboxCommand::Destroy { id }) => {
            let text = client.post_text(&format!("{}/destroy", sandbox_path(id)), None)?;
            show(out, json, &text, |s: &Sandbox| {
                format!("sandbox {} {}\n", s.id, s.state)
            })
        }
    }
}

fn import_template(
    client: &ApiClient,
    out: &mut dyn Write,
    err: &mut dyn Write,
    json: bool,
    file: &Path,
    name: &str,
) -> Result<u8, CliError> {
    let image = std::fs::File::open(file)
        .map_err(|e| CliError::io(format!("opening {}", file.display()), e))?;
    let len = image
        .metadata()
        .map_err(|e| CliError::io(format!("reading {}", file.display()), e))?
        .len();
    let source = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    writeln!(
        err,
        "sending {} ({}) to the daemon; it then checks and converts it, which takes a while for \
         a large image",
        file.display(),
        format::bytes(len)
    )
    .map_err(io)?;
    let path = format!(
        "/v1/templates/{}?source={}",
        crate::urlpath::encode_segment(name),
        crate::urlpath::encode_segment(&source)
    );
    let text = client.post_file(&path, image, len)?;
    show(out, json, &text, format::template_import)
}

fn push_after(path: &mut String, after: Option<&str>) {
    if let Some(after) = after {
        path.push_str(&format!("&after={}", encode_segment(after)));
    }
}

/// Tells (on stderr, with the results on stdout) how to get the next page, if there is one.
fn more(err: &mut dyn Write, next: Option<String>) -> Result<(), CliError> {
    if let Some(cursor) = next {
        writeln!(err, "more: --after {cursor}").map_err(io)?;
    }
    Ok(())
}

fn renewed(r: &Renewed, now: i64) -> String {
    let ttl = humantime::format_duration(std::time::Duration::from_secs(r.ttl_seconds));
    match r.lease_expires_at_ms {
        Some(at) => format!(
            "sandbox {} kept until {} ({})\n",
            r.sandbox.id,
            format::timestamp(at),
            format::until(at, now)
        ),
        None => format!(
            "sandbox {}: its job still runs; when it ends, the sandbox is kept for {ttl}\n",
            r.sandbox.id
        ),
    }
}

fn job_path(id: &str) -> String {
    format!("/v1/jobs/{}", encode_segment(id))
}

fn sandbox_path(id: &str) -> String {
    format!("/v1/sandboxes/{}", encode_segment(id))
}

fn run(
    client: &ApiClient,
    args: &RunArgs,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u8, CliError> {
    let request = args.to_request()?;
    let body = serde_json::to_value(&request)
        .map_err(|e| CliError::Protocol(format!("cannot encode the request: {e}")))?;
    let text = client.post_text("/v1/jobs", Some(&body))?;
    let created: Created = parse(&text)?;
    if !(args.wait || args.follow) {
        if json {
            writeln!(out, "{}", text.trim_end()).map_err(io)?;
        } else {
            writeln!(out, "{}", created.id).map_err(io)?;
        }
        return Ok(exit::SUCCESS);
    }
    let tty = std::io::stderr().is_terminal();
    writeln!(err, "job {} submitted", created.id).map_err(io)?;
    let logs = match (args.follow, json) {
        (false, _) => follow::Logs::None,
        (true, false) => follow::Logs::Stdout,
        // stdout is for the final job's JSON alone.
        (true, true) => follow::Logs::Stderr,
    };
    let job = follow::watch(client, &created.id, logs, tty, out, err)?;
    if json {
        let text = client.get_text(&job_path(&created.id))?;
        writeln!(out, "{}", text.trim_end()).map_err(io)?;
    } else {
        out.write_all(format::job_summary(&job).as_bytes())
            .map_err(io)?;
    }
    Ok(exit::for_status(job.status))
}

/// Where an artifact goes under `dir`; `None` for a name that would land outside it.
pub fn download_target(dir: &Path, name: &str) -> Option<PathBuf> {
    let rel = Path::new(name);
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && !name.is_empty()).then(|| dir.join(rel))
}

fn download_all(
    client: &ApiClient,
    id: &str,
    artifacts: &[Artifact],
    dir: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u8, CliError> {
    let mut failures = 0;
    for artifact in artifacts {
        match download_one(client, id, artifact, dir) {
            Ok(path) => writeln!(out, "{}  {} bytes", path.display(), artifact.size).map_err(io)?,
            Err(e @ CliError::Unreachable { .. }) => return Err(e),
            Err(e) => {
                failures += 1;
                writeln!(err, "agentlab: {}: {e}", artifact.path).map_err(io)?;
            }
        }
    }
    if failures > 0 {
        return Err(CliError::Download(format!(
            "{failures} of {} artifacts failed to download",
            artifacts.len()
        )));
    }
    Ok(exit::SUCCESS)
}

/// Streams one artifact to a temporary file beside its destination, checks its sha256 against
/// both the listing and the `X-Sha256` header, and only then moves it into place.
fn download_one(
    client: &ApiClient,
    id: &str,
    artifact: &Artifact,
    dir: &Path,
) -> Result<PathBuf, CliError> {
    let target = download_target(dir, &artifact.path).ok_or_else(|| {
        CliError::Download(format!(
            "refusing the artifact name `{}`: it would land outside {}",
            artifact.path,
            dir.display()
        ))
    })?;
    let path = format!(
        "{}/artifacts/{}",
        job_path(id),
        encode_path(artifact.path.as_bytes())
    );
    let mut resp = client.get_stream(&path)?;
    let header = resp
        .headers()
        .get("x-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| CliError::io(format!("create {}", parent.display()), e))?;
    }
    let partial = target.with_file_name(format!(
        ".{}.part",
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let result = (|| {
        let mut file = File::create(&partial)
            .map_err(|e| CliError::io(format!("create {}", partial.display()), e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = resp
                .read(&mut buf)
                .map_err(|e| CliError::io("read the download", e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(|e| CliError::io(format!("write {}", partial.display()), e))?;
        }
        file.sync_all()
            .map_err(|e| CliError::io(format!("write {}", partial.display()), e))?;
        let got = hex::encode(hasher.finalize());
        for (source, expected) in [
            ("the listing", Some(artifact.sha256.to_ascii_lowercase())),
            ("X-Sha256", header.clone()),
        ] {
            if let Some(expected) = expected {
                if expected != got {
                    return Err(CliError::Download(format!(
                        "sha256 mismatch: {source} says {expected}, the download is {got}"
                    )));
                }
            }
        }
        std::fs::rename(&partial, &target)
            .map_err(|e| CliError::io(format!("move into {}", target.display()), e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result.map(|()| target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_targets_stay_inside_the_directory() {
        let dir = Path::new("/tmp/dl");
        assert_eq!(
            download_target(dir, "out/a.txt"),
            Some(PathBuf::from("/tmp/dl/out/a.txt"))
        );
        for bad in ["../x", "/etc/passwd", "out/../../x", "", "./x"] {
            assert_eq!(download_target(dir, bad), None, "{bad}");
        }
    }
}
