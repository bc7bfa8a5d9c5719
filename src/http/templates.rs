//! Control API routes about templates: `POST /v1/templates/{name}` takes a whole-disk image as the
//! request body (`agentlab template import FILE NAME`), and the backend checks and registers it.
//! The image is streamed to a private file in the daemon's uploads folder, never held in memory,
//! and removed once the backend is done with it, whatever the outcome.

use std::path::PathBuf;

use actix_web::{web, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::error::ApiError;
use super::ApiState;
use crate::backend::templates::{ImportOutcome, TemplateImportRequest};
use crate::backend::BackendError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/templates/{name}", web::post().to(import));
}

#[derive(Debug, Deserialize)]
struct ImportQuery {
    /// The image's file name on the client's side, for the template's manifest.
    source: Option<String>,
}

/// Removes the upload when the request ends, including when the client goes away mid-way and
/// the handler is dropped.
struct Upload {
    path: PathBuf,
    removed: bool,
}

impl Upload {
    /// Removes the upload before the answer goes out.
    async fn remove(mut self) {
        self.removed = true;
        match tokio::fs::remove_file(&self.path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove an upload")
            }
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove an upload"),
        });
    }
}

async fn import(
    state: web::Data<ApiState>,
    name: web::Path<String>,
    query: web::Query<ImportQuery>,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let name = name.into_inner();
    let max = state.svc.config.template_import_max_bytes;
    let dir = state.svc.config.uploads_dir();
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder.create(&dir).await.map_err(ApiError::internal)?;
    let upload = Upload {
        path: dir.join(format!("template-{}.img", uuid::Uuid::now_v7().simple())),
        removed: false,
    };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&upload.path)
        .await
        .map_err(ApiError::internal)?;
    let mut received: u64 = 0;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::BadRequest(format!("the image upload was interrupted: {e}")))?;
        received = received.saturating_add(chunk.len() as u64);
        if received > max {
            return Err(ApiError::PayloadTooLarge(format!(
                "the image is larger than template_import_max_bytes ({max} bytes)"
            )));
        }
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    file.flush().await.map_err(ApiError::internal)?;
    file.sync_all().await.map_err(ApiError::internal)?;
    drop(file);
    if received == 0 {
        upload.remove().await;
        return Err(ApiError::BadRequest(
            "the request carries no image: send the disk image as the body".into(),
        ));
    }
    let request = TemplateImportRequest {
        name: name.clone(),
        image: upload.path.clone(),
        source_name: query
            .source
            .as_deref()
            .map(|s| s.chars().filter(|c| !c.is_control()).take(255).collect())
            .unwrap_or_default(),
        serves_runner: state.svc.runner.is_some(),
    };
    tracing::info!(template = %name, bytes = received, "checking an uploaded image to import");
    let outcome = state.svc.backend.import_template(&request).await;
    upload.remove().await;
    match outcome {
        Ok(ImportOutcome::Registered(import)) => Ok(HttpResponse::Created().json(import)),
        Ok(ImportOutcome::Refused(check)) => Err(ApiError::Unprocessable(format!(
            "the image cannot be template `{name}`; it lacks: {}",
            check
                .missing
                .iter()
                .enumerate()
                .map(|(i, m)| format!("({}) {m}", i + 1))
                .collect::<Vec<_>>()
                .join("; ")
        ))),
        Err(BackendError::InvalidInput(message)) => Err(ApiError::BadRequest(message)),
        Err(other) => Err(ApiError::internal(other)),
    }
}
