//! Records what a guest reports (booted, command exited, uploads done) and wakes the job's
//! lifecycle. The guest HTTP API calls it after checking the job's token; the fake backend calls it
//! directly for its simulated guest.

use std::sync::Arc;

use async_trait::async_trait;

use super::Hub;
use crate::backend::GuestSink;
use crate::store::{Store, StoreError};

type Write = Box<dyn FnOnce(&Store, &str) -> Result<bool, StoreError> + Send>;

#[derive(Debug, Clone)]
pub struct GuestReports {
    pub store: Store,
    pub hub: Arc<Hub>,
}

impl GuestReports {
    /// Applies `write` and, the first time it changes anything, records `message` as an event.
    async fn record(&self, job_id: &str, message: String, write: Write) {
        let job = job_id.to_owned();
        let result = self
            .store
            .call(move |s| {
                let fresh = write(s, &job)?;
                fresh
                    .then(|| s.add_event(&job, "guest", None, &message))
                    .transpose()
            })
            .await;
        match result {
            Ok(event) => {
                if let Some(event) = event {
                    self.hub.publish(event);
                }
                self.hub.wake(job_id);
            }
            Err(err) => tracing::error!(job = job_id, %err, "recording a guest report failed"),
        }
    }
}

#[async_trait]
impl GuestSink for GuestReports {
    async fn phoned_home(&self, job_id: &str) {
        self.record(
            job_id,
            "guest phoned home".into(),
            Box::new(|s, id| s.record_phone_home(id)),
        )
        .await;
    }

    async fn command_exited(&self, job_id: &str, exit_code: i32) {
        let message = format!("command exited with code {exit_code}");
        self.record(
            job_id,
            message,
            Box::new(move |s, id| s.record_guest_exit(id, exit_code)),
        )
        .await;
    }

    async fn uploads_done(&self, job_id: &str) {
        self.record(
            job_id,
            "uploads done".into(),
            Box::new(|s, id| s.record_guest_done(id)),
        )
        .await;
    }
}
