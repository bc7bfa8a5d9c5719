//! Sandboxes: one row per VM, written before the VM is cloned so that a restart always knows the
//! name of every VM it may have made.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Row};

use super::{parse_column, Store, StoreError};
use crate::model::{now_ms, Sandbox, SandboxState};

const SANDBOX_COLUMNS: &str =
    "id, job_id, backend, vm_ref, state, phase, profile, cores, memory_mb, \
     disk_gb, keepalive, lease_expires_ms, created_ms, updated_ms, destroyed_ms, error";

fn sandbox_from_row(row: &Row<'_>) -> Result<Sandbox, StoreError> {
    let state: String = row.get(4)?;
    let phase: Option<String> = row.get(5)?;
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

    /// Live sandboxes whose lease ended before `now_ms`.
    pub fn expired_sandboxes(&self, now_ms: i64) -> Result<Vec<Sandbox>, StoreError> {
        self.query_sandboxes(
            &format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE state != 'DESTROYED' AND lease_expires_ms < ?1 ORDER BY lease_expires_ms"
            ),
            [now_ms],
        )
    }

    pub fn set_vm_ref(&self, id: &str, vm_ref: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE sandboxes SET vm_ref = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, vm_ref, now_ms()],
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
        let mut stmt =
            conn.prepare_cached("SELECT state, COUNT(*) FROM sandboxes GROUP BY state")?;
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
