//! The warm pool's rows: sandboxes booted ahead of any job, from the row written before the clone
//! to READY, and the claim that hands one to an admitted job. The claim is one transaction: the
//! job turns RUNNING with the pool VM as its sandbox, a sandboxes row takes the VM over with the
//! phases done ahead, and the pool row goes, so no two jobs ever get the same VM.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Row, Transaction};

use super::events::insert_event;
use super::{parse_column, Store, StoreError};
use crate::model::{now_ms, Event, PhaseRun, PoolSandbox, SandboxState, StartMethod};

const POOL_COLUMNS: &str = "id, profile, backend, vm_ref, state, cores, memory_mb, disk_gb, \
     phases_json, start_method, snapshot_id, created_ms, ready_ms, error";

/// What the job that takes a pool sandbox sets on the sandbox row it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimTerms {
    /// The job's profile keeps its sandbox after the job.
    pub keepalive: bool,
    pub lease_expires_ms: i64,
    /// Only a pool sandbox that became READY at or after this is taken (older ones are due
    /// for replacement: `pool.max_idle`).
    pub ready_since_ms: i64,
}

/// A job that took a pool sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub sandbox_id: String,
    pub events: Vec<Event>,
}

fn pool_from_row(row: &Row<'_>) -> Result<PoolSandbox, StoreError> {
    let state: String = row.get(4)?;
    let phases: String = row.get(8)?;
    let start_method: Option<String> = row.get(9)?;
    Ok(PoolSandbox {
        id: row.get(0)?,
        profile: row.get(1)?,
        backend: row.get(2)?,
        vm_ref: row.get(3)?,
        state: parse_column("pool_sandboxes", &state)?,
        cores: row.get(5)?,
        memory_mb: row.get(6)?,
        disk_gb: row.get(7)?,
        phases: serde_json::from_str(&phases).map_err(|e| StoreError::Corrupt {
            table: "pool_sandboxes",
            message: format!("phases_json: {e}"),
        })?,
        start_method: start_method
            .map(|m| parse_column("pool_sandboxes", &m))
            .transpose()?,
        snapshot_id: row.get(10)?,
        created_at_ms: row.get(11)?,
        ready_at_ms: row.get(12)?,
        error: row.get(13)?,
    })
}

fn encode_phases(phases: &[PhaseRun]) -> Result<String, StoreError> {
    serde_json::to_string(phases).map_err(|e| StoreError::Corrupt {
        table: "pool_sandboxes",
        message: format!("phases_json: {e}"),
    })
}

impl Store {
    /// Records pool sandboxes about to be cloned (BOOTING), before any VM exists.
    pub fn insert_pool_sandboxes(&self, sandboxes: &[PoolSandbox]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for p in sandboxes {
            tx.execute(
                "INSERT INTO pool_sandboxes (id, profile, backend, vm_ref, state, cores, memory_mb,
                     disk_gb, phases_json, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
                params![
                    p.id,
                    p.profile,
                    p.backend,
                    p.vm_ref,
                    p.state.as_str(),
                    p.cores,
                    p.memory_mb,
                    p.disk_gb,
                    encode_phases(&p.phases)?,
                    p.created_at_ms,
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every pool sandbox, oldest first.
    pub fn pool_sandboxes(&self) -> Result<Vec<PoolSandbox>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {POOL_COLUMNS} FROM pool_sandboxes ORDER BY created_ms, id"
        ))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(pool_from_row(row)?);
        }
        Ok(out)
    }

