//! The last step of a job's upload phase: reading what the agent changed in its host
//! repository's checkout (the result bundle the runner uploaded) and, when the job asked for it,
//! making the branch `agentlab/JOB` in the host repository. Neither fails the job: what went
//! wrong is recorded with the changes and as the job's `changes` event, and the bundle stays an
//! artifact the user can fetch by hand. Running it again (a resumed upload phase) gives the same
//! answer: the branch's fetch is a no-op once it is made.

use std::path::PathBuf;

use super::Services;
use crate::jobfiles::{JobFiles, ResultTarget};
use crate::model::{JobChanges, JobRequest};
use crate::store::StoreError;

/// Records the job's changes; a job without a host repository has none to record.
pub(super) async fn record_changes(
    svc: &Services,
    job_id: &str,
    request: &JobRequest,
) -> Result<(), StoreError> {
    let Some(repo) = request.host_repo() else {
        return Ok(());
    };
    let files = JobFiles::new(&svc.config);
    let target = ResultTarget {
        repo: PathBuf::from(repo),
        repo_roots: svc.config.repo_roots.clone(),
    };
    let changes = match files
        .take_changes(job_id, target, request.result_branch)
        .await
    {
        Ok(changes) => changes.unwrap_or_default(),
        Err(err) => JobChanges {
            error: Some(err.to_string()),
            ..JobChanges::default()
        },
    };
    if let Some(error) = &changes.error {
        tracing::warn!(job = job_id, %error, "the job's changes came back incomplete");
    }
    let message = changes.summary(request.result_branch);
    let id = job_id.to_owned();
    let event = svc
        .store
        .call(move |s| s.set_job_changes(&id, &changes, &message))
        .await?;
    svc.hub.publish(event);
    Ok(())
}
