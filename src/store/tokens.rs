//! Guest tokens. Only a SHA-256 of each token is stored; the plaintext exists once, in the guest's
//! seed. Bootstrap and phone-home tokens work once; session tokens until they expire or the job
//! ends. Every token is bound to one job and one kind, and none works for a job that has ended:
//! `finish_job` expires them in the transaction that ends the job, and a redeem looks at the job's
//! status too, so a job ended by any other path holds no live token either. There is no grace
//! after the end: the job's VM is destroyed (or kept, its runner finished) before the job ends, so
//! nothing a guest may still do then needs a token.

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
    /// Fetches the daemon's runner (`GET /guest/v1/runner`); works until it expires or the job
    /// ends, so the template VM of a snapshot the job makes can use it too.
    Runner,
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

impl Store {
    /// Issues a token for a job; the plaintext is returned and never stored.
    pub fn issue_token(
        &self,
        job_id: &str,
        kind: TokenKind,
        ttl_ms: i64,
    ) -> Result<String, StoreError> {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token = hex::encode(bytes);
        let conn = self.conn();
        conn.execute(
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

    /// The job a token belongs to, if it is of `kind`, unexpired and (for one-time kinds) unused;
    /// a one-time token is used up by this call.
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
    use super::*;
    use crate::model::JobStatus;

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
