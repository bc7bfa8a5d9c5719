//! Jobs: submission (with the queue bound), the FIFO queue, status and phase transitions, phase
//! timings, and what the guest reported.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Row};

use super::events::insert_event;
use super::paging::{JobCursor, Page};
use super::{parse_column, Store, StoreError};
use crate::model::{now_ms, Event, Job, JobChanges, JobRequest, JobStatus, Phase, PhaseRun};
use crate::secrets::url::redact_url;

/// A job to insert: the request as validated, and what the daemon resolved for it.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub request: JobRequest,
    pub deadline_ms: Option<i64>,
}

/// The verdict a job ends with once its VM is torn down, recorded before the teardown starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingOutcome {
    pub status: JobStatus,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
}

/// When a phase that begins now must end: the clock's now and the phase's time limit, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseLimit {
    pub now_ms: i64,
    pub limit_ms: i64,
}

/// What the guest has reported so far for a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestProgress {
    pub phoned_home: bool,
    pub exit_code: Option<i32>,
    pub done: bool,
}

const JOB_COLUMNS: &str =
    "id, request_json, status, phase, sandbox_id, exit_code, error, restarts, \
     created_ms, started_ms, finished_ms, deadline_ms, changes_json";
/// How many columns `JOB_COLUMNS` names: a query may select more after them.
const JOB_COLUMN_COUNT: usize = 13;

fn job_from_row(row: &Row<'_>) -> Result<Job, StoreError> {
    let request_json: String = row.get(1)?;
    let request: JobRequest =
        serde_json::from_str(&request_json).map_err(|e| StoreError::Corrupt {
            table: "jobs",
            message: e.to_string(),
        })?;
    let status: String = row.get(2)?;
    let phase: Option<String> = row.get(3)?;
    let changes: Option<String> = row.get(12)?;
    let changes = changes
        .map(|json| serde_json::from_str::<JobChanges>(&json))
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            table: "jobs",
            message: e.to_string(),
        })?;
    Ok(Job {
        id: row.get(0)?,
        profile: request.profile,
        task: request.task,
        command: request.command,
        // The job as shown: a URL's credentials stay in the stored request, for the guest only.
        repo: request.repo.as_deref().map(redact_url),
        git_ref: request.git_ref,
        env_keys: request.env.into_keys().collect(),
        artifacts: request.artifacts.unwrap_or_default(),
        start: request.start,
        status: parse_column("jobs", &status)?,
        phase: phase.map(|p| parse_column("jobs", &p)).transpose()?,
        sandbox_id: row.get(4)?,
        exit_code: row.get(5)?,
        error: row.get(6)?,
        restarts: row.get(7)?,
        created_at_ms: row.get(8)?,
        started_at_ms: row.get(9)?,
        finished_at_ms: row.get(10)?,
        deadline_at_ms: row.get(11)?,
        queue_position: None,
        phases: Vec::new(),
        result_branch: request.result_branch,
        changes,
    })
}

fn query_jobs(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Job>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut jobs = Vec::new();
    while let Some(row) = rows.next()? {
        jobs.push(job_from_row(row)?);
    }
    Ok(jobs)
}

