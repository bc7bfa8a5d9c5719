//! Control API routes for sandboxes: list (paged), show, renew a lease, destroy (through the
//! Supervisor).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{paging, ApiState};
use crate::actors::supervisor::{DestroyRefused, DestroySandbox};
use crate::model::{Sandbox, SandboxState};
use crate::store::{LeaseRenewal, MAX_LEASE};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/sandboxes", web::get().to(list))
        .route("/v1/sandboxes/{id}", web::get().to(show))
        .route("/v1/sandboxes/{id}/lease", web::post().to(renew))
        .route("/v1/sandboxes/{id}/destroy", web::post().to(destroy));
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

/// Newest first, a page at a time; `next` is the cursor of the following page, null on the last.
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
    let limit = paging::limit(query.limit)?;
    let after = paging::cursor(query.after.as_deref())?;
    let page = state
        .svc
        .store
        .call(move |s| s.list_sandboxes_page(filter, after.as_ref(), limit))
        .await?;
    Ok(HttpResponse::Ok().json(json!({
        "sandboxes": page.items,
        "next": page.next.map(|c| c.to_string()),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    /// How long from now (humantime: `30m`, `2h`, `1d`).
    ttl: String,
}

/// The ttl of a renew: above 0, at most [`MAX_LEASE`].
fn parse_ttl(text: &str) -> Result<std::time::Duration, ApiError> {
    let ttl = humantime::parse_duration(text.trim()).map_err(|e| {
        ApiError::BadRequest(format!(
            "`ttl` `{text}` is not a duration like 30m or 2h: {e}"
        ))
    })?;
    if ttl.is_zero() {
        return Err(ApiError::BadRequest("`ttl` must be above 0".into()));
    }
    if ttl > MAX_LEASE {
        return Err(ApiError::BadRequest(format!(
            "`ttl` must be at most {} (the longest lease)",
            humantime::format_duration(MAX_LEASE)
        )));
    }
    Ok(ttl)
}

/// Renews a lease: a KEPT sandbox's lease ends `ttl` from now; a sandbox whose job still runs
/// gets `ttl` as its lease once kept (`lease_expires_at_ms` is then null in the answer).
async fn renew(
    state: web::Data<ApiState>,
    id: web::Path<String>,
    body: web::Json<LeaseBody>,
) -> Result<HttpResponse, ApiError> {
    let ttl = parse_ttl(&body.ttl)?;
    let id = id.into_inner();
    let now = state.svc.clock.now_ms();
    let target = id.clone();
    let renewal = state
        .svc
        .store
        .call(move |s| s.renew_lease(&target, now, ttl))
        .await?;
    let (sandbox, expires) = match renewal {
        LeaseRenewal::Extended(sandbox) => {
            let expires = sandbox.lease_expires_at_ms;
            (sandbox, Some(expires))
        }
        LeaseRenewal::AfterJob(sandbox) => (sandbox, None),
        LeaseRenewal::Refused(message) => return Err(ApiError::Conflict(message)),
        LeaseRenewal::NotFound => {
            return Err(ApiError::NotFound(format!("sandbox {id} does not exist")))
        }
    };
    tracing::info!(sandbox = %sandbox.id, ttl = %humantime::format_duration(ttl), "lease renewed");
    Ok(HttpResponse::Ok().json(json!({
        "sandbox": sandbox,
        "ttl_seconds": ttl.as_secs(),
        "lease_expires_at_ms": expires,
    })))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ttl_is_a_bounded_humantime_duration() {
        assert_eq!(parse_ttl("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_ttl(" 7days ").unwrap(), MAX_LEASE);
        for bad in ["", "soon", "0s", "8d", "30"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
