//! Control API routes for jobs: submit (with validation, including whether this host can start
//! the sandbox as asked), list, show (with, for a queued job, its place in the queue and what it
//! waits for; once its sandbox has started, how it did), cancel.

use std::path::{Path, PathBuf};

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::ApiError;
use super::{paging, ApiState};
use crate::actors::governor::GetHeadWait;
use crate::actors::supervisor::{Admit, CancelJob, IsReady};
use crate::governor::status::JobQueue;
use crate::host_repos::{self, HostRepoError};
use crate::model::{new_id, Job, JobRequest, JobStatus, StartMethod, StartMode};
use crate::paths::is_safe_relative;
use crate::start::resolve_start;
use crate::store::NewJob;

/// Caps on what one job request may carry, beyond the body size limit.
const MAX_ENV_VARS: usize = 256;
const MAX_ARTIFACT_GLOBS: usize = 64;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/jobs", web::post().to(submit))
        .route("/v1/jobs", web::get().to(list))
        .route("/v1/jobs/{id}", web::get().to(show))
        .route("/v1/jobs/{id}/cancel", web::post().to(cancel));
}

pub use crate::model::is_remote_repo;

fn valid_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !key.starts_with("AGENTLAB_")
}

/// Checks what a request can be checked for without the disk.
pub fn validate(
    request: &JobRequest,
    profiles: &crate::config::profile::Profiles,
) -> Result<(), ApiError> {
    if profiles.get(&request.profile).is_none() {
        return Err(ApiError::UnknownProfile(format!(
            "unknown profile `{}`; known profiles: {}",
            request.profile,
            profiles.names().join(", ")
        )));
    }
    if request.task.trim().is_empty() {
        return Err(ApiError::BadRequest("`task` must not be empty".into()));
    }
    if request
        .command
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err(ApiError::BadRequest(
            "`command` must not be empty when given".into(),
        ));
    }
    if request.env.len() > MAX_ENV_VARS {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_ENV_VARS} env variables"
        )));
    }
    if let Some(key) = request.env.keys().find(|k| !valid_env_key(k)) {
        return Err(ApiError::BadRequest(format!(
            "env key `{key}` must be letters, digits and _, not start with a digit, and not use the AGENTLAB_ prefix"
        )));
    }
    if request.env.values().any(|v| v.contains('\0')) {
        return Err(ApiError::BadRequest(
            "env values must not contain NUL".into(),
        ));
    }
    if let Some(globs) = &request.artifacts {
        if globs.len() > MAX_ARTIFACT_GLOBS {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_ARTIFACT_GLOBS} artifact paths"
            )));
        }
        if let Some(glob) = globs.iter().find(|g| !is_safe_relative(g)) {
            return Err(ApiError::BadRequest(format!(
                "artifact path `{glob}` must be relative to the checkout, without `..`"
            )));
        }
    }
    if request
        .git_ref
        .as_deref()
        .is_some_and(|r| !host_repos::is_valid_ref_name(r))
    {
        return Err(ApiError::BadRequest(
            "`ref` must be a branch, tag or commit name (as `git check-ref-format` allows, \
             not starting with `-`)"
                .into(),
        ));
    }
    if request.git_ref.is_some() && request.repo.is_none() {
        return Err(ApiError::BadRequest("`ref` needs a `repo`".into()));
    }
    if request.result_branch && request.host_repo().is_none() {
        return Err(ApiError::BadRequest(
            "`result_branch` needs a `repo` on the daemon's host (a path under `repo_roots`):              the branch is made there"
                .into(),
        ));
    }
    for (field, value) in [
        ("ttl_minutes", request.ttl_minutes.map(u64::from)),
        ("run_timeout_seconds", request.run_timeout_seconds),
        ("deadline_seconds", request.deadline_seconds),
    ] {
        if value == Some(0) {
            return Err(ApiError::BadRequest(format!("`{field}` must be above 0")));
        }
    }
    let max_ttl_minutes = crate::store::MAX_LEASE.as_secs() / 60;
    if request
        .ttl_minutes
        .is_some_and(|m| u64::from(m) > max_ttl_minutes)
    {
        return Err(ApiError::BadRequest(format!(
            "`ttl_minutes` must be at most {max_ttl_minutes} (the longest lease)"
        )));
    }
    Ok(())
}

/// Refuses a start the host cannot give: `snapshot` where the backend cannot restore or the
/// tuning has snapshot starts off. The lifecycle decides again when the sandbox is built.
pub fn check_start(
    requested: StartMode,
    backend_can: bool,
    tuning_enabled: bool,
) -> Result<(), ApiError> {
    resolve_start(requested, backend_can, tuning_enabled)
        .map(drop)
        .map_err(|refusal| ApiError::BadRequest(refusal.to_string()))
}

