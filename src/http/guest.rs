//! The guest API: what a sandbox's guest may call, each call checked against a token scoped to
//! one job. Nothing a guest sends is trusted: the handlers here parse, authorize and answer; the
//! job's files (logs, artifacts, repository bundles), with their path confinement and size caps,
//! are `crate::jobfiles`' work. Tokens are never logged. Every refused token gets the same 401,
//! which does not say whether the token was missing, unknown, of another kind, used or expired.

use std::path::PathBuf;
use std::sync::Arc;

use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;

use super::error::ApiError;
use super::jobs::is_remote_repo;
use super::ApiState;
use crate::backend::GuestSink;
use crate::jobfiles::{BundleSource, JobFiles, JobMasker};
use crate::model::{now_ms, Artifact};
use crate::runner::spec::{JobSpec, RepoSpec};
use crate::secrets::mask::Masker;
use crate::store::TokenKind;

/// Where the runner checks the repo out, inside the guest.
const GUEST_WORKDIR: &str = "/work/repo";
/// The runner's own command timeout is a backstop behind the daemon's run-phase timeout.
const RUNNER_TIMEOUT_SLACK_SECONDS: u64 = 30;
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

fn refused() -> ApiError {
    ApiError::Unauthorized("a valid token is required".into())
}

async fn redeem(
    state: &ApiState,
    token: Option<String>,
    kind: TokenKind,
) -> Result<String, ApiError> {
    let token = token.ok_or_else(refused)?;
    state
        .svc
        .store
        .call(move |s| s.redeem_token(&token, kind))
        .await?
        .ok_or_else(refused)
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

/// The bundle of the job's host repository (its ref only), for the guest to clone without network
/// access: made on the first request, served from the job's files after that.
async fn repo_bundle(
    state: web::Data<ApiState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let id = job_id.clone();
    let request = state.svc.store.call(move |s| s.job_request(&id)).await?;
    let (repo, git_ref) = request
        .and_then(|r| Some((r.repo?, r.git_ref)))
        .filter(|(repo, _)| !is_remote_repo(repo))
        .ok_or_else(|| {
            ApiError::NotFound(format!("job {job_id} has no repository on this host"))
        })?;
    let source = BundleSource {
        repo: PathBuf::from(repo),
        git_ref,
        repo_roots: state.svc.config.repo_roots.clone(),
    };
    let bundle = JobFiles::new(&state.svc.config)
        .repo_bundle(&state.bundle_flights, &job_id, source)
        .await?;
    let body = tokio_util::io::ReaderStream::with_capacity(
        tokio::fs::File::from_std(bundle.file),
        64 * 1024,
    );
    Ok(HttpResponse::Ok()
        .content_type("application/x-git-bundle")
        .body(actix_web::body::SizedStream::new(bundle.size, body)))
}

/// The masker of the job's log, made from the job's secrets on its first post. Making one also
/// drops those of jobs that have ended, whose guests post no more.
async fn log_masker(state: &ApiState, job_id: &str) -> Result<JobMasker, ApiError> {
    if let Some(masker) = state.log_masks.get(job_id) {
        return Ok(masker);
    }
    let (id, tracked) = (job_id.to_owned(), state.log_masks.tracked());
    let (request, ended) = state
        .svc
        .store
        .call(move |s| {
            let mut ended = Vec::new();
            for other in tracked {
                if s.get_job(&other)?.is_none_or(|j| j.status.is_terminal()) {
                    ended.push(other);
                }
            }
            Ok((s.job_request(&id)?, ended))
        })
        .await?;
    state.log_masks.forget(&ended);
    let secrets = request
        .map(|r| crate::secrets::of_request(&r))
        .unwrap_or_default();
    Ok(state.log_masks.insert(job_id, Masker::new(secrets)))
}

async fn append_log(
    state: web::Data<ApiState>,
    req: HttpRequest,
    body: Bytes,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let masker = log_masker(&state, &job_id).await?;
    let mut masker = masker.lock().await;
    JobFiles::new(&state.svc.config)
        .append_masked_log(&job_id, &mut masker, &body)
        .await?;
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
    let masker = log_masker(&state, &job_id).await?;
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
        // The guest's words become an event: masked like its log.
        let message =
            String::from_utf8_lossy(&masker.lock().await.mask_all(message.as_bytes())).into_owned();
        let event = state
            .svc
            .store
            .call(move |s| s.add_event(&id, "artifacts", None, &message))
            .await?;
        state.svc.hub.publish(event);
    }
    // The guest posts no more output: what the masker held back goes to the log.
    if let Some(masker) = state.log_masks.take(&job_id) {
        JobFiles::new(&state.svc.config)
            .finish_masked_log(&job_id, &mut *masker.lock().await)
            .await?;
    }
    state.reports.uploads_done(&job_id).await;
    Ok(HttpResponse::NoContent().finish())
}

async fn upload_artifact(
    state: web::Data<ApiState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let relative = req.match_info().query("path").to_owned();
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut upload =
        JobFiles::new(&state.svc.config).start_artifact(&job_id, &relative, declared)?;
    while let Some(chunk) = payload.next().await {
        let written = match chunk {
            Ok(chunk) => upload.write(&chunk).await.map_err(ApiError::from),
            Err(err) => Err(ApiError::BadRequest(format!("upload interrupted: {err}"))),
        };
        if let Err(err) = written {
            upload.abort().await;
            return Err(err);
        }
    }
    let stored = upload.commit().await?;
    let artifact = Artifact {
        job_id: job_id.clone(),
        path: relative,
        size: stored.size,
        sha256: stored.sha256,
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

/// Keeps the shared guest report sink reachable from the handlers.
pub type Reports = Arc<dyn GuestSink>;
