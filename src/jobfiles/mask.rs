//! Host-side masking of a job's log. The runner masks the job's secrets before its output leaves
//! the guest, but the guest is untrusted: what it posts is masked again here, before it is stored,
//! with the same masker (`secrets::mask`), so a guest that prints a secret unmasked still does not
//! get it into the log. Values shorter than `MIN_SECRET_LEN` bytes are not masked.
//!
//! Each job keeps one masker across its log posts, so a secret split between two posts is still
//! masked whole. What the masker holds back (at most the longest secret less one byte, and only
//! while it could be the start of a secret) is written when the guest reports it is done; a guest
//! that never does loses that tail, which is at most a secret's beginning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::{JobFiles, JobFilesError, LogAppend};
use crate::secrets::mask::Masker;

/// One job's masker, locked for the whole of a post: a job's posts are masked and appended one at
/// a time, in the order the masker saw them.
pub type JobMasker = Arc<tokio::sync::Mutex<Masker>>;

/// The maskers of the jobs whose guests post logs.
#[derive(Debug, Default)]
pub struct LogMasks {
    jobs: Mutex<HashMap<String, JobMasker>>,
}

impl LogMasks {
    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobMasker>> {
        // The map holds no invariant a panic elsewhere could break.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, job_id: &str) -> Option<JobMasker> {
        self.jobs().get(job_id).cloned()
    }

    /// The job's masker: `masker` unless another post put one in first.
    pub fn insert(&self, job_id: &str, masker: Masker) -> JobMasker {
        Arc::clone(
            self.jobs()
                .entry(job_id.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(masker))),
        )
    }

    /// The jobs that have a masker.
    pub fn tracked(&self) -> Vec<String> {
        self.jobs().keys().cloned().collect()
    }

    /// Drops the maskers of jobs that post no more (ended, removed).
    pub fn forget<'a>(&self, job_ids: impl IntoIterator<Item = &'a String>) {
        let mut jobs = self.jobs();
        for id in job_ids {
            jobs.remove(id);
        }
    }

    /// Takes the job's masker out, for its last flush.
    pub fn take(&self, job_id: &str) -> Option<JobMasker> {
        self.jobs().remove(job_id)
    }
}

impl JobFiles {
    /// Masks `bytes` with the job's masker and appends what it lets through to the job's log.
    pub async fn append_masked_log(
        &self,
        job_id: &str,
        masker: &mut Masker,
        bytes: &[u8],
    ) -> Result<LogAppend, JobFilesError> {
        let mut out = Vec::with_capacity(bytes.len());
        masker.push(bytes, &mut out);
        self.append_log(job_id, &out).await
    }

    /// Appends what the job's masker still holds back: the guest will post no more.
    pub async fn finish_masked_log(
        &self,
        job_id: &str,
        masker: &mut Masker,
    ) -> Result<LogAppend, JobFilesError> {
        let mut out = Vec::new();
        masker.finish(&mut out);
        if out.is_empty() {
            return Ok(LogAppend::Stored);
        }
        self.append_log(job_id, &out).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{files, ROOMY};
    use super::*;

    #[tokio::test]
    async fn a_secret_split_across_posts_is_stored_masked_and_the_tail_comes_at_the_end() {
        let (_dir, files) = files(ROOMY);
        let masks = LogMasks::default();
        let masker = masks.insert("j1", Masker::new(["s3cr3t-value-123456", "short"]));
        let again = masks.insert("j1", Masker::new(Vec::<String>::new()));
        assert!(Arc::ptr_eq(&masker, &again), "the first masker stays");
        let mut m = masker.lock().await;
        for post in [&b"key=s3cr3t-"[..], b"value-123456 short\n", b"ends s3cr"] {
            files.append_masked_log("j1", &mut m, post).await.unwrap();
        }
        assert_eq!(
            files.read_log("j1", 0).await.unwrap(),
            b"key=*** short\nends ",
            "a possible secret's start is held back"
        );
        files.finish_masked_log("j1", &mut m).await.unwrap();
        assert_eq!(
            files.read_log("j1", 0).await.unwrap(),
            b"key=*** short\nends s3cr"
        );
        drop(m);
        assert!(masks.take("j1").is_some());
        assert!(masks.get("j1").is_none());
        assert!(masks.tracked().is_empty());
    }
}