/// A repo on this host must be a git repository under one of `repo_roots` (symlinks resolved),
/// with the job's ref (HEAD when none) a branch, tag or commit of it: the daemon bundles it.
/// Blocking: it reads the disk and runs git.
fn check_local_repo(repo: &str, roots: &[PathBuf], git_ref: Option<&str>) -> Result<(), ApiError> {
    if !Path::new(repo).is_absolute() {
        return Err(ApiError::BadRequest(format!(
            "repo `{repo}` must be a URL or an absolute path"
        )));
    }
    match host_repos::inspect(Path::new(repo), roots, git_ref, host_repos::RESOLVE_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(err @ HostRepoError::OutsideRoots) => {
            let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            Err(ApiError::BadRequest(format!(
                "repo `{repo}`: {err} (repo_roots: {})",
                roots.join(", ")
            )))
        }
        Err(err) if err.is_refusal() => Err(ApiError::BadRequest(format!("repo `{repo}`: {err}"))),
        Err(err) => Err(ApiError::internal(format!("repo `{repo}`: {err}"))),
    }
}

async fn submit(
    state: web::Data<ApiState>,
    body: web::Json<JobRequest>,
) -> Result<HttpResponse, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown(
            "the daemon is shutting down; submit again shortly".into(),
        ));
    }
    let request = body.into_inner();
    validate(&request, &state.svc.profiles())?;
    check_start(
        request.start,
        state.svc.backend.snapshot_starts(),
        state.svc.tuning.get().snapshots_enabled(),
    )?;
    if let Some(repo) = request.repo.clone().filter(|r| !is_remote_repo(r)) {
        let roots = state.svc.config.repo_roots.clone();
        let git_ref = request.git_ref.clone();
        web::block(move || check_local_repo(&repo, &roots, git_ref.as_deref()))
            .await
            .map_err(ApiError::internal)??;
    }
    let deadline_ms = request.deadline_seconds.map(|s| {
        state
            .svc
            .clock
            .now_ms()
            .saturating_add(i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX))
    });
    let new = NewJob {
        id: new_id(),
        request,
        deadline_ms,
    };
    let queue_max = u64::from(state.svc.tuning.get().admission.queue_max);
    let (job, event) = state
        .svc
        .store
        .call(move |s| s.insert_job(&new, queue_max))
        .await?;
    state.svc.hub.publish(event);
    state.supervisor.do_send(Admit);
    tracing::info!(job = %job.id, profile = %job.profile, "job submitted");
    Ok(HttpResponse::Created().json(json!({"id": job.id, "status": job.status})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

/// Newest first, a page at a time; `next` is the cursor of the following page, null on the last.
async fn list(
    state: web::Data<ApiState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let status = query
        .status
        .as_deref()
        .map(|s| s.to_ascii_uppercase().parse::<JobStatus>())
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let limit = paging::limit(query.limit)?;
    let after = paging::cursor(query.after.as_deref())?;
    let page = state
        .svc
        .store
        .call(move |s| s.list_jobs(status, after, limit))
        .await?;
    Ok(HttpResponse::Ok().json(json!({
        "jobs": page.items,
        "next": page.next.map(|c| c.to_string()),
    })))
}

pub async fn load_job(state: &ApiState, id: String) -> Result<Job, ApiError> {
    let shown = id.clone();
    state
        .svc
        .store
        .call(move |s| s.get_job(&id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {shown} does not exist")))
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Serialize)]
struct ShownJob {
    #[serde(flatten)]
    job: Job,
    /// While it is queued: its place and what it waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<JobQueue>,
    /// How its sandbox started, once it has (`job.start` is what it asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    start_method: Option<StartMethod>,
    /// The snapshot a restored sandbox came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_id: Option<String>,
}

async fn show(state: web::Data<ApiState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let shown = id.clone();
    let (job, sandbox) = state
        .svc
        .store
        .call(move |s| Ok((s.get_job(&id)?, s.sandbox_for_job(&id)?)))
        .await?;
    let job = job.ok_or_else(|| ApiError::NotFound(format!("job {shown} does not exist")))?;
    let (start_method, snapshot_id) = sandbox
        .map(|s| (s.start_method, s.snapshot_id))
        .unwrap_or_default();
    let queue = match (job.status, job.queue_position) {
        (JobStatus::Queued, Some(position))
            if !state
                .supervisor
                .send(IsReady)
                .await
                .map_err(ApiError::internal)? =>
        {
            Some(JobQueue {
                position,
                reason: "startup".to_owned(),
                waiting_for: "the start-up reconcile (resuming interrupted jobs, removing \
                              leftover VMs) to finish"
                    .to_owned(),
                since_ms: None,
            })
        }
        (JobStatus::Queued, Some(position)) => {
            // The job still shows if the governor cannot answer; only the reason is missing.
            match state.governor.send(GetHeadWait).await {
                Ok(head) => Some(head.for_job(&job.id, position)),
                Err(err) => {
                    tracing::warn!(%err, "the governor did not say why the queue waits");
                    None
                }
            }
        }
        _ => None,
    };
    Ok(HttpResponse::Ok().json(ShownJob {
        job,
        queue,
        start_method,
        snapshot_id,
    }))
}

async fn cancel(
    state: web::Data<ApiState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let job = load_job(&state, id.clone()).await?;
    if job.status.is_terminal() {
        return Err(ApiError::Conflict(format!(
            "job {id} already ended ({})",
            job.status
        )));
    }
    let cancel = CancelJob {
        job_id: id.clone(),
        status: JobStatus::Cancelled,
        reason: "cancelled by request".into(),
    };
    state
        .supervisor
        .send(cancel)
        .await
        .map_err(ApiError::internal)??;
    Ok(HttpResponse::Accepted().json(load_job(&state, id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profiles() -> crate::config::profile::Profiles {
        crate::config::profile::Profiles::load_dir(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/profiles"
        )))
        .unwrap()
    }

    fn ok_request() -> JobRequest {
        JobRequest {
            profile: "balanced".into(),
            task: "t".into(),
            ..JobRequest::default()
        }
    }

    #[test]
    fn rejects_what_a_guest_or_shell_could_abuse() {
        let p = profiles();
        assert!(validate(&ok_request(), &p).is_ok());
        let branch = JobRequest {
            repo: Some("/srv/repos/r".into()),
            result_branch: true,
            ..ok_request()
        };
        assert!(validate(&branch, &p).is_ok());
        let cases = [
            JobRequest {
                profile: "nope".into(),
                ..ok_request()
            },
            JobRequest {
                task: " ".into(),
                ..ok_request()
            },
            JobRequest {
                env: [("1BAD".to_owned(), "x".to_owned())].into(),
                ..ok_request()
            },
            JobRequest {
                env: [("AGENTLAB_TOKEN".to_owned(), "x".to_owned())].into(),
                ..ok_request()
            },
            JobRequest {
                artifacts: Some(vec!["../etc".into()]),
                ..ok_request()
            },
            JobRequest {
                artifacts: Some(vec!["/etc/passwd".into()]),
                ..ok_request()
            },
            JobRequest {
                repo: Some("/r".into()),
                git_ref: Some("--upload-pack=x".into()),
                ..ok_request()
            },
            JobRequest {
                repo: Some("/r".into()),
                git_ref: Some("main..other".into()),
                ..ok_request()
            },
            JobRequest {
                repo: Some("/r".into()),
                git_ref: Some("main@{1}".into()),
                ..ok_request()
            },
            JobRequest {
                run_timeout_seconds: Some(0),
                ..ok_request()
            },
            JobRequest {
                result_branch: true,
                ..ok_request()
            },
            JobRequest {
                repo: Some("https://example.invalid/r.git".into()),
                result_branch: true,
                ..ok_request()
            },
            JobRequest {
                ttl_minutes: Some(7 * 24 * 60 + 1),
                ..ok_request()
            },
        ];
        for case in cases {
            assert!(validate(&case, &p).is_err(), "{case:?}");
        }
    }

    #[test]
    fn a_start_the_host_cannot_give_is_a_bad_request_that_says_why() {
        assert!(check_start(StartMode::Snapshot, true, true).is_ok());
        assert!(check_start(StartMode::Auto, false, false).is_ok());
        assert!(check_start(StartMode::Cold, false, false).is_ok());
        for (backend_can, tuning_enabled, says) in [
            (false, true, "backend: qemu"),
            (true, false, "snapshots.enabled: false"),
        ] {
            match check_start(StartMode::Snapshot, backend_can, tuning_enabled) {
                Err(err @ ApiError::BadRequest(_)) => {
                    assert!(err.to_string().contains(says), "{err}")
                }
                other => panic!("{backend_can} {tuning_enabled}: {other:?}"),
            }
        }
    }

    #[test]
    fn tells_remote_repos_from_local_paths() {
        assert!(is_remote_repo("https://example.com/r.git"));
        assert!(is_remote_repo("git@example.com:org/r.git"));
        assert!(!is_remote_repo("/srv/repos/r"));
    }
}
