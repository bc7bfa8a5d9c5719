//! Control API routes that read a job's output: its events (optionally followed as server-sent
//! events), its logs (optionally followed), and its artifacts.

use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::{web, HttpResponse};
use futures_util::stream;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use super::error::ApiError;
use super::jobs::load_job;
use super::ApiState;
use crate::jobfiles::{JobFiles, LogReader, ResultTarget};
use crate::model::Event;

const SSE_KEEPALIVE: Duration = Duration::from_secs(15);
const LOG_POLL: Duration = Duration::from_millis(200);
const ARTIFACT_CHUNK: usize = 64 * 1024;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/jobs/{id}/events", web::get().to(events))
        .route("/v1/jobs/{id}/logs", web::get().to(logs))
        .route("/v1/jobs/{id}/artifacts", web::get().to(list_artifacts))
        .route("/v1/jobs/{id}/diff", web::get().to(diff))
        .route(
            "/v1/jobs/{id}/artifacts/{path:.*}",
            web::get().to(download_artifact),
        );
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<i64>,
    follow: Option<u8>,
}

/// A response body fed by a task through a bounded channel; the task stops when the client goes.
fn channel_body(content_type: &str, rx: mpsc::Receiver<Bytes>) -> HttpResponse {
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, actix_web::Error>(chunk), rx))
    });
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

fn sse_frame(event: &Event) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_default();
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {data}\n\n",
        event.id, event.kind
    ))
}

async fn events(
    state: web::Data<ApiState>,
    id: web::Path<String>,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let job = load_job(&state, id.into_inner()).await?;
    let after = query.after.unwrap_or(0);
    if query.follow.unwrap_or(0) == 0 {
        let job_id = job.id.clone();
        let events = state
            .svc
            .store
            .call(move |s| s.events_after(&job_id, after, 10_000))
            .await?;
        return Ok(HttpResponse::Ok().json(json!({ "events": events })));
    }
    // Subscribe before reading the store, so nothing falls between the replay and the live feed.
    let live = state.svc.hub.subscribe();
    let (tx, rx) = mpsc::channel(64);
    actix_web::rt::spawn(follow_events(state.into_inner(), job.id, after, live, tx));
    Ok(channel_body("text/event-stream", rx))
}

