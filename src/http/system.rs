//! Control API routes about the daemon itself: health, status (with the daemon's instance id and
//! the foreign VMs the reconciler last saw), the governor (with the memory live sandboxes are
//! committed next to what the backend measures them holding), profiles.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::ApiState;
use crate::actors::governor::GetStatus;
use crate::governor::status::GovernorStatus;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/v1/status", web::get().to(status))
        .route("/v1/governor", web::get().to(governor))
        .route("/v1/pool", web::get().to(pool))
        .route("/v1/profiles", web::get().to(profiles));
}

/// The governor's state, with what live sandboxes hold tallied afresh from the store, and their
/// memory as the backend measures it (its own cache keeps that cheap).
async fn governor_status(state: &ApiState) -> Result<GovernorStatus, ApiError> {
    let holdings = state.svc.store.call(|s| s.holdings()).await?;
    let backend = state.svc.backend.as_ref();
    let profiles = state.svc.profiles();
    let size = |d| crate::governor::effective(backend, d);
    let committed = crate::governor::tally(&holdings, &profiles, size);
    let measured = backend.memory_usage().await;
    if let Ok(usage) = &measured {
        state.svc.metrics.observe_memory(usage);
    }
    let memory = crate::governor::memory_view(
        &holdings,
        &profiles,
        size,
        measured.as_ref().map_err(ToString::to_string),
    );
    let mut status = state
        .governor
        .send(GetStatus {
            committed: Some(committed),
        })
        .await
        .map_err(ApiError::internal)?;
    status.memory = Some(memory);
    Ok(status)
}

async fn governor(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(governor_status(&state).await?))
}

/// The warm pool, per profile and per sandbox, with what each idle sandbox really holds.
async fn pool(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let rows = state.svc.store.call(|s| s.pool_sandboxes()).await?;
    // A failed measurement leaves the sizes out; the pool's counts stand on their own.
    let memory = state
        .svc
        .backend
        .memory_usage()
        .await
        .map(|usage| usage.by_vm)
        .unwrap_or_default();
    let status = crate::actors::pool_status::pool_status(
        rows,
        &state.svc.tuning.get().pool,
        &state.svc.pool,
        &memory,
        state.svc.clock.now_ms(),
    );
    Ok(HttpResponse::Ok().json(status))
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn status(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let (jobs, sandboxes, queue_length, templates) = state
        .svc
        .store
        .call(|s| {
            Ok((
                s.count_jobs_by_status()?,
                s.count_sandboxes_by_state()?,
                s.queue_length()?,
                s.list_template_checks()?,
            ))
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backend": state.svc.backend.kind().as_str(),
        "instance_id": state.svc.instance.id,
        // Null while the local backend's KVM probe runs, and on backends that do not choose.
        "accelerator": state.svc.backend.accelerator(),
        "foreign_vms": state.svc.instance.foreign(),
        // Cloud-init's verdict on each template's last cold boot.
        "templates": templates,
        "uptime_seconds": state.started.elapsed().as_secs(),
        "jobs": jobs,
        "sandboxes": sandboxes,
        "queue_length": queue_length,
        "max_concurrent": state.svc.tuning.get().admission.max_concurrent,
        "shutting_down": state.is_shutting_down(),
        // Status still answers if the governor cannot.
        "governor": governor_status(&state).await.ok(),
    })))
}

async fn profiles(state: web::Data<ApiState>) -> HttpResponse {
    let profiles = state.svc.profiles();
    let all: Vec<_> = profiles.all().collect();
    HttpResponse::Ok().json(json!({ "profiles": all }))
}
