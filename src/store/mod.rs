//! The daemon's state in SQLite (bundled, WAL, versioned migrations): jobs, sandboxes (and their
//! leases), the warm pool's sandboxes, events, phase runs, artifacts and tokens; paging of the
//! lists; retention. Every write that changes a job's course happens in one transaction with the
//! event that records it, so a crash never leaves the two apart.
//!
//! The `Store` methods are blocking. Async code reaches them through [`Store::call`], which runs the
//! closure on tokio's blocking pool, never on an executor thread.

mod admission;
mod artifacts;
mod crashes;
mod events;
mod jobs;
mod migrations;
mod paging;
mod pool;
mod retention;
mod sandboxes;
mod templates;
mod tokens;

#[cfg(test)]
pub(crate) mod test_support;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

pub use admission::{AdmissionView, Holding, QueuedJob};
pub use jobs::{GuestProgress, NewJob, PendingOutcome, PhaseLimit};
pub use paging::{BadCursor, JobCursor, Page, SandboxCursor};
pub use pool::{Claim, ClaimTerms};
pub use retention::{job_artifacts_path, job_bundle_path, job_log_path};
pub use sandboxes::{LeaseRenewal, MAX_LEASE};
pub use tokens::{TokenKind, TokenScope};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration to version {version} failed: {source}")]
    Migration {
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database is from a newer agentlabd (schema {found}, this build knows {known})")]
    TooNew { found: usize, known: usize },
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
    #[error("the queue is full ({0} jobs waiting)")]
    QueueFull(u64),
    #[error("creating {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store task failed: {0}")]
    Task(String),
}

#[derive(Debug, Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating if needed) the database file, with the file readable by root only: it
    /// holds jobs' environment, which may carry secrets.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        restrict_permissions(path)?;
        Store::init(conn)
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store, StoreError> {
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL with synchronous=NORMAL survives a process crash; only a power loss can drop the
        // last transactions, which the reconciler then repairs.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations::apply(&mut conn)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so a poisoned lock is safe to reuse.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs blocking store work on the blocking pool.
    pub async fn call<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn restrict_permissions(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        StoreError::Io {
            path: path.display().to_string(),
            source,
        }
    })
}

