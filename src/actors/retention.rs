//! The retention collector: every `intervals.retention_gc` it removes ended jobs older than
//! `retention` (their rows, log and artifacts; only once their sandbox is DESTROYED), and
//! artifacts older than `artifact_retention` of jobs that ended. Rows go first, in bounded batches
//! (one transaction each, so no pass holds the database for long), and queue the files they named;
//! the files are removed after, so a crash in between never leaves a row for a missing file.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::Services;
use crate::paths::join_confined;
use crate::store::StoreError;

/// Rows (or files) handled per batch.
const BATCH: u32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("file removal task failed: {0}")]
    Task(String),
}

/// What one pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub jobs: usize,
    pub artifacts: usize,
    /// Files and folders removed from the data dir.
    pub files: usize,
}

#[derive(Debug)]
pub struct RetentionCollector {
    svc: Arc<Services>,
    /// A pass still under way when the next is due: the next one is skipped.
    busy: Arc<AtomicBool>,
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SweepNow;

impl RetentionCollector {
    pub fn new(svc: Arc<Services>) -> Self {
        RetentionCollector {
            svc,
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    fn schedule(&self, ctx: &mut Context<Self>) {
        let every = self.svc.tuning.get().intervals.retention_gc;
        ctx.run_later(every, |collector, ctx| {
            ctx.notify(SweepNow);
            collector.schedule(ctx);
        });
    }
}

impl Actor for RetentionCollector {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        self.schedule(ctx);
    }
}

impl Handler<SweepNow> for RetentionCollector {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: SweepNow, _: &mut Self::Context) -> Self::Result {
        let svc = Arc::clone(&self.svc);
        let busy = Arc::clone(&self.busy);
        Box::pin(async move {
            if busy.swap(true, Ordering::SeqCst) {
                return;
            }
            match sweep(&svc).await {
                Ok(report) if report != RetentionReport::default() => {
                    tracing::info!(
                        jobs = report.jobs,
                        artifacts = report.artifacts,
                        files = report.files,
                        "retention removed what was past its time"
                    );
                }
                Ok(_) => {}
                Err(err) => tracing::error!(%err, "retention pass failed"),
            }
            busy.store(false, Ordering::SeqCst);
        })
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One retention pass, by the injected clock.
pub async fn sweep(svc: &Services) -> Result<RetentionReport, RetentionError> {
    let now = svc.clock.now_ms();
    let job_cutoff = now.saturating_sub(millis(svc.config.retention));
    let artifact_cutoff = now.saturating_sub(millis(svc.config.artifact_retention()));
    let mut report = RetentionReport::default();
    // What an earlier pass left queued (it crashed, say) goes first.
    report.files += remove_queued_files(svc).await?;
    loop {
        let removed = svc
            .store
            .call(move |s| s.remove_ended_jobs(job_cutoff, BATCH))
            .await?;
        report.jobs += removed.len();
        if removed.len() < BATCH as usize {
            break;
        }
    }
    loop {
        let removed = svc
            .store
            .call(move |s| s.remove_old_artifacts(artifact_cutoff, BATCH))
            .await?;
        report.artifacts += removed;
        if removed < BATCH as usize {
            break;
        }
    }
    report.files += remove_queued_files(svc).await?;
    let counter = &svc.metrics.retention_removed;
    for (kind, n) in [
        ("jobs", report.jobs),
        ("artifacts", report.artifacts),
        ("files", report.files),
    ] {
        counter
            .with_label_values(&[kind])
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }
    Ok(report)
}

/// Removes the queued files, batch by batch; returns how many existed and were removed.
async fn remove_queued_files(svc: &Services) -> Result<usize, RetentionError> {
    let mut removed = 0;
    loop {
        let paths = svc.store.call(|s| s.queued_file_removals(BATCH)).await?;
        if paths.is_empty() {
            return Ok(removed);
        }
        let data_dir = svc.config.data_dir.clone();
        let (handled, count) = tokio::task::spawn_blocking(move || {
            let count = paths
                .iter()
                .filter(|rel| remove_under(&data_dir, rel))
                .count();
            (paths, count)
        })
        .await
        .map_err(|e| RetentionError::Task(e.to_string()))?;
        removed += count;
        let last = handled.len() < BATCH as usize;
        // A file that could not be removed is forgotten too (logged): retrying it every pass
        // would not help, and it must not hold up the rest.
        svc.store
            .call(move |s| s.forget_file_removals(&handled))
            .await?;
        if last {
            return Ok(removed);
        }
    }
}

/// Removes a file or a folder (with what it holds) named relative to `data_dir`; true if it
/// existed and is gone.
fn remove_under(data_dir: &Path, relative: &str) -> bool {
    let Some(path) = join_confined(data_dir, relative) else {
        tracing::warn!(path = relative, "not removing a path outside the data dir");
        return false;
    };
    let result = match std::fs::symlink_metadata(&path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return false,
        Err(err) => Err(err),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
        Ok(_) => std::fs::remove_file(&path),
    };
    match result {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "removing a file past retention failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_files_and_folders_under_the_data_dir_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("artifacts/j1/out")).unwrap();
        std::fs::write(data.join("artifacts/j1/out/a.txt"), "a").unwrap();
        std::fs::create_dir_all(data.join("logs")).unwrap();
        std::fs::write(data.join("logs/j1.log"), "log").unwrap();
        std::fs::write(dir.path().join("outside"), "x").unwrap();

        assert!(remove_under(&data, "logs/j1.log"));
        assert!(remove_under(&data, "artifacts/j1"));
        assert!(!data.join("logs/j1.log").exists());
        assert!(!data.join("artifacts/j1").exists());
        assert!(!remove_under(&data, "logs/j1.log"), "already gone");
        assert!(!remove_under(&data, "../outside"));
        assert!(dir.path().join("outside").exists());
    }
}
