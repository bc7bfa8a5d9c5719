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
