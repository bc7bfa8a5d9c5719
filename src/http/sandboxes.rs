//! Control API routes for sandboxes: list, show, destroy.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::ApiState;
use crate::actors::lifecycle::destroy_sandbox;
use crate::actors::supervisor::CancelJob;
use crate::model::{JobStatus, Sandbox, SandboxState};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/sandboxes", web::get().to(list))
        .route("/v1/sandboxes/{id}", web::get().to(show))
        .route("/v1/sandboxes/{id}/destroy", web::post().to(destroy));
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
}

async fn list(
    state: web::Data<ApiState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let filter = query
        .state
        .as_deref()
        .map(|s| s.to_ascii_uppercase().parse::<SandboxState>())
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let sandboxes = state
        .svc
        .store
        .call(move |s| s.list_sandboxes(filter))
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "sandboxes": sandboxes })))
}

async fn load(state: &ApiState, id: String) -> Result<Sandbox, ApiError> {
    let shown = id.clone();
    state
        .svc
        .store
        .call(move |s| s.get_sandbox(&id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("sandbox {shown} does not exist")))
}

async fn show(state: web::Data<ApiState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(load(&state, id.into_inner()).await?))
}

/// A sandbox whose job still runs is destroyed by cancelling the job (its actor owns the VM);
/// otherwise (kept, or a failed destroy) it is destroyed here, in the background.
async fn destroy(
    state: web::Data<ApiState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let sandbox = load(&state, id.into_inner()).await?;
    if sandbox.state == SandboxState::Destroyed {
        return Err(ApiError::Conflict(format!(
            "sandbox {} is already destroyed",
            sandbox.id
        )));
    }
    let job_id = sandbox.job_id.clone();
    let job = state.svc.store.call(move |s| s.get_job(&job_id)).await?;
    if job.is_some_and(|j| !j.status.is_terminal()) {
        let cancel = CancelJob {
            job_id: sandbox.job_id.clone(),
            status: JobStatus::Cancelled,
            reason: "sandbox destroyed by request".into(),
        };
        state
            .supervisor
            .send(cancel)
            .await
            .map_err(ApiError::internal)??;
    } else {
        let svc = std::sync::Arc::clone(&state.svc);
        let target = sandbox.clone();
        actix_web::rt::spawn(async move {
            if let Err(err) = destroy_sandbox(&svc, &target).await {
                tracing::warn!(sandbox = %target.id, %err, "destroy by request failed");
            }
        });
    }
    Ok(HttpResponse::Accepted().json(load(&state, sandbox.id).await?))
}