impl Store {
    /// Inserts a QUEUED job, refusing it if `queue_max` jobs already wait.
    pub fn insert_job(&self, new: &NewJob, queue_max: u64) -> Result<(Job, Event), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let waiting: u64 = tx.query_row(
            "SELECT COUNT(*) FROM jobs WHERE status = 'QUEUED'",
            [],
            |r| r.get(0),
        )?;
        if waiting >= queue_max {
            return Err(StoreError::QueueFull(waiting));
        }
        let request_json =
            serde_json::to_string(&new.request).map_err(|e| StoreError::Corrupt {
                table: "jobs",
                message: e.to_string(),
            })?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO jobs (id, profile, request_json, status, created_ms, deadline_ms)
             VALUES (?1, ?2, ?3, 'QUEUED', ?4, ?5)",
            params![
                new.id,
                new.request.profile,
                request_json,
                now,
                new.deadline_ms
            ],
        )?;
        let event = insert_event(&tx, &new.id, "status", None, "QUEUED")?;
        let job = tx.query_row(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
            [&new.id],
            |row| Ok(job_from_row(row)),
        )??;
        tx.commit()?;
        Ok((job, event))
    }

    /// A job with its phase runs and, while it waits, its place in the queue (1 = next).
    pub fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let conn = self.conn();
        let mut jobs = query_jobs(
            &conn,
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
            [id],
        )?;
        let Some(mut job) = jobs.pop() else {
            return Ok(None);
        };
        if job.status == JobStatus::Queued {
            let position: u64 = conn.query_row(
                "SELECT COUNT(*) FROM jobs WHERE status = 'QUEUED'
                 AND seq <= (SELECT seq FROM jobs WHERE id = ?1)",
                [id],
                |r| r.get(0),
            )?;
            job.queue_position = Some(position);
        }
        job.phases = phase_runs(&conn, id)?;
        Ok(Some(job))
    }

    /// The job's request as submitted, env values included (for the guest's bootstrap only).
    pub fn job_request(&self, id: &str) -> Result<Option<JobRequest>, StoreError> {
        let conn = self.conn();
        let text: Option<String> = conn
            .query_row("SELECT request_json FROM jobs WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        text.map(|t| {
            serde_json::from_str(&t).map_err(|e| StoreError::Corrupt {
                table: "jobs",
                message: e.to_string(),
            })
        })
        .transpose()
    }

    /// One page of jobs, newest first, optionally with one status, starting after `after`.
    pub fn list_jobs(
        &self,
        status: Option<JobStatus>,
        after: Option<JobCursor>,
        limit: u32,
    ) -> Result<Page<Job, JobCursor>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS}, seq FROM jobs
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR seq < ?2)
             ORDER BY seq DESC LIMIT ?3"
        ))?;
        let mut rows = stmt.query(params![
            status.map(|s| s.as_str()),
            after.map(|c| c.0),
            i64::from(limit) + 1
        ])?;
        let mut jobs = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(JOB_COLUMN_COUNT)?;
            jobs.push((job_from_row(row)?, seq));
        }
        let page = Page::from_rows(jobs, limit, |(_, seq)| JobCursor(*seq));
        Ok(Page {
            items: page.items.into_iter().map(|(job, _)| job).collect(),
            next: page.next,
        })
    }

    /// Queued jobs, oldest first.
    pub fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>, StoreError> {
        let conn = self.conn();
        query_jobs(
            &conn,
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'QUEUED' ORDER BY seq LIMIT ?1"
            ),
            [limit],
        )
    }

    pub fn running_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let conn = self.conn();
        query_jobs(
            &conn,
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'RUNNING' ORDER BY seq"),
            [],
        )
    }

    pub fn queue_length(&self) -> Result<u64, StoreError> {
        let conn = self.conn();
        Ok(conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE status = 'QUEUED'",
            [],
            |r| r.get(0),
        )?)
    }

    /// QUEUED → RUNNING. False if the job was no longer queued (cancelled meanwhile, say).
    pub fn start_job(&self, id: &str, sandbox_id: &str) -> Result<Option<Event>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE jobs SET status = 'RUNNING', sandbox_id = ?2, started_ms = ?3
             WHERE id = ?1 AND status = 'QUEUED'",
            params![id, sandbox_id, now_ms()],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        let event = insert_event(&tx, id, "status", None, "RUNNING")?;
        tx.commit()?;
        Ok(Some(event))
    }

    /// Records that a phase began: the job's and sandbox's current phase, a phase run, an event.
    /// Returns the phase's deadline: `limit.now_ms + limit.limit_ms` when the phase is new, and
    /// the deadline it got when it first began when a restarted actor re-enters it, so a resumed
    /// phase never gets a fresh full timeout.
    pub fn begin_phase(
        &self,
        job_id: &str,
        sandbox_id: &str,
        phase: Phase,
        limit: PhaseLimit,
    ) -> Result<(Event, i64), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        let current: Option<(Option<String>, Option<i64>)> = tx
            .query_row(
                "SELECT phase, phase_deadline_ms FROM jobs WHERE id = ?1",
                [job_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let deadline = match current {
            Some((Some(current), Some(deadline))) if current == phase.as_str() => deadline,
            _ => limit.now_ms.saturating_add(limit.limit_ms),
        };
        tx.execute(
            "UPDATE jobs SET phase = ?2, phase_deadline_ms = ?3 WHERE id = ?1",
            params![job_id, phase.as_str(), deadline],
        )?;
        tx.execute(
            "UPDATE sandboxes SET phase = ?2, state = ?3, updated_ms = ?4 WHERE id = ?1",
            params![
                sandbox_id,
                phase.as_str(),
                phase.sandbox_state().as_str(),
                now
            ],
        )?;
        // A restarted actor re-enters the phase it was in: close the interrupted run first.
        tx.execute(
            "UPDATE phase_runs SET ended_ms = ?3, result = 'interrupted'
             WHERE job_id = ?1 AND phase = ?2 AND ended_ms IS NULL",
            params![job_id, phase.as_str(), now],
        )?;
        tx.execute(
            "INSERT INTO phase_runs (job_id, phase, started_ms) VALUES (?1, ?2, ?3)",
            params![job_id, phase.as_str(), now],
        )?;
        let event = insert_event(&tx, job_id, "phase_started", Some(phase), phase.as_str())?;
        tx.commit()?;
        Ok((event, deadline))
    }

    /// Records how a phase ended (`ok`, `failed`, `timeout`, `cancelled`); returns the event and
    /// the phase's duration in seconds.
    pub fn end_phase(
        &self,
        job_id: &str,
        phase: Phase,
        result: &str,
        message: &str,
    ) -> Result<(Event, f64), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        let started: Option<i64> = tx
            .query_row(
                "SELECT started_ms FROM phase_runs WHERE job_id = ?1 AND phase = ?2 AND ended_ms IS NULL
                 ORDER BY id DESC LIMIT 1",
                params![job_id, phase.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        tx.execute(
            "UPDATE phase_runs SET ended_ms = ?3, result = ?4
             WHERE job_id = ?1 AND phase = ?2 AND ended_ms IS NULL",
            params![job_id, phase.as_str(), now, result],
        )?;
        let kind = if result == "ok" {
            "phase_completed"
        } else {
            "phase_failed"
        };
        let event = insert_event(&tx, job_id, kind, Some(phase), message)?;
        tx.commit()?;
        let seconds = started.map_or(0.0, |s| (now - s).max(0) as f64 / 1000.0);
        Ok((event, seconds))
    }

    /// Puts a job in a terminal status, once; later calls are no-ops returning None.
    pub fn finish_job(
        &self,
        id: &str,
        status: JobStatus,
        exit_code: Option<i32>,
        error: Option<&str>,
    ) -> Result<Option<Event>, StoreError> {
        debug_assert!(status.is_terminal());
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE jobs SET status = ?2, exit_code = COALESCE(?3, exit_code), error = ?4,
                 finished_ms = ?5
             WHERE id = ?1 AND status IN ('QUEUED', 'RUNNING')",
            params![id, status.as_str(), exit_code, error, now_ms()],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        // Whatever the job held for its guest stops working with it.
        tx.execute("UPDATE tokens SET expires_ms = 0 WHERE job_id = ?1", [id])?;
        let message = match error {
            Some(reason) => format!("{status}: {reason}"),
            None => status.to_string(),
        };
        let event = insert_event(&tx, id, "finished", None, &message)?;
        tx.commit()?;
        Ok(Some(event))
    }

    /// Records the outcome a running job will end with once its VM is torn down.
    pub fn set_pending_outcome(
        &self,
        id: &str,
        status: JobStatus,
        exit_code: Option<i32>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE jobs SET pending_status = ?2, exit_code = COALESCE(?3, exit_code), pending_error = ?4
             WHERE id = ?1",
            params![id, status.as_str(), exit_code, error],
        )?;
        Ok(())
    }

    /// The outcome recorded by `set_pending_outcome`, if any.
    pub fn pending_outcome(&self, id: &str) -> Result<Option<PendingOutcome>, StoreError> {
        let conn = self.conn();
        let row: Option<(Option<String>, Option<i32>, Option<String>)> = conn
            .query_row(
                "SELECT pending_status, exit_code, pending_error FROM jobs WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        match row {
            Some((Some(status), exit_code, error)) => Ok(Some(PendingOutcome {
                status: parse_column("jobs", &status)?,
                exit_code,
                error,
            })),
            _ => Ok(None),
        }
    }

    pub fn add_restart(&self, id: &str) -> Result<u32, StoreError> {
        let conn = self.conn();
        Ok(conn.query_row(
            "UPDATE jobs SET restarts = restarts + 1 WHERE id = ?1 RETURNING restarts",
            [id],
            |r| r.get(0),
        )?)
    }

    pub fn record_phone_home(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let changed = conn.execute(
            "UPDATE jobs SET guest_phoned_home_ms = ?2 WHERE id = ?1 AND guest_phoned_home_ms IS NULL",
            params![id, now_ms()],
        )?;
        Ok(changed > 0)
    }

    pub fn record_guest_exit(&self, id: &str, exit_code: i32) -> Result<bool, StoreError> {
        let conn = self.conn();
        let changed = conn.execute(
            "UPDATE jobs SET guest_exit_code = ?2 WHERE id = ?1 AND guest_exit_code IS NULL",
            params![id, exit_code],
        )?;
        Ok(changed > 0)
    }

    /// Records what the job's agent changed, with the event that says so.
    pub fn set_job_changes(
        &self,
        id: &str,
        changes: &JobChanges,
        message: &str,
    ) -> Result<Event, StoreError> {
        let json = serde_json::to_string(changes).map_err(|e| StoreError::Corrupt {
            table: "jobs",
            message: e.to_string(),
        })?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE jobs SET changes_json = ?2 WHERE id = ?1",
            params![id, json],
        )?;
        let event = insert_event(&tx, id, "changes", None, message)?;
        tx.commit()?;
        Ok(event)
    }

    pub fn record_guest_done(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let changed = conn.execute(
            "UPDATE jobs SET guest_done_ms = ?2 WHERE id = ?1 AND guest_done_ms IS NULL",
            params![id, now_ms()],
        )?;
        Ok(changed > 0)
    }

    pub fn guest_progress(&self, id: &str) -> Result<GuestProgress, StoreError> {
        let conn = self.conn();
        let progress = conn
            .query_row(
                "SELECT guest_phoned_home_ms IS NOT NULL, guest_exit_code, guest_done_ms IS NOT NULL
                 FROM jobs WHERE id = ?1",
                [id],
                |r| Ok(GuestProgress { phoned_home: r.get(0)?, exit_code: r.get(1)?, done: r.get(2)? }),
            )
            .optional()?;
        Ok(progress.unwrap_or_default())
    }

    pub fn count_jobs_by_status(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
        let mut counts: BTreeMap<String, u64> = JobStatus::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        for row in rows {
            let (status, count) = row?;
            counts.insert(status, count);
        }
        Ok(counts)
    }
}

