//! Retention: removing ended jobs (with their events, phase runs, artifacts, tokens and destroyed
//! sandbox) and old artifacts, in bounded batches, and the journal of files to remove.
//!
//! Rows go first, in one transaction that also queues the files they named in `file_removals`;
//! the files are removed afterwards and then forgotten. A crash in between leaves files queued
//! for the next pass, never a row pointing at a file that is gone. Paths in the journal are
//! relative to the data dir.

use rusqlite::{params, Transaction};

use super::{Store, StoreError};
use crate::model::{JobStatus, SandboxState};

/// Where a job's files live under the data dir (the guest API writes them there).
pub fn job_log_path(job_id: &str) -> String {
    format!("logs/{job_id}.log")
}

pub fn job_artifacts_path(job_id: &str) -> String {
    format!("artifacts/{job_id}")
}

/// The job's repository bundle folder: the lifecycle removes it when the job ends; retention
/// removes whatever a request still in flight then left.
pub fn job_bundle_path(job_id: &str) -> String {
    format!("bundles/{job_id}")
}

/// `'COMPLETED', 'FAILED', …`: the terminal statuses, for an SQL `IN`.
fn terminal_statuses() -> String {
    JobStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn queue_removal(tx: &Transaction<'_>, path: &str, now_ms: i64) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT OR IGNORE INTO file_removals (path, queued_ms) VALUES (?1, ?2)")?
        .execute(params![path, now_ms])?;
    Ok(())
}

impl Store {
    /// Removes up to `limit` jobs that ended before `finished_before_ms` and whose sandbox is
    /// DESTROYED (or was never made), with every row recorded for them, and queues their log,
    /// artifact folder and bundle folder for removal. Returns the ids removed, oldest first.
    pub fn remove_ended_jobs(
        &self,
        finished_before_ms: i64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ids: Vec<String> = {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT id FROM jobs
                 WHERE status IN ({}) AND finished_ms < ?1
                   AND NOT EXISTS (SELECT 1 FROM sandboxes
                                   WHERE sandboxes.job_id = jobs.id AND state != ?2)
                 ORDER BY finished_ms LIMIT ?3",
                terminal_statuses()
            ))?;
            let rows = stmt.query_map(
                params![finished_before_ms, SandboxState::Destroyed.as_str(), limit],
                |r| r.get(0),
            )?;
            rows.collect::<Result<_, _>>()?
        };
        let now = crate::model::now_ms();
        for id in &ids {
            for table in [
                "events",
                "phase_runs",
                "artifacts",
                "tokens",
                "crashes",
                "sandboxes",
            ] {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE job_id = ?1"))?
                    .execute([id])?;
            }
            tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                .execute([id])?;
            queue_removal(&tx, &job_log_path(id), now)?;
            queue_removal(&tx, &job_artifacts_path(id), now)?;
            queue_removal(&tx, &job_bundle_path(id), now)?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Removes up to `limit` artifacts stored before `created_before_ms` by jobs that ended, and
    /// queues their files for removal. Returns how many it removed.
    pub fn remove_old_artifacts(
        &self,
        created_before_ms: i64,
        limit: u32,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let old: Vec<(String, String)> = {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT job_id, path FROM artifacts
                 WHERE created_ms < ?1
                   AND job_id IN (SELECT id FROM jobs WHERE status IN ({}))
                 ORDER BY created_ms LIMIT ?2",
                terminal_statuses()
            ))?;
            let rows = stmt.query_map(params![created_before_ms, limit], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let now = crate::model::now_ms();
        for (job_id, path) in &old {
            tx.prepare_cached("DELETE FROM artifacts WHERE job_id = ?1 AND path = ?2")?
                .execute(params![job_id, path])?;
            queue_removal(&tx, &format!("{}/{path}", job_artifacts_path(job_id)), now)?;
        }
        tx.commit()?;
        Ok(old.len())
    }

    /// Files whose rows are gone, oldest first.
    pub fn queued_file_removals(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT path FROM file_removals ORDER BY queued_ms, path LIMIT ?1")?;
        let rows = stmt.query_map([limit], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn forget_file_removals(&self, paths: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for path in paths {
            tx.prepare_cached("DELETE FROM file_removals WHERE path = ?1")?
                .execute([path])?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{sandbox_name_for, Artifact, Sandbox};

    use crate::store::test_support::submit;

    fn sandbox(store: &Store, job_id: &str, state: SandboxState) {
        let now = crate::model::now_ms();
        let sb = store
            .insert_sandbox(&Sandbox {
                id: sandbox_name_for(job_id),
                job_id: job_id.into(),
                backend: "fake".into(),
                vm_ref: None,
                state: SandboxState::Provisioning,
                phase: None,
                profile: "balanced".into(),
                cores: 1,
                memory_mb: 512,
                disk_gb: 1,
                keepalive: false,
                lease_expires_at_ms: now,
                created_at_ms: now,
                updated_at_ms: now,
                destroyed_at_ms: None,
                error: None,
                start_method: None,
                snapshot_id: None,
                from_pool: false,
            })
            .unwrap();
        store.start_job(job_id, &sb.id).unwrap();
        store.set_sandbox_state(&sb.id, state, None).unwrap();
    }

    fn artifact(store: &Store, job_id: &str, path: &str, created_at_ms: i64) {
        store
            .record_artifact(&Artifact {
                job_id: job_id.into(),
                path: path.into(),
                size: 1,
                sha256: "00".into(),
                created_at_ms,
            })
            .unwrap();
    }

    fn count(store: &Store, table: &str, job_id: &str) -> i64 {
        store
            .conn()
            .query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE job_id = ?1"),
                [job_id],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn only_ended_jobs_past_retention_with_destroyed_sandboxes_go() {
        let store = Store::open_in_memory().unwrap();
        let old = submit(&store);
        sandbox(&store, &old, SandboxState::Destroyed);
        store
            .issue_token(&old, crate::store::TokenKind::Session, 1)
            .unwrap();
        let limit = crate::store::PhaseLimit {
            now_ms: 0,
            limit_ms: 1,
        };
        store
            .begin_phase(
                &old,
                &sandbox_name_for(&old),
                crate::model::Phase::Destroy,
                limit,
            )
            .unwrap();
        store.record_crash(&old, 1, "crash", 0).unwrap();
        store
            .set_sandbox_state(&sandbox_name_for(&old), SandboxState::Destroyed, None)
            .unwrap();
        artifact(&store, &old, "out/a.txt", 0);
        store
            .finish_job(&old, JobStatus::Completed, Some(0), None)
            .unwrap();
        let kept = submit(&store);
        sandbox(&store, &kept, SandboxState::Kept);
        store
            .finish_job(&kept, JobStatus::Completed, Some(0), None)
            .unwrap();
        let running = submit(&store);
        sandbox(&store, &running, SandboxState::Running);
        let queued = submit(&store);
        let never_ran = submit(&store);
        store
            .finish_job(&never_ran, JobStatus::Cancelled, None, None)
            .unwrap();

        let finished_at = store
            .get_job(&old)
            .unwrap()
            .unwrap()
            .finished_at_ms
            .unwrap();
        assert!(
            store
                .remove_ended_jobs(finished_at, 100)
                .unwrap()
                .is_empty(),
            "not before"
        );

        let mut removed = store.remove_ended_jobs(i64::MAX, 100).unwrap();
        removed.sort();
        // Both may finish within the same millisecond: which goes first is not the point.
        let mut expected = vec![old.clone(), never_ran.clone()];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(store.get_job(&old).unwrap().is_none());
        for table in [
            "events",
            "phase_runs",
            "artifacts",
            "tokens",
            "crashes",
            "sandboxes",
        ] {
            assert_eq!(
                count(&store, table, &old),
                0,
                "{table} still holds the removed job"
            );
        }
        for id in [&kept, &running, &queued] {
            assert!(store.get_job(id).unwrap().is_some(), "{id} must stay");
        }
        assert!(store
            .get_sandbox(&sandbox_name_for(&kept))
            .unwrap()
            .is_some());
        let queued_files = store.queued_file_removals(100).unwrap();
        for path in [
            job_log_path(&old),
            job_artifacts_path(&old),
            job_bundle_path(&old),
            job_log_path(&never_ran),
        ] {
            assert!(queued_files.contains(&path), "{path} in {queued_files:?}");
        }
        store.forget_file_removals(&queued_files).unwrap();
        assert!(store.queued_file_removals(100).unwrap().is_empty());
    }

    #[test]
    fn removal_works_in_bounded_batches() {
        let store = Store::open_in_memory().unwrap();
        let ids: Vec<String> = (0..5).map(|_| submit(&store)).collect();
        for id in &ids {
            store.finish_job(id, JobStatus::Failed, None, None).unwrap();
        }
        assert_eq!(store.remove_ended_jobs(i64::MAX, 2).unwrap().len(), 2);
        assert_eq!(store.remove_ended_jobs(i64::MAX, 2).unwrap().len(), 2);
        assert_eq!(store.remove_ended_jobs(i64::MAX, 2).unwrap().len(), 1);
        assert!(store.remove_ended_jobs(i64::MAX, 2).unwrap().is_empty());
    }

    #[test]
    fn old_artifacts_of_ended_jobs_go_and_their_files_are_queued() {
        let store = Store::open_in_memory().unwrap();
        let ended = submit(&store);
        artifact(&store, &ended, "old.txt", 1_000);
        artifact(&store, &ended, "new.txt", 5_000);
        store
            .finish_job(&ended, JobStatus::Completed, Some(0), None)
            .unwrap();
        let running = submit(&store);
        sandbox(&store, &running, SandboxState::Running);
        artifact(&store, &running, "old.txt", 1_000);

        assert_eq!(store.remove_old_artifacts(2_000, 100).unwrap(), 1);
        let left: Vec<String> = store
            .list_artifacts(&ended)
            .unwrap()
            .into_iter()
            .map(|a| a.path)
            .collect();
        assert_eq!(left, vec!["new.txt".to_owned()]);
        assert_eq!(store.list_artifacts(&running).unwrap().len(), 1);
        assert_eq!(
            store.queued_file_removals(100).unwrap(),
            vec![format!("artifacts/{ended}/old.txt")]
        );
    }
}