    pub fn get_pool_sandbox(&self, id: &str) -> Result<Option<PoolSandbox>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {POOL_COLUMNS} FROM pool_sandboxes WHERE id = ?1"
        ))?;
        let mut rows = stmt.query([id])?;
        rows.next()?.map(pool_from_row).transpose()
    }

    pub fn set_pool_vm_ref(&self, id: &str, vm_ref: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE pool_sandboxes SET vm_ref = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, vm_ref, now_ms()],
        )?;
        Ok(())
    }

    /// Adds a finished boot phase to a BOOTING pool sandbox's list.
    pub fn add_pool_phase(&self, id: &str, run: &PhaseRun) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let phases: Option<String> = tx
            .query_row(
                "SELECT phases_json FROM pool_sandboxes WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(phases) = phases else {
            return Ok(());
        };
        let mut phases: Vec<PhaseRun> =
            serde_json::from_str(&phases).map_err(|e| StoreError::Corrupt {
                table: "pool_sandboxes",
                message: format!("phases_json: {e}"),
            })?;
        phases.push(run.clone());
        tx.execute(
            "UPDATE pool_sandboxes SET phases_json = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, encode_phases(&phases)?, now_ms()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// BOOTING → READY, with how its VM started. False when it is no longer BOOTING (an eviction
    /// or shutdown took it meanwhile).
    pub fn set_pool_ready(
        &self,
        id: &str,
        method: StartMethod,
        snapshot_id: Option<&str>,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let changed = self.conn().execute(
            "UPDATE pool_sandboxes SET state = 'READY', start_method = ?2, snapshot_id = ?3,
                 ready_ms = ?4, updated_ms = ?4
             WHERE id = ?1 AND state = 'BOOTING'",
            params![id, method.as_str(), snapshot_id, at_ms],
        )?;
        Ok(changed > 0)
    }

    /// Marks a pool sandbox DESTROYING (with why, if it failed) when it is in one of `from`, and
    /// returns it; None when it is gone or in another state (a job took it, say).
    pub fn begin_pool_destroy(
        &self,
        id: &str,
        from: &[SandboxState],
        error: Option<&str>,
    ) -> Result<Option<PoolSandbox>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let state: Option<String> = tx
            .query_row(
                "SELECT state FROM pool_sandboxes WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(state) = state else {
            return Ok(None);
        };
        let state: SandboxState = parse_column("pool_sandboxes", &state)?;
        if !from.contains(&state) {
            return Ok(None);
        }
        tx.execute(
            "UPDATE pool_sandboxes SET state = 'DESTROYING', error = COALESCE(?2, error),
                 updated_ms = ?3
             WHERE id = ?1",
            params![id, error, now_ms()],
        )?;
        let marked = tx
            .query_row(
                &format!("SELECT {POOL_COLUMNS} FROM pool_sandboxes WHERE id = ?1"),
                [id],
                |row| Ok(pool_from_row(row)),
            )
            .optional()?
            .transpose()?;
        tx.commit()?;
        Ok(marked)
    }

    /// A destroy that failed: the row stays DESTROYING with the reason, for the reconciler.
    pub fn pool_destroy_failed(&self, id: &str, error: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE pool_sandboxes SET error = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, error, now_ms()],
        )?;
        Ok(())
    }

    /// READY pool sandboxes per profile (profiles with none are left out).
    pub fn count_pool_ready(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT profile, COUNT(*) FROM pool_sandboxes WHERE state = 'READY' GROUP BY profile",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a pool sandbox whose VM is gone.
    pub fn remove_pool_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM pool_sandboxes WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Starts a queued job on the oldest READY pool sandbox of `profile` that became ready at or
    /// after `terms.ready_since_ms`. None (and nothing changed) when there is none, or the job
    /// is no longer queued.
    pub fn start_job_from_pool(
        &self,
        job_id: &str,
        profile: &str,
        terms: &ClaimTerms,
    ) -> Result<Option<Claim>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let found = {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {POOL_COLUMNS} FROM pool_sandboxes
                 WHERE profile = ?1 AND state = 'READY' AND ready_ms >= ?2
                 ORDER BY ready_ms, id LIMIT 1"
            ))?;
            let mut rows = stmt.query(params![profile, terms.ready_since_ms])?;
            rows.next()?.map(pool_from_row).transpose()?
        };
        let Some(pooled) = found else {
            return Ok(None);
        };
        let now = now_ms();
        let started = tx.execute(
            "UPDATE jobs SET status = 'RUNNING', sandbox_id = ?2, started_ms = ?3
             WHERE id = ?1 AND status = 'QUEUED'",
            params![job_id, pooled.id, now],
        )?;
        if started == 0 {
            return Ok(None);
        }
        let events = hand_over(&tx, job_id, &pooled, terms, now)?;
        tx.commit()?;
        Ok(Some(Claim {
            sandbox_id: pooled.id,
            events,
        }))
    }
}

