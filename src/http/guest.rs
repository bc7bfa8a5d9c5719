//! The guest API: what a sandbox's guest may call, each call checked against a token scoped to
//! one job. Nothing a guest sends is trusted: paths are confined to the job's artifact folder,
//! sizes are capped, and tokens are never logged.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::jobs::is_remote_repo;
use super::stream::log_path;
use super::ApiState;
use crate::backend::GuestSink;
use crate::model::{now_ms, Artifact};
use crate::paths::join_confined;
use crate::runner::spec::{JobSpec, RepoSpec};
use crate::store::TokenKind;

/// Where the runner checks the repo out, inside the guest.
const GUEST_WORKDIR: &str = "/work/repo";
/// The runner's own command timeout is a backstop behind the daemon's run-phase timeout.
const RUNNER_TIMEOUT_SLACK_SECONDS: u64 = 30;
const BUNDLE_TIMEOUT: Duration = Duration::from_secs(300);
const LOG_REQUEST_MAX: usize = 4 * 1024 * 1024;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(LOG_REQUEST_MAX))
        .route("/guest/v1/phone-home/{token}", web::post().to(phone_home))
        .route("/guest/v1/bootstrap", web::post().to(bootstrap))
        .route("/guest/v1/repo.bundle", web::get().to(repo_bundle))
        .route("/guest/v1/log", web::post().to(append_log))
        .route("/guest/v1/exit", web::post().to(exit))
        .route(
            "/guest/v1/artifacts/{path:.*}",
            web::put().to(upload_artifact),
        )
        .route("/guest/v1/done", web::post().to(done));
}

fn bearer(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_owned())
}

async fn redeem(
    state: &ApiState,
    token: Option<String>,
    kind: TokenKind,
) -> Result<String, ApiError> {
    let token = token.ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
    state
        .svc
        .store
        .call(move |s| s.redeem_token(&token, kind))
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid, used or expired token".into()))
}

async fn session(state: &ApiState, req: &HttpRequest) -> Result<String, ApiError> {
    redeem(state, bearer(req), TokenKind::Session).await
}

async fn phone_home(
    state: web::Data<ApiState>,
    token: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let job_id = redeem(&state, Some(token.into_inner()), TokenKind::PhoneHome).await?;
    state.reports.phoned_home(&job_id).await;
    Ok(HttpResponse::Ok().finish())
}

async fn bootstrap(state: web::Data<ApiState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let job_id = redeem(&state, bearer(&req), TokenKind::Bootstrap).await?;
    let ttl_ms = i64::try_from(state.svc.config.token_ttl().as_millis()).unwrap_or(i64::MAX);
    let id = job_id.clone();
    let (request, session_token) = state
        .svc
        .store
        .call(move |s| {
            Ok((
                s.job_request(&id)?,
                s.issue_token(&id, TokenKind::Session, ttl_ms)?,
            ))
        })
        .await?;
    let request =
        request.ok_or_else(|| ApiError::NotFound(format!("job {job_id} does not exist")))?;
    let profile = state.svc.profiles().get(&request.profile).cloned();
    let profile = profile
        .ok_or_else(|| ApiError::Conflict(format!("profile `{}` is gone", request.profile)))?;
    let mut run_limit = state.svc.tuning.get().phase_timeouts.run.as_secs();
    if let Some(seconds) = request.run_timeout_seconds {
        run_limit = run_limit.min(seconds);
    }
    let repo = request.repo.clone().map(|repo| {
        if is_remote_repo(&repo) {
            RepoSpec::Url {
                url: repo,
                git_ref: request.git_ref.clone(),
            }
        } else {
            RepoSpec::Bundle {
                git_ref: request.git_ref.clone(),
            }
        }
    });
    let spec = JobSpec {
        job_id: job_id.clone(),
        session_token,
        task: request.task,
        command: request.command.unwrap_or(profile.agent.command),
        repo,
        env: request.env,
        artifacts: request.artifacts.unwrap_or(profile.artifacts),
        run_timeout_seconds: run_limit + RUNNER_TIMEOUT_SLACK_SECONDS,
        max_artifact_bytes: state.svc.config.artifact_max_bytes,
        workdir: PathBuf::from(GUEST_WORKDIR),
    };
    tracing::info!(job = %job_id, "guest redeemed its bootstrap token");
    Ok(HttpResponse::Ok().json(spec))
}

