//! What admission reads and writes: the queue's head with positions, queued jobs with deadlines,
//! what live sandboxes hold, and ending queued jobs whose deadline has passed.

use rusqlite::params;

use super::events::insert_event;
use super::{Store, StoreError};
use crate::model::{now_ms, Event, Phase};

/// A queued job as admission sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub id: String,
    pub profile: String,
    /// 1 = next.
    pub position: u64,
    pub deadline_ms: Option<i64>,
}

/// What one live sandbox holds, or an admitted job that has no sandbox row yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub job_id: String,
    pub profile: String,
    /// (vCPUs, memory MB, disk GB) as the sandbox row records them; None without a row yet.
    pub resources: Option<(u32, u64, u64)>,
    /// In clone, start, cloud_init or guest_agent, or about to clone.
    pub booting: bool,
}

/// Everything one admission round needs from the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdmissionView {
    pub queue_length: u64,
    /// The first queued jobs, oldest first.
    pub head: Vec<QueuedJob>,
    /// Every queued job with a deadline.
    pub deadlines: Vec<QueuedJob>,
    pub holdings: Vec<Holding>,
}

fn boot_phase(phase: Option<&str>) -> bool {
    match phase {
        None => true,
        Some(p) => Phase::PROVISIONING.iter().any(|b| b.as_str() == p),
    }
}