fn phase_runs(conn: &rusqlite::Connection, job_id: &str) -> Result<Vec<PhaseRun>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT phase, started_ms, ended_ms, result FROM phase_runs WHERE job_id = ?1 ORDER BY id",
    )?;
    let mut rows = stmt.query([job_id])?;
    let mut runs = Vec::new();
    while let Some(row) = rows.next()? {
        let phase: String = row.get(0)?;
        let started_at_ms: i64 = row.get(1)?;
        let ended_at_ms: Option<i64> = row.get(2)?;
        runs.push(PhaseRun {
            phase: parse_column("phase_runs", &phase)?,
            started_at_ms,
            ended_at_ms,
            duration_seconds: ended_at_ms.map(|end| (end - started_at_ms).max(0) as f64 / 1000.0),
            result: row.get(3)?,
        });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::test_support::submit;

    #[test]
    fn pages_of_jobs_run_newest_first_and_hold_each_once() {
        let store = Store::open_in_memory().unwrap();
        let ids: Vec<String> = (0..5).map(|_| submit(&store)).collect();
        store
            .finish_job(&ids[1], JobStatus::Cancelled, None, None)
            .unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = store.list_jobs(None, after, 2).unwrap();
            pages += 1;
            seen.extend(page.items.into_iter().map(|j| j.id));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
        assert_eq!(seen, newest_first);
        assert_eq!(pages, 3);
        let queued = store.list_jobs(Some(JobStatus::Queued), None, 10).unwrap();
        assert_eq!(queued.items.len(), 4);
        assert!(queued.next.is_none());
    }
}
