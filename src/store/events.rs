//! A job's event history: appended in the same transaction as the change it records.

use rusqlite::{params, Transaction};

use super::{parse_column, Store, StoreError};
use crate::model::{now_ms, Event, Phase};

pub(super) fn insert_event(
    tx: &Transaction<'_>,
    job_id: &str,
    kind: &str,
    phase: Option<Phase>,
    message: &str,
) -> Result<Event, StoreError> {
    let at_ms = now_ms();
    tx.prepare_cached(
        "INSERT INTO events (job_id, at_ms, kind, phase, message) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        job_id,
        at_ms,
        kind,
        phase.map(Phase::as_str),
        message
    ])?;
    Ok(Event {
        id: tx.last_insert_rowid(),
        job_id: job_id.to_owned(),
        at_ms,
        kind: kind.to_owned(),
        phase,
        message: message.to_owned(),
    })
}

impl Store {
    pub fn add_event(
        &self,
        job_id: &str,
        kind: &str,
        phase: Option<Phase>,
        message: &str,
    ) -> Result<Event, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let event = insert_event(&tx, job_id, kind, phase, message)?;
        tx.commit()?;
        Ok(event)
    }

    /// Adds the event unless the job already has one of the same kind and message: for notices a
    /// guest could otherwise repeat without bound (a quota reached). None when it was there.
    pub fn add_event_once(
        &self,
        job_id: &str,
        kind: &str,
        message: &str,
    ) -> Result<Option<Event>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let seen: bool = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM events WHERE job_id = ?1 AND kind = ?2 AND message = ?3)",
            )?
            .query_row(params![job_id, kind, message], |r| r.get(0))?;
        if seen {
            return Ok(None);
        }
        let event = insert_event(&tx, job_id, kind, None, message)?;
        tx.commit()?;
        Ok(Some(event))
    }

    /// Events of a job with an id above `after`, oldest first.
    pub fn events_after(
        &self,
        job_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, at_ms, kind, phase, message FROM events
             WHERE job_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let mut rows = stmt.query(params![job_id, after, limit])?;
        let mut events = Vec::new();
        while let Some(row) = rows.next()? {
            let phase: Option<String> = row.get(3)?;
            events.push(Event {
                id: row.get(0)?,
                job_id: job_id.to_owned(),
                at_ms: row.get(1)?,
                kind: row.get(2)?,
                phase: phase.map(|p| parse_column("events", &p)).transpose()?,
                message: row.get(4)?,
            });
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_support::submit;
    use crate::store::Store;

    #[test]
    fn an_event_added_once_is_recorded_once() {
        let store = Store::open_in_memory().unwrap();
        let job = submit(&store);
        let other = submit(&store);
        assert!(store
            .add_event_once(&job, "quota", "log full")
            .unwrap()
            .is_some());
        assert!(store
            .add_event_once(&job, "quota", "log full")
            .unwrap()
            .is_none());
        assert!(store
            .add_event_once(&job, "quota", "too many files")
            .unwrap()
            .is_some());
        assert!(store
            .add_event_once(&other, "quota", "log full")
            .unwrap()
            .is_some());
        let quota: Vec<String> = store
            .events_after(&job, 0, 100)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "quota")
            .map(|e| e.message)
            .collect();
        assert_eq!(quota, ["log full", "too many files"]);
    }
}
