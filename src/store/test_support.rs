//! Fixtures the store's unit tests share.

use super::{NewJob, Store};
use crate::model::{new_id, JobRequest};

/// Submits a QUEUED job on the balanced profile; returns its id.
pub(crate) fn submit(store: &Store) -> String {
    let id = new_id();
    let request = JobRequest {
        profile: "balanced".into(),
        task: "t".into(),
        ..JobRequest::default()
    };
    let new = NewJob {
        id: id.clone(),
        request,
        deadline_ms: None,
    };
    store
        .insert_job(&new, 1000)
        .unwrap_or_else(|e| panic!("submitting a test job: {e}"));
    id
}
