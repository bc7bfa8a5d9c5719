//! The artifacts stored for each job: relative path, size and SHA-256.

use rusqlite::params;

use super::{Store, StoreError};
use crate::model::{Artifact, ArtifactUsage};

impl Store {
    pub fn record_artifact(&self, artifact: &Artifact) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR REPLACE INTO artifacts (job_id, path, size, sha256, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                artifact.job_id,
                artifact.path,
                artifact.size,
                artifact.sha256,
                artifact.created_at_ms
            ],
        )?;
        Ok(())
    }

    /// The count and total size of the job's artifacts other than `except` (the path being
    /// uploaded, which a new upload replaces rather than adds to).
    pub fn artifact_usage(&self, job_id: &str, except: &str) -> Result<ArtifactUsage, StoreError> {
        let conn = self.conn();
        let (files, bytes): (u64, u64) = conn
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM artifacts
                 WHERE job_id = ?1 AND path != ?2",
            )?
            .query_row(params![job_id, except], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(ArtifactUsage { files, bytes })
    }

    pub fn list_artifacts(&self, job_id: &str) -> Result<Vec<Artifact>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT path, size, sha256, created_ms FROM artifacts WHERE job_id = ?1 ORDER BY path",
        )?;
        let rows = stmt.query_map([job_id], |r| {
            Ok(Artifact {
                job_id: job_id.to_owned(),
                path: r.get(0)?,
                size: r.get(1)?,
                sha256: r.get(2)?,
                created_at_ms: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Artifact, ArtifactUsage};
    use crate::store::test_support::submit;
    use crate::store::Store;

    fn record(store: &Store, job_id: &str, path: &str, size: u64) {
        store
            .record_artifact(&Artifact {
                job_id: job_id.to_owned(),
                path: path.to_owned(),
                size,
                sha256: String::new(),
                created_at_ms: 0,
            })
            .unwrap();
    }

    #[test]
    fn usage_counts_the_other_paths_of_the_job() {
        let store = Store::open_in_memory().unwrap();
        let job = submit(&store);
        let other = submit(&store);
        assert_eq!(
            store.artifact_usage(&job, "a").unwrap(),
            ArtifactUsage::default()
        );
        record(&store, &job, "a", 10);
        record(&store, &job, "b", 5);
        record(&store, &other, "a", 1000);
        assert_eq!(
            store.artifact_usage(&job, "c").unwrap(),
            ArtifactUsage {
                files: 2,
                bytes: 15
            }
        );
        // A re-upload of `a` replaces it: only `b` counts.
        assert_eq!(
            store.artifact_usage(&job, "a").unwrap(),
            ArtifactUsage { files: 1, bytes: 5 }
        );
        record(&store, &job, "a", 3);
        assert_eq!(
            store.artifact_usage(&job, "c").unwrap(),
            ArtifactUsage { files: 2, bytes: 8 }
        );
    }
}