async fn follow_events(
    state: std::sync::Arc<ApiState>,
    job_id: String,
    mut last: i64,
    mut live: broadcast::Receiver<Event>,
    tx: mpsc::Sender<Bytes>,
) {
    // Replays from the store after `last`; true once the job's final event went out.
    async fn replay(
        state: &ApiState,
        job_id: &str,
        last: &mut i64,
        tx: &mpsc::Sender<Bytes>,
    ) -> Option<bool> {
        loop {
            let (id, after) = (job_id.to_owned(), *last);
            let batch = state
                .svc
                .store
                .call(move |s| s.events_after(&id, after, 1000))
                .await
                .ok()?;
            if batch.is_empty() {
                return Some(false);
            }
            for event in batch {
                *last = event.id;
                tx.send(sse_frame(&event)).await.ok()?;
                if event.kind == "finished" {
                    return Some(true);
                }
            }
        }
    }
    match replay(&state, &job_id, &mut last, &tx).await {
        Some(false) => {}
        Some(true) | None => return,
    }
    loop {
        let next = tokio::select! {
            next = live.recv() => next,
            () = tokio::time::sleep(SSE_KEEPALIVE) => {
                if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                    return;
                }
                continue;
            }
        };
        match next {
            Ok(event) if event.job_id == job_id && event.id > last => {
                last = event.id;
                if tx.send(sse_frame(&event)).await.is_err() || event.kind == "finished" {
                    return;
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {
                match replay(&state, &job_id, &mut last, &tx).await {
                    Some(false) => {}
                    Some(true) | None => return,
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    offset: Option<u64>,
    follow: Option<u8>,
}

async fn logs(
    state: web::Data<ApiState>,
    id: web::Path<String>,
    query: web::Query<LogsQuery>,
) -> Result<HttpResponse, ApiError> {
    let job = load_job(&state, id.into_inner()).await?;
    let files = JobFiles::new(&state.svc.config);
    let offset = query.offset.unwrap_or(0);
    if query.follow.unwrap_or(0) == 0 {
        let text = files.read_log(&job.id, offset).await?;
        return Ok(HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(text));
    }
    let (tx, rx) = mpsc::channel(16);
    let reader = files.log_reader(&job.id, offset);
    actix_web::rt::spawn(follow_log(state.into_inner(), job.id, reader, tx));
    Ok(channel_body("text/plain; charset=utf-8", rx))
}

/// Streams the log file as it grows, until the job has ended and everything was sent.
async fn follow_log(
    state: std::sync::Arc<ApiState>,
    job_id: String,
    mut reader: LogReader,
    tx: mpsc::Sender<Bytes>,
) {
    loop {
        let id = job_id.clone();
        let ended = match state.svc.store.call(move |s| s.get_job(&id)).await {
            Ok(Some(job)) => job.status.is_terminal(),
            _ => true,
        };
        // Read all there is; the job's end is checked first so its last lines are not missed.
        while let Ok(Some(chunk)) = reader.next_chunk().await {
            if tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
        }
        if ended || tx.is_closed() {
            return;
        }
        tokio::time::sleep(LOG_POLL).await;
    }
}

async fn list_artifacts(
    state: web::Data<ApiState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let job = load_job(&state, id.into_inner()).await?;
    let artifacts = state
        .svc
        .store
        .call(move |s| s.list_artifacts(&job.id))
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "artifacts": artifacts })))
}

async fn download_artifact(
    state: web::Data<ApiState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, relative) = path.into_inner();
    let job = load_job(&state, id).await?;
    let artifacts = {
        let job_id = job.id.clone();
        state
            .svc
            .store
            .call(move |s| s.list_artifacts(&job_id))
            .await?
    };
    let artifact = artifacts
        .into_iter()
        .find(|a| a.path == relative)
        .ok_or_else(|| {
            ApiError::NotFound(format!("job {} has no artifact `{relative}`", job.id))
        })?;
    let file = JobFiles::new(&state.svc.config)
        .open_artifact(&job.id, &artifact.path)
        .await?;
    let body = tokio_util::io::ReaderStream::with_capacity(file, ARTIFACT_CHUNK);
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header(("X-Sha256", artifact.sha256.clone()))
        .body(actix_web::body::SizedStream::new(artifact.size, body)))
}

/// The agent's change to the job's host repository as a patch series (empty when it changed
/// nothing, or while the job has not uploaded yet: then 404 says so).
async fn diff(state: web::Data<ApiState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let job = load_job(&state, id.into_inner()).await?;
    let job_id = job.id.clone();
    let request = state
        .svc
        .store
        .call(move |s| s.job_request(&job_id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {} does not exist", job.id)))?;
    let repo = request.host_repo().ok_or_else(|| {
        ApiError::NotFound(format!(
            "job {} has no repository on this host, so no change to show",
            job.id
        ))
    })?;
    let target = ResultTarget {
        repo: repo.into(),
        repo_roots: state.svc.config.repo_roots.clone(),
    };
    let patch = JobFiles::new(&state.svc.config)
        .result_patch(&job.id, target)
        .await?;
    match (patch, &job.changes) {
        (Some(patch), _) => Ok(HttpResponse::Ok()
            .content_type("text/x-patch; charset=utf-8")
            .body(patch)),
        (None, Some(_)) => Ok(HttpResponse::Ok()
            .content_type("text/x-patch; charset=utf-8")
            .finish()),
        (None, None) => Err(ApiError::NotFound(format!(
            "job {} has not sent its changes (yet)",
            job.id
        ))),
    }
}
