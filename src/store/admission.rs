//! What admission reads and writes: the queue's head with positions, queued jobs with deadlines,
//! what live sandboxes hold, and ending queued jobs whose deadline has passed.

use rusqlite::params;

use super::events::insert_event;
use super::{parse_column, Store, StoreError};
use crate::model::{now_ms, Event, Phase, SandboxState, StartMode};

/// A queued job as admission sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub id: String,
    pub profile: String,
    /// 1 = next.
    pub position: u64,
    pub deadline_ms: Option<i64>,
    /// How the request asked its sandbox to start.
    pub start: StartMode,
    /// The request's own lease ttl, if it set one.
    pub ttl_minutes: Option<u32>,
}

/// What one live sandbox holds: a job's, a pool sandbox's, or an admitted job's that has no
/// sandbox row yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The VM's name (the sandbox's id; for an admitted job without a row, the one it was given).
    pub vm: String,
    /// The job it serves; None for a pool sandbox no job has taken.
    pub job_id: Option<String>,
    pub profile: String,
    /// (vCPUs, memory MB, disk GB) as the sandbox row records them; None without a row yet.
    pub resources: Option<(u32, u64, u64)>,
    /// In clone, start, cloud_init or guest_agent, or about to clone.
    pub booting: bool,
    /// For a pool sandbox: BOOTING, READY (idle, waiting for a job) or DESTROYING.
    pub pool: Option<SandboxState>,
    /// When a READY pool sandbox became ready.
    pub ready_at_ms: Option<i64>,
}

