//! The artifacts stored for each job: relative path, size and SHA-256.

use rusqlite::params;

use super::{Store, StoreError};
use crate::model::Artifact;

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