impl Store {
    /// Ends every queued job whose deadline is at or before `now_ms` (TIMEOUT, with the reason).
    pub fn expire_queued(&self, now_ms_at: i64) -> Result<Vec<Event>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let overdue: Vec<(String, i64)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT id, deadline_ms FROM jobs
                 WHERE status = 'QUEUED' AND deadline_ms IS NOT NULL AND deadline_ms <= ?1
                 ORDER BY seq",
            )?;
            let rows = stmt.query_map([now_ms_at], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut events = Vec::new();
        for (id, deadline) in overdue {
            let by = u64::try_from(deadline)
                .map(|ms| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                    )
                    .to_string()
                })
                .unwrap_or_else(|_| deadline.to_string());
            let reason = format!("deadline passed while queued (it had to start by {by})");
            let changed = tx.execute(
                "UPDATE jobs SET status = 'TIMEOUT', error = ?2, finished_ms = ?3
                 WHERE id = ?1 AND status = 'QUEUED'",
                params![id, reason, now_ms()],
            )?;
            if changed > 0 {
                events.push(insert_event(
                    &tx,
                    &id,
                    "finished",
                    None,
                    &format!("TIMEOUT: {reason}"),
                )?);
            }
        }
        tx.commit()?;
        Ok(events)
    }

    /// The queue's length, its first `head` jobs, the queued jobs with deadlines, and what live
    /// sandboxes hold, read together.
    pub fn admission_view(&self, head: u32) -> Result<AdmissionView, StoreError> {
        let conn = self.conn();
        let queued = |sql: &str, limit: Option<u32>| -> Result<Vec<QueuedJob>, StoreError> {
            let mut stmt = conn.prepare_cached(sql)?;
            let map = |r: &rusqlite::Row<'_>| {
                Ok(QueuedJob {
                    id: r.get(0)?,
                    profile: r.get(1)?,
                    position: r.get(2)?,
                    deadline_ms: r.get(3)?,
                })
            };
            let rows = match limit {
                Some(limit) => stmt.query_map([limit], map)?.collect::<Result<_, _>>()?,
                None => stmt.query_map([], map)?.collect::<Result<_, _>>()?,
            };
            Ok(rows)
        };
        let head = queued(
            "SELECT id, profile, ROW_NUMBER() OVER (ORDER BY seq), deadline_ms
             FROM jobs WHERE status = 'QUEUED' ORDER BY seq LIMIT ?1",
            Some(head),
        )?;
        let deadlines = queued(
            "SELECT id, profile, position, deadline_ms FROM (
                 SELECT id, profile, ROW_NUMBER() OVER (ORDER BY seq) AS position, deadline_ms
                 FROM jobs WHERE status = 'QUEUED')
             WHERE deadline_ms IS NOT NULL ORDER BY position",
            None,
        )?;
        let queue_length: u64 = conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE status = 'QUEUED'",
            [],
            |r| r.get(0),
        )?;
        drop(conn);
        Ok(AdmissionView {
            queue_length,
            head,
            deadlines,
            holdings: self.holdings()?,
        })
    }

    /// What every live sandbox holds, plus admitted (RUNNING) jobs whose sandbox row is not
    /// written yet, so a job admitted a moment ago is never missed.
    pub fn holdings(&self) -> Result<Vec<Holding>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT s.job_id, s.profile, s.cores, s.memory_mb, s.disk_gb, s.phase, s.state
             FROM sandboxes s WHERE s.state != 'DESTROYED'
             UNION ALL
             SELECT j.id, j.profile, NULL, NULL, NULL, NULL, NULL
             FROM jobs j WHERE j.status = 'RUNNING'
               AND NOT EXISTS (SELECT 1 FROM sandboxes s WHERE s.job_id = j.id)",
        )?;
        let rows = stmt.query_map([], |r| {
            let cores: Option<u32> = r.get(2)?;
            let memory: Option<u64> = r.get(3)?;
            let disk: Option<u64> = r.get(4)?;
            let phase: Option<String> = r.get(5)?;
            let state: Option<String> = r.get(6)?;
            let resources = match (cores, memory, disk) {
                (Some(c), Some(m), Some(d)) => Some((c, m, d)),
                _ => None,
            };
            let booting = match state.as_deref() {
                None => true,
                Some("PROVISIONING" | "BOOTING") => boot_phase(phase.as_deref()),
                Some(_) => false,
            };
            Ok(Holding {
                job_id: r.get(0)?,
                profile: r.get(1)?,
                resources,
                booting,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{new_id, sandbox_name_for, JobRequest, JobStatus, Sandbox, SandboxState};
    use crate::store::NewJob;

    fn submit(store: &Store, deadline_ms: Option<i64>) -> String {
        let new = NewJob {
            id: new_id(),
            request: JobRequest {
                profile: "balanced".into(),
                task: "t".into(),
                ..JobRequest::default()
            },
            deadline_ms,
        };
        store.insert_job(&new, 100).unwrap();
        new.id
    }

    fn sandbox(job_id: &str, state: SandboxState, phase: Option<Phase>) -> Sandbox {
        Sandbox {
            id: sandbox_name_for(job_id),
            job_id: job_id.to_owned(),
            backend: "fake".into(),
            vm_ref: None,
            state,
            phase,
            profile: "balanced".into(),
            cores: 4,
            memory_mb: 6144,
            disk_gb: 30,
            keepalive: false,
            lease_expires_at_ms: i64::MAX,
            created_at_ms: 0,
            updated_at_ms: 0,
            destroyed_at_ms: None,
            error: None,
            start_method: None,
            snapshot_id: None,
        }
    }

    #[test]
    fn the_view_gives_positions_deadlines_and_holdings() {
        let store = Store::open_in_memory().unwrap();
        let running = submit(&store, None);
        store
            .start_job(&running, &sandbox_name_for(&running))
            .unwrap();
        let admitted = submit(&store, None);
        store
            .start_job(&admitted, &sandbox_name_for(&admitted))
            .unwrap();
        let first = submit(&store, None);
        let second = submit(&store, Some(5_000));
        let third = submit(&store, None);
        store
            .insert_sandbox(&sandbox(&running, SandboxState::Running, Some(Phase::Run)))
            .unwrap();

        let view = store.admission_view(2).unwrap();
        assert_eq!(view.queue_length, 3);
        let head: Vec<(&str, u64)> = view
            .head
            .iter()
            .map(|j| (j.id.as_str(), j.position))
            .collect();
        assert_eq!(head, [(first.as_str(), 1), (second.as_str(), 2)]);
        assert_eq!(view.deadlines.len(), 1);
        assert_eq!(
            (view.deadlines[0].id.as_str(), view.deadlines[0].position),
            (second.as_str(), 2)
        );
        assert!(!view.head.iter().any(|j| j.id == third));

        let mut holdings = view.holdings.clone();
        holdings.sort_by_key(|h| h.resources.is_none());
        assert_eq!(holdings.len(), 2);
        assert_eq!(holdings[0].resources, Some((4, 6144, 30)));
        assert!(
            !holdings[0].booting,
            "a sandbox in its run phase is not booting"
        );
        assert_eq!(
            (holdings[1].job_id.as_str(), holdings[1].booting),
            (admitted.as_str(), true)
        );
    }

    #[test]
    fn booting_means_the_boot_phases_and_destroyed_sandboxes_hold_nothing() {
        let store = Store::open_in_memory().unwrap();
        let cases = [
            (SandboxState::Provisioning, None, true),
            (SandboxState::Provisioning, Some(Phase::Clone), true),
            (SandboxState::Booting, Some(Phase::GuestAgent), true),
            (SandboxState::Running, Some(Phase::Run), false),
            (SandboxState::Kept, Some(Phase::Upload), false),
            (SandboxState::Destroying, Some(Phase::Destroy), false),
        ];
        let mut want = std::collections::HashMap::new();
        for (state, phase, booting) in cases {
            let id = submit(&store, None);
            store.start_job(&id, &sandbox_name_for(&id)).unwrap();
            store.insert_sandbox(&sandbox(&id, state, phase)).unwrap();
            want.insert(id, booting);
        }
        let gone = submit(&store, None);
        store.start_job(&gone, &sandbox_name_for(&gone)).unwrap();
        store
            .insert_sandbox(&sandbox(
                &gone,
                SandboxState::Destroyed,
                Some(Phase::Destroy),
            ))
            .unwrap();
        store
            .finish_job(&gone, JobStatus::Completed, Some(0), None)
            .unwrap();
        let holdings = store.holdings().unwrap();
        assert_eq!(holdings.len(), cases.len());
        for holding in holdings {
            assert_eq!(
                Some(&holding.booting),
                want.get(&holding.job_id),
                "{holding:?}"
            );
        }
    }

    #[test]
    fn overdue_queued_jobs_time_out_with_the_reason() {
        let store = Store::open_in_memory().unwrap();
        let late = submit(&store, Some(1_000));
        let fine = submit(&store, Some(10_000));
        let none = submit(&store, None);
        let events = store.expire_queued(5_000).unwrap();
        assert_eq!(events.len(), 1);
        let job = store.get_job(&late).unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Timeout);
        assert!(job.error.unwrap().contains("deadline passed while queued"));
        for id in [fine, none] {
            assert_eq!(
                store.get_job(&id).unwrap().unwrap().status,
                JobStatus::Queued
            );
        }
        assert!(store.expire_queued(5_000).unwrap().is_empty(), "once");
    }
}