fn parse_column<T: std::str::FromStr>(table: &'static str, text: &str) -> Result<T, StoreError> {
    text.parse().map_err(|_| StoreError::Corrupt {
        table,
        message: format!("bad value `{text}`"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{new_id, now_ms, JobRequest, JobStatus, Phase, Sandbox, SandboxState};

    fn request() -> JobRequest {
        JobRequest {
            profile: "balanced".into(),
            task: "fix the bug".into(),
            env: [("API_KEY".to_owned(), "s3cret-value".to_owned())].into(),
            ..JobRequest::default()
        }
    }

    fn submit(store: &Store) -> String {
        let id = new_id();
        store
            .insert_job(
                &NewJob {
                    id: id.clone(),
                    request: request(),
                    deadline_ms: None,
                },
                100,
            )
            .unwrap();
        id
    }

    fn sandbox(job_id: &str) -> Sandbox {
        Sandbox {
            id: crate::model::sandbox_name_for(job_id),
            job_id: job_id.into(),
            backend: "fake".into(),
            vm_ref: None,
            state: SandboxState::Provisioning,
            phase: None,
            profile: "balanced".into(),
            cores: 4,
            memory_mb: 6144,
            disk_gb: 30,
            keepalive: false,
            lease_expires_at_ms: now_ms() + 60_000,
            created_at_ms: now_ms(),
            updated_at_ms: now_ms(),
            destroyed_at_ms: None,
            error: None,
            start_method: None,
            snapshot_id: None,
            from_pool: false,
        }
    }

    #[test]
    fn the_queue_is_fifo_and_bounded() {
        let store = Store::open_in_memory().unwrap();
        let first = submit(&store);
        let second = submit(&store);
        assert_eq!(
            store.get_job(&second).unwrap().unwrap().queue_position,
            Some(2)
        );
        let queued: Vec<String> = store
            .queued_jobs(10)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(queued, vec![first.clone(), second.clone()]);
        let full = store.insert_job(
            &NewJob {
                id: new_id(),
                request: request(),
                deadline_ms: None,
            },
            2,
        );
        assert!(matches!(full, Err(StoreError::QueueFull(2))));
        store.start_job(&first, "sandbox-x").unwrap().unwrap();
        assert_eq!(
            store.get_job(&second).unwrap().unwrap().queue_position,
            Some(1)
        );
        assert!(
            store.start_job(&first, "sandbox-x").unwrap().is_none(),
            "started twice"
        );
    }

    #[test]
    fn the_api_view_of_a_job_hides_env_values() {
        let store = Store::open_in_memory().unwrap();
        let id = submit(&store);
        let job = store.get_job(&id).unwrap().unwrap();
        assert_eq!(job.env_keys, vec!["API_KEY".to_owned()]);
        assert!(!serde_json::to_string(&job)
            .unwrap()
            .contains("s3cret-value"));
        assert_eq!(
            store.job_request(&id).unwrap().unwrap().env["API_KEY"],
            "s3cret-value"
        );
    }

    #[test]
    fn phases_are_timed_and_a_job_finishes_once() {
        let store = Store::open_in_memory().unwrap();
        let id = submit(&store);
        let sb = store.insert_sandbox(&sandbox(&id)).unwrap();
        store.start_job(&id, &sb.id).unwrap();
        let limit = |now_ms| PhaseLimit {
            now_ms,
            limit_ms: 60_000,
        };
        let (_, deadline) = store
            .begin_phase(&id, &sb.id, Phase::Clone, limit(1_000))
            .unwrap();
        assert_eq!(deadline, 61_000);
        assert_eq!(
            store.get_sandbox(&sb.id).unwrap().unwrap().state,
            SandboxState::Provisioning
        );
        // A restarted actor re-entering the phase closes the interrupted run and keeps the
        // deadline the phase got when it first began.
        let (_, resumed) = store
            .begin_phase(&id, &sb.id, Phase::Clone, limit(30_000))
            .unwrap();
        assert_eq!(resumed, 61_000);
        store.end_phase(&id, Phase::Clone, "ok", "cloned").unwrap();
        // The next phase gets its own.
        let (_, next) = store
            .begin_phase(&id, &sb.id, Phase::Start, limit(40_000))
            .unwrap();
        assert_eq!(next, 100_000);
        store.end_phase(&id, Phase::Start, "ok", "started").unwrap();
        let job = store.get_job(&id).unwrap().unwrap();
        let results: Vec<_> = job
            .phases
            .iter()
            .map(|p| p.result.clone().unwrap())
            .collect();
        assert_eq!(results, vec!["interrupted", "ok", "ok"]);
        assert!(job.phases.iter().all(|p| p.duration_seconds.is_some()));
        assert!(store
            .finish_job(&id, JobStatus::Failed, Some(2), Some("run: exit 2"))
            .unwrap()
            .is_some());
        assert!(store
            .finish_job(&id, JobStatus::Completed, None, None)
            .unwrap()
            .is_none());
        let job = store.get_job(&id).unwrap().unwrap();
        assert_eq!((job.status, job.exit_code), (JobStatus::Failed, Some(2)));
        let kinds: Vec<_> = store
            .events_after(&id, 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds.first().map(String::as_str), Some("status"));
        assert_eq!(kinds.last().map(String::as_str), Some("finished"));
    }

    #[test]
    fn one_time_tokens_work_once_and_all_die_with_the_job() {
        let store = Store::open_in_memory().unwrap();
        let id = submit(&store);
        let boot = store
            .issue_token(&id, TokenKind::Bootstrap, 60_000)
            .unwrap();
        let session = store.issue_token(&id, TokenKind::Session, 60_000).unwrap();
        let expired = store.issue_token(&id, TokenKind::Session, -1).unwrap();
        assert_eq!(
            store.redeem_token(&boot, TokenKind::PhoneHome).unwrap(),
            None,
            "wrong kind"
        );
        assert_eq!(
            store.redeem_token(&boot, TokenKind::Bootstrap).unwrap(),
            Some(id.clone())
        );
        assert_eq!(
            store.redeem_token(&boot, TokenKind::Bootstrap).unwrap(),
            None,
            "second use"
        );
        assert_eq!(
            store.redeem_token(&session, TokenKind::Session).unwrap(),
            Some(id.clone())
        );
        assert_eq!(
            store.redeem_token(&session, TokenKind::Session).unwrap(),
            Some(id.clone())
        );
        assert_eq!(
            store.redeem_token(&expired, TokenKind::Session).unwrap(),
            None
        );
        store
            .finish_job(&id, JobStatus::Completed, Some(0), None)
            .unwrap();
        assert_eq!(
            store.redeem_token(&session, TokenKind::Session).unwrap(),
            None
        );
    }

    #[test]
    fn sandbox_insert_is_idempotent_and_state_is_tracked() {
        let store = Store::open_in_memory().unwrap();
        let id = submit(&store);
        let first = store.insert_sandbox(&sandbox(&id)).unwrap();
        store.set_vm_ref(&first.id, "ref-1").unwrap();
        let again = store.insert_sandbox(&sandbox(&id)).unwrap();
        assert_eq!(
            again.vm_ref.as_deref(),
            Some("ref-1"),
            "the second insert must not overwrite"
        );
        store
            .set_sandbox_state(&first.id, SandboxState::Destroyed, None)
            .unwrap();
        assert!(store.live_sandboxes().unwrap().is_empty());
        assert_eq!(store.count_sandboxes_by_state().unwrap()["DESTROYED"], 1);
    }

    #[test]
    fn the_database_file_survives_reopen_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentlab.db");
        let id = submit(&Store::open(&path).unwrap());
        let reopened = Store::open(&path).unwrap();
        assert_eq!(
            reopened.get_job(&id).unwrap().unwrap().status,
            JobStatus::Queued
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
