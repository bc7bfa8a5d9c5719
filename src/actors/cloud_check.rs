//! Reading cloud-init's verdict on a cold boot: once the guest agent answers, the lifecycle reads
//! `/run/cloud-init/result.json` through it (cloud-init writes it when its last stage ends, just
//! after phoning home), records the verdict as the job's `cloud-init` event, and keeps it as the
//! template's last check for `agentlab status`. A verdict that cannot be had is an event too;
//! the job goes on either way, since the guest reached the daemon and the runner may still work.
//! A sandbox restored from a template snapshot gets the verdict read when the snapshot was made
//! (recorded for the job that made it).

use std::time::Duration;

use super::lifecycle::template_of;
use super::restore;
use super::Services;
use crate::backend::{BackendError, VmHandle};
use crate::cloud_verdict::{self, RESULT_MAX_BYTES, RESULT_PATH};
use crate::config::profile::Profile;
use crate::model::TemplateCheck;
use crate::store::StoreError;

/// How long after the agent answers the result file may take to appear.
const RESULT_WAIT: Duration = Duration::from_secs(30);
const RESULT_POLL: Duration = Duration::from_millis(250);
const EVENT_KIND: &str = "cloud-init";

/// Reads and records cloud-init's verdict on the job's boot.
pub(super) async fn record_verdict(
    svc: &Services,
    job_id: &str,
    vm: &VmHandle,
    profile: &Profile,
) -> Result<(), StoreError> {
    let bytes = match read_result(svc, vm).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            let message = format!(
                "cloud-init's {RESULT_PATH} did not appear within {} s of the guest agent \
                 answering: its verdict on this boot is not known",
                RESULT_WAIT.as_secs()
            );
            return restore::record_event(svc, job_id, EVENT_KIND, &message).await;
        }
        Err(err) => {
            let message = format!("cloud-init's verdict could not be read: {err}");
            return restore::record_event(svc, job_id, EVENT_KIND, &message).await;
        }
    };
    record_result(svc, job_id, &template_of(svc, profile), &bytes).await
}

/// Records the verdict in `bytes` (a result.json) on a boot of `template` for the job.
pub(super) async fn record_result(
    svc: &Services,
    job_id: &str,
    template: &str,
    bytes: &[u8],
) -> Result<(), StoreError> {
    let verdict = match cloud_verdict::parse(bytes) {
        Ok(verdict) => verdict,
        Err(err) => {
            return restore::record_event(svc, job_id, EVENT_KIND, &err.to_string()).await;
        }
    };
    if verdict.total > 0 {
        tracing::warn!(
            job = job_id,
            errors = verdict.total,
            "cloud-init reported errors"
        );
    }
    restore::record_event(svc, job_id, EVENT_KIND, &verdict.summary()).await?;
    let check = TemplateCheck {
        backend: svc.backend.kind().as_str().to_owned(),
        template: template.to_owned(),
        job_id: job_id.to_owned(),
        checked_at_ms: svc.clock.now_ms(),
        errors: verdict.errors,
    };
    svc.store
        .call(move |s| s.record_template_check(&check))
        .await
}

/// The result file, once it is there; None if it did not appear in time.
async fn read_result(svc: &Services, vm: &VmHandle) -> Result<Option<Vec<u8>>, BackendError> {
    let started = tokio::time::Instant::now();
    loop {
        match svc
            .backend
            .read_guest_file(vm, RESULT_PATH, RESULT_MAX_BYTES)
            .await
        {
            Ok(Some(bytes)) => return Ok(Some(bytes)),
            Ok(None) | Err(BackendError::AgentUnavailable(_))
                if started.elapsed() < RESULT_WAIT =>
            {
                tokio::time::sleep(RESULT_POLL).await;
            }
            Ok(None) => return Ok(None),
            Err(err) => return Err(err),
        }
    }
}
