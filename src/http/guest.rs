//! The guest API: what a sandbox's guest may call, each call checked against a token scoped to one
//! job (or, for the runner's download only, to one pool sandbox booted before any job). Nothing a
//! guest sends is trusted: the handlers here parse, authorize and answer; the job's files (logs,
//! artifacts, repository bundles), with their path confinement, size caps and quotas, are
//! `crate::jobfiles`' work. Tokens are never logged. Every refused token gets the same 401, which
//! does not say whether the token was missing, unknown, of another kind, used or expired.
//!
//! Under abuse: once the token names the job, a request takes one of the job's permits
//! (`guest_limits`; none left: 429 at once); request bodies are read here, after that, each piece
//! awaited at most `guest_body_timeout` (408 past it); a quota reached answers 413 and records an
//! event on the job, once per quota, and the job goes on. Internal errors reach the guest without
//! their detail (the guest listener's middleware in `super`).

use std::path::PathBuf;
use std::sync::Arc;

use actix_web::web::{Bytes, BytesMut};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::ApiError;
use super::guest_limits::RequestPermit;
use super::jobs::is_remote_repo;
use super::ApiState;
use crate::backend::GuestSink;
use crate::jobfiles::{BundleSource, JobFilesError, JobMasker, LogAppend, Quota};
use crate::model::{now_ms, Artifact, ArtifactUsage};
use crate::runner::spec::{JobSpec, RepoSpec};
use crate::secrets::mask::Masker;
use crate::store::{TokenKind, TokenScope};

/// Where the runner checks the repo out, inside the guest.
const GUEST_WORKDIR: &str = "/work/repo";
/// The runner's own command timeout is a backstop behind the daemon's run-phase timeout.
const RUNNER_TIMEOUT_SLACK_SECONDS: u64 = 30;
/// Cap on one log post's body.
const LOG_REQUEST_MAX: usize = 4 * 1024 * 1024;
/// Cap on the JSON bodies (exit, done).
const JSON_REQUEST_MAX: usize = 64 * 1024;
/// The kind of the events that say a job reached a quota.
const QUOTA_EVENT: &str = "quota";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/guest/v1/phone-home/{token}", web::post().to(phone_home))
        .route("/guest/v1/bootstrap", web::post().to(bootstrap))
        .route("/guest/v1/repo.bundle", web::get().to(repo_bundle))
        .route("/guest/v1/runner", web::get().to(runner_binary))
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

/// One of the job's request permits, held for the rest of the request.
fn admit<'a>(state: &'a ApiState, job_id: &str) -> Result<RequestPermit<'a>, ApiError> {
    admit_as(state, job_id, || format!("job {job_id}"))
}

/// One of the permits of what a runner token is scoped to, a job or a pool sandbox: each has
/// `guest_requests_per_job` of its own (their ids never collide: a pool sandbox's starts
/// `sandbox-`, a job's does not).
fn admit_scope<'a>(state: &'a ApiState, scope: &TokenScope) -> Result<RequestPermit<'a>, ApiError> {
    admit_as(state, scope.id(), || match scope {
        TokenScope::Job(id) => format!("job {id}"),
        TokenScope::Pool(id) => format!("pool sandbox {id}"),
    })
}

/// A permit of `key`'s; `who` names it in the refusal.
fn admit_as<'a>(
    state: &'a ApiState,
    key: &str,
    who: impl FnOnce() -> String,
) -> Result<RequestPermit<'a>, ApiError> {
    state.guest_limits.admit(key).ok_or_else(|| {
        ApiError::TooManyRequests(format!(
            "{} already has {} guest requests in flight, as many as \
             guest_requests_per_job allows; send this one again once one has ended",
            who(),
            state.guest_limits.per_job()
        ))
    })
}