/// Bundles the job's host repository (all refs) for the guest to clone without network access.
async fn repo_bundle(
    state: web::Data<ApiState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let id = job_id.clone();
    let request = state.svc.store.call(move |s| s.job_request(&id)).await?;
    let repo = request
        .and_then(|r| r.repo)
        .filter(|r| !is_remote_repo(r))
        .ok_or_else(|| {
            ApiError::NotFound(format!("job {job_id} has no repository on this host"))
        })?;
    let scratch = state.svc.config.data_dir.join("tmp");
    let bundle = scratch.join(format!("{job_id}-{}.bundle", crate::model::new_id()));
    let file = web::block(move || create_bundle(&repo, &scratch, &bundle))
        .await
        .map_err(ApiError::internal)??;
    let size = file.metadata().map_err(ApiError::internal)?.len();
    let body =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 64 * 1024);
    Ok(HttpResponse::Ok()
        .content_type("application/x-git-bundle")
        .body(actix_web::body::SizedStream::new(size, body)))
}

/// Runs `git bundle create` under a timeout and returns the open bundle, already unlinked so it
/// disappears once streamed.
fn create_bundle(repo: &str, scratch: &Path, bundle: &Path) -> Result<std::fs::File, ApiError> {
    std::fs::create_dir_all(scratch).map_err(ApiError::internal)?;
    let handle = duct::cmd!(
        "git",
        "-c",
        "safe.directory=*",
        "-C",
        repo,
        "bundle",
        "create",
        bundle,
        "--all"
    )
    .stdout_null()
    .stderr_capture()
    .unchecked()
    .start()
    .map_err(ApiError::internal)?;
    let output = match handle
        .wait_timeout(BUNDLE_TIMEOUT)
        .map_err(ApiError::internal)?
    {
        Some(output) => output.clone(),
        None => {
            let _ = handle.kill();
            let _ = std::fs::remove_file(bundle);
            return Err(ApiError::Internal("git bundle timed out".into()));
        }
    };
    if !output.status.success() {
        let _ = std::fs::remove_file(bundle);
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ApiError::Internal(format!(
            "git bundle failed: {}",
            stderr.trim()
        )));
    }
    let file = std::fs::File::open(bundle).map_err(ApiError::internal)?;
    std::fs::remove_file(bundle).map_err(ApiError::internal)?;
    Ok(file)
}

