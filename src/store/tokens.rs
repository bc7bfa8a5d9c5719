//! Guest tokens. Only a SHA-256 of each token is stored; the plaintext exists once, in the guest's
//! seed. Bootstrap and phone-home tokens work once; session and runner tokens until they expire
//! or what they are scoped to ends. Every token is bound to one kind and one job, except a runner
//! token, which may instead be bound to one pool sandbox (booted before any job, it fetches the
//! runner during its boot). None works for a job that has ended: `finish_job` expires them in the
//! transaction that ends the job, and a redeem looks at the job's status too, so a job ended by
//! any other path holds no live token either. There is no grace after the end: the job's VM is
//! destroyed (or kept, its runner finished) before the job ends, so nothing a guest may still do
//! then needs a token. A pool sandbox's token works only while its row is BOOTING or READY: it
//! goes with the row (a job taking the VM over, or its destroy), and a DESTROYING row refuses it.

use rand::RngCore;
use rusqlite::{params, OptionalExtension};
use sha2::{Digest, Sha256};

use super::{Store, StoreError};
use crate::model::now_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    PhoneHome,
    Bootstrap,
    Session,
    /// Fetches the daemon's runner (`GET /guest/v1/runner`); works until it expires or what it
    /// is scoped to ends, so the template VM of a snapshot the job (or pool sandbox) makes can
    /// use it too. The only kind a pool sandbox can hold.
    Runner,
}

/// What a runner token is scoped to, as its redeem tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScope {
    Job(String),
    /// A pool sandbox, by its id (which is also its VM's name).
    Pool(String),
}

