//! Control API routes about the daemon itself: health, status, profiles.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::ApiState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/v1/status", web::get().to(status))
        .route("/v1/profiles", web::get().to(profiles));
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn status(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let (jobs, sandboxes, queue_length) = state
        .svc
        .store
        .call(|s| {
            Ok((
                s.count_jobs_by_status()?,
                s.count_sandboxes_by_state()?,
                s.queue_length()?,
            ))
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backend": state.svc.backend.kind().as_str(),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "jobs": jobs,
        "sandboxes": sandboxes,
        "queue_length": queue_length,
        "max_concurrent": state.svc.tuning.get().admission.max_concurrent,
        "shutting_down": state.is_shutting_down(),
    })))
}

async fn profiles(state: web::Data<ApiState>) -> HttpResponse {
    let profiles = state.svc.profiles();
    let all: Vec<_> = profiles.all().collect();
    HttpResponse::Ok().json(json!({ "profiles": all }))
}
