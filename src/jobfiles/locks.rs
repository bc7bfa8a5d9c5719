//! One async lock per job, for the file work that must not interleave within a job (log appends
//! against the log cap, artifact commits against the job's quota). A job's entry exists only
//! while someone holds or awaits its lock, so the map holds the jobs being served, never more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

/// A job's lock and how many hold or await it.
#[derive(Debug, Default)]
struct Entry {
    lock: Arc<tokio::sync::Mutex<()>>,
    users: usize,
}

#[derive(Debug, Default)]
pub(super) struct JobLocks {
    entries: Mutex<HashMap<String, Entry>>,
}

impl JobLocks {
    /// Waits for the job's lock. Dropping the future while it waits gives up its place.
    pub(super) async fn lock(&self, job_id: &str) -> JobLockGuard<'_> {
        let lock = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = entries.entry(job_id.to_owned()).or_default();
            entry.users += 1;
            Arc::clone(&entry.lock)
        };
        // Made before the wait, so that a cancelled wait still gives its place up.
        let mut guard = JobLockGuard {
            locks: self,
            job_id: job_id.to_owned(),
            held: None,
        };
        guard.held = Some(lock.lock_owned().await);
        guard
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A job's lock, held until dropped.
#[derive(Debug)]
pub(super) struct JobLockGuard<'a> {
    locks: &'a JobLocks,
    job_id: String,
    held: Option<OwnedMutexGuard<()>>,
}

impl Drop for JobLockGuard<'_> {
    fn drop(&mut self) {
        drop(self.held.take());
        let mut entries = self
            .locks
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get_mut(&self.job_id) {
            entry.users = entry.users.saturating_sub(1);
            if entry.users == 0 {
                entries.remove(&self.job_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_job_lock_excludes_others_of_that_job_only() {
        let locks = JobLocks::default();
        let held = locks.lock("j1").await;
        let other_job = tokio::time::timeout(Duration::from_secs(10), locks.lock("j2")).await;
        assert!(other_job.is_ok(), "another job's lock is free");
        drop(other_job);
        let mut same_job = Box::pin(locks.lock("j1"));
        assert!(same_job.as_mut().now_or_never().is_none());
        drop(held);
        let again = same_job.await;
        assert_eq!(locks.len(), 1);
        drop(again);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn entries_go_when_unused_even_after_a_cancelled_wait() {
        let locks = JobLocks::default();
        let held = locks.lock("j1").await;
        let mut waiting = Box::pin(locks.lock("j1"));
        assert!(waiting.as_mut().now_or_never().is_none());
        drop(held);
        // The waiter gives up before it ever ran again.
        drop(waiting);
        assert_eq!(locks.len(), 0);
        for _ in 0..100 {
            drop(locks.lock("j1").await);
        }
        assert_eq!(locks.len(), 0);
    }
}