/// The claim's writes after the job turned RUNNING: the sandboxes row that takes the VM over
/// (ready to run, its boot phases done), those phases in the job's list as taken from the pool,
/// the pool row gone, and the events.
fn hand_over(
    tx: &Transaction<'_>,
    job_id: &str,
    pooled: &PoolSandbox,
    terms: &ClaimTerms,
    now: i64,
) -> Result<Vec<Event>, StoreError> {
    tx.execute(
        "INSERT INTO sandboxes (id, job_id, backend, vm_ref, state, phase, profile, cores,
             memory_mb, disk_gb, keepalive, lease_expires_ms, created_ms, updated_ms,
             start_method, snapshot_id, from_pool)
         VALUES (?1, ?2, ?3, ?4, 'READY', 'run', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 1)",
        params![
            pooled.id,
            job_id,
            pooled.backend,
            pooled.vm_ref,
            pooled.profile,
            pooled.cores,
            pooled.memory_mb,
            pooled.disk_gb,
            terms.keepalive,
            terms.lease_expires_ms,
            pooled.created_at_ms,
            now,
            pooled.start_method.map(StartMethod::as_str),
            pooled.snapshot_id,
        ],
    )?;
    for run in &pooled.phases {
        tx.execute(
            "INSERT INTO phase_runs (job_id, phase, started_ms, ended_ms, result)
             VALUES (?1, ?2, ?3, ?4, 'pool')",
            params![
                job_id,
                run.phase.as_str(),
                run.started_at_ms,
                run.ended_at_ms
            ],
        )?;
    }
    tx.execute("DELETE FROM pool_sandboxes WHERE id = ?1", [&pooled.id])?;
    let booted: f64 = pooled
        .phases
        .iter()
        .filter_map(|r| r.duration_seconds)
        .sum();
    let idle = pooled
        .ready_at_ms
        .map_or(0.0, |ready| (now - ready).max(0) as f64 / 1000.0);
    let how = match (&pooled.start_method, &pooled.snapshot_id) {
        (Some(StartMethod::Restored), Some(snapshot)) => format!("restored from {snapshot}"),
        _ => "booted".to_owned(),
    };
    let message = format!(
        "took sandbox {} from the {} pool: {how} ahead of the job in {booted:.1}s, ready for \
         {idle:.1}s",
        pooled.id, pooled.profile
    );
    Ok(vec![
        insert_event(tx, job_id, "status", None, "RUNNING")?,
        insert_event(tx, job_id, "pool", None, &message)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{new_pool_sandbox_name, JobStatus, Phase};
    use crate::store::test_support::submit;

    fn booting(profile: &str, created: i64) -> PoolSandbox {
        PoolSandbox::booting(
            new_pool_sandbox_name(),
            profile,
            "qemu",
            (2, 2048, 10),
            created,
        )
    }

    fn run(phase: Phase, from: i64, to: i64) -> PhaseRun {
        PhaseRun {
            phase,
            started_at_ms: from,
            ended_at_ms: Some(to),
            duration_seconds: Some((to - from) as f64 / 1000.0),
            result: Some("ok".into()),
        }
    }

    fn terms(ready_since_ms: i64) -> ClaimTerms {
        ClaimTerms {
            keepalive: false,
            lease_expires_ms: 9_999,
            ready_since_ms,
        }
    }

    #[test]
    fn a_ready_sandbox_goes_to_one_job_with_its_phases_and_is_gone_from_the_pool() {
        let store = Store::open_in_memory().unwrap();
        let pooled = booting("balanced", 100);
        store
            .insert_pool_sandboxes(std::slice::from_ref(&pooled))
            .unwrap();
        store.set_pool_vm_ref(&pooled.id, "vm-7").unwrap();
        for r in [
            run(Phase::Clone, 100, 300),
            run(Phase::Start, 300, 400),
            run(Phase::CloudInit, 400, 5_400),
            run(Phase::GuestAgent, 5_400, 5_450),
        ] {
            store.add_pool_phase(&pooled.id, &r).unwrap();
        }
        let (first, second) = (submit(&store), submit(&store));
        // Not ready yet: nothing to take.
        assert_eq!(
            store
                .start_job_from_pool(&first, "balanced", &terms(0))
                .unwrap(),
            None
        );
        assert!(store
            .set_pool_ready(&pooled.id, StartMethod::Cold, None, 6_000)
            .unwrap());
        // Too old for this claim's max_idle, or of another profile: not taken either.
        assert!(store
            .start_job_from_pool(&first, "balanced", &terms(6_001))
            .unwrap()
            .is_none());
        assert!(store
            .start_job_from_pool(&first, "interactive-dev", &terms(0))
            .unwrap()
            .is_none());

        let claim = store
            .start_job_from_pool(&first, "balanced", &terms(6_000))
            .unwrap()
            .unwrap();
        assert_eq!(claim.sandbox_id, pooled.id);
        assert_eq!(claim.events.len(), 2);
        assert!(
            claim.events[1]
                .message
                .contains("booted ahead of the job in 5.3s"),
            "{}",
            claim.events[1].message
        );
        // The second job finds none: one job per pool sandbox.
        assert!(store
            .start_job_from_pool(&second, "balanced", &terms(0))
            .unwrap()
            .is_none());
        assert!(store.pool_sandboxes().unwrap().is_empty());

        let job = store.get_job(&first).unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.sandbox_id.as_deref(), Some(pooled.id.as_str()));
        let phases: Vec<(Phase, Option<&str>, Option<f64>)> = job
            .phases
            .iter()
            .map(|r| (r.phase, r.result.as_deref(), r.duration_seconds))
            .collect();
        assert_eq!(
            phases,
            vec![
                (Phase::Clone, Some("pool"), Some(0.2)),
                (Phase::Start, Some("pool"), Some(0.1)),
                (Phase::CloudInit, Some("pool"), Some(5.0)),
                (Phase::GuestAgent, Some("pool"), Some(0.05)),
            ]
        );
        let sandbox = store.sandbox_for_job(&first).unwrap().unwrap();
        assert_eq!(sandbox.id, pooled.id);
        assert_eq!(sandbox.vm_ref.as_deref(), Some("vm-7"));
        assert_eq!(sandbox.phase, Some(Phase::Run));
        assert!(sandbox.from_pool);
        assert_eq!(sandbox.start_method, Some(StartMethod::Cold));
    }

    #[test]
    fn a_claim_for_a_job_no_longer_queued_changes_nothing() {
        let store = Store::open_in_memory().unwrap();
        let pooled = booting("balanced", 1);
        store
            .insert_pool_sandboxes(std::slice::from_ref(&pooled))
            .unwrap();
        store
            .set_pool_ready(&pooled.id, StartMethod::Cold, None, 2)
            .unwrap();
        let job = submit(&store);
        store
            .finish_job(&job, JobStatus::Cancelled, None, Some("x"))
            .unwrap();
        assert!(store
            .start_job_from_pool(&job, "balanced", &terms(0))
            .unwrap()
            .is_none());
        assert_eq!(
            store.pool_sandboxes().unwrap()[0].state,
            SandboxState::Ready
        );
    }

    #[test]
    fn a_sandbox_being_destroyed_is_never_taken_and_ready_only_follows_booting() {
        let store = Store::open_in_memory().unwrap();
        let pooled = booting("balanced", 1);
        store
            .insert_pool_sandboxes(std::slice::from_ref(&pooled))
            .unwrap();
        assert!(store
            .begin_pool_destroy(&pooled.id, &[SandboxState::Ready], None)
            .unwrap()
            .is_none());
        let gone = store
            .begin_pool_destroy(&pooled.id, &[SandboxState::Booting], Some("evicted"))
            .unwrap()
            .unwrap();
        assert_eq!(gone.state, SandboxState::Destroying);
        assert_eq!(gone.error.as_deref(), Some("evicted"));
        assert!(!store
            .set_pool_ready(&pooled.id, StartMethod::Cold, None, 2)
            .unwrap());
        let job = submit(&store);
        assert!(store
            .start_job_from_pool(&job, "balanced", &terms(0))
            .unwrap()
            .is_none());
        store.remove_pool_sandbox(&pooled.id).unwrap();
        assert!(store.get_pool_sandbox(&pooled.id).unwrap().is_none());
    }
}