impl Holding {
    /// A READY pool sandbox: what a job of its profile can take, or what a short host destroys
    /// first.
    pub fn is_idle_pool(&self) -> bool {
        self.job_id.is_none() && self.pool == Some(SandboxState::Ready)
    }
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
                let start: Option<String> = r.get(4)?;
                Ok((
                    QueuedJob {
                        id: r.get(0)?,
                        profile: r.get(1)?,
                        position: r.get(2)?,
                        deadline_ms: r.get(3)?,
                        start: StartMode::Auto,
                        ttl_minutes: r.get(5)?,
                    },
                    start,
                ))
            };
            let rows: Vec<(QueuedJob, Option<String>)> = match limit {
                Some(limit) => stmt.query_map([limit], map)?.collect::<Result<_, _>>()?,
                None => stmt.query_map([], map)?.collect::<Result<_, _>>()?,
            };
            rows.into_iter()
                .map(|(mut job, start)| {
                    if let Some(start) = start {
                        job.start = parse_column("jobs.request_json", &start)?;
                    }
                    Ok(job)
                })
                .collect()
        };
        let head = queued(
            "SELECT id, profile, ROW_NUMBER() OVER (ORDER BY seq), deadline_ms,
                    json_extract(request_json, '$.start'),
                    json_extract(request_json, '$.ttl_minutes')
             FROM jobs WHERE status = 'QUEUED' ORDER BY seq LIMIT ?1",
            Some(head),
        )?;
        let deadlines = queued(
            "SELECT id, profile, position, deadline_ms, start, ttl FROM (
                 SELECT id, profile, ROW_NUMBER() OVER (ORDER BY seq) AS position, deadline_ms,
                        json_extract(request_json, '$.start') AS start,
                        json_extract(request_json, '$.ttl_minutes') AS ttl
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

    /// What every live sandbox holds (a job's or the pool's), plus admitted (RUNNING) jobs whose
    /// sandbox row is not written yet, so a job admitted a moment ago is never missed.
    pub fn holdings(&self) -> Result<Vec<Holding>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT s.id, s.job_id, s.profile, s.cores, s.memory_mb, s.disk_gb, s.phase, s.state,
                    NULL, NULL
             FROM sandboxes s WHERE s.state != 'DESTROYED'
             UNION ALL
             SELECT COALESCE(j.sandbox_id, ''), j.id, j.profile, NULL, NULL, NULL, NULL, NULL,
                    NULL, NULL
             FROM jobs j WHERE j.status = 'RUNNING'
               AND NOT EXISTS (SELECT 1 FROM sandboxes s WHERE s.job_id = j.id)
             UNION ALL
             SELECT p.id, NULL, p.profile, p.cores, p.memory_mb, p.disk_gb, NULL, NULL, p.state,
                    p.ready_ms
             FROM pool_sandboxes p",
        )?;
        let rows = stmt.query_map([], |r| {
            let cores: Option<u32> = r.get(3)?;
            let memory: Option<u64> = r.get(4)?;
            let disk: Option<u64> = r.get(5)?;
            let phase: Option<String> = r.get(6)?;
            let state: Option<String> = r.get(7)?;
            let pool: Option<String> = r.get(8)?;
            Ok((
                Holding {
                    vm: r.get(0)?,
                    job_id: r.get(1)?,
                    profile: r.get(2)?,
                    resources: match (cores, memory, disk) {
                        (Some(c), Some(m), Some(d)) => Some((c, m, d)),
                        _ => None,
                    },
                    booting: false,
                    pool: None,
                    ready_at_ms: r.get(9)?,
                },
                phase,
                state,
                pool,
            ))
        })?;
        let mut holdings = Vec::new();
        for row in rows {
            let (mut holding, phase, state, pool) = row?;
            match pool {
                Some(pool) => {
                    let pool: SandboxState = super::parse_column("pool_sandboxes", &pool)?;
                    holding.booting = pool == SandboxState::Booting;
                    holding.pool = Some(pool);
                }
                None => {
                    holding.booting = match state.as_deref() {
                        None => true,
                        Some("PROVISIONING" | "BOOTING") => boot_phase(phase.as_deref()),
                        Some(_) => false,
                    }
                }
            }
            holdings.push(holding);
        }
        Ok(holdings)
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
            from_pool: false,
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
            (holdings[1].job_id.as_deref(), holdings[1].booting),
            (Some(admitted.as_str()), true)
        );
        assert_eq!(holdings[1].vm, sandbox_name_for(&admitted));
        assert_eq!(holdings[0].vm, sandbox_name_for(&running));
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
            let job = holding.job_id.clone().unwrap_or_default();
            assert_eq!(Some(&holding.booting), want.get(&job), "{holding:?}");
        }
    }

    #[test]
    fn pool_sandboxes_hold_their_share_and_a_booting_one_counts_against_the_boot_cap() {
        use crate::model::{new_pool_sandbox_name, PoolSandbox, StartMethod};
        let store = Store::open_in_memory().unwrap();
        let pooled = |state| PoolSandbox {
            id: new_pool_sandbox_name(),
            profile: "balanced".into(),
            backend: "qemu".into(),
            vm_ref: None,
            state,
            cores: 2,
            memory_mb: 1024,
            disk_gb: 8,
            created_at_ms: 1,
            ready_at_ms: None,
            phases: Vec::new(),
            start_method: None,
            snapshot_id: None,
            error: None,
        };
        let (boot, idle) = (pooled(SandboxState::Booting), pooled(SandboxState::Booting));
        store
            .insert_pool_sandboxes(&[boot.clone(), idle.clone()])
            .unwrap();
        store
            .set_pool_ready(&idle.id, StartMethod::Cold, None, 50)
            .unwrap();
        let mut holdings = store.holdings().unwrap();
        holdings.sort_by_key(|h| h.booting);
        assert_eq!(holdings.len(), 2);
        let seen: Vec<_> = holdings
            .iter()
            .map(|h| {
                (
                    h.vm.as_str(),
                    h.booting,
                    h.is_idle_pool(),
                    h.resources,
                    h.ready_at_ms,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (idle.id.as_str(), false, true, Some((2, 1024, 8)), Some(50)),
                (boot.id.as_str(), true, false, Some((2, 1024, 8)), None),
            ]
        );
        assert!(holdings.iter().all(|h| h.job_id.is_none()));
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
