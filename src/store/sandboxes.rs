//! Sandboxes: one row per VM, written before the VM is cloned so that a restart always knows the
//! name of every VM it may have made; and their leases.
//!
//! A lease counts only while a sandbox is KEPT (after its job): it is set to now + the sandbox's
//! ttl when the sandbox turns KEPT, and a renew moves it. While the job runs, its run timeout
//! limits it, and a renew only sets the ttl the lease gets once kept.

use std::collections::BTreeMap;
use std::time::Duration;

use rusqlite::{params, OptionalExtension, Row};

use super::paging::{Page, SandboxCursor};
use super::{parse_column, Store, StoreError};
use crate::model::{now_ms, JobStatus, Sandbox, SandboxState, StartMethod};

/// The longest lease a sandbox can get, from its profile, its job or a renew: a typo must not keep
/// a VM for years.
pub const MAX_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);

fn max_lease_ms() -> i64 {
    i64::try_from(MAX_LEASE.as_millis()).unwrap_or(i64::MAX)
}

/// What a renew did.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseRenewal {
    /// The sandbox is KEPT; its lease now ends at `sandbox.lease_expires_at_ms`.
    Extended(Sandbox),
    /// Its job still runs; the sandbox gets the new ttl as its lease once kept.
    AfterJob(Sandbox),
    /// Nothing to renew (destroyed, being destroyed, or its job ended without keeping it).
    Refused(String),
    NotFound,
}

const SANDBOX_COLUMNS: &str =
    "id, job_id, backend, vm_ref, state, phase, profile, cores, memory_mb, \
     disk_gb, keepalive, lease_expires_ms, created_ms, updated_ms, destroyed_ms, error, \
     start_method, snapshot_id, from_pool";

fn sandbox_from_row(row: &Row<'_>) -> Result<Sandbox, StoreError> {
    let state: String = row.get(4)?;
    let phase: Option<String> = row.get(5)?;
    let start_method: Option<String> = row.get(16)?;
    Ok(Sandbox {
        id: row.get(0)?,
        job_id: row.get(1)?,
        backend: row.get(2)?,
        vm_ref: row.get(3)?,
        state: parse_column("sandboxes", &state)?,
        phase: phase.map(|p| parse_column("sandboxes", &p)).transpose()?,
        profile: row.get(6)?,
        cores: row.get(7)?,
        memory_mb: row.get(8)?,
        disk_gb: row.get(9)?,
        keepalive: row.get(10)?,
        lease_expires_at_ms: row.get(11)?,
        created_at_ms: row.get(12)?,
        updated_at_ms: row.get(13)?,
        destroyed_at_ms: row.get(14)?,
        error: row.get(15)?,
        start_method: start_method
            .map(|m| parse_column("sandboxes", &m))
            .transpose()?,
        snapshot_id: row.get(17)?,
        from_pool: row.get(18)?,
    })
}

impl Store {
    fn query_sandboxes(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Sandbox>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let mut sandboxes = Vec::new();
        while let Some(row) = rows.next()? {
            sandboxes.push(sandbox_from_row(row)?);
        }
        Ok(sandboxes)
    }

