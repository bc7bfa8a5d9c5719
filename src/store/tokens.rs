//! Guest tokens. Only a SHA-256 of each token is stored; the plaintext exists once, in the guest's
//! seed. Bootstrap and phone-home tokens work once; session tokens until they expire or the job
//! ends.

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
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::PhoneHome => "phone_home",
            TokenKind::Bootstrap => "bootstrap",
            TokenKind::Session => "session",
        }
    }

    fn one_time(self) -> bool {
        !matches!(self, TokenKind::Session)
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
                 RETURNING job_id",
                params![digest(token), kind.as_str(), now],
                |r| r.get(0),
            )
            .optional()?
        } else {
            conn.query_row(
                "SELECT job_id FROM tokens WHERE hash = ?1 AND kind = ?2 AND expires_ms > ?3",
                params![digest(token), kind.as_str(), now],
                |r| r.get(0),
            )
            .optional()?
        };
        Ok(job_id)
    }
}