/// The next piece of a request body, waiting at most `guest_body_timeout` for it.
async fn next_chunk(
    state: &ApiState,
    payload: &mut web::Payload,
) -> Result<Option<Bytes>, ApiError> {
    let limit = state.svc.config.guest_body_timeout;
    match tokio::time::timeout(limit, payload.next()).await {
        Ok(None) => Ok(None),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(Some(Err(err))) => Err(ApiError::BadRequest(format!(
            "the request body was interrupted: {err}"
        ))),
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "no part of the request body came for {}; the request was given up",
            humantime::format_duration(limit)
        ))),
    }
}

/// A whole request body of at most `max` bytes.
async fn read_body(
    state: &ApiState,
    req: &HttpRequest,
    payload: &mut web::Payload,
    max: usize,
) -> Result<BytesMut, ApiError> {
    let too_large =
        || ApiError::PayloadTooLarge(format!("request body is over the {max}-byte limit"));
    if declared_length(req).is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = next_chunk(state, payload).await? {
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn read_json<T: DeserializeOwned>(
    state: &ApiState,
    req: &HttpRequest,
    payload: &mut web::Payload,
) -> Result<T, ApiError> {
    let body = read_body(state, req, payload, JSON_REQUEST_MAX).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidJson(format!("invalid JSON body: {e}")))
}

fn declared_length(req: &HttpRequest) -> Option<u64> {
    req.headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Records that the job reached `quota`, once per job and quota however often it happens. A
/// failure to record it is logged: the guest still gets its 413.
async fn report_quota(state: &ApiState, job_id: &str, quota: Quota) {
    let id = job_id.to_owned();
    let message = quota.event_message();
    match state
        .svc
        .store
        .call(move |s| s.add_event_once(&id, QUOTA_EVENT, &message))
        .await
    {
        Ok(Some(event)) => {
            tracing::info!(job = %job_id, %quota, "a guest reached a quota");
            state.svc.hub.publish(event);
        }
        Ok(None) => {}
        Err(err) => tracing::warn!(job = %job_id, %err, "recording a quota event failed"),
    }
}

/// The answer to a job-files error, with the quota event when it was one.
async fn files_error(state: &ApiState, job_id: &str, err: JobFilesError) -> ApiError {
    if let JobFilesError::OverQuota { quota, .. } = &err {
        report_quota(state, job_id, *quota).await;
    }
    err.into()
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
    let send_changes = request.host_repo().is_some();
    let spec = JobSpec {
        send_changes,
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
    let _permit = admit(&state, &job_id)?;
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
    let bundle = state.guest_files.repo_bundle(&job_id, source).await?;
    let body = tokio_util::io::ReaderStream::with_capacity(
        tokio::fs::File::from_std(bundle.file),
        64 * 1024,
    );
    Ok(HttpResponse::Ok()
        .content_type("application/x-git-bundle")
        .body(actix_web::body::SizedStream::new(bundle.size, body)))
}

/// The daemon's runner binary, for the sandbox's user-data to install: behind the sandbox's
/// runner token, scoped to its job or, for a pool sandbox booted before any job, to that pool
/// sandbox; it works until it expires or what it is scoped to ends (the template VM of a
/// snapshot the sandbox makes uses it too). `X-Sha256` is the digest the user-data checks, read
/// at start-up.
async fn runner_binary(
    state: web::Data<ApiState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let token = bearer(&req).ok_or_else(refused)?;
    let scope = state
        .svc
        .store
        .call(move |s| s.redeem_runner_token(&token))
        .await?
        .ok_or_else(refused)?;
    let _permit = admit_scope(&state, &scope)?;
    let runner =
        state.svc.runner.as_ref().ok_or_else(|| {
            ApiError::NotFound("this daemon serves no runner (runner_path)".into())
        })?;
    let file = tokio::fs::File::open(&runner.path)
        .await
        .map_err(ApiError::internal)?;
    let size = file.metadata().await.map_err(ApiError::internal)?.len();
    match &scope {
        TokenScope::Job(id) => tracing::info!(job = %id, "a guest fetched the runner"),
        TokenScope::Pool(id) => {
            tracing::info!(pool_sandbox = %id, "a guest fetched the runner")
        }
    }
    let body = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024);
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header(("X-Sha256", runner.sha256.clone()))
        .body(actix_web::body::SizedStream::new(size, body)))
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
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let _permit = admit(&state, &job_id)?;
    let body = read_body(&state, &req, &mut payload, LOG_REQUEST_MAX).await?;
    let masker = log_masker(&state, &job_id).await?;
    let mut masker = masker.lock().await;
    match state
        .guest_files
        .append_masked_log(&job_id, &mut masker, &body)
        .await
    {
        Ok(LogAppend::Stored) => Ok(HttpResponse::NoContent().finish()),
        Ok(LogAppend::CapReached(quota) | LogAppend::Full(quota)) => {
            report_quota(&state, &job_id, quota).await;
            Err(ApiError::PayloadTooLarge(format!(
                "the job's log reached {quota}: this output and any later is not stored"
            )))
        }
        Err(err) => Err(files_error(&state, &job_id, err).await),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExitReport {
    exit_code: i32,
}

async fn exit(
    state: web::Data<ApiState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let _permit = admit(&state, &job_id)?;
    let report: ExitReport = read_json(&state, &req, &mut payload).await?;
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
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let _permit = admit(&state, &job_id)?;
    let report: DoneReport = read_json(&state, &req, &mut payload).await?;
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
        // Past the log cap the tail is dropped like any other output.
        if let Err(err) = state
            .guest_files
            .finish_masked_log(&job_id, &mut *masker.lock().await)
            .await
        {
            return Err(files_error(&state, &job_id, err).await);
        }
    }
    state.reports.uploads_done(&job_id).await;
    Ok(HttpResponse::NoContent().finish())
}

/// How much the job's artifacts other than `relative` use of its quota.
async fn artifact_usage(
    state: &ApiState,
    job_id: &str,
    relative: &str,
) -> Result<ArtifactUsage, ApiError> {
    let (id, path) = (job_id.to_owned(), relative.to_owned());
    Ok(state
        .svc
        .store
        .call(move |s| s.artifact_usage(&id, &path))
        .await?)
}

/// `relative` comes fully percent-decoded (`web::Path` decodes what the router leaves encoded,
/// `%2F` and `%25` among them), so `%2e%2e%2F` is `../` by the time it is checked.
async fn upload_artifact(
    state: web::Data<ApiState>,
    req: HttpRequest,
    relative: web::Path<String>,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let job_id = session(&state, &req).await?;
    let _permit = admit(&state, &job_id)?;
    let relative = relative.into_inner();
    let files = &state.guest_files;
    let usage = artifact_usage(&state, &job_id, &relative).await?;
    let mut upload = match files
        .start_artifact(&job_id, &relative, declared_length(&req), usage)
        .await
    {
        Ok(upload) => upload,
        Err(err) => return Err(files_error(&state, &job_id, err).await),
    };
    loop {
        let chunk = match next_chunk(&state, &mut payload).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(err) => {
                upload.abort().await;
                return Err(err);
            }
        };
        if let Err(err) = upload.write(&chunk).await {
            upload.abort().await;
            return Err(files_error(&state, &job_id, err).await);
        }
    }
    // From here to the record, the job's other uploads wait: the quota check holds for all.
    let turn = files.artifact_turn(&job_id).await;
    let usage = match artifact_usage(&state, &job_id, &relative).await {
        Ok(usage) => usage,
        Err(err) => {
            upload.abort().await;
            return Err(err);
        }
    };
    let stored = match upload.commit(&turn, usage).await {
        Ok(stored) => stored,
        Err(err) => return Err(files_error(&state, &job_id, err).await),
    };
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
    drop(turn);
    Ok(HttpResponse::Created().json(artifact))
}

/// Keeps the shared guest report sink reachable from the handlers.
pub type Reports = Arc<dyn GuestSink>;