    /// Inserts the sandbox unless its id exists already; returns the stored row either way.
    pub fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<Sandbox, StoreError> {
        {
            let conn = self.conn();
            conn.prepare_cached(
                "INSERT OR IGNORE INTO sandboxes (id, job_id, backend, vm_ref, state, phase, profile,
                     cores, memory_mb, disk_gb, keepalive, lease_expires_ms, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13)",
            )?
            .execute(params![
                sandbox.id,
                sandbox.job_id,
                sandbox.backend,
                sandbox.vm_ref,
                sandbox.state.as_str(),
                sandbox.phase.map(|p| p.as_str()),
                sandbox.profile,
                sandbox.cores,
                sandbox.memory_mb,
                sandbox.disk_gb,
                sandbox.keepalive,
                sandbox.lease_expires_at_ms,
                sandbox.created_at_ms,
            ])?;
        }
        self.get_sandbox(&sandbox.id)?.ok_or(StoreError::Corrupt {
            table: "sandboxes",
            message: format!("sandbox {} vanished after insert", sandbox.id),
        })
    }

    pub fn get_sandbox(&self, id: &str) -> Result<Option<Sandbox>, StoreError> {
        Ok(self
            .query_sandboxes(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
                [id],
            )?
            .pop())
    }

    pub fn sandbox_for_job(&self, job_id: &str) -> Result<Option<Sandbox>, StoreError> {
        Ok(self
            .query_sandboxes(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE job_id = ?1"),
                [job_id],
            )?
            .pop())
    }

    pub fn list_sandboxes(&self, state: Option<SandboxState>) -> Result<Vec<Sandbox>, StoreError> {
        match state {
            Some(state) => self.query_sandboxes(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state = ?1 ORDER BY created_ms DESC"),
                [state.as_str()],
            ),
            None => self.query_sandboxes(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_ms DESC"),
                [],
            ),
        }
    }

    /// Sandboxes whose VM may still exist.
    pub fn live_sandboxes(&self) -> Result<Vec<Sandbox>, StoreError> {
        self.query_sandboxes(
            &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state != 'DESTROYED' ORDER BY created_ms"),
            [],
        )
    }

    /// One page of sandboxes, newest first, optionally in one state, starting after `after`.
    pub fn list_sandboxes_page(
        &self,
        state: Option<SandboxState>,
        after: Option<&SandboxCursor>,
        limit: u32,
    ) -> Result<Page<Sandbox, SandboxCursor>, StoreError> {
        let (after_ms, after_id) = match after {
            Some(c) => (Some(c.created_ms), Some(c.id.as_str())),
            None => (None, None),
        };
        let rows = self.query_sandboxes(
            &format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE (?1 IS NULL OR state = ?1)
                   AND (?2 IS NULL OR (created_ms, id) < (?2, ?3))
                 ORDER BY created_ms DESC, id DESC LIMIT ?4"
            ),
            params![
                state.map(|s| s.as_str()),
                after_ms,
                after_id,
                i64::from(limit) + 1
            ],
        )?;
        Ok(Page::from_rows(rows, limit, |s| SandboxCursor {
            created_ms: s.created_at_ms,
            id: s.id.clone(),
        }))
    }

    /// KEPT sandboxes whose lease ended before `now_ms`.
    pub fn expired_kept_sandboxes(&self, now_ms: i64) -> Result<Vec<Sandbox>, StoreError> {
        self.query_sandboxes(
            &format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE state = 'KEPT' AND lease_expires_ms < ?1 ORDER BY lease_expires_ms"
            ),
            [now_ms],
        )
    }

    /// KEPT → DESTROYING, only if its lease still ran out by `now_ms` (a renew may have come in
    /// between); true if the caller now destroys it.
    pub fn begin_lease_expiry(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let conn = self.conn();
        let changed = conn.execute(
            "UPDATE sandboxes SET state = 'DESTROYING', updated_ms = ?3
             WHERE id = ?1 AND state = 'KEPT' AND lease_expires_ms < ?2",
            params![id, now_ms, self::now_ms()],
        )?;
        Ok(changed > 0)
    }

    /// Keeps the sandbox after its job: KEPT, with its lease from `now_ms` for the ttl a renew set
    /// while the job ran, else `ttl` (the job's or its profile's), at most [`MAX_LEASE`].
    pub fn keep_sandbox(&self, id: &str, now_ms: i64, ttl: Duration) -> Result<(), StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let conn = self.conn();
        conn.execute(
            "UPDATE sandboxes SET state = 'KEPT', updated_ms = ?5,
                 lease_expires_ms = ?2 + MIN(COALESCE(lease_ttl_ms, ?3), ?4)
             WHERE id = ?1",
            params![id, now_ms, ttl_ms, max_lease_ms(), self::now_ms()],
        )?;
        Ok(())
    }

    /// Renews a sandbox's lease to `ttl` from `now_ms`: a KEPT sandbox's lease ends then; a
    /// sandbox whose job still runs gets `ttl` once kept. `ttl` must be within [`MAX_LEASE`]
    /// (the caller checks; it is capped here too).
    pub fn renew_lease(
        &self,
        id: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<LeaseRenewal, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis())
            .unwrap_or(i64::MAX)
            .min(max_lease_ms());
        let extends = {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let row: Option<(String, Option<String>, bool)> = tx
                .query_row(
                    "SELECT s.state, j.status, s.keepalive
                     FROM sandboxes s LEFT JOIN jobs j ON j.id = s.job_id WHERE s.id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((state, status, keepalive)) = row else {
                return Ok(LeaseRenewal::NotFound);
            };
            let state: SandboxState = parse_column("sandboxes", &state)?;
            let status: Option<JobStatus> = status.map(|s| parse_column("jobs", &s)).transpose()?;
            let job_running = status.is_some_and(|s| !s.is_terminal());
            let extends = match state {
                SandboxState::Kept => true,
                SandboxState::Destroying | SandboxState::Destroyed => {
                    return Ok(LeaseRenewal::Refused(format!(
                        "sandbox {id} is {state}; only a KEPT sandbox or one whose job still runs has a lease to renew"
                    )));
                }
                _ if job_running && !keepalive => {
                    return Ok(LeaseRenewal::Refused(format!(
                        "sandbox {id} will not be kept after its job (its profile has keepalive: false), so it has no lease to renew"
                    )));
                }
                _ if job_running => false,
                _ => {
                    return Ok(LeaseRenewal::Refused(format!(
                        "sandbox {id} is {state} and its job is over without keeping it; only a KEPT sandbox or one whose job still runs has a lease to renew"
                    )));
                }
            };
            // Either way the ttl is remembered; a kept sandbox's lease also moves now. For a
            // running one the expiry is only an estimate: it does not count until kept.
            tx.execute(
                "UPDATE sandboxes SET lease_ttl_ms = ?2, lease_expires_ms = ?3 + ?2,
                     updated_ms = ?4
                 WHERE id = ?1",
                params![id, ttl_ms, now_ms, self::now_ms()],
            )?;
            tx.commit()?;
            extends
        };
        Ok(match self.get_sandbox(id)? {
            None => LeaseRenewal::NotFound,
            Some(sandbox) if extends => LeaseRenewal::Extended(sandbox),
            Some(sandbox) => LeaseRenewal::AfterJob(sandbox),
        })
    }

    pub fn set_vm_ref(&self, id: &str, vm_ref: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE sandboxes SET vm_ref = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, vm_ref, now_ms()],
        )?;
        Ok(())
    }

    /// Records how the sandbox's VM started: booted cold, or restored from `snapshot_id`. A later
    /// start (a restarted job) replaces what an earlier one recorded.
    pub fn set_sandbox_start(
        &self,
        id: &str,
        method: StartMethod,
        snapshot_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE sandboxes SET start_method = ?2, snapshot_id = ?3, updated_ms = ?4
             WHERE id = ?1",
            params![id, method.as_str(), snapshot_id, now_ms()],
        )?;
        Ok(())
    }

    pub fn set_exec_pid(&self, id: &str, pid: i64) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE sandboxes SET exec_pid = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, pid, now_ms()],
        )?;
        Ok(())
    }

    pub fn exec_pid(&self, id: &str) -> Result<Option<i64>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row("SELECT exec_pid FROM sandboxes WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .flatten())
    }

    pub fn set_sandbox_state(
        &self,
        id: &str,
        state: SandboxState,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        let now = now_ms();
        let destroyed = (state == SandboxState::Destroyed).then_some(now);
        conn.execute(
            "UPDATE sandboxes SET state = ?2, error = COALESCE(?3, error), updated_ms = ?4,
                 destroyed_ms = COALESCE(?5, destroyed_ms)
             WHERE id = ?1",
            params![id, state.as_str(), error, now, destroyed],
        )?;
        Ok(())
    }

    pub fn count_sandboxes_by_state(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT state, COUNT(*) FROM
                 (SELECT state FROM sandboxes UNION ALL SELECT state FROM pool_sandboxes)
             GROUP BY state",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
        let mut counts: BTreeMap<String, u64> = SandboxState::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        for row in rows {
            let (state, count) = row?;
            counts.insert(state, count);
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{new_id, sandbox_name_for, JobRequest};
    use crate::store::NewJob;

    const MINUTE: Duration = Duration::from_secs(60);

    /// A RUNNING job with a RUNNING sandbox created at `created_ms`.
    fn running(store: &Store, keepalive: bool, created_ms: i64) -> String {
        let job_id = new_id();
        let request = JobRequest {
            profile: "interactive-dev".into(),
            task: "t".into(),
            ..JobRequest::default()
        };
        store
            .insert_job(
                &NewJob {
                    id: job_id.clone(),
                    request,
                    deadline_ms: None,
                },
                1000,
            )
            .unwrap();
        let sb = store
            .insert_sandbox(&Sandbox {
                id: sandbox_name_for(&job_id),
                job_id: job_id.clone(),
                backend: "fake".into(),
                vm_ref: None,
                state: SandboxState::Running,
                phase: None,
                profile: "interactive-dev".into(),
                cores: 1,
                memory_mb: 512,
                disk_gb: 1,
                keepalive,
                lease_expires_at_ms: created_ms,
                created_at_ms: created_ms,
                updated_at_ms: created_ms,
                destroyed_at_ms: None,
                error: None,
                start_method: None,
                snapshot_id: None,
                from_pool: false,
            })
            .unwrap();
        store.start_job(&job_id, &sb.id).unwrap();
        sb.id
    }

    fn job_of(store: &Store, id: &str) -> String {
        store.get_sandbox(id).unwrap().unwrap().job_id
    }

    fn lease(store: &Store, id: &str) -> i64 {
        store.get_sandbox(id).unwrap().unwrap().lease_expires_at_ms
    }

    #[test]
    fn keeping_starts_the_lease_from_then_and_caps_it() {
        let store = Store::open_in_memory().unwrap();
        let id = running(&store, true, 0);
        store.keep_sandbox(&id, 1_000_000, 30 * MINUTE).unwrap();
        let kept = store.get_sandbox(&id).unwrap().unwrap();
        assert_eq!(kept.state, SandboxState::Kept);
        assert_eq!(kept.lease_expires_at_ms, 1_000_000 + 30 * 60_000);

        let long = running(&store, true, 0);
        store
            .keep_sandbox(&long, 0, Duration::from_secs(10 * 365 * 86400))
            .unwrap();
        assert_eq!(lease(&store, &long), max_lease_ms());
    }

    #[test]
    fn a_renew_while_the_job_runs_becomes_the_lease_once_kept() {
        let store = Store::open_in_memory().unwrap();
        let id = running(&store, true, 0);
        let renewed = store.renew_lease(&id, 5_000, 90 * MINUTE).unwrap();
        assert!(matches!(renewed, LeaseRenewal::AfterJob(_)), "{renewed:?}");
        assert_eq!(
            store.get_sandbox(&id).unwrap().unwrap().state,
            SandboxState::Running,
            "a renew does not keep it"
        );
        assert!(store.expired_kept_sandboxes(i64::MAX).unwrap().is_empty());
        // The job's own ttl (30m) loses to the renewed one.
        store.keep_sandbox(&id, 1_000_000, 30 * MINUTE).unwrap();
        assert_eq!(lease(&store, &id), 1_000_000 + 90 * 60_000);
    }

    #[test]
    fn a_kept_lease_moves_and_only_expired_kept_sandboxes_are_collected() {
        let store = Store::open_in_memory().unwrap();
        let id = running(&store, true, 0);
        let other = running(&store, true, 0);
        store.keep_sandbox(&id, 0, MINUTE).unwrap();
        assert_eq!(
            store
                .expired_kept_sandboxes(60_001)
                .unwrap()
                .into_iter()
                .map(|s| s.id)
                .collect::<Vec<_>>(),
            vec![id.clone()],
            "the running one is never collected"
        );
        let renewed = store.renew_lease(&id, 50_000, 10 * MINUTE).unwrap();
        let LeaseRenewal::Extended(sandbox) = renewed else {
            panic!("{renewed:?}");
        };
        assert_eq!(sandbox.lease_expires_at_ms, 50_000 + 600_000);
        // A collector that listed it before the renew loses the race.
        assert!(!store.begin_lease_expiry(&id, 60_001).unwrap());
        assert!(store.begin_lease_expiry(&id, 650_001).unwrap());
        assert_eq!(
            store.get_sandbox(&id).unwrap().unwrap().state,
            SandboxState::Destroying
        );
        assert!(store.get_sandbox(&other).unwrap().is_some());
    }

    #[test]
    fn a_renew_is_refused_without_a_lease_to_renew() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(
            store.renew_lease("sandbox-none", 0, MINUTE).unwrap(),
            LeaseRenewal::NotFound
        );
        let not_kept = running(&store, false, 0);
        let destroyed = running(&store, true, 0);
        store
            .set_sandbox_state(&destroyed, SandboxState::Destroyed, None)
            .unwrap();
        let over = running(&store, true, 0);
        store
            .finish_job(&job_of(&store, &over), JobStatus::Failed, None, None)
            .unwrap();
        for (id, says) in [
            (&not_kept, "keepalive: false"),
            (&destroyed, "DESTROYED"),
            (&over, "its job is over"),
        ] {
            match store.renew_lease(id, 0, MINUTE).unwrap() {
                LeaseRenewal::Refused(message) => assert!(message.contains(says), "{message}"),
                other => panic!("{id}: {other:?}"),
            }
        }
    }

    #[test]
    fn how_a_sandbox_started_is_read_back_by_every_query() {
        let store = Store::open_in_memory().unwrap();
        let id = running(&store, true, 0);
        let fresh = store.get_sandbox(&id).unwrap().unwrap();
        assert_eq!(
            (fresh.start_method, fresh.snapshot_id.clone()),
            (None, None)
        );
        let shown = serde_json::to_value(&fresh).unwrap();
        assert!(
            shown.get("start_method").is_none() && shown.get("snapshot_id").is_none(),
            "{shown}"
        );

        store
            .set_sandbox_start(&id, StartMethod::Restored, Some("snap-1"))
            .unwrap();
        let job_id = job_of(&store, &id);
        store.keep_sandbox(&id, 0, MINUTE).unwrap();
        let reads = [
            store.get_sandbox(&id).unwrap(),
            store.sandbox_for_job(&job_id).unwrap(),
            store.list_sandboxes(None).unwrap().pop(),
            store
                .list_sandboxes(Some(SandboxState::Kept))
                .unwrap()
                .pop(),
            store.live_sandboxes().unwrap().pop(),
            store
                .list_sandboxes_page(None, None, 10)
                .unwrap()
                .items
                .pop(),
            store.expired_kept_sandboxes(i64::MAX).unwrap().pop(),
        ];
        for read in reads {
            let sandbox = read.unwrap();
            assert_eq!(sandbox.start_method, Some(StartMethod::Restored));
            assert_eq!(sandbox.snapshot_id.as_deref(), Some("snap-1"));
        }
        let shown = serde_json::to_value(store.get_sandbox(&id).unwrap().unwrap()).unwrap();
        assert_eq!(shown["start_method"], "restored");
        assert_eq!(shown["snapshot_id"], "snap-1");

        // A restarted job that booted cold this time drops the snapshot it no longer runs from.
        store
            .set_sandbox_start(&id, StartMethod::Cold, None)
            .unwrap();
        let cold = store.get_sandbox(&id).unwrap().unwrap();
        assert_eq!(
            (cold.start_method, cold.snapshot_id),
            (Some(StartMethod::Cold), None)
        );
    }

    #[test]
    fn pages_of_sandboxes_hold_each_one_once() {
        let store = Store::open_in_memory().unwrap();
        // Equal creation times: the id breaks the tie, so none is skipped or repeated.
        let mut all: Vec<String> = (0..7)
            .map(|i| running(&store, false, 1000 + i / 3))
            .collect();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.list_sandboxes_page(None, after.as_ref(), 3).unwrap();
            assert!(page.items.len() <= 3);
            seen.extend(page.items.iter().map(|s| s.id.clone()));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let newest_first: Vec<i64> = seen
            .iter()
            .map(|id| store.get_sandbox(id).unwrap().unwrap().created_at_ms)
            .collect();
        assert!(
            newest_first.windows(2).all(|w| w[0] >= w[1]),
            "{newest_first:?}"
        );
        seen.sort();
        all.sort();
        assert_eq!(seen, all);
        let kept = store
            .list_sandboxes_page(Some(SandboxState::Kept), None, 3)
            .unwrap();
        assert!(kept.items.is_empty() && kept.next.is_none());
    }
}
