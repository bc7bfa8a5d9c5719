//! Versioned schema migrations. Each entry runs once, in order, inside a transaction; the schema
//! version is SQLite's `user_version`.

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        profile TEXT NOT NULL,
        request_json TEXT NOT NULL,
        status TEXT NOT NULL,
        phase TEXT,
        sandbox_id TEXT,
        exit_code INTEGER,
        error TEXT,
        restarts INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        started_ms INTEGER,
        finished_ms INTEGER,
        deadline_ms INTEGER,
        guest_phoned_home_ms INTEGER,
        guest_exit_code INTEGER,
        guest_done_ms INTEGER,
        -- The outcome decided before teardown, so a crash during destroy keeps the reason.
        pending_status TEXT,
        pending_error TEXT
    );
    CREATE INDEX jobs_by_status ON jobs (status, seq);

    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL UNIQUE REFERENCES jobs (id),
        backend TEXT NOT NULL,
        vm_ref TEXT,
        state TEXT NOT NULL,
        phase TEXT,
        profile TEXT NOT NULL,
        cores INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        disk_gb INTEGER NOT NULL,
        keepalive INTEGER NOT NULL,
        exec_pid INTEGER,
        lease_expires_ms INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        destroyed_ms INTEGER,
        error TEXT
    );
    CREATE INDEX sandboxes_by_state ON sandboxes (state);

    CREATE TABLE phase_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        phase TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        ended_ms INTEGER,
        result TEXT
    );
    CREATE INDEX phase_runs_by_job ON phase_runs (job_id, id);

    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        phase TEXT,
        message TEXT NOT NULL
    );
    CREATE INDEX events_by_job ON events (job_id, id);

    CREATE TABLE artifacts (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (job_id, path)
    );

    CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        kind TEXT NOT NULL,
        expires_ms INTEGER NOT NULL,
        used_ms INTEGER
    );
    CREATE INDEX tokens_by_job ON tokens (job_id);
    "#,
    // 2: what the restart policy counts and a resumed phase keeps, persisted across restarts.
    r#"
    -- Each time a job's actor died without finishing, or the daemon stopped under it uncleanly.
    CREATE TABLE crashes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        at_ms INTEGER NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX crashes_by_job ON crashes (job_id, at_ms);
    -- When the current phase must end, set when it first began: a resumed phase keeps it.
    ALTER TABLE jobs ADD COLUMN phase_deadline_ms INTEGER;
    -- Set when a graceful shutdown suspended the job; a RUNNING job without it was interrupted.
    ALTER TABLE jobs ADD COLUMN suspended_ms INTEGER;
    "#,
    // 3: leases that start when a sandbox is kept, retention and paging.
    r#"
    -- The lease a kept sandbox gets, when a renew set it while its job ran.
    ALTER TABLE sandboxes ADD COLUMN lease_ttl_ms INTEGER;
    CREATE INDEX sandboxes_by_created ON sandboxes (created_ms, id);
    CREATE INDEX jobs_by_finished ON jobs (finished_ms) WHERE finished_ms IS NOT NULL;
    CREATE INDEX artifacts_by_created ON artifacts (created_ms);
    -- Files whose rows are gone, removed after the transaction that removed the rows: a crash in
    -- between leaves them here for the next pass, never a row pointing at a missing file.
    CREATE TABLE file_removals (
        path TEXT PRIMARY KEY,
        queued_ms INTEGER NOT NULL
    );
    "#,
    // 4: how a sandbox started.
    r#"
    -- NULL until its VM has started; then 'cold' (booted) or 'restored' (from a snapshot).
    ALTER TABLE sandboxes ADD COLUMN start_method TEXT;
    -- The snapshot a restored sandbox came from.
    ALTER TABLE sandboxes ADD COLUMN snapshot_id TEXT;
    "#,
    r#"
    -- The warm pool: sandboxes booted ahead of any job. A row is written before its VM is
    -- cloned; the job that takes one gets a sandboxes row for the same VM in the same
    -- transaction that deletes this one, so a VM is never in both tables, nor taken twice.
    CREATE TABLE pool_sandboxes (
        id TEXT PRIMARY KEY,
        profile TEXT NOT NULL,
        backend TEXT NOT NULL,
        vm_ref TEXT,
        state TEXT NOT NULL,
        cores INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        disk_gb INTEGER NOT NULL,
        -- The boot phases done, as JSON phase runs, for the job's phase list.
        phases_json TEXT NOT NULL DEFAULT '[]',
        start_method TEXT,
        snapshot_id TEXT,
        created_ms INTEGER NOT NULL,
        ready_ms INTEGER,
        updated_ms INTEGER NOT NULL,
        error TEXT
    );
    CREATE INDEX pool_by_profile ON pool_sandboxes (profile, state, created_ms);
    ALTER TABLE sandboxes ADD COLUMN from_pool INTEGER NOT NULL DEFAULT 0;
    "#,
    // 6: what a job's agent changed in its host repository's checkout, and cloud-init's last
    // verdict on each template.
    r#"
    ALTER TABLE jobs ADD COLUMN changes_json TEXT;
    CREATE TABLE template_checks (
        backend TEXT NOT NULL,
        template TEXT NOT NULL,
        job_id TEXT NOT NULL,
        checked_ms INTEGER NOT NULL,
        errors_json TEXT NOT NULL,
        PRIMARY KEY (backend, template)
    );
    "#,
    // 7: a runner token may be scoped to a pool sandbox instead of a job. SQLite cannot relax a
    // column's constraint in place, so the table is rebuilt with its rows.
    r#"
    CREATE TABLE tokens_7 (
        hash TEXT PRIMARY KEY,
        -- What the token is scoped to: a job, or (a runner token only) a pool sandbox booted
        -- before any job. Exactly one is set. The pool sandbox's tokens go with its row, whether
        -- a job takes it over or it is destroyed.
        job_id TEXT REFERENCES jobs (id),
        pool_id TEXT REFERENCES pool_sandboxes (id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        expires_ms INTEGER NOT NULL,
        used_ms INTEGER,
        CHECK ((job_id IS NULL) <> (pool_id IS NULL)),
        CHECK (pool_id IS NULL OR kind = 'runner')
    );
    INSERT INTO tokens_7 (hash, job_id, kind, expires_ms, used_ms)
        SELECT hash, job_id, kind, expires_ms, used_ms FROM tokens;
    DROP TABLE tokens;
    ALTER TABLE tokens_7 RENAME TO tokens;
    CREATE INDEX tokens_by_job ON tokens (job_id);
    CREATE INDEX tokens_by_pool ON tokens (pool_id) WHERE pool_id IS NOT NULL;
    "#,
];