async fn append_log(
    state: web::Data<ApiState>,
    req: HttpRequest,
    body: Bytes,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let path = log_path(&state, &job_id);
    let cap = state.svc.config.log_max_bytes;
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(ApiError::internal)?;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .map_err(ApiError::internal)?;
    let written = file.metadata().await.map_err(ApiError::internal)?.len();
    if written >= cap {
        return Ok(HttpResponse::NoContent().finish());
    }
    let room = usize::try_from(cap - written).unwrap_or(usize::MAX);
    if body.len() <= room {
        file.write_all(&body).await.map_err(ApiError::internal)?;
    } else {
        file.write_all(&body[..room])
            .await
            .map_err(ApiError::internal)?;
        file.write_all(format!("\n[agentlab: log truncated at {cap} bytes]\n").as_bytes())
            .await
            .map_err(ApiError::internal)?;
    }
    file.flush().await.map_err(ApiError::internal)?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExitReport {
    exit_code: i32,
}

async fn exit(
    state: web::Data<ApiState>,
    req: HttpRequest,
    report: web::Json<ExitReport>,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    state
        .reports
        .command_exited(&job_id, report.exit_code)
        .await;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DoneReport {
    uploaded: u64,
    #[serde(default)]
    errors: Vec<String>,
}

async fn done(
    state: web::Data<ApiState>,
    req: HttpRequest,
    report: web::Json<DoneReport>,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let report = report.into_inner();
    if !report.errors.is_empty() {
        let id = job_id.clone();
        let errors: Vec<String> = report
            .errors
            .iter()
            .take(20)
            .map(|e| e.chars().take(500).collect())
            .collect();
        let message = format!(
            "{} artifacts uploaded; errors: {}",
            report.uploaded,
            errors.join("; ")
        );
        let event = state
            .svc
            .store
            .call(move |s| s.add_event(&id, "artifacts", None, &message))
            .await?;
        state.svc.hub.publish(event);
    }
    state.reports.uploads_done(&job_id).await;
    Ok(HttpResponse::NoContent().finish())
}

enum Chunk {
    Data(Bytes),
    /// Everything arrived: make the file durable and move it into place.
    Commit,
}

async fn upload_artifact(
    state: web::Data<ApiState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let relative = req.match_info().query("path").to_owned();
    let job_dir = state.svc.config.artifacts_dir().join(&job_id);
    let dest = join_confined(&job_dir, &relative).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "artifact path `{relative}` must be relative, without `..`"
        ))
    })?;
    let max = state.svc.config.artifact_max_bytes;
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(ApiError::PayloadTooLarge(format!(
            "artifact `{relative}` is over the {max}-byte limit"
        )));
    }
    let scratch = state.svc.config.artifacts_dir().join(".tmp");
    let tmp = scratch.join(crate::model::new_id());
    let (tx, rx) = mpsc::channel::<Chunk>(32);
    let writer = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || write_artifact(rx, &scratch, &tmp, &dest)
    });
    let mut total: u64 = 0;
    let mut failure = None;
    while let Some(chunk) = payload.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(err) => {
                failure = Some(ApiError::BadRequest(format!("upload interrupted: {err}")));
                break;
            }
        };
        total += chunk.len() as u64;
        if total > max {
            failure = Some(ApiError::PayloadTooLarge(format!(
                "artifact `{relative}` is over the {max}-byte limit"
            )));
            break;
        }
        if tx.send(Chunk::Data(chunk)).await.is_err() {
            break;
        }
    }
    if failure.is_none() {
        let _ = tx.send(Chunk::Commit).await;
    }
    drop(tx);
    let written = writer.await.map_err(ApiError::internal)?;
    if let Some(err) = failure {
        return Err(err);
    }
    let (size, sha256) = written.map_err(ApiError::internal)?;
    let artifact = Artifact {
        job_id: job_id.clone(),
        path: relative,
        size,
        sha256,
        created_at_ms: now_ms(),
    };
    let record = artifact.clone();
    state
        .svc
        .store
        .call(move |s| s.record_artifact(&record))
        .await?;
    Ok(HttpResponse::Created().json(artifact))
}

/// Writes chunks to a scratch file while hashing them; on `Commit`, fsyncs and renames it into
/// place. If the channel closes without `Commit`, the scratch file is removed.
fn write_artifact(
    mut rx: mpsc::Receiver<Chunk>,
    scratch: &Path,
    tmp: &Path,
    dest: &Path,
) -> std::io::Result<(u64, String)> {
    std::fs::create_dir_all(scratch)?;
    let mut file = std::fs::File::create(tmp)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let result = (|| {
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Chunk::Data(bytes) => {
                    file.write_all(&bytes)?;
                    hasher.update(&bytes);
                    size += bytes.len() as u64;
                }
                Chunk::Commit => {
                    file.sync_all()?;
                    let parent = dest.parent().map(PathBuf::from).unwrap_or_default();
                    std::fs::create_dir_all(&parent)?;
                    std::fs::rename(tmp, dest)?;
                    std::fs::File::open(&parent)?.sync_all()?;
                    return Ok(());
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "upload aborted",
        ))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result.map(|()| (size, hex::encode(hasher.finalize())))
}

/// Keeps the shared guest report sink reachable from the handlers.
pub type Reports = Arc<dyn GuestSink>;