impl TokenScope {
    /// The job's or the pool sandbox's id.
    pub fn id(&self) -> &str {
        match self {
            TokenScope::Job(id) | TokenScope::Pool(id) => id,
        }
    }
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::PhoneHome => "phone_home",
            TokenKind::Bootstrap => "bootstrap",
            TokenKind::Session => "session",
            TokenKind::Runner => "runner",
        }
    }

    fn one_time(self) -> bool {
        !matches!(self, TokenKind::Session | TokenKind::Runner)
    }
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Store {
    /// Issues a token for a job; the plaintext is returned and never stored.
    pub fn issue_token(
        &self,
        job_id: &str,
        kind: TokenKind,
        ttl_ms: i64,
    ) -> Result<String, StoreError> {
        let token = new_token();
        self.conn().execute(
            "INSERT INTO tokens (hash, job_id, kind, expires_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                digest(&token),
                job_id,
                kind.as_str(),
                now_ms().saturating_add(ttl_ms)
            ],
        )?;
        Ok(token)
    }

    /// Issues a runner token for the pool sandbox `pool_id` (its row must exist: the insert
    /// fails otherwise); the plaintext is returned and never stored. No other kind can be
    /// scoped to a pool sandbox, which has no job to bootstrap or phone home for.
    pub fn issue_pool_runner_token(
        &self,
        pool_id: &str,
        ttl_ms: i64,
    ) -> Result<String, StoreError> {
        let token = new_token();
        self.conn().execute(
            "INSERT INTO tokens (hash, pool_id, kind, expires_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                digest(&token),
                pool_id,
                TokenKind::Runner.as_str(),
                now_ms().saturating_add(ttl_ms)
            ],
        )?;
        Ok(token)
    }

    /// What an unexpired runner token is scoped to: its job, while QUEUED or RUNNING, or its
    /// pool sandbox, while BOOTING or READY. None for any other token.
    pub fn redeem_runner_token(&self, token: &str) -> Result<Option<TokenScope>, StoreError> {
        if token.is_empty() || token.len() > 128 {
            return Ok(None);
        }
        let scope: Option<(Option<String>, Option<String>)> = self
            .conn()
            .query_row(
                "SELECT t.job_id, t.pool_id FROM tokens t
                 LEFT JOIN jobs j ON j.id = t.job_id
                 LEFT JOIN pool_sandboxes p ON p.id = t.pool_id
                 WHERE t.hash = ?1 AND t.kind = ?2 AND t.expires_ms > ?3
                   AND (j.status IN ('QUEUED', 'RUNNING') OR p.state IN ('BOOTING', 'READY'))",
                params![digest(token), TokenKind::Runner.as_str(), now_ms()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match scope {
            Some((Some(job), _)) => Some(TokenScope::Job(job)),
            Some((None, Some(pool))) => Some(TokenScope::Pool(pool)),
            _ => None,
        })
    }

    /// The job a token belongs to, if it is of `kind`, unexpired and (for one-time kinds) unused;
    /// a one-time token is used up by this call. A runner token scoped to a pool sandbox names
    /// no job, so it is None here: `redeem_runner_token` tells either scope.
    pub fn redeem_token(&self, token: &str, kind: TokenKind) -> Result<Option<String>, StoreError> {
        if token.is_empty() || token.len() > 128 {
            return Ok(None);
        }
        let conn = self.conn();
        let now = now_ms();
        let job_id = if kind.one_time() {
            conn.query_row(
                "UPDATE tokens SET used_ms = ?3
                 WHERE hash = ?1 AND kind = ?2 AND used_ms IS NULL AND expires_ms > ?3
                   AND job_id IN (SELECT id FROM jobs WHERE status IN ('QUEUED', 'RUNNING'))
                 RETURNING job_id",
                params![digest(token), kind.as_str(), now],
                |r| r.get(0),
            )
            .optional()?
        } else {
            conn.query_row(
                "SELECT t.job_id FROM tokens t JOIN jobs j ON j.id = t.job_id
                 WHERE t.hash = ?1 AND t.kind = ?2 AND t.expires_ms > ?3
                   AND j.status IN ('QUEUED', 'RUNNING')",
                params![digest(token), kind.as_str(), now],
                |r| r.get(0),
            )
            .optional()?
        };
        Ok(job_id)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::submit;
    use super::super::ClaimTerms;
    use super::*;
    use crate::model::{new_pool_sandbox_name, JobStatus, PoolSandbox, SandboxState, StartMethod};

    /// A BOOTING pool sandbox's id.
    fn pooled(store: &Store) -> String {
        let row = PoolSandbox::booting(new_pool_sandbox_name(), "balanced", "qemu", (1, 512, 4), 1);
        store
            .insert_pool_sandboxes(std::slice::from_ref(&row))
            .unwrap();
        row.id
    }

    fn pool_tokens(store: &Store) -> i64 {
        store
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM tokens WHERE pool_id IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn a_pool_runner_token_works_while_its_sandbox_boots_and_waits_and_not_once_it_is_destroyed() {
        let store = Store::open_in_memory().unwrap();
        let (id, other) = (pooled(&store), pooled(&store));
        let token = store.issue_pool_runner_token(&id, 60_000).unwrap();
        let redeem = |t: &str| store.redeem_runner_token(t).unwrap();
        assert_eq!(redeem(&token), Some(TokenScope::Pool(id.clone())));
        assert!(store
            .set_pool_ready(&id, StartMethod::Cold, None, 2)
            .unwrap());
        assert_eq!(redeem(&token), Some(TokenScope::Pool(id.clone())), "READY");
        // Another pool sandbox's destroy changes nothing for this one.
        store
            .begin_pool_destroy(&other, &[SandboxState::Booting], None)
            .unwrap()
            .unwrap();
        assert_eq!(redeem(&token), Some(TokenScope::Pool(id.clone())));
        store
            .begin_pool_destroy(&id, &[SandboxState::Ready], Some("evicted"))
            .unwrap()
            .unwrap();
        assert_eq!(redeem(&token), None, "DESTROYING");
        store.remove_pool_sandbox(&id).unwrap();
        assert_eq!(redeem(&token), None, "gone");
        assert_eq!(pool_tokens(&store), 0, "the token went with its row");
    }

    #[test]
    fn a_pool_runner_token_stops_working_when_a_job_takes_its_sandbox_over() {
        let store = Store::open_in_memory().unwrap();
        let id = pooled(&store);
        let token = store.issue_pool_runner_token(&id, 60_000).unwrap();
        store
            .set_pool_ready(&id, StartMethod::Cold, None, 2)
            .unwrap();
        let job = submit(&store);
        let terms = ClaimTerms {
            keepalive: false,
            lease_expires_ms: i64::MAX,
            ready_since_ms: 0,
        };
        let claim = store
            .start_job_from_pool(&job, "balanced", &terms)
            .unwrap()
            .unwrap();
        assert_eq!(claim.sandbox_id, id, "the job runs in the same VM");
        assert_eq!(store.redeem_runner_token(&token).unwrap(), None);
        assert_eq!(pool_tokens(&store), 0);
        // Nor does it pass for the job that now owns the VM.
        assert_eq!(store.redeem_token(&token, TokenKind::Runner).unwrap(), None);
    }

    #[test]
    fn a_pool_runner_token_expires_and_is_no_token_of_any_other_kind() {
        let store = Store::open_in_memory().unwrap();
        let id = pooled(&store);
        let expired = store.issue_pool_runner_token(&id, -1).unwrap();
        assert_eq!(store.redeem_runner_token(&expired).unwrap(), None);
        let live = store.issue_pool_runner_token(&id, 60_000).unwrap();
        for kind in [
            TokenKind::PhoneHome,
            TokenKind::Bootstrap,
            TokenKind::Session,
            TokenKind::Runner,
        ] {
            assert_eq!(store.redeem_token(&live, kind).unwrap(), None, "{kind:?}");
        }
        assert_eq!(
            store.redeem_runner_token(&live).unwrap(),
            Some(TokenScope::Pool(id))
        );
        // A job's session token is not a runner token of either scope.
        let job = submit(&store);
        let session = store.issue_token(&job, TokenKind::Session, 60_000).unwrap();
        assert_eq!(store.redeem_runner_token(&session).unwrap(), None);
    }

    #[test]
    fn only_a_runner_token_can_be_scoped_to_a_pool_sandbox_and_only_to_one_that_exists() {
        let store = Store::open_in_memory().unwrap();
        let id = pooled(&store);
        for kind in ["bootstrap", "phone_home", "session"] {
            let refused = store.conn().execute(
                "INSERT INTO tokens (hash, pool_id, kind, expires_ms) VALUES (?1, ?2, ?3, ?4)",
                params![format!("h-{kind}"), id, kind, i64::MAX],
            );
            assert!(refused.is_err(), "{kind} scoped to a pool sandbox");
        }
        let job = submit(&store);
        let both = store.conn().execute(
            "INSERT INTO tokens (hash, job_id, pool_id, kind, expires_ms)
             VALUES ('h-both', ?1, ?2, 'runner', ?3)",
            params![job, id, i64::MAX],
        );
        assert!(both.is_err(), "scoped to a job and a pool sandbox at once");
        assert!(store
            .issue_pool_runner_token("pool-not-there", 60_000)
            .is_err());
    }

    #[test]
    fn a_jobs_runner_token_redeems_as_the_job_until_the_job_ends() {
        let store = Store::open_in_memory().unwrap();
        let job = submit(&store);
        let token = store.issue_token(&job, TokenKind::Runner, 60_000).unwrap();
        assert_eq!(
            store.redeem_runner_token(&token).unwrap(),
            Some(TokenScope::Job(job.clone()))
        );
        store
            .finish_job(&job, JobStatus::Cancelled, None, None)
            .unwrap();
        assert_eq!(store.redeem_runner_token(&token).unwrap(), None);
    }

    #[test]
    fn each_token_works_for_its_own_job_and_kind_only() {
        let store = Store::open_in_memory().unwrap();
        let (a, b) = (submit(&store), submit(&store));
        let a_session = store.issue_token(&a, TokenKind::Session, 60_000).unwrap();
        let b_session = store.issue_token(&b, TokenKind::Session, 60_000).unwrap();
        let a_boot = store.issue_token(&a, TokenKind::Bootstrap, 60_000).unwrap();
        let a_home = store.issue_token(&a, TokenKind::PhoneHome, 60_000).unwrap();
        assert_eq!(
            store.redeem_token(&a_session, TokenKind::Session).unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            store.redeem_token(&b_session, TokenKind::Session).unwrap(),
            Some(b.clone())
        );
        for (token, kind) in [
            (&a_session, TokenKind::Bootstrap),
            (&a_session, TokenKind::PhoneHome),
            (&a_boot, TokenKind::Session),
            (&a_boot, TokenKind::PhoneHome),
            (&a_home, TokenKind::Session),
            (&a_home, TokenKind::Bootstrap),
        ] {
            assert_eq!(store.redeem_token(token, kind).unwrap(), None, "{kind:?}");
        }
        // The wrong-kind tries used nothing up.
        assert_eq!(
            store.redeem_token(&a_boot, TokenKind::Bootstrap).unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            store.redeem_token(&a_home, TokenKind::PhoneHome).unwrap(),
            Some(a)
        );
    }

    #[test]
    fn no_token_works_once_its_job_has_ended_whatever_ended_it() {
        let store = Store::open_in_memory().unwrap();
        let id = submit(&store);
        let session = store.issue_token(&id, TokenKind::Session, 60_000).unwrap();
        let boot = store
            .issue_token(&id, TokenKind::Bootstrap, 60_000)
            .unwrap();
        // Ended by a path that does not expire tokens itself (the queue deadline, say).
        store
            .conn()
            .execute(
                "UPDATE jobs SET status = ?2 WHERE id = ?1",
                params![id, JobStatus::Timeout.as_str()],
            )
            .unwrap();
        assert_eq!(
            store.redeem_token(&session, TokenKind::Session).unwrap(),
            None
        );
        assert_eq!(
            store.redeem_token(&boot, TokenKind::Bootstrap).unwrap(),
            None
        );
        let expires: i64 = store
            .conn()
            .query_row(
                "SELECT MAX(expires_ms) FROM tokens WHERE job_id = ?1",
                [&id],
                |r| r.get(0),
            )
            .unwrap();
        assert!(expires > now_ms(), "the refusal came from the job's status");
    }
}