pub(super) fn apply(conn: &mut Connection) -> Result<(), StoreError> {
    apply_through(conn, MIGRATIONS.len())
}

/// Applies the migrations up to schema `last` (tests build older schemas with it).
fn apply_through(conn: &mut Connection, last: usize) -> Result<(), StoreError> {
    let current: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: current,
            known: MIGRATIONS.len(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().take(last).skip(current) {
        let version = index + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .map_err(|source| StoreError::Migration { version, source })?;
        tx.pragma_update(None, "user_version", version)
            .map_err(|source| StoreError::Migration { version, source })?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_refuse_a_newer_schema() {
        let mut conn = Connection::open_in_memory().unwrap();
        apply(&mut conn).unwrap();
        apply(&mut conn).unwrap();
        let version: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(
            apply(&mut conn),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn a_schema_6_database_keeps_its_tokens_through_the_rebuild_of_their_table() {
        use super::super::TokenKind;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentlab.db");
        {
            let mut old = Connection::open(&path).unwrap();
            apply_through(&mut old, 6).unwrap();
            old.execute_batch(
                "INSERT INTO jobs (id, profile, request_json, status, created_ms)
                 VALUES ('j1', 'balanced', '{\"profile\":\"balanced\",\"task\":\"t\"}',
                         'RUNNING', 1);",
            )
            .unwrap();
            // A session token whose plaintext is "t0k3n".
            old.execute(
                "INSERT INTO tokens (hash, job_id, kind, expires_ms)
                 VALUES (?1, 'j1', 'session', ?2)",
                rusqlite::params![
                    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"t0k3n")),
                    i64::MAX
                ],
            )
            .unwrap();
        }
        let store = super::super::Store::open(&path).unwrap();
        assert_eq!(
            store.redeem_token("t0k3n", TokenKind::Session).unwrap(),
            Some("j1".to_owned())
        );
    }

    #[test]
    fn a_schema_3_database_gains_the_start_columns_and_keeps_its_sandboxes() {
        use crate::model::StartMethod;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentlab.db");
        {
            let mut old = Connection::open(&path).unwrap();
            apply_through(&mut old, 3).unwrap();
            old.execute_batch(
                "INSERT INTO jobs (id, profile, request_json, status, created_ms)
                 VALUES ('j1', 'balanced', '{\"profile\":\"balanced\",\"task\":\"t\"}',
                         'RUNNING', 1);
                 INSERT INTO sandboxes (id, job_id, backend, vm_ref, state, profile, cores,
                     memory_mb, disk_gb, keepalive, lease_expires_ms, created_ms, updated_ms)
                 VALUES ('sandbox-j1', 'j1', 'qemu', 'vm-1', 'RUNNING', 'balanced', 2, 2048,
                         10, 0, 5, 1, 1);",
            )
            .unwrap();
        }
        let store = super::super::Store::open(&path).unwrap();
        let version: usize = store
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
        let before = store.get_sandbox("sandbox-j1").unwrap().unwrap();
        assert_eq!(before.vm_ref.as_deref(), Some("vm-1"));
        assert_eq!((before.start_method, before.snapshot_id), (None, None));
        // The job's request predates `start`: it reads as the default.
        let job = store.get_job("j1").unwrap().unwrap();
        assert_eq!(job.start, crate::model::StartMode::Auto);

        store
            .set_sandbox_start("sandbox-j1", StartMethod::Restored, Some("snap-2cores"))
            .unwrap();
        let after = store.get_sandbox("sandbox-j1").unwrap().unwrap();
        assert_eq!(after.start_method, Some(StartMethod::Restored));
        assert_eq!(after.snapshot_id.as_deref(), Some("snap-2cores"));
    }
}
