//! What the restart policy counts, kept across daemon restarts: each time a job's actor died
//! without finishing, or the daemon stopped under a running job without suspending it. Also the
//! mark a graceful shutdown leaves on the jobs it suspended, which tells the two apart.

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

impl Store {
    /// Records a crash of `job_id` at `at_ms` and returns how many crashes it has had after
    /// `since_ms` (this one included): the count the restart policy compares with its limit.
    pub fn record_crash(
        &self,
        job_id: &str,
        at_ms: i64,
        reason: &str,
        since_ms: i64,
    ) -> Result<u32, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO crashes (job_id, at_ms, reason) VALUES (?1, ?2, ?3)",
            params![job_id, at_ms, reason],
        )?;
        let count: u32 = tx.query_row(
            "SELECT COUNT(*) FROM crashes WHERE job_id = ?1 AND at_ms > ?2",
            params![job_id, since_ms],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(count)
    }

    /// Marks a RUNNING job as suspended by a graceful shutdown at `at_ms`.
    pub fn mark_suspended(&self, job_id: &str, at_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE jobs SET suspended_ms = ?2 WHERE id = ?1 AND status = 'RUNNING'",
            params![job_id, at_ms],
        )?;
        Ok(())
    }

    /// Clears a job's suspend mark; true if it had one (the last daemon suspended it cleanly).
    pub fn take_suspended(&self, job_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mark: Option<Option<i64>> = tx
            .query_row(
                "SELECT suspended_ms FROM jobs WHERE id = ?1",
                [job_id],
                |r| r.get(0),
            )
            .optional()?;
        tx.execute(
            "UPDATE jobs SET suspended_ms = NULL WHERE id = ?1",
            [job_id],
        )?;
        tx.commit()?;
        Ok(matches!(mark, Some(Some(_))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::submit;

    fn running_job(store: &Store) -> String {
        let id = submit(store);
        store.start_job(&id, "sandbox-x").unwrap().unwrap();
        id
    }

    #[test]
    fn crashes_are_counted_inside_the_window_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let id = {
            let store = Store::open(&path).unwrap();
            let id = running_job(&store);
            assert_eq!(store.record_crash(&id, 1_000, "a", 0).unwrap(), 1);
            assert_eq!(store.record_crash(&id, 2_000, "b", 0).unwrap(), 2);
            id
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(store.record_crash(&id, 3_000, "c", 0).unwrap(), 3);
        // Only crashes after `since` count.
        assert_eq!(store.record_crash(&id, 4_000, "d", 2_000).unwrap(), 2);
        let other = running_job(&store);
        assert_eq!(store.record_crash(&other, 4_000, "e", 0).unwrap(), 1);
    }

    #[test]
    fn a_suspend_mark_is_taken_once() {
        let store = Store::open_in_memory().unwrap();
        let id = running_job(&store);
        assert!(!store.take_suspended(&id).unwrap());
        store.mark_suspended(&id, 5).unwrap();
        assert!(store.take_suspended(&id).unwrap());
        assert!(!store.take_suspended(&id).unwrap());
        assert!(!store.take_suspended("missing").unwrap());
    }
}
