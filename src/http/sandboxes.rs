//! Control API routes for sandboxes: list, show, destroy (through the Supervisor).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::ApiState;
use crate::actors::supervisor::{DestroyRefused, DestroySandbox};
use crate::model::{Sandbox, SandboxState};

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

/// The Supervisor destroys it: a running job's sandbox by ending the job through its actor, a
/// kept one (or one whose destroy failed) in the background.
async fn destroy(
    state: web::Data<ApiState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let request = DestroySandbox {
        sandbox_id: id.clone(),
    };
    match state
        .supervisor
        .send(request)
        .await
        .map_err(ApiError::internal)?
    {
        Ok(()) => {}
        Err(refused @ DestroyRefused::Missing(_)) => {
            return Err(ApiError::NotFound(refused.to_string()))
        }
        Err(refused @ DestroyRefused::AlreadyDestroyed(_)) => {
            return Err(ApiError::Conflict(refused.to_string()))
        }
        Err(DestroyRefused::Store(err)) => return Err(err.into()),
    }
    Ok(HttpResponse::Accepted().json(load(&state, id).await?))
}
